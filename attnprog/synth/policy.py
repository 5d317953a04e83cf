"""The static check of untrusted program source: allowed imports, forbidden calls and
attributes, the entry point and its signature. Runs before any program reaches the sandbox."""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence

from attnprog.synth.program import Program

ALLOWED_IMPORTS = frozenset(
    {"numpy", "math", "re", "string", "collections", "itertools", "functools"}
    | {"typing", "__future__"}  # harmless, and LLM-written code often has them
)
_OPTIONAL_IMPORTS = ("spacy", "scipy", "sklearn")  # allowed where installed
_FORBIDDEN_CALLS = {
    "open": "programs may not read or write files; compute from the Sentence instead",
    "eval": "eval() is not allowed; write the computation as code",
    "exec": "exec() is not allowed; write the computation as code",
    "compile": "compile() is not allowed; write the computation as code",
    "__import__": "__import__() is not allowed; use a plain import of an allowed module",
    "globals": "globals() is not allowed",
    "vars": "vars() is not allowed",
    "input": "input() is not allowed; programs get everything from their argument",
    "breakpoint": "breakpoint() is not allowed",
}
# Attributes that reach files or the system from allowed modules (np.save, arr.tofile,
# np.ctypeslib, a module's `os`); the sandbox's audit hook refuses the calls anyway, this
# says so before a run.
_FORBIDDEN_ATTRIBUTES = {
    **dict.fromkeys(
        ("save", "savez", "savez_compressed", "savetxt", "tofile", "dump", "memmap",
         "open_memmap", "fromfile", "loadtxt", "genfromtxt", "fromregex", "DataSource"),
        "programs may not read or write files; compute from the Sentence instead",
    ),
    **dict.fromkeys(
        ("os", "sys", "subprocess", "builtins", "ctypes", "ctypeslib", "socket"),
        "programs may not reach the system; use only numpy and the Sentence",
    ),
}
_NUMPY_ONLY_ATTRIBUTES = {"load"}  # np.load reads files; spacy.load is fine
_ATTRIBUTE_CALLS = ("getattr", "setattr", "delattr", "hasattr")


def allowed_imports() -> frozenset[str]:
    """Top-level modules a program may import (spaCy only when it is installed;
    ``transformers`` only as ``from transformers import <type names>``)."""
    installed = {m for m in _OPTIONAL_IMPORTS if importlib.util.find_spec(m) is not None}
    return ALLOWED_IMPORTS | {"transformers"} | installed


def check_source(program: Program, extra_imports: Sequence[str] = ()) -> str:
    """Static checks on the source; returns "" when it passes, else what to fix.
    ``extra_imports``: helper modules supplied with the programs, which they may import."""
    try:
        tree = ast.parse(program.source)
    except SyntaxError as err:
        return f"syntax error on line {err.lineno}: {err.msg}; fix the Python syntax"
    except (ValueError, RecursionError, MemoryError) as err:
        return f"the source cannot be parsed ({type(err).__name__}); simplify it"
    entry = entry_node(tree, program.name)
    for problem in (
        _check_top_level(tree, entry, program.name),
        _check_signature(entry) if entry is not None else "",
        _check_nodes(tree, frozenset(extra_imports)),
    ):
        if problem:
            return problem
    return ""


def entry_point(source: str, name: str) -> str | None:
    """The name of the program's entry point: the top-level function ``name``, else the
    last top-level function that takes a Sentence or (sentence, tokenizer); helpers come
    before it. None when there is none (or the source does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    node = entry_node(tree, name)
    return node.name if node is not None else None


def entry_node(tree: ast.Module, name: str):
    """The entry point's FunctionDef (see :func:`entry_point`); None when there is none."""
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    for function in functions:
        if function.name == name:
            return function
    fitting = [f for f in functions if not _check_signature(f)]
    return fitting[-1] if fitting else None


