"""Program rows for the surrogate: fitted programs in torch equal their numpy outputs, and the
newest token's row equals the last row of the whole matrix, on every program path."""

import numpy as np
import pytest
import torch

from attnprog.engine.program_rows import (
    FITTED,
    fitted_torch,
    newest_rows,
    program_matrices,
    program_path,
)
from attnprog.layout import causal_offsets, tril_index
from attnprog.synth.embeddings import TokenEmbeddings, attach_similarity
from attnprog.synth.features import sentences_from_texts
from attnprog.synth.fitted import check_fit, evaluate_fits, program_from_fit
from tests.engine.surrogate_run import programs

TEXTS = ["The cat sat on the mat, and the dog slept by the door.",
         "When Mary and John went to the store, John gave a drink to Mary."]
FITS = [
    {"share": 0.2, "weights": {"syntactic_head": 1.5, "pos_noun": 1.0, "previous_1": 1.0}},
    {"share": 0.0, "weights": {"similar": 2.5, "distance": -0.3, "punct": 0.7}},
    {"share": 0.6, "weights": {"induction": 3.0, "key_token:\" the\"": -1.2, "first_late": 0.4}},
]


@pytest.fixture(scope="module")
def sentences(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    found = sentences_from_texts(TEXTS, tokenizer)
    weight = model.get_input_embeddings().weight.detach().float().numpy()
    attach_similarity(found, TokenEmbeddings(np.arange(len(weight)), weight))
    return found


def test_fitted_programs_in_torch_equal_their_numpy_outputs(sentences):
    fits = [check_fit(f) for f in FITS]
    expected = evaluate_fits(fits, sentences)  # packed [programs, cells], float32
    offsets = causal_offsets([s.n for s in sentences])
    for t, s in enumerate(sentences):
        rows, cols = tril_index(s.n)
        got = fitted_torch(fits, s, "cpu").numpy()[:, rows, cols]  # numpy indexes by tril_index
        np.testing.assert_allclose(got, expected[:, offsets[t] : offsets[t + 1]], atol=1e-6)


def test_fitted_rows_put_nothing_on_later_keys_and_sum_to_one(sentences):
    got = fitted_torch([check_fit(f) for f in FITS], sentences[0], "cpu")
    assert float(got.triu(diagonal=1).abs().max()) == 0.0
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:2]), atol=1e-6, rtol=0)


def test_batch_matrices_are_padded_blocks_of_each_texts_own_matrix(sentences):
    fitted = [program_from_fit(f) for f in FITS]
    width = max(s.n for s in sentences) + 3
    dense = program_matrices(fitted, sentences, width, "cpu")
    assert dense.shape == (len(fitted), len(sentences), width, width)
    for b, s in enumerate(sentences):
        alone = program_matrices(fitted, [s], s.n, "cpu")[:, 0]
        torch.testing.assert_close(dense[:, b, : s.n, : s.n], alone, atol=0, rtol=0)
        assert float(dense[:, b, s.n :].abs().sum() + dense[:, b, :, s.n :].abs().sum()) == 0.0


def test_the_newest_row_equals_the_last_row_of_the_whole_matrix_on_every_path(sentences):
    every_path = programs()[:4]  # fitted, generator, golden, sandbox
    assert program_path(every_path[0]) == FITTED
    s = sentences[1]
    whole = program_matrices(every_path, [s], s.n, "cpu")  # [P, 1, n, n]
    newest = newest_rows(every_path, s, "cpu")  # [P, 1, 1, n]
    torch.testing.assert_close(newest, whole[:, :, -1:, :], atol=1e-6, rtol=0)
