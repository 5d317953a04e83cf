import numpy as np

from attnprog.layout import causal_offsets, n_cells, pack, prefix_cells, text_cells, tril_index, unpack


def test_offsets_start_each_text_and_end_at_total_cells():
    offsets = causal_offsets([1, 3, 2])
    assert offsets.tolist() == [0, 1, 7, 10]
    assert offsets[-1] == sum(n_cells(n) for n in (1, 3, 2))


def test_pack_is_row_major_lower_triangle():
    matrix = np.arange(9).reshape(3, 3)
    assert pack(matrix).tolist() == [0, 3, 4, 6, 7, 8]


def test_unpack_inverts_pack_and_zeroes_the_upper_triangle():
    matrix = np.tril(np.random.default_rng(0).random((5, 5)))
    assert np.array_equal(unpack(pack(matrix), 5), matrix)


def test_tril_index_is_read_only_so_the_cache_cannot_be_corrupted():
    rows, _ = tril_index(4)
    assert not rows.flags.writeable


def test_text_cells_lists_the_cells_of_the_given_texts_in_the_given_order():
    offsets = causal_offsets([1, 3, 2])  # texts at cells [0, 1), [1, 7), [7, 10)
    assert text_cells(offsets, [2, 0]).tolist() == [7, 8, 9, 0]
    assert text_cells(offsets, []).tolist() == []


def test_prefix_cells_are_each_texts_first_rows_packed_on_their_own():
    lengths = [4, 2, 5]
    matrices = [np.arange(n * n, dtype=float).reshape(n, n) + 100 * s for s, n in enumerate(lengths)]
    packed = np.concatenate([pack(m) for m in matrices])
    cells, offsets = prefix_cells(lengths, 3)
    expected = np.concatenate([pack(m[:3, :3]) for m in matrices])  # each text cut at 3 tokens
    assert np.array_equal(packed[cells], expected)
    assert offsets.tolist() == causal_offsets([3, 2, 3]).tolist()
