"""Allocator settings for repeated large forward passes on CPUs (glibc only).

By default glibc serves every block above 32 MiB (every feature map of a large image) with a
fresh ``mmap`` and unmaps it when freed, so each forward pass pays again for the kernel to fault
in and zero its feature maps. :func:`forward_pass` wraps one pass: freed maps go back to the heap
for the next pass, what is kept is bounded by :class:`HeapValve`, and very large passes run with
the allocator as it is. ``QUALICLIP_REUSE_MEMORY=0`` turns it all off.

A leaf module: it imports nothing of qualiclip's.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterator

import torch

#: Passes over more pixels than this (8 KonIQ-size 1024x768 images; a 12-megapixel photo is
#: larger) run with the allocator as it is: the heap kept for reuse is first returned, and their
#: maps go back to the kernel when freed, so what was kept never adds to the peak of a very large
#: image.
LARGE_PASS_PIXELS = 8 * 1024 * 768

#: Environment variable: ``0`` leaves the C library's allocator as it is (see
#: :func:`reuse_freed_memory`).
REUSE_MEMORY_ENV = "QUALICLIP_REUSE_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (<malloc.h>)
_reuse_memory: bool | None = None


def reuse_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep freed memory for reuse; once per process, Linux only.

    By default glibc serves every block above 32 MiB (every feature map of a large image) with a
    fresh ``mmap`` and unmaps it when freed, so each forward pass pays again for the kernel to
    fault in and zero its feature maps: about one page fault per 4 KiB, a tenth or more of the
    time of an RN50 forward at 1024x768. With ``mmap`` off and no trimming, freed maps go back to
    the heap and the next pass reuses them. What the process keeps is bounded by
    :class:`HeapValve`: more than twice the largest working set of one pass, and the heap is
    trimmed. Set ``QUALICLIP_REUSE_MEMORY=0`` to leave the allocator alone (the call then does
    nothing). Called before the engine's first forward pass on a CPU.

    Returns:
        whether the setting is in effect (``False`` off glibc or when opted out).
    """
    global _reuse_memory
    if _reuse_memory is None:
        _reuse_memory = False
        opted_out = os.environ.get(REUSE_MEMORY_ENV, "1").strip() in {"0", "false", "no"}
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and not opted_out:
            try:
                libc = _libc()
                _reuse_memory = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
                )
            except (OSError, AttributeError):
                _reuse_memory = False
    return _reuse_memory


def _resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def _malloc_trim() -> None:
    _libc().malloc_trim(0)


class HeapValve:
    """Bounds the freed memory kept for reuse: trims the heap when it holds too much.

    Kept blocks do not always fit later requests (sizes vary, small blocks pin big ones apart), so
    the kept heap can creep upwards over a long run of mixed sizes. After each forward pass the
    valve reads the resident size: the first pass, the first after a trim and any pass over more
    pixels than all before it tell the working set of one pass; once the process holds more than
    ``factor`` times the largest working set seen above what it held before the first pass, all
    free memory is returned to the kernel (``malloc_trim``) and the count starts again.

    Args:
        factor: how many working sets may be held.
        resident: reads the process's resident bytes (replaceable for tests).
        trim: returns free heap memory to the kernel (replaceable for tests).
    """

    def __init__(
        self,
        factor: float = 2.0,
        resident: Callable[[], int] = _resident_bytes,
        trim: Callable[[], None] = _malloc_trim,
    ) -> None:
        self.factor, self.resident, self.trim = factor, resident, trim
        self.floor: int | None = None
        self.working_set = 0
        self.trims = 0
        self._fresh = True
        self._most_pixels = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Measure the working set afresh at the next pass (after the heap was trimmed)."""
        with self._lock:
            self._fresh = True

    def before_pass(self, pixels: int = 0) -> None:
        """Note a pass over ``pixels`` pixels (images x height x width) about to run."""
        with self._lock:
            if self.floor is None:
                self.floor = self.resident()
            if pixels > self._most_pixels:  # a larger pass: its working set is measured, not judged
                self._most_pixels, self._fresh = pixels, True

    def after_pass(self) -> None:
        with self._lock:
            if self.floor is None:
                return
            held = self.resident() - self.floor
            if self._fresh:
                self.working_set, self._fresh = max(self.working_set, held), False
            elif held > self.factor * self.working_set:
                self.trim()
                self.trims += 1
                self._fresh = True


_HEAP_VALVE = HeapValve()



@contextlib.contextmanager
def _allocator_as_is() -> Iterator[None]:
    if not reuse_freed_memory():  # nothing was changed
        yield
        return
    _malloc_trim()
    _libc().mallopt(_M_MMAP_MAX, 65536)  # glibc's default: large blocks mapped afresh
    try:
        yield
    finally:
        _libc().mallopt(_M_MMAP_MAX, 0)
        _HEAP_VALVE.reset()



@contextlib.contextmanager
def forward_pass(device: torch.device, pixels: int) -> Iterator[None]:
    """The allocator policy around one forward pass over ``pixels`` pixels on ``device``.

    On a CPU with glibc (unless opted out): a pass up to :data:`LARGE_PASS_PIXELS` reuses freed
    maps and its working set is measured by the process-wide :class:`HeapValve` when the block
    ends (so the caller drops the pass's tensors inside it); a larger pass runs with the
    allocator as it is. Elsewhere this does nothing.
    """
    reuse = device.type == "cpu" and reuse_freed_memory()
    if not reuse:
        yield
        return
    if pixels > LARGE_PASS_PIXELS:
        with _allocator_as_is():
            yield
        return
    _HEAP_VALVE.before_pass(pixels)
    try:
        yield
    finally:
        _HEAP_VALVE.after_pass()
