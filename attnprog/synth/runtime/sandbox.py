"""The sandbox: untrusted programs run in isolated worker processes, never in this one.

Each worker is a fresh interpreter started under bubblewrap (:mod:`.isolation`): no
network, no view of other processes, a read-only filesystem with a private /tmp, a clean
environment. It is a template that forks one child per task (one program on a batch of
texts), and the child locks itself down (rlimits, seccomp) before the program's code runs
(:mod:`.worker`). The template times each call, kills a child that overruns and always
answers; this process checks every answer (builtins only, the task's id and random token,
the sizes it expects) and, as a backstop, kills a worker that does not answer in time.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import pickle
import secrets
import signal
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

from attnprog.errors import SandboxError
from attnprog.layout import causal_offsets
from attnprog.synth.features import Sentence
from attnprog.synth.policy import entry_node
from attnprog.synth.program import Program
from attnprog.synth.runtime.execute import ProgramResult
from attnprog.synth.runtime.isolation import (
    SANDBOX_ENV,
    readable_paths,
    require_isolation,
    wrap_command,
)
from attnprog.synth.runtime.paper_helpers import SPACY_HELPERS
from attnprog.synth.runtime.worker import MAX_REASON_CHARS, seconds

__all__ = ["ProgramResult", "Sandbox", "is_paper_program", "run_in_sandbox", "uses_spacy", "modules_needed"]

_MAX_BATCH = 256
_IN_FLIGHT = 2  # tasks queued at a worker: it starts the next while its last reply is read
_POLL_SECONDS = 0.1
_PIPE_BYTES = 1 << 20
_STARTUP_SLACK = 30.0  # seconds a task may take beyond its calls (fork, imports, compile)
_MALFORMED = "worker sent a malformed reply"
_PRELOADABLE = ("spacy", "transformers", "torch")
_WORKER_MAIN = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from attnprog.synth.runtime.worker import main; main(sys.argv[1:])"
)


@dataclass
class _Task:
    id: int
    token: str
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
    seconds: float = 0.0
    tasks_left: int = 0


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, command: list[str], settings: list[str], env: dict | None) -> None:
        command_r, command_w = os.pipe()
        reply_r, reply_w = os.pipe()
        _widen_pipe(reply_w)
        try:
            self.process = subprocess.Popen(
                [*command, str(command_r), str(reply_w), *settings],
                pass_fds=(command_r, reply_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the parent only; it stops the workers
            )
        except BaseException:
            for fd in (command_w, reply_r):  # nothing leaks when it cannot start
                os.close(fd)
            raise
        finally:
            os.close(command_r)
            os.close(reply_w)
        self.commands = Connection(command_w, readable=False)
        self.replies = Connection(reply_r, writable=False)
        self.started = time.monotonic()
        self.ready = False
        self.corpus_id: str | None = None
        self.tasks: deque[_Task] = deque()  # sent, not yet answered; the first is running
        self.head_since = 0.0  # when the worker became free to run tasks[0]
        self.loading = False  # loading a corpus: no program runs, no task clock

    def send(self, message) -> None:
        self.commands.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

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
        """Kill the worker's whole process group unless it exits within ``grace`` seconds."""
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # bwrap and everything under it
        except (ProcessLookupError, PermissionError):
            pass
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
        for closable in (self.commands, self.replies, self.process.stderr):
            try:
                closable.close()
            except (OSError, ValueError):
                pass


