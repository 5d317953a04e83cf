"""Head replacement in Hugging Face models: chosen heads attend with program matrices.

``replace_heads(model, {(layer, head): source})`` switches the model to the ``attnprog``
attention implementation (registered with transformers' ``AttentionInterface`` and
``AttentionMaskInterface``), builds each replaced head's matrix Π for the texts of a batch
and hands them to ``kernels.override``, which uses Π instead of softmax(QKᵀ) *before* the
values are mixed, per head. On exit the model's previous implementation is restored.

Architectures: the attention function honours what transformers hands it — GQA/MQA, any
``scaling``, logit ``softcap`` (Gemma 2), sink logits ``s_aux`` (GPT-OSS) and sliding-window
masks (Mistral, Gemma 2/3, GPT-OSS, ...). A sliding-window mask reaches the kernels as a window
size; any other mask it does not recognise is used as given, on the reference path. A keyword it
does not know raises ``ModelError`` instead of being dropped.

A source is a ``Program`` (run through ``synth.runtime.evaluate``), ``"uniform"`` (the uniform causal
matrix), ``"zero"`` (an all-zero matrix, so the head's output is exactly zero: zero ablation),
``OutputsRow(outputs, row)`` (precomputed program outputs on a corpus; batches then carry corpus
indices), a tensor [B, n, n] (fixed matrices, for tests), or ``MeanOutput(vector)``: the head
attends normally and its output, before the output projection, is replaced by a fixed vector
[head_dim] at every position (mean ablation, see ``engine.ablation``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from attnprog.engine.batching import Batch, make_batch, pad_token_id
from attnprog.engine.heads import head_label_of
from attnprog.errors import ModelError, StoreError
from attnprog.kernels.override import (
    override_attention,
    override_attention_reference,
    override_attention_torch,
    visible_mask,
)
from attnprog.layout import n_cells, tril_index

ATTN_NAME = "attnprog"
_STATE_ATTR = "_attnprog_override"
# set on a dense mask attnprog_mask recognised: (key_valid [B, kv] or None, window or None)
_COMPACT_ATTR = "_attnprog_compact"
# keywords transformers passes that change nothing here: positions are already in q and k,
# caching and output flags are the model's business, and the sliding window is in the mask
# (which is all eager attention reads of it)
HARMLESS_KWARGS = frozenset({
    "position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states",
    "output_router_logits", "return_dict", "sliding_window",
})


# --- registration with transformers -----------------------------------------------------------


def attnprog_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask our attention expects: None (plain causal), [B, kv] key validity, or 4D bool.

    The kernel applies causality itself, so a padded causal batch needs only which keys are
    real. Other masks are materialised; one that is exactly causal, padding and a sliding
    window of ``local_size`` is marked so the kernels get the window instead of the mask.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    q_offset = int(q_offset)
    aligned = int(kv_offset) == 0 and q_offset + q_length == kv_length
    key_valid = _key_valid(attention_mask, kv_length)
    if mask_function in (None, causal_mask_function) and aligned:
        return key_valid
    kwargs.pop("allow_is_causal_skip", None)
    dense = sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        local_size=local_size, allow_is_causal_skip=False, **kwargs,
    )  # fmt: skip
    if aligned and isinstance(dense, torch.Tensor) and dense.dtype == torch.bool:
        # checked cell by cell, so a mask function we do not know is never mistaken for one
        expected = visible_mask(batch_size, q_length, kv_length, key_valid, dense.device,
                                local_size)
        if dense.shape == expected.shape and torch.equal(dense, expected):
            setattr(dense, _COMPACT_ATTR, (key_valid, local_size))
    return dense


def _key_valid(attention_mask: torch.Tensor | None, kv_length: int) -> torch.Tensor | None:
    """[B, kv] bool from a 2D padding mask; None when every key is real."""
    if attention_mask is None:
        return None
    key_valid = attention_mask.to(torch.bool)[:, :kv_length]
    if key_valid.shape[-1] < kv_length:  # a mask shorter than the keys: the rest are real
        missing = kv_length - key_valid.shape[-1]
        key_valid = torch.nn.functional.pad(key_valid, (0, missing), value=True)
    return None if bool(key_valid.all()) else key_valid


def attnprog_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``AttentionInterface``: [B, H, n, D] in, [B, n, H, D] out."""
    if dropout:
        raise ModelError("attnprog attention is inference-only: call model.eval() first")
    _check_kwargs(module, kwargs)
    mask = _mask_args(attention_mask)
    features = {"scale": scaling, "softcap": softcap, "sinks": s_aux}
    state: LayerOverride | None = getattr(module, _STATE_ATTR, None)
    if state is not None and state.probe is not None:
        return _probe_attention(query, key, value, mask, features, state), None
    flags = program_probs = None
    impl = "auto"
    if state is not None:
        flags, program_probs, impl = state.flags, state.program_probs, state.impl
        if program_probs is not None and program_probs.shape[-2:] != (query.shape[2], key.shape[2]):
            raise ModelError(
                f"layer {module.layer_idx}: program matrices are {tuple(program_probs.shape[-2:])} "
                f"but the batch has {query.shape[2]} tokens; run the batch through the replacement"
            )
    if "attn_mask" in mask:  # a mask the kernels do not know: materialise
        out = override_attention_reference(query, key, value, flags, program_probs, **mask,
                                           **features)
    else:
        out = override_attention(query, key, value, flags, program_probs, **mask, **features,
                                 impl=impl)  # [B, H, n, D]
    if state is not None:
        out = _fixed_outputs(out, state)
    return out.transpose(1, 2), None


