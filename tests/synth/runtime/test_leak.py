"""The leak check: a program whose row i reads a later token is flagged, a causal one is not."""

import numpy as np
import pytest

from attnprog.synth.embeddings import TokenEmbeddings, attach_similarity
from attnprog.synth.features import Sentence, syntax_available
from attnprog.synth.fitted import program_from_fit
from attnprog.synth.program import Program
from attnprog.synth.runtime.leak import cut_points, is_leaky, prefix_sentence, program_leaks

TEXTS = [Sentence.from_text(t, bos="<s>") for t in (
    "The cat sat on the mat, and the dog slept by the door.",
    "She said that Paris is big. Then she left, and the cat followed her home.",
    "The old man the boats while the young sailors rest on the shore.",
)]

PEEKS_AHEAD = Program(name="program", source="""
import numpy as np

def program(s):
    m = np.eye(s.n)
    for i in range(s.n - 1):
        if s.tokens[i + 1].strip() in {".", ","}:  # reads the next token
            m[i] = 0.0
            m[i, 0] = 1.0
    return m
""")
PREVIOUS = Program(name="program", source="""
import numpy as np

def program(s):
    return np.eye(s.n, k=-1)
""")
SYNTAX_FIT = {"share": 0.2, "weights": {"syntactic_head": 1.5, "syntactic_dependent": 2.0,
                                        "pos_noun": 1.0, "pos_verb": -0.5, "previous_1": 1.0}}


def test_a_prefix_is_the_text_up_to_its_last_token():
    s = TEXTS[0]
    cut = prefix_sentence(s, 3)
    assert cut.tokens == s.tokens[:4] and cut.text == "The cat sat"


def test_cut_points_lie_inside_the_text():
    assert cut_points(20) == [6, 11, 16] and cut_points(2) == []


def test_a_program_that_reads_a_later_token_is_flagged():
    [leak] = program_leaks([PEEKS_AHEAD], TEXTS)
    assert is_leaky(leak) and leak == pytest.approx(2.0)  # a one-hot row moved entirely


def test_a_causal_program_is_not_flagged():
    leaks = program_leaks([PREVIOUS, program_from_fit(SYNTAX_FIT)], TEXTS)
    assert not any(map(is_leaky, leaks))


@pytest.mark.skipif(not syntax_available(), reason="spaCy with an English pipeline is not installed")
def test_a_fitted_program_on_whole_text_parses_leaks_and_on_causal_ones_does_not():
    fitted = program_from_fit(SYNTAX_FIT)
    [whole] = program_leaks([fitted], TEXTS, causal_syntax=False)
    [causal] = program_leaks([fitted], TEXTS)
    assert is_leaky(whole) and not is_leaky(causal)


def test_a_fitted_program_reading_token_meaning_is_not_flagged():
    rng = np.random.default_rng(0)
    texts = [Sentence.from_text(t.text, bos="<s>") for t in TEXTS]
    ids = sorted({i for s in texts for i in s.ids})
    attach_similarity(texts, TokenEmbeddings(np.array(ids), rng.normal(size=(len(ids), 8))))
    fitted = program_from_fit({"share": 0.1, "weights": {"similar": 2.0, "after_similar": 1.0,
                                                         "previous_1": 1.0}})
    [leak] = program_leaks([fitted], texts)
    assert not is_leaky(leak)  # the prefix keeps its tokens' similarities
