"""Codec round trips through Pillow and the workers that run them, importable without torch.

The worker processes that run JPEG 2000 for :mod:`qualiclip.degradations` need only this module
(NumPy, Pillow and the standard library): where they are spawned rather than forked, they start
in a fraction of a second and stay small. :class:`CodecWorkers` holds those processes and the
JPEG threads, one object instead of module globals.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import sys
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
    to it would never run, so a forked child makes its own. One instance serves the package
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
            self._pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx)
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


#: The codec workers of this process (:mod:`qualiclip.degradations` codes through them).
CODEC_WORKERS = CodecWorkers()