def _fixed_outputs(out: torch.Tensor, state: LayerOverride) -> torch.Tensor:
    """Mean-ablated heads output their fixed vector at every position; a capture records
    every head's output [B, H, n, D] as the output projection would read it."""
    if state.mean_heads is not None:
        values = state.mean_values.to(device=out.device, dtype=out.dtype)  # [F, D]
        out[:, state.mean_heads.to(out.device)] = values[None, :, None, :]
    if state.capture is not None:
        state.capture.append(out.detach())
    return out


def _check_kwargs(module: torch.nn.Module, kwargs: dict) -> None:
    """Raise on a keyword that could change attention and that we would otherwise drop."""
    for name, value in kwargs.items():
        if value is None or name in HARMLESS_KWARGS or (name == "is_causal" and value is True):
            continue
        shown = type(value).__name__ if isinstance(value, torch.Tensor) else repr(value)[:40]
        raise ModelError(
            f"{type(module).__name__} passes {name}={shown} to its attention, which attnprog's "
            "attention does not implement: heads of this architecture cannot be replaced "
            "correctly (extraction still works); please report the model"
        )


def _mask_args(attention_mask: torch.Tensor | None) -> dict:
    """The mask as kernel arguments: key_valid (and window), or attn_mask when unrecognised."""
    if attention_mask is None:
        return {}
    if attention_mask.dim() == 2:
        return {"key_valid": attention_mask}
    if attention_mask.dim() != 4:
        raise ModelError(f"unexpected {attention_mask.dim()}D attention mask")
    compact = getattr(attention_mask, _COMPACT_ATTR, None)
    if compact is None:
        return {"attn_mask": attention_mask}
    key_valid, window = compact
    return {"key_valid": key_valid, "window": window}


def _probe_attention(query, key, value, mask: dict, features: dict, state) -> torch.Tensor:
    """Every head attends normally (differentiably); the flagged heads' change of output
    had they used Π, (Π − A)·V, is recorded in ``state.probe`` beside that output."""
    attend = override_attention_reference if "attn_mask" in mask else override_attention_torch
    out = attend(query, key, value, None, None, **mask, **features)
    heads = state.flags.nonzero().reshape(-1)
    with torch.no_grad():
        replaced = override_attention_reference(
            query, key, value, state.flags, state.program_probs, **mask, **features
        )
        delta = replaced[:, heads].float() - out[:, heads].detach().float()  # [B, F, n, D]
    state.probe.append((out, heads, delta))
    return out.transpose(1, 2)


def register() -> None:
    """Register ``attnprog`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, attnprog_attention)
    AttentionMaskInterface.register(ATTN_NAME, attnprog_mask)


# --- batches and matrix sources ---------------------------------------------------------------


@dataclass(frozen=True)
class MeanOutput:
    """A head's fixed output vector [head_dim], used at every position (mean ablation)."""

    vector: torch.Tensor


@dataclass(frozen=True)
class OutputsRow:
    """Row ``row`` of precomputed ``ProgramOutputs``; batches must carry ``indices``."""

    outputs: object  # attnprog.synth.runtime.outputs.ProgramOutputs
    row: int


