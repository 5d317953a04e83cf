"""What the operating system puts between a program and the machine.

Each sandbox worker runs under bubblewrap (``bwrap``) in its own user, network, PID, IPC
and UTS namespaces: the filesystem is the host's, read-only, with a private empty ``/tmp``,
home directories and password hashes hidden, a clean environment, and the worker as PID 1
of its namespace (so when it exits, everything in the namespace dies with it). Inside, the
worker forks one child per task; the child limits itself with rlimits and a seccomp filter
(:func:`seccomp_filter`) before any program code runs.

Where bubblewrap cannot run, :func:`isolation` says why; the sandbox then refuses to run
untrusted code unless the caller asked for ``unsafe`` execution (with a warning).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

UNSAFE_ENV = "ATTNPROG_UNSAFE_SANDBOX"  # "1": run without OS isolation where it is missing
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/tmp",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",  # the same set and dict order in every worker
    "TOKENIZERS_PARALLELISM": "false",  # no thread pool that a fork would copy half of
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}
_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers")


@dataclass(frozen=True)
class Isolation:
    """Whether OS isolation is available here; ``why_not`` says what is missing."""

    bwrap: str | None
    seccomp: bool
    why_not: str = ""

    @property
    def available(self) -> bool:
        return self.bwrap is not None


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe once per process: can bwrap make the namespaces, and is seccomp loadable?"""
    seccomp = _seccomp_module() is not None
    if not sys.platform.startswith("linux"):
        return Isolation(None, seccomp, f"OS isolation needs Linux (this is {sys.platform})")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Isolation(None, seccomp, "bubblewrap is not installed (apt-get install bubblewrap)")
    probe = subprocess.run(
        [bwrap, *_namespace_flags(), "--ro-bind", "/", "/", "--proc", "/proc", "--", "/bin/true"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if probe.returncode != 0:
        error = probe.stderr.strip().splitlines()[-1:] or ["no output"]
        return Isolation(None, seccomp, f"bwrap cannot create namespaces here ({error[0][:200]})")
    return Isolation(bwrap, seccomp)


def require_isolation(unsafe: bool) -> Isolation:
    """The isolation to use; without it, a SandboxError unless ``unsafe`` (then a warning)."""
    from attnprog.errors import SandboxError

    found = isolation()
    unsafe = unsafe or os.environ.get(UNSAFE_ENV) == "1"
    if not found.available:
        if not unsafe:
            raise SandboxError(
                f"untrusted programs need OS isolation, which is unavailable: {found.why_not}; "
                f"install bubblewrap, or set {UNSAFE_ENV}=1 (or pass --unsafe) to run them "
                "without it"
            )
        warnings.warn(
            f"running programs WITHOUT OS isolation ({found.why_not}): they can read your "
            "files, use the network and signal your processes; only file writes are limited",
            stacklevel=3,
        )
    elif not found.seccomp:
        warnings.warn(
            "seccomp is unavailable (pip install pyseccomp; needs libseccomp2): a program can "
            "start processes and signal others inside its own sandbox namespace",
            stacklevel=3,
        )
    return found


def _namespace_flags() -> list[str]:
    return [
        "--unshare-user-try", "--unshare-net", "--unshare-pid", "--unshare-ipc",
        "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
        "--cap-drop", "ALL",
    ]


def wrap_command(command: list[str], bwrap: str, readable: list[str]) -> list[str]:
    """``command`` under bwrap: read-only host filesystem, private /tmp, homes hidden
    (``readable`` paths under them bound back read-only), clean environment, PID 1."""
    args = [bwrap, *_namespace_flags(), "--as-pid-1", "--ro-bind", "/", "/",
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    hidden = sorted({str(Path.home()), "/root", "/home"})
    for folder in hidden:
        if os.path.isdir(folder):
            args += ["--tmpfs", folder]
    for path in sorted(set(readable)):  # e.g. a project (and its venv) cloned under /tmp
        if os.path.exists(path) and any(_is_under(path, h) for h in [*hidden, "/tmp"]):
            args += ["--ro-bind", path, path]
    for secret in _SECRETS:
        if os.path.isfile(secret):
            args += ["--ro-bind", "/dev/null", secret]
    args += ["--clearenv"]
    for name, value in SANDBOX_ENV.items():
        args += ["--setenv", name, value]
    return [*args, "--chdir", "/tmp", "--", *command]


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def readable_paths() -> list[str]:
    """What a worker must read: the interpreter, its libraries, attnprog, spaCy's data."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix,
             str(Path(sys.executable).resolve().parent.parent)}
    paths |= {p for p in sys.path if p and os.path.isdir(p)}
    paths.add(str(Path(__file__).resolve().parents[3]))
    return sorted(paths)


# --- seccomp ----------------------------------------------------------------------------------
_DENIED_SYSCALLS = (
    # processes: no new process, no signal to another one, no tracing or memory access
    "fork", "vfork", "execve", "execveat", "pidfd_open", "pidfd_send_signal",
    "pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "setsid", "setpgid",
    # network and other escape routes
    "socket", "socketpair", "mknod", "mknodat", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "open_by_handle_at", "name_to_handle_at",
    "memfd_create", "seccomp",
)
_CLONE_THREAD = 0x00010000


def _seccomp_module():
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError):
        try:
            import seccomp  # Debian's python3-seccomp
        except (ImportError, OSError):
            return None
    return seccomp


@functools.lru_cache(maxsize=1)
def seccomp_filter():
    """The filter every task process loads (built once, in the worker, before any fork:
    building takes milliseconds, loading a built one a fraction), or None without seccomp.

    Denies (EPERM) new processes (threads are allowed), sending signals (a program has no
    use for them; its own alarm comes from a timer), tracing, sockets, device nodes and
    namespace changes; everything else is allowed.
    """
    seccomp = _seccomp_module()
    if seccomp is None:
        return None
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    denied = seccomp.ERRNO(1)  # EPERM: a Python program sees PermissionError
    for name in _DENIED_SYSCALLS:
        try:
            rules.add_rule(denied, name)
        except (RuntimeError, ValueError, OSError):
            pass  # not a syscall on this architecture
    rules.add_rule(seccomp.ERRNO(38), "clone3")  # ENOSYS: libc falls back to clone()
    rules.add_rule(denied, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        rules.add_rule(denied, name)
    return rules
