"""Fitted programs: named features of (query, key) pairs, emitted as readable native programs."""

import ast

import numpy as np
import pytest

from attnprog.errors import ProgramError
from attnprog.layout import tril_index
from attnprog.synth import fitted
from attnprog.synth.features import Sentence, probe_sentences
from attnprog.synth.runtime.sandbox import Sandbox
from attnprog.synth.runtime.validate import validate

FIT = {
    "share": 0.42,
    "weights": {
        "distance": -0.357,
        "first": 2.31,
        "punct": 1.8,
        "induction": 0.5,
        fitted.key_token_name(" the"): -0.7,
        fitted.key_token_name('."'): 1.1,
        fitted.query_token_name(","): 0.9,
    },
}


def every_feature_name(sentences):
    pieces = {t for s in sentences for t in s.tokens}
    return (list(fitted.FEATURE_NAMES) + [fitted.key_token_name(p) for p in sorted(pieces)]
            + [fitted.query_token_name(p) for p in sorted(pieces)])


def test_every_feature_is_a_finite_n_by_n_matrix_on_the_probe_texts():
    for s in probe_sentences():
        values = fitted.feature_dense(s, every_feature_name([s]))
        assert values.shape[1:] == (s.n, s.n) and np.isfinite(values).all()


def test_features_mean_what_they_say():
    s = Sentence.from_text("The cat sat. The cat ran.")
    names = ["first", "previous_1", "last_copy", "induction", "punct"]
    first, previous, last_copy, induction, punct = fitted.feature_dense(s, names)
    assert first[:, 0].all() and not first[:, 1:].any()
    assert previous[3, 2] == 1 and previous.sum() == s.n - 1
    assert not last_copy[s.tokens.index(" The")].any()  # "The" and " The" are different tokens
    second_cat = len(s.tokens) - 3
    assert last_copy[second_cat, 1] == 1 and induction[second_cat, 2] == 1
    assert punct[:, s.tokens.index(".")].all()


def test_unknown_feature_names_are_refused_with_what_is_known():
    with pytest.raises(ProgramError, match="unknown fitted feature"):
        fitted.check_fit({"share": 0.1, "weights": {"nonsense": 1.0}})
    with pytest.raises(ProgramError, match="0 <= share < 1"):
        fitted.check_fit({"share": 1.5, "weights": {}})


def test_rounding_keeps_three_significant_digits_and_drops_zeros():
    rounded = fitted.round_fit({"share": 0.123456, "weights": {"first": 2.34567, "self": 0.0}})
    assert rounded == {"share": 0.123, "weights": {"first": 2.35}}


def test_rounding_keeps_a_saturated_share_below_one():
    # found with a 4-term fit of a sink head: its share 0.9996 rounded to 1.0, an invalid fit
    for share in (0.9996, 1.0):
        rounded = fitted.round_fit({"share": share, "weights": {"first": 3.0}})
        assert rounded["share"] == 0.999
        fitted.check_fit(rounded)


def test_a_fitted_program_is_a_valid_native_program():
    program = fitted.program_from_fit(FIT, head="L3.H5", model_id="tiny", score=0.7)
    assert validate(program).ok, validate(program).reason
    assert program.family == "fitted" and fitted.is_fitted(program)
    assert program.provenance["head"] == "L3.H5" and program.provenance["split"] == "synthesis"


def test_source_names_every_weight_as_a_constant_and_says_what_the_head_does():
    source = fitted.program_from_fit(FIT, head="L3.H5", model_id="tiny").source
    constants = [node.targets[0].id for node in ast.parse(source).body if isinstance(node, ast.Assign)]
    assert constants == ["SINK_SHARE", "W_DISTANCE", "W_FIRST", "W_PUNCT", "W_INDUCTION",
                         "W_TOKEN_THE", "W_TOKEN_PERIOD_QUOTE", "W_FIRST_FROM_TOKEN_COMMA"]
    docstring = ast.get_docstring(ast.parse(source).body[-1])
    assert "42 % on the first token" in docstring and "decays x0.70 per token back" in docstring
    assert "+1.8 on punctuation" in docstring and "L3.H5" in docstring


def test_the_sandboxed_source_reproduces_the_fitted_matrices():
    program = fitted.program_from_fit(FIT, head="L0.H0")
    sentences = probe_sentences()
    expected = fitted.evaluate_fitted([program], sentences)[0]
    with Sandbox(1, progress=False) as box:
        (run,) = box.run([program], sentences)
    assert not run.failed.any()
    np.testing.assert_allclose(run.values, expected, atol=1e-5)


def test_the_fitted_model_is_a_sink_share_plus_a_softmax():
    s = probe_sentences()[0]
    (values,) = fitted.evaluate_fits([{"share": 0.25, "weights": {"distance": -1.0}}], [s])
    rows, cols = tril_index(s.n)
    dense = np.zeros((s.n, s.n))
    dense[rows, cols] = values
    i = 4
    decay = np.exp(-np.arange(i, -1, -1.0))
    np.testing.assert_allclose(dense[i, : i + 1], 0.75 * decay / decay.sum() + 0.25 * (np.arange(i + 1) == 0),
                               atol=1e-6)


def test_an_edited_fitted_program_is_no_longer_trusted():
    program = fitted.program_from_fit(FIT, head="L0.H0")
    edited = type(program)(program.source.replace("0.42", "0.5"), provenance=program.provenance)
    assert not fitted.is_fitted(edited)
    with pytest.raises(ProgramError, match="sandbox"):
        fitted.evaluate_fitted([edited], probe_sentences())


def with_embeddings(sentences):
    from attnprog.synth.embeddings import TokenEmbeddings, attach_similarity

    rows = np.random.default_rng(1).normal(size=(50_000, 16))
    attach_similarity(sentences, TokenEmbeddings(np.arange(50_000), rows, "random (test)"))
    return sentences


SIMILARITY_FIT = {"share": 0.2, "weights": {"similar": 1.4, "after_similar": 0.8,
                                            "similar_to_previous": -0.6, "similar_content": 0.5,
                                            "previous_1": 1.1}}


def test_a_fitted_program_using_similarity_reproduces_its_matrices_in_the_sandbox():
    program = fitted.program_from_fit(SIMILARITY_FIT, head="L0.H1")
    assert "s.embedding_similarity(i, j)" in program.source
    sentences = with_embeddings(probe_sentences())
    expected = fitted.evaluate_fitted([program], sentences)[0]
    with Sandbox(1, progress=False) as box:
        (run,) = box.run([program], sentences)
    assert not run.failed.any(), run.reason
    np.testing.assert_allclose(run.values, expected, atol=1e-5)


def test_similarity_terms_read_as_token_meaning():
    words = fitted.describe_fit(SIMILARITY_FIT)
    assert "+1.4 x similarity in meaning to the query" in words
    assert fitted.term_label("similar_to_previous", 1.0) == "similar to the token before the query"


def test_the_similarity_feature_is_the_cosine_to_earlier_tokens():
    (s,) = with_embeddings([Sentence.from_text("The cat saw the cat.")])
    (similar,) = fitted.feature_dense(s, ["similar"])
    assert similar[4, 1] == pytest.approx(1.0, abs=1e-6)  # the second " cat" and the first
    assert not np.triu(similar).any()  # neither itself nor later tokens
