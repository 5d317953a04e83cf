"""The sandbox worker process: runs untrusted programs on batches of texts.

Started by :mod:`attnprog.synth.runtime.sandbox` as ``python -m attnprog.synth.runtime.worker``.
After importing what programs need it limits its own memory and CPU time and installs
an audit hook that refuses network, subprocesses, signals to other processes, foreign
code loading and file writes; then it serves tasks until its command pipe closes.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
import sys
import time
import warnings
from multiprocessing.connection import Connection

import numpy as np

from attnprog.errors import ProgramError
from attnprog.layout import n_cells
from attnprog.synth.runtime.execute import call_program, compile_program

PROGRESS = struct.Struct("dd")  # (index of the text being run, monotonic start time)
IDLE = -1.0  # progress index between calls
DEFINING = -2.0  # progress index while the program's source is executed
_REFUSED_EVENTS = frozenset(
    {
        "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.startfile",
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
        "os.truncate", "os.symlink", "os.link", "os.utime",
        "os.setxattr", "os.removexattr", "signal.pthread_kill", "sqlite3.connect",
        "sqlite3.enable_load_extension", "sqlite3.load_extension",
        "resource.setrlimit", "resource.prlimit", "ctypes.dlopen", "ctypes.dlsym",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.remote_exec",
        "webbrowser.open",
    }
)
_REFUSED_PREFIXES = (
    "socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "pty.", "shutil.",
    "urllib.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.",
)
# CPython's _posixsubprocess.fork_exec starts processes without an audit event: the worker
# drops the module before the hook goes in, and the hook refuses importing it again
_REFUSED_IMPORTS = frozenset({"_posixsubprocess"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_COMPILED_KEEP = 16
MAX_REASON_CHARS = 500  # a failure reason in a reply is cut to this length


class CallTimeout(BaseException):
    """Raised by SIGALRM in a program that runs past its time (BaseException, so that
    ``except Exception`` in a program does not swallow it)."""


class _State:
    refused: str | None = None


def _audit(event: str, args: tuple) -> None:
    if (
        event in _REFUSED_EVENTS
        or event.startswith(_REFUSED_PREFIXES)
        or (event == "open" and _opens_for_writing(args))
        or (event == "import" and args[0] in _REFUSED_IMPORTS)
    ):
        _State.refused = event
        raise PermissionError(
            f"refused: {event} (the sandbox allows no network, processes, file writes "
            "or foreign code)"
        )


def _opens_for_writing(args: tuple) -> bool:
    mode = args[1] if len(args) > 1 else None
    flags = args[2] if len(args) > 2 else 0
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and flags > 0 and bool(flags & _WRITE_FLAGS)


def seconds(value: float) -> str:
    """A duration for messages: 2.0, 0.25."""
    return str(round(float(value), 3))


def _on_alarm(signum, frame) -> None:
    raise CallTimeout


def _address_space_bytes() -> int:
    """Current virtual memory size of this process (0 when unknown)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_resources(memory_mb: float, cpu_seconds: float) -> None:
    """Memory: the worker's current size plus ``memory_mb``; CPU: ``cpu_seconds`` in all."""
    try:
        import resource
    except ImportError:  # not POSIX: the wall-clock timeout is the only limit
        return
    baseline = _address_space_bytes()
    limits = [
        (resource.RLIMIT_CPU, int(cpu_seconds), int(cpu_seconds) + 5),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_FSIZE, 0, 0),  # a write that gets past the audit hook still fails
    ]
    if baseline:
        memory = baseline + int(memory_mb * 2**20)
        limits.append((resource.RLIMIT_AS, memory, memory))
    for which, soft, hard in limits:
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass


def _drop_unaudited_modules() -> None:
    """Forget the modules of _REFUSED_IMPORTS and subprocess's alias of fork_exec, so a
    program reaches them only through an import, which the audit hook refuses."""
    for name in _REFUSED_IMPORTS:
        sys.modules.pop(name, None)
    if "subprocess" in sys.modules:
        sys.modules["subprocess"]._fork_exec = None  # Popen is refused before it gets there


def _preload_spacy() -> None:
    """Import spaCy and load the English pipeline before the audit hook, and make
    ``spacy.load`` return that cached pipeline (paper-form programs call it per text)."""
    try:
        import spacy
    except ImportError:
        return
    from attnprog.synth.features import _load_pipeline

    pipeline = _load_pipeline()
    original = spacy.load
    loaded: dict = {}

    def cached_load(name, *args, **kwargs):
        if str(name).startswith("en_core_web_sm") and pipeline is not None:
            return pipeline
        if name not in loaded:
            loaded[name] = original(name, *args, **kwargs)
        return loaded[name]

    spacy.load = cached_load


