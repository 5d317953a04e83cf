"""Every common decoder architecture end to end, on tiny random models built here from configs.

For each architecture: extraction is the model's own eager attention; with no head replaced the
attnprog attention gives the eager logits; with heads replaced it gives eager attention whose
chosen heads' probabilities were overwritten before the values (a reference built below from
the model's own ``eager_attention_forward``, not from attnprog); the cost probe measures nothing
for a head whose program is its own attention. Windows are 8 keys and texts up to 40 tokens,
so sliding windows bite; Gemma 2's softcap is 1 and GPT-OSS's sinks are large, so they do too.
Two of them also go through a whole two-text ``attnprog run`` from a checkpoint directory.
"""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from attnprog.engine.batching import make_batch
from attnprog.engine.corpus import Corpus
from attnprog.engine.extract import extract_attention
from attnprog.engine.head_costs import head_costs
from attnprog.engine.models import TESTED_ARCHITECTURES, byte_tokenizer, load_model
from attnprog.engine.replace import check_replaceable, replace_heads
from attnprog.errors import ModelError
from attnprog.synth.program import Program
from attnprog.synth.runtime.outputs import ProgramOutputs
from tests.engine.planted import random_program_matrices

WINDOW = 8
COMMON = dict(vocab_size=260, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, pad_token_id=256, bos_token_id=256, eos_token_id=256,
              initializer_range=0.1)
SLIDING = dict(sliding_window=WINDOW)
MIXED = dict(SLIDING, layer_types=["sliding_attention", "full_attention"])
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
ARCHITECTURES = {  # model_type -> what its tiny config sets beyond COMMON
    "gpt2": dict(n_inner=64, head_dim=None, num_key_value_heads=None),
    "llama": {},
    "mistral": SLIDING,
    "ministral": SLIDING,
    "mixtral": dict(SLIDING, **MOE),
    "qwen2": dict(SLIDING, use_sliding_window=True, max_window_layers=1),
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=32),
    "qwen3": dict(SLIDING, use_sliding_window=True, max_window_layers=1),
    "qwen3_moe": MOE,
    "gemma": dict(num_key_value_heads=1),
    "gemma2": dict(SLIDING, attn_logit_softcapping=1.0, query_pre_attn_scalar=24),
    "gemma3_text": dict(SLIDING, sliding_window_pattern=2, query_pre_attn_scalar=24),
    "phi": dict(head_dim=None, num_key_value_heads=None, partial_rotary_factor=0.5),
    "phi3": SLIDING,
    "olmo2": {},
    "olmo3": MIXED,
    "gpt_oss": dict(SLIDING, **MOE),
    "starcoder2": SLIDING,
    "stablelm": dict(qk_layernorm=True, partial_rotary_factor=0.5, head_dim=None),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=1, head_dim=None,
                   num_key_value_heads=None),
    "nemotron": dict(partial_rotary_factor=0.5),
    "cohere2": MIXED,
    "smollm3": dict(no_rope_layer_interval=2),
    "granite": dict(attention_multiplier=0.3),
    "exaone4": dict(SLIDING, sliding_window_pattern=2),
    "glm4": dict(partial_rotary_factor=0.5),
}
TEXTS = [
    "Tom saw a cat by the door. The cat saw Tom!",
    "A small fox found a red ball in the woods.",
    "She opened the box and read the old letter twice.",
    "Hi there.",
]


def build(model_type: str, overrides: dict | None = None):
    """A tiny random model of this architecture, eager attention, seed 0."""
    settings = {**COMMON, **ARCHITECTURES.get(model_type, {}), **(overrides or {})}
    kwargs = {k: v for k, v in settings.items() if v is not None}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if model_type == "gpt_oss":
        with torch.no_grad():  # large sinks, so a path that ignored them would fail the gates
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request):
    return request.param, build(request.param)


@pytest.fixture(scope="module")
def store(arch):
    """The four texts' attention, extracted in one padded batch."""
    corpus = Corpus(TEXTS, ["selection"] * len(TEXTS), "architectures")
    return extract_attention(arch[1], byte_tokenizer(), corpus, batch_size=4, progress=False)


def test_the_tested_architectures_are_the_ones_tested_here():
    assert set(ARCHITECTURES) == set(TESTED_ARCHITECTURES)


def test_every_feature_is_present_in_the_tiny_configs():
    """The configs exercise what they claim: windows shorter than the texts, a softcap, sinks."""
    for name in ("gemma2", "gemma3_text", "gpt_oss", "olmo3", "cohere2", "exaone4"):
        assert build(name).config.layer_types == ["sliding_attention", "full_attention"], name
    assert build("gemma2").config.attn_logit_softcapping == 1.0
    assert build("gemma").config.num_key_value_heads == build("falcon").config.num_kv_heads == 1
    assert max(map(len, (byte_tokenizer()(t).input_ids for t in TEXTS))) > 4 * WINDOW