def dense_from_packed(
    values: np.ndarray,
    offsets: np.ndarray,
    texts: Sequence[int],
    width: int,
    programs: Sequence[int] | None = None,
) -> np.ndarray:
    """Rows ``programs`` (all when None) of packed [P, C] values -> [R, B, width, width] float32.

    Text b's block sits at the top-left of its width x width matrix. Only the batch's cells
    are read: a pool's outputs on a whole corpus can be gigabytes.
    """
    programs = list(range(values.shape[0])) if programs is None else list(programs)
    dense = np.zeros((len(programs), len(texts), width, width), dtype=np.float32)
    for b, s in enumerate(texts):
        start, stop = int(offsets[s]), int(offsets[s + 1])
        n = (math.isqrt(8 * (stop - start) + 1) - 1) // 2  # inverts n_cells(n) = n(n+1)/2
        rows, cols = tril_index(n)
        dense[:, b, rows, cols] = values[programs, start:stop]
    return dense


def uniform_causal(lengths: Sequence[int], width: int) -> np.ndarray:
    """[B, width, width]: row i of text b spreads evenly over tokens 0..i."""
    tri = np.tril(np.ones((width, width), dtype=np.float32))
    tri /= tri.sum(axis=1, keepdims=True)
    dense = np.zeros((len(lengths), width, width), dtype=np.float32)
    for b, n in enumerate(lengths):
        dense[b, :n, :n] = tri[:n, :n]
    return dense


def _fix_empty_rows(dense: np.ndarray, lengths: Sequence[int]) -> None:
    """In place on [..., B, n, n]: a real query row with no mass on real keys (a failed
    program) becomes one-hot on position 0."""
    width = dense.shape[-1]
    real = np.arange(width)[None, :] < np.asarray(lengths)[:, None]  # [B, n] real tokens
    mass = (dense * real[:, None, :]).sum(axis=-1)  # [..., B, n] over real keys only
    dense[..., 0][(mass <= 0.0) & real] = 1.0


def _check_outputs_cover(offsets: np.ndarray, batch: Batch) -> None:
    """Precomputed outputs must hold the batch's texts, at ``batch.indices``, same lengths."""
    if batch.indices is None:
        raise ModelError("precomputed outputs need batch.indices (the texts' corpus positions)")
    n_texts = len(offsets) - 1
    if any(not 0 <= s < n_texts for s in batch.indices):
        raise ModelError(f"batch.indices {batch.indices} point past the {n_texts} texts of the "
                         "precomputed outputs: evaluate the programs on these texts")
    cells = np.diff(np.asarray(offsets))[list(batch.indices)]
    if cells.tolist() != [n_cells(n) for n in batch.lengths]:
        raise ModelError("precomputed outputs have other token counts than the batch's texts: "
                         "evaluate the programs on the same tokenised texts")


# --- the per-layer state the attention function reads -----------------------------------------


@dataclass
class LayerOverride:
    """What one attention module needs: flags [H] bool, Π [B, flagged, n, n], kernel choice.

    ``probe``, when a list, switches the module to probing (see ``engine.head_costs``): heads
    attend normally and (output, flagged heads, (Π − A)·V) is appended to it. ``mean_heads``
    [F] output ``mean_values`` [F, head_dim] instead; ``capture``, a list, receives every output.
    """

    flags: torch.Tensor
    program_probs: torch.Tensor | None = None
    impl: str = "auto"
    probe: list | None = None
    mean_heads: torch.Tensor | None = None
    mean_values: torch.Tensor | None = None
    capture: list | None = None


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Self-attention modules by layer index (GPT-2, Llama family and alike)."""
    found = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if layer is None or "Attention" not in type(module).__name__:
            continue
        if getattr(module, "is_cross_attention", False):
            continue
        found.setdefault(int(layer), module)
    if not found:
        raise ModelError(f"{type(model).__name__} has no attention modules with a layer index")
    return found


def head_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(layers, query heads per layer) from the model config."""
    config = model.config
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    return int(n_layers), int(n_heads)


