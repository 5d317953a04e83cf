"""Refine any program's numeric settings for one head: local search on the synthesis split,
kept only when the selection split agrees.

A program's settings are the numbers a reader would tune: a fitted program's sink share and
weights, a generator program's term shares and float arguments (decay rates, sink sizes),
and for any other program (golden, LLM-written) its float literals other than 0 and 1.
Each round tries every setting a step up and a step down, moves to the best child when it
beats the current program on the search split, and halves the step when none does.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnprog.engine.store import AttentionStore
from attnprog.synth.program import Program


@dataclass
class Refinement:
    """What refining one head's program gave: the program to use and its selection scores."""

    row: int
    program: Program  # the refined child when accepted, else the parent
    parent_score: float  # mean IoU of the parent on the acceptance split
    child_score: float  # ... and of the best child found on the search split
    accepted: bool


# ---------------------------------------------------------------------------------------
# Settings: read them from a program, write them back


def _kind(program: Program) -> str:
    from attnprog.synth.fitted import is_fitted
    from attnprog.synth.generator.specs import is_generated

    if is_fitted(program):
        return "fitted"
    if is_generated(program):
        return "generated"
    return "source"


def _float_literals(source: str) -> list[ast.Constant]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return sorted(
        (node for node in ast.walk(tree) if isinstance(node, ast.Constant)
         and type(node.value) is float and node.value not in (0.0, 1.0)),
        key=lambda node: (node.lineno, node.col_offset),
    )


def settings_of(program: Program) -> list[float]:
    """The program's numeric settings, in a fixed order (empty when it has none)."""
    kind = _kind(program)
    if kind == "fitted":
        fit = program.provenance["fit"]
        return [fit["share"], *fit["weights"].values()]
    if kind == "generated":
        values = []
        for t in program.provenance["spec"]["terms"]:
            values.append(float(t["weight"]))
            values += [float(v) for _, v in sorted(t["args"].items()) if type(v) is float]
        return values
    return [node.value for node in _float_literals(program.source)]


def with_settings(program: Program, values: Sequence[float]) -> Program:
    """A child of ``program`` with its settings replaced by ``values``."""
    from attnprog.synth.fitted import program_from_fit
    from attnprog.synth.generator.specs import program_from_spec

    values = [float(v) for v in values]
    kind = _kind(program)
    lineage = {"refined_from": program.provenance.get("refined_from", program.hash)}
    if kind == "fitted":
        p = program.provenance
        fit = {"share": values[0], "weights": dict(zip(p["fit"]["weights"], values[1:], strict=True))}
        child = program_from_fit(fit, head=p.get("head", ""), model_id=p.get("model_id", ""),
                                 split=p.get("split", "synthesis"))
    elif kind == "generated":
        spec = copy.deepcopy(program.provenance["spec"])
        it = iter(values)
        for t in spec["terms"]:
            t["weight"] = next(it)
            for name in sorted(t["args"]):
                if type(t["args"][name]) is float:
                    t["args"][name] = next(it)
        child = program_from_spec(spec)
    else:
        lines = program.source.splitlines(keepends=True)
        for node, value in sorted(zip(_float_literals(program.source), values, strict=True),
                                  key=lambda nv: (-nv[0].lineno, -nv[0].col_offset)):
            line = lines[node.lineno - 1]
            lines[node.lineno - 1] = line[: node.col_offset] + repr(value) + line[node.end_col_offset :]
        child = Program("".join(lines), program.name, program.family, dict(program.provenance))
    provenance = {**child.provenance, **lineage}
    return Program(child.source, child.name, child.family, provenance)


def _neighbours(values: list[float], kind: str, step: float) -> list[list[float]]:
    """Each setting one step up and one step down (shares stay in [0, 1))."""
    out = []
    for k, v in enumerate(values):
        for direction in (1.0, -1.0):
            moved = list(values)
            if kind == "fitted" and k == 0:
                moved[k] = round(min(0.99, max(0.0, v + direction * step * 0.2)), 3)
            elif kind == "fitted":
                moved[k] = float(f"{v + direction * step * max(abs(v), 0.5):.3g}")
            else:
                moved[k] = float(f"{v * (1.0 + step) ** direction:.3g}")
                if kind == "generated" and k and 0.0 < v <= 1.0:
                    moved[k] = min(moved[k], 1.0)  # decay rates stay at most 1
            if moved[k] != v:
                out.append(moved)
    return out


