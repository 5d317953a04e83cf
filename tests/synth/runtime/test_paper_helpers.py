"""Programs written in the paper authors' calling style, which call their helpers
(``tokenize``, ``spacy_parse``, ``align_tokens_to_spacy``, ``align_spacy_to_tokens``,
``embedding_similarity``) without defining them, run unchanged in the sandbox and give what
they give in this process with the real tokenizer."""

import importlib.util

import numpy as np
import pytest

from attnprog.synth.embeddings import TokenEmbeddings, attach_similarity
from attnprog.synth.features import sentences_from_texts
from attnprog.synth.runtime.execute import run_trusted
from attnprog.synth.runtime.paper_form import library_programs
from attnprog.synth.runtime.sandbox import Sandbox, modules_needed

HAS_SPACY = importlib.util.find_spec("spacy") is not None

# written for this test, in the style of the published libraries
SIMILARITY = '''
import numpy as np
from transformers import PreTrainedTokenizerBase
from typing import Tuple

def similarity_rows(sentence: str, tokenizer: PreTrainedTokenizerBase) -> Tuple[str, np.ndarray]:
    tokens = tokenize(sentence, tokenizer)
    n = len(tokens)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            out[i, j] = max(embedding_similarity(tokens, i, j, tokenizer), 0.0)
    return "similar tokens", out

def similarity_without_tokenizer(sentence: str, tokenizer: PreTrainedTokenizerBase) -> Tuple[str, np.ndarray]:
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(sentence, return_tensors="pt").input_ids[0])
    n = len(tokens)
    out = np.eye(n)
    for i in range(1, n):
        out[i, i - 1] = 1.0 + embedding_similarity(tokens, i, i - 1)
    return "previous, more when similar", out
'''
SYNTAX = '''
import numpy as np
from transformers import PreTrainedTokenizerBase
from typing import Tuple

def verbs_and_their_words(sentence: str, tokenizer: PreTrainedTokenizerBase) -> Tuple[str, np.ndarray]:
    tokens = tokenize(sentence, tokenizer)
    n = len(tokens)
    doc = spacy_parse(sentence)
    words = align_tokens_to_spacy(sentence, tokens, tokenizer)
    out = np.zeros((n, n))
    for i in range(n):
        out[i, 0] = 0.5
        for j in range(i + 1):
            if words[j] and doc[words[j][0]].pos_ == "VERB":
                out[i, j] += 2.0
            if words[i] and words[j] and doc[words[j][0]] == doc[words[i][0]].head:
                out[i, j] += 1.0
    return "verbs and syntactic heads", out

def first_piece_of_each_word(sentence: str, tokenizer: PreTrainedTokenizerBase) -> Tuple[str, np.ndarray]:
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(sentence, return_tensors="pt").input_ids[0])
    n = len(tokens)
    pieces = align_spacy_to_tokens(sentence)
    out = np.zeros((n, n))
    for covering in pieces:
        for i in range(n):
            if covering and covering[0] <= i:
                out[i, covering[0]] = 1.0 + embedding_similarity(tokens, i, covering[0])
    return "word starts", out
'''
TEXTS = [
    "Mary went to Paris in May, and Mary liked the city.",
    "The children were running home when John called them.",
    "She said the dogs had eaten, then the dogs slept.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from attnprog.engine.models import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="module")
def table(tokenizer):
    rows = np.random.default_rng(0).normal(size=(len(tokenizer), 12))
    return TokenEmbeddings(np.arange(len(tokenizer)), rows, "random (test)")


@pytest.fixture(scope="module")
def sentences(tokenizer, table):
    found = sentences_from_texts(TEXTS, tokenizer)
    attach_similarity(found, table)
    return found


def sandboxed_equals_in_process(programs, sentences, tokenizer):
    with Sandbox(1, progress=False, tokenizer=tokenizer) as box:
        boxed = box.run(programs, sentences)
    trusted = run_trusted(programs, sentences, tokenizer=tokenizer)
    for program, a, b in zip(programs, boxed, trusted, strict=True):
        assert not a.failed.any(), f"{program.name}: {a.reason}"
        assert not b.failed.any(), f"{program.name}: {b.reason}"
        np.testing.assert_allclose(a.values, b.values, atol=1e-6)
    return boxed


def test_embedding_similarity_runs_unchanged_and_is_the_cosine_of_the_embeddings(
        sentences, tokenizer, table):
    programs = library_programs(SIMILARITY, "similarity.py")
    boxed = sandboxed_equals_in_process(programs, sentences, tokenizer)
    s = sentences[0]
    expected = np.tril(np.maximum(table.similarity(s.ids), 0.0))
    expected /= expected.sum(axis=1, keepdims=True)
    rows, cols = np.tril_indices(s.n)
    np.testing.assert_allclose(boxed[0].values[: len(rows)], expected[rows, cols], atol=1e-5)


@pytest.mark.skipif(not HAS_SPACY, reason="spaCy is not installed")
def test_the_spacy_helpers_run_unchanged_with_either_calling_style(sentences, tokenizer):
    programs = library_programs(SYNTAX, "syntax.py")
    assert "spacy" in modules_needed(programs)  # the workers parse before any program runs
    sandboxed_equals_in_process(programs, sentences, tokenizer)


def test_a_program_that_defines_a_helper_uses_its_own(sentences, tokenizer):
    source = SIMILARITY + "\ndef embedding_similarity(tokens, i, j, tokenizer=None):\n    return 1.0\n"
    (program, _) = library_programs(source, "own.py")
    (result,) = run_trusted([program], sentences[:1], tokenizer=tokenizer)
    s = sentences[0]
    rows, cols = np.tril_indices(s.n)
    uniform = (1.0 / (np.arange(s.n) + 1))[rows]
    np.testing.assert_allclose(result.values[: len(rows)], uniform, atol=1e-6)
