"""The sandbox: untrusted programs run in worker processes with limits, and nothing a
program does stops the run. One run mixes bad programs with good ones; each test checks
one behaviour of that run."""

import os
import tempfile

import numpy as np
import pytest

from attnprog.errors import SandboxError
from attnprog.synth.features import Sentence, probe_sentences
from attnprog.synth.program import Program
from attnprog.synth.runtime import sandbox
from attnprog.synth.runtime.execute import run_trusted
from attnprog.synth.runtime.sandbox import Sandbox, run_in_sandbox

TIMEOUT = 1.0
WRITTEN_FILE = os.path.join(tempfile.gettempdir(), "attnprog-sandbox-test-written")
PARENT_MARKER = os.path.join(tempfile.gettempdir(), "attnprog-sandbox-test-parent-ran-code")
FORK_EXEC = ("[b'/bin/true'], [b'/bin/true'], True, (), None, None, -1, -1, -1, -1, -1, -1, "
             "r, w, True, False, -1, None, None, None, -1, None, False")

GOOD = {
    "previous_token": """
import numpy as np

def program(s):
    out = np.zeros((s.n, s.n))
    out[0, 0] = 1.0
    for i in range(1, s.n):
        out[i, i - 1] = 1.0
    return out
""",
    "punctuation": """
import numpy as np

def program(s):
    return np.tril(np.outer(np.ones(s.n), s.is_punct.astype(float)))
""",
    "same_token": """
import numpy as np

def program(s):
    ids = np.array(s.ids)
    return (ids[:, None] == ids[None, :]).astype(float)
""",
    "paper_first_token": """
import numpy as np

def program(sentence, tokenizer):
    n = len(tokenizer([sentence], return_tensors="pt").input_ids[0])
    out = np.zeros((n, n))
    out[:, 0] = 1
    return "First token", out
""",
    "prints_a_lot": """
import numpy as np

def program(s):
    for _ in range(2000):
        print("debugging output " * 10)
    return np.eye(s.n)
""",
    "mutates_its_sentence": """
import numpy as np

def program(s):
    s.tokens.reverse()
    s.ids[0] = -1
    return np.eye(s.n)
""",
}

BAD = {
    "loops_forever": ("def program(s):\n    while True:\n        pass\n",
                      f"timeout after {TIMEOUT} s on text 0"),
    "sleeps": ("import time\ndef program(s):\n    time.sleep(60)\n",
               f"timeout after {TIMEOUT} s on text 0"),
    "hangs_in_c_code": ("import itertools\ndef program(s):\n    return sum(itertools.repeat(1, 10**13))\n",
                        f"timeout after {TIMEOUT} s (killed) on text 0"),
    "hangs_at_definition": ("while True:\n    pass\ndef program(s):\n    return None\n",
                            f"timeout after {TIMEOUT} s while defining the program"),
    "allocates_10_gb": ("import numpy as np\ndef program(s):\n    return np.ones(10**10 // 8)\n",
                        "memory limit exceeded"),
    "calls_os_exit": ("import os\ndef program(s):\n    os._exit(3)\n",
                      "exited (code 3) instead of returning on text 0"),
    "segfaults_via_ctypes": ("import ctypes\ndef program(s):\n    return ctypes.string_at(0)\n",
                             "crashed (signal 11, SIGSEGV) on text 0"),
    "opens_a_socket": ("import socket\ndef program(s):\n    socket.socket().connect(('127.0.0.1', 9))\n",
                       "PermissionError"),
    "spawns_a_process": ("import subprocess\ndef program(s):\n    subprocess.run(['true'])\n",
                         "PermissionError"),
    "returns_nan": ("import numpy as np\ndef program(s):\n    return np.full((s.n, s.n), np.nan)\n",
                    "non-finite values"),
    "returns_the_wrong_shape": ("import numpy as np\ndef program(s):\n    return np.ones((3, 4))\n",
                                "shape (3, 4), expected (8, 8) on text 0"),
    "returns_a_string": ("def program(s):\n    return 'attention'\n", "returned str"),
    "raises": ("def program(s):\n    return 1 / 0\n", "raised ZeroDivisionError"),
}


