"""check_leaks: a head whose best fit reads later tokens gets its best causal program."""

import numpy as np
import pytest

from attnprog.engine.leak import LeakCheck, check_leaks
from attnprog.engine.rank import rank_with_heldout
from attnprog.layout import causal_offsets
from attnprog.synth.program import Program
from attnprog.synth.runtime.outputs import ProgramOutputs
from tests.engine.planted import first_token, packed, planted_store, previous_token

LENGTHS = [6, 9, 7, 12, 8, 10, 9, 11]
SPLITS = ["selection"] * 5 + ["heldout"] * 3


def previous_or_self(n):
    return 0.7 * previous_token(n) + 0.3 * np.eye(n)


SOURCES = {  # the first reads the text's length: its row i changes when later tokens arrive
    "peeks": "import numpy as np\n\ndef program(s):\n    m = np.eye(s.n, k=-1)\n"
             "    m[:, 0] += s.n / 100\n    return m\n",
    "previous_or_self": "import numpy as np\n\ndef program(s):\n"
                        "    return 0.7 * np.eye(s.n, k=-1) + 0.3 * np.eye(s.n)\n",
    "first": "import numpy as np\n\ndef program(s):\n    m = np.zeros((s.n, s.n))\n"
             "    m[:, 0] = 1.0\n    return m\n",
}
PATTERNS = [previous_token, previous_or_self, first_token]  # the outputs ranked, in that order


@pytest.fixture
def ranked():
    store = planted_store([0, 1], [previous_token, first_token], LENGTHS, SPLITS, 0.9, seed=1)
    programs = [Program(source=src, name="program", family=name) for name, src in SOURCES.items()]
    outputs = ProgramOutputs(programs=programs,
                             values=np.stack([packed(fn, LENGTHS) for fn in PATTERNS]),
                             failed=np.zeros((3, len(LENGTHS)), dtype=bool),
                             offsets=causal_offsets(LENGTHS))
    return store, rank_with_heldout(store, outputs), outputs


def test_a_head_whose_best_fit_leaks_uses_its_best_causal_program(ranked):
    store, table, outputs = ranked
    assert table.best()[1].tolist() == [0, 2]  # the leaky program fits head 0 best
    check = check_leaks(store, table, outputs, heads=[0, 1])
    assert check.is_leaky(table.programs[0].hash) and not check.is_leaky(table.programs[1].hash)
    causal = check.causal_table(table)
    assert causal.best()[1].tolist() == [1, 2] and list(check.swaps) == [0]
    held = rank_with_heldout(store, outputs.select([1, 2]))
    assert float(causal.heldout_iou[0]) == pytest.approx(float(held.heldout_iou[0]), abs=1e-6)
    assert float(causal.heldout_iou[1]) == float(table.heldout_iou[1])  # head 1 unchanged


def test_the_check_reads_back_as_written(ranked, tmp_path):
    store, table, outputs = ranked
    check = check_leaks(store, table, outputs, heads=[0, 1], fitted=[table.programs[2]])
    check.save(tmp_path / "leak.json", n_heads=2)
    again = LeakCheck.load(tmp_path / "leak.json")
    assert again.leaks == check.leaks and again.swaps == check.swaps
    assert check.figures([table.programs[2].hash]) == {
        "checked": 3, "leaky": 1, "leaky_fitted": 0, "heads_swapped": 1, "heads_left_leaky": 0}