# ---------------------------------------------------------------------------------------
# Scoring


def _outputs(programs: Sequence[Program], sentences) -> np.ndarray:
    """[P, C] outputs; fitted and generator programs vectorised, others in the sandbox."""
    from attnprog.synth.fitted import evaluate_fitted
    from attnprog.synth.generator.specs import evaluate_generated
    from attnprog.synth.runtime.evaluate import evaluate_programs

    kinds = [_kind(p) for p in programs]
    out = np.zeros((len(programs), sum(s.n * (s.n + 1) // 2 for s in sentences)), dtype=np.float32)
    for kind, evaluate in (("fitted", evaluate_fitted), ("generated", evaluate_generated)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            out[idx] = evaluate([programs[i] for i in idx], sentences)
    idx = [i for i, k in enumerate(kinds) if k == "source"]
    if idx:
        result = evaluate_programs([programs[i] for i in idx], sentences, progress=False,
                                   use_cache=False)
        out[idx] = result.values
    return out


def _scores(values: np.ndarray, attn: torch.Tensor, offsets: np.ndarray) -> np.ndarray:
    """Mean soft IoU of each output row [P, C] against one head's attention [C]."""
    values = torch.from_numpy(values)
    attn = attn.float().cpu()[None, :]
    total = torch.zeros(values.shape[0])
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        low = torch.minimum(values[:, a:b], attn[:, a:b]).sum(dim=1)
        high = torch.maximum(values[:, a:b], attn[:, a:b]).sum(dim=1)
        total += low / high
    return (total / (len(offsets) - 1)).numpy()


def _split(store: AttentionStore, split: str):
    sub = store.subset(store.split_indices(split))
    return sub, sub.sentences(), sub.offsets.numpy()


def refine(programs: Sequence[Program], rows: Sequence[int], store: AttentionStore, *,
           rounds: int = 6, step: float = 0.3, search: str = "synthesis",
           accept: str = "selection", progress: bool = True) -> list[Refinement]:
    """Refine ``programs[k]`` for head row ``rows[k]`` of ``store``: hill-climb its settings on
    ``search``, then keep the child only if it beats the parent on ``accept``."""
    from tqdm.auto import tqdm

    search_store, search_texts, search_offsets = _split(store, search)
    accept_store, accept_texts, accept_offsets = _split(store, accept)
    results = []
    for program, row in tqdm(list(zip(programs, rows, strict=True)), desc="refine",
                             unit="head", disable=not progress):
        kind, current = _kind(program), settings_of(program)
        head = search_store.attn_packed[row]
        best = float(_scores(_outputs([program], search_texts), head, search_offsets)[0])
        size = step
        for _ in range(rounds if current else 0):
            children = _neighbours(current, kind, size)
            if not children:
                break
            scores = _scores(_outputs([with_settings(program, c) for c in children], search_texts),
                             head, search_offsets)
            top = int(np.argmax(scores))
            if scores[top] > best + 1e-5:
                best, current = float(scores[top]), children[top]
            else:
                size /= 2
        child = with_settings(program, current) if current != settings_of(program) else program
        pair = _scores(_outputs([program, child], accept_texts), accept_store.attn_packed[row],
                       accept_offsets)
        accepted = child is not program and pair[1] > pair[0]
        results.append(Refinement(row, child if accepted else program, float(pair[0]),
                                  float(pair[1]), bool(accepted)))
    return results


def describe(results: Sequence[Refinement]) -> str:
    """One line: how many children were kept and the mean gain on the acceptance split."""
    kept = [r for r in results if r.accepted]
    gain = np.mean([r.child_score - r.parent_score for r in kept]) if kept else 0.0
    return f"kept {len(kept)} of {len(results)} refined programs (mean gain {gain:+.4f} IoU)"

