"""engine.ablation and the "zero" / MeanOutput sources: each control against a hand computation
in eager attention, where the head's slice of the output projection's input is edited."""

import pytest
import torch

from attnprog.engine.ablation import head_output_means, mean_sources
from attnprog.engine.batching import make_batch
from attnprog.engine.replace import attention_modules, replace_heads

LENGTHS = (13, 9, 4)
HEADS = [(0, 1), (1, 3)]


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def tiny(request):
    model, _ = request.getfixturevalue(request.param)
    return model


def token_ids(lengths=LENGTHS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (n,), generator=gen).tolist() for n in lengths]


def projection(module):
    """The output projection that reads the heads' concatenated outputs."""
    return module.o_proj if hasattr(module, "o_proj") else module.c_proj


def eager_with_edit(model, batch, edit):
    """Logits of eager attention where ``edit(layer, x)`` changes each output projection's input
    x [batch, query_pos, heads * head_dim] in place."""
    hooks = [projection(module).register_forward_pre_hook(
        lambda _, args, layer=layer: (edit(layer, args[0].clone()),))
        for layer, module in attention_modules(model).items()]
    try:
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        for hook in hooks:
            hook.remove()


def head_dim(model):
    return model.config.hidden_size // model.config.num_attention_heads


def replaced(model, heads, batch):
    with replace_heads(model, heads) as replacement:
        return replacement.forward(batch).logits


def real(logits, batch):
    return logits[batch.attention_mask.bool()]


def test_zero_source_equals_the_head_zeroed_by_hand(tiny):
    batch = make_batch(token_ids())
    d = head_dim(tiny)

    def zero(layer, x):
        for lay, head in HEADS:
            if lay == layer:
                x[..., head * d:(head + 1) * d] = 0.0
        return x

    expected = eager_with_edit(tiny, batch, zero)
    got = replaced(tiny, {key: "zero" for key in HEADS}, batch)
    torch.testing.assert_close(real(got, batch), real(expected, batch), atol=1e-5, rtol=1e-5)


def hand_means(model, ids):
    """[layers, heads, head_dim]: the projection inputs of eager attention, averaged by hand."""
    batch = make_batch(ids)
    d, n_heads = head_dim(model), model.config.num_attention_heads
    means = {}

    def record(layer, x):
        tokens = x[batch.attention_mask.bool()]  # [real tokens, heads * head_dim]
        means[layer] = tokens.double().mean(0).view(n_heads, d)
        return x

    eager_with_edit(model, batch, record)
    return torch.stack([means[layer] for layer in sorted(means)]).float()


def test_head_output_means_equal_the_projection_inputs_averaged_by_hand(tiny):
    ids = token_ids(seed=2)
    torch.testing.assert_close(head_output_means(tiny, ids, batch_size=2), hand_means(tiny, ids),
                               atol=1e-5, rtol=1e-5)


def test_mean_source_equals_the_head_output_replaced_by_its_mean_by_hand(tiny):
    means = hand_means(tiny, token_ids(seed=2))
    batch = make_batch(token_ids())
    d = head_dim(tiny)

    def replace_by_mean(layer, x):
        for lay, head in HEADS:
            if lay == layer:
                x[..., head * d:(head + 1) * d] = means[lay, head]
        return x

    expected = eager_with_edit(tiny, batch, replace_by_mean)
    got = replaced(tiny, mean_sources(means, HEADS), batch)
    torch.testing.assert_close(real(got, batch), real(expected, batch), atol=1e-5, rtol=1e-5)


def test_mean_ablation_changes_the_output(tiny):
    means = hand_means(tiny, token_ids(seed=2))
    batch = make_batch(token_ids())
    assert not torch.allclose(replaced(tiny, mean_sources(means, HEADS), batch),
                              replaced(tiny, {}, batch), atol=1e-4)
