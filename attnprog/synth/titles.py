"""A program's name for people: a few words (at most ``TITLE_MAX`` characters) that say what
it does, shown wherever a program is shown. The hash stays its identifier, never its name.

- a title set by hand (``provenance["title"]``) wins;
- fitted programs: the first-token share, then their terms, e.g.
  "first token 86 % · previous token · ' the'" (terms in the order given, e.g. ranked by the
  IoU the program loses without each; else in the fit's order, strongest weight first);
- generator programs: each primitive with its settings and share,
  e.g. "40 % previous k=2 · 30 % recency rate=0.8 · 30 % punctuation";
- paper-form programs: the label they return ("Repeated Token Pattern");
- LLM, golden and hand-written programs: the heading or first sentence of their docstring, else
  the entry point's name in words.

``Program.name`` is the entry point's function name (part of the hash); this module never
changes it.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

from attnprog.synth.fitted import term_label
from attnprog.synth.program import Program

TITLE_MAX = 60
SEPARATOR = " · "
SHARE_SHOWN = 0.05  # a fitted program's first-token share is named from 5 % of every row
MIN_PART = 16  # a part that does not fit is cut to the room left when at least this much is left


def shorten(text: str, limit: int = TITLE_MAX) -> str:
    """``text`` on one line, cut at a word boundary with "…" when longer than ``limit``."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:·-") + "…"


def join_parts(parts: Sequence[str], limit: int = TITLE_MAX) -> str:
    """``parts`` joined by " · ", as many as fit in ``limit`` characters; the first that does
    not is cut to the room left (or shown as "…" when little is left)."""
    parts = list(dict.fromkeys(" ".join(p.split()) for p in parts if p and p.strip()))  # no repeats
    if not parts:
        return ""
    title = shorten(parts[0], limit)
    for k, part in enumerate(parts[1:], 1):
        more = k < len(parts) - 1  # leave room for " · …" while parts remain after this one
        room = limit - len(title) - len(SEPARATOR)
        if len(part) + (len(SEPARATOR) + 1 if more else 0) > room:
            # the part cut to the room left when that still says something, else "…"
            return title + SEPARATOR + (shorten(part, room) if room >= MIN_PART else "…")
        title += SEPARATOR + part
    return title


def fit_title(fit: dict, ranked_terms: Sequence[str] | None = None) -> str:
    """A fitted program's name from its fit ``{"share", "weights"}``: the first-token share
    when it is at least 5 %, then the terms ``ranked_terms`` (default: every term, in order)."""
    weights = fit.get("weights", {})
    names = list(weights) if ranked_terms is None else [n for n in ranked_terms if n in weights]
    share = float(fit.get("share", 0.0))
    parts = [f"first token {100 * share:.0f} %"] if share >= SHARE_SHOWN else []
    if parts:  # more weight on the first token says what the share says
        names = [name for name in names if not (name == "first" and weights[name] > 0)]
    parts += [term_label(name, weights[name]) for name in names]
    return join_parts(parts) if parts else "uniform over the tokens so far"


def spec_title(spec: dict) -> str:
    """A generator program's name: each primitive with its settings (and its share of the
    mixture when there are several)."""
    terms = spec.get("terms", [])
    total = sum(float(t.get("weight", 1.0)) for t in terms) or 1.0
    parts = []
    for t in terms:
        settings = " ".join(str(v) if isinstance(v, str) else f"{k}={v}"
                            for k, v in t.get("args", {}).items())
        part = " ".join(filter(None, [str(t.get("prim", "?")).replace("_", " "), settings]))
        part += f" (else {t['fallback']})" if t.get("fallback") else ""
        share = 100 * float(t.get("weight", 1.0)) / total
        parts.append(f"{share:.0f} % {part}" if len(terms) > 1 else part)
    return join_parts(parts) or "empty mixture"


def _entry(source: str, name: str) -> ast.FunctionDef | None:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    named = [n for n in functions if n.name == name]
    return named[-1] if named else (functions[-1] if functions else None)


def returned_label(source: str, name: str) -> str | None:
    """The label a paper-form program returns with its matrix (``return "Label", m``)."""
    entry = _entry(source, name)
    for node in ast.walk(entry) if entry is not None else ():
        if (isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple)
                and node.value.elts and isinstance(node.value.elts[0], ast.Constant)
                and isinstance(node.value.elts[0].value, str) and node.value.elts[0].value.strip()):
            return node.value.elts[0].value
    return None


def docstring_title(source: str, name: str) -> str | None:
    """The heading ("First-token head: ...") or first sentence of the entry point's docstring."""
    entry = _entry(source, name)
    doc = ast.get_docstring(entry) if entry is not None else None
    if not doc or not doc.strip():
        return None
    first = " ".join(doc.strip().split("\n\n")[0].split())
    first = first.removeprefix("Paper form.").strip() or first
    heading, colon, _ = first.partition(": ")
    if colon and 3 <= len(heading) <= TITLE_MAX:
        return heading
    sentence = first.split(". ")[0].rstrip(".")
    return shorten(sentence)


def program_title(program: Program, ranked_terms: Sequence[str] | None = None) -> str:
    """What ``program`` does, in at most ``TITLE_MAX`` characters (see the module's rules);
    ``ranked_terms``: a fitted program's terms in the order to name them."""
    provenance = program.provenance or {}
    title = provenance.get("title")
    if isinstance(title, str) and title.strip():
        return shorten(title)
    if program.family == "fitted" and isinstance(provenance.get("fit"), dict):
        return fit_title(provenance["fit"], ranked_terms)
    if isinstance(provenance.get("spec"), dict):
        return spec_title(provenance["spec"])
    label = returned_label(program.source, program.name) or docstring_title(program.source, program.name)
    if label:
        return shorten(label)
    words = program.name.replace("_", " ").strip()
    return shorten(words if words and words != "program" else f"{program.family} program")