class Worker:
    """Serves ``corpus``, ``run`` and ``exit`` commands from the parent."""

    def __init__(self, commands: Connection, replies: Connection, progress: mmap.mmap,
                 memory_mb: float) -> None:
        self.commands = commands
        self.replies = replies
        self.progress = progress
        self.memory_mb = memory_mb
        self.corpora: dict[str, list] = {}
        self.compiled: dict[tuple[str, str], object] = {}

    def serve(self) -> None:
        while True:
            try:
                message = pickle.loads(self.commands.recv_bytes())
            except (EOFError, OSError):
                return  # the parent has gone
            kind = message[0]
            if kind == "exit":
                return
            if kind == "corpus":
                _, corpus_id, payload = message
                self.corpora = {corpus_id: [s.warm_features() for s in pickle.loads(payload)]}
                self.replies.send_bytes(pickle.dumps(("loaded", corpus_id)))
            elif kind == "run":
                reply = self.run_task(*message[1:])
                self.replies.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
                if reply[-1]:  # recycle: exit after a MemoryError, the parent starts a fresh worker
                    return

    def function(self, source: str, name: str):
        key = (source, name)
        if key not in self.compiled:
            if len(self.compiled) >= _COMPILED_KEEP:
                self.compiled.pop(next(iter(self.compiled)))
            self.compiled[key] = compile_program(source, name)
        return self.compiled[key]

    def run_task(self, task_id, corpus_id, source, name, start, stop, timeout, timeouts_left):
        """Run one program on texts [start, stop).

        Reply: ("done", task_id, packed float32 cells as bytes (None when fatal), failed
        [k] bool as bytes, [(j, reason)], fatal reason, CPU seconds used so far, whether
        this worker exits after replying). Only builtins: the parent unpickles replies
        with no globals allowed, since a program can write to the reply pipe too.
        """
        sentences = self.corpora[corpus_id][start:stop]
        failed = np.zeros(len(sentences), dtype=bool)
        reasons: list[tuple[int, str]] = []
        _State.refused = None
        PROGRESS.pack_into(self.progress, 0, DEFINING, time.monotonic())
        fatal, recycle = "", False
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            function = self.function(source, name)
        except ProgramError as err:
            fatal = _refusal() or str(err)[:MAX_REASON_CHARS]
        except CallTimeout:
            fatal = f"timeout after {seconds(timeout)} s while defining the program"
        except MemoryError:
            fatal = f"memory limit exceeded ({self.memory_mb:g} MB) while defining the program"
            recycle = True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            PROGRESS.pack_into(self.progress, 0, IDLE, 0.0)
        if fatal:
            return ("done", task_id, None, failed.tobytes(), reasons, fatal, _cpu(), recycle)
        chunks = []
        timeouts, first_timeout = 0, ""
        for j, s in enumerate(sentences):
            text = start + j
            cells, why = self.call(function, s, name, text, timeout)
            if why == "memory":
                fatal = f"memory limit exceeded ({self.memory_mb:g} MB) on text {text}"
                recycle = True
                break
            if why.startswith("timeout"):
                timeouts += 1
                first_timeout = first_timeout or f"{why} on text {text}"
            if cells is None:
                failed[j] = True
                reasons.append((j, why))
                cells = np.zeros(n_cells(s.n), dtype=np.float32)
            chunks.append(cells)
            if timeouts >= timeouts_left:
                fatal = first_timeout
                break
        values = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return ("done", task_id, values.tobytes(), failed.tobytes(), reasons, fatal, _cpu(),
                recycle)

    def call(self, function, s, name: str, text: int, timeout: float):
        """One program-text call under the wall-clock timer; (cells, "") or (None, reason)."""
        _State.refused = None
        PROGRESS.pack_into(self.progress, 0, float(text), time.monotonic())
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            cells, why = call_program(function, s, name)
        except CallTimeout:
            cells, why = None, f"timeout after {seconds(timeout)} s"
        except MemoryError:
            cells, why = None, "memory"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            PROGRESS.pack_into(self.progress, 0, IDLE, 0.0)
        refusal = _refusal()
        if refusal and why != "memory":
            return None, refusal
        return cells, why[:MAX_REASON_CHARS]


def _refusal() -> str:
    return "" if _State.refused is None else f"refused: {_State.refused}"


def _cpu() -> float:
    return time.process_time()


def main(argv: list[str]) -> None:
    command_fd, reply_fd, progress_fd = (int(a) for a in argv[:3])
    memory_mb, cpu_seconds = float(argv[3]), float(argv[4])
    preload_spacy = len(argv) > 5 and argv[5] == "spacy"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    signal.signal(signal.SIGALRM, _on_alarm)
    commands = Connection(command_fd, writable=False)
    replies = Connection(reply_fd, readable=False)
    progress = mmap.mmap(progress_fd, PROGRESS.size)
    sys.dont_write_bytecode = True
    warnings.simplefilter("ignore")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # programs that print must not fill a pipe nobody reads
    for module in ("collections", "functools", "itertools", "math", "re", "string"):
        __import__(module)  # what programs import, loaded before the audit hook
    if preload_spacy:
        _preload_spacy()
    _limit_resources(memory_mb, cpu_seconds)
    _drop_unaudited_modules()
    sys.addaudithook(_audit)
    replies.send_bytes(pickle.dumps(("ready", os.getpid())))
    os.dup2(devnull, 2)  # startup errors went to the parent; later ones would be programs'
    Worker(commands, replies, progress, memory_mb).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
