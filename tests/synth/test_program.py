"""The program contract: normalisation, static checks and validate()."""

import numpy as np
import pytest

from attnprog.layout import pack
from attnprog.synth.program import (
    Program,
    check_source,
    entry_point,
    normalise,
    normalise_packed,
    validate,
    validate_many,
)

NATIVE = """
import numpy as np

def program(s):
    out = np.zeros((s.n, s.n))
    out[:, 0] = 1.0
    return out
"""


def program(body: str, name: str = "program") -> Program:
    return Program(source=body.strip() + "\n", name=name)


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


# --- static checks ----------------------------------------------------------------------------
def test_a_native_program_passes_the_static_checks():
    assert check_source(program(NATIVE)) == ""


def test_helper_functions_beside_the_entry_point_pass():
    source = "import numpy as np\n\ndef helper(n):\n    return np.eye(n)\n\n" + NATIVE
    assert check_source(program(source)) == ""


def test_the_entry_point_is_inferred_as_the_last_fitting_function():
    source = "def helper(x):\n    return x\n\n" + NATIVE.replace("def program", "def my_head")
    assert check_source(program(source, name="program")) == ""
    assert entry_point(source, "program") == "my_head"


def test_a_source_without_a_function_is_rejected():
    assert "define the program as a top-level function" in check_source(program("x = 1\n"))


def test_transformers_is_allowed_for_type_names_only():
    typed = "from transformers import PreTrainedTokenizerBase\n" + NATIVE
    loader = "from transformers import AutoTokenizer\n" + NATIVE
    assert check_source(program(typed)) == ""
    assert "only for type names" in check_source(program(loader))


@pytest.mark.parametrize("module", ["os", "subprocess", "socket", "sys", "ctypes", "pickle"])
def test_an_import_outside_the_allow_list_is_rejected(module):
    reason = check_source(program(f"import {module}\n" + NATIVE))
    assert f"import of `{module}` is not allowed" in reason and "numpy" in reason


def test_from_import_outside_the_allow_list_is_rejected():
    reason = check_source(program("from os import path\n" + NATIVE))
    assert "import of `os` is not allowed" in reason


def test_an_import_inside_the_function_is_checked_too():
    source = "def program(s):\n    import subprocess\n    return None\n"
    assert "`subprocess` is not allowed" in check_source(program(source))


def test_allowed_imports_pass():
    source = "import math, re, string\nfrom collections import Counter\nimport itertools\n" + NATIVE
    assert check_source(program(source)) == ""


def test_a_syntax_error_is_reported_with_its_line():
    reason = check_source(program("def program(s):\n    return (\n"))
    assert reason.startswith("syntax error on line")


def test_top_level_code_besides_imports_and_constants_is_rejected():
    reason = check_source(program(NATIVE + "\nprint(program)\n"))
    assert "move this code into a function" in reason


def test_dunder_attribute_access_is_rejected():
    source = "def program(s):\n    return s.__class__\n"
    assert "`__class__` is not allowed" in check_source(program(source))


def test_open_and_eval_are_rejected():
    assert "files" in check_source(program("def program(s):\n    open('x')\n"))
    assert "eval()" in check_source(program("def program(s):\n    eval('1')\n"))


@pytest.mark.parametrize(
    ("call", "words"),
    [
        ("np.save('x.npy', np.eye(2))", "files"),
        ("np.eye(2).tofile('x')", "files"),
        ("np.load('x.npy')", "files"),
        ("np.memmap('x', mode='w+')", "files"),
        ("np.ctypeslib.as_array(0)", "system"),
        ("np.lib.format.os.system('true')", "system"),
        ("getattr(np, 'save')('x', 1)", "files"),
        ("getattr(np, 'sa' + 've')('x', 1)", "literal attribute name"),
        ("getattr(s, '__class__')", "`__class__` is not allowed"),
    ],
)
def test_tricks_that_reach_files_or_the_system_are_rejected(call, words):
    reason = check_source(program(f"import numpy as np\ndef program(s):\n    {call}\n"))
    assert words in reason and "line 3" in reason


def test_from_numpy_import_of_a_file_function_is_rejected():
    assert "files" in check_source(program("from numpy import save\n" + NATIVE))


def test_plain_getattr_and_spacy_style_load_pass():
    source = "def program(s):\n    nlp = s.load\n    return getattr(s, 'pos', None)\n"
    assert check_source(program(source)) == ""


def test_a_function_with_three_required_arguments_is_rejected():
    reason = check_source(program("def program(a, b, c):\n    return 0\n"))
    assert "3 required arguments" in reason and "def program(s)" in reason


# --- validate (runs in the sandbox) -------------------------------------------------------------
def test_validate_accepts_a_good_native_program():
    result = validate(program(NATIVE))
    assert result.ok and result.reason == "" and bool(result)


def test_validate_accepts_the_papers_form():
    source = """
import numpy as np

def previous_token(sentence: str, tokenizer):
    toks = tokenizer([sentence], return_tensors="pt")
    n = len(toks.input_ids[0])
    out = np.zeros((n, n))
    out[0, 0] = 1
    for i in range(1, n):
        out[i, i - 1] = 1
    return "Previous token", out
"""
    assert validate(program(source, name="previous_token")).ok


def test_validate_rejects_the_wrong_shape_with_the_expected_one():
    result = validate(program("import numpy as np\ndef program(s):\n    return np.ones((3, 4))\n"))
    assert not result.ok
    assert "on probe text 0" in result.reason and "shape (3, 4), expected (8, 8)" in result.reason


def test_validate_reports_an_exception_with_its_program_line():
    source = "def program(s):\n    x = 1\n    return s.tokens[1000]\n"
    result = validate(program(source))
    assert "raised IndexError" in result.reason and "(line 3)" in result.reason


def test_validate_rejects_statically_before_running():
    result = validate(program("import os\n" + NATIVE))
    assert not result.ok and "import of `os`" in result.reason


def test_validate_many_judges_each_program():
    results = validate_many([program(NATIVE), program("def program(s):\n    return 'x'\n")])
    assert [r.ok for r in results] == [True, False]
    assert "returned str" in results[1].reason


def test_check_file_checks_every_program_of_a_library_in_the_papers_layout(tmp_path):
    from attnprog.synth.program import check_file

    library = tmp_path / "lib.py"
    library.write_text(
        "import numpy as np\nfrom transformers import PreTrainedTokenizerBase\n\n"
        "def _n(sentence, tokenizer):\n    return len(tokenizer(sentence)['input_ids'])\n\n"
        "def first(sentence: str, tokenizer: PreTrainedTokenizerBase):\n"
        "    m = np.zeros((_n(sentence, tokenizer),) * 2)\n    m[:, 0] = 1\n    return 'first', m\n\n"
        "def broken(sentence: str, tokenizer: PreTrainedTokenizerBase):\n"
        "    raise ValueError('\\x1b[2K\\rok')\n"
    )
    results = dict(check_file(library))
    assert results["first"] == ""
    assert "ValueError: \\x1b[2K\\rok" in results["broken"] and "\x1b" not in results["broken"]


def test_check_file_reports_a_file_that_is_not_utf8_in_one_line(tmp_path):
    from attnprog.errors import ProgramError
    from attnprog.synth.program import check_file

    path = tmp_path / "latin1.py"
    path.write_bytes("# caf\xe9\ndef program(s):\n    return None\n".encode("latin-1"))
    with pytest.raises(ProgramError, match=r"is not UTF-8 text \(byte 5\); save it as UTF-8"):
        check_file(path)
