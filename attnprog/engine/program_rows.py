"""Program matrices on new texts, each program by the path its origin allows.

attnprog's own programs run in this process, without the sandbox: fitted programs and
generator programs are computed from the data their source is regenerated from (never by
running the source), and the golden library's native programs run as the trusted code they
are. Everything else (LLM programs, paper-form programs, edited ones) goes through the
sandbox and its output cache (``synth.runtime.evaluate``).

``program_matrices`` gives a batch's matrices as a tensor on the model's device; fitted
programs are computed there in torch (features once per text, every fit's scores in one
matmul, the masked softmax on the device), and ``newest_rows`` gives only the last token's
row, for generation with a KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from attnprog.layout import causal_offsets

FITTED, GENERATOR, GOLDEN, SANDBOX = "fitted (torch)", "generator (in-process)", \
    "golden (in-process)", "sandbox (output cache)"
# a program that reads later tokens: row i computed on the text up to token i, one run per row
ROW_BY_ROW = "sandbox, row by row (leaks)"


@lru_cache(maxsize=1)
def _golden_native() -> frozenset[str]:
    """Hashes of the golden library's native programs (our code, trusted as written)."""
    from attnprog.synth.generator.golden import golden_programs

    return frozenset(p.hash for p in golden_programs() if p.provenance.get("form") == "native")


def program_path(program) -> str:
    """How ``program``'s rows are computed: FITTED, GENERATOR, GOLDEN or SANDBOX."""
    from attnprog.synth.fitted import is_fitted
    from attnprog.synth.generator.specs import is_generated

    if is_fitted(program):
        return FITTED
    if is_generated(program):
        return GENERATOR
    if program.hash in _golden_native():
        return GOLDEN
    return SANDBOX


def program_rows(programs: Sequence, sentences: Sequence, tokenizer=None,
                 paths: Sequence[str] | None = None) -> np.ndarray:
    """Normalised outputs of ``programs`` on ``sentences``, packed: [programs, cells] float32.

    Each program takes its ``program_path``; a program that fails on a text gives zeros there
    (the replacement turns such rows one-hot on position 0, as the sweep does).
    """
    from attnprog.synth.features import attach_syntax
    from attnprog.synth.runtime.evaluate import _reads_syntax

    programs, sentences = list(programs), list(sentences)
    paths = [program_path(p) for p in programs] if paths is None else list(paths)
    if any(not s.has_syntax for s in sentences) and any(map(_reads_syntax, programs)):
        attach_syntax(sentences)  # causal tags, as evaluate_programs gives them
    offsets = causal_offsets([s.n for s in sentences])
    values = np.zeros((len(programs), int(offsets[-1])), dtype=np.float32)
    for path, run in ((FITTED, _fitted), (GENERATOR, _generated), (GOLDEN, _golden),
                      (SANDBOX, _sandboxed), (ROW_BY_ROW, _row_by_row)):
        rows = [k for k, p in enumerate(paths) if p == path]
        if rows:
            values[rows] = run([programs[k] for k in rows], sentences, tokenizer)
    return values


def outputs_by_path(programs: Sequence, sentences: Sequence):
    """``program_rows`` as the leak check's evaluator wants it: ``.values`` [P, cells] and
    ``.failed`` [P, texts] (all False: a failed row is zeros, which the check compares)."""
    from types import SimpleNamespace

    values = program_rows(programs, sentences)
    return SimpleNamespace(values=values, failed=np.zeros((len(programs), len(sentences)), bool))


def _fitted(programs, sentences, tokenizer) -> np.ndarray:
    from attnprog.synth.fitted import evaluate_fitted

    return evaluate_fitted(programs, sentences)


def _generated(programs, sentences, tokenizer) -> np.ndarray:
    from attnprog.synth.generator.specs import evaluate_generated

    return evaluate_generated(programs, sentences)


def _golden(programs, sentences, tokenizer) -> np.ndarray:
    from attnprog.synth.runtime.execute import run_trusted

    return np.stack([r.values for r in run_trusted(programs, sentences, tokenizer)])


def _sandboxed(programs, sentences, tokenizer) -> np.ndarray:
    from attnprog.synth.runtime.evaluate import evaluate_programs

    return evaluate_programs(programs, sentences, tokenizer=tokenizer, progress=False).values


def _row_by_row(programs, sentences, tokenizer) -> np.ndarray:
    """Row i of each text from the program run on the text as it stood at token i: a leaky
    program made causal, at the price of one evaluation per token."""
    from attnprog.synth.runtime.leak import prefix_sentence

    prefixes = [prefix_sentence(s, i) for s in sentences for i in range(s.n)]
    if not prefixes:
        return np.zeros((len(programs), 0), dtype=np.float32)
    values = _sandboxed(programs, prefixes, tokenizer)  # [P, cells of every prefix]
    ends = causal_offsets([p.n for p in prefixes])[1:]
    # a prefix's last row is its last n cells; in order they pack the whole text's rows
    return np.concatenate([values[:, end - p.n : end] for end, p in zip(ends, prefixes,
                                                                         strict=True)], axis=1)

