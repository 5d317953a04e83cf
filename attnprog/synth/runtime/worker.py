"""The sandbox worker: a clean template that forks one child per task.

Started by :mod:`attnprog.synth.runtime.sandbox` (under bubblewrap, as PID 1 of its own
namespaces). The template imports what programs need (numpy; spaCy with every text of the
corpus parsed once; transformers and the model's tokenizer) and never runs program code
itself. For each task (one program on a batch of texts) it forks a child that closes the
template's pipes, limits itself (rlimits, seccomp) and only then compiles the program and
runs it text by text, streaming one framed record per text through a pipe of its own.
The template times every call, kills the child when a call overruns, kills every other
process in its namespace when the task ends, checks each record, and answers the parent.
So a program can change nothing that another program computes: each starts from the
template's clean memory, and whatever it leaves behind dies with its child.
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import resource
import select
import signal
import struct
import sys
import time
import warnings
from multiprocessing.connection import Connection

import numpy as np

from attnprog.errors import ProgramError
from attnprog.layout import n_cells
from attnprog.synth.runtime.execute import call_program, compile_program, escape
from attnprog.synth.runtime.isolation import seccomp_filter

MAX_REASON_CHARS = 500  # a failure reason is cut to this length
_RECORD = struct.Struct("<iiI")  # (text index, kind, payload bytes)
PROGRESS = struct.Struct("dd")  # (text index the child is on, monotonic start of that call)
DEFINING = -2.0  # progress index while the program's source is executed
_FLUSH_BYTES = 256 << 10
_FLUSH_SECONDS = 0.05
_CELLS, _FAILED, _FATAL, _MEMORY, _DEFINED = range(5)
_GRACE = 1.0  # seconds past a call's timeout before the template kills the child
_FILE_BYTES = 16 << 20  # what a program may write into its private /tmp


class CallTimeout(BaseException):
    """Raised by SIGALRM in a program that runs past its time (BaseException, so that
    ``except Exception`` in a program does not swallow it)."""


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


def _not_dumpable() -> None:
    """Keep programs out of this process' memory (/proc/1/mem needs ptrace rights then)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


# --- what programs may load, prepared before any program runs ----------------------------
class CachedPipeline:
    """A spaCy pipeline whose call on a corpus text returns that text's parse, made once."""

    def __init__(self, nlp, docs: dict) -> None:
        self._nlp = nlp
        self._docs = docs

    def __call__(self, text, *args, **kwargs):
        doc = self._docs.get(text) if isinstance(text, str) else None
        return doc if doc is not None else self._nlp(text, *args, **kwargs)

    def pipe(self, texts, *args, **kwargs):
        for text in texts:
            yield self(text)

    def __getattr__(self, name):
        return getattr(self._nlp, name)


class _Preloaded:
    nlp = None  # the full English spaCy pipeline
    docs: dict = {}  # text -> Doc for the current corpus


def _preload_spacy() -> None:
    """Load the full English pipeline (lemmatizer and entities included) and make
    ``spacy.load`` of any English pipeline return it, with cached parses."""
    try:
        import spacy
    except ImportError:
        return
    from attnprog.synth.features import _PIPELINE_NAMES

    for name in _PIPELINE_NAMES:
        try:
            _Preloaded.nlp = spacy.load(name)
            break
        except (OSError, ImportError):
            continue
    original = spacy.load
    loaded: dict = {}

    def cached_load(name, *args, **kwargs):
        if _Preloaded.nlp is not None and str(name).startswith("en_core_web"):
            return CachedPipeline(_Preloaded.nlp, _Preloaded.docs)
        key = str(name)
        if key not in loaded:
            loaded[key] = original(name, *args, **kwargs)
        return loaded[key]

    spacy.load = cached_load


def _preload(modules: list[str]) -> None:
    for module in ("collections", "functools", "itertools", "math", "re", "string", "typing"):
        __import__(module)
    if "spacy" in modules:
        _preload_spacy()
    if "transformers" in modules:
        try:
            import transformers

            # the names programs import for annotations; resolved now, never in a task
            transformers.PreTrainedTokenizerBase, transformers.PreTrainedTokenizerFast  # noqa: B018
        except ImportError:
            pass
    if "torch" in modules:
        try:
            import torch  # noqa: F401  (return_tensors="pt")
        except ImportError:
            pass


