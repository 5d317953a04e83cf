"""Reading programs out of replies: fenced blocks, bare code, truncation, empty and non-code replies."""

from attnprog.synth.llm.parsing import code_blocks, parse_reply

NATIVE = "import numpy as np\n\ndef program(s):\n    return np.eye(s.n)\n"


def fenced(code: str, lang: str = "python") -> str:
    return f"```{lang}\n{code}```\n"


def test_each_fenced_block_is_one_hypothesis():
    reply = "Hypothesis 1: self.\n" + fenced(NATIVE) + "Hypothesis 2: sink.\n" + fenced(
        "def sink(s):\n    m = np.zeros((s.n, s.n))\n    m[:, 0] = 1\n    return m\n", "")
    parsed = parse_reply(reply)
    assert [p.name for p in parsed] == ["program", "sink"] and not any(p.problem for p in parsed)
    assert parsed[0].source == NATIVE


def test_non_python_fences_are_skipped():
    reply = fenced("pip install numpy\n", "bash") + fenced(NATIVE, "py")
    assert [b.code for b in code_blocks(reply)] == [NATIVE]


def test_indented_code_in_a_fence_is_dedented():
    reply = "```python\n    def program(s):\n        return np.eye(s.n)\n    ```"
    assert parse_reply(reply)[0].source.startswith("def program(s):")


def test_a_reply_of_bare_code_is_read_as_one_block():
    parsed = parse_reply("Sure:\n" + NATIVE)
    assert len(parsed) == 1 and parsed[0].source.startswith("import numpy") and not parsed[0].problem


def test_the_paper_form_keeps_its_function_name():
    source = "def previous_pattern(sentence: str, tokenizer):\n    return 'x', None\n"
    assert parse_reply(fenced(source))[0].name == "previous_pattern"


def test_an_empty_reply_is_a_failed_candidate():
    (parsed,) = parse_reply("   \n")
    assert parsed.problem.startswith("the reply was empty")


def test_a_reply_without_code_is_a_failed_candidate():
    (parsed,) = parse_reply("This head attends to the previous token.")
    assert "no Python code block" in parsed.problem


def test_a_reply_cut_off_inside_a_block_says_so():
    reply = "```python\ndef program(s):\n    m = np.zeros((s.n,"
    (parsed,) = parse_reply(reply, truncated=True, max_tokens=64)
    assert "cut off at the token limit (64 tokens)" in parsed.problem and "shorter" in parsed.problem


def test_a_cut_off_reply_keeps_its_finished_blocks():
    reply = fenced(NATIVE) + "```python\ndef program(s):\n    return np.ones("
    first, second = parse_reply(reply, truncated=True, max_tokens=64)
    assert not first.problem and "cut off" in second.problem


def test_a_syntax_error_is_reported_with_its_line():
    (parsed,) = parse_reply(fenced("def program(s):\n    return (\n\nx = 1\n"))
    assert parsed.problem.startswith("syntax error on line")


def test_a_block_without_a_function_is_reported():
    (parsed,) = parse_reply(fenced("x = np.eye(3)\n"))
    assert "defines no function" in parsed.problem


def test_two_functions_parse_and_are_left_to_validation():
    source = "def helper(i):\n    return i\n\ndef program(s):\n    return np.eye(s.n)\n"
    (parsed,) = parse_reply(fenced(source))
    assert not parsed.problem and parsed.name == "helper"
