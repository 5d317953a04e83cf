"""Token meaning: cosine similarity of the model's input embeddings, attached to Sentences."""

import numpy as np
import pytest

from attnprog.synth.embeddings import TokenEmbeddings, attach_similarity
from attnprog.synth.features import Sentence


def table() -> TokenEmbeddings:
    rng = np.random.default_rng(0)
    return TokenEmbeddings(np.arange(50_000, dtype=np.int64), rng.normal(size=(50_000, 8)))


def test_a_token_is_fully_similar_to_itself_and_to_its_other_copies():
    s = Sentence.from_text("The cat saw the cat.")
    attach_similarity([s], table())
    i, j = np.arange(s.n)[:, None], np.arange(s.n)[None, :]
    sim = s.embedding_similarity(i, j)
    assert np.allclose(np.diag(sim), 1.0, atol=1e-6)
    assert sim[1, 4] == pytest.approx(1.0, abs=1e-6)  # " cat" and " cat"
    assert sim.shape == (s.n, s.n) and np.allclose(sim, sim.T)


def test_similarity_is_the_cosine_of_the_rows():
    t = table()
    a, b = t.rows[3], t.rows[7]
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert t.similarity([3, 7])[0, 1] == pytest.approx(expected, abs=1e-6)


def test_an_id_without_a_row_is_refused():
    t = TokenEmbeddings(np.array([5, 1]), np.ones((2, 3)))
    assert t.ids.tolist() == [1, 5]
    with pytest.raises(KeyError, match="token id 3"):
        t.similarity([1, 3])


def test_a_text_without_embeddings_says_how_to_get_them():
    s = Sentence.from_text("No embeddings here.")
    assert not s.has_embeddings
    with pytest.raises(ValueError, match="attnprog check --model"):
        s.embedding_similarity(0, 1)


def test_a_program_cannot_change_the_similarity_the_next_one_reads():
    s = Sentence.from_text("The cat sat.")
    attach_similarity([s], table())
    copy = s.copy()
    with pytest.raises(ValueError):
        copy.token_similarity[0, 0] = 5.0
    copy.embedding_similarity(0, 0)  # a fresh value each time
    assert s.embedding_similarity(0, 0) == pytest.approx(1.0)