def test_models_command_lists_the_tested_architectures():
    from typer.testing import CliRunner

    from attnprog.cli import app

    output = CliRunner().invoke(app, ["models"]).output
    assert all(f"  {name} " in output for name in TESTED_ARCHITECTURES)


def test_a_model_of_another_architecture_warns_once_which_step_is_unverified(tmp_path):
    build("arcee").save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="arcee is not a tested architecture.*head replacement"):
        load_model(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(str(tmp_path))  # once per architecture


# --- the reference: the model's own eager attention, chosen heads overwritten -------------------

REFERENCE = "architectures_overwrite"
_OVERWRITES: dict[int, dict[int, torch.Tensor]] = {}  # layer -> head -> Π [B, n, n]


def eager_overwrite(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager probabilities; the chosen heads' overwritten by Π on the cells the
    layer's mask leaves visible; then the values."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    _, probs = eager(module, query, key, value, attention_mask, **kwargs)
    chosen = _OVERWRITES.get(module.layer_idx, {})
    if chosen:
        probs = probs.clone()
        visible = attention_mask[:, 0] == 0  # eager masks are additive: 0 where visible
        for head, matrix in chosen.items():
            probs[:, head] = matrix.to(probs.dtype) * visible
    groups = query.shape[1] // key.shape[1]
    out = torch.matmul(probs.to(value.dtype), value.repeat_interleave(groups, dim=1))
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(REFERENCE, eager_overwrite)
AttentionMaskInterface.register(REFERENCE, eager_mask)


def logits_with(model, implementation, batch):
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)


def random_batch(lengths=(40, 29, 11), seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return make_batch([torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths],
                      device=device)


def real_tokens(logits, batch):
    return logits[batch.attention_mask.bool()]


# --- the gates ----------------------------------------------------------------------------------


def test_extraction_is_the_models_own_eager_attention(arch, store):
    name, model = arch
    for s in range(store.n_texts):
        ids = torch.tensor([store.token_ids(s)])
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
        expected = torch.cat([a[0] for a in attentions])  # [L*H, n, n]
        got = torch.stack([store.dense(h, s) for h in range(store.n_rows)])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=name)


def identity_gate(model, device="cpu"):
    """(attnprog logits with no head replaced, eager logits) on the real tokens."""
    batch = random_batch(device=device)
    with replace_heads(model) as replacement:
        got = replacement.forward(batch).logits
    return real_tokens(got, batch), real_tokens(logits_with(model, "eager", batch), batch)


def test_no_head_replaced_gives_the_eager_logits(arch):
    name, model = arch
    got, expected = identity_gate(model)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=name)


def replacement_gate(model, impl, lengths=(40, 29, 11), device="cpu"):
    """(attnprog logits, reference logits, eager logits) with three heads replaced."""
    batch = random_batch(lengths, device=device)
    heads = {(0, 1): random_program_matrices(batch, 0), (1, 0): "uniform",
             (1, 3): random_program_matrices(batch, 1)}
    with replace_heads(model, heads, impl=impl) as replacement:
        matrices = replacement.head_matrices(batch)
        got = replacement.forward(batch).logits
    _OVERWRITES.clear()
    for (layer, head), matrix in matrices.items():
        _OVERWRITES.setdefault(layer, {})[head] = torch.as_tensor(matrix).to(device)
    try:
        expected = logits_with(model, REFERENCE, batch)
    finally:
        _OVERWRITES.clear()
    return real_tokens(got, batch), real_tokens(expected, batch), real_tokens(
        logits_with(model, "eager", batch), batch)


def test_replaced_heads_give_eager_attention_with_their_probabilities_overwritten(arch):
    name, model = arch
    got, expected, eager = replacement_gate(model, "auto")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=name)
    assert (got - eager).abs().max() > 1e-3, name  # the replacement did something


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gpt_oss"])
def test_the_fused_kernel_serves_windows_softcaps_and_sinks(name, monkeypatch):
    """The Triton kernel (interpreted on the CPU) through the model: window, softcap, sinks,
    every layer on the kernel (a mask it did not know would have gone to the reference)."""
    import attnprog.engine.replace as replace_module

    monkeypatch.setattr(replace_module, "override_attention_reference", None)
    got, expected, _ = replacement_gate(build(name), "triton", lengths=(24, 17))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.filterwarnings("error::RuntimeWarning")  # the kernel falling back to torch fails
