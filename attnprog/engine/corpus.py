"""Corpora: the built-in stories, text and JSONL files, Hugging Face data sets; tokenisation."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from attnprog.errors import CorpusError

SPLITS = ("synthesis", "selection", "heldout")
# share of texts in each split, assigned by a hash of the text so it never depends on order
SPLIT_FRACTIONS = (0.4, 0.3, 0.3)


@dataclass
class Corpus:
    """Texts with their split ('synthesis', 'selection' or 'heldout')."""

    texts: list[str]
    splits: list[str]
    name: str = "corpus"

    @property
    def hash(self) -> str:
        digest = hashlib.sha256()
        for text, split in zip(self.texts, self.splits):
            digest.update(f"{split}\x00{text}\x01".encode())
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, n: int) -> Corpus:
        """The first n texts."""
        return Corpus(self.texts[:n], self.splits[:n], f"{self.name}[:{n}]")

    def split(self, name: str) -> Corpus:
        """Only the texts of one split."""
        keep = [i for i, s in enumerate(self.splits) if s == name]
        return Corpus([self.texts[i] for i in keep], [name] * len(keep), f"{self.name}:{name}")


def assign_split(text: str, fractions=SPLIT_FRACTIONS) -> str:
    """Deterministic split of one text from its content."""
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if bucket < edge:
            return name
    return SPLITS[-1]


def make_corpus(texts, name: str = "corpus", dedupe: bool = True, min_chars: int = 1) -> Corpus:
    """A corpus from raw texts: whitespace trimmed, short ones dropped, duplicates removed."""
    cleaned, seen = [], set()
    for text in texts:
        text = " ".join(str(text).split())
        if len(text) < min_chars or (dedupe and text in seen):
            continue
        seen.add(text)
        cleaned.append(text)
    if not cleaned:
        raise CorpusError(f"corpus {name!r} has no texts (after removing empty and duplicate ones)")
    return Corpus(cleaned, [assign_split(t) for t in cleaned], name)


def builtin_corpus() -> Corpus:
    """The built-in corpus: original simple stories written for this project, one text each."""
    raw = resources.files("attnprog.data").joinpath("stories.txt").read_text(encoding="utf-8")
    return make_corpus(_paragraphs(raw), name="builtin-stories")


def _paragraphs(raw: str) -> list[str]:
    """Blank-line separated paragraphs when there are any, else one text per line."""
    if any(not line.strip() for line in raw.strip().splitlines()):
        return [p for p in (" ".join(b.split()) for b in raw.split("\n\n")) if p]
    return [line for line in raw.splitlines() if line.strip()]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist")
    if not path.is_file():
        raise CorpusError(f"corpus path {path} is not a file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path} is not UTF-8 text (byte {err.start}): convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name}`"
        ) from err
    if not raw.strip():
        raise CorpusError(f"corpus file {path} is empty")
    return raw


def load_jsonl(path: Path, text_field: str = "text") -> list[str]:
    """Texts from a JSON-lines file, one object per line with a ``text_field`` string."""
    texts = []
    for line_no, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{line_no} is not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise CorpusError(
                f"{path}:{line_no} has no string field {text_field!r}: "
                "pass the right name with --text-field"
            )
        texts.append(record[text_field])
    return texts


TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".parquet")  # formats load_corpus does not read


def load_corpus(spec: str = "builtin", text_field: str = "text", dedupe: bool = True) -> Corpus:
    """Load 'builtin', a .txt file, a .jsonl file, or 'hf:NAME[:SPLIT]' (a datasets name)."""
    if spec in ("builtin", "builtin-stories"):
        return builtin_corpus()
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], text_field, dedupe)
    path = Path(spec).expanduser()
    if path.suffix.lower() in TABLE_SUFFIXES:  # read as lines, its header and quoting would be texts
        raise CorpusError(f"corpus file {path} is a {path.suffix} file, which is not read: "
                          "give a .txt file (a text per line, or paragraphs between blank lines), "
                          "a .jsonl file (--text-field names the field) or hf:NAME[:SPLIT]")
    if path.suffix == ".jsonl":
        texts = load_jsonl(path, text_field)
    else:
        texts = _paragraphs(_read_text(path))
    return make_corpus(texts, name=path.name, dedupe=dedupe)


def _load_hf(name: str, text_field: str, dedupe: bool) -> Corpus:
    try:
        import datasets
    except ImportError as err:
        raise CorpusError("hf: corpora need the `datasets` package: pip install datasets") from err
    dataset_name, _, split = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, split=split or "train")
    except Exception as err:  # datasets raises many types for missing data
        raise CorpusError(f"could not load data set {dataset_name!r} ({err}); "
                          "it must be in the local datasets cache when offline") from err
    if text_field not in dataset.column_names:
        raise CorpusError(f"data set {dataset_name!r} has no column {text_field!r}; "
                          f"columns: {dataset.column_names}")
    return make_corpus(dataset[text_field], name=f"hf:{name}", dedupe=dedupe)


# --- tokenisation ------------------------------------------------------------------------------


@dataclass
class TokenizedCorpus:
    """A corpus as the model sees it: ids, decoded pieces and char spans per text."""

    texts: list[str]
    splits: list[str]
    ids: list[list[int]]
    tokens: list[list[str]]
    spans: list[list[tuple[int, int]]]
    corpus_hash: str
    tokenizer_id: str
    max_tokens: int
    truncated: dict = field(default_factory=dict)  # text index -> tokens cut

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]


def tokenizer_id(tokenizer) -> str:
    """A short identifier of a tokenizer: its name plus a hash of its vocabulary."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:12]
    name = Path(str(getattr(tokenizer, "name_or_path", "") or "")).name or type(tokenizer).__name__
    return f"{name}:{digest}"


def tokenize_corpus(
    corpus: Corpus, tokenizer, max_tokens: int, min_tokens: int = 2
) -> TokenizedCorpus:
    """Tokenise as the model will (special tokens as the tokenizer adds them), truncating long texts.

    Texts shorter than ``min_tokens`` are dropped; longer than ``max_tokens`` are cut with one
    warning that counts what was cut.
    """
    texts, splits, all_ids, all_tokens, all_spans, truncated = [], [], [], [], [], {}
    dropped = 0
    for text, split in zip(corpus.texts, corpus.splits):
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        spans = [tuple(int(x) for x in span) for span in encoded["offset_mapping"]]
        if len(ids) < min_tokens:
            dropped += 1
            continue
        if len(ids) > max_tokens:
            truncated[len(texts)] = len(ids) - max_tokens
            ids, spans = ids[:max_tokens], spans[:max_tokens]
        texts.append(text)
        splits.append(split)
        all_ids.append(ids)
        all_tokens.append([tokenizer.decode([i]) for i in ids])
        all_spans.append(spans)
    if truncated:
        warnings.warn(
            f"{len(truncated)} of {len(corpus)} texts were longer than {max_tokens} tokens and "
            f"were truncated ({sum(truncated.values())} tokens cut)",
            stacklevel=2,
        )
    if not texts:
        raise CorpusError(
            f"no text of corpus {corpus.name!r} has at least {min_tokens} tokens"
            + (f" ({dropped} too short)" if dropped else "")
        )
    return TokenizedCorpus(
        texts, splits, all_ids, all_tokens, all_spans, corpus.hash, tokenizer_id(tokenizer), max_tokens,
        truncated,
    )
