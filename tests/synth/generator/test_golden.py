"""The golden library: every program runs and gives finite n x n outputs; key heads are right."""

import numpy as np
import pytest

from attnprog.synth.generator.golden import golden_programs
from attnprog.synth.generator.probes import probe_sentences, tokenise
from attnprog.synth.runtime.execute import compile_program

GOLDEN = golden_programs()


def sentences():
    vocab: dict[str, int] = {}
    bare = [tokenise("Hi", vocab, with_pos=False), tokenise("A (b) [c] 'd' 1 2 3.", vocab, False)]
    return probe_sentences() + bare


def run(program, s) -> np.ndarray:
    return np.asarray(compile_program(program.source, program.name)(s.copy()), dtype=float)


def by_family(family: str):
    return next(p for p in GOLDEN if p.family == family and p.provenance["form"] == "native")


def test_library_has_at_least_24_distinct_programs():
    assert len(GOLDEN) >= 24
    assert len({p.hash for p in GOLDEN}) == len(GOLDEN)


def test_library_covers_the_well_known_heads():
    families = {p.family for p in GOLDEN}
    assert {"previous", "first", "duplicate", "induction", "punctuation", "uniform"} <= families


def test_paper_form_programs_are_marked():
    paper = [p for p in GOLDEN if p.provenance["form"] == "paper"]
    assert paper and all(p.name != "program" for p in paper)


@pytest.mark.parametrize("program", GOLDEN, ids=lambda p: f"{p.family}-{p.hash[:6]}")
def test_golden_program_gives_finite_square_output(program):
    for s in sentences():
        matrix = run(program, s)
        assert matrix.shape == (s.n, s.n)
        assert np.isfinite(matrix).all()


def test_previous_token_program_attends_one_back():
    s = probe_sentences()[0]
    expected = np.eye(s.n, k=-1)
    expected[0, 0] = 1.0
    np.testing.assert_array_equal(run(by_family("previous"), s), expected)


def test_first_token_program_attends_to_token_zero():
    s = probe_sentences()[1]
    matrix = run(by_family("first"), s)
    assert (matrix[:, 0] == 1).all() and matrix[:, 1:].sum() == 0


def test_paper_form_matches_native_previous_token():
    s = probe_sentences()[2]
    paper = next(p for p in GOLDEN if p.name == "previous_token_pattern")
    np.testing.assert_array_equal(run(paper, s), run(by_family("previous"), s))
