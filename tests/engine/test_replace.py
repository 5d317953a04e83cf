"""engine.replace: the identity and replacement gates for GPT-2 and GQA Llama (and SmolLM2)."""

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from attnprog.engine.batching import make_batch
from attnprog.engine.replace import replace_heads
from attnprog.errors import ModelError
from tests.engine.planted import random_program_matrices

REFERENCE = "test_eager_overwrite"
_OVERWRITES: dict[int, dict[int, torch.Tensor]] = {}  # layer -> head -> Π [B, n, n]


def eager_overwrite_attention(module, query, key, value, attention_mask, scaling=None,
                              dropout=0.0, **kwargs):
    """Eager attention written out, with the chosen heads' probabilities overwritten before V."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    probs = torch.softmax(weights.float(), dim=-1).to(query.dtype)
    for head, matrix in _OVERWRITES.get(module.layer_idx, {}).items():
        probs[:, head] = matrix.to(probs.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(REFERENCE, eager_overwrite_attention)
AttentionMaskInterface.register(REFERENCE, eager_mask)


def random_batch(lengths=(13, 9, 4), vocab=200, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return make_batch([torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths])


def run_plain(model, batch, implementation="eager"):
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        model.set_attn_implementation(previous)


def reference_logits(model, batch, matrices):
    """Logits with eager attention whose flagged heads' probabilities are Π."""
    _OVERWRITES.clear()
    for (layer, head), matrix in matrices.items():
        _OVERWRITES.setdefault(layer, {})[head] = torch.as_tensor(matrix)
    try:
        return run_plain(model, batch, REFERENCE)
    finally:
        _OVERWRITES.clear()


def replaced_logits(model, heads, batch, impl="auto"):
    with replace_heads(model, heads, impl=impl) as replacement:
        matrices = replacement.head_matrices(batch)
        logits = replacement.forward(batch).logits
    return logits, matrices


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def tiny(request):
    model, _ = request.getfixturevalue(request.param)
    return model


