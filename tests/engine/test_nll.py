"""engine.nll: token log-probabilities through (possibly) replaced heads, and perplexity."""

import numpy as np
import pytest
import torch

from attnprog.engine.batching import make_batch
from attnprog.engine.nll import perplexity, score_against_base, token_logprobs
from attnprog.engine.replace import replace_heads


def test_perplexity_through_unmodified_replacement_matches_plain_model(tiny_llama):
    model, _ = tiny_llama
    ids = [[5, 9, 11, 3, 7], [1, 2]]
    logprobs = token_logprobs(model, ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[0]])).logits[0]
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[0][1:])[:, None])
    np.testing.assert_allclose(logprobs[0], expected[:, 0].numpy(), atol=1e-5)
    assert perplexity(logprobs) > 1.0


def test_batched_log_probs_equal_one_text_at_a_time(tiny_gpt2):
    # texts of 1, 3 and 6 tokens in one padded batch: each keeps exactly its n - 1 values
    model, _ = tiny_gpt2
    ids = [[4], [8, 1, 9], [3, 5, 7, 2, 6, 10]]
    together = token_logprobs(model, ids, batch_size=3)
    for text, got in zip(ids, together, strict=True):
        (alone,) = token_logprobs(model, [text], batch_size=1)
        assert got.shape == (len(text) - 1,)
        np.testing.assert_allclose(got, alone, atol=1e-5)


# --- KL divergence from the unmodified model ----------------------------------------------

IDS = [[4, 9], [8, 1, 9, 12], [3, 5, 7, 2, 6, 10]]


def test_kl_is_zero_with_no_head_replaced(tiny_llama):
    model, _ = tiny_llama
    base, (scores,) = score_against_base(model, IDS, [{}], batch_size=2)
    assert scores.mean_kl() == 0.0
    for got, expected in zip(scores.logprobs, base, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_target_log_probs_equal_token_logprobs(tiny_gpt2):
    model, _ = tiny_gpt2
    heads = {(0, 1): "uniform"}
    _, (scores,) = score_against_base(model, IDS, [heads], batch_size=3)
    for got, expected in zip(scores.logprobs, token_logprobs(model, IDS, heads), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_kl_equals_a_direct_torch_computation_one_text_at_a_time(tiny_llama):
    model, _ = tiny_llama
    heads = {(0, 1): "uniform", (1, 2): "zero"}
    _, (scores,) = score_against_base(model, IDS, [heads], batch_size=3)
    for text, got in zip(IDS, scores.kl, strict=True):
        batch = make_batch([text])
        with replace_heads(model, heads) as replacement:
            replaced = replacement.forward(batch).logits[0, :-1]
        with torch.no_grad():
            plain = model(input_ids=batch.input_ids).logits[0, :-1]
        p, q = torch.log_softmax(plain, -1), torch.log_softmax(replaced, -1)
        expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
        assert (got >= 0).all() and got.max() > 0
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    total = sum(k.sum() for k in scores.kl) / sum(len(k) for k in scores.kl)
    assert scores.mean_kl() == pytest.approx(total)
