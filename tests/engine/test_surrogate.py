"""The surrogate: on any text, the sweep's replaced model; generation is its greedy argmax."""

import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

from attnprog import Surrogate
from attnprog.engine.batching import make_batch, pad_token_id
from attnprog.engine.nll import token_logprobs
from attnprog.engine.replace import OutputsRow, replace_heads
from attnprog.engine.run import rundir
from attnprog.engine.store import AttentionStore
from attnprog.errors import ModelError
from attnprog.synth.runtime.evaluate import evaluate_programs
from tests.engine.surrogate_run import PEEKS_AHEAD, PREVIOUS, make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt2):
    return make_run(tmp_path_factory.mktemp("surrogate") / "run", *tiny_gpt2)


@pytest.fixture(scope="module")
def surrogate(run_dir):
    return Surrogate.from_run(run_dir, fraction=0.75, order="cost")


@pytest.fixture(scope="module")
def heldout(run_dir):
    store = AttentionStore.load(run_dir / rundir.STORE)
    texts = store.split_indices("heldout")
    return store, texts


def sweep_path_sources(surrogate, store, texts):
    """The sweep's sources: every program evaluated on the store's texts (the sandbox path)."""
    programs = list({p.hash: p for p in surrogate.heads.values()}.values())
    outputs = evaluate_programs(programs, store.sentences(texts), progress=False)
    row = {p.hash: k for k, p in enumerate(programs)}
    return {key: OutputsRow(outputs, row[p.hash]) for key, p in surrogate.heads.items()}


def test_logits_on_heldout_texts_equal_the_sweeps_replaced_model(surrogate, heldout):
    store, texts = heldout
    sources = sweep_path_sources(surrogate, store, texts)
    ids = [store.token_ids(s) for s in texts]
    device = next(surrogate.model.parameters()).device  # from_run's "auto": the GPU when present
    batch = make_batch(ids, pad_id=pad_token_id(surrogate.tokenizer), indices=list(range(len(ids))),
                       device=device)
    with replace_heads(surrogate.model, sources) as replacement:
        expected = replacement.forward(batch).logits.float().cpu()  # logits() are on the CPU
    got = surrogate.logits(store.sentences(texts))
    assert {"fitted (torch)", "generator (in-process)", "golden (in-process)",
            "sandbox (output cache)"} <= set(surrogate.paths)  # every path is compared
    for b, s in enumerate(texts):
        torch.testing.assert_close(got[b], expected[b, : store.lengths[s]], atol=1e-5, rtol=0)


def test_token_logprobs_equal_the_sweeps_on_heldout_texts(surrogate, heldout):
    store, texts = heldout
    sources = sweep_path_sources(surrogate, store, texts)
    expected = token_logprobs(surrogate.model, [store.token_ids(s) for s in texts], sources,
                              pad_id=pad_token_id(surrogate.tokenizer))
    got = surrogate.token_logprobs(store.sentences(texts))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_replacing_heads_changes_the_logits(surrogate, heldout):
    store, texts = heldout
    plain = Surrogate(surrogate.model, surrogate.tokenizer, {})
    replaced, unmodified = surrogate.logits(store.sentences(texts[:1])), plain.logits(
        store.sentences(texts[:1]))
    assert not torch.allclose(replaced[0], unmodified[0], atol=1e-4)