# --- the template -----------------------------------------------------------------------------
class Template:
    """Serves ``corpus``, ``run`` and ``exit`` commands from the parent."""

    def __init__(self, commands: Connection, replies: Connection, memory_mb: float) -> None:
        self.commands = commands
        self.replies = replies
        self.memory_mb = memory_mb
        self.corpus_id = ""
        self.sentences: list = []
        self.tokenizer = None
        self.helpers: dict[str, str] = {}
        self.baseline = 0
        self.cell = mmap.mmap(-1, PROGRESS.size)  # shared with each task's child (fork)

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
                self.load_corpus(*message[1:])
                self.replies.send_bytes(pickle.dumps(("loaded", self.corpus_id)))
            elif kind == "run":
                reply = self.run_task(*message[1:])
                self.replies.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))

    def load_corpus(self, corpus_id: str, payload: bytes) -> None:
        corpus = pickle.loads(payload)
        self.corpus_id = corpus_id
        self.sentences = [s.warm_features() for s in corpus["sentences"]]
        self.helpers = dict(corpus.get("helpers") or {})
        self.tokenizer = None
        if corpus.get("tokenizer"):
            from attnprog.synth.runtime.paper_form import tokenizer_from_spec

            self.tokenizer = tokenizer_from_spec(corpus["tokenizer"])
        if _Preloaded.nlp is not None:
            texts = list(dict.fromkeys(s.text for s in self.sentences))
            _Preloaded.docs.clear()
            _Preloaded.docs.update(zip(texts, _Preloaded.nlp.pipe(texts, batch_size=64)))
        self.baseline = _address_space_bytes()

    def run_task(self, task_id, token, corpus_id, source, name, start, stop, timeout, budget):
        """Run one program on texts [start, stop) in forked children; the reply to the parent:
        ("done", task_id, token, packed float32 cells as bytes, failed [k] bool as bytes,
        [(j, reason)], fatal reason, seconds used). Builtins only."""
        sentences = self.sentences[start:stop]
        k = len(sentences)
        cells = [None] * k
        failed = np.zeros(k, dtype=bool)
        reasons: list[tuple[int, str]] = []
        fatal, used = "", 0.0
        todo = list(range(k))
        if corpus_id != self.corpus_id:
            fatal = "the sandbox lost its corpus (internal error)"
        while todo and not fatal:
            t0 = time.monotonic()
            records, end = self.fork_and_run(source, name, sentences, todo, timeout, budget - used)
            used += time.monotonic() - t0
            for index, kind, payload in records:
                if kind == _CELLS:
                    cells[index] = payload
                else:
                    failed[index] = True
                    reasons.append((index, payload))
            todo = todo[len(records):]
            if end is None:
                continue  # every text answered
            what, why, index = end
            if what == "fatal":
                fatal = why
            elif index in todo:  # that call failed: mark it, run the rest in a fresh child
                failed[index] = True
                reasons.append((index, why))
                todo.remove(index)
            if used >= budget and todo and not fatal:
                fatal = f"used its time budget of {seconds(budget)} s before text {start + todo[0]}"
        if fatal:
            return ("done", task_id, token, None, failed.tobytes(), reasons, fatal, used)
        chunks = [c if c is not None else np.zeros(n_cells(s.n), np.float32)
                  for c, s in zip(cells, sentences, strict=True)]
        values = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return ("done", task_id, token, values.tobytes(), failed.tobytes(), sorted(reasons),
                "", used)

    def fork_and_run(self, source, name, sentences, todo, timeout, budget):
        """Run the program on ``sentences[i] for i in todo`` in a fresh child. Returns the
        checked records [(i, kind, cells or reason)], in ``todo`` order, and how it ended:
        None when every text was answered, else ("fatal" | "text", reason, text index)."""
        read_fd, write_fd = os.pipe()
        _widen(write_fd)
        PROGRESS.pack_into(self.cell, 0, DEFINING, time.monotonic())
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_fd)
            _child(self, write_fd, source, name, sentences, todo, timeout, budget)
        os.close(write_fd)
        try:
            return self._watch_child(pid, read_fd, sentences, todo, timeout, budget)
        finally:
            os.close(read_fd)
            _end_task(pid)

    def _position(self, todo, at_least: int) -> int:
        """Position in ``todo`` of the text the child says it is on (never below
        ``at_least``). Its word can only move the clock forward text by text: the template
        times each position from when it first sees it, not from what the child writes."""
        index, _ = PROGRESS.unpack_from(self.cell, 0)
        if math.isfinite(index) and index >= 0 and int(index) in todo:
            return max(at_least, todo.index(int(index)))
        return at_least

    def _watch_child(self, pid, fd, sentences, todo, timeout, budget):
        records: list = []
        buffer = bytearray()
        defined = False
        started = time.monotonic()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        malformed = "sent a malformed record (the program wrote to the sandbox's pipe)"
        position, since = 0, started  # the text being run, and since when (template's clock)
        while True:
            now = time.monotonic()
            seen = self._position(todo, len(records)) if defined else 0
            if seen > position:
                position, since = seen, now
            index = todo[position]
            call_deadline = since + timeout + _GRACE
            if now >= started + budget:
                return records, ("fatal", f"used its time budget of {seconds(budget)} s", index)
            if now >= call_deadline:
                if not defined:
                    why = f"timeout after {seconds(timeout)} s while defining the program"
                    return records, ("fatal", why, index)
                return records, ("text", f"timeout after {seconds(timeout)} s (killed)", index)
            wait = min(call_deadline, started + budget) - now
            if not poller.poll(max(1, min(100, int(wait * 1000)))):
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:  # the child exited
                return records, _exit_outcome(pid, defined, index, len(records) == len(todo))
            buffer += chunk
            at = 0
            while len(buffer) - at >= _RECORD.size:
                text, kind, size = _RECORD.unpack_from(buffer, at)
                if len(buffer) - at < _RECORD.size + size:
                    break
                payload = bytes(buffer[at + _RECORD.size : at + _RECORD.size + size])
                at += _RECORD.size + size
                if kind == _DEFINED and not defined:
                    defined, since = True, time.monotonic()
                    continue
                if kind in (_FATAL, _MEMORY) and not defined:
                    why = _text(payload) if kind == _FATAL else (
                        f"memory limit exceeded ({self.memory_mb:g} MB) while defining the program")
                    return records, ("fatal", why, todo[0])
                expected = todo[len(records)] if len(records) < len(todo) else -1
                if not defined or text != expected:
                    return records, ("fatal", malformed, todo[0])
                if kind == _CELLS and size == 4 * n_cells(sentences[text].n):
                    records.append((text, kind, np.frombuffer(payload, np.float32)))
                elif kind == _FAILED and size <= 4 * MAX_REASON_CHARS:
                    records.append((text, kind, _text(payload)))
                elif kind == _MEMORY:
                    why = f"memory limit exceeded ({self.memory_mb:g} MB) on text {text}"
                    return records, ("fatal", why, text)
                else:
                    return records, ("fatal", malformed, todo[0])
                if len(records) == len(todo):
                    return records, None
            del buffer[:at]


