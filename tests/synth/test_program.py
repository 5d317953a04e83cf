"""The program contract: normalisation."""

import numpy as np
import pytest

from attnprog.errors import ProgramError
from attnprog.layout import pack
from attnprog.synth.program import as_program, load_pool, normalise, normalise_packed, save_pool


# --- normalise --------------------------------------------------------------------------------
def test_normalise_clips_negatives_to_zero():
    out = normalise(np.array([[1.0, 0.0], [-3.0, 1.0]]))
    assert out[1, 0] == 0.0 and out[1, 1] == 1.0


def test_normalise_applies_the_causal_mask():
    out = normalise(np.ones((3, 3)))
    assert np.all(out[np.triu_indices(3, k=1)] == 0.0)


def test_normalise_divides_rows_by_their_sum():
    out = normalise(np.array([[2.0, 0.0], [1.0, 3.0]]))
    np.testing.assert_allclose(out, [[1.0, 0.0], [0.25, 0.75]])


def test_normalise_turns_an_all_zero_row_into_one_hot_on_position_0():
    out = normalise(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    np.testing.assert_array_equal(out[:, 0], [1.0, 1.0, 1.0])
    assert out.sum() == 3.0


def test_normalise_ignores_values_above_the_diagonal_when_summing():
    out = normalise(np.array([[0.0, 5.0], [1.0, 1.0]]))
    np.testing.assert_array_equal(out, [[1.0, 0.0], [0.5, 0.5]])


def test_packed_normalisation_equals_the_dense_rule():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64):
        matrix = rng.normal(size=(n, n))
        matrix[rng.random(n) < 0.3] = -1.0  # some rows become empty
        np.testing.assert_allclose(normalise_packed(matrix), pack(normalise(matrix)), atol=1e-15)


def _previous_token(s):
    return np.eye(s.n, k=-1)  # np from this module: as_program imports it for the program


def test_a_function_becomes_a_program_of_its_own_source_with_numpy():
    program = as_program(_previous_token)
    assert program.name == "_previous_token" and program.family == "custom"
    assert program.source.startswith("import numpy as np") and "np.eye(s.n, k=-1)" in program.source
    assert as_program(program) is program


def test_a_lambda_or_a_non_function_is_refused_with_what_to_pass():
    with pytest.raises(ProgramError, match="write it with def"):
        as_program(lambda s: np.eye(s.n))
    with pytest.raises(ProgramError, match="not str"):
        as_program("def program(s): ...")


def test_save_pool_takes_functions_as_the_readme_says(tmp_path):
    save_pool([_previous_token], tmp_path / "mine.jsonl")
    (program,) = load_pool(tmp_path / "mine.jsonl")
    assert program == as_program(_previous_token)


def test_save_pool_refuses_a_non_program_before_writing_the_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    with pytest.raises(ProgramError, match="not str"):
        save_pool([_previous_token, "def program(s): ..."], path)
    assert not path.exists()


def test_a_binary_file_passed_as_a_pool_is_refused_with_a_program_error(tmp_path):
    path = tmp_path / "attention.safetensors"
    path.write_bytes(b"\x88\x01\x00\x00\xff\xfe")
    with pytest.raises(ProgramError, match="not a program pool"):
        load_pool(path)
