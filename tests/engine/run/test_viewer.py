"""The viewer's data: one byte per causal cell with rows scaled to their largest entry, one token
table, programs stored once, and a size that follows heads, programs and tokens as designed."""

import base64
import json

import numpy as np
import pytest
import torch

from attnprog.engine.run.viewer import (
    display_token,
    packed_cells,
    quantise_rows,
    token_table,
    viewer_data,
    viewer_texts,
)
from attnprog.engine.store import AttentionStore
from attnprog.synth.program import Program

PREVIOUS = Program(source="import numpy as np\ndef program(s):\n    n = len(s.tokens)\n"
                          "    return np.eye(n, k=-1)\n", name="program", family="previous")
FIRST = Program(source="import numpy as np\ndef program(s):\n    m = np.zeros((len(s.tokens),) * 2)\n"
                       "    m[:, 0] = 1\n    return m\n", name="program", family="first")


def causal(n, seed=0):
    rng = np.random.default_rng(seed)
    matrix = np.tril(rng.random((n, n)))
    return matrix / matrix.sum(1, keepdims=True)


def test_rows_are_scaled_so_their_largest_entry_is_255():
    cells = quantise_rows(causal(5))
    assert cells.dtype == np.uint8 and len(cells) == 15
    starts = [i * (i + 1) // 2 for i in range(5)]
    assert all(cells[s : s + i + 1].max() == 255 for i, s in enumerate(starts))


def test_a_row_is_recovered_by_dividing_by_its_sum():
    matrix = causal(12, seed=1)
    cells = quantise_rows(matrix).astype(float)
    i = 11
    row = cells[i * (i + 1) // 2 :][: i + 1]
    assert np.abs(row / row.sum() - matrix[i, : i + 1]).max() < 2e-3


def test_tokens_are_one_shared_table_shown_with_visible_spaces_and_breaks():
    table, texts = token_table([["\u0120the", "\u010a", "cat"], ["cat", "\u0120the"]])
    assert table == [" the", "\u23ce", "cat"] and texts == [[0, 1, 2], [2, 0]]
    assert display_token("x" * 40) == "x" * 15 + "\u2026"


def tiny_store(lengths=(20, 30, 6, 12), splits=("heldout", "heldout", "heldout", "synthesis"), heads=3):
    from attnprog.engine.store import packed_offsets_tensor

    offsets = packed_offsets_tensor(list(lengths))
    rng = np.random.default_rng(0)
    blocks = [np.stack([causal(n, seed=int(rng.integers(1e6)))[np.tril_indices(n)] for _ in range(heads)])
              for n in lengths]
    tokens = [[f"t{k}" for k in range(n)] for n in lengths]
    return AttentionStore(
        attn_packed=torch.tensor(np.concatenate(blocks, axis=1), dtype=torch.float32), offsets=offsets,
        lengths=torch.tensor(lengths), ids_packed=torch.arange(sum(lengths)), tokens=tokens,
        texts=[" ".join(t) for t in tokens], spans=[[(k, k + 1) for k in range(n)] for n in lengths],
        splits=list(splits), meta={"n_layers": 1, "n_heads": heads, "n_kv_heads": heads})


@pytest.fixture(scope="module")
def store():
    return tiny_store()


def test_the_texts_shown_are_held_out_and_long_enough(store):
    assert viewer_texts(store, 5) == [0, 1]


def test_the_blob_holds_the_heads_attention_as_stored(store):
    data = viewer_data(store, {0: PREVIOUS, 2: PREVIOUS}, [0, 1], keep=16)
    assert list(data["heads"]) == ["L0.H0", "L0.H2"] and list(data["programs"]) == [PREVIOUS.hash]
    cells = np.frombuffer(base64.b64decode(data["heads"]["L0.H2"]["model"]), dtype=np.uint8)
    expected = store.dense(2, 1).numpy()[:16, :16]
    second = cells[packed_cells([16]):].astype(float)
    i = 15
    row = second[i * (i + 1) // 2 :][: i + 1]
    assert np.abs(row / row.sum() - expected[i, : i + 1]).max() < 2e-3
    assert [data["tokens"][k] for k in data["texts"][1]["tokens"]] == store.tokens[1][:16]


def test_a_program_explaining_several_heads_is_stored_once(store):
    data = viewer_data(store, {0: PREVIOUS, 1: FIRST, 2: PREVIOUS}, [0], keep=8)
    assert sorted(data["programs"]) == sorted({PREVIOUS.hash, FIRST.hash})
    cells = np.frombuffer(base64.b64decode(data["programs"][FIRST.hash]), dtype=np.uint8)
    assert cells[:10].tolist() == [255, 255, 0, 255, 0, 0, 255, 0, 0, 0]  # every row on the first token


def test_the_blob_grows_with_heads_programs_and_tokens_as_designed(store):
    def size(programs, keep):
        data = viewer_data(store, programs, [0, 1], keep=keep)
        encoded = [h["model"] for h in data["heads"].values()] + list(data["programs"].values())
        return data, sum(len(base64.b64decode(x)) for x in encoded), len(json.dumps(data))

    for keep in (8, 16, 24):
        data, raw, total = size({0: PREVIOUS, 1: FIRST, 2: PREVIOUS}, keep)
        per_matrix = packed_cells([min(20, keep), min(30, keep)])
        assert raw == (3 + 2) * per_matrix  # three heads' attention, two distinct programs
        assert total < 4 / 3 * raw + 2000  # base64 plus tokens and keys
    one, three = size({0: PREVIOUS}, 16)[1], size({0: PREVIOUS, 1: PREVIOUS, 2: PREVIOUS}, 16)[1]
    assert three == one + 2 * packed_cells([16, 16])  # two more heads; the shared program once


def test_270_heads_at_the_default_settings_fit_in_8_mb():
    from attnprog.engine.run.viewer import VIEWER_TEXTS, VIEWER_TOKENS

    per_matrix = packed_cells([VIEWER_TOKENS] * VIEWER_TEXTS)  # every text at least as long as shown
    assert 4 / 3 * per_matrix * (270 + 270) < 6e6  # every head with its own program; the page's rest < 2 MB
