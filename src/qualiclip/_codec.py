"""Codec round trips through Pillow and the workers that run them, importable without torch.

The worker processes that run JPEG 2000 for :mod:`qualiclip.degradations` need only this module
(NumPy, Pillow and the standard library): where they are spawned rather than forked, they start
in a fraction of a second and stay small. :class:`CodecWorkers` holds those processes and the
JPEG threads, one object instead of module globals; :func:`worker_start` ties each worker
process's life to its parent's.
"""

from __future__ import annotations

import ctypes
import io
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from PIL import Image


def roundtrip(arr: np.ndarray, fmt: str, value: float) -> np.ndarray:
    """Encode an ``[H, W, 3]`` uint8 image as ``fmt`` and decode it again.

    Args:
        arr: RGB pixels, C-contiguous.
        fmt: ``"JPEG"`` (``value`` is the quality) or ``"JPEG2000"`` (``value`` is the
            compression ratio).
        value: the codec setting.

    Returns:
        The decoded RGB pixels, same shape.
    """
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=int(value))
    else:
        # OpenJPEG needs min(H, W) >= 2**(resolutions-1); ARNIQA uses 8 resolutions.
        res = max(1, min(8, int(math.log2(max(1, min(arr.shape[:2])))) + 1))
        img.save(buf, format="JPEG2000", quality_mode="rates", quality_layers=[float(value)],
                 num_resolutions=res, prog_order="LRCP")
    buf.seek(0)
    with Image.open(buf) as out:
        return np.asarray(out.convert("RGB"))


class CodecWorkers:
    """The workers that code a batch's samples in parallel: JPEG in threads, JPEG 2000 (whose
    codec holds the GIL) in processes.

    Both are made on first use and belong to the process that made them: a copy inherited
    through fork (a DataLoader worker) has no threads or processes behind it, and work handed
    to it would never run, so a forked child makes its own. The processes die with the process
    that made them, however it ends (:func:`worker_start`). One instance serves the package
    (:data:`CODEC_WORKERS`); :func:`qualiclip.degradations.set_codec_processes` is its public
    setting.
    """

    def __init__(self) -> None:
        self.processes: int | None = None  # None: $QUALICLIP_CODEC_PROCESSES, else CPU count
        self._pid = 0
        self._threads: ThreadPoolExecutor | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._pool_size = 0

    def _own(self) -> None:
        """Forget workers inherited through fork: they are the parent's."""
        if self._pid != os.getpid():
            self._threads, self._pool, self._pool_size = None, None, 0
            self._pid = os.getpid()

    def threads(self) -> ThreadPoolExecutor:
        """The threads: Pillow's JPEG codec and torch's samplers release the GIL."""
        self._own()
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=_cpu_count(),
                                               thread_name_prefix="qualiclip-degrade")
        return self._threads

    def process_count(self) -> int:
        """How many JPEG 2000 processes are wanted (0 or 1: code in this process)."""
        if self.processes is not None:
            return self.processes
        env = os.environ.get("QUALICLIP_CODEC_PROCESSES", "").strip()
        if env:
            try:
                return max(0, int(env))
            except ValueError:
                raise ValueError(
                    f"QUALICLIP_CODEC_PROCESSES must be an integer, got {env!r}") from None
        return _cpu_count()

    def j2k_pool(self, n_jobs: int) -> ProcessPoolExecutor | None:
        """Processes for ``n_jobs`` JPEG 2000 samples, or None to code them in this process."""
        n = min(self.process_count(), n_jobs)
        if n <= 1 or multiprocessing.current_process().daemon:
            return None
        self._own()
        if self._pool is None or self._pool_size < n:
            self.shutdown_processes()
            # fork, as torch's DataLoader, on Linux: nothing is re-imported (spawn and forkserver
            # run the main script again, which breaks scripts without a __main__ guard) and the
            # children only run Pillow. Elsewhere fork is unsafe and spawn is the only choice.
            fork = sys.platform.startswith("linux")
            ctx = multiprocessing.get_context("fork" if fork else "spawn")
            # Workers die with this process, however it ends (SIGKILL included): worker_start.
            started_by = (os.getpid(), threading.current_thread() is threading.main_thread())
            self._pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx,
                                             initializer=worker_start, initargs=started_by)
            self._pool_size = n
        return self._pool

    def shutdown_processes(self) -> None:
        """Stop the JPEG 2000 processes (new ones are made when next needed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._pool_size = None, 0


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


#: ``prctl`` option: the signal a process gets when the thread that created it ends (Linux).
_PR_SET_PDEATHSIG = 1
#: Seconds between two looks at the parent, where the kernel cannot be asked to signal.
_WATCH_SECONDS = 0.5


def worker_start(parent: int, created_by_main_thread: bool) -> None:
    """The initializer of a codec worker: die with the parent, leave interrupts to it.

    A worker waits on its task queue for ever, so a parent killed by SIGKILL (or by a SIGTERM
    it does not handle) would leave it orphaned, holding its memory. On Linux the kernel sends
    the worker SIGKILL when its creator ends (``PR_SET_PDEATHSIG``); that signal follows the
    creating *thread*, so it is used only for workers made by the main thread. Elsewhere, and
    for workers made by another thread, a thread in the worker looks at its parent every half
    second and ends the worker when the parent is gone.

    SIGINT (which a terminal sends to the whole process group) is ignored: the parent stops its
    workers itself, and a worker's own ``KeyboardInterrupt`` would only print a traceback.
    SIGTERM ends a worker at once.

    Args:
        parent: the process id of the parent, as it created the pool.
        created_by_main_thread: whether the parent's main thread created the worker.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watched = not (created_by_main_thread and _kill_with_creator())
    if os.getppid() != parent:  # the parent ended before the request above took effect
        os._exit(1)
    if watched:
        threading.Thread(target=_watch, args=(parent,), name="qualiclip-parent-watch",
                         daemon=True).start()


def _kill_with_creator() -> bool:
    """Ask Linux for SIGKILL when the creating thread ends; whether that was granted."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_WATCH_SECONDS)
    os._exit(1)


#: The codec workers of this process (:mod:`qualiclip.degradations` codes through them).
CODEC_WORKERS = CodecWorkers()
