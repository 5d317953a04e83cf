"""The sandbox: untrusted programs run in worker processes with limits, and nothing a
program does stops the run. One run mixes bad programs with good ones; each test checks
one behaviour of that run."""

import os
import sys
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
                        f"timeout after {TIMEOUT} s (worker killed) on text 0"),
    "hangs_at_definition": ("while True:\n    pass\ndef program(s):\n    return None\n",
                            f"timeout after {TIMEOUT} s while defining the program"),
    "allocates_10_gb": ("import numpy as np\ndef program(s):\n    return np.ones(10**10 // 8)\n",
                        "memory limit exceeded"),
    "calls_os_exit": ("import os\ndef program(s):\n    os._exit(3)\n",
                      "worker exited (code 3) on text 0"),
    "segfaults_via_ctypes": ("import ctypes\ndef program(s):\n    return ctypes.string_at(0)\n",
                             "worker crashed (signal 11) on text 0"),
    "opens_a_socket": ("import socket\ndef program(s):\n    socket.socket().connect(('127.0.0.1', 9))\n",
                       "refused: socket"),
    "writes_a_file": (f"def program(s):\n    open({WRITTEN_FILE!r}, 'w').write('x')\n",
                      "refused: open"),
    "spawns_a_process": ("import subprocess\ndef program(s):\n    subprocess.run(['true'])\n",
                         "refused: subprocess.Popen"),
    "calls_os_system": ("import os\ndef program(s):\n    os.system('true')\n",
                        "refused: os.system"),
    "returns_nan": ("import numpy as np\ndef program(s):\n    return np.full((s.n, s.n), np.nan)\n",
                    "non-finite values"),
    "returns_the_wrong_shape": ("import numpy as np\ndef program(s):\n    return np.ones((3, 4))\n",
                                "shape (3, 4), expected (8, 8) on text 0"),
    "returns_a_string": ("def program(s):\n    return 'attention'\n", "returned str"),
    "raises": ("def program(s):\n    return 1 / 0\n", "raised ZeroDivisionError"),
    "touches_the_main_process": ("import numpy\ndef program(s):\n    numpy.attnprog_marker = 1\n",
                                 "returned NoneType"),
    # the worker's reply pipe is open in the program's process: a pickle that would run
    # code when the parent loads it must be refused there
    "forges_a_reply": (
        "import os, pickle, struct, sys, time\n"
        "class Payload:\n"
        f"    def __reduce__(self):\n        return (os.system, ('touch {PARENT_MARKER}',))\n"
        "def program(s):\n"
        "    data = pickle.dumps(('done', Payload()))\n"
        "    os.write(int(sys.argv[2]), struct.pack('!i', len(data)) + data)\n"
        "    time.sleep(0.5)\n",
        "malformed reply",
    ),
    "writes_with_numpy_save": (f"import numpy as np\ndef program(s):\n    np.save({WRITTEN_FILE!r}, 1)\n",
                               "refused: open"),
    "writes_with_tofile": (f"import numpy as np\ndef program(s):\n    np.eye(2).tofile({WRITTEN_FILE!r})\n",
                           "refused: open"),
    "writes_with_sqlite": (f"import sqlite3\ndef program(s):\n    sqlite3.connect({WRITTEN_FILE!r})\n",
                           "refused: sqlite3.connect"),
    "spawns_via_posixsubprocess": (
        f"import os\ndef program(s):\n    import _posixsubprocess\n    r, w = os.pipe()\n"
        f"    _posixsubprocess.fork_exec({FORK_EXEC})\n",
        "refused: import",
    ),
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


def test_crashed_and_hung_workers_are_replaced(mixed_run):
    assert mixed_run["replaced"] >= 3  # os._exit, segfault, the hang in C code
    assert len(mixed_run["alive"]) == 2 and all(mixed_run["alive"])


def test_nothing_a_program_does_reaches_this_process(mixed_run):
    assert not hasattr(np, "attnprog_marker")
    assert not os.path.exists(WRITTEN_FILE)
    assert not os.path.exists(PARENT_MARKER)


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


def test_a_program_that_evades_the_timeout_is_stopped_by_the_backstop(texts):
    """It ignores the alarm and writes "idle" into its progress cell: the parent stops it
    anyway, after (texts + 1) x (timeout + grace) seconds."""
    source = ("import mmap, signal, struct, sys, time\ndef program(s):\n"
              "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
              "    cell = mmap.mmap(int(sys.argv[3]), 16)\n"
              "    while True:\n"
              "        struct.pack_into('dd', cell, 0, -1.0, 0.0)\n        time.sleep(0.01)\n")
    good = make(GOOD["previous_token"], "previous_token")
    with Sandbox(workers=1, timeout=0.5, progress=False) as box:
        evader, after = box.run([make(source, "evader"), good], texts)
        assert box.replaced == 1
    assert "no reply within 4.0 s" in evader.reason and evader.failed.all()
    assert after.reason == "" and not after.failed.any()


def test_a_worker_that_fails_to_start_reports_its_error(texts):
    box = Sandbox(workers=1, progress=False)
    box._command = [sys.executable, "-c", "import sys; sys.exit('no such module: boom')"]
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