def make(source: str, family: str) -> Program:
    return Program(source=source.strip() + "\n", family=family)


@pytest.fixture(scope="module")
def texts() -> list[Sentence]:
    return probe_sentences()


@pytest.fixture(scope="module")
def mixed_run(texts):
    """Bad and good programs interleaved in one run on two workers."""
    programs = [make(src, name) for name, src in GOOD.items()]
    for i, (name, (src, _)) in enumerate(BAD.items()):
        programs.insert(2 * i % len(programs), make(src, name))
    with Sandbox(workers=2, timeout=TIMEOUT, max_timeouts=1, progress=False) as box:
        results = box.run(programs, texts)
        alive = [w.process.poll() is None for w in box._workers]
        replaced = box.replaced
    by_name = {p.family: r for p, r in zip(programs, results, strict=True)}
    return {"results": by_name, "programs": programs, "alive": alive, "replaced": replaced}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_program_is_stopped_with_its_reason(mixed_run, name):
    result = mixed_run["results"][name]
    assert BAD[name][1] in result.reason
    assert result.failed.all() and not result.values.any()


def test_good_programs_in_the_same_run_equal_serial_in_process_execution(mixed_run, texts):
    good = [p for p in mixed_run["programs"] if p.family in GOOD]
    for program, expected in zip(good, run_trusted(good, probe_sentences()), strict=True):
        got = mixed_run["results"][program.family]
        assert got.reason == "" and not got.failed.any()
        np.testing.assert_array_equal(got.values, expected.values)


def test_crashes_and_hangs_end_only_their_task_and_the_workers_stay_up(mixed_run):
    assert mixed_run["replaced"] == 0  # the templates never ran program code
    assert len(mixed_run["alive"]) == 2 and all(mixed_run["alive"])


def test_a_program_cannot_change_this_process(mixed_run):
    assert not hasattr(np, "attnprog_marker")


