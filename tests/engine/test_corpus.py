import json

import pytest

from attnprog.engine.corpus import (
    SPLITS,
    assign_split,
    builtin_corpus,
    load_corpus,
    make_corpus,
    tokenize_corpus,
)
from attnprog.engine.models import byte_tokenizer
from attnprog.errors import CorpusError


def test_builtin_corpus_has_at_least_300_sentences_in_three_splits():
    corpus = builtin_corpus()
    sentences = sum(text.count(".") + text.count("!") + text.count("?") for text in corpus.texts)
    assert sentences >= 300
    assert set(corpus.splits) == set(SPLITS)


def test_splits_depend_on_the_text_not_its_position():
    texts = [f"Story number {i} is here." for i in range(30)]
    forward = make_corpus(texts)
    backward = make_corpus(texts[::-1])
    assert dict(zip(forward.texts, forward.splits)) == dict(zip(backward.texts, backward.splits))
    assert assign_split("same text") == assign_split("same text")


def test_txt_with_blank_lines_gives_one_text_per_paragraph(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First line\nstill first.\n\nSecond text.\n")
    assert load_corpus(str(path)).texts == ["First line still first.", "Second text."]


def test_txt_without_blank_lines_gives_one_text_per_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("One.\nTwo.\nThree.\n")
    assert load_corpus(str(path)).texts == ["One.", "Two.", "Three."]


def test_duplicates_are_removed(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("Same.\nSame.\nOther.\n")
    assert load_corpus(str(path)).texts == ["Same.", "Other."]


def test_jsonl_reads_the_named_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"story": f"Text {i}."}) for i in range(3)))
    assert load_corpus(str(path), text_field="story").texts == ["Text 0.", "Text 1.", "Text 2."]


def test_jsonl_line_without_the_field_is_named_in_the_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2 .*'text'"):
        load_corpus(str(path))


def test_a_csv_is_refused_not_read_as_lines(tmp_path):
    """A .csv was read as a .txt: its header "id,text" and each quoted row became texts."""
    path = tmp_path / "stories.csv"
    path.write_text('id,text\n1,"Once upon a time, a fox."\n')
    with pytest.raises(CorpusError, match=r"\.csv file.*\.jsonl"):
        load_corpus(str(path))


def test_missing_file_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))


def test_empty_file_is_a_corpus_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(str(path))


def test_non_utf8_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match="latin.txt is not UTF-8"):
        load_corpus(str(path))


def test_long_texts_are_truncated_with_a_warning_counting_the_cut():
    corpus = make_corpus(["a" * 50, "short"])
    with pytest.warns(UserWarning, match=r"1 of 2 texts .* truncated \(30 tokens cut\)"):
        tokenized = tokenize_corpus(corpus, byte_tokenizer(), max_tokens=20)
    assert tokenized.lengths == [20, 5]


def test_tokenized_pieces_and_spans_match_the_text():
    tokenized = tokenize_corpus(make_corpus(["Hi, Tom."]), byte_tokenizer(), max_tokens=64)
    text = tokenized.texts[0]
    assert "".join(tokenized.tokens[0]) == text
    assert [text[a:b] for a, b in tokenized.spans[0]] == tokenized.tokens[0]
