"""Extraction: every head's attention probabilities on a corpus, packed into an AttentionStore."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attnprog.engine.batching import batches_by_length
from attnprog.engine.corpus import Corpus, TokenizedCorpus, tokenize_corpus
from attnprog.engine.models import attention_shape, context_size, model_id
from attnprog.engine.store import AttentionStore, packed_offsets_tensor
from attnprog.errors import ModelError, StoreError
from attnprog.synth.embeddings import TokenEmbeddings


def default_max_tokens(model, cap: int = 256) -> int:
    """Truncation length: the model's context, capped (attention storage grows with n^2)."""
    return min(context_size(model), cap)


@torch.no_grad()
def extract_attention(
    model,
    tokenizer,
    corpus: Corpus | TokenizedCorpus,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    store_device: str | torch.device = "cpu",
    max_tokens: int | None = None,
    progress: bool = True,
) -> AttentionStore:
    """Attention of every layer and head on every text, packed in the causal layout.

    Texts are batched by length with right padding and an attention mask; the model runs with
    eager attention in ``dtype`` on ``device``; the packed fp32 result lives on ``store_device``.
    """
    device = _place_model(model, device, dtype)
    corpus = _tokenised(corpus, tokenizer, model, max_tokens)
    n_layers, n_heads, n_kv_heads = attention_shape(model)
    lengths = corpus.lengths
    offsets = packed_offsets_tensor(lengths)
    attn_packed = torch.empty(n_layers * n_heads, int(offsets[-1]), dtype=torch.float32,
                              device=store_device)
    tril = {}  # n -> (rows, cols) of the causal cells, on the model's device

    batches = batches_by_length(lengths, batch_size)
    for batch in tqdm(batches, desc="extract", unit="batch", disable=None if progress else True):
        attn = _batch_attention(model, corpus, batch, device)  # [B, L, H, width, width]
        for b, s in enumerate(batch):
            n = lengths[s]
            if n not in tril:
                tril[n] = torch.tril_indices(n, n, device=attn.device)
            rows, cols = tril[n]
            cells = attn[b, :, :, rows, cols].reshape(n_layers * n_heads, -1)  # [L*H, n(n+1)/2]
            attn_packed[:, int(offsets[s]) : int(offsets[s + 1])] = cells.float().to(store_device)

    ids_packed = torch.tensor([i for ids in corpus.ids for i in ids], dtype=torch.int64)
    return AttentionStore(
        attn_packed=attn_packed,
        offsets=offsets,
        lengths=torch.tensor(lengths, dtype=torch.int64),
        ids_packed=ids_packed,
        texts=list(corpus.texts),
        tokens=[list(t) for t in corpus.tokens],
        spans=[list(s) for s in corpus.spans],
        splits=list(corpus.splits),
        meta=_store_meta(model, tokenizer, corpus),
        embeddings=input_embeddings(model, ids_packed.tolist()),
    )


@torch.no_grad()
def input_embeddings(model, ids) -> TokenEmbeddings:
    """The model's input-embedding rows (``get_input_embeddings()``) of the distinct ``ids``,
    in float32, with where they came from."""
    distinct = sorted({int(i) for i in ids})
    weight = model.get_input_embeddings().weight
    rows = weight[torch.tensor(distinct, dtype=torch.long, device=weight.device)]
    source = (f"{model_id(model)}: get_input_embeddings() rows of the {len(distinct)} token ids "
              f"the corpus uses ({str(weight.dtype).removeprefix('torch.')}, kept as float32)")
    return TokenEmbeddings(np.asarray(distinct, dtype=np.int64),
                           rows.detach().float().cpu().numpy(), source)


def model_probes(model, tokenizer) -> list:
    """The probe texts ``attnprog check`` runs programs on, tokenised as ``model`` sees them
    and carrying its input embeddings (for ``embedding_similarity``)."""
    from attnprog.synth.embeddings import attach_similarity
    from attnprog.synth.features import probe_sentences, sentences_from_texts

    probes = sentences_from_texts([p.text for p in probe_sentences()], tokenizer)
    attach_similarity(probes, input_embeddings(model, [i for s in probes for i in s.ids]))
    return probes


