"""The sandbox: untrusted programs run in worker processes, never in this one.

Each worker is a fresh interpreter (``python -m attnprog.synth.runtime.worker``, so the
parent's torch and ``__main__`` are never inherited or re-imported) that limits its own
memory and CPU time and refuses network, processes and file writes through an audit
hook. A task is one program on a batch of texts: one pipe round trip per batch. The
parent watches a shared progress cell per worker and kills a worker whose call runs past
the timeout; a worker that crashes or runs out of memory is replaced, its program is
marked failed with the reason, and the run goes on.

A program runs in the worker's own process, so it can write to the worker's pipes and
progress cell: the parent trusts nothing it reads back. Replies are unpickled with no
globals allowed and checked field by field, and every task has a deadline that does not
depend on what the worker reports.
"""

from __future__ import annotations

import hashlib
import io
import math
import mmap
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

from attnprog.errors import SandboxError
from attnprog.layout import causal_offsets
from attnprog.synth.features import Sentence
from attnprog.synth.program import Program
from attnprog.synth.runtime.execute import ProgramResult
from attnprog.synth.runtime.worker import DEFINING, IDLE, MAX_REASON_CHARS, PROGRESS, seconds

__all__ = ["ProgramResult", "Sandbox", "run_in_sandbox", "uses_spacy"]

_MAX_BATCH = 64
_IN_FLIGHT = 2  # tasks queued at a worker: it starts the next while its last reply is read
_POLL_SECONDS = 0.1
_PIPE_BYTES = 1 << 20
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
_MALFORMED = "worker sent a malformed reply (did the program write to the sandbox's pipe?)"


@dataclass
class _Task:
    id: int
    program: int
    start: int
    stop: int

    @property
    def n_texts(self) -> int:
        return self.stop - self.start


