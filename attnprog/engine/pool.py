"""The program pool: built (golden library + generator), evaluated on a store's texts and
ranked against its heads, on this machine or on a Ray cluster."""

from __future__ import annotations

import torch

from attnprog.engine.store import AttentionStore
from attnprog.synth.program import Program


def build_pool(n_candidates: int, golden: bool = True) -> list[Program]:
    """The golden library (when asked) plus ``n_candidates`` distinct generator programs."""
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.generator.specs import generate

    library = golden_programs() if golden else []
    generated = generate(n_min=n_candidates) if n_candidates > 0 else []
    seen = {p.hash for p in library}
    return library + [p for p in generated if p.hash not in seen]


def ranking_subset(store: AttentionStore, split: str, heldout: str | None) -> AttentionStore:
    """The store restricted to the texts ranking reads: ``split`` and ``heldout`` when present."""
    splits = [split] + ([heldout] if heldout and heldout in store.splits else [])
    texts = sorted({s for name in splits for s in store.split_indices(name)})
    return store.subset(texts) if len(texts) < store.n_texts else store


def store_tokenizer(store: AttentionStore, programs: list[Program]):
    """The tokenizer of the model that made ``store``, when some program has the paper's form
    (``run`` and the surrogate hand those the model's own); None when none has it. A model
    that cannot be loaded here leaves them the stand-in, with a warning that says so."""
    import warnings

    from attnprog.engine.models import load_model, spec_of_id
    from attnprog.errors import AttnProgError
    from attnprog.synth.runtime.sandbox import is_paper_program

    if not any(map(is_paper_program, programs)):
        return None
    spec = spec_of_id(str(store.meta.get("model_id", "")))
    try:
        if not spec:
            raise AttnProgError("the store does not say which model made it")
        return load_model(spec, device="cpu")[1]
    except (AttnProgError, OSError, ValueError) as err:
        warnings.warn(f"paper-form programs get a stand-in tokenizer, not the model's ({err}): "
                      "their results may differ from a run's", stacklevel=2)
        return None


def evaluate_pool(store: AttentionStore, programs: list[Program], progress: bool = True,
                  ray: str = "", tokenizer=None):
    """Outputs of ``programs`` on the store's texts, streamed: sandboxed programs run now (and
    are cached by corpus and tokenizer), generator programs when ranking reads their rows.
    ``ray``: a cluster address (or "auto") to run the sandboxed programs as Ray tasks;
    ``tokenizer``: the model's, handed to paper-form programs."""
    from attnprog.synth.runtime.evaluate import evaluate_programs

    evaluate = evaluate_programs
    if ray:
        from functools import partial

        from attnprog.engine.distributed.evaluate import evaluate_on_ray

        evaluate = partial(evaluate_on_ray, address=ray)
    return evaluate(
        programs, store.sentences(), corpus_hash=store.meta.get("corpus_hash"),
        tokenizer_id=store.meta.get("tokenizer_id", ""), progress=progress, stream=True,
        tokenizer=tokenizer,
    )


def rank_table(store: AttentionStore, outputs, split: str = "selection",
               heldout: str | None = "heldout", ray: str = "", **rank_kwargs):
    """Rank on ``split``; measure each best fit on ``heldout`` when the store has that split.
    ``ray``: a cluster address (or "auto") to shard the heads over Ray actors."""
    from attnprog.engine.rank import rank, rank_with_heldout

    if ray:
        from attnprog.engine.distributed.rank import rank_on_ray

        held = heldout if heldout and heldout in store.splits else None
        return rank_on_ray(store, outputs, split=split, heldout_split=held, address=ray,
                           **rank_kwargs)
    if heldout and heldout in store.splits:
        return rank_with_heldout(store, outputs, split=split, heldout_split=heldout, **rank_kwargs)
    return rank(store, outputs, split=split, **rank_kwargs)


def rank_heads(store: AttentionStore, outputs, heads: list[int], **rank_kwargs):
    """``rank_table`` for the heads in ``heads`` only (head indices); the table keeps every
    column, with IoU 0 for heads not ranked, and names the ranked ones in ``meta["heads"]``."""
    from attnprog.engine.rank import IoUTable

    if len(heads) == store.n_rows:
        return rank_table(store, outputs, **rank_kwargs)
    head_indices = torch.as_tensor(heads, dtype=torch.long)
    narrow = AttentionStore(
        attn_packed=store.attn_packed[head_indices.to(store.device)], offsets=store.offsets,
        lengths=store.lengths, ids_packed=store.ids_packed, texts=store.texts, tokens=store.tokens,
        spans=store.spans, splits=store.splits, meta=dict(store.meta, n_layers=1, n_heads=len(heads)),
        embeddings=store.embeddings,
    )
    part = rank_table(narrow, outputs, **rank_kwargs)
    iou = torch.zeros(part.n_programs, store.n_rows)
    iou[:, head_indices] = part.iou
    heldout = None
    if part.heldout_iou is not None:
        heldout = torch.zeros(store.n_rows)
        heldout[head_indices] = part.heldout_iou
    return IoUTable(iou=iou, programs=part.programs, split=part.split, n_layers=store.n_layers,
                    n_heads=store.n_heads, text_indices=part.text_indices,
                    heldout_split=part.heldout_split, heldout_iou=heldout,
                    meta=dict(part.meta, heads=list(heads)))