@dataclass
class HeadReplacement:
    """Live replacement inside ``replace_heads``: builds Π per batch and runs the model."""

    model: torch.nn.Module
    heads: dict = field(default_factory=dict)
    tokenizer: object = None
    impl: str = "auto"
    capture: dict | None = None  # layer -> list of outputs [B, H, n, D], when set

    def __post_init__(self) -> None:
        self.n_layers, self.n_heads = head_counts(self.model)
        self.modules = attention_modules(self.model)
        self.use(self.heads)

    def use(self, heads: Mapping) -> None:
        """Replace ``heads`` (layer, head) -> source from the next batch on."""
        self.heads = dict(heads)
        for key in self.heads:
            layer, head = key
            if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
                raise ModelError(
                    f"head {head_label_of(layer, head)} does not exist: the model has "
                    f"{self.n_layers} layers x {self.n_heads} heads"
                )

    # --- Π for one batch ---------------------------------------------------------------------
    def head_matrices(self, batch: Batch) -> dict[tuple[int, int], np.ndarray]:
        """Each replaced head's [B, n, n] float32 matrices for the batch.

        New arrays, never the caller's; the "uniform" heads share one.
        """
        matrices: dict[tuple[int, int], np.ndarray] = {}
        program_keys = []
        by_outputs: dict[int, list] = {}
        uniform = None  # one array for every "uniform" head: it is the same matrix
        zero = None  # likewise for "zero" heads, whose empty rows must stay empty
        for key, source in self.heads.items():
            if isinstance(source, MeanOutput):
                continue  # not a matrix: the head's output is fixed after attention
            if isinstance(source, str):
                if source not in ("uniform", "zero"):
                    raise ModelError(f"unknown head source {source!r}: use 'uniform', 'zero' "
                                     "or a Program")
                if source == "zero":
                    if zero is None:
                        zero = np.zeros((batch.size, batch.width, batch.width), np.float32)
                    matrices[key] = zero
                    continue
                if uniform is None:
                    uniform = uniform_causal(batch.lengths, batch.width)
                matrices[key] = uniform
            elif isinstance(source, (torch.Tensor, np.ndarray)):
                # a copy: empty rows are fixed in place below, never in the caller's matrices
                fixed = torch.as_tensor(source).detach().cpu().float().numpy().copy()
                if fixed.shape != (batch.size, batch.width, batch.width):
                    raise ModelError(
                        f"fixed matrices for head {head_label_of(*key)} are {fixed.shape}, the batch needs "
                        f"{(batch.size, batch.width, batch.width)}"
                    )
                matrices[key] = fixed
            elif isinstance(source, OutputsRow):
                by_outputs.setdefault(id(source.outputs), []).append((key, source))
            else:
                program_keys.append(key)

        for group in by_outputs.values():
            outputs = group[0][1].outputs
            _check_outputs_cover(outputs.offsets, batch)
            rows = [source.row for _, source in group]
            dense = dense_from_packed(
                outputs.values, outputs.offsets, batch.indices, batch.width, programs=rows
            )
            matrices.update((key, block) for (key, _), block in zip(group, dense, strict=True))

        if program_keys:
            matrices.update(self._program_matrices(program_keys, batch))
        for block in {id(block): block for block in matrices.values()}.values():
            if block is not zero:  # zero ablation keeps its rows empty: the head outputs 0
                _fix_empty_rows(block, batch.lengths)
        return matrices

    def _program_matrices(self, keys, batch: Batch) -> dict:
        from attnprog.synth.runtime.evaluate import evaluate_programs

        if batch.sentences is None:
            raise ModelError("Program sources need the batch's sentences: use forward_texts()")
        programs = list(dict.fromkeys(self.heads[key] for key in keys))  # distinct, in order
        outputs = evaluate_programs(programs, batch.sentences, progress=False)
        dense = dense_from_packed(outputs.values, outputs.offsets, range(batch.size), batch.width)
        row_of = {program: i for i, program in enumerate(programs)}
        return {key: dense[row_of[self.heads[key]]] for key in keys}

    # --- running ---------------------------------------------------------------------------------
    def prepare(self, batch: Batch) -> None:
        """Set every layer's flags and Π for this batch."""
        matrices = self.head_matrices(batch) if self.heads else {}
        self.install({key: torch.from_numpy(m) for key, m in matrices.items()},
                     batch.input_ids.device)

    def install(self, matrices: Mapping, device) -> None:
        """Set every layer's flags and Π from ready matrices {(layer, head): [B, n_q, n_kv]}
        (tensors; n_q < n_kv when decoding with a KV cache: the queries are the last ones)."""
        dtype = next(self.model.parameters()).dtype
        for layer, module in self.modules.items():
            heads = sorted(head for (lay, head) in matrices if lay == layer)
            flags = torch.zeros(self.n_heads, dtype=torch.bool)
            flags[heads] = True
            probs = None
            if heads:
                # [B, F, n_q, n_kv], flagged heads in ascending order as the kernel expects;
                # Π in the model's dtype, as eager attention casts its probabilities
                probs = torch.stack([matrices[(layer, head)] for head in heads], dim=1).to(
                    device=device, dtype=dtype)
            state = LayerOverride(flags, probs, self.impl, **self._means(layer))
            if self.capture is not None:
                state.capture = self.capture.setdefault(layer, [])
            setattr(module, _STATE_ATTR, state)

    def _means(self, layer: int) -> dict:
        """LayerOverride's mean_heads and mean_values for the layer's mean-ablated heads."""
        heads = sorted(h for (lay, h), source in self.heads.items()
                       if lay == layer and isinstance(source, MeanOutput))
        if not heads:
            return {}
        vectors = [torch.as_tensor(self.heads[(layer, h)].vector).float() for h in heads]
        return {"mean_heads": torch.tensor(heads), "mean_values": torch.stack(vectors)}

    def clear(self) -> None:
        for module in self.modules.values():
            if hasattr(module, _STATE_ATTR):
                delattr(module, _STATE_ATTR)

    @torch.no_grad()
    def forward(self, batch: Batch):
        """Run the model on the batch with the replaced heads; returns the model output."""
        self.prepare(batch)
        try:
            return self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
        finally:
            self.clear()

    def batch_from_texts(self, texts: Sequence[str]) -> Batch:
        """Tokenise texts the way programs see them (synth features) into a batch."""
        from attnprog.synth.features import sentences_from_texts

        if self.tokenizer is None:
            raise ModelError("replace_heads needs tokenizer= to run raw texts")
        sentences = sentences_from_texts(list(texts), self.tokenizer)
        return make_batch(
            [s.ids for s in sentences],
            pad_id=pad_token_id(self.tokenizer),
            sentences=sentences,
            device=_model_device(self.model),
        )

    def forward_texts(self, texts: Sequence[str]):
        return self.forward(self.batch_from_texts(texts))


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def replace_heads(
    model: torch.nn.Module,
    heads: Mapping[tuple[int, int], object] | None = None,
    *,
    tokenizer=None,
    impl: str = "auto",
) -> Iterator[HeadReplacement]:
    """Switch ``model`` to attnprog attention with ``heads`` replaced; restore on exit.

    ``impl`` picks the kernel: "auto" (Triton on CUDA, else SDPA + matmul), "triton",
    "torch", or "reference" (materialised eager probabilities, overwritten).
    """
    if model.training:
        raise ModelError("head replacement is inference-only: call model.eval() first")
    register()
    previous = model.config._attn_implementation
    replacement = HeadReplacement(model, dict(heads or {}), tokenizer, impl)
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise ModelError(f"{type(model).__name__} cannot switch its attention implementation")
    try:
        yield replacement
    finally:
        replacement.clear()
        model.set_attn_implementation(previous)


