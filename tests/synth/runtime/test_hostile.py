"""Hostile programs against the OS boundary.

Each hostile program below passes no static check on purpose: they go straight to the
sandbox (or through ``evaluate_programs(check=False)``), as programs that a check missed
would. One pool mixes them with benign programs; each test checks one thing the issue
asks for: this process survives, no file appears outside the private /tmp, nothing
connects to a loopback listener, no process outlives the run, benign outputs are
bit-identical to a run without the hostile ones, and the cache holds only correct entries.
"""

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from attnprog.synth.features import probe_sentences
from attnprog.synth.program import Program
from attnprog.synth.runtime.cache import OutputCache
from attnprog.synth.runtime.cache import corpus_hash as hash_corpus
from attnprog.synth.runtime.evaluate import _cache_key, close_shared_sandbox, evaluate_programs
from attnprog.synth.runtime.execute import run_trusted
from attnprog.synth.runtime.isolation import isolation
from attnprog.synth.runtime.sandbox import Sandbox

pytestmark = pytest.mark.skipif(not isolation().available,
                                reason=f"no OS isolation here: {isolation().why_not}")

MARK = "4242.5"  # argv of any process a hostile program manages to start
ENV_SECRET = "s3cr3t-from-the-environment"
FILE_SECRET = "s3cr3t-from-a-home-file"
BENIGN = {
    "previous": "import numpy as np\ndef program(s):\n    m = np.zeros((s.n, s.n))\n"
                "    m[np.arange(1, s.n), np.arange(s.n - 1)] = 1\n    return m\n",
    "punct": "import numpy as np\ndef program(s):\n"
             "    return np.tril(np.outer(np.ones(s.n), s.is_punct.astype(float)))\n",
    "rowmax": "import numpy as np\ndef program(s):\n    m = np.tril(np.ones((s.n, s.n)))\n"
              "    return np.maximum(m * np.arange(s.n)[None, :], 0.5)\n",
    "paper": "import numpy as np\ndef f(sentence, tokenizer):\n"
             "    n = len(tokenizer(sentence)['input_ids'])\n    m = np.ones((n, n))\n"
             "    return 'uniform', m\n",
}


def attack(body: str) -> str:
    """A program that tries ``body`` (each line guarded) and then returns a valid matrix."""
    lines = "\n".join(
        f"    try:\n        {line}\n    except BaseException:\n        pass"
        for line in body.strip().splitlines()
    )
    return f"import numpy as np\ndef program(s):\n{lines}\n    return np.eye(s.n)\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Paths and a listener the attacks aim at, made outside the sandbox's private /tmp."""
    outside = Path(tempfile.mkdtemp(prefix="attnprog-hostile-", dir="/var/tmp"))
    secret = Path.home() / ".attnprog-hostile-secret"
    secret.write_text(FILE_SECRET)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    os.environ["ATTNPROG_HOSTILE_SECRET"] = ENV_SECRET
    yield {"outside": outside, "port": listener.getsockname()[1], "listener": listener,
           "secret": secret, "main": os.getpid()}
    os.environ.pop("ATTNPROG_HOSTILE_SECRET", None)
    listener.close()
    secret.unlink(missing_ok=True)
    shutil.rmtree(outside, ignore_errors=True)


