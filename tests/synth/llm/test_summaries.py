"""Attention summaries: the stratified-pairs format pinned on a fixed matrix, escaping, budgets."""

import numpy as np
import pytest

from attnprog.errors import LLMError
from attnprog.synth.features import Sentence
from attnprog.synth.llm.summaries import (
    escape_token,
    stratified_pairs,
    summarise_head,
    top_fraction,
)

ATTENTION = np.array([
    [1.0, 0, 0, 0, 0, 0],
    [0.9, 0.1, 0, 0, 0, 0],
    [0.5, 0.3, 0.2, 0, 0, 0],
    [0.2, 0.1, 0.65, 0.05, 0, 0],
    [0.6, 0.005, 0.005, 0.3, 0.09, 0],
    [0.4, 0.05, 0.05, 0.45, 0.04, 0.01],
])
TOKENS = ["<s>", "Tom", " said", ' "', "it's", "\n"]

PINNED = """\
top quarter (5 edges, weights 1.000 to 0.500):
  '<s>'[0] -> '<s>'[0] (1.000)
  'Tom'[1] -> '<s>'[0] (0.900)
  ' "'[3] -> ' said'[2] (0.650)
  'it\\'s'[4] -> '<s>'[0] (0.600)
  (+ 1 more self/first-token edges)
second quarter (5 edges, weights 0.450 to 0.200):
  '\\n'[5] -> ' "'[3] (0.450)
  '\\n'[5] -> '<s>'[0] (0.400)
  ' said'[2] -> 'Tom'[1] (0.300)
  'it\\'s'[4] -> ' "'[3] (0.300)
  ' said'[2] -> ' said'[2] (0.200)
third quarter (5 edges, weights 0.200 to 0.050):
  ' "'[3] -> '<s>'[0] (0.200)
  'Tom'[1] -> 'Tom'[1] (0.100)
  ' "'[3] -> 'Tom'[1] (0.100)
  'it\\'s'[4] -> 'it\\'s'[4] (0.090)
  (+ 1 more self/first-token edges)
bottom quarter (4 edges, weights 0.050 to 0.010):
  '\\n'[5] -> 'Tom'[1] (0.050)
  '\\n'[5] -> ' said'[2] (0.050)
  '\\n'[5] -> 'it\\'s'[4] (0.040)
  '\\n'[5] -> '\\n'[5] (0.010)"""


def test_stratified_pairs_format_on_a_fixed_matrix():
    assert "\n".join(stratified_pairs(ATTENTION, TOKENS)) == PINNED


def test_edges_below_the_weight_floor_are_left_out():
    lines = stratified_pairs(ATTENTION, TOKENS)
    assert not any("(0.005)" in line for line in lines)
    assert sum(int(line.split("(")[1].split()[0]) for line in lines if "quarter (" in line) == 19


def test_above_diagonal_weights_are_ignored():
    noisy = ATTENTION + np.triu(np.full((6, 6), 0.9), k=1)
    assert "\n".join(stratified_pairs(noisy, TOKENS)) == PINNED


def test_the_top_quarter_shows_15_edges_and_the_others_10():
    n = 24
    rng = np.random.default_rng(0)
    attention = np.tril(rng.uniform(0.02, 1.0, (n, n)), k=-1)
    attention[:, 0] = 0.0  # no first-token or self edges: only the quarter caps apply
    lines = stratified_pairs(attention, [f"t{i}" for i in range(n)])
    quarters = [k for k, line in enumerate(lines) if not line.startswith("  ")] + [len(lines)]
    shown = [sum("->" in line for line in lines[a:b]) for a, b in zip(quarters, quarters[1:])]
    assert shown == [15, 10, 10, 10]
    assert all("more edges in this quarter" in lines[b - 1] for b in quarters[1:])


def test_the_shown_edges_span_the_quarter_from_strongest_to_weakest():
    n = 24
    attention = np.tril(np.arange(n * n, dtype=float).reshape(n, n) / (n * n), k=-1)
    attention[:, 0] = 0.0
    lines = stratified_pairs(attention, [f"t{i}" for i in range(n)])
    header = lines[0]
    first, last = lines[1], [line for line in lines[:17] if "->" in line][-1]
    assert header.split("weights ")[1].startswith(first.rsplit("(", 1)[1].rstrip(")"))
    assert header.rstrip("):").endswith(last.rsplit("(", 1)[1].rstrip(")"))


def test_a_head_with_no_strong_edge_says_so():
    assert stratified_pairs(np.full((3, 3), 0.001), ["a", "b", "c"]) == ["(no edge has weight >= 0.01)"]


@pytest.mark.parametrize("token, escaped", [
    ("cat", "'cat'"),
    ("it's", "'it\\'s'"),
    ("a\\b", "'a\\\\b'"),
    ("\n", "'\\n'"),
    ("\t x", "'\\t x'"),
    ("\u200b", "'\\u200b'"),       # zero-width space
    ("\u2028", "'\\u2028'"),       # line separator
    ("\x00", "'\\u0000'"),
    ("é ü 猫", "'é ü 猫'"),       # ordinary Unicode stays readable
])
def test_tokens_are_escaped_onto_one_safe_line(token, escaped):
    assert escape_token(token) == escaped


def test_top_fraction_lists_the_strongest_edges_first():
    lines = top_fraction(ATTENTION, TOKENS, fraction=0.2)
    assert lines[0] == "strongest 4 of 21 causal edges:"
    assert lines[1:3] == ["  '<s>'[0] -> '<s>'[0] (1.000)", "  'Tom'[1] -> '<s>'[0] (0.900)"]
    assert lines[-1] == "  (+ 15 more edges with weight >= 0.01)"


def sentence(text: str) -> Sentence:
    return Sentence.from_text(text, bos="<s>")


def uniform(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]


def test_a_summary_has_one_block_per_text():
    texts = ["The cat sat.", "A dog ran home."]
    summary = summarise_head([(sentence(t), uniform(sentence(t).n)) for t in texts])
    assert summary.startswith("Text 1 (5 tokens): The cat sat.\ntop quarter")
    assert "\n\nText 2 (6 tokens): A dog ran home.\n" in summary


def test_texts_beyond_the_budget_are_left_out_and_counted():
    examples = [(sentence(f"Text number {k} is here."), uniform(7)) for k in range(20)]
    summary = summarise_head(examples, budget_tokens=300)
    assert len(summary) <= 4 * 300 + 100
    assert summary.rstrip().endswith("more texts left out to keep the summary short)")


def test_a_first_text_longer_than_the_budget_is_cut():
    long = sentence(" ".join(["word"] * 60))
    summary = summarise_head([(long, uniform(long.n))], budget_tokens=120)
    assert len(summary) <= 4 * 120 + 100 and "cut to fit the summary budget" in summary


def test_an_unknown_format_is_an_llm_error():
    with pytest.raises(LLMError, match="unknown summary format"):
        summarise_head([(sentence("a b"), uniform(3))], fmt="dense")