def _place_model(model, device, dtype) -> torch.device:
    """Check the model runs eager attention, move it to ``device`` and ``dtype``; its device."""
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise ModelError("extraction needs eager attention: load the model with "
                         "attn_implementation='eager' (load_model does by default)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device)
    return device


def _tokenised(corpus: Corpus | TokenizedCorpus, tokenizer, model, max_tokens) -> TokenizedCorpus:
    """The corpus tokenised to fit the model's context (a tokenised one is only checked)."""
    if isinstance(corpus, Corpus):
        limit = min(max_tokens or default_max_tokens(model), context_size(model))
        return tokenize_corpus(corpus, tokenizer, max_tokens=limit)
    if max(corpus.lengths) > context_size(model):
        raise ModelError(f"a text has {max(corpus.lengths)} tokens, more than the model's "
                         f"context of {context_size(model)}: tokenise with a smaller max_tokens")
    return corpus


def _batch_attention(model, corpus: TokenizedCorpus, batch: list[int], device) -> torch.Tensor:
    """[B, L, H, width, width] attention on one batch of texts, right-padded to the longest."""
    lengths = corpus.lengths
    width = max(lengths[s] for s in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
    for b, s in enumerate(batch):
        input_ids[b, : lengths[s]] = torch.tensor(corpus.ids[s])
        attention_mask[b, : lengths[s]] = 1
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                output_attentions=True, use_cache=False)
    if out.attentions is None or any(a is None for a in out.attentions):
        raise ModelError("the model returned no attention probabilities; it needs eager attention")
    return torch.stack(out.attentions, dim=1)


def _store_meta(model, tokenizer, corpus: TokenizedCorpus) -> dict:
    n_layers, n_heads, n_kv_heads = attention_shape(model)
    return {
        "model_id": model_id(model),
        "model_type": model.config.model_type,
        "tokenizer_id": corpus.tokenizer_id,
        "corpus_hash": corpus.corpus_hash,
        "max_tokens": corpus.max_tokens,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "truncated_texts": len(corpus.truncated),
    }


def store_matches(store_path: Path, model, corpus: Corpus, max_tokens: int, dtype: str) -> bool:
    """True when a saved store was made from this model, corpus, truncation and dtype."""
    try:
        meta = AttentionStore.read_meta(store_path)
    except StoreError:
        return False
    return (meta.get("model_id") == model_id(model) and meta.get("corpus_hash") == corpus.hash
            and meta.get("max_tokens") == max_tokens and meta.get("dtype") == dtype)


def extract_or_load(
    model, tokenizer, corpus: Corpus, out: str | Path, *, reuse: bool = True, **kwargs
) -> tuple[AttentionStore, bool]:
    """Load ``out`` when it was made from the same model and corpus, else extract and save it.

    Returns (store, reused).
    """
    out = Path(out)
    limit = min(kwargs.get("max_tokens") or default_max_tokens(model), context_size(model))
    dtype = kwargs.get("dtype") or next(model.parameters()).dtype
    dtype_name = str(dtype).removeprefix("torch.")
    if reuse and out.is_file() and store_matches(out, model, corpus, limit, dtype_name):
        store = AttentionStore.load(out, device=kwargs.get("store_device", "cpu"))
        if store.embeddings is None:  # a store written before token embeddings were kept
            store.embeddings = input_embeddings(model, store.ids_packed.tolist())
            store.save(out)
        return store, True
    if out.is_file():
        warnings.warn(f"{out} was made from another model or corpus: extracting again", stacklevel=2)
    store = extract_attention(model, tokenizer, corpus, **dict(kwargs, max_tokens=limit))
    store.save(out)
    return store, False