def check_replaceable(model: torch.nn.Module) -> None:
    """Raise now, not stages later, the ModelError replacing heads of ``model`` would raise:
    one forward pass of four tokens with a head replaced."""
    batch = make_batch([[0, 1, 2, 3]], device=_model_device(model))
    with replace_heads(model, {(0, 0): "uniform"}) as replacement:
        replacement.forward(batch)


# --- best fits and the outputs replaced heads read ---------------------------------------------


def best_fit(table) -> tuple[np.ndarray, np.ndarray]:
    """(best IoU [H], best program index [H]) as numpy."""
    if hasattr(table, "best"):
        best_iou, best_index = table.best()
    else:
        best_iou, best_index = torch.as_tensor(table.iou).max(0)
    return (torch.as_tensor(best_iou).float().cpu().numpy(),
            torch.as_tensor(best_index).long().cpu().numpy())


def evaluate_needed(programs, sentences, progress: bool):
    """Run ``programs`` on ``sentences`` in the sandbox (only those a sweep needs)."""
    from attnprog.synth.runtime.evaluate import evaluate_programs

    return evaluate_programs(programs, sentences, progress=progress)


def n_texts_of(outputs) -> int:
    """Texts that program outputs cover."""
    return len(outputs.offsets) - 1


def outputs_for(table, needed, outputs, sentences, n_texts: int, progress: bool = False):
    """(ProgramOutputs, program index -> row): given ones cover all programs, else run needed.

    ``sentences`` is called only when the programs must run; given outputs must cover
    ``n_texts`` texts.
    """
    if outputs is not None:
        if n_texts_of(outputs) != n_texts:
            raise StoreError(f"program outputs cover {n_texts_of(outputs)} texts, expected "
                             f"{n_texts}: evaluate them on the same texts")
        if outputs.n_programs != len(table.programs):
            raise StoreError(f"program outputs hold {outputs.n_programs} programs, the IoU "
                             f"table {len(table.programs)}: evaluate the table's programs")
        # only the rows the sweep uses, so streamed outputs compute just those
        return outputs.select(needed), {p: row for row, p in enumerate(needed)}
    if not needed:
        return None, {}
    evaluated = evaluate_needed([table.programs[p] for p in needed], sentences(), progress)
    return evaluated, {p: row for row, p in enumerate(needed)}
