"""The static check of untrusted source: imports, calls, attributes, the entry point."""

import pytest

from attnprog.synth.policy import check_source, entry_point
from tests.synth.programs import NATIVE, program


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
