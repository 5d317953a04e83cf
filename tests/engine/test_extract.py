import numpy as np
import pytest
import torch

from attnprog.engine.corpus import make_corpus
from attnprog.engine.extract import extract_attention, extract_or_load
from attnprog.engine.store import AttentionStore
from attnprog.layout import causal_offsets

TEXTS = [
    "Tom saw a cat. The cat saw Tom.",
    "Hi!",
    "Once upon a time, a little dog named Max found a red ball in the park.",
    "Lily said, \"I like cake.\" Then she ate the cake.",
    "Go.",
]


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(TEXTS)


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_batched_extraction_with_padding_equals_one_text_at_a_time(arch, corpus, request):
    model, tokenizer = request.getfixturevalue(arch)
    batched = extract_attention(model, tokenizer, corpus, batch_size=5, progress=False)
    single = extract_attention(model, tokenizer, corpus, batch_size=1, progress=False)
    assert (batched.attn_packed - single.attn_packed).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_every_stored_row_sums_to_one(arch, corpus, request):
    model, tokenizer = request.getfixturevalue(arch)
    store = extract_attention(model, tokenizer, corpus, batch_size=3, progress=False)
    for s in range(store.n_texts):
        dense = torch.stack([store.dense(h, s) for h in range(store.n_rows)])
        assert torch.allclose(dense.sum(-1), torch.ones(1), atol=1e-5)


def test_packed_offsets_and_lengths_agree_with_the_tokens(tiny_gpt2, corpus):
    model, tokenizer = tiny_gpt2
    store = extract_attention(model, tokenizer, corpus, progress=False)
    lengths = [len(tokenizer(t).input_ids) for t in store.texts]
    assert store.lengths.tolist() == lengths == [len(t) for t in store.tokens]
    assert store.offsets.tolist() == causal_offsets(lengths).tolist()
    assert store.n_cells == sum(n * (n + 1) // 2 for n in lengths)
    assert [store.token_ids(s) for s in range(store.n_texts)] == [
        tokenizer(t).input_ids for t in store.texts
    ]


def test_gqa_model_stores_every_query_head(tiny_llama, corpus):
    model, tokenizer = tiny_llama
    store = extract_attention(model, tokenizer, corpus, progress=False)
    assert store.n_rows == 2 * 4 and store.meta["n_kv_heads"] == 2


def test_store_round_trips_through_safetensors_bit_exactly(tiny_llama, corpus, tmp_path):
    model, tokenizer = tiny_llama
    store = extract_attention(model, tokenizer, corpus, progress=False)
    loaded = AttentionStore.load(store.save(tmp_path / "s.safetensors"))
    assert torch.equal(loaded.attn_packed, store.attn_packed)
    assert torch.equal(loaded.offsets, store.offsets)
    assert torch.equal(loaded.ids_packed, store.ids_packed)
    assert (loaded.texts, loaded.tokens, loaded.spans, loaded.splits, loaded.meta) == (
        store.texts, store.tokens, store.spans, store.splits, store.meta
    )


def test_rerun_with_same_model_and_corpus_reuses_the_saved_store(tiny_gpt2, corpus, tmp_path):
    model, tokenizer = tiny_gpt2
    out = tmp_path / "s.safetensors"
    _, reused_first = extract_or_load(model, tokenizer, corpus, out, progress=False)
    _, reused_second = extract_or_load(model, tokenizer, corpus, out, progress=False)
    assert (reused_first, reused_second) == (False, True)


def test_a_different_corpus_is_extracted_again(tiny_gpt2, corpus, tmp_path):
    model, tokenizer = tiny_gpt2
    out = tmp_path / "s.safetensors"
    extract_or_load(model, tokenizer, corpus, out, progress=False)
    with pytest.warns(UserWarning, match="another model or corpus"):
        store, reused = extract_or_load(model, tokenizer, corpus.take(2), out, progress=False)
    assert not reused and store.n_texts == 2


def test_text_longer_than_the_context_is_truncated_with_a_warning(tiny_gpt2):
    model, tokenizer = tiny_gpt2  # context of 512 positions, one token per byte
    with pytest.warns(UserWarning, match="truncated"):
        store = extract_attention(model, tokenizer, make_corpus(["word " * 200]), max_tokens=10_000,
                                  progress=False)
    assert store.lengths.tolist() == [512]


def test_split_indices_and_subset_keep_texts_and_cells_together(tiny_gpt2, corpus):
    model, tokenizer = tiny_gpt2
    store = extract_attention(model, tokenizer, corpus, progress=False)
    keep = [0, 2]
    sub = store.subset(keep)
    assert sub.texts == [store.texts[s] for s in keep]
    assert torch.equal(sub.dense(3, 1), store.dense(3, 2))


@pytest.mark.slow
def test_smollm2_store_on_20_builtin_texts_has_270_heads_and_the_expected_cells(smollm2, builtin_corpus):
    model, tokenizer = smollm2
    texts = builtin_corpus.take(20)
    store = extract_attention(model, tokenizer, texts, batch_size=10, progress=False)
    lengths = [len(tokenizer(t).input_ids) for t in texts.texts]
    assert store.n_rows == 270
    assert store.n_cells == sum(n * (n + 1) // 2 for n in lengths)
    assert torch.allclose(store.dense(0, 0).sum(-1), torch.ones(1), atol=1e-5)


def test_subsets_with_different_texts_get_different_corpus_hashes(tiny_gpt2, corpus):
    model, tokenizer = tiny_gpt2
    store = extract_attention(model, tokenizer, corpus, progress=False)
    first, second = store.subset([0, 1]), store.subset([0, 2])
    assert first.meta["corpus_hash"] != second.meta["corpus_hash"]
    assert store.subset([0, 1]).meta["corpus_hash"] == first.meta["corpus_hash"]


def test_the_store_keeps_the_input_embeddings_of_the_tokens_it_uses(tiny_llama, corpus, tmp_path):
    model, tokenizer = tiny_llama
    store = extract_attention(model, tokenizer, corpus, progress=False)
    assert store.embeddings.ids.tolist() == sorted(set(store.ids_packed.tolist()))
    loaded = AttentionStore.load(store.save(tmp_path / "store.safetensors"))
    assert (loaded.embeddings.rows == store.embeddings.rows).all()
    assert "get_input_embeddings" in loaded.embeddings.source


def test_embedding_similarity_is_the_cosine_of_the_models_input_embeddings(tiny_llama, corpus):
    model, tokenizer = tiny_llama
    store = extract_attention(model, tokenizer, corpus, progress=False)
    s = store.sentences([0])[0]
    weight = model.get_input_embeddings().weight.detach()[s.ids]  # [n, d]
    direct = torch.nn.functional.cosine_similarity(weight[:, None], weight[None, :], dim=-1)
    i, j = np.arange(s.n)[:, None], np.arange(s.n)[None, :]
    assert np.allclose(s.embedding_similarity(i, j), direct.numpy(), atol=1e-6)
    assert np.allclose(np.diag(s.embedding_similarity(i, j)), 1.0, atol=1e-6)


def test_a_reused_store_without_embeddings_gets_them(tiny_gpt2, corpus, tmp_path):
    model, tokenizer = tiny_gpt2
    path = tmp_path / "store.safetensors"
    old = extract_attention(model, tokenizer, corpus, progress=False)
    old.embeddings = None  # as stores were written before embeddings were kept
    old.save(path)
    store, reused = extract_or_load(model, tokenizer, corpus, path, progress=False)
    assert reused and store.embeddings is not None
    assert AttentionStore.load(path).embeddings is not None
