"""Scoring candidates against one head, and the evidence a refinement prompt shows.

Programs run through the public entry point ``evaluate_programs`` (sandboxed, cached). The
IoU of one text is handed in as ``score`` (the engine passes ``attnprog.kernels.iou.pair_iou``,
the one definition): synth imports neither kernels nor engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from attnprog.layout import unpack
from attnprog.synth.features import Sentence
from attnprog.synth.llm.summaries import edge_text, escape_token
from attnprog.synth.program import Program

Example = tuple[Sentence, np.ndarray]  # a text and the head's n x n attention on it
Score = Callable[[np.ndarray, np.ndarray], float]  # IoU of (program, head) n x n matrices
_sandbox_lock = threading.Lock()  # evaluate_programs shares one sandbox; heads run in threads


def program_matrices(program: Program, sentences: Sequence[Sentence]) -> tuple[list[np.ndarray], np.ndarray]:
    """(normalised n x n output per text, failed [S]) of one program."""
    from attnprog.synth.runtime.evaluate import evaluate_programs

    with _sandbox_lock:
        outputs = evaluate_programs([program], [s.copy() for s in sentences], progress=False)
    offsets = outputs.offsets
    values = np.asarray(outputs.values[0], dtype=np.float64)
    dense = [unpack(values[offsets[k] : offsets[k + 1]], s.n) for k, s in enumerate(sentences)]
    return dense, np.asarray(outputs.failed[0], dtype=bool)


def _scores(dense: Sequence[np.ndarray], failed: np.ndarray, examples: Sequence[Example],
            score: Score) -> np.ndarray:
    """``score`` of each output against its example's attention [S]; 0 where the program failed."""
    return np.array([0.0 if failed[k] else float(score(d, a))
                     for k, (d, (_, a)) in enumerate(zip(dense, examples))], dtype=np.float64)


def per_text_iou(program: Program, examples: Sequence[Example], score: Score) -> np.ndarray:
    """IoU of ``program`` on each example by ``score`` (0 where it failed)."""
    dense, failed = program_matrices(program, [s for s, _ in examples])
    return _scores(dense, failed, examples, score)


def mean_iou(program: Program, examples: Sequence[Example], score: Score) -> float:
    """Mean IoU of ``program`` over ``examples`` (the selection texts decide refinements)."""
    return float(per_text_iou(program, examples, score).mean()) if examples else 0.0


def edge_errors(sentence: Sentence, predicted: np.ndarray, attention: np.ndarray, k: int = 5) -> str:
    """The ``k`` most under-predicted and over-predicted edges of one text, as prompt lines."""
    diff = np.tril(np.asarray(attention, np.float64) - np.asarray(predicted, np.float64))
    lines = []
    for title, sign in (("under-predicted (the head attends more than the program)", 1.0),
                        ("over-predicted (the program attends more than the head)", -1.0)):
        flat = np.argsort(-(sign * diff), axis=None, kind="stable")[:k]
        edges = [np.unravel_index(f, diff.shape) for f in flat if sign * diff.flat[f] > 0.01]
        lines.append(f"  {title}:")
        lines += [f"    {edge_text(sentence.tokens, i, j)} "
                  f"(head {attention[i, j]:.3f}, program {predicted[i, j]:.3f})" for i, j in edges]
        if not edges:
            lines.append("    (none)")
    return "\n".join(lines)


def refinement_evidence(program: Program, examples: Sequence[Example],
                        score: Score) -> tuple[str, str]:
    """(best text, worst text) of ``program`` on ``examples``, each with its IoU by ``score``
    and its edge errors."""
    dense, failed = program_matrices(program, [s for s, _ in examples])
    scores = _scores(dense, failed, examples, score)
    order = np.argsort(-scores, kind="stable")

    def show(k: int) -> str:
        sentence, attention = examples[k]
        return (f"Text {escape_token(sentence.text)}, IoU {scores[k]:.3f}:\n"
                + edge_errors(sentence, dense[k], attention))

    return show(int(order[0])), show(int(order[-1]))