def test_outputs_are_packed_normalised_float32(mixed_run, texts):
    values = mixed_run["results"]["previous_token"].values
    assert values.dtype == np.float32
    assert values.shape == (sum(s.n * (s.n + 1) // 2 for s in texts),)
    np.testing.assert_allclose(values.sum(), sum(s.n for s in texts), rtol=1e-6)


def test_a_failure_on_one_text_fails_only_that_text(texts):
    source = "import numpy as np\ndef program(s):\n    assert s.n != 19\n    return np.eye(s.n)\n"
    [result] = run_in_sandbox([make(source, "picky")], texts, workers=1, progress=False)
    assert result.failed.tolist() == [False, True, False]
    assert result.reason == "raised AssertionError:  (line 3) on text 1"


def test_a_program_keeps_running_after_fewer_timeouts_than_the_limit():
    texts = [Sentence.from_text("a b"), Sentence.from_text("slow text here"),
             Sentence.from_text("c d")]
    source = ("import time\nimport numpy as np\ndef program(s):\n"
              "    if s.n == 3:\n        time.sleep(60)\n    return np.eye(s.n)\n")
    with Sandbox(workers=1, timeout=0.5, max_timeouts=2, progress=False) as box:
        [result] = box.run([make(source, "slow_once")], texts)
    assert result.failed.tolist() == [False, True, False]
    assert result.reason == "timeout after 0.5 s on text 1"


def test_a_sandbox_runs_again_after_a_run(texts):
    program = make(GOOD["previous_token"], "previous_token")
    with Sandbox(workers=1, progress=False) as box:
        first = box.run([program], texts)
        second = box.run([program], texts[:2])
    assert not first[0].failed.any() and second[0].failed.shape == (2,)
    assert box.calls == len(texts) + 2


def test_no_programs_or_no_texts_give_empty_results(texts):
    with Sandbox(workers=1, progress=False) as box:
        assert box.run([], texts) == []
        [result] = box.run([make(GOOD["previous_token"], "p")], [])
    assert result.values.shape == (0,) and result.failed.shape == (0,)


def test_a_program_that_ignores_the_alarm_is_killed_and_the_next_one_runs(texts):
    source = ("import signal\ndef program(s):\n"
              "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass\n")
    good = make(GOOD["previous_token"], "previous_token")
    with Sandbox(workers=1, timeout=0.5, program_seconds=60, progress=False) as box:
        evader, after = box.run([make(source, "evader"), good], texts)
    assert evader.reason == "timeout after 0.5 s (killed) on text 0" and evader.failed.all()
    assert after.reason == "" and not after.failed.any()


def test_a_program_that_fakes_its_progress_cell_gains_no_time(texts):
    """It finds the cell its worker times it by, ignores the alarm and keeps writing "just
    started" into the cell: the worker times each text from when it first saw it."""
    source = ("import gc, mmap, signal, struct, sys, time\ndef program(s):\n"
              "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
              "    f, cells = sys._getframe(), []\n"
              "    while f is not None:\n"
              "        cells += [v.cell for v in f.f_locals.values() if hasattr(v, 'cell')]\n"
              "        f = f.f_back\n"
              "    while True:\n"
              "        for i in (0.0, 1.0, 2.0):\n"
              "            struct.pack_into('dd', cells[0], 0, i, time.monotonic() + 1000)\n"
              "        time.sleep(0.01)\n")
    with Sandbox(workers=1, timeout=0.5, program_seconds=60, progress=False) as box:
        [result] = box.run([make(source, "faker")], texts)
    # stopped by each text's clock (0.5 s + 1 s grace), not by its 60 s budget
    assert result.failed.all() and result.reason.startswith("timeout after 0.5 s (killed)")


def test_a_program_that_spends_its_time_budget_is_abandoned(texts):
    source = "import time\nimport numpy as np\ndef program(s):\n    time.sleep(0.4)\n    return np.eye(s.n)\n"
    with Sandbox(workers=1, timeout=1.0, program_seconds=0.6, progress=False) as box:
        [result] = box.run([make(source, "slow")], texts)
    assert "used its time budget of 0.6 s" in result.reason and result.failed.all()


def test_without_os_isolation_the_sandbox_refuses_unless_unsafe(monkeypatch):
    from attnprog.synth.runtime import isolation as isolation_module

    missing = isolation_module.Isolation(None, False, "bubblewrap is not installed")
    monkeypatch.setattr(isolation_module, "isolation", lambda: missing)
    monkeypatch.delenv(isolation_module.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxError, match="bubblewrap is not installed.*--unsafe"):
        Sandbox(workers=1, progress=False)
    with pytest.warns(UserWarning, match="WITHOUT OS isolation"):
        Sandbox(workers=1, progress=False, unsafe=True)


def test_a_worker_that_fails_to_start_reports_its_error(texts, monkeypatch):
    monkeypatch.setattr(sandbox, "_WORKER_MAIN", "import sys; sys.exit('no such module: boom')")
    box = Sandbox(workers=1, progress=False)
    with pytest.raises(SandboxError, match="no such module: boom"), box:
        box.run([make(GOOD["previous_token"], "p")], texts)


def test_a_worker_that_cannot_be_spawned_leaks_no_file_descriptors(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("cannot fork")

    monkeypatch.setattr(sandbox.subprocess, "Popen", refuse)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(SandboxError, match="cannot fork"):
            Sandbox(workers=1, progress=False).start()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_project_under_tmp_stays_readable_behind_the_private_tmp(tmp_path):
    """CI clones under /tmp: the interpreter and attnprog there are bound back read-only."""
    from attnprog.synth.runtime.isolation import wrap_command

    venv = str(tmp_path)  # pytest's tmp_path lies under /tmp
    args = wrap_command(["python"], "bwrap", [venv, "/usr/lib"])
    tmpfs = args.index("/tmp", args.index("--tmpfs"))
    bind = args.index(venv)
    assert args[bind - 1] == "--ro-bind" and bind > tmpfs
    assert "/usr/lib" not in args  # already visible through the read-only root