def hostile_programs(world, cache_files: list[str]) -> dict[str, str]:
    out, port, main = world["outside"], world["port"], world["main"]
    victim = cache_files[0] if cache_files else str(out / "none")
    other = cache_files[1] if len(cache_files) > 1 else str(out / "none2")
    return {
        "frame_walk": attack(f"""
import sys, os
f = sys._getframe()
while f is not None: f.f_globals.update(call_program=None, _write=None, seccomp_filter=None); f = f.f_back
os.system('touch {out}/frame_walk; sleep {MARK}')
socket = __import__('socket'); socket.create_connection(('127.0.0.1', {port}), timeout=1)
"""),
        "ctypes_dlsym": attack(f"""
import ctypes, _ctypes
libc = ctypes.CDLL(None)
libc.system(b'touch {out}/ctypes; sleep {MARK} &')
address = _ctypes.dlsym(libc._handle, 'system')
ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p)(address)(b'sleep {MARK}')
libc.syscall(62, {main}, 9)
libc.syscall(57)
"""),
        "pidfd_kill": attack(f"""
import os, signal
signal.pidfd_send_signal(os.pidfd_open({main}), signal.SIGKILL)
os.kill({main}, signal.SIGKILL)
os.kill(-1, signal.SIGKILL)
os.killpg(0, signal.SIGKILL)
os.kill(os.getppid(), signal.SIGKILL)
os.kill(1, signal.SIGKILL)
"""),
        "cache_mmap_rename": attack(f"""
import mmap, os
fh = open({victim!r}, 'r+b'); mm = mmap.mmap(fh.fileno(), 0); mm[-64:] = bytes(64); mm.flush()
np.memmap({victim!r}, mode='r+', dtype=np.uint8)[-8:] = 0
os.rename({victim!r}, {other!r})
os.replace({other!r}, {victim!r})
open({victim!r}, 'wb').write(b'x')
"""),
        "numpy_monkeypatch": attack("""
import sys
np.maximum = lambda *a, **k: a[0] * 0
np.tril = lambda m, k=0: m * 0
sys.modules['attnprog.synth.program'].normalise_packed = lambda m: np.zeros(1)
s.__dict__['_cache']['punct'].setflags(write=True); s.__dict__['_cache']['punct'][:] = True
"""),
        "forged_reply": attack("""
import os, pickle, struct
forged = pickle.dumps(('done', 1, 'token', b'', b'', [], '', 0.0))
[os.write(fd, struct.pack('<iiI', 0, 0, 12) + bytes(12) + forged) for fd in range(3, 64) if fd > 2]
"""),
        "fork_survivor": attack(f"""
import os, threading
pid = os.fork(); os.execv('/bin/sleep', ['sleep', '{MARK}']) if pid == 0 else None
os.posix_spawn('/bin/sleep', ['sleep', '{MARK}'], {{}})
__import__('subprocess').Popen(['sleep', '{MARK}'], start_new_session=True)
threading.Thread(target=lambda: __import__('time').sleep(1000), daemon=False).start()
"""),
        "mkfifo": attack(f"""
import os
os.mkfifo('{out}/fifo')
os.mknod('{out}/node')
os.mkfifo('/tmp/fifo')
open('{out}/written', 'w').write('x')
open('{os.getcwd()}/hostile-written', 'w').write('x')
"""),
        "proc_mem": attack("""
maps = open('/proc/1/maps').read().splitlines()
mem = open('/proc/1/mem', 'r+b', buffering=0)
[(mem.seek(int(line.split('-')[0], 16)), mem.write(bytes(4096))) for line in maps if 'rw-p' in line]
"""),
        "alarm_evasion": """
import signal, time
import numpy as np
def program(s):
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_REAL, 0)
    while True:
        time.sleep(0.01)
""",
        "env_and_files": f"""
import os
def program(s):
    found = repr(dict(os.environ))
    for path in ({str(world['secret'])!r}, '/etc/shadow', '/proc/1/environ', '/proc/1/mem'):
        try:
            found += open(path, errors='replace').read(4096)
        except OSError as err:
            found += str(err)
    raise RuntimeError('\\x1b[2K\\rok ' + found * 50)
""",
    }


def processes_marked() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if MARK.encode() in cmdline:
            found.append(pid)
    return found


