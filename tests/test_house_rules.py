"""House rules the whole package keeps (issue 18)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attnprog"
MAX_FUNCTION_LINES = 60


def test_no_function_is_over_60_lines_outside_triton_kernels():
    """Counted from the ``def`` line (decorators excluded) to the last line."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "kernels") in path.parents:  # Triton kernel bodies are exempt
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    where = path.relative_to(PACKAGE.parent)
                    offenders.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    assert not offenders, (f"functions over {MAX_FUNCTION_LINES} lines:\n  "
                           + "\n  ".join(offenders))
