"""engine.nll: token log-probabilities through (possibly) replaced heads, and perplexity."""

import numpy as np
import torch

from attnprog.engine.nll import perplexity, token_logprobs


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
