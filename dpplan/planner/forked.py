"""Run part of a plan in a forked child process, on another core.

Planning is pure Python and numpy on one thread: a large plan (a 70B model, every strategy,
eight GPU counts) keeps one core busy for seconds while the machine's others idle. After the
first trace (which pays for torch's lazy imports once), ``estimate`` starts one child with
``fork``, which inherits the loaded model file, torch and that trace for free. Each precision
family's estimates wait in a ``WorkQueue`` of their own; the child traces and plans one family,
this process the others, and both take the rest from the queues (estimate.py
``_plan_in_two_processes``). The child sends its estimates back pickled through a pipe. The
answer is the same either way (tests/planner/test_forked.py).

The child never prints and exits with ``os._exit``, so it runs no clean-up of the parent's
(atexit handlers, buffered output). An exception in the child is raised again in the parent.
If the parent fails or is interrupted first, the child is killed and reaped: no process is
left behind.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpplan.errors import InternalError

MIN_WORK = 500_000
"""Trace events times estimates below which a plan stays in one process (forking costs
about as much as a small plan)."""


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def can_fork() -> bool:
    """Forking a process that has imported torch is safe on Linux (no CUDA is initialised by
    planning); elsewhere plans run in one process."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and available_cpus() >= 2


@dataclass
class ForkedCall:
    """A function running in a child process; ``result()`` waits for its return value."""

    pid: int
    read_fd: int
    done: bool = False

    def result(self) -> Any:
        chunks = []
        with os.fdopen(self.read_fd, "rb") as pipe:
            while chunk := pipe.read(1 << 20):
                chunks.append(chunk)
        _, status = os.waitpid(self.pid, 0)
        self.done = True
        if not chunks:
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C reached the child first
            raise InternalError("the planning child process died without an answer (killed, or out of host memory?)")
        status, value = pickle.loads(b"".join(chunks))
        if status == "error":
            raise value
        return value

    def cancel(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        try:
            os.close(self.read_fd)
        except OSError:
            pass


def start(fn: Callable[[], Any]) -> ForkedCall:
    """Run ``fn()`` in a forked child; its return value (or exception) must pickle."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # the child
        os.close(read_fd)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it; the parent reports
        try:
            payload = pickle.dumps(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            try:
                payload = pickle.dumps(("error", exc))
            except Exception:
                payload = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        try:
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(write_fd)
    return ForkedCall(pid=pid, read_fd=read_fd)


class WorkQueue:
    """Hands the indices 0 .. count-1 out once each, to whichever process asks first, across a
    fork: they wait in a pipe, 4 bytes each, and a read of 4 bytes from a pipe is atomic (the
    kernel serialises readers), so no index is handed out twice. All are written before anyone
    reads, so ``count`` is limited by the pipe's buffer (64 KiB on Linux: 16384 indices)."""

    MAX_COUNT = 16384

    def __init__(self, count: int):
        if count > self.MAX_COUNT:
            raise ValueError(f"at most {self.MAX_COUNT} items")
        self.read_fd, write_fd = os.pipe()
        data = b"".join(i.to_bytes(4, "little") for i in range(count))
        try:
            while data:
                data = data[os.write(write_fd, data):]
        finally:
            os.close(write_fd)  # the queue is empty once drained: reads then return b""

    def take(self) -> int | None:
        """The next index, or None when all are taken."""
        chunk = os.read(self.read_fd, 4)
        return int.from_bytes(chunk, "little") if chunk else None

    def remaining(self) -> int:
        """Indices not taken yet (a moment ago)."""
        import array
        import fcntl
        import termios

        count = array.array("i", [0])
        fcntl.ioctl(self.read_fd, termios.FIONREAD, count)
        return count[0] // 4

    def close(self) -> None:
        try:
            os.close(self.read_fd)
        except OSError:
            pass