def _check_top_level(tree: ast.Module, entry, name: str) -> str:
    if entry is None:
        return (
            f"define the program as a top-level function `def {name}(s)` (s is a Sentence) "
            f"or the paper's form `def {name}(sentence: str, tokenizer)`"
        )
    for node in tree.body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign,
                   ast.AnnAssign)
        if not (is_docstring or isinstance(node, allowed)):
            return (
                f"line {node.lineno}: only imports, constants, classes and functions may appear "
                "at top level; move this code into a function"
            )
    return ""


def _check_signature(function: ast.FunctionDef) -> str:
    args = function.args
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    if required in (1, 2) or (required == 0 and positional >= 1):
        return ""
    return (
        f"`{function.name}` takes {required} required arguments; write `def {function.name}(s)` "
        f"(s is a Sentence) or the paper's form `def {function.name}(sentence: str, tokenizer)`"
    )


def _check_nodes(tree: ast.Module, extra_imports: frozenset[str] = frozenset()) -> str:
    allowed = allowed_imports() | extra_imports
    numpy_names = _numpy_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            if "transformers" in names and not _imports_type_names(node):
                return (
                    f"line {node.lineno}: use transformers only for type names "
                    "(`from transformers import PreTrainedTokenizerBase`); the tokenizer "
                    "is passed to the program"
                )
            for module in names:
                root = (module or "").split(".")[0]
                if root in _OPTIONAL_IMPORTS and root not in allowed:
                    return f"line {node.lineno}: `{root}` is not installed here; install it or avoid it"
                if _relative_level(node) or root not in allowed:
                    return (
                        f"line {node.lineno}: import of `{module or '.'}` is not allowed; "
                        f"use only {', '.join(sorted(allowed - {'__future__'}))}"
                    )
            if isinstance(node, ast.ImportFrom):  # from numpy import save, ctypeslib
                for alias in node.names:
                    problem = _check_attribute(alias.name, ast.Name(node.module or ""), {"numpy"})
                    if problem:
                        return f"line {node.lineno}: {problem}"
        elif isinstance(node, ast.Attribute):
            problem = _check_attribute(node.attr, node.value, numpy_names)
            if problem:
                return f"line {node.lineno}: {problem}"
        elif isinstance(node, ast.Name) and node.id in ("__builtins__", "__loader__", "__spec__"):
            return f"line {node.lineno}: `{node.id}` is not allowed"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            why = _FORBIDDEN_CALLS.get(node.func.id)
            if node.func.id in _ATTRIBUTE_CALLS and len(node.args) >= 2:
                name = node.args[1]
                if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                    why = f"{node.func.id}() needs a literal attribute name; write `obj.name`"
                else:
                    why = _check_attribute(name.value, node.args[0], numpy_names)
            if why:
                return f"line {node.lineno}: {why}"
    return ""


def _imports_type_names(node) -> bool:
    """``from transformers import PreTrainedTokenizerBase, ...`` (classes, no loaders)."""
    return isinstance(node, ast.ImportFrom) and node.module == "transformers" and all(
        alias.name[:1].isupper() and not alias.name.startswith("Auto") for alias in node.names
    )


def _numpy_names(tree: ast.Module) -> set[str]:
    """Names the source binds to the numpy module (``np`` always: programs get it)."""
    names = {"np", "numpy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == "numpy"}
    return names


def _check_attribute(attr: str, owner: ast.AST, numpy_names: set[str]) -> str:
    """What is wrong with reading ``owner.attr``; "" when nothing."""
    if _is_dunder(attr):
        return f"`{attr}` is not allowed; use plain attributes"
    why = _FORBIDDEN_ATTRIBUTES.get(attr)
    if why is None and attr in _NUMPY_ONLY_ATTRIBUTES:
        if isinstance(owner, ast.Name) and owner.id in numpy_names:
            why = "programs may not read or write files; compute from the Sentence instead"
    return f"`.{attr}`: {why}" if why else ""


def _relative_level(node: ast.AST) -> int:
    """Relative-import level (``from . import x`` is 1); 0 for absolute imports."""
    return getattr(node, "level", 0) or 0


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")
