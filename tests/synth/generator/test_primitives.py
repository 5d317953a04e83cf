"""Each DSL primitive behaves as its docstring says, on a small hand-checked sentence."""

import numpy as np
import pytest

from attnprog.synth.features import Sentence
from attnprog.synth.generator import primitives as dsl

# index:     0      1       2       3     4       5       6       7      8      9     10     11
TOKENS = ["The", " cat", " sat", ".", " The", " cat", " ran", ' "', "far", '"', " 4", "2"]
WORD_IDS = [0, 1, 2, 2, 3, 4, 5, 6, 6, 6, 7, 7]
POS = ["DET", "NOUN", "VERB", "PUNCT", "DET", "NOUN", "VERB", "PUNCT", "ADV", "PUNCT", "NUM", "NUM"]


def make_sentence(pos=POS) -> Sentence:
    vocab: dict[str, int] = {}
    ids = [vocab.setdefault(t, len(vocab)) for t in TOKENS]
    ends = np.cumsum([len(t) for t in TOKENS])
    offsets = [(int(end - len(t)), int(end)) for t, end in zip(TOKENS, ends, strict=True)]
    return Sentence(text="".join(TOKENS), ids=ids, tokens=TOKENS, offsets=offsets, word_ids=WORD_IDS, pos=pos)


def targets(matrix: np.ndarray, row: int) -> set[int]:
    return {int(j) for j in np.flatnonzero(matrix[row])}


# (primitive, args, row, the columns that row must score)
CASES = [
    ("first_token", {}, 7, {0}),
    ("second_token", {}, 0, set()),
    ("second_token", {}, 5, {1}),
    ("self_token", {}, 6, {6}),
    ("previous", {"k": 1}, 0, set()),
    ("previous", {"k": 1}, 5, {4}),
    ("previous", {"k": 3}, 2, set()),
    ("previous", {"k": 3}, 9, {6}),
    ("uniform", {}, 2, {0, 1, 2}),
    ("window", {"width": 2}, 5, {4, 5}),
    ("punctuation", {}, 2, set()),
    ("punctuation", {}, 9, {3, 7, 9}),
    ("the_tokens", {}, 3, {0}),
    ("the_tokens", {}, 5, {0, 4}),
    ("sink_recency", {"sink": 4, "rate": 0.5}, 2, {0, 1, 2}),
    ("last_punctuation", {}, 2, set()),
    ("last_punctuation", {}, 8, {7}),
    ("sentence_start", {}, 3, {0}),
    ("sentence_start", {}, 6, {4}),
    ("same_token", {}, 1, set()),
    ("same_token", {}, 5, {1}),
    ("same_token", {}, 4, set()),  # "The" and " The" are different tokens
    ("last_same_token", {}, 5, {1}),
    ("induction", {}, 4, set()),
    ("induction", {}, 5, {2}),
    ("induction", {}, 6, set()),
    ("last_induction", {}, 5, {2}),
    ("same_word", {}, 4, {0}),
    ("same_word", {}, 2, set()),
    ("word_start", {}, 3, {2}),
    ("word_start", {}, 9, {7}),
    ("current_word", {}, 9, {7, 8, 9}),
    ("previous_word", {}, 0, set()),
    ("previous_word", {}, 8, {6}),
    ("previous_word_end", {}, 4, {3}),
    ("previous_word_end", {}, 9, {6}),
    ("word_starts", {}, 3, {0, 1, 2}),
    ("capitalised", {}, 5, {0, 4}),
    ("last_capitalised", {}, 6, {4}),
    ("numbers", {}, 9, set()),
    ("numbers", {}, 11, {10, 11}),
    ("quote_open", {}, 7, set()),
    ("quote_open", {}, 9, {7}),
    ("quote_open", {}, 10, set()),
    ("quote_pair", {}, 8, set()),
    ("quote_pair", {}, 9, {7}),
    ("pos_tag", {"tag": "NOUN"}, 6, {1, 5}),
    ("last_pos_tag", {"tag": "VERB"}, 7, {6}),
    ("same_pos", {}, 9, {3, 7}),
]


@pytest.mark.parametrize(("prim", "args", "row", "expected"), CASES)
def test_primitive_row_targets(prim, args, row, expected):
    matrix = dsl.PRIMITIVES[prim].fn(make_sentence(), **args)
    assert targets(matrix, row) == expected


def test_recency_halves_per_step_back():
    matrix = dsl.recency(make_sentence(), rate=0.5)
    np.testing.assert_allclose(matrix[2, :3], [0.25, 0.5, 1.0])


def test_sink_recency_adds_the_sink_to_decaying_scores():
    matrix = dsl.sink_recency(make_sentence(), sink=4, rate=0.5)
    np.testing.assert_allclose(matrix[2, :3], [4.25, 0.5, 1.0])
    flat = dsl.rows(dsl.sink_recency(make_sentence(), sink=3, rate=1.0))
    np.testing.assert_allclose(flat[9, :2], [4 / 13, 1 / 13])  # token 0: its own 1 plus the sink


@pytest.mark.parametrize("prim", ["pos_tag", "last_pos_tag", "same_pos"])
def test_pos_primitives_are_empty_without_tags(prim):
    args = dsl.PRIMITIVES[prim].settings[0]
    assert not dsl.PRIMITIVES[prim].fn(make_sentence(pos=None), **args).any()


@pytest.mark.parametrize(
    ("prim", "args"),
    [(name, args) for name, p in dsl.PRIMITIVES.items() for args in p.settings],
)
def test_primitive_is_causal_and_non_negative(prim, args):
    matrix = dsl.PRIMITIVES[prim].fn(make_sentence(), **args)
    assert matrix.shape == (len(TOKENS), len(TOKENS))
    assert (matrix >= 0).all()
    assert not np.triu(matrix, k=1).any()


def test_with_fallback_fills_only_empty_rows():
    s = make_sentence()
    filled = dsl.with_fallback(dsl.previous(s, k=1), dsl.self_token(s))
    assert targets(filled, 0) == {0}
    assert targets(filled, 5) == {4}


def test_rows_normalises_and_keeps_empty_rows_empty():
    scaled = dsl.rows(dsl.punctuation(make_sentence()))
    assert not scaled[2].any()
    np.testing.assert_allclose(scaled[9, [3, 7, 9]], 1 / 3)