def test_on_the_gpu_the_gates_hold_in_fp32_and_bf16(name, dtype):
    """The identity and replacement gates through the fused kernel, tolerances scaled. MoE
    models route to every expert: a bf16 rounding must not flip a discrete top-k choice."""
    every_expert = {"num_experts_per_tok": 4} if "num_experts_per_tok" in ARCHITECTURES[name] else {}
    model = build(name, every_expert).to("cuda", dtype)
    rel = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for got, expected in (identity_gate(model, "cuda"),
                          replacement_gate(model, "auto", device="cuda")[:2]):
        atol = rel * float(expected.abs().max())
        torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0, msg=name)


class OwnAttention:
    """IoU table stand-in: program h is head h's best fit."""

    def __init__(self, iou, programs):
        self.iou, self.programs = iou, programs

    def best(self):
        return self.iou.max(dim=0)


def test_the_cost_probe_sees_no_change_for_a_head_given_its_own_attention(arch, store,
                                                                          monkeypatch):
    """Δz = (Π − A)·V is zero when Π is the extracted A: the probe's attention is the model's."""
    import attnprog.engine.replace as replace_module

    name, model = arch
    changes = []  # max |Δz| of every layer's probe over real query tokens
    probe = replace_module._probe_attention

    def recording_probe(query, key, value, mask, features, state):
        out = probe(query, key, value, mask, features, state)
        delta = state.probe[-1][2].transpose(1, 2)  # [B, n, F, D]
        real = mask.get("key_valid")
        changes.append(float((delta if real is None else delta[real]).abs().max()))
        return out

    monkeypatch.setattr(replace_module, "_probe_attention", recording_probe)
    rows = store.n_rows
    programs = [Program(f"def copy{h}(s): ...", name=f"copy{h}") for h in range(rows)]
    outputs = ProgramOutputs(programs, store.attn_packed.numpy().copy(),
                             np.zeros((rows, store.n_texts), bool), store.offsets.numpy())
    costs = head_costs(model, store, OwnAttention(torch.eye(rows), programs), outputs=outputs,
                       method="linear", tokenizer=byte_tokenizer(), progress=False)
    assert len(changes) == COMMON["num_hidden_layers"] and max(changes) < 1e-5, (name, changes)
    np.testing.assert_allclose(costs.costs, 0.0, atol=1e-6, err_msg=name)
    assert np.isfinite(costs.base_nll) and costs.base_nll > 0


# --- what is refused, and what is left as given ---------------------------------------------


def test_an_attention_keyword_attnprog_does_not_know_is_refused(monkeypatch):
    model = build("llama")
    attention_module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    forward = attention_module.LlamaAttention.forward

    def with_position_bias(self, *args, **kwargs):
        return forward(self, *args, position_bias=torch.zeros(1), **kwargs)

    monkeypatch.setattr(attention_module.LlamaAttention, "forward", with_position_bias)
    with pytest.raises(ModelError, match="LlamaAttention passes position_bias=Tensor"):
        check_replaceable(model)


def test_a_mask_attnprog_does_not_recognise_is_used_as_given():
    """Only a mask equal, cell by cell, to causal + padding + window reaches the kernels as a
    window; any other (here chunked attention) stays dense, for the reference path."""
    from transformers.masking_utils import (
        chunked_causal_mask_function,
        sliding_window_causal_mask_function,
    )

    from attnprog.engine.replace import attnprog_mask

    shape = dict(batch_size=1, q_length=12, kv_length=12)
    sliding = attnprog_mask(**shape, mask_function=sliding_window_causal_mask_function(4),
                            local_size=4)
    assert sliding._attnprog_compact == (None, 4)
    chunked = attnprog_mask(**shape, local_size=4,
                            mask_function=chunked_causal_mask_function(4, torch.zeros(1, dtype=int)))
    assert chunked.dtype == torch.bool and not hasattr(chunked, "_attnprog_compact")


# --- whole runs ---------------------------------------------------------------------------------

RUN_TEXTS = ("She opened the box and read the old letter twice over.",  # heldout split
             "The sun rose over the hills and the birds began to sing.")  # selection split


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_a_two_text_run_finishes_with_a_report_on_a_checkpoint_directory(name, tmp_path):
    """A sliding-window and a softcapping model, saved as checkpoints, through `attnprog run`."""
    checkpoint, out = tmp_path / name, tmp_path / "run"
    build(name).save_pretrained(checkpoint)
    byte_tokenizer().save_pretrained(checkpoint)
    (tmp_path / "texts.txt").write_text("\n".join(RUN_TEXTS) + "\n")
    result = subprocess.run(
        [sys.executable, "-c", "from attnprog.cli import main; main()", "run", "--model",
         str(checkpoint), "--out", str(out), "--corpus", str(tmp_path / "texts.txt"),
         "--max-tokens", "24", "--candidates", "20", "--no-qa", "--no-fit", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "head costs (fisher" in result.stdout and (out / "report.html").is_file()
    assert "not a tested architecture" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ppl_increase"]["cost"]["0.25"]["programs"] is not None

