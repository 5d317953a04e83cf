import pytest

from attnprog.engine.models import (
    BUILTIN_MODELS,
    attention_shape,
    load_model,
    model_id,
    resolve_device,
    spec_of_id,
    tiny_model,
)
from attnprog.errors import DeviceError, ModelError


def test_unknown_model_name_lists_the_builtin_names():
    with pytest.raises(ModelError) as err:
        load_model("no-such-model")
    for name in BUILTIN_MODELS:
        assert name in str(err.value)


@pytest.mark.parametrize("spec", ["weights/missing.gguf", "./missing-checkpoint"])
def test_a_path_that_does_not_exist_is_named_as_missing(spec):
    with pytest.raises(ModelError, match="no such model file or directory"):
        load_model(spec)


def test_hub_id_while_offline_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="offline"):
        load_model("nobody-has/this-model")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


def test_a_device_torch_does_not_know_is_refused_with_the_choices():
    with pytest.raises(DeviceError, match="unknown device 'tpu': use auto, cpu, cuda"):
        resolve_device("tpu")


def test_a_gpu_the_machine_lacks_is_refused_before_any_model_loads():
    with pytest.raises(DeviceError, match="'cuda:99': this machine has .*use --device auto or cpu"):
        resolve_device("cuda:99")


def test_tiny_llama_has_grouped_query_attention():
    model, _ = tiny_model("llama")
    assert attention_shape(model) == (2, 4, 2)


def test_tiny_models_are_deterministic():
    first, _ = tiny_model("gpt2", seed=3)
    second, _ = tiny_model("gpt2", seed=3)
    for a, b in zip(first.parameters(), second.parameters()):
        assert a.equal(b)


@pytest.mark.slow
def test_builtin_smollm2_is_a_30_by_9_llama_with_3_kv_heads(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert attention_shape(model) == (30, 9, 3)
    assert model.config._attn_implementation == "eager"
    assert tokenizer("Once upon a time").input_ids


@pytest.mark.slow
def test_builtin_smollm2_predicts_plausible_english(smollm2):
    import torch

    model, tokenizer = smollm2
    ids = tokenizer("One, two, three, four,", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert "five" in tokenizer.decode([next_id]).lower()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_the_id_a_store_records_loads_the_same_model_again(name):
    """replace without --model loads the store's model from this id."""
    model, _ = load_model(name)
    again, _ = load_model(spec_of_id(model_id(model)))
    assert model_id(again) == model_id(model)


def test_a_hub_or_builtin_id_loads_by_its_name_before_the_revision():
    assert spec_of_id("smollm2-135m@sha256:b179c952") == "smollm2-135m"
    assert spec_of_id("openai-community/gpt2@607a30d7") == "openai-community/gpt2"