def _text(payload: bytes) -> str:
    return escape(payload.decode("utf-8", errors="replace"))[:MAX_REASON_CHARS]


def _exit_outcome(pid: int, defined: bool, index: int, done: bool):
    """How a child that closed its pipe ended: None when it had answered every text, else
    ("fatal" | "text", reason, text index)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        status = 0
    if done:
        return None
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == getattr(signal, "SIGXCPU", -1):
            why = "CPU time limit exceeded"
        else:
            why = f"crashed (signal {number}{_signal_name(number)})"
    else:
        why = f"exited (code {os.WEXITSTATUS(status)}) instead of returning"
    if not defined:
        return ("fatal", f"{why} while defining the program", index)
    return ("text", why, index)


def _signal_name(number: int) -> str:
    try:
        return ", " + signal.Signals(number).name
    except ValueError:
        return ""


def _end_task(pid: int) -> None:
    """Kill the child and everything it started; reap them."""
    if os.getpid() == 1:  # PID 1 of our own namespace: every other process here is the task's
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                target()
            except (ProcessLookupError, PermissionError):
                pass
    while True:
        try:
            if os.waitpid(-1, 0)[0] == 0:
                break
        except ChildProcessError:
            break


# --- the child --------------------------------------------------------------------------------
def _child(template: Template, fd: int, source, name, sentences, todo, timeout, budget) -> None:
    """Lock down, then run the program on ``sentences[i] for i in todo``; records go to ``fd``."""
    try:
        _lock_down(template, budget)
    except BaseException as err:  # noqa: BLE001 - nothing may run unlocked
        _Records(fd).add(todo[0], _FATAL, f"the sandbox could not lock down ({err})").flush()
        os._exit(0)
    try:
        _run_in_child(template, fd, source, name, sentences, todo, timeout)
    except BaseException:  # noqa: BLE001 - a program's BaseException ends its task
        pass
    os._exit(0)


def _lock_down(template: Template, budget: float) -> None:
    for closable in (template.commands, template.replies):
        closable.close()
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    limits = [
        (resource.RLIMIT_CPU, int(budget) + 2),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, _FILE_BYTES),
        (resource.RLIMIT_NOFILE, 256),
    ]
    if template.baseline:
        limits.append((resource.RLIMIT_AS, template.baseline + int(template.memory_mb * 2**20)))
    for which, value in limits:
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
    rules = seccomp_filter()  # built by the template before it forked
    if rules is not None:
        rules.load()


def _run_in_child(template: Template, fd, source, name, sentences, todo, timeout) -> None:
    import types

    out = _Records(fd)
    first = todo[0]
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        for module_name, module_source in template.helpers.items():
            module = types.ModuleType(module_name)
            sys.modules[module_name] = module
            exec(compile(module_source, f"<helper {module_name}>", "exec"), module.__dict__)
        function = compile_program(source, name, tokenizer=template.tokenizer)
    except ProgramError as err:
        return out.add(first, _FATAL, str(err)).flush()
    except CallTimeout:
        why = f"timeout after {seconds(timeout)} s while defining the program"
        return out.add(first, _FATAL, why).flush()
    except MemoryError:
        return out.add(first, _MEMORY, "").flush()
    except Exception as err:  # a helper module that fails
        return out.add(first, _FATAL, f"a helper module raised {type(err).__name__}: {err}").flush()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    out.add(first, _DEFINED, "").flush()
    for j in todo:
        PROGRESS.pack_into(template.cell, 0, float(j), time.monotonic())
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            cells, why = call_program(function, sentences[j], name)
        except CallTimeout:
            cells, why = None, f"timeout after {seconds(timeout)} s"
        except MemoryError:
            return out.add(j, _MEMORY, "").flush()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if cells is None:
            out.add(j, _FAILED, why[:MAX_REASON_CHARS])
        else:
            out.add(j, _CELLS, cells.astype(np.float32, copy=False).tobytes())
    out.flush()


class _Records:
    """Framed records to the template, written in batches (one write per ~50 ms or 256 KB,
    not one per text: fewer wake-ups of the template)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending: list[bytes] = []
        self.size = 0
        self.since = time.monotonic()

    def add(self, index: int, kind: int, payload) -> _Records:
        data = payload.encode("utf-8", errors="replace") if isinstance(payload, str) else payload
        self.pending += (_RECORD.pack(index, kind, len(data)), data)
        self.size += _RECORD.size + len(data)
        if self.size >= _FLUSH_BYTES or time.monotonic() - self.since >= _FLUSH_SECONDS:
            self.flush()
        return self

    def flush(self) -> None:
        view = memoryview(b"".join(self.pending))
        while view:
            view = view[os.write(self.fd, view):]
        self.pending, self.size, self.since = [], 0, time.monotonic()


def _widen(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _FLUSH_BYTES * 4)
    except (ImportError, OSError):
        pass


def main(argv: list[str]) -> None:
    command_fd, reply_fd = int(argv[0]), int(argv[1])
    memory_mb = float(argv[2])
    modules = [m for m in argv[3].split(",") if m and m != "-"] if len(argv) > 3 else []
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    commands = Connection(command_fd, writable=False)
    replies = Connection(reply_fd, readable=False)
    sys.dont_write_bytecode = True
    warnings.simplefilter("ignore")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # programs that print must not fill a pipe nobody reads
    _preload(modules)
    seccomp_filter()  # built once here; each task's child only loads it
    _not_dumpable()
    replies.send_bytes(pickle.dumps(("ready", os.getpid())))
    os.dup2(devnull, 2)  # startup errors went to the parent; later ones would be programs'
    Template(commands, replies, memory_mb).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
