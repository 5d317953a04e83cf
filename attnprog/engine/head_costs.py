"""What replacing one head costs: the rise in NLL with only that head swapped for its best fit.

The cost of head h is ΔNLL_h = mean NLL(h replaced by its best-fit program) − mean NLL(model),
in nats per predicted token, on one split of the store: the *selection* split, so the texts
the perplexity sweep reports on (held-out) never choose which heads are replaced. Ways to get it:

- ``exact``: one forward pass over the texts per head, that head replaced through
  ``replace_heads``. L·H passes: seconds on a GPU; on a 2-core CPU about half an hour for
  SmolLM2-135M's 270 heads on 42 texts, far past the demo's budget.
- estimates from one forward pass per batch, for every head at once. Head h's output before
  the output projection changes by Δz = (Π_h − A_h)·V when it uses its program matrix Π_h
  instead of its attention A_h, so ΔNLL_h ≈ g·Δz + ½ Δzᵀ F Δz, with g the gradient of the NLL
  with respect to z_h and F the Fisher of the model's predictions:
  ``linear`` is the first term alone (attribution patching), ``fisher`` the second alone (the
  second-order KL between the model's predictions before and after), ``taylor`` both.

``auto`` is exact on CUDA and fisher elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attnprog.engine.batching import batches_by_length, make_batch, pad_token_id
from attnprog.engine.nll import token_logprobs
from attnprog.engine.replace import (
    _STATE_ATTR,
    OutputsRow,
    best_fit,
    n_texts_of,
    outputs_for,
    replace_heads,
)
from attnprog.errors import AttnProgError, StoreError

METHODS = ("exact", "linear", "fisher", "taylor")


@dataclass
class HeadCosts:
    """Per-head replacement cost [L*H] (ΔNLL, nats per token) and how it was measured.

    ``costs`` is indexed like the store's rows (layer * n_heads + head); ``texts`` are the
    store indices of the texts it was measured on.
    """

    costs: np.ndarray
    method: str
    split: str
    texts: list[int]
    n_tokens: int
    base_nll: float
    terms: dict = field(default_factory=dict)  # the estimate's parts: "linear", "fisher" [L*H]

    def order(self) -> np.ndarray:
        """Head rows, cheapest first (ties keep row order)."""
        return np.argsort(self.costs, kind="stable")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["costs"] = [float(c) for c in self.costs]
        data["terms"] = {k: [float(c) for c in v] for k, v in self.terms.items()}
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadCosts:
        data = json.loads(Path(path).read_text())
        data["costs"] = np.asarray(data["costs"], dtype=np.float64)
        data["terms"] = {k: np.asarray(v) for k, v in data.get("terms", {}).items()}
        return cls(**data)


def check_method(method: str) -> str:
    """``method`` when it is ``auto`` or one of METHODS (checked before a model loads)."""
    if method != "auto" and method not in METHODS:
        raise AttnProgError(f"unknown cost method {method!r}: use auto, "
                            + ", ".join(METHODS))
    return method


def resolve_method(method: str, model) -> str:
    """``auto`` -> exact on CUDA, fisher elsewhere; other names are checked."""
    if check_method(method) == "auto":
        return "exact" if next(model.parameters()).device.type == "cuda" else "fisher"
    return method


def head_costs(
    model,
    store,
    table,
    *,
    split: str = "selection",
    outputs=None,
    method: str = "auto",
    tokenizer=None,
    batch_size: int = 8,
    impl: str = "auto",
    resume: str | Path | None = None,
    samples: int = 2,
    progress: bool = True,
    heads=None,
) -> HeadCosts:
    """Each head's ΔNLL on ``split`` with only that head replaced by its best-fit program.

    ``outputs``: ProgramOutputs of ``table.programs`` on all of the store's texts, or on the
    split's texts, or None (the best fits run here). ``resume``: a file where the exact
    method keeps finished heads, so an interrupted measurement continues. ``heads`` (head
    indices) measures only those, as the table ranks only some (``run --heads``); the others
    cost 0, as the table gives unranked heads IoU 0.
    """
    method = resolve_method(method, model)
    texts = store.split_indices(split) if split in store.splits else []
    if not texts:
        raise StoreError(f"the store has no {split!r} texts to measure head costs on: "
                         "use more texts, or replace heads in IoU order (--order iou)")
    sources, corpus_indices = _best_fit_sources(store, table, texts, outputs, progress, heads)
    token_ids = [store.token_ids(s) for s in texts]
    pad_id = pad_token_id(tokenizer)
    n_tokens = sum(len(ids) - 1 for ids in token_ids)
    if n_tokens == 0:
        raise StoreError(f"the {split!r} texts have no tokens to predict")

    def nll_sum(heads: dict) -> float:
        logprobs = token_logprobs(model, token_ids, heads, batch_size=batch_size, impl=impl,
                                  pad_id=pad_id, corpus_indices=corpus_indices)
        return -sum(float(lp.sum()) for lp in logprobs)

    if method == "exact":
        base = nll_sum({})
        # what the finished heads were measured with: the same texts give the same base and
        # tokens whatever the programs, so the resume file also names each head's best fit
        fits = [table.programs[int(p)].hash for p in best_fit(table)[1]]
        costs = _exact_costs(sources, nll_sum, base, n_tokens, store.n_heads, store.n_rows,
                             resume, progress, fits)
        return HeadCosts(costs, method, split, list(texts), n_tokens, base / n_tokens, {})
    first, second, base = _gradient_costs(
        model, token_ids, sources, corpus_indices, store.n_heads, store.n_rows, batch_size, pad_id,
        samples=0 if method == "linear" else samples, first_order=method != "fisher",
        progress=progress,
    )
    terms = {} if method == "fisher" else {"linear": first / n_tokens}
    if method != "linear":
        terms["fisher"] = second / n_tokens
    costs = terms["linear"] + terms["fisher"] if method == "taylor" else terms[method]
    return HeadCosts(costs, method, split, list(texts), n_tokens, base / n_tokens, terms)


def _best_fit_sources(store, table, texts, outputs, progress,
                      heads=None) -> tuple[dict, list[int]]:
    """({(layer, head): its best fit's OutputsRow} for ``heads`` (default: all), the texts'
    indices into those outputs)."""
    _, best_index = best_fit(table)
    if len(best_index) != store.n_layers * store.n_heads:
        raise StoreError(f"the IoU table has {len(best_index)} heads, the store "
                         f"{store.n_layers} x {store.n_heads}: rank programs against this store")
    chosen = range(len(best_index)) if heads is None else sorted({int(h) for h in heads})
    needed = sorted({int(best_index[h]) for h in chosen})
    whole_store = outputs is not None and n_texts_of(outputs) == store.n_texts
    outputs, row_of = outputs_for(
        table, needed, outputs, lambda: store.sentences(texts),
        store.n_texts if whole_store else len(texts), progress,
    )
    corpus_indices = texts if whole_store else list(range(len(texts)))
    sources = {divmod(h, store.n_heads): OutputsRow(outputs, row_of[int(best_index[h])])
               for h in chosen}
    return sources, corpus_indices


def _exact_costs(sources, nll_sum, base, n_tokens, n_heads, n_rows, resume, progress,
                 fits=None) -> np.ndarray:
    """One pass per head; finished heads are kept in ``resume`` (JSON) as they complete, and
    read back only for the same base NLL, tokens and best fits (``fits``: a hash per head)."""
    done: dict[str, float] = {}
    resume = Path(resume) if resume else None
    if resume is not None and resume.is_file():
        saved = json.loads(resume.read_text())
        if (saved.get("base") == base and saved.get("n_tokens") == n_tokens
                and saved.get("fits") == fits):
            done = saved["costs"]
    costs = np.zeros(n_rows)  # heads not in ``sources`` (not explained) cost 0
    for key in tqdm(sorted(sources), desc="head costs (exact)", unit="head",
                    disable=None if progress else True):
        row = key[0] * n_heads + key[1]
        if str(row) not in done:
            done[str(row)] = (nll_sum({key: sources[key]}) - base) / n_tokens
            if resume is not None:
                resume.write_text(json.dumps({"base": base, "n_tokens": n_tokens, "fits": fits,
                                              "costs": done}))
        costs[row] = done[str(row)]
    return costs


def _gradient_costs(model, token_ids, sources, corpus_indices, n_heads, n_rows, batch_size,
                    pad_id, samples, first_order, progress) -> tuple[np.ndarray, np.ndarray, float]:
    """Both Taylor terms of every head's summed ΔNLL, in nats, from one forward pass per batch:
    (first order g·Δz [L*H], second order ½ Δzᵀ F Δz [L*H], the model's summed NLL).

    F, the Fisher of the model's predictions, is estimated with labels sampled from the model
    (``samples`` backward passes): E[(g_sampled·Δz)²] = Δzᵀ F Δz per text, since sampled
    labels' gradients have mean zero and are independent across texts.
    """
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in token_ids]
    first = torch.zeros(n_rows, dtype=torch.float64)
    second = torch.zeros(n_rows, dtype=torch.float64)
    total_nll = 0.0
    generator = torch.Generator(device=device).manual_seed(0)  # the same estimate every run
    embeddings = model.get_input_embeddings()
    # the graph must reach back to the embeddings, so gradients flow through every layer
    hook = embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    try:
        with replace_heads(model, sources, impl="torch") as replacement:
            for texts in tqdm(batches_by_length(lengths, batch_size), desc="head costs",
                              unit="batch", disable=None if progress else True):
                batch = make_batch([token_ids[s] for s in texts], pad_id=pad_id,
                                   indices=[corpus_indices[s] for s in texts], device=device)
                total_nll += _add_batch_terms(model, replacement, batch, n_heads, samples,
                                              first_order, generator, first, second)
    finally:
        hook.remove()
    return first.numpy(), second.numpy() / max(samples, 1), total_nll


def _add_batch_terms(model, replacement, batch, n_heads, samples, first_order, generator,
                     first, second) -> float:
    """Add one batch's Taylor terms into ``first`` and ``second`` [L*H]; return its summed NLL."""
    replacement.prepare(batch)
    records = {}  # layer -> [(output, replaced heads, Δz)], filled during the forward pass
    for layer, module in replacement.modules.items():
        getattr(module, _STATE_ATTR).probe = records.setdefault(layer, [])
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids,
                           attention_mask=batch.attention_mask, use_cache=False).logits
            logits = logits[:, :-1].flatten(0, 1).float()
            real = batch.attention_mask[:, 1:].flatten().to(logits.dtype)
            layers = sorted(records)
            outs = [records[layer][0][0] for layer in layers]
            loss = (F.cross_entropy(logits, batch.input_ids[:, 1:].flatten(),
                                    reduction="none") * real).sum()
            nll = float(loss.detach())
            if first_order:
                grads = torch.autograd.grad(loss, outs, retain_graph=samples > 0)
                first += _head_change(grads, records, layers, n_heads, len(first)).sum(0)
            for k in range(samples):
                sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1,
                                            generator=generator)[:, 0]
                loss = (F.cross_entropy(logits, sampled, reduction="none") * real).sum()
                grads = torch.autograd.grad(loss, outs, retain_graph=k < samples - 1)
                change = _head_change(grads, records, layers, n_heads, len(second))
                second += 0.5 * change.pow(2).sum(0)
            return nll
    finally:
        replacement.clear()


def _head_change(grads, records, layers, n_heads, n_rows) -> torch.Tensor:
    """[B, L*H] per-text g·Δz of every replaced head."""
    per_text = torch.zeros(len(grads[0]), n_rows, dtype=torch.float64)
    for layer, grad in zip(layers, grads, strict=True):
        _, heads, delta = records[layer][0]
        change = (grad[:, heads].float() * delta).sum(dim=(2, 3))  # [B, F]
        per_text[:, layer * n_heads + heads.cpu()] = change.double().cpu()
    return per_text
