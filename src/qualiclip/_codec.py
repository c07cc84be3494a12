"""Codec round trips through Pillow, importable without torch, and the life of their workers.

The worker processes that run JPEG 2000 for :mod:`qualiclip.degradations` need only this module
(NumPy and Pillow): where they are spawned rather than forked, they start in a fraction of a
second and stay small. :func:`worker_start` ties each worker's life to its parent's.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import signal
import sys
import threading
import time

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
