"""The built-in offline generator: enumerate DSL mixtures, emit them as readable programs.

A candidate is a *spec*, a JSON-able list of weighted terms, each one primitive call from
:mod:`attnprog.synth.generator.primitives` with an optional fallback for rows with no target::

    {"terms": [{"prim": "induction", "args": {}, "fallback": "self", "weight": 0.75},
               {"prim": "first_token", "args": {}, "fallback": None, "weight": 0.25}]}

:func:`generate` enumerates specs from simple to rich, keeps those whose outputs on the
probe texts are new, and emits each as self-contained Python source in the native
contract. :func:`evaluate_generated` scores them without executing the sources.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import textwrap
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np

from attnprog.errors import ProgramError
from attnprog.synth.generator import primitives as dsl
from attnprog.synth.generator import probes
from attnprog.synth.generator.mixing import evaluate_specs
from attnprog.synth.program import Program

__all__ = [
    "evaluate_generated",
    "generate",
    "is_generated",
    "probe_sentences",
    "program_from_spec",
    "source_from_spec",
]

GENERATOR = "dsl"
probe_sentences = probes.probe_sentences  # re-exported: the default de-duplication texts
SINK_SHARES = (0.5, 0.25, 0.1)
PAIR_WEIGHTS = ((0.5, 0.5), (0.75, 0.25), (0.25, 0.75))
PAIR_WITH_SINK_WEIGHTS = ((0.4, 0.4, 0.2), (0.6, 0.2, 0.2), (0.2, 0.6, 0.2))
TRIPLE_WEIGHTS = (0.4, 0.3, 0.3)
# A sink-weighted recent context plus one sharp target: target shares, and the settings
# of sink_recency (sink size, decay) it is mixed with.
BACKGROUND_TARGETS = [("the_tokens", {}), ("previous", {"k": 1}), ("punctuation", {}), ("self_token", {})]
BACKGROUND_TARGET_SHARES = (0.1, 0.25, 0.5, 0.75)
BACKGROUND_THE_PAIR_SHARES = ((0.25, 0.1), (0.5, 0.1), (0.25, 0.25))  # "the" + a second target
BACKGROUND_SETTINGS = [{"sink": c, "rate": r} for c in (2, 4, 8, 16, 32, 64) for r in (0.5, 0.8, 0.9, 0.95)]

# Atoms mixed with each other in pairs and triples: one or two settings per primitive.
_MIX_POOL = [
    ("self_token", {}), ("second_token", {}), ("previous", {"k": 1}), ("previous", {"k": 2}),
    ("previous", {"k": 3}), ("recency", {"rate": 0.5}), ("recency", {"rate": 0.8}),
    ("recency", {"rate": 0.95}), ("uniform", {}), ("window", {"width": 3}),
    ("punctuation", {}), ("last_punctuation", {}), ("sentence_start", {}), ("same_token", {}),
    ("last_same_token", {}), ("induction", {}), ("last_induction", {}), ("same_word", {}),
    ("word_start", {}), ("current_word", {}), ("previous_word", {}),
    ("previous_word_end", {}), ("word_starts", {}), ("capitalised", {}),
    ("last_capitalised", {}), ("numbers", {}), ("quote_open", {}),
    ("pos_tag", {"tag": "NOUN"}), ("pos_tag", {"tag": "VERB"}), ("pos_tag", {"tag": "PROPN"}),
    ("same_pos", {}),
]  # fmt: skip


# ---------------------------------------------------------------------------------------
# Specs


def term(prim: str, args: dict | None = None, fallback: str | None = None, weight: float = 1.0):
    """One weighted primitive call; ``fallback`` names a row filler from ``dsl.FALLBACKS``."""
    return {"prim": prim, "args": dict(args or {}), "fallback": fallback, "weight": weight}


def check_spec(spec: dict) -> None:
    """Raise ProgramError unless ``spec`` names known primitives, arguments and fallbacks."""
    terms = spec.get("terms") if isinstance(spec, dict) else None
    if not terms:
        raise ProgramError(f"generator spec {spec!r} has no terms")
    for t in terms:
        if t.get("prim") not in dsl.PRIMITIVES:
            raise ProgramError(f"unknown DSL primitive {t.get('prim')!r}")
        expected = set(dsl.PRIMITIVES[t["prim"]].settings[0])
        if set(t.get("args", {})) != expected:
            raise ProgramError(f"{t['prim']} takes arguments {sorted(expected)}, got {t.get('args')!r}")
        if t.get("fallback") not in (None, *dsl.FALLBACKS):
            raise ProgramError(f"unknown fallback {t.get('fallback')!r}")
        if not float(t.get("weight", 1.0)) > 0.0:
            raise ProgramError(f"term weights must be positive, got {t.get('weight')!r}")


def _family(spec: dict) -> str:
    """Family tag: the terms' families, with a first-token share in a mixture called 'sink'."""
    names = []
    for t in spec["terms"]:
        family = dsl.PRIMITIVES[t["prim"]].family
        if family == "first" and len(spec["terms"]) > 1:
            family = "sink"
        names += [name for name in family.split("+") if name not in names]
    names.sort(key=lambda name: (name != "sink", name))  # canonical order, sink share first
    return "+".join(names)


