"""Worker processes: a part of mhsa_core run as a child process under one
Keras backend.

- which backends can run here (`unavailable_reason`), without importing any;
- a worker's environment (`worker_env`): its backend, and this copy of
  mhsa_core on its path;
- the process itself (`Process`): `python -m MODULE ARGS`, its stdout read
  line by line, its stderr kept in a file of which reports show the tail
  (`TAIL_CHARS`), killed with what it started when asked.

The matrix's workers (`consistency.runner`), the bench's (`bench.run`) and the
export runtimes (`consistency.features.export`) all start theirs here; a
parent process that starts them imports no framework. Owned by neither tool,
so that neither imports the other. Imports nothing but the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO, cast

__all__ = [
    "BACKEND_MODULES",
    "NOT_INSTALLED",
    "TAIL_CHARS",
    "tail",
    "missing_modules",
    "backend_available",
    "unavailable_reason",
    "worker_env",
    "Process",
]

# What `import keras` needs under each backend, besides Keras's own pip
# dependencies (Keras 3.15.1, measured by blocking each module in turn): the
# numpy backend imports scipy.linalg (its linalg) and jax (its nn), jax
# imports scipy and jaxlib. A backend counted as installed without them
# would crash its worker (the default matrix FAILed on a keras+torch install).
BACKEND_MODULES = {
    "tensorflow": ("keras", "tensorflow"),
    "torch": ("keras", "torch"),
    "jax": ("keras", "jax", "jaxlib", "scipy"),
    "numpy": ("keras", "scipy", "jax", "jaxlib"),
}
NOT_INSTALLED = "not installed"  # the start of a skipped backend's reason

# How much of an error text (a worker's stderr, a task's traceback) a report
# keeps: its end, where the exception is.
TAIL_CHARS = 3000


def tail(text: str) -> str:
    """The end of an error text that reports keep (`TAIL_CHARS`)."""
    return text[-TAIL_CHARS:]


def missing_modules(backend: str) -> list[str]:
    """The modules a Keras backend needs that cannot be found here, without
    importing any (`importlib.util.find_spec` of top-level names)."""
    if backend not in BACKEND_MODULES:
        raise ValueError(
            f"Unknown backend. Expected one of {tuple(BACKEND_MODULES)}. "
            f"Received: backend={backend!r}"
        )
    return [m for m in BACKEND_MODULES[backend] if importlib.util.find_spec(m) is None]


def backend_available(backend: str) -> bool:
    """Whether everything a Keras backend imports is installed here."""
    return not missing_modules(backend)


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` is skipped ("not installed: needs scipy"), or None."""
    missing = missing_modules(backend)
    return f"{NOT_INSTALLED}: needs {', '.join(missing)}" if missing else None


def worker_env(backend: str, *, jax_x64: bool = False) -> dict[str, str]:
    """The environment of a worker process for Keras backend `backend`.

    Args:
        backend: the worker's KERAS_BACKEND.
        jax_x64: JAX in 64-bit mode (JAX_ENABLE_X64=1): float64 tasks must
            really be float64 (JAX computes them in float32 otherwise);
            float32 arrays are unaffected. False also drops an inherited
            JAX_ENABLE_X64 (it changes JAX's default dtypes).
    """
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not jax_x64:
        env.pop("JAX_ENABLE_X64", None)
    elif backend == "jax":
        env["JAX_ENABLE_X64"] = "1"
    # The worker imports this very copy of mhsa_core, and finds what the
    # parent finds (a user's modules of custom layers).
    src = str(Path(__file__).resolve().parents[1])
    paths = [src, *[p for p in sys.path if p], env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


class Process:
    """`python -m MODULE ARGS...` as a child process of this interpreter.

    A thread reads its stdout line by line (`next_line`, `stdout_lines`); its
    stderr goes to a file, of which error messages show the tail
    (`stderr_tail`). `close` always, also after `kill`.

    Args:
        module: the module to run, e.g. `worker.__name__` (its owner's name,
            never a copy of it).
        args: its command-line arguments.
        env: its environment (default: this process's).
        stdin: a pipe to its stdin (`send`); else it reads nothing.
        own_group: start it in a session of its own, so that `kill` also
            stops what it started (e.g. torch.compile's compile workers).
            A session of its own also keeps it from the terminal's Ctrl-C:
            its parent then has to `kill` it.
        stderr_path: where its stderr goes (default: a temporary file).
    """

    def __init__(
        self,
        module: str,
        args: Iterable[object] = (),
        *,
        env: dict[str, str] | None = None,
        stdin: bool = False,
        own_group: bool = False,
        stderr_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._own_group = own_group
        self._stderr = (
            open(stderr_path, "w+b")  # read back by `stderr_tail`
            if stderr_path is not None
            else tempfile.TemporaryFile()
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *(str(a) for a in args)],
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            errors="replace",
            start_new_session=own_group,
        )
        # stdout=PIPE: Popen's pipe, never None (typeshed's IO[str] | None).
        self._stdout = cast(IO[str], self.proc.stdout)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._stdout:
            self._lines.put(line.strip())
        self._lines.put(None)  # EOF: the process ended

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def send(self, line: str) -> bool:
        """Writes `line` on its stdin; False if it no longer reads it."""
        if self.proc.stdin is None:
            raise ValueError("`send` needs a process started with stdin=True")
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

    def next_line(self, timeout: float) -> str | None:
        """Its next stdout line, None once it has ended (EOF).

        Raises:
            TimeoutError: no line within `timeout` seconds.
        """
        if self._eof:
            return None
        try:
            line = self._lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise TimeoutError(f"no line within {timeout:.3g} s") from None
        self._eof = line is None
        return line

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it ended within `timeout` seconds (None: waits)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """Kills it (with its session, `own_group`) and waits for it."""
        try:
            if self._own_group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()

    def rss_bytes(self) -> int:
        """Its resident set now (Linux `/proc`), 0 if unknown."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
            return int(text.split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError, ValueError):
            return 0

    def stdout_lines(self) -> list[str]:
        """The stdout lines not read yet, once it has ended (after `wait` or
        `kill`): everything up to EOF."""
        self._reader.join()
        lines = []
        while not self._eof:
            line = self._lines.get()
            self._eof = line is None
            if line is not None:
                lines.append(line)
        return lines

    def stderr_tail(self) -> str:
        """The end of what it wrote on stderr so far (`TAIL_CHARS`)."""
        fd = self._stderr.fileno()
        size = os.fstat(fd).st_size
        # pread leaves the file offset alone, which the child shares: it
        # goes on writing where it was. 4 bytes per character at most (UTF-8).
        start = max(0, size - 4 * TAIL_CHARS)
        return tail(os.pread(fd, size - start, start).decode(errors="replace"))

    def close(self, timeout: float = 30.0) -> None:
        """Ends its stdin and waits up to `timeout` seconds for it to exit
        (then kills it); releases the pipes and the stderr file."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            if not self.wait(timeout):
                self.kill()
        except OSError:
            self.kill()
        self._reader.join(timeout=5)  # it ends at the pipe's EOF
        self._stdout.close()
        self._stderr.close()
