"""The program contract: the Program record, the one normalisation every output gets, and
``validate()``, which checks a program's source and runs it on probe texts in the sandbox."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from attnprog.layout import tril_index


@dataclass(frozen=True)
class Program:
    """A candidate explanation: Python source defining ``name(s) -> np.ndarray``."""

    source: str
    name: str = "program"
    family: str = "custom"
    provenance: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def hash(self) -> str:
        """Content hash of source and function name (first 16 hex digits of sha256)."""
        digest = hashlib.sha256(f"{self.name}\n{self.source}".encode())
        return digest.hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "name": self.name,
            "family": self.family,
            "provenance": dict(self.provenance),
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, record: dict) -> Program:
        return cls(
            source=record["source"],
            name=record.get("name", "program"),
            family=record.get("family", "custom"),
            provenance=dict(record.get("provenance", {})),
        )


def normalise(matrix: np.ndarray) -> np.ndarray:
    """Clip negatives, apply the causal mask, divide rows by their sum; empty rows -> one-hot on 0.

    The caller has already checked shape and finiteness. Returns float64 n x n.
    """
    out = np.tril(np.clip(np.asarray(matrix, dtype=np.float64), 0.0, None))
    row_sums = out.sum(axis=1, keepdims=True)
    empty = row_sums[:, 0] <= 0.0
    out[empty, 0] = 1.0
    row_sums[empty] = 1.0
    return out / row_sums


def normalise_packed(matrix: np.ndarray) -> np.ndarray:
    """``pack(normalise(matrix))`` computed on the lower triangle only (the sandbox's hot path).

    Same rule, float64 [n(n+1)/2]; equal to the dense form up to float rounding.
    """
    n = matrix.shape[-1]
    rows, cols = tril_index(n)
    cells = np.asarray(matrix[rows, cols], dtype=np.float64)
    np.maximum(cells, 0.0, out=cells)
    starts = _row_starts(n)
    sums = np.add.reduceat(cells, starts) if n else np.zeros(0)
    empty = sums <= 0.0
    if empty.any():
        cells[starts[empty]] = 1.0  # the first cell of each row is column 0
        sums[empty] = 1.0
    cells /= sums[rows]
    return cells


@lru_cache(maxsize=64)
def _row_starts(n: int) -> np.ndarray:
    """Index of each row's first cell in the packed triangle."""
    index = np.arange(n)
    starts = index * (index + 1) // 2
    starts.setflags(write=False)
    return starts


def save_pool(programs, path) -> None:
    """Write programs as JSON lines, one ``Program.to_dict()`` per line."""
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for program in programs:
            handle.write(json.dumps(program.to_dict()) + "\n")


def load_pool(path) -> list[Program]:
    """Read a program pool written by :func:`save_pool` (JSON lines)."""
    import json
    from pathlib import Path

    from attnprog.errors import ProgramError

    path = Path(path)
    if not path.is_file():
        raise ProgramError(f"no program pool at {path}: write one with `attnprog generate`")
    programs = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                programs.append(Program.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as err:
                raise ProgramError(f"{path}:{line_no} is not a program record ({err})") from err
    if not programs:
        raise ProgramError(f"{path} holds no programs")
    return programs


# --- validation -------------------------------------------------------------------------------
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
_ROW_SUM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ValidationResult:
    """Whether a program passed validation, and if not, why (in words an LLM can act on)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


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
    entry = _entry_node(tree, program.name)
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
    node = _entry_node(tree, name)
    return node.name if node is not None else None


def _entry_node(tree: ast.Module, name: str):
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


def check_file(path, name: str | None = None, unsafe: bool = False) -> list[tuple[str, str]]:
    """Validate the programs of a file: one program (entry point ``name`` or inferred), or
    a library in the paper's layout (many ``f(sentence, tokenizer)`` beside helpers).
    Returns (entry point, "" or the escaped reason) per program."""
    import os

    from attnprog.errors import ProgramError
    from attnprog.synth.runtime.execute import escape
    from attnprog.synth.runtime.paper_form import library_programs, read_source

    source = read_source(path)
    library = library_programs(source, str(path)) if name is None else []
    if len(library) > 1:
        programs = library
    else:
        entry = entry_point(source, name or "program")
        if entry is None:
            raise ProgramError(f"{path}: no program function found; define `def program(s)`")
        programs = [Program(source=source, name=entry, family="custom")]
    if unsafe:
        os.environ["ATTNPROG_UNSAFE_SANDBOX"] = "1"
    results = validate_many(programs)
    return [(p.name, escape(r.reason)) for p, r in zip(programs, results, strict=True)]


def validate(program: Program, probes=None, sandbox=None) -> ValidationResult:
    """Check ``program``'s source, then run it in the sandbox on three probe texts.

    It passes when the source is well-formed and every probe gives a finite n x n matrix
    whose normalised rows sum to 1. ``sandbox``: an open Sandbox to reuse.
    """
    return validate_many([program], probes=probes, sandbox=sandbox)[0]


def validate_many(programs: Sequence[Program], probes=None, sandbox=None) -> list[ValidationResult]:
    """:func:`validate` for many programs with one sandbox run."""
    from attnprog.layout import unpack
    from attnprog.synth.features import probe_sentences
    from attnprog.synth.runtime.sandbox import Sandbox

    probes = list(probes) if probes is not None else probe_sentences()
    results: list[ValidationResult | None] = [None] * len(programs)
    to_run = []
    for i, program in enumerate(programs):
        problem = check_source(program)
        if problem:
            results[i] = ValidationResult(False, problem)
        else:
            to_run.append(i)
    if to_run:
        runs = _run_probes([programs[i] for i in to_run], probes, sandbox, Sandbox)
        for i, run in zip(to_run, runs, strict=True):
            results[i] = _judge_probe_run(run, probes, unpack)
    return results


def _run_probes(programs, probes, sandbox, sandbox_class):
    if sandbox is not None:
        return sandbox.run(programs, probes, progress=False)
    from attnprog.synth.runtime.sandbox import uses_spacy

    workers = 1 if len(programs) < 8 else None
    with sandbox_class(workers, progress=False, spacy=uses_spacy(programs)) as box:
        return box.run(programs, probes)


def _judge_probe_run(run, probes, unpack) -> ValidationResult:
    if run.failed.any():
        first = int(np.argmax(run.failed))
        reason = (run.reason or "failed").removesuffix(f" on text {first}")
        return ValidationResult(False, f"on probe text {first} ({probes[first].text!r}): {reason}")
    start = 0
    for s in probes:
        cells = run.values[start : start + s.n * (s.n + 1) // 2]
        start += len(cells)
        if not np.allclose(unpack(cells, s.n).sum(axis=1), 1.0, atol=_ROW_SUM_TOLERANCE):
            return ValidationResult(False, "rows do not sum to 1 after normalisation")
    return ValidationResult(True)
