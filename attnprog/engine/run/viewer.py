"""The attention viewer's data: a handful of held-out texts, each cut to its first tokens, with
every explained head's attention and its program's output on them, one byte per causal cell.

A matrix is the top-left ``tokens`` x ``tokens`` block of a text's causal matrix (its rows are
whole: a query attends only to earlier keys), packed row by row as the lower triangle (i >= j)
and scaled so that each row's largest entry is 255. Rows sum to 1, so the page recovers a
value as q / (its row's sum of q). Each head's matrices over the texts are one base64 string;
a program's output is stored once however many heads it explains; tokens are one shared table.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import numpy as np

from attnprog.engine.heads import head_label

VIEWER_TEXTS = 5  # held-out texts in the viewer's text selector
VIEWER_TOKENS = 48  # tokens shown per text: 48 x 49 / 2 = 1,176 bytes per matrix
MIN_TOKENS = 8  # texts shorter than this are drawn only when no longer one is held out


def viewer_texts(store, count: int = VIEWER_TEXTS) -> list[int]:
    """Store indices of the texts to show: the first ``count`` held-out texts with enough tokens."""
    held = store.split_indices("heldout") if "heldout" in store.splits else list(range(store.n_texts))
    long = [s for s in held if int(store.lengths[s]) >= MIN_TOKENS]
    return (long or held)[:count]


def quantise_rows(matrix: np.ndarray) -> np.ndarray:
    """A causal matrix ``[query_pos, key_pos]`` as uint8 cells, lower triangle row by row, each row
    scaled so its largest entry is 255 (an all-zero row stays zero)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    top = matrix.max(axis=1, keepdims=True)
    scaled = np.divide(matrix, top, out=np.zeros_like(matrix), where=top > 0)
    rows, cols = np.tril_indices(len(matrix))
    return np.rint(np.clip(scaled[rows, cols], 0.0, 1.0) * 255).astype(np.uint8)


def packed_cells(lengths: Sequence[int]) -> int:
    """Bytes one head's (or one program's) matrices take over texts of these lengths."""
    return sum(n * (n + 1) // 2 for n in lengths)


def encode(matrices: Sequence[np.ndarray]) -> str:
    """Matrices (one per text, in order) as one base64 string of their quantised cells."""
    return base64.b64encode(b"".join(quantise_rows(m).tobytes() for m in matrices)).decode("ascii")


def display_token(piece: str) -> str:
    """A token as the page prints it: the tokenizer's space marks as spaces, line breaks and tabs
    as visible symbols, long pieces cut."""
    piece = piece.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\u23ce")
    piece = piece.replace("\n", "\u23ce").replace("\t", "\u21e5")
    return piece[:15] + "\u2026" if len(piece) > 16 else piece


def token_table(token_lists: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """(distinct display tokens, each text's tokens as indices into them)."""
    table: dict[str, int] = {}
    texts = [[table.setdefault(display_token(t), len(table)) for t in tokens] for tokens in token_lists]
    return list(table), texts


def program_matrices(store, programs: Sequence, texts: Sequence[int], keep: int) -> dict[str, list]:
    """{program hash: its output's top-left block per text}, each distinct program evaluated once."""
    from attnprog.synth.runtime.evaluate import evaluate_programs

    unique = list({p.hash: p for p in programs}.values())
    outputs = evaluate_programs(unique, store.sentences(texts),
                                tokenizer_id=store.meta.get("tokenizer_id", ""), progress=False)
    offsets = np.asarray(outputs.offsets)
    found = {}
    for k, program in enumerate(unique):
        found[program.hash] = []
        for t, s in enumerate(texts):
            n = int(store.lengths[s])
            dense = np.zeros((n, n), dtype=np.float32)
            dense[np.tril_indices(n)] = outputs.values[k, offsets[t] : offsets[t + 1]]
            found[program.hash].append(dense[: min(n, keep), : min(n, keep)])
    return found


def viewer_data(store, programs: Mapping[int, object], texts: Sequence[int],
                keep: int = VIEWER_TOKENS) -> dict:
    """The page's data blob for heads ``programs`` (head_index -> its Program) on store texts
    ``texts``: {"tokens": [...], "texts": [{"text", "tokens"}], "heads": {label: {"model",
    "program"}}, "programs": {hash: base64}}."""
    lengths = [min(int(store.lengths[s]), keep) for s in texts]
    tokens, text_tokens = token_table([store.tokens[s][:n] for s, n in zip(texts, lengths)])
    outputs = program_matrices(store, list(programs.values()), texts, keep) if texts else {}
    heads = {}
    for head_index, program in programs.items():
        model = [store.dense(head_index, s).float().cpu().numpy()[:n, :n] for s, n in zip(texts, lengths)]
        heads[head_label(head_index, store.n_heads)] = {"model": encode(model), "program": program.hash}
    return {"tokens": tokens,
            "texts": [{"text": int(s), "tokens": ids} for s, ids in zip(texts, text_tokens)],
            "heads": heads, "programs": {h: encode(m) for h, m in outputs.items()}}
