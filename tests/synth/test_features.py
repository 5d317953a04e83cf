"""Sentence: per-text features built once from the tokens the model saw."""

import pickle

import numpy as np
import pytest

from attnprog.synth.features import (
    Sentence,
    attach_syntax,
    probe_sentences,
    sentence_from_ids,
    sentences_from_texts,
    syntax_available,
)


@pytest.fixture
def s() -> Sentence:
    return Sentence.from_text('<s> said: "Paris is big." Then she left, and Paris slept.')


def flags(array) -> list[int]:
    return np.asarray(array).astype(int).tolist()


def test_from_text_keeps_leading_spaces_and_exact_spans():
    s = Sentence.from_text("The cat, sat.")
    assert s.tokens == ["The", " cat", ",", " sat", "."]
    assert [s.text[a:b] for a, b in s.offsets] == s.tokens
    assert s.n == 5


def test_word_ids_group_pieces_of_one_word():
    s = Sentence("unhappy day", [1, 2, 3], ["un", "happy", " day"], [(0, 2), (2, 7), (7, 11)])
    assert s.word_ids == [0, 0, 1]
    assert flags(s.is_word_start) == [1, 0, 1]
    assert s.words == ["unhappy", "day"]
    assert s.word_start_index.tolist() == [0, 0, 2]


def test_a_bos_token_is_a_word_of_its_own():
    s = Sentence.from_text("The cat", bos="<s>")
    assert s.word_ids == [0, 1, 2]
    assert flags(s.is_word_start) == [1, 1, 1]
    assert flags(s.is_special) == [1, 0, 0]


def test_punctuation_flags(s):
    assert [t for t, p in zip(s.tokens, s.is_punct, strict=True) if p] == [
        "<", ">", ":", ' "', ".", '"', ",", ".",
    ]


def test_sentence_starts_and_ids():
    s = Sentence.from_text("It rained. We left! Ok")
    assert [t for t, f in zip(s.tokens, s.is_sentence_start, strict=True) if f] == [
        "It", " We", " Ok",
    ]
    assert s.sentence_ids.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert flags(s.is_sentence_end) == [0, 0, 1, 0, 0, 1, 0]


def test_capitalised_alpha_digit_quote_and_stopword_flags():
    s = Sentence.from_text('The 3 "cats" of Rome')
    assert flags(s.is_capitalised) == [1, 0, 0, 0, 0, 0, 1]
    assert flags(s.is_digit) == [0, 1, 0, 0, 0, 0, 0]
    assert flags(s.is_alpha) == [1, 0, 0, 1, 0, 1, 1]
    assert flags(s.is_quote) == [0, 0, 1, 0, 1, 0, 0]
    assert flags(s.is_stopword) == [1, 0, 0, 0, 0, 1, 0]


def test_most_recent_finds_the_latest_earlier_match():
    s = Sentence.from_text("a , b c , d")
    assert s.most_recent(s.is_punct).tolist() == [-1, -1, 1, 1, 1, 4]
    assert s.most_recent(s.is_punct, include_self=True).tolist() == [-1, 1, 1, 1, 4, 4]


def test_first_index_is_the_first_match_or_minus_one():
    s = Sentence.from_text("a , b c , d")
    assert s.first_index(s.is_punct) == 1
    assert s.first_index(s.is_digit) == -1


def test_follows_marks_tokens_right_after_a_match():
    s = Sentence.from_text("a , b c , d")
    assert s.follows(s.is_punct).tolist() == [False, False, True, False, False, True]


def test_first_copy_marks_each_tokens_first_occurrence():
    s = Sentence.from_text("a b c b c")  # ' b' and ' c' repeat ('a' has no leading space)
    assert s.is_first_copy.tolist() == [True, True, True, False, False]


def test_feature_arrays_are_fresh_copies(s):
    mask = s.is_punct
    mask[:] = True
    assert not s.is_punct.all()


def test_copy_isolates_the_lists_a_program_might_change(s):
    clone = s.copy()
    clone.tokens[0] = "changed"
    clone.ids.append(7)
    assert s.tokens[0] == "<" and len(s.ids) == s.n


def test_pickling_keeps_the_data_and_drops_cached_features(s):
    s.warm_features()
    restored = pickle.loads(pickle.dumps(s))
    assert restored == s and "_cache" not in restored.__dict__
    assert flags(restored.is_punct) == flags(s.is_punct)


def test_probe_sentences_are_three_texts():
    probes = probe_sentences()
    assert len(probes) == 3 and all(p.n > 5 for p in probes)


class PieceTokenizer:
    """A slow (not fast) tokenizer: words and punctuation, with a BOS id 0."""

    is_fast = False
    all_special_ids = [0]

    def __init__(self):
        self.vocab = {"<s>": 0}

    def __call__(self, texts, **_):
        ids = []
        for text in texts:
            pieces = Sentence.from_text(text).tokens
            ids.append([0] + [self.vocab.setdefault(p, len(self.vocab)) for p in pieces])
        return {"input_ids": ids}

    def decode(self, ids):
        pieces = {i: p for p, i in self.vocab.items()}
        return "".join(pieces[i] for i in ids)


def test_sentences_from_a_slow_tokenizer_align_pieces_to_the_text():
    tokenizer = PieceTokenizer()
    [s] = sentences_from_texts(["The cat sat."], tokenizer)
    assert s.tokens == ["<s>", "The", " cat", " sat", "."]
    assert s.offsets == [(0, 0), (0, 3), (3, 7), (7, 11), (11, 12)]
    assert s.word_ids == [0, 1, 2, 3, 3]


def test_sentence_from_ids_decodes_each_token():
    tokenizer = PieceTokenizer()
    ids = tokenizer(["a b"])["input_ids"][0]
    s = sentence_from_ids("a b", ids, tokenizer)
    assert s.ids == ids and s.tokens == ["<s>", "a", " b"]


def test_sentences_from_a_fast_hugging_face_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        ["the cat sat on the mat", "a dog ran"] * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]),
    )
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>")
    [s] = sentences_from_texts(["the cat ran"], tokenizer)
    assert s.ids == tokenizer("the cat ran")["input_ids"]
    assert s.tokens[0] == "<s>" and "".join(s.tokens[1:]) == "the cat ran"
    assert s.word_ids[0] != s.word_ids[1]  # BOS is its own word
    assert s.words[1:] == ["the", "cat", "ran"]


def test_attach_syntax_of_whole_texts_aligns_tags_and_heads_to_tokens():
    if not syntax_available():
        pytest.skip("spaCy with an English pipeline is not installed")
    s = Sentence("The cats sleep.", [0, 1, 2, 3, 4], ["<s>", "The", " ca", "ts", " sleep."],
                 [(0, 0), (0, 3), (3, 6), (6, 8), (8, 15)])
    assert attach_syntax([s], causal=False) and s.has_syntax and s.syntax_mode == "full-text"
    assert s.pos[:4] == ["X", "DET", "NOUN", "NOUN"]
    assert s.dep_head[1] == 2  # "The" -> first piece of "cats"
    assert s.dep_head[2] == s.dep_head[3] == 4  # both pieces of "cats" -> "sleep"


def test_attach_syntax_without_spacy_changes_nothing(monkeypatch):
    import attnprog.synth.features as features

    monkeypatch.setattr(features, "_nlp", False)
    s = Sentence.from_text("The cat")
    assert attach_syntax([s]) is False and s.pos is None