def test_a_run_directory_copied_elsewhere_gives_the_same_logits(surrogate, run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "elsewhere" / "run")
    moved = Surrogate.from_run(copy, fraction=0.75, order="cost")
    texts = ["A sentence the run never saw.", "Another one, longer, with a comma."]
    for a, b in zip(moved.logits(texts), surrogate.logits(texts), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_generation_is_the_argmax_of_a_forward_over_the_generated_sequence(surrogate):
    generation = surrogate.generate("The cat sat", max_new_tokens=6, stop_at_eos=False)
    s = generation.sentence
    assert len(generation.new_ids) == 6 and s.ids[-6:] == generation.new_ids
    logits = surrogate.logits([s])[0]
    start = s.n - 6
    assert logits[start - 1 : s.n - 1].argmax(dim=-1).tolist() == generation.new_ids
    # each step's logits (KV cache, the new row only) equal the whole sequence's forward
    torch.testing.assert_close(generation.logits, logits[start - 1 : s.n - 1], atol=1e-5,
                               rtol=0)


def test_generation_with_the_kv_cache_equals_generation_rerunning_the_whole_sequence(surrogate):
    cached = surrogate.generate("When Mary and John", max_new_tokens=5, stop_at_eos=False)
    rerun = surrogate.generate("When Mary and John", max_new_tokens=5, stop_at_eos=False,
                               use_cache=False)
    assert cached.new_ids == rerun.new_ids and cached.continuation == rerun.continuation


def test_zero_new_tokens_is_the_prompt_alone_and_a_negative_count_is_refused(surrogate):
    generation = surrogate.generate("The cat sat", max_new_tokens=0, stop_at_eos=False)
    assert generation.new_ids == [] and generation.continuation == ""
    assert generation.sentence.text == "The cat sat"
    with pytest.raises(ModelError, match="max_new_tokens"):
        surrogate.generate("The cat sat", max_new_tokens=-1)


def test_raw_texts_and_batches_of_mixed_lengths_give_each_texts_own_logits(surrogate):
    texts = ["Short one.", "A much longer text, which pads the shorter one in its batch."]
    together = surrogate.logits(texts, batch_size=2)
    alone = [surrogate.logits([t])[0] for t in texts]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def previous_token(s):
    return np.eye(s.n, k=-1)


def test_a_plain_function_replaces_a_head_as_its_program_would(tiny_gpt2):
    text = ["The cat sat on the mat, and the dog slept by the door."]
    by_function = Surrogate(*tiny_gpt2, {(1, 1): previous_token}).logits(text)[0]
    by_program = Surrogate(*tiny_gpt2, {(1, 1): PREVIOUS}).logits(text)[0]
    torch.testing.assert_close(by_function, by_program, atol=1e-6, rtol=0)


def test_a_text_longer_than_the_models_positions_is_refused_with_the_limit(tiny_gpt2):
    surrogate = Surrogate(*tiny_gpt2, {(1, 1): PREVIOUS})  # tiny-gpt2 takes 512 positions
    long = " ".join(["The cat sat on the mat."] * 200)
    with pytest.raises(ModelError, match="text 2 has .* tokens, more than the 512 positions"):
        surrogate.perplexity(["The cat sat.", long])
    prompt = " ".join(["The cat sat on the mat."] * 15)  # fits, but not with 200 more tokens
    with pytest.raises(ModelError, match="and 200 new tokens, more than the 512 positions"):
        surrogate.generate(prompt, 200)


def test_a_head_the_model_lacks_is_refused(tiny_gpt2):
    with pytest.raises(ModelError, match="L7.H0"):
        Surrogate(*tiny_gpt2, {(7, 0): PREVIOUS})


def test_a_head_label_keys_a_program_as_its_layer_and_head_do(tiny_gpt2):
    assert set(Surrogate(*tiny_gpt2, {"L1.H2": PREVIOUS, "0.3": PREVIOUS}).heads) == {(1, 2), (0, 3)}


@pytest.mark.parametrize("key", ["1.*", 5, (1, 2, 3)])
def test_a_key_that_is_not_one_head_is_refused_with_how_to_key_it(tiny_gpt2, key):
    with pytest.raises(ModelError, match=r"\(18, 3\)"):
        Surrogate(*tiny_gpt2, {key: PREVIOUS})


def test_a_program_reading_token_meaning_gets_the_models_own_embeddings(tiny_gpt2):
    from attnprog.synth.embeddings import TokenEmbeddings, attach_similarity
    from attnprog.synth.fitted import program_from_fit

    model, tokenizer = tiny_gpt2
    meaning = program_from_fit({"share": 0.1, "weights": {"similar": 3.0, "previous_1": 1.0}})
    surrogate = Surrogate(model, tokenizer, {(0, 0): meaning})
    text = "The cat saw the other cat and the dog."
    [s] = surrogate.sentences([text])
    weight = model.get_input_embeddings().weight.detach().float().numpy()
    attach_similarity([s], TokenEmbeddings(np.arange(len(weight)), weight))  # by hand
    torch.testing.assert_close(surrogate.logits([text])[0], surrogate.logits([s])[0],
                               atol=1e-5, rtol=0)


def test_a_program_reading_later_tokens_is_computed_row_by_row_so_logits_stay_causal(tiny_gpt2):
    from attnprog.engine.program_rows import ROW_BY_ROW

    surrogate = Surrogate(*tiny_gpt2, {(0, 0): PEEKS_AHEAD, (1, 1): PREVIOUS})
    assert sorted(surrogate.paths) == sorted([ROW_BY_ROW, "sandbox (output cache)"])
    [s] = surrogate.sentences(["The cat sat on the mat, and the dog slept by the door."])
    short = surrogate.sentences([s.text[: s.offsets[6][1]]])[0]
    assert short.ids == s.ids[:7]
    # a token's logits do not depend on the text after it
    torch.testing.assert_close(surrogate.logits([short])[0], surrogate.logits([s])[0][:7],
                               atol=1e-5, rtol=0)


def test_a_run_that_cannot_give_the_heads_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import attnprog.engine.models
    from attnprog.engine.run.config import RunConfig
    from attnprog.errors import StoreError

    (tmp_path / rundir.CONFIG).write_text(json.dumps(asdict(RunConfig())))  # no IoU table yet
    monkeypatch.setattr(attnprog.engine.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(StoreError, match="has no iou_table.safetensors: finish the run first"):
        Surrogate.from_run(tmp_path, 0.25, "iou")


def similar_tokens(s):
    index = np.arange(s.n)
    return np.clip(s.embedding_similarity(index[:, None], index[None, :]), 0, None)


def test_head_sources_on_new_sentences_give_a_meaning_programs_own_matrix(tiny_gpt2):
    surrogate = Surrogate(*tiny_gpt2, {(0, 0): similar_tokens})
    [s] = surrogate.sentences(["The cat saw the other cat."])
    matrix = surrogate.head_sources([s], s.n)[(0, 0)][0].cpu().numpy()
    expected = np.tril(np.clip(s.token_similarity, 0, None))
    np.testing.assert_allclose(matrix, expected / expected.sum(1, keepdims=True), atol=1e-6)
