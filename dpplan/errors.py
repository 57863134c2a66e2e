"""dpplan's errors: each class says whose fault a failure is and carries its exit code.

After click's ``exceptions.py``: the CLI turns any ``DpplanError`` into one line and
``exit_code``; anything else that escapes is a bug of ours (exit 1, traceback with
DPPLAN_DEBUG=1). A user's mistake and our own bug never share a class:

- ``UsageError`` (2): the input is wrong: a flag, a config file, a model file, a model
  that cannot run its example batch, a layout the model does not split into.
- ``InternalError`` (1): dpplan itself failed, or a torch change under it (``torch_apis``).
- ``RunFailed`` (1): a real run of ``dpplan profile`` crashed, was OOM-killed or timed out.
- ``Interrupted`` (130): Ctrl-C or SIGTERM; carries the partial document that was kept.

``UsageError`` also derives from ``ValueError`` and the other two from ``RuntimeError``, so
library callers who catch the builtin kinds keep working; the CLI decides by these classes
only, never by ``ValueError``. This module imports nothing heavy: commands that never plan
(report, gpus, --help) start without torch.
"""

from __future__ import annotations

from pathlib import Path

USAGE_EXIT = 2
FAILURE_EXIT = 1
INTERRUPTED_EXIT = 130
"""128 + SIGINT, what a shell reports for a job stopped by Ctrl-C."""


class DpplanError(Exception):
    """Base of every error dpplan raises on purpose."""

    exit_code = FAILURE_EXIT

    def one_line(self) -> str:
        """The message the CLI prints after ``error:``."""
        return str(self)


class UsageError(DpplanError, ValueError):
    """The user's input is wrong; the message says which input and what is accepted."""

    exit_code = USAGE_EXIT


class InternalError(DpplanError, RuntimeError):
    """dpplan failed (a bug of ours, or a private torch API that changed): not the user's fault."""

    exit_code = FAILURE_EXIT

    def one_line(self) -> str:
        return f"internal error: {self}"


class RunFailed(DpplanError, RuntimeError):
    """A real training run did not finish: a rank crashed, was killed or ran out of memory."""

    exit_code = FAILURE_EXIT


class RunTimedOut(RunFailed):
    """A real run passed its wall-clock limit and was stopped, its whole process tree with it."""


class Interrupted(DpplanError):
    """Ctrl-C or SIGTERM. ``document`` is what had finished (None when nothing had started),
    also written to ``path`` when there is one; the CLI writes it to --json and --html too."""

    exit_code = INTERRUPTED_EXIT

    def __init__(self, message: str = "interrupted", *, document: dict | None = None, path: Path | None = None):
        super().__init__(message)
        self.document = document
        self.path = path
