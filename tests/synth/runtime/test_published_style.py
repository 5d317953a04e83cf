"""Programs written the way the paper's published libraries are (helpers beside the entry
point, ``from transformers import PreTrainedTokenizerBase``, spaCy loaded and called per
sentence with lemmas and entities, the tokenizer's attributes) run unchanged in the sandbox
and give exactly what they give in this process with the real tokenizer."""

import importlib.util

import numpy as np
import pytest

from attnprog.synth.features import sentences_from_texts
from attnprog.synth.policy import check_source
from attnprog.synth.runtime.execute import run_trusted
from attnprog.synth.runtime.paper_form import library_programs
from attnprog.synth.runtime.sandbox import Sandbox

HAS_SPACY = importlib.util.find_spec("spacy") is not None

LIBRARY = '''
"""A library in the published layout."""
import numpy as np
from transformers import PreTrainedTokenizerBase
from typing import Tuple

_nlp = None
def _get_nlp():
    global _nlp
    if _nlp is None:
        import spacy
        _nlp = spacy.load("en_core_web_sm")
    return _nlp

def _spans(sentence, tokenizer):
    enc = tokenizer(sentence, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]

def make_row_stochastic(matrix: np.ndarray) -> np.ndarray:
    sums = matrix.sum(axis=1, keepdims=True)
    sums[sums == 0] = 1.0
    return matrix / sums

# Layer 0, Head 1
def lemma_and_entity_links(sentence: str, tokenizer: PreTrainedTokenizerBase) -> Tuple[str, np.ndarray]:
    ids, spans = _spans(sentence, tokenizer)
    n = len(ids)
    doc = _get_nlp()(sentence)
    lemma_at = {tok.idx: tok.lemma_ for tok in doc}
    in_entity = set()
    for ent in doc.ents:
        in_entity.update(range(ent.start_char, ent.end_char))
    lemmas = [lemma_at.get(a + len(sentence[a:b]) - len(sentence[a:b].lstrip())) for a, b in spans]
    out = np.zeros((n, n))
    for i in range(n):
        out[i, 0] = 1.0
        for j in range(i):
            if lemmas[i] is not None and lemmas[i] == lemmas[j]:
                out[i, j] += 2.0
            if spans[j][0] in in_entity:
                out[i, j] += 0.5
    return "Same lemma, and entities", make_row_stochastic(out)

# Layer 0, Head 2
def special_tokens_and_pieces(sentence: str, tokenizer: PreTrainedTokenizerBase) -> Tuple[str, np.ndarray]:
    toks = tokenizer([sentence], return_tensors="pt")
    ids = toks.input_ids[0].tolist()
    n = len(ids)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    first_word = tokenizer.tokenize(sentence.split()[0])
    special = set(tokenizer.all_special_ids)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            if ids[j] in special or ids[j] in (tokenizer.cls_token_id, tokenizer.bos_token_id):
                out[i, j] = 3.0
            elif pieces[j] in first_word or pieces[j].startswith("\\u0120"):
                out[i, j] = 1.0 + (j % 3)
    return "Special tokens and word starts", out

# Layer 1, Head 0
def verb_heads_per_call(sentence: str, tokenizer: PreTrainedTokenizerBase) -> Tuple[str, np.ndarray]:
    import spacy
    nlp = spacy.load("en_core_web_sm")
    doc = nlp(sentence)
    ids, spans = _spans(sentence, tokenizer)
    n = len(ids)
    word_of = {}
    for tok in doc:
        for c in range(tok.idx, tok.idx + len(tok.text)):
            word_of[c] = tok
    out = np.zeros((n, n))
    for i, (a, b) in enumerate(spans):
        tok = word_of.get(b - 1)
        for j, (c, d) in enumerate(spans[: i + 1]):
            other = word_of.get(d - 1)
            if tok is not None and other is not None and (other.i == tok.head.i or other.pos_ == "VERB"):
                out[i, j] = 1.0 + (other.dep_ == "ROOT")
    return "Heads and verbs", out
'''
TEXTS = [
    "Mary went to Paris in May, and Mary liked the city.",
    "The children were running home when John called them.",
    "Apple bought a small company in London for two million dollars.",
    "She said the dogs had eaten, then the dogs slept.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from attnprog.engine.models import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="module")
def real_spacy_load():
    """In this process, ``spacy.load("en_core_web_sm")`` loads the installed English
    pipeline (the package is named differently here), as it would on the authors' machine."""
    if not HAS_SPACY:
        pytest.skip("spaCy is not installed")
    import spacy

    from attnprog.synth.features import _PIPELINE_NAMES

    original = spacy.load

    def load(name, *args, **kwargs):
        for candidate in (name, *_PIPELINE_NAMES):
            try:
                return original(candidate, *args, **kwargs)
            except OSError:
                continue
        raise OSError(name)

    spacy.load = load
    yield
    spacy.load = original


def programs():
    return library_programs(LIBRARY, "test_library.py")


def test_the_library_splits_into_programs_that_pass_the_static_check():
    found = programs()
    assert [p.name for p in found] == ["lemma_and_entity_links", "special_tokens_and_pieces",
                                       "verb_heads_per_call"]
    assert all(check_source(p) == "" for p in found)


def compare(tokenizer, texts):
    sentences = sentences_from_texts(texts, tokenizer)
    expected = run_trusted(programs(), sentences_from_texts(texts, tokenizer), tokenizer=tokenizer)
    with Sandbox(workers=2, tokenizer=tokenizer, progress=False) as box:
        got = box.run(programs(), sentences)
    for program, mine, theirs in zip(programs(), got, expected, strict=True):
        assert theirs.reason == "" and mine.reason == "", program.name
        np.testing.assert_array_equal(mine.values, theirs.values, err_msg=program.name)


def test_published_style_programs_match_in_process_execution(tokenizer, real_spacy_load):
    compare(tokenizer, TEXTS)


@pytest.mark.slow
def test_published_style_programs_match_with_the_smollm2_tokenizer(real_spacy_load):
    from transformers import AutoTokenizer

    from attnprog.engine.models import builtin_checkpoint

    smol = AutoTokenizer.from_pretrained(str(builtin_checkpoint("smollm2-135m")))
    compare(smol, TEXTS)


def test_the_rebuilt_tokenizer_encodes_any_text_like_the_original(tokenizer):
    from attnprog.synth.runtime.paper_form import tokenizer_from_spec, tokenizer_spec

    rebuilt = tokenizer_from_spec(tokenizer_spec(tokenizer))
    for text in [*TEXTS, "other text, «unicode» — ok"]:
        assert rebuilt(text, return_offsets_mapping=True) == tokenizer(text, return_offsets_mapping=True)
        assert rebuilt.tokenize(text) == tokenizer.tokenize(text)
    assert rebuilt.all_special_ids == tokenizer.all_special_ids