@pytest.fixture(scope="module")
def runs(world):
    """A benign-only run, then the benign programs interleaved with the hostile ones."""
    texts = probe_sentences()
    benign = [Program(src, family=name) for name, src in BENIGN.items()]
    cache_dir = world["outside"] / "cache"
    evaluate_programs(benign, texts, cache_dir=cache_dir, workers=2, progress=False)
    corpus = hash_corpus(texts)
    cache = OutputCache(cache_dir)
    cache_files = [str(cache.path(p.hash, corpus, _cache_key(p, "", "", paper_tokenizer="stand-in")))
                   for p in benign]  # the files evaluate_programs wrote, which hostile ones attack
    assert all(Path(f).is_file() for f in cache_files)
    hostile = [Program(src, family=name) for name, src in hostile_programs(world, cache_files).items()]
    mixed = [p for pair in zip(hostile, benign * 3, strict=False) for p in pair] + hostile[len(benign) * 3:]
    with Sandbox(workers=2, timeout=1.0, progress=False) as box:
        alone = box.run(benign, texts)
    started = time.monotonic()
    with Sandbox(workers=2, timeout=1.0, progress=False) as box:
        together = box.run(mixed, texts)
    seconds = time.monotonic() - started
    # the same pool again through evaluate_programs, which reads and writes the cache
    outputs = evaluate_programs(mixed, texts, cache_dir=cache_dir, workers=2, progress=False,
                                check=False, timeout=1.0)
    close_shared_sandbox()
    return {"texts": texts, "benign": benign, "mixed": mixed, "alone": alone,
            "results": together, "together": dict(zip([p.family for p in mixed], together, strict=True)),
            "outputs": outputs, "cache": cache, "corpus": corpus, "seconds": seconds}


def test_the_main_process_survives_and_gets_every_result(runs):
    assert len(runs["results"]) == len(runs["mixed"])


def test_benign_outputs_are_bit_identical_to_a_run_without_hostile_programs(runs):
    trusted = run_trusted(runs["benign"], runs["texts"])
    for program, alone, expected in zip(runs["benign"], runs["alone"], trusted, strict=True):
        together = runs["together"][program.family]
        assert together.reason == "" and not together.failed.any()
        np.testing.assert_array_equal(together.values, alone.values)
        np.testing.assert_array_equal(together.values, expected.values)


def test_no_file_appears_outside_the_private_tmp(runs, world):
    left = sorted(p.name for p in world["outside"].iterdir() if p.name != "cache")
    assert left == []
    assert not Path(os.getcwd(), "hostile-written").exists()
    assert not Path("/tmp/fifo").exists()


def test_nothing_connects_to_a_loopback_listener(runs, world):
    with pytest.raises(BlockingIOError):
        world["listener"].accept()


def test_no_process_outlives_the_run(runs):
    assert processes_marked() == []


def test_a_program_that_evades_the_alarm_is_stopped(runs):
    result = runs["together"]["alarm_evasion"]
    assert result.failed.all() and "timeout" in result.reason


def test_reasons_leak_no_secret_and_no_control_character(runs):
    reason = runs["together"]["env_and_files"].reason
    assert ENV_SECRET not in reason and FILE_SECRET not in reason
    assert "\x1b" not in reason and "\r" not in reason and "\\x1b" in reason
    assert len(reason) <= 600


def test_a_program_has_no_capabilities_and_cannot_open_the_workers_memory():
    source = ("def program(s):\n    caps = open('/proc/self/status').read().split('CapEff:')[1]\n"
              "    try:\n        open('/proc/1/mem', 'rb')\n        opened = 'opened'\n"
              "    except OSError:\n        opened = 'refused'\n"
              "    raise RuntimeError(caps.split()[0] + ' ' + opened)\n")
    with Sandbox(workers=1, progress=False) as box:
        [result] = box.run([Program(source)], probe_sentences()[:1])
    assert "RuntimeError: 0000000000000000 refused" in result.reason


def test_the_cache_holds_only_correct_entries(runs):
    cache, corpus, texts = runs["cache"], runs["corpus"], runs["texts"]
    n_cells = int(runs["outputs"].offsets[-1])
    trusted = {p.hash: r for p, r in zip(runs["benign"], run_trusted(runs["benign"], texts),
                                         strict=True)}
    for program in runs["mixed"]:
        key = _cache_key(program, "", "", paper_tokenizer="stand-in")  # as evaluate_programs keys it
        entry = cache.get(program.hash, corpus, key, n_cells, len(texts))
        assert entry is not None, program.family
        if program.hash in trusted:
            np.testing.assert_array_equal(entry.values, trusted[program.hash].values)
    for row, program in enumerate(runs["outputs"].programs):
        if program.hash in trusted:
            np.testing.assert_array_equal(runs["outputs"].values[row], trusted[program.hash].values)
