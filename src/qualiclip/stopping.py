"""How qualiclip stops when asked to: SIGTERM is handled as SIGINT is, everywhere.

Schedulers, containers and supervisors (``docker stop``, SLURM, systemd, ``timeout``) ask a
process to stop with SIGTERM, a person at a terminal with Ctrl-C (SIGINT). Both now mean the
same: Python raises :class:`KeyboardInterrupt` (for SIGTERM its subclass :class:`Terminated`)
in the main thread, so every command stops the same way whoever asked: the rows already scored
are kept and the results file is closed validly (``score``), finished part files stay (Ray),
the last checkpoint stays (``train``), and no half-written file is left anywhere
(:mod:`qualiclip.output_files`). The exit status says which signal it was: 130 for SIGINT,
143 for SIGTERM (128 + the signal's number, as a shell reports a process killed by it).

A second SIGTERM while the first is being handled is ignored, so the clean-up that closes
outputs is not itself cut short; SIGKILL cannot be handled and ends a run where it stands
(outputs are then the previous complete files; see ``output_files``).

Example:
    >>> from qualiclip import stopping
    >>> with stopping.terminate_as_interrupt():  # doctest: +SKIP
    ...     try:
    ...         work()
    ...     except KeyboardInterrupt as exc:
    ...         status = stopping.exit_status(exc)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated", "exit_status",
           "keeping_handlers", "terminate_as_interrupt"]

#: Exit statuses of a run stopped by SIGINT and by SIGTERM (128 + signal number).
EXIT_INTERRUPTED = 128 + int(signal.SIGINT)
EXIT_TERMINATED = 128 + int(getattr(signal, "SIGTERM", 15))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises ``KeyboardInterrupt`` (and caught by the same code)."""


def exit_status(exc: BaseException) -> int:
    """130 for an interrupt, 143 for a termination."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


class _Handler:
    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.fired:  # already stopping: let the clean-up finish
            return
        self.fired = True
        raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread.

    Outside the main thread (where Python cannot install handlers) or on a platform without
    SIGTERM, the block runs unchanged. The previous handler is restored afterwards.
    """
    sigterm = getattr(signal, "SIGTERM", None)
    if sigterm is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(sigterm, _Handler())
    try:
        yield
    finally:
        signal.signal(sigterm, previous)


@contextlib.contextmanager
def keeping_handlers() -> Iterator[None]:
    """Restore the SIGTERM and SIGINT handlers when the block ends.

    For libraries that install their own on start-up (``ray.init`` makes SIGTERM exit with
    status 15 at once): the rule above stays in force for the rest of the run.
    """
    signums = [s for s in (getattr(signal, "SIGTERM", None), signal.SIGINT) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = [(s, signal.getsignal(s)) for s in signums]
    try:
        yield
    finally:
        for signum, handler in saved:
            if handler is not None:
                signal.signal(signum, handler)
