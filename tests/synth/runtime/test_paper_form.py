"""The paper's form f(sentence: str, tokenizer) -> (label, matrix) runs through an adapter."""

import numpy as np
import pytest

from attnprog.errors import ProgramError
from attnprog.synth.features import Sentence
from attnprog.synth.runtime.execute import call_form, compile_program
from attnprog.synth.runtime.paper_form import SentenceTokenizer, adapt_paper_form


@pytest.fixture
def sentence() -> Sentence:
    return Sentence.from_text("The cat sat, and the cat slept.", bos="<s>")


def test_a_two_argument_function_is_detected_as_the_papers_form():
    assert call_form(lambda sentence, tokenizer: None) == "paper"
    assert call_form(lambda s: None) == "native"


def test_the_adapter_passes_the_text_and_takes_the_matrix_from_the_tuple(sentence):
    seen = {}

    def paper(text, tokenizer):
        seen["text"] = text
        return "label", np.eye(3)

    assert np.array_equal(adapt_paper_form(paper)(sentence), np.eye(3))
    assert seen["text"] == sentence.text


def test_the_tokenizer_returns_the_tokens_the_model_saw(sentence):
    tokenizer = SentenceTokenizer(sentence)
    enc = tokenizer(sentence.text)
    assert enc.input_ids == sentence.ids and enc["input_ids"] == sentence.ids
    assert tokenizer.tokenize(sentence.text) == sentence.tokens
    assert tokenizer.convert_ids_to_tokens(enc.input_ids) == sentence.tokens
    assert tokenizer.decode(sentence.ids[1:]) == sentence.text
    assert tokenizer.encode(sentence.text) == sentence.ids


def test_batched_and_tensor_calls_give_one_row(sentence):
    tokenizer = SentenceTokenizer(sentence)
    assert tokenizer([sentence.text]).input_ids == [sentence.ids]
    tensor = tokenizer([sentence.text], return_tensors="pt").input_ids
    assert tensor.shape == (1, sentence.n) and tensor[0].tolist() == sentence.ids


def test_offsets_and_word_ids_are_available(sentence):
    enc = SentenceTokenizer(sentence)(sentence.text, return_offsets_mapping=True)
    assert enc.offset_mapping == sentence.offsets
    assert enc.word_ids() == sentence.word_ids


def test_tokenising_another_text_says_what_to_do(sentence):
    with pytest.raises(ProgramError, match="only tokenises the sentence being explained"):
        SentenceTokenizer(sentence)("something else")


def test_a_published_program_runs_unchanged(sentence):
    source = '''
import numpy as np

def first_token_pattern(sentence: str, tokenizer):
    toks = tokenizer([sentence], return_tensors="pt")
    len_seq = len(toks.input_ids[0])
    out = np.zeros((len_seq, len_seq))
    out[:, 0] = 1
    return "First Token Pattern", out
'''
    function = compile_program(source, "first_token_pattern")
    matrix = function(sentence)
    assert matrix.shape == (sentence.n, sentence.n) and matrix[:, 0].all()


def test_a_truncated_text_gives_the_models_tokenizer_only_the_text_its_tokens_cover():
    from attnprog.engine.models import byte_tokenizer
    from attnprog.synth.features import sentences_from_texts

    tokenizer = byte_tokenizer()
    s = sentences_from_texts(["The cat sat on the mat and then it slept."], tokenizer,
                             max_length=12)[0]
    assert s.n == 12 and len(s.text) > 12  # cut to 12 tokens, as extract cuts long texts

    def paper(sentence, tokenizer):
        n = len(tokenizer(sentence)["input_ids"])
        return "uniform", np.ones((n, n))

    assert adapt_paper_form(paper, tokenizer)(s).shape == (s.n, s.n)
    assert adapt_paper_form(paper)(s).shape == (s.n, s.n)  # the stand-in takes that text too
