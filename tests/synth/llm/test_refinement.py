"""Scoring against one head and the evidence a refinement prompt shows. The IoU is handed in:
the engine passes the kernels' ``pair_iou`` (tests/kernels/test_iou.py tests it)."""

import numpy as np
import pytest

from attnprog.kernels.iou import pair_iou
from attnprog.synth.features import Sentence
from attnprog.synth.llm.refinement import edge_errors, mean_iou, per_text_iou, refinement_evidence
from attnprog.synth.program import Program

PREVIOUS = Program("import numpy as np\n\ndef program(s):\n    m = np.zeros((s.n, s.n))\n    m[0, 0] = 1\n"
                   "    m[np.arange(1, s.n), np.arange(s.n - 1)] = 1\n    return m\n")


def previous(n):
    m = np.zeros((n, n))
    m[0, 0] = 1
    m[np.arange(1, n), np.arange(n - 1)] = 1
    return m


def first(n):
    m = np.zeros((n, n))
    m[:, 0] = 1
    return m


def test_a_program_is_scored_per_text_in_the_sandbox():
    examples = [(Sentence.from_text(t, bos="<s>"), None) for t in ("The cat sat.", "A dog ran.")]
    examples = [(s, previous(s.n)) for s, _ in examples] + [(examples[1][0], first(examples[1][0].n))]
    assert per_text_iou(PREVIOUS, examples, pair_iou) == pytest.approx([1.0, 1.0, 2 / 8])  # 5 tokens


def test_the_score_handed_in_is_the_one_used():
    s = Sentence.from_text("The cat sat.", bos="<s>")
    seen = []

    def score(predicted, attention):
        seen.append((predicted.shape, attention.shape))
        return 0.25

    assert mean_iou(PREVIOUS, [(s, previous(s.n))] * 2, score) == 0.25
    assert seen == [((s.n, s.n), (s.n, s.n))] * 2


def test_edge_errors_name_the_under_and_over_predicted_edges():
    s = Sentence.from_text("a b c", bos="<s>")
    text = edge_errors(s, previous(s.n), first(s.n), k=2)
    under, over = text.split("over-predicted")
    assert "' c'[3] -> '<s>'[0] (head 1.000, program 0.000)" in under
    assert "' c'[3] -> ' b'[2] (head 0.000, program 1.000)" in over


def test_refinement_evidence_shows_the_best_then_the_worst_text():
    good = Sentence.from_text("The cat sat.", bos="<s>")
    bad = Sentence.from_text("A dog ran home.", bos="<s>")
    best, worst = refinement_evidence(PREVIOUS, [(bad, first(bad.n)), (good, previous(good.n))],
                                      pair_iou)
    assert best.startswith("Text 'The cat sat.', IoU 1.000") and "(none)" in best
    assert worst.startswith("Text 'A dog ran home.', IoU 0.200")
