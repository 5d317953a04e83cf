"""Sandboxed validation: validate(), validate_many() and check_file()."""

import os

import pytest

from attnprog.errors import ProgramError
from attnprog.synth.features import syntax_available
from attnprog.synth.runtime.validate import check_file, validate, validate_many
from tests.synth.programs import NATIVE, program


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


@pytest.mark.skipif(not syntax_available(), reason="spaCy with an English pipeline is not installed")
def test_validate_gives_a_program_reading_pos_tags_tagged_probe_texts():
    source = """
import numpy as np

def program(s):
    verbs = np.array([tag == "VERB" for tag in s.pos], dtype=float)
    return np.tile(verbs + 1e-3, (s.n, 1))
"""
    result = validate(program(source))
    assert result.ok, result.reason


def test_check_file_checks_every_program_of_a_library_in_the_papers_layout(tmp_path):
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
    path = tmp_path / "latin1.py"
    path.write_bytes("# caf\xe9\ndef program(s):\n    return None\n".encode("latin-1"))
    with pytest.raises(ProgramError, match=r"is not UTF-8 text \(byte 5\); save it as UTF-8"):
        check_file(path)


def test_check_file_refuses_a_source_nested_too_deep_to_parse_with_a_program_error(tmp_path):
    path = tmp_path / "deep.py"
    path.write_text("x = " + "-" * 100_000 + "1\n")
    with pytest.raises(ProgramError, match="cannot be parsed"):
        check_file(path)


def test_check_file_names_no_line_for_a_syntax_error_that_has_none(tmp_path):
    path = tmp_path / "nul.py"
    path.write_bytes(b"def program(s):\x00\n")
    with pytest.raises(ProgramError, match=r"nul\.py: syntax error") as raised:
        check_file(path)
    assert "None" not in str(raised.value)


def test_check_file_unsafe_leaves_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNPROG_UNSAFE_SANDBOX", raising=False)
    path = tmp_path / "one.py"
    path.write_text(NATIVE)
    assert check_file(path, unsafe=True) == [("program", "")]
    assert "ATTNPROG_UNSAFE_SANDBOX" not in os.environ


PARTS_AND_MEANING = '''
import numpy as np

def program(sentence, tokenizer):
    tokens = tokenize(sentence, tokenizer)
    first_word = tokenizer.tokenize(sentence.split()[0])  # another text than the sentence
    n = len(tokens)
    out = np.eye(n)
    for i in range(1, n):
        out[i, 0] = len(first_word) + embedding_similarity(tokens, i, 0, tokenizer)
    return "first word, and meaning", out
'''


def test_check_with_a_model_tokenises_any_text_and_knows_token_meaning(tmp_path, tiny_gpt2):
    from attnprog.engine.extract import model_probes

    model, tokenizer = tiny_gpt2
    path = tmp_path / "parts.py"
    path.write_text(PARTS_AND_MEANING)
    assert check_file(path, tokenizer=tokenizer, probes=model_probes(model, tokenizer)) == [
        ("program", "")]
    (_, reason), = check_file(path)  # the stand-in knows the probe text only
    assert "only tokenises the sentence being explained" in reason


def test_the_model_is_loaded_only_when_a_program_passes_the_static_check(tmp_path):
    loads = []

    def model():
        loads.append(1)
        return None, None

    bad, good = tmp_path / "bad.py", tmp_path / "good.py"
    bad.write_text("import os\n\ndef program(s):\n    return os.getcwd()\n")
    good.write_text(NATIVE)
    (_, reason), = check_file(bad, model=model)
    assert "os" in reason and loads == []
    assert check_file(good, model=model) == [("program", "")] and loads == [1]


def test_check_file_refuses_an_entry_point_the_file_lacks(tmp_path):
    path = tmp_path / "one.py"
    path.write_text("import numpy as np\n\ndef program(s):\n    return np.eye(s.n)\n")
    with pytest.raises(ProgramError, match="has no top-level function 'nosuch'.*--name program"):
        check_file(path, name="nosuch")
