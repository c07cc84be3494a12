"""Allocator settings for repeated large forward passes on CPUs (glibc only).

By default glibc serves every block above 32 MiB (every feature map of a large image) with a
fresh ``mmap`` and unmaps it when freed, so each forward pass pays again for the kernel to fault
in and zero its feature maps. :func:`reuse_freed_memory` changes that for the whole process, so
it is a choice of the program, never made behind a library user's back: the ``qualiclip``
command, its service and Ray's scoring actors make it; a program using the library calls it
once itself (``QUALICLIP_REUSE_MEMORY=0`` refuses it everywhere). Once it is made,
:func:`forward_pass` wraps each pass: freed maps go back to the heap for the next pass, what is
kept is bounded by :class:`HeapValve`, and very large passes run with the allocator as it is.

For accelerators, :class:`StagingPool` keeps a few page-locked host buffers that decoded pixels
cross to the device in, reused from batch to batch.

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
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

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

    A setting of the whole process, so the library never makes it by itself: the ``qualiclip``
    command (score, eval, train, tune, serve) and Ray's scoring actors call this; a program that
    scores many images on a CPU through the library calls it once at its start::

        from qualiclip import heap
        heap.reuse_freed_memory()

    By default glibc serves every block above 32 MiB (every feature map of a large image) with a
    fresh ``mmap`` and unmaps it when freed, so each forward pass pays again for the kernel to
    fault in and zero its feature maps: about one page fault per 4 KiB, a tenth or more of the
    time of an RN50 forward at 1024x768. With ``mmap`` off and no trimming, freed maps go back to
    the heap and the next pass reuses them. What the process keeps is bounded by
    :class:`HeapValve`: more than twice the largest working set of one pass, and the heap is
    trimmed. Set ``QUALICLIP_REUSE_MEMORY=0`` to leave the allocator alone (the call then does
    nothing). Until it is called, :func:`forward_pass` leaves the allocator alone.

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


def reusing_freed_memory() -> bool:
    """Whether :func:`reuse_freed_memory` was called in this process and took effect."""
    return bool(_reuse_memory)


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
    if not reusing_freed_memory():  # nothing was changed
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

    On a CPU, once :func:`reuse_freed_memory` took effect: a pass up to
    :data:`LARGE_PASS_PIXELS` reuses freed maps and its working set is measured by the
    process-wide :class:`HeapValve` when the block ends (so the caller drops the pass's tensors
    inside it); a larger pass runs with the allocator as it is. Otherwise this does nothing.
    """
    reuse = device.type == "cpu" and reusing_freed_memory()
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


# --- page-locked staging buffers for host-to-device copies -------------------------------------


class Fence(Protocol):
    """What marks a buffer's copy as finished (a ``torch.cuda.Event``)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class StagingPool:
    """A few reused host buffers, keyed by shape and dtype, for asynchronous copies to a device.

    Allocating page-locked memory costs far more than copying into it (the kernel pins every
    page), so a buffer is kept and reused for the next batch of the same shape. A buffer handed
    back with a fence (an event recorded after its copy was queued) is handed out again only once
    the fence says the copy is done; while every buffer of a shape is still in flight a new one is
    made, up to ``per_shape``, so filling the next batch overlaps the device's work on this one.

    Bounded: at most ``max_bytes`` are kept in free buffers (least recently used shapes go
    first), and at most ``per_shape`` free buffers of one shape.

    Args:
        pin: page-lock the buffers (needs CUDA); ``False`` gives ordinary memory (for tests).
        per_shape: most buffers of one shape and dtype made while all are in flight, and most
            kept free.
        max_bytes: most bytes kept in free buffers.
    """

    def __init__(self, *, pin: bool = True, per_shape: int = 3,
                 max_bytes: int = 256 * 1024 * 1024) -> None:
        if per_shape < 1 or max_bytes < 0:
            raise ValueError("per_shape must be >= 1 and max_bytes >= 0")
        self.pin, self.per_shape, self.max_bytes = pin, per_shape, max_bytes
        self._lock = threading.Lock()
        # key -> free buffers with their fences, oldest first; keys in least-recent-use order
        self._free: OrderedDict[tuple[tuple[int, ...], torch.dtype],
                                list[tuple[torch.Tensor, Fence | None]]] = OrderedDict()
        self._in_use: dict[tuple[tuple[int, ...], torch.dtype], int] = {}
        self.allocations = 0  # buffers made so far (reuse shows as a count that stops growing)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size()
                       for bufs in self._free.values() for b, _ in bufs)

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer of ``shape`` and ``dtype`` whose previous copy (if any) is finished."""
        key = (tuple(shape), dtype)
        wait: Fence | None = None
        with self._lock:
            free = self._free.get(key, [])
            if free:
                self._free.move_to_end(key)
            ready = next((i for i, (_, f) in enumerate(free) if f is None or f.query()), None)
            if ready is None and free and self._in_use.get(key, 0) + len(free) >= self.per_shape:
                ready, wait = 0, free[0][1]  # all in flight and no room: wait for the oldest
            if ready is not None:
                buf, _ = free.pop(ready)
                if not free:
                    self._free.pop(key, None)
            else:
                buf = torch.empty(shape, dtype=dtype, pin_memory=self.pin)
                self.allocations += 1
            self._in_use[key] = self._in_use.get(key, 0) + 1
        if wait is not None:
            wait.synchronize()
        return buf

    def release(self, buf: torch.Tensor, fence: Fence | None = None) -> None:
        """Hand ``buf`` back; ``fence`` marks when the copy out of it is done."""
        key = (tuple(buf.shape), buf.dtype)
        with self._lock:
            self._in_use[key] = max(0, self._in_use.get(key, 0) - 1)
            free = self._free.setdefault(key, [])
            free.append((buf, fence))
            self._free.move_to_end(key)
            if len(free) > self.per_shape:
                _, extra = free.pop(0)
                if extra is not None:
                    extra.synchronize()  # never free memory a copy still reads
            kept = sum(b.numel() * b.element_size() for bs in self._free.values() for b, _ in bs)
            while kept > self.max_bytes and self._free:
                old_key, bufs = next(iter(self._free.items()))
                old, old_fence = bufs.pop(0)
                if not bufs:
                    del self._free[old_key]
                if old_fence is not None:
                    old_fence.synchronize()  # never free memory a copy still reads
                kept -= old.numel() * old.element_size()