# --- on the model's device -------------------------------------------------------------------


def fitted_torch(fits: Sequence[dict], s, device, queries: Sequence[int] | None = None
                 ) -> torch.Tensor:
    """Fitted programs' rows on one text: float32 [programs, query_pos, key_pos] on ``device``.

    The features are computed once for all fits, every fit's scores come from one float64
    matmul and the causal softmax (float32) runs on the device; equal to ``evaluate_fits``
    to 1e-6.
    ``queries``: only those rows (all when None). Fits must be checked (``check_fit``).
    """
    from attnprog.synth.fitted import feature_dense, features_used

    used = features_used(fits, [s])
    column = {name: k for k, name in enumerate(used)}
    weights = torch.zeros(len(fits), len(used), dtype=torch.float64)
    for p, fit in enumerate(fits):
        for name, w in fit["weights"].items():
            weights[p, column[name]] = w
    features = torch.from_numpy(feature_dense(s, used, queries)).to(device)  # [F, r, n] float64
    n_rows, n = features.shape[1:]
    score = (weights.to(device) @ features.reshape(len(used), -1)).reshape(len(fits), n_rows, n)
    rows = torch.arange(n, device=device) if queries is None else torch.as_tensor(
        list(queries), device=device)
    later = torch.arange(n, device=device)[None, :] > rows[:, None]  # [r, n] keys after the query
    score.masked_fill_(later, float("-inf"))
    # scores in float64 (a weighted sum of up to 12 terms), the softmax of their differences
    # from the row's largest in float32: the outputs are float32 anyway
    attention = (score - score.amax(dim=-1, keepdim=True)).float().exp_()
    attention /= attention.sum(dim=-1, keepdim=True)
    share = torch.tensor([f["share"] for f in fits], dtype=torch.float32, device=device)
    attention *= (1.0 - share)[:, None, None]
    attention[..., 0] += share[:, None]
    return attention


_CHECKED: dict[str, dict] = {}  # program hash -> its checked fit (generation asks every token)


def _fits_of(programs: Sequence, sentences: Sequence) -> list[dict]:
    from attnprog.synth.fitted import check_fit, features_used

    for p in programs:
        if p.hash not in _CHECKED:
            _CHECKED[p.hash] = check_fit(p.provenance["fit"])
    fits = [_CHECKED[p.hash] for p in programs]
    features_used(fits, sentences)  # attaches syntax once, for every text, when a fit reads it
    return fits


def program_matrices(programs: Sequence, sentences: Sequence, width: int, device,
                     tokenizer=None, paths: Sequence[str] | None = None) -> torch.Tensor:
    """Normalised matrices of ``programs`` on a batch: float32 [programs, batch, query_pos,
    key_pos] on ``device``, texts right-padded to ``width``.

    Fitted programs are computed on the device (``fitted_torch``); the others as
    ``program_rows`` gives them, a failed row made one-hot on position 0 as the sweep does.
    """
    from attnprog.engine.replace import _fix_empty_rows, dense_from_packed

    programs, sentences = list(programs), list(sentences)
    paths = [program_path(p) for p in programs] if paths is None else list(paths)
    out = torch.zeros(len(programs), len(sentences), width, width, device=device)
    fitted = [k for k, path in enumerate(paths) if path == FITTED]
    if fitted:
        fits = _fits_of([programs[k] for k in fitted], sentences)
        for b, s in enumerate(sentences):
            out[fitted, b, : s.n, : s.n] = fitted_torch(fits, s, device)
    others = [k for k, path in enumerate(paths) if path != FITTED]
    if others:
        values = program_rows([programs[k] for k in others], sentences, tokenizer,
                              [paths[k] for k in others])
        offsets = causal_offsets([s.n for s in sentences])
        dense = dense_from_packed(values, offsets, range(len(sentences)), width)
        _fix_empty_rows(dense, [s.n for s in sentences])
        out[others] = torch.from_numpy(dense).to(device)
    return out


def newest_rows(programs: Sequence, s, device, tokenizer=None,
                paths: Sequence[str] | None = None) -> torch.Tensor:
    """The last token's row of each program on ``s``: float32 [programs, 1, 1, n] on ``device``.

    Fitted programs compute that row alone; the others compute the whole matrix (from their
    output cache where the text was seen) and keep its last row, which reads no later token
    even for a leaky program (the text ends there).
    """
    programs = list(programs)
    paths = [program_path(p) for p in programs] if paths is None else list(paths)
    paths = [SANDBOX if path == ROW_BY_ROW else path for path in paths]
    out = torch.zeros(len(programs), 1, 1, s.n, device=device)
    fitted = [k for k, path in enumerate(paths) if path == FITTED]
    if fitted:
        fits = _fits_of([programs[k] for k in fitted], [s])
        out[fitted, 0] = fitted_torch(fits, s, device, queries=[s.n - 1])
    others = [k for k, path in enumerate(paths) if path != FITTED]
    if others:
        full = program_matrices([programs[k] for k in others], [s], s.n, device, tokenizer,
                                [paths[k] for k in others])
        out[others] = full[:, :, -1:, :]
    return out
