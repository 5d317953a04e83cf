"""Reading programs out of LLM replies.

A reply holds zero or more fenced code blocks; each block is one hypothesis. A reply with
no fence but code-looking lines (``def``/``import`` at the start of a line) is read as one
block. A fence left open at the end of a reply cut off by the token limit is kept, marked
truncated, so the re-prompt can say so. What is wrong with a block is reported in words
the LLM can act on; nothing here runs the code.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from attnprog.synth.policy import entry_point

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+-]*)[^\n]*$", re.MULTILINE)
_CODE_LANGS = {"", "python", "py", "python3", "numpy"}
_CODE_START = re.compile(r"^(def |import |from \w+ import )", re.MULTILINE)


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block's code; ``closed`` is False when the reply ended inside it."""

    code: str
    closed: bool = True


@dataclass(frozen=True)
class ParsedProgram:
    """A hypothesis read from a reply: its source and function name, or why it is unusable."""

    source: str
    name: str = "program"
    problem: str = ""  # "" when the block looks like a program; else what to fix


def code_blocks(reply: str) -> list[CodeBlock]:
    """The Python code blocks of ``reply`` in order (non-Python fences skipped)."""
    blocks, position = [], 0
    while True:
        opening = _FENCE.search(reply, position)
        if opening is None:
            break
        fence, lang = opening.group(1), opening.group(2).lower()
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.MULTILINE)
        end = closing.search(reply, opening.end())
        body = reply[opening.end() + 1 : end.start() if end else len(reply)]
        if lang in _CODE_LANGS:
            blocks.append(CodeBlock(_dedent(body), closed=end is not None))
        if end is None:
            break
        position = end.end()
    if not blocks and not _FENCE.search(reply):
        start = _CODE_START.search(reply)
        if start:
            blocks.append(CodeBlock(_dedent(reply[start.start():])))
    return blocks


def parse_reply(reply: str, truncated: bool = False, max_tokens: int = 0) -> list[ParsedProgram]:
    """One :class:`ParsedProgram` per code block; a single failed entry when there is no code.

    ``truncated``: the endpoint says the reply hit its token limit (``max_tokens``).
    """
    if not reply.strip():
        return [ParsedProgram("", problem="the reply was empty; answer with a Python program in a "
                                          "```python code block")]
    blocks = code_blocks(reply)
    if not blocks:
        why = "the reply held no Python code block"
        if truncated:
            why += f" before it was cut off at the token limit ({max_tokens} tokens)"
        return [ParsedProgram("", problem=f"{why}; answer with the program in a ```python code block")]
    return [_parse_block(block, truncated, max_tokens) for block in blocks]


def _parse_block(block: CodeBlock, truncated: bool, max_tokens: int) -> ParsedProgram:
    source = block.code.strip("\n") + "\n"
    if truncated and not block.closed:
        return ParsedProgram(source, problem=(
            f"the reply was cut off at the token limit ({max_tokens} tokens) before the program "
            "ended; write a shorter program"))
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        return ParsedProgram(source, problem=f"syntax error on line {err.lineno}: {err.msg}")
    except (ValueError, RecursionError, MemoryError) as err:
        return ParsedProgram(source, problem=f"the code cannot be parsed ({type(err).__name__})")
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    if not functions:
        return ParsedProgram(source, problem="the code block defines no function; write "
                                             "`def program(s):` returning an s.n x s.n matrix")
    # the contract's rule: `program` if defined, else the last function with a program's
    # signature (helpers come before it)
    return ParsedProgram(source, name=entry_point(source, "program") or functions[-1])


def _dedent(code: str) -> str:
    import textwrap

    return textwrap.dedent(code)