@dataclass
class _ProgramState:
    values: np.ndarray
    failed: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)
    fatal: str = ""
    timeouts: int = 0


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, command: list[str], settings: list[str], env: dict) -> None:
        command_r, command_w = os.pipe()
        reply_r, reply_w = os.pipe()
        _widen_pipe(reply_w)
        progress_fd = _shared_cell(PROGRESS.size)
        try:
            self.process = subprocess.Popen(
                [*command, str(command_r), str(reply_w), str(progress_fd), *settings],
                pass_fds=(command_r, reply_w, progress_fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the parent only; it stops the workers
            )
        except BaseException:
            for fd in (command_w, reply_r, progress_fd):  # nothing leaks when it cannot start
                os.close(fd)
            raise
        finally:
            os.close(command_r)
            os.close(reply_w)
        self.progress = mmap.mmap(progress_fd, PROGRESS.size)
        os.close(progress_fd)
        PROGRESS.pack_into(self.progress, 0, IDLE, 0.0)
        self.commands = Connection(command_w, readable=False)
        self.replies = Connection(reply_r, writable=False)
        self.started = time.monotonic()
        self.ready = False
        self.corpus_id: str | None = None
        self.tasks: deque[_Task] = deque()  # sent, not yet answered; the first is running
        self.head_since = 0.0  # when the worker became free to run tasks[0]
        self.loading = False  # loading a corpus: no program runs, no task clock
        self.draining = False  # used most of its CPU budget: no new tasks, then replaced

    def send(self, message) -> None:
        self.commands.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def call_in_progress(self) -> tuple[int, float]:
        """(text index or DEFINING, monotonic start) of the call the worker is in, or
        (IDLE, 0). The worker writes IDLE with start 0 between calls, so a read that mixes
        two writes shows start 0 and counts as idle."""
        index, start = PROGRESS.unpack_from(self.progress, 0)
        if not (start > 0.0 and math.isfinite(start) and math.isfinite(index)):
            return int(IDLE), 0.0
        return int(index), start

    def startup_error(self) -> str:
        """What a worker that failed to start wrote to stderr; stops the worker."""
        self.process.kill()  # so that reading its stderr ends
        try:
            error = self.process.stderr.read().decode(errors="replace").strip()[-2000:]
        except (OSError, ValueError):
            error = ""
        self.kill()
        return error

    def kill(self, grace: float = 0.0) -> int:
        """Kill the process unless it exits within ``grace`` seconds; returns its exit status
        (negative: the signal that ended it)."""
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
        status = self.process.wait()
        self.close_pipes()
        return status

    def retire(self) -> None:
        """Ask an idle worker to exit; kill it if it does not within a second."""
        try:
            self.send(("exit",))
            self.process.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def close_pipes(self) -> None:
        for closable in (self.commands, self.replies, self.process.stderr, self.progress):
            try:
                closable.close()
            except (OSError, ValueError, BufferError):
                pass


def _widen_pipe(fd: int) -> None:
    """Let a worker write a whole batch's reply without waiting for the parent (Linux)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
    except (ImportError, OSError):
        pass  # the default size works, with more context switches


def _shared_cell(size: int) -> int:
    """A file descriptor of ``size`` zeroed bytes that parent and worker both map."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("attnprog-sandbox-progress", 0)
    else:
        handle = tempfile.TemporaryFile()
        fd = os.dup(handle.fileno())
        handle.close()
    os.ftruncate(fd, size)
    return fd


def _worker_env() -> dict:
    """The parent's environment, with single-threaded numeric libraries and attnprog importable."""
    env = dict(os.environ)
    env.update({name: "1" for name in _THREAD_VARS})
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _exit_reason(status: int) -> str:
    """Words for a worker's exit status."""
    if status < 0:
        number = -status
        if number == getattr(signal, "SIGXCPU", -1):
            return "CPU time limit exceeded"
        if number == signal.SIGKILL:
            return "worker killed (signal 9), most likely out of memory"
        return f"worker crashed (signal {number})"
    return f"worker exited (code {status})"


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()


class Sandbox:
    """A pool of sandbox workers; use as a context manager and call :meth:`run`.

    workers       processes (default: one per core)
    timeout       wall-clock seconds per program-text call
    memory_mb     memory a program may allocate on top of the worker's own
    cpu_seconds   CPU time a worker may use before it is replaced
    max_timeouts  timeouts after which a program is abandoned (failed on every text)
    spacy         load spaCy in each worker first (for paper-form programs that use it)
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout: float = 2.0,
        memory_mb: float = 1024,
        *,
        cpu_seconds: float = 600.0,
        batch_size: int | None = None,
        max_timeouts: int = 3,
        progress: bool = True,
        spacy: bool = False,
        start_timeout: float = 60.0,
    ) -> None:
        if os.name != "posix":
            raise SandboxError("the sandbox needs a POSIX system (Linux or macOS)")
        self.n_workers = max(1, int(workers or os.cpu_count() or 1))
        self.timeout = float(timeout)
        self.grace = max(0.5, self.timeout / 2)  # beyond the in-worker alarm, before a kill
        self.memory_mb = memory_mb
        self.cpu_seconds = cpu_seconds
        self.batch_size = batch_size
        self.max_timeouts = max(1, max_timeouts)
        self.progress = progress
        self.start_timeout = start_timeout
        self.calls = 0  # program-text calls sent to workers
        self.replaced = 0  # workers killed or lost and replaced
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # no cwd on the worker's path
        self._command = [sys.executable, *safe_path, "-m", "attnprog.synth.runtime.worker"]
        self._settings = [str(memory_mb), str(cpu_seconds), "spacy" if spacy else "-"]
        self._env = _worker_env()
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        self._task_ids = 0

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes (they get ready in the background)."""
        while len(self._workers) < self.n_workers:
            self._workers.append(self._spawn())

    def close(self) -> None:
        """Stop all workers."""
        for worker in list(self._workers):
            if worker.ready and not worker.tasks:
                worker.retire()
            else:
                worker.kill()
        self._workers.clear()

    def _spawn(self) -> _Worker:
        try:
            return _Worker(self._command, self._settings, self._env)
        except OSError as err:
            raise SandboxError(
                f"cannot start a sandbox worker ({err}); check that {sys.executable} runs"
            ) from err

    def _swap(self, worker: _Worker, kill: bool = True, grace: float = 0.0) -> int:
        """Stop ``worker`` (kill it, or let it exit) and start a fresh one in its place;
        returns the old one's exit status."""
        if kill:
            status = worker.kill(grace)
            self.replaced += 1
        else:
            worker.retire()
            status = worker.process.returncode
        self._workers.remove(worker)
        self._workers.append(self._spawn())
        return status

    # --- running ---------------------------------------------------------------------------
    def run(
        self,
        programs: Sequence[Program],
        sentences: Sequence[Sentence],
        progress: bool | None = None,
    ) -> list[ProgramResult]:
        """Run every program on every text; one result per program, in order."""
        offsets = causal_offsets([s.n for s in sentences])
        states = [
            _ProgramState(np.zeros(int(offsets[-1]), np.float32), np.zeros(len(sentences), bool))
            for _ in programs
        ]
        if programs and sentences:
            self.start()
            _Run(self, list(programs), list(sentences), offsets, states, progress).go()
        return [_result(state) for state in states]

    def _batch_size(self, n_programs: int, n_texts: int) -> int:
        if self.batch_size:
            return self.batch_size
        # enough chunks to keep every worker busy, none longer than _MAX_BATCH, all even
        chunks = max(-(-2 * self.n_workers // n_programs), -(-n_texts // _MAX_BATCH))
        return max(1, -(-n_texts // chunks))


def _result(state: _ProgramState) -> ProgramResult:
    if state.fatal:
        return ProgramResult(np.zeros_like(state.values), np.ones_like(state.failed), state.fatal)
    reason = ""
    if state.reasons:
        first = min(state.reasons)
        reason = f"{state.reasons[first]} on text {first}"
    return ProgramResult(state.values, state.failed, reason)


class _ReplyUnpickler(pickle.Unpickler):
    """Unpickles builtins only: a reply that names any class or function is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"a sandbox reply may not name {module}.{name}")


def _load_reply(data: bytes) -> tuple:
    """A worker's message as a tuple; () when it is not a pickled tuple of builtins."""
    try:
        message = _ReplyUnpickler(io.BytesIO(data)).load()
    except Exception:  # any malformed pickle: the program may have written it
        return ()
    return message if isinstance(message, tuple) else ()


def _is_reply(message: tuple, task: _Task, offsets: np.ndarray) -> bool:
    """Whether ``message`` is a well-formed "done" reply to ``task`` (see Worker.run_task)."""
    if len(message) != 8:
        return False
    kind, task_id, values, failed, reasons, fatal, cpu, recycle = message
    n_bytes = 4 * int(offsets[task.stop] - offsets[task.start])
    return (
        kind == "done"
        and task_id == task.id
        and isinstance(fatal, str)
        and (bool(fatal) or (isinstance(values, bytes) and len(values) == n_bytes))
        and isinstance(failed, bytes)
        and len(failed) == task.n_texts
        and isinstance(reasons, list)
        and all(
            isinstance(r, tuple) and len(r) == 2 and type(r[0]) is int
            and 0 <= r[0] < task.n_texts and isinstance(r[1], str)
            for r in reasons
        )
        and isinstance(cpu, (int, float))
        and isinstance(recycle, bool)
    )


class _Run:
    """One call of :meth:`Sandbox.run`: a queue of tasks fed to the workers.

    Each worker holds up to ``_IN_FLIGHT`` tasks, so it starts the next batch while the
    parent reads the last reply; it runs them in order, so the oldest is the one running.
    """

    def __init__(self, box: Sandbox, programs, sentences, offsets, states, progress) -> None:
        self.box = box
        self.programs = programs
        self.offsets = offsets
        self.states = states
        self.corpus = pickle.dumps(sentences, protocol=pickle.HIGHEST_PROTOCOL)  # once per run
        # workers keep the last corpus they got: the same texts again are not sent again
        self.corpus_id = hashlib.blake2b(self.corpus, digest_size=16).hexdigest()
        self.queue: deque[_Task] = deque()
        batch = box._batch_size(len(programs), len(sentences))
        for p in range(len(programs)):
            for start in range(0, len(sentences), batch):
                self.queue.append(self._task(p, start, min(start + batch, len(sentences))))
        # no reply is longer than all cells, failed flags and reasons of the whole corpus
        self.max_reply = 4 * int(offsets[-1]) + (4 * MAX_REASON_CHARS + 64) * len(sentences) + 4096
        show = box.progress if progress is None else progress
        self.bar = _progress_bar(len(programs) * len(sentences), show)

    def _task(self, program: int, start: int, stop: int) -> _Task:
        self.box._task_ids += 1
        return _Task(self.box._task_ids, program, start, stop)

    def go(self) -> None:
        try:
            while self.queue or any(w.tasks for w in self.box._workers):
                self._assign()
                self._collect()
                self._watch()
        except BaseException:
            self.box.close()  # interrupted or broken: leave no worker behind
            raise
        finally:
            self.bar.close()

    # feeding
    def _assign(self) -> None:
        for worker in list(self.box._workers):
            while worker.ready and not worker.draining and len(worker.tasks) < _IN_FLIGHT:
                task = self._next_task()
                if task is None:
                    return
                try:
                    self._send(worker, task)
                except OSError:
                    # it has exited or died: its pipe still holds any reply it sent, and
                    # _collect reads that before the end of the pipe says what happened
                    self._requeue([worker.tasks.pop()])
                    worker.draining = True
                    break

    def _next_task(self) -> _Task | None:
        while self.queue:
            task = self.queue.popleft()
            if not self.states[task.program].fatal:
                return task
            self.bar.update(task.n_texts)
        return None

    def _send(self, worker: _Worker, task: _Task) -> None:
        worker.tasks.append(task)
        if len(worker.tasks) == 1:
            worker.head_since = time.monotonic()
        if worker.corpus_id != self.corpus_id:  # only at a run's start: no task is in flight
            worker.send(("corpus", self.corpus_id, self.corpus))
            worker.corpus_id = self.corpus_id
            worker.loading = True
        program = self.programs[task.program]
        timeouts_left = self.box.max_timeouts - self.states[task.program].timeouts
        worker.send(("run", task.id, self.corpus_id, program.source, program.name, task.start,
                     task.stop, self.box.timeout, timeouts_left))
        self.box.calls += task.n_texts

    def _requeue(self, tasks) -> None:
        """Queue tasks a lost worker had not started, first in line."""
        self.queue.extendleft(reversed(list(tasks)))

    # results
    def _collect(self) -> None:
        by_pipe = {w.replies: w for w in self.box._workers}
        for pipe in wait(list(by_pipe), timeout=self._wait_seconds()):
            worker = by_pipe[pipe]
            if worker not in self.box._workers:
                continue  # replaced while handling an earlier pipe
            try:
                message = _load_reply(pipe.recv_bytes(self.max_reply))
            except EOFError:
                self._lost(worker)
                continue
            except OSError:  # cut short by a crash, or longer than any reply can be
                if worker.process.poll() is None:
                    self._fail_running(worker, _MALFORMED)
                else:
                    self._lost(worker)
                continue
            if not worker.ready:
                worker.ready = message[:1] == ("ready",)
            elif worker.loading and message == ("loaded", self.corpus_id):
                worker.loading = False
                worker.head_since = time.monotonic()
            elif worker.tasks and _is_reply(message, worker.tasks[0], self.offsets):
                self._done(worker, message)
            else:
                self._fail_running(worker, _MALFORMED)

    def _wait_seconds(self) -> float:
        deadlines = []
        for worker in self.box._workers:
            index, start = worker.call_in_progress()
            if worker.tasks and index != IDLE:
                deadlines.append(start + self.box.timeout + self.box.grace)
        soonest = min(deadlines, default=time.monotonic() + _POLL_SECONDS)
        return min(_POLL_SECONDS, max(0.005, soonest - time.monotonic()))

    def _done(self, worker: _Worker, message) -> None:
        _, _, values, failed, reasons, fatal, cpu, recycle = message
        task = worker.tasks.popleft()
        worker.head_since = time.monotonic()
        self.bar.update(task.n_texts)
        worker.draining |= cpu > self.box.cpu_seconds / 2  # replace it before its CPU limit
        if recycle or (worker.draining and not worker.tasks):
            self._requeue(worker.tasks)  # a recycled worker exits without running these
            worker.tasks.clear()
            self.box._swap(worker, kill=False)
        state = self.states[task.program]
        if state.fatal:
            return
        if fatal:
            state.fatal = fatal
            return
        cells = slice(int(self.offsets[task.start]), int(self.offsets[task.stop]))
        state.values[cells] = np.frombuffer(values, dtype=np.float32)
        state.failed[task.start : task.stop] = np.frombuffer(failed, dtype=np.uint8)
        for j, why in reasons:
            state.reasons[task.start + j] = why
            state.timeouts += why.startswith("timeout")
        if state.timeouts >= self.box.max_timeouts:
            first = min(i for i, why in state.reasons.items() if why.startswith("timeout"))
            state.fatal = f"{state.reasons[first]} on text {first}"

    # failures
    def _watch(self) -> None:
        """Kill workers whose call ran past the timeout; check that starting ones come up."""
        now = time.monotonic()
        limit = self.box.timeout + self.box.grace
        for worker in list(self.box._workers):
            if not worker.ready:
                if now - worker.started > self.box.start_timeout:
                    worker.kill()
                    raise SandboxError(
                        f"a sandbox worker did not start within {self.box.start_timeout:g} s; "
                        "the machine may be overloaded: retry with fewer workers"
                    )
                continue
            if worker.tasks and not worker.loading:
                # a backstop that trusts nothing the worker reports, for a program that
                # stops its alarm and writes "idle" into its progress cell
                budget = (worker.tasks[0].n_texts + 1) * limit
                if now - worker.head_since > budget:
                    self._fail_running(
                        worker, f"no reply within {seconds(budget)} s (the program evaded the timeout)"
                    )
                    continue
            index, start = worker.call_in_progress()
            overdue = worker.tasks and index != IDLE and now - start > limit
            if overdue and worker.call_in_progress() == (index, start):  # the same call, still
                self._timed_out(worker, index)

    def _timed_out(self, worker: _Worker, index: int) -> None:
        task = worker.tasks.popleft()
        state = self.states[task.program]
        self._requeue(worker.tasks)
        worker.tasks.clear()
        self.box._swap(worker)
        timeout = seconds(self.box.timeout)
        if not task.start <= index < task.stop:  # DEFINING, or written by the program
            where = " while defining the program" if index == DEFINING else ""
            self._abandon(task, f"timeout after {timeout} s{where}")
            return
        state.reasons[index] = f"timeout after {timeout} s (worker killed)"
        state.failed[index] = True
        state.timeouts += 1
        if state.timeouts >= self.box.max_timeouts:
            self._abandon(task, f"{state.reasons[index]} on text {index}")
            return
        # the killed worker's finished texts are lost with it: queue the rest again
        self.bar.update(1)
        self._requeue(
            self._task(task.program, a, b)
            for a, b in ((task.start, index), (index + 1, task.stop))
            if a < b
        )

    def _lost(self, worker: _Worker) -> None:
        """The worker's pipe closed: it crashed, exited or was killed."""
        if not worker.ready:
            raise SandboxError(
                f"a sandbox worker failed to start: {worker.startup_error() or 'no output'}; "
                f"check that `{sys.executable} -m attnprog.synth.runtime.worker` imports attnprog"
            )
        index, _ = worker.call_in_progress()
        running = worker.tasks.popleft() if worker.tasks else None
        self._requeue(worker.tasks)
        worker.tasks.clear()
        status = self.box._swap(worker, grace=1.0)  # it is exiting: let it say how
        if running is None:
            return  # died while idle: nothing to blame
        where = " while defining the program" if index == DEFINING else (
            f" on text {index}" if running.start <= index < running.stop else ""
        )
        self._abandon(running, _exit_reason(status) + where)

    def _fail_running(self, worker: _Worker, reason: str) -> None:
        running = worker.tasks.popleft() if worker.tasks else None
        self._requeue(worker.tasks)
        worker.tasks.clear()
        self.box._swap(worker)
        if running is not None:
            self._abandon(running, reason)

    def _abandon(self, task: _Task, reason: str) -> None:
        """Fail the program on every text (its worker died or it kept timing out)."""
        state = self.states[task.program]
        if not state.fatal:
            state.fatal = reason
        self.bar.update(task.n_texts)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    show = enabled and sys.stderr.isatty()
    return tqdm(total=total, unit="call", desc="sandbox", disable=not show, delay=1.0, leave=False)


def uses_spacy(programs: Sequence[Program]) -> bool:
    """True when a program mentions spaCy: its workers then load it before locking down."""
    return any("spacy" in p.source for p in programs)


def run_in_sandbox(
    programs: Sequence[Program],
    sentences: Sequence[Sentence],
    *,
    workers: int | None = None,
    timeout: float = 2.0,
    memory_mb: float = 1024,
    progress: bool = True,
) -> list[ProgramResult]:
    """Start a sandbox, run ``programs`` on ``sentences`` and stop it again."""
    spacy = uses_spacy(programs)
    with Sandbox(workers, timeout, memory_mb, progress=progress, spacy=spacy) as box:
        return box.run(programs, sentences)