def test_identity_gate(tiny):
    batch = random_batch()
    expected = run_plain(tiny, batch)
    with replace_heads(tiny) as replacement:
        got = replacement.forward(batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_identity_gate_through_the_triton_kernel(tiny):
    batch = random_batch(lengths=(9, 5))
    expected = run_plain(tiny, batch)
    with replace_heads(tiny, impl="triton") as replacement:
        got = replacement.forward(batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_replacement_gate(tiny, impl):
    batch = random_batch()
    heads = {(0, 1): random_program_matrices(batch, 0), (1, 3): "uniform",
             (1, 0): random_program_matrices(batch, 1)}
    got, matrices = replaced_logits(tiny, heads, batch, impl=impl)
    expected = reference_logits(tiny, batch, matrices)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - run_plain(tiny, batch)).abs().max() > 1e-3  # the replacement did something


def test_program_applied_after_output_projection_fails_the_gate(tiny_llama):
    """The authors' first placement, Π on the o_proj output slice of a head, mixes heads."""
    model, _ = tiny_llama
    batch = random_batch()
    matrix = random_program_matrices(batch, 0)
    expected = reference_logits(model, batch, {(1, 2): matrix})

    attention = model.model.layers[1].self_attn
    head_dim = attention.head_dim

    def after_o_proj(module, args, output):
        hidden = output[0].clone()  # [B, n, hidden] after o_proj
        cols = slice(2 * head_dim, 3 * head_dim)
        hidden[..., cols] = torch.matmul(matrix, hidden[..., cols])
        return (hidden,) + tuple(output[1:])

    handle = attention.register_forward_hook(after_o_proj)
    try:
        wrong = run_plain(model, batch)
    finally:
        handle.remove()
    assert (wrong - expected).abs().max() > 1e-2


def test_model_implementation_restored_and_state_cleared(tiny_gpt2):
    model, _ = tiny_gpt2
    batch = random_batch()
    with replace_heads(model, {(0, 0): "uniform"}) as replacement:
        assert model.config._attn_implementation == "attnprog"
        replacement.prepare(batch)
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_attnprog_override") for m in model.modules())


def test_unknown_head_is_a_user_error(tiny_gpt2):
    model, _ = tiny_gpt2
    with pytest.raises(ModelError, match="2 layers x 4 heads"):
        with replace_heads(model, {(5, 0): "uniform"}):
            pass


def test_failed_program_rows_become_one_hot_on_first_token(tiny_gpt2):
    model, _ = tiny_gpt2
    batch = random_batch(lengths=(4,))
    with replace_heads(model, {(0, 0): torch.zeros(1, 4, 4)}) as replacement:
        matrix = replacement.head_matrices(batch)[(0, 0)]
    np.testing.assert_array_equal(matrix[0, :, 0], np.ones(4))


@pytest.mark.slow
def test_identity_gate_smollm2(smollm2):
    model, tokenizer = smollm2
    texts = ["The cat sat on the mat because it was warm.", "Once upon a time, a fox"]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    batch = make_batch(ids, pad_id=0)
    expected = run_plain(model, batch)
    with replace_heads(model) as replacement:
        got = replacement.forward(batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_replacement_gate_smollm2(smollm2):
    model, tokenizer = smollm2
    ids = [tokenizer(text)["input_ids"] for text in ["Tom gave the ball to Sue.", "Hi there"]]
    batch = make_batch(ids, pad_id=0)
    heads = {(0, 0): "uniform", (3, 4): random_program_matrices(batch, 0), (29, 8): "uniform"}
    got, matrices = replaced_logits(model, heads, batch)
    expected = reference_logits(model, batch, matrices)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_program_source_runs_through_the_sandbox_on_the_batch_texts(tiny_gpt2):
    from attnprog.synth.generator.golden import golden_programs

    model, tokenizer = tiny_gpt2
    previous_token = golden_programs()[1]  # token i attends to i - 1 (token 0 to itself)
    with replace_heads(model, {(1, 1): previous_token}, tokenizer=tokenizer) as replacement:
        batch = replacement.batch_from_texts(["The cat sat.", "A dog ran home today."])
        matrix = replacement.head_matrices(batch)[(1, 1)]
        got = replacement.forward(batch).logits
    n = batch.lengths[1]
    expected_matrix = np.eye(n, k=-1)
    expected_matrix[0, 0] = 1.0
    np.testing.assert_array_equal(matrix[1, :n, :n], expected_matrix)
    assert matrix[0, batch.lengths[0]:].sum() == 0.0  # padding rows stay empty
    expected = reference_logits(model, batch, {(1, 1): matrix})
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_fixed_matrices_of_the_caller_are_not_modified(tiny_gpt2):
    # empty rows are fixed on a copy: the caller's tensor (shared memory with numpy) stays as is
    model, _ = tiny_gpt2
    batch = random_batch(lengths=(4,))
    fixed = torch.zeros(1, 4, 4)
    with replace_heads(model, {(0, 0): fixed}) as replacement:
        replacement.head_matrices(batch)
    assert (fixed == 0).all()


def test_precomputed_outputs_of_other_lengths_are_a_user_error(tiny_gpt2):
    from attnprog.engine.replace import OutputsRow
    from attnprog.layout import causal_offsets
    from attnprog.synth.runtime.outputs import ProgramOutputs

    model, _ = tiny_gpt2
    lengths = [5, 3]  # the batch's texts have 13 and 9 tokens
    offsets = causal_offsets(lengths)
    outputs = ProgramOutputs([object()], np.ones((1, int(offsets[-1])), np.float32),
                             np.zeros((1, 2), bool), offsets)
    batch = random_batch(lengths=(13, 9))
    batch.indices = [0, 1]
    with replace_heads(model, {(0, 0): OutputsRow(outputs, 0)}) as replacement:
        with pytest.raises(ModelError, match="token counts"):
            replacement.head_matrices(batch)