def _widen_pipe(fd: int) -> None:
    """Let a worker write a whole batch's reply without waiting for the parent (Linux)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
    except (ImportError, OSError):
        pass  # the default size works, with more context switches


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()


class Sandbox:
    """A pool of isolated sandbox workers; use as a context manager and call :meth:`run`.

    workers         processes (default: one per core)
    timeout         wall-clock seconds per program-text call
    memory_mb       memory a program may allocate on top of the worker's own
    program_seconds time budget of one program over all texts (default 60 s + 4 s per text);
                    a program that spends it is abandoned
    max_timeouts    timed-out texts after which a program is abandoned (default: no limit)
    spacy           load spaCy in each worker first (programs that import it do that anyway)
    tokenizer       the model's (fast) tokenizer, handed to paper-form programs
    helpers         {module name: source} that programs may import (e.g. ``helpers``)
    unsafe          run without OS isolation where it is unavailable (with a warning)
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout: float = 5.0,
        memory_mb: float = 1024,
        *,
        program_seconds: float | None = None,
        max_timeouts: int | None = None,
        batch_size: int | None = None,
        progress: bool = True,
        spacy: bool = False,
        tokenizer=None,
        helpers: dict[str, str] | None = None,
        unsafe: bool = False,
        start_timeout: float = 600.0,
    ) -> None:
        if os.name != "posix":
            raise SandboxError("the sandbox needs a POSIX system (Linux or macOS)")
        self.isolation = require_isolation(unsafe)
        self.n_workers = max(1, int(workers or os.cpu_count() or 1))
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.program_seconds = program_seconds
        self.max_timeouts = max_timeouts
        self.batch_size = batch_size
        self.progress = progress
        self.start_timeout = start_timeout
        self.tokenizer_spec = None
        if tokenizer is not None:
            from attnprog.synth.runtime.paper_form import tokenizer_spec

            self.tokenizer_spec = tokenizer_spec(tokenizer)
        self.helpers = dict(helpers or {})
        self.modules: set[str] = {"spacy"} if spacy else set()
        self.calls = 0  # program-text calls sent to workers
        self.replaced = 0  # workers killed or lost and replaced
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
        package_root = str(Path(__file__).resolve().parents[3])
        command = [sys.executable, "-I", "-c", _WORKER_MAIN, package_root]
        settings = [str(self.memory_mb), ",".join(sorted(self.modules)) or "-"]
        env = None  # bwrap gives the worker a clean environment
        if self.isolation.available:
            command = wrap_command(command, self.isolation.bwrap, readable_paths())
        else:
            env = dict(SANDBOX_ENV, PATH=os.environ.get("PATH", SANDBOX_ENV["PATH"]))
        try:
            return _Worker(command, settings, env)
        except OSError as err:
            raise SandboxError(
                f"cannot start a sandbox worker ({err}); check that {sys.executable} runs"
            ) from err

    def _swap(self, worker: _Worker, kill: bool = True, grace: float = 0.0) -> int:
        """Stop ``worker`` and start a fresh one in its place; returns the old one's status."""
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
        on_result: Callable[[int, ProgramResult], None] | None = None,
    ) -> list[ProgramResult]:
        """Run every program on every text; one result per program, in order.

        ``on_result(i, result)`` is called as soon as program ``i`` has finished (for
        writing results out as they come, so an interrupted run keeps them).
        """
        offsets = causal_offsets([s.n for s in sentences])
        states = [
            _ProgramState(np.zeros(int(offsets[-1]), np.float32), np.zeros(len(sentences), bool))
            for _ in programs
        ]
        if programs and sentences:
            needed = modules_needed(programs, with_tokenizer=self.tokenizer_spec is not None)
            if not needed <= self.modules:  # workers must preload these: restart them
                self.close()
                self.modules |= needed
            self.start()
            _Run(self, list(programs), list(sentences), offsets, states, progress,
                 on_result).go()
        return [_result(state) for state in states]

    def _batch_size(self, n_programs: int, n_texts: int) -> int:
        if self.batch_size:
            return self.batch_size
        # enough chunks to keep every worker busy, none longer than _MAX_BATCH, all even
        chunks = max(-(-2 * self.n_workers // n_programs), -(-n_texts // _MAX_BATCH))
        return max(1, -(-n_texts // chunks))

    def _budget(self, n_texts: int) -> float:
        if self.program_seconds is not None:
            return float(self.program_seconds)
        return 60.0 + 4.0 * n_texts  # programs averaging up to 4 s a text finish


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
    except Exception:  # any malformed pickle
        return ()
    return message if isinstance(message, tuple) else ()


def _is_reply(message: tuple, task: _Task, offsets: np.ndarray) -> bool:
    """Whether ``message`` is a well-formed "done" reply to ``task`` (see Template.run_task)."""
    if len(message) != 8:
        return False
    kind, task_id, token, values, failed, reasons, fatal, used = message
    n_bytes = 4 * int(offsets[task.stop] - offsets[task.start])
    return (
        kind == "done"
        and task_id == task.id
        and token == task.token
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
        and isinstance(used, float)
    )


class _Run:
    """One call of :meth:`Sandbox.run`: a queue of tasks fed to the workers.

    Each worker holds up to ``_IN_FLIGHT`` tasks, so it starts the next while the parent
    reads the last reply; it runs them in order, so the oldest is the one running.
    """

    def __init__(self, box: Sandbox, programs, sentences, offsets, states, progress,
                 on_result) -> None:
        self.box = box
        self.programs = programs
        self.offsets = offsets
        self.states = states
        self.on_result = on_result
        tokenizer = box.tokenizer_spec if "transformers" in box.modules else None
        payload = {"sentences": sentences, "tokenizer": tokenizer, "helpers": box.helpers}
        self.corpus = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)  # once per run
        # workers keep the last corpus they got: the same texts again are not sent again
        self.corpus_id = hashlib.blake2b(self.corpus, digest_size=16).hexdigest()
        self.budget = box._budget(len(sentences))
        self.queue: deque[_Task] = deque()
        batch = box._batch_size(len(programs), len(sentences))
        for p in range(len(programs)):
            for start in range(0, len(sentences), batch):
                self.queue.append(self._task(p, start, min(start + batch, len(sentences))))
                states[p].tasks_left += 1
        # no reply is longer than all cells, failed flags and reasons of the whole corpus
        self.max_reply = 4 * int(offsets[-1]) + (4 * MAX_REASON_CHARS + 64) * len(sentences) + 4096
        show = box.progress if progress is None else progress
        self.bar = _progress_bar(len(programs) * len(sentences), show)

    def _task(self, program: int, start: int, stop: int) -> _Task:
        self.box._task_ids += 1
        return _Task(self.box._task_ids, secrets.token_hex(8), program, start, stop)

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
            while worker.ready and len(worker.tasks) < _IN_FLIGHT:
                task = self._next_task()
                if task is None:
                    return
                try:
                    self._send(worker, task)
                except OSError:
                    # it has exited or died: _collect sees its pipe end and replaces it
                    self._requeue([worker.tasks.pop()])
                    break

    def _next_task(self) -> _Task | None:
        while self.queue:
            task = self.queue.popleft()
            if not self.states[task.program].fatal:
                return task
            self.bar.update(task.n_texts)
            self._finished(task)
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
        budget = max(0.0, self.budget - self.states[task.program].seconds)
        worker.send(("run", task.id, task.token, self.corpus_id, program.source, program.name,
                     task.start, task.stop, self.box.timeout, budget))
        self.box.calls += task.n_texts

    def _requeue(self, tasks) -> None:
        """Queue tasks a lost worker had not answered, first in line."""
        self.queue.extendleft(reversed(list(tasks)))

    # results
    def _collect(self) -> None:
        by_pipe = {w.replies: w for w in self.box._workers}
        for pipe in wait(list(by_pipe), timeout=_POLL_SECONDS):
            worker = by_pipe[pipe]
            if worker not in self.box._workers:
                continue  # replaced while handling an earlier pipe
            try:
                message = _load_reply(pipe.recv_bytes(self.max_reply))
            except (EOFError, OSError):
                self._lost(worker)
                continue
            if not worker.ready:
                worker.ready = message[:1] == ("ready",)
                if not worker.ready:
                    self._lost(worker)
            elif worker.loading and message == ("loaded", self.corpus_id):
                worker.loading = False
                worker.head_since = time.monotonic()
            elif worker.tasks and _is_reply(message, worker.tasks[0], self.offsets):
                self._done(worker, message)
            else:
                self._fail_running(worker, _MALFORMED)

    def _done(self, worker: _Worker, message) -> None:
        _, _, _, values, failed, reasons, fatal, used = message
        task = worker.tasks.popleft()
        worker.head_since = time.monotonic()
        self.bar.update(task.n_texts)
        state = self.states[task.program]
        state.seconds += used
        if not state.fatal:
            if fatal:
                state.fatal = fatal
            else:
                cells = slice(int(self.offsets[task.start]), int(self.offsets[task.stop]))
                state.values[cells] = np.frombuffer(values, dtype=np.float32)
                state.failed[task.start : task.stop] = np.frombuffer(failed, dtype=np.uint8)
                for j, why in reasons:
                    state.reasons[task.start + j] = why
                    state.timeouts += why.startswith("timeout")
                limit = self.box.max_timeouts
                if limit is not None and state.timeouts >= limit:
                    first = min(i for i, why in state.reasons.items() if why.startswith("timeout"))
                    state.fatal = f"{state.reasons[first]} on text {first}"
        self._finished(task)

    def _finished(self, task: _Task) -> None:
        state = self.states[task.program]
        state.tasks_left -= 1
        if state.tasks_left == 0 and self.on_result is not None:
            self.on_result(task.program, _result(state))

    # failures
    def _watch(self) -> None:
        """Backstops that trust nothing a worker says: start-up time and task deadlines."""
        now = time.monotonic()
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
                task = worker.tasks[0]
                deadline = min(task.n_texts * (self.box.timeout + 2.0), self.budget + 2.0)
                deadline += _STARTUP_SLACK
                if now - worker.head_since > deadline:
                    self._fail_running(worker, f"no reply within {seconds(deadline)} s")

    def _lost(self, worker: _Worker) -> None:
        """The worker's pipe closed: it died (a template never runs program code)."""
        if not worker.ready:
            error = worker.startup_error() or "no output"
            raise SandboxError(
                f"a sandbox worker failed to start: {error}; check that "
                f"`{sys.executable} -m attnprog.synth.runtime.worker` imports attnprog"
            )
        running = worker.tasks.popleft() if worker.tasks else None
        self._requeue(worker.tasks)
        worker.tasks.clear()
        status = self.box._swap(worker, grace=1.0)
        if running is not None:
            self._abandon(running, f"the sandbox worker died (status {status})")

    def _fail_running(self, worker: _Worker, reason: str) -> None:
        running = worker.tasks.popleft() if worker.tasks else None
        self._requeue(worker.tasks)
        worker.tasks.clear()
        self.box._swap(worker)
        if running is not None:
            self._abandon(running, reason)

    def _abandon(self, task: _Task, reason: str) -> None:
        """Fail the program on every text."""
        state = self.states[task.program]
        if not state.fatal:
            state.fatal = reason
        self.bar.update(task.n_texts)
        self._finished(task)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    show = enabled and sys.stderr.isatty()
    return tqdm(total=total, unit="call", desc="sandbox", disable=not show, delay=1.0, leave=False)


def modules_needed(programs: Sequence[Program], with_tokenizer: bool = False) -> set[str]:
    """Heavy modules the programs import (spaCy, transformers, torch), read from their code,
    not their comments: workers load these before forking (spaCy also for programs that call
    the authors' spaCy helpers, :mod:`.paper_helpers`). With ``with_tokenizer``,
    paper-form programs need transformers (the model's tokenizer) and torch where they ask
    it for ``return_tensors="pt"`` (the stand-in tokenizer returns numpy arrays)."""
    needed: set[str] = set()
    for program in programs:
        try:
            tree = ast.parse(program.source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        if with_tokenizer and _is_paper_form(tree, program.name):
            needed.add("transformers")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                needed |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                needed.add(node.module.split(".")[0])
            elif with_tokenizer and isinstance(node, ast.Constant) and node.value == "pt":
                needed.add("torch")  # the real tokenizer's return_tensors="pt" makes tensors
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in SPACY_HELPERS):
                needed.add("spacy")  # the authors' helpers parse with spaCy
    return needed & set(_PRELOADABLE)


def is_paper_program(program: Program) -> bool:
    """Whether the program's entry point has the paper's form ``f(sentence, tokenizer)``."""
    try:
        tree = ast.parse(program.source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return _is_paper_form(tree, program.name)


def _is_paper_form(tree: ast.Module, name: str) -> bool:
    entry = entry_node(tree, name)
    if entry is None:
        return False
    args = entry.args
    return len(args.posonlyargs) + len(args.args) - len(args.defaults) == 2


def uses_spacy(programs: Sequence[Program]) -> bool:
    """True when a program imports spaCy."""
    return "spacy" in modules_needed(programs)


def run_in_sandbox(
    programs: Sequence[Program],
    sentences: Sequence[Sentence],
    *,
    workers: int | None = None,
    timeout: float = 5.0,
    memory_mb: float = 1024,
    progress: bool = True,
    **options,
) -> list[ProgramResult]:
    """Start a sandbox, run ``programs`` on ``sentences`` and stop it again."""
    with Sandbox(workers, timeout, memory_mb, progress=progress, **options) as box:
        return box.run(programs, sentences)
