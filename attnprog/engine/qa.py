"""Multiple-choice QA: read questions (attnprog, HellaSwag, PIQA or ARC fields), tokenise each
choice after its context, and score a choice by the mean log-prob of its tokens."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnprog.errors import CorpusError

QA_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "qa_sample.jsonl"


@dataclass
class QAItem:
    """One question: the context, its candidate completions, the index of the right one."""

    context: str
    choices: list[str]
    label: int


def _join(context: str, choice: str) -> str:
    """Context and choice as one text: a space between them unless one side has whitespace."""
    if not context or context[-1].isspace() or choice[:1].isspace():
        return context + choice
    return context + " " + choice


def _item_from_record(record: dict) -> QAItem:
    """Map generic, HellaSwag, PIQA and ARC field names to a QAItem."""
    if "choices" in record and "context" in record:  # attnprog's own format
        choices = [str(c) for c in record["choices"]]
        return QAItem(str(record["context"]), choices, int(record["label"]))
    if "endings" in record:  # HellaSwag
        context = record.get("ctx") or (record["ctx_a"] + " " + record.get("ctx_b", "")).strip()
        return QAItem(context, [str(e) for e in record["endings"]], int(record["label"]))
    if "goal" in record and "sol1" in record:  # PIQA
        return QAItem(record["goal"], [record["sol1"], record["sol2"]], int(record["label"]))
    if "answerKey" in record:  # ARC: {"question": {"stem", "choices": [{text, label}]}} or flat
        question = record["question"]
        if isinstance(question, dict):
            stem = question["stem"]
            texts = [c["text"] for c in question["choices"]]
            labels = [c["label"] for c in question["choices"]]
        else:
            stem, texts, labels = question, record["choices"]["text"], record["choices"]["label"]
        return QAItem(f"Question: {stem}\nAnswer:", [str(t) for t in texts],
                      labels.index(record["answerKey"]))
    raise KeyError(
        "no known fields (context/choices/label, ctx/endings, goal/sol1/sol2, answerKey)"
    )


def load_qa(path: str | Path | None = None) -> list[QAItem]:
    """Read a JSONL of questions (attnprog, HellaSwag, PIQA or ARC fields).

    ``path=None`` reads the built-in sample.
    """
    if path is None:
        text = QA_SAMPLE.read_text(encoding="utf-8")
        name = "built-in QA sample"
    else:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"no QA file at {path}")
        text, name = path.read_text(encoding="utf-8"), str(path)
    items = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = _item_from_record(json.loads(line))
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise CorpusError(
                f"{name}:{line_no} is not a QA record ({type(err).__name__}: {err}); expected "
                '{"context": str, "choices": [str, ...], "label": int}'
            ) from err
        if len(item.choices) < 2 or not 0 <= item.label < len(item.choices):
            raise CorpusError(
                f"{name}:{line_no}: needs >= 2 choices and a label indexing one of them"
            )
        items.append(item)
    if not items:
        raise CorpusError(f"{name} holds no questions")
    return items


@dataclass
class QAText:
    """One (question, choice) pair tokenised: ids, the Sentence programs see, completion start."""

    question: int
    choice: int
    ids: list[int]
    sentence: object
    completion_start: int  # first token whose text reaches into the choice


def tokenise_qa(items: Sequence[QAItem], tokenizer, max_tokens: int = 512) -> list[QAText]:
    """Every choice appended to its context, tokenised once with character offsets.

    A pair longer than ``max_tokens`` loses tokens from the start of its context, never
    from its completion.
    """
    from attnprog.synth.features import sentence_from_ids

    fast = bool(getattr(tokenizer, "is_fast", False))  # slow tokenizers: spans are aligned
    pieces: dict[int, str] = {}  # decoded pieces, shared by all pairs
    pairs = []
    for q, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            text = _join(item.context, choice)
            encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=fast)
            ids = list(encoded["input_ids"])[-max_tokens:]
            spans = encoded["offset_mapping"][-len(ids):] if fast else None
            sentence = sentence_from_ids(text, ids, tokenizer, offsets=spans, pieces=pieces)
            boundary = len(text) - len(choice)
            # completion = tokens ending inside the choice; position 0 is never predicted
            start = next(
                (t for t, (_, end) in enumerate(sentence.offsets) if end > boundary), len(ids)
            )
            pairs.append(QAText(q, c, ids, sentence, max(start, 1)))
    return pairs


def qa_predictions(items: Sequence[QAItem], pairs: Sequence[QAText], logprobs) -> np.ndarray:
    """argmax over choices of the mean completion log-prob; [questions] int."""
    scores = [np.full(len(item.choices), -np.inf) for item in items]
    for pair, logp in zip(pairs, logprobs, strict=True):
        completion = logp[pair.completion_start - 1 :]  # logp[t-1] scores token t
        if len(completion):
            scores[pair.question][pair.choice] = float(completion.mean())
    return np.array([int(np.argmax(s)) for s in scores])


def qa_accuracy(items: Sequence[QAItem], predictions: np.ndarray) -> float:
    return float(np.mean([p == item.label for p, item in zip(predictions, items, strict=True)]))