# ---------------------------------------------------------------------------------------
# Source emission


def _call(prim: str, args: dict) -> str:
    order = list(dsl.PRIMITIVES[prim].settings[0])  # the signature's order, whatever the dict's
    arguments = "".join(f", {name}={args[name]!r}" for name in order)
    return f"{prim}(s{arguments})"


def _atom_expr(t: dict) -> str:
    expr = _call(t["prim"], t["args"])
    if t.get("fallback"):
        fb_prim, fb_args = dsl.FALLBACKS[t["fallback"]]
        expr = f"with_fallback({expr}, {_call(fb_prim, fb_args)})"
    return expr


def _describe(spec: dict) -> str:
    terms = spec["terms"]
    total = sum(float(t["weight"]) for t in terms)
    parts = []
    for t in terms:
        part = dsl.PRIMITIVES[t["prim"]].describe(t["args"])
        if t.get("fallback"):
            fb_prim, fb_args = dsl.FALLBACKS[t["fallback"]]
            part += f" (else {dsl.PRIMITIVES[fb_prim].describe(fb_args)})"
        if len(terms) > 1:
            part = f"{100 * float(t['weight']) / total:.0f}% to {part}"
        parts.append(part)
    if len(parts) == 1:
        return f"Attends to {parts[0]}."
    return "Attends " + ", ".join(parts[:-1]) + f" and {parts[-1]}."


def source_from_spec(spec: dict) -> str:
    """Readable, self-contained source ``def program(s) -> np.ndarray`` for ``spec``."""
    check_spec(spec)
    terms = spec["terms"]
    used: list[str] = []
    for t in terms:
        names = [t["prim"]]
        if t.get("fallback"):
            names.append(dsl.FALLBACKS[t["fallback"]][0])
        used += [name for name in names if name not in used]
    if any(t.get("fallback") for t in terms):
        used.append("with_fallback")
    if len(terms) > 1:
        used.append("rows")

    doc = textwrap.fill(_describe(spec), width=88, subsequent_indent="    ")
    lines = ["import numpy as np", "", "", "def program(s) -> np.ndarray:", f'    """{doc}"""']
    for name in used:
        lines += ["", textwrap.indent(dsl.source_of(name).rstrip(), "    ")]
    lines.append("")
    if len(terms) == 1:
        lines.append(f"    return {_atom_expr(terms[0])}")
    else:
        lines.append("    return (")
        for k, t in enumerate(terms):
            joiner = "        " if k == 0 else "        + "
            lines.append(f"{joiner}{float(t['weight'])!r} * rows({_atom_expr(t)})")
        lines.append("    )")
    return "\n".join(lines) + "\n"


def program_from_spec(spec: dict) -> Program:
    """The Program for a spec: emitted source, family tag and the spec as provenance."""
    spec = {"terms": [term(**t) for t in spec["terms"]]}
    return Program(
        source=source_from_spec(spec),
        name="program",
        family=_family(spec),
        provenance={"generator": GENERATOR, "spec": spec},
    )


# ---------------------------------------------------------------------------------------
# Enumeration


def _atoms() -> list[tuple[str, dict, str | None]]:
    """Every primitive setting, bare and with each fallback where rows can be empty."""
    atoms = []
    for name, primitive in dsl.PRIMITIVES.items():
        for args in primitive.settings:
            atoms.append((name, args, None))
    for name, primitive in dsl.PRIMITIVES.items():
        if not primitive.can_be_empty:
            continue
        for args in primitive.settings:
            for fallback, (fb_prim, fb_args) in dsl.FALLBACKS.items():
                if (fb_prim, fb_args) != (name, args):
                    atoms.append((name, args, fallback))
    return atoms


