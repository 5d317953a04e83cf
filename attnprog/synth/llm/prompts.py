"""The messages sent to the LLM: synthesis, repair after a failed validation, refinement.

The system message states the program contract. The ``Sentence`` interface is read from
the class itself (its fields, and the first docstring line of each public property and
method), so a feature added to ``attnprog.synth.features`` shows up in prompts unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect

from attnprog.synth.features import Sentence
from attnprog.synth.policy import allowed_imports

EXAMPLE_FAMILIES = ("previous", "first", "punctuation")  # golden programs shown as examples
_SKIP = {"copy", "warm_features", "from_text"}
# fields and properties without a docstring of their own; anything else new shows its type
_NOTES = {
    "text": "the text", "ids": "token ids", "tokens": "decoded piece of each token (leading space kept)",
    "offsets": "(start, end) character span of each token in s.text",
    "word_ids": "index of the whitespace-separated word each token belongs to",
    "pos": "POS tag per token, from parsing the text up to that token (None without spaCy)",
    "dep_head": "token index of each token's syntactic head if it is an earlier token, else "
                "the token itself (None without spaCy)",
    "dependents": "per token, the earlier tokens whose syntactic head it is (None without spaCy)",
    "syntax_mode": "how pos and the arcs were made ('causal': from the text up to each token)",
    "n": "number of tokens",
    "token_similarity": "[n, n] cosine of the tokens' input embeddings (read it with "
                        "s.embedding_similarity)",
}


def describe_sentence() -> str:
    """One line per public field, property and method of ``Sentence``, from its docstrings."""
    lines = []
    for f in dataclasses.fields(Sentence):
        if not f.name.startswith("_"):
            note = _NOTES.get(f.name)
            lines.append(f"- s.{f.name}: {_annotation(f.type)}" + (f", {note}" if note else ""))
    for name, member in vars(Sentence).items():
        if name.startswith("_") or name in _SKIP or any(f.name == name for f in dataclasses.fields(Sentence)):
            continue
        if isinstance(member, property):
            lines.append(f"- s.{name}: {_first_line(member.fget) or _NOTES.get(name, '')}")
        elif inspect.isfunction(member):
            signature = str(inspect.signature(member)).replace("self, ", "").replace("(self)", "()")
            lines.append(f"- s.{name}{signature}: {_first_line(member)}")
    return "\n".join(lines)


def _annotation(annotation) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _first_line(function) -> str:
    doc = inspect.getdoc(function) or ""
    return " ".join(doc.split("\n\n")[0].split())


def system_message() -> str:
    """The contract every program must follow."""
    modules = ", ".join(sorted(allowed_imports() - {"__future__", "typing"}))
    return f"""You write Python programs that predict the attention pattern of one attention head \
of a transformer language model from the text alone.

A program is a function `def program(s):` that takes a Sentence `s` (one \
tokenised text, exactly as the model saw it) and returns a numpy array of shape (s.n, s.n): \
row i is how much token i attends to each token j <= i. The output is normalised for you: \
negatives become 0, entries above the diagonal are dropped, each row is divided by its sum, \
and an all-zero row attends to token 0. Any non-negative scores work.

Rules: the entry point is `def program(s):` (small helpers may sit beside it); import only {modules}; \
`np` is numpy; no files, network, subprocesses, eval or exec; it must run in well under a \
second on 256 tokens.

The Sentence `s` has:
{describe_sentence()}"""


def golden_examples(families=EXAMPLE_FAMILIES) -> str:
    """Two or three golden-library programs, as fenced examples."""
    from attnprog.synth.generator.golden import golden_programs

    chosen, seen = [], set()
    natives = [p for p in golden_programs() if p.provenance.get("form") == "native"]
    for family in families:
        for program in natives:
            if program.family == family and family not in seen:
                chosen.append(program)
                seen.add(family)
    chosen = chosen or natives[:3]
    return "\n\n".join(f"```python\n{p.source.strip()}\n```" for p in chosen)


def synthesis_messages(summary: str, n: int, head: str) -> list[dict]:
    """Ask for ``n`` distinct hypotheses about ``head``, each a program in its own code block."""
    user = f"""Examples of programs for well-known heads:

{golden_examples()}

Here is the attention of head {head} on some texts. Each line is one edge \
'query token'[i] -> 'key token'[j] (attention weight), grouped by weight:

{summary}

Write {n} distinct hypotheses about what this head does. For each, write one sentence \
saying the hypothesis, then the program in its own ```python code block."""
    return [{"role": "system", "content": system_message()}, {"role": "user", "content": user}]


def repair_messages(history: list[dict], reply: str, source: str, reason: str) -> list[dict]:
    """Continue a conversation: the program in ``reply`` failed with ``reason``; ask for a fix."""
    shown = f"\n\n```python\n{source.strip()}\n```" if source.strip() else ""
    user = (f"This program does not work:{shown}\n\nProblem: {reason}\n\nReply with the corrected "
            "program only, in one ```python code block.")
    return [*history, {"role": "assistant", "content": reply}, {"role": "user", "content": user}]


def refinement_messages(source: str, head: str, score: float, best: str, worst: str) -> list[dict]:
    """Ask for a minimal change to ``source``, showing where it fits ``head`` best and worst."""
    user = f"""This program explains attention head {head} with mean IoU {score:.3f} \
(1.0 is a perfect match):

```python
{source.strip()}
```

Where it fits best:
{best}

Where it fits worst:
{worst}

Make one small change to the program so that it predicts the head better, especially the \
under-predicted edges, without adding the over-predicted ones. Reply with the whole changed \
program in one ```python code block."""
    return [{"role": "system", "content": system_message()}, {"role": "user", "content": user}]