def _shuffled(items: Iterator, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def enumerate_specs() -> Iterator[dict]:
    """All candidate specs, simplest first (duplicates by output are removed later)."""
    atoms = _atoms()
    # 1. single atoms
    for prim, args, fallback in atoms:
        yield {"terms": [term(prim, args, fallback)]}
    # 2. a sink-weighted recent context with one sharp target
    for share in BACKGROUND_TARGET_SHARES:
        for prim, args in BACKGROUND_TARGETS:
            for background in BACKGROUND_SETTINGS:
                yield {
                    "terms": [
                        term("sink_recency", background, weight=1.0 - share),
                        term(prim, args, weight=share),
                    ]
                }
    # ... and with "the" tokens plus a second target
    for the_share, share in BACKGROUND_THE_PAIR_SHARES:
        for prim, args in BACKGROUND_TARGETS[1:]:
            for background in BACKGROUND_SETTINGS:
                yield {
                    "terms": [
                        term("sink_recency", background, weight=1.0 - the_share - share),
                        term("the_tokens", weight=the_share),
                        term(prim, args, weight=share),
                    ]
                }
    # 3. single atoms with a share on the first token (the attention sink)
    for share in SINK_SHARES:
        for prim, args, fallback in atoms:
            if prim != "first_token":
                yield {
                    "terms": [
                        term("first_token", weight=share),
                        term(prim, args, fallback, weight=1.0 - share),
                    ]
                }
    # 4. pairs of pool atoms, then the same pairs with a sink share
    pairs = list(itertools.combinations(_MIX_POOL, 2))
    for w_a, w_b in PAIR_WEIGHTS:
        for (a, a_args), (b, b_args) in pairs:
            yield {"terms": [term(a, a_args, weight=w_a), term(b, b_args, weight=w_b)]}
    for w_a, w_b, w_sink in PAIR_WITH_SINK_WEIGHTS:
        for (a, a_args), (b, b_args) in pairs:
            yield {
                "terms": [
                    term("first_token", weight=w_sink),
                    term(a, a_args, weight=w_a),
                    term(b, b_args, weight=w_b),
                ]
            }
    # 5. triples of pool atoms, in a fixed shuffled order so any prefix is varied
    for triple in _shuffled(itertools.combinations(_MIX_POOL, 3), seed=0):
        yield {"terms": [term(p, a, weight=w) for (p, a), w in zip(triple, TRIPLE_WEIGHTS, strict=True)]}
    # 6. pairs of any atoms, fallbacks included, equal shares
    for (a, a_args, a_fb), (b, b_args, b_fb) in _shuffled(itertools.combinations(atoms, 2), 1):
        yield {"terms": [term(a, a_args, a_fb, 0.5), term(b, b_args, b_fb, 0.5)]}


def _output_digests(outputs: np.ndarray) -> list[bytes]:
    """One digest per row of [P, C] outputs, rounded so float noise does not split duplicates."""
    quantised = np.round(outputs.astype(np.float64) * 1e5).astype(np.int32)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in quantised]


def generate(n_min: int | None = 5000, probe_sentences=None, batch: int = 2048) -> list[Program]:
    """The ``n_min`` simplest candidates with distinct outputs on the probe texts.

    ``n_min=None`` returns every distinct candidate. Deterministic; programs come in the
    order of :func:`enumerate_specs`. Raises ProgramError if fewer than ``n_min`` exist.
    """
    sentences = list(probe_sentences) if probe_sentences is not None else probes.probe_sentences()
    seen: set[bytes] = set()
    kept: list[dict] = []
    specs = enumerate_specs()
    while n_min is None or len(kept) < n_min:
        chunk = list(itertools.islice(specs, batch))
        if not chunk:
            break
        for spec, digest in zip(chunk, _output_digests(evaluate_specs(chunk, sentences)), strict=True):
            if digest not in seen:
                seen.add(digest)
                kept.append(spec)
    if n_min is not None:
        if len(kept) < n_min:
            raise ProgramError(
                f"the DSL yields only {len(kept)} distinct candidates; ask for at most that many"
            )
        kept = kept[:n_min]
    return [program_from_spec(spec) for spec in kept]


# ---------------------------------------------------------------------------------------
# Vectorised evaluation


def is_generated(program: Program) -> bool:
    """True when ``program`` is an unedited generator program (its source matches its spec)."""
    provenance = program.provenance or {}
    spec = provenance.get("spec")
    if provenance.get("generator") != GENERATOR or not isinstance(spec, dict):
        return False
    try:
        return _cached_source(json.dumps(spec, sort_keys=True)) == program.source
    except (ProgramError, KeyError, TypeError, ValueError, AttributeError):
        return False


@lru_cache(maxsize=32768)
def _cached_source(spec_json: str) -> str:
    """source_from_spec, memoised: pools are checked again on every evaluation."""
    return source_from_spec(json.loads(spec_json))


def evaluate_generated(programs: Sequence[Program], sentences: Sequence, cache=None) -> np.ndarray:
    """Normalised outputs of generator programs on ``sentences``, packed: [P, C] float32.

    Equal (to 1e-6) to running each program's source and normalising, without running it.
    ``cache``: a :class:`~attnprog.synth.generator.mixing.AtomCache` shared between calls.
    """
    specs = []
    for program in programs:
        if not is_generated(program):
            raise ProgramError(
                f"program {program.hash} is not an unedited generator program; "
                "evaluate it in the sandbox instead"
            )
        specs.append(program.provenance["spec"])
    return evaluate_specs(specs, sentences, cache)
