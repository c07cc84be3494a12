"""Fast batch scoring: parallel decoding, same-size batches, a fused inference copy of the tower.

Every input gets a :class:`ScoreResult` in input order; an input that cannot be read or scored
gets its error text instead of a score, and the others are scored regardless.

What makes it fast (each measured by ``benchmarks/bench_score.py``):

* **A fused copy of the ResNet tower** (:class:`FusedResNet`), built once per model: every batch
  norm is folded into the convolution before it (exact in eval mode up to float rounding), and on
  CPUs the ReLU and the residual sum run inside oneDNN's convolution as post-ops
  (``mkldnn._convolution_pointwise``). In the plain model about a third of the time goes to the
  memory-bound batch-norm, ReLU and add passes over large feature maps; here they cost nothing.
* **Channels-last** memory throughout (oneDNN's fast layout); decoded ``H x W x 3`` pixels are
  already channels-last, so no transpose is ever made.
* **O(N) attention pooling** (the first token queries alone; :mod:`qualiclip.clip`).
* **Decoding in threads** (PIL releases the GIL) ahead of the model, and **images of equal size
  grouped** into one forward pass within a bounded look-ahead window; results are put back in
  input order.
* **Freed feature maps reused** on Linux (:func:`reuse_freed_memory`): glibc would otherwise map
  each large map afresh and fault it in page by page in every pass; what is kept is bounded
  (:class:`HeapValve`).
* **Bounded memory**: batches are capped by pixels as well as count, the residual sum is written
  into the shortcut's buffer and each intermediate map is freed as soon as it is consumed, so a
  12-megapixel photo scores with RN50 in well under 4 GiB, at full resolution.

Precision: ``fp32`` (default), ``bf16`` (CPU and CUDA; fast only where the hardware has bf16
arithmetic: AVX512-BF16/AMX CPUs, Ampere+ GPUs; elsewhere oneDNN emulates it, slower than fp32, and
a warning says so), ``fp16`` (CUDA only). The measured effect on scores is in ``docs/precision.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qualiclip.clip import Bottleneck, ModifiedResNet
from qualiclip.model import QualiCLIP

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")

#: Most pixels in one forward pass (8 KonIQ-size 1024x768 images); larger images go one by one.
DEFAULT_MAX_BATCH_PIXELS = 8 * 1024 * 768
#: Most decoded-but-unscored images held while looking for equal sizes.
DEFAULT_LOOKAHEAD = 32
#: Most decoded-but-unscored pixels held (uint8: 3 bytes each, so 192 MB).
DEFAULT_LOOKAHEAD_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True)
class ScoreResult:
    """The outcome for one input: a score, or the reason there is none."""

    path: str
    score: float | None
    error: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# --- precision ---------------------------------------------------------------------------------


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast region for ``precision`` on ``device`` (a no-op for fp32).

    Raises:
        ValueError: unknown precision, or fp16 asked for off CUDA.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device; use bf16 on CPUs")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic in hardware (else it is emulated, and slow)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu: Any = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return True  # MPS and others: leave it to the backend


def _compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# --- memory reuse ------------------------------------------------------------------------------

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

#: Passes over more pixels than this (a 12-megapixel photo, say) run with the allocator as it is:
#: the heap kept for reuse is first returned, and their maps go back to the kernel when freed, so
#: what was kept never adds to the peak of a very large image.
LARGE_PASS_PIXELS = DEFAULT_MAX_BATCH_PIXELS


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


# --- the fused tower ---------------------------------------------------------------------------


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to ``bn(conv(x))`` in eval mode.

    ``bn(y) = (y - mean) * g / sqrt(var + eps) + b``, so scaling each output channel's kernel by
    ``g / sqrt(var + eps)`` and adding ``b - mean * g / sqrt(var + eps)`` as a bias gives the same
    map. Folded in float64, so the only difference is the final rounding to the conv's dtype.

    Returns:
        ``(weight, bias)`` in ``conv.weight``'s dtype, on its device.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("batch norm without running statistics cannot be folded")
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    dtype = conv.weight.dtype
    return weight.to(dtype).detach(), bias.to(dtype).detach()


def _mkldnn_fusion_available() -> bool:
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and hasattr(ops, "_convolution_pointwise_")


class FusedConv(nn.Module):
    """A convolution with its batch norm folded in, an optional ReLU and residual sum.

    ``forward(x, residual)`` is ``relu(conv(x) + residual)``; on CPUs with oneDNN the sum and the
    ReLU are post-ops of the convolution and the result is written into ``residual``'s buffer
    (which the caller gives up), so no extra feature map is allocated.
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> None:
        super().__init__()
        weight, bias = fold_batch_norm(conv, bn)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride = [int(s) for s in conv.stride]
        if isinstance(conv.padding, str):
            raise ValueError(f"string padding {conv.padding!r} is not supported")
        self.padding = [int(p) for p in conv.padding]
        self.dilation = [int(d) for d in conv.dilation]
        self.groups = int(conv.groups)
        self.relu = relu
        self.use_mkldnn = _mkldnn_fusion_available()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        unary = "relu" if self.relu else "none"
        if self.use_mkldnn and x.device.type == "cpu" and x.dtype != torch.float16:
            args = (self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
            ops = torch.ops.mkldnn
            if residual is None:
                return ops._convolution_pointwise(x, *args, unary, [], "")
            # relu(conv(x) + residual), written into residual's buffer (the caller gives it up).
            residual = residual.contiguous(memory_format=torch.channels_last)
            return ops._convolution_pointwise_.binary(
                residual, x, *args, "add", 1.0, unary if self.relu else None, [], ""
            )
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        if residual is not None:
            y += residual
        return y.relu_() if self.relu else y


class FusedBottleneck(nn.Module):
    """:class:`qualiclip.clip.Bottleneck` with folded batch norms (inference only)."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1 = FusedConv(block.conv1, block.bn1, relu=True)
        self.conv2 = FusedConv(block.conv2, block.bn2, relu=True)
        self.avgpool = block.avgpool
        self.conv3 = FusedConv(block.conv3, block.bn3, relu=True)
        self.down_pool: nn.Module | None = None
        self.down_conv: FusedConv | None = None
        if block.downsample is not None:
            pool, conv, bn = block.downsample
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                raise TypeError("a Bottleneck's shortcut must be (pool, Conv2d, BatchNorm2d)")
            self.down_pool, self.down_conv = pool, FusedConv(conv, bn, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out = self.avgpool(out)
        if self.down_conv is not None and self.down_pool is not None:
            x = self.down_conv(self.down_pool(x))
        # x (the block input, or the shortcut just computed) is not needed after the sum, so the
        # sum is written into it.
        return self.conv3(out, residual=x)


class FusedResNet(nn.Module):
    """An inference copy of a :class:`~qualiclip.clip.ModifiedResNet` trunk, batch norms folded.

    The copy's weights are independent of the source (later training does not reach it); the
    attention pooling is the source's own module, shared.

    Args:
        visual: the ResNet image tower, in eval mode.
        dtype: dtype of the copy's weights (bf16/fp16 for reduced precision).

    Shape:
        ``trunk``: ``[B, 3, H, W]`` (CLIP-normalised) -> ``[B, 32 * width, H / 32, W / 32]``.
    """

    def __init__(self, visual: ModifiedResNet, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if visual.training:
            raise ValueError("fold batch norms of a model in eval mode (call model.eval())")
        self.stem = nn.ModuleList(
            [
                FusedConv(visual.conv1, visual.bn1, relu=True),
                FusedConv(visual.conv2, visual.bn2, relu=True),
                FusedConv(visual.conv3, visual.bn3, relu=True),
            ]
        )
        self.avgpool = visual.avgpool
        blocks = [
            block
            for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
            for block in layer.children()
        ]
        if not all(isinstance(block, Bottleneck) for block in blocks):
            raise TypeError("FusedResNet expects ModifiedResNet layers made of Bottleneck blocks")
        self.blocks = nn.ModuleList(FusedBottleneck(b) for b in blocks if isinstance(b, Bottleneck))
        self.to(dtype=dtype)
        self.dtype = dtype
        # The pooling is the source's own module, kept in a tuple so it is not registered (and
        # not copied or cast along with the folded weights).
        self._attnpool: tuple[nn.Module] = (visual.attnpool,)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        for conv in self.stem:
            x = conv(x)
        x = self.avgpool(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attnpool[0](self.trunk(x))


# --- the prepared model ------------------------------------------------------------------------


class InferenceModel:
    """A QualiCLIP model readied for fast inference in one precision.

    Built by :func:`prepare` (cached per model and precision). ``fuse=False`` keeps the model's
    own tower (used for non-ResNet towers and to measure what fusing gains).
    """

    def __init__(
        self, model: QualiCLIP, precision: str = "fp32", fuse: bool = True, compile: bool = False
    ) -> None:
        autocast_context(model.device, precision)  # validates precision / device
        self.model = model
        self.precision = precision
        self.device = model.device
        self.min_size = int(getattr(model, "min_size", 32))
        visual = getattr(model, "visual", None)
        self.visual: Any = visual
        if compile and visual is not None:
            # Inductor does its own batch-norm folding and oneDNN fusions ("freezing"); it
            # compiles once per input size (tens of seconds for RN50 on two cores).
            self.visual = torch.compile(visual, dynamic=False, options={"freezing": True})
        elif fuse and isinstance(visual, ModifiedResNet) and not model.training:
            # (A model in training mode is run as it is: its batch norms use batch statistics.)
            dtype = torch.float32 if self.device.type != "cpu" else _compute_dtype(precision)
            # (Prepacking weights into oneDNN's blocked layout was measured and not kept: no
            # faster at 1024x768, and it ties the layout to one input size.)
            self.visual = FusedResNet(visual, dtype).to(self.device)

    def __call__(self, x: torch.Tensor, *, owned: bool = False) -> torch.Tensor:
        """Scores ``[B]`` (float32, on the model's device) of RGB ``x`` ``[B, 3, H, W]`` in [0, 1].

        Args:
            x: float images on the model's device.
            owned: the caller gives ``x`` up, so it is normalised in place (saves one copy).
        """
        model = self.model
        if not isinstance(model, QualiCLIP):  # any scorer module: [B, 3, H, W] -> [B]
            with torch.inference_mode(), autocast_context(self.device, self.precision):
                return model(x.contiguous(memory_format=torch.channels_last)).float()
        model._check_input(x)
        if owned:
            x = x.sub_(model.mean.to(x.dtype)).div_(model.std.to(x.dtype))
        else:
            x = model.normalize(x)
        reuse = self.device.type == "cpu" and reuse_freed_memory()
        pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        large = reuse and pixels > LARGE_PASS_PIXELS
        valve = _HEAP_VALVE if reuse and not large else None
        if valve is not None:
            valve.before_pass(pixels)
        with (
            _allocator_as_is() if large else contextlib.nullcontext(),
            torch.inference_mode(),
            autocast_context(self.device, self.precision),
        ):
            features = self.visual(x.contiguous(memory_format=torch.channels_last))
        scores = model.scores_from_features(F.normalize(features.float(), dim=-1))
        if valve is not None:
            del x, features  # the pass's maps are all freed: what is held now is kept memory
            valve.after_pass()
        return scores


_PREPARED: weakref.WeakKeyDictionary[QualiCLIP, dict[tuple[Any, ...], tuple[Any, InferenceModel]]]
_PREPARED = weakref.WeakKeyDictionary()


def _state_key(model: nn.Module) -> tuple[Any, ...]:
    # In-place updates (optimiser steps, load_state_dict) bump a tensor's version; .to() moves it.
    tensors = (*model.parameters(), *model.buffers())
    return (*((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors), model.training)


def prepare(
    model: QualiCLIP, precision: str = "fp32", *, fuse: bool = True, compile: bool = False
) -> InferenceModel:
    """The :class:`InferenceModel` of ``model``: built once, reused while its weights are unchanged.

    Raises:
        ValueError: unknown precision, or fp16 off CUDA.
    """
    key, state = (precision, fuse, compile), _state_key(model)
    cache = _PREPARED.setdefault(model, {})
    hit = cache.get(key)
    if hit is not None and hit[0] == state:
        return hit[1]
    if precision == "bf16" and not native_bf16(model.device):
        warnings.warn(
            f"bf16 is emulated on this {model.device.type} (no AVX512-BF16/AMX or bf16 GPU): "
            "expect it to be slower than fp32",
            RuntimeWarning,
            stacklevel=3,
        )
    prepared = InferenceModel(model, precision, fuse, compile)
    cache[key] = (_state_key(model), prepared)
    return prepared


def score_tensors(
    model: QualiCLIP,
    batch: torch.Tensor,
    precision: str = "fp32",
    *,
    fuse: bool = True,
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
) -> torch.Tensor:
    """Scores ``[B]`` (float32, CPU) of a batch ``[B, 3, H, W]`` of RGB in [0, 1].

    The batch runs in chunks of at most ``max_batch_pixels`` pixels (one image at least), so a
    large batch takes no more memory than a full chunk.

    Args:
        model: the scorer (eval mode).
        batch: float RGB images in [0, 1]; not modified.
        precision: one of :data:`PRECISIONS`.
        fuse: use the fused copy of a ResNet tower (same scores to float rounding).
        max_batch_pixels: most pixels in one forward pass.

    Raises:
        ValueError: unknown precision, fp16 off CUDA, ``max_batch_pixels < 1``, or a batch of
            the wrong shape.
    """
    if max_batch_pixels < 1:
        raise ValueError(f"max_batch_pixels must be >= 1, got {max_batch_pixels}")
    if batch.ndim != 4:
        raise ValueError(f"expected a batch [B, 3, H, W], got shape {tuple(batch.shape)}")
    runner = prepare(model, precision, fuse=fuse)
    if batch.shape[0] == 0:
        return torch.empty(0)
    chunk = max(1, max_batch_pixels // max(1, batch.shape[-2] * batch.shape[-1]))
    with torch.inference_mode():
        scores = [
            runner(part.to(model.device, non_blocking=True)).float().cpu()
            for part in batch.split(chunk)
        ]
    return torch.cat(scores)


# --- scoring files -----------------------------------------------------------------------------


@dataclass
class _Decoded:
    index: int
    path: str
    pixels: np.ndarray | None  # H x W x 3, uint8 or uint16
    error: str | None


def _decode(index: int, path: str, min_size: int) -> _Decoded:
    from qualiclip.images import ImageDecodeError, decode_rgb

    try:
        return _Decoded(index, path, decode_rgb(path, min_size=min_size), None)
    except ImageDecodeError as exc:  # its message names the file and says what is wrong
        return _Decoded(index, path, None, str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure becomes this input's error row
        return _Decoded(index, path, None, f"{type(exc).__name__}: {exc}")


def _decoded_in_order(
    paths: Iterable[str], min_size: int, workers: int, prefetch: int
) -> Iterator[_Decoded]:
    """Decode ``paths`` in ``workers`` threads, at most ``prefetch`` ahead, yielding in order.

    PIL's decoders release the GIL, so threads decode while the model computes. The threads are
    daemons told to stop as soon as the consumer stops (Ctrl-C, an error, a closed generator): a
    decode still running then neither delays the exit nor keeps the process alive, as a thread
    pool's workers would (the interpreter joins those at exit).
    """
    jobs: SimpleQueue[tuple[Future[_Decoded], int, str] | None] = SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while (job := jobs.get()) is not None and not stop.is_set():
            future, index, path = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(_decode(index, path, min_size))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, never lost
                future.set_exception(exc)

    threads = [
        threading.Thread(target=work, name=f"qualiclip-decode-{i}", daemon=True)
        for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    pending: deque[Future[_Decoded]] = deque()
    try:
        for index, path in enumerate(paths):
            future: Future[_Decoded] = Future()
            jobs.put((future, index, path))
            pending.append(future)
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        stop.set()
        for future in pending:
            future.cancel()
        for _ in threads:
            jobs.put(None)


def _to_float_batch(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Stack ``H x W x 3`` integer pixels into a channels-last float ``[B, 3, H, W]`` in [0, 1].

    The division is the same as :func:`qualiclip.images.load_image`'s, so values are identical.
    """
    h, w, _ = arrays[0].shape
    pin = device.type == "cuda"
    batch = torch.empty((len(arrays), h, w, 3), dtype=torch.float32, pin_memory=pin)
    for i, arr in enumerate(arrays):
        if arr.dtype == np.uint16:  # torch has few uint16 kernels; NumPy converts exactly
            batch[i].copy_(torch.from_numpy(arr.astype(np.float32))).div_(65535.0)
        else:
            batch[i].copy_(torch.from_numpy(arr)).div_(255.0)
    # [B, H, W, 3] viewed as [B, 3, H, W] is exactly the channels-last layout.
    return batch.permute(0, 3, 1, 2).to(device, non_blocking=True)


class _Grouper:
    """Holds decoded images by size until a batch is full or the look-ahead window is."""

    def __init__(self, batch_size: int, max_batch_pixels: int, lookahead: int, max_pixels: int):
        self.batch_size, self.max_batch_pixels = batch_size, max_batch_pixels
        self.lookahead, self.max_pixels = lookahead, max_pixels
        self.groups: dict[tuple[int, int], list[_Decoded]] = {}
        self.count = self.pixels = 0

    def capacity(self, size: tuple[int, int]) -> int:
        return max(1, min(self.batch_size, self.max_batch_pixels // (size[0] * size[1])))

    def add(self, item: _Decoded) -> Iterator[list[_Decoded]]:
        """Take ``item``; yield the batches that must run now."""
        assert item.pixels is not None  # noqa: S101 - internal invariant, not input validation
        size = (item.pixels.shape[0], item.pixels.shape[1])
        group = self.groups.setdefault(size, [])
        group.append(item)
        self.count += 1
        self.pixels += size[0] * size[1]
        if len(group) >= self.capacity(size):
            yield self._take(size)
        while self.count and (self.count >= self.lookahead or self.pixels >= self.max_pixels):
            yield self._take(self._oldest())

    def drain(self) -> Iterator[list[_Decoded]]:
        while self.count:
            yield self._take(self._oldest())

    def _oldest(self) -> tuple[int, int]:
        return min(self.groups, key=lambda size: self.groups[size][0].index)

    def _take(self, size: tuple[int, int]) -> list[_Decoded]:
        group = self.groups[size]
        batch, rest = group[: self.capacity(size)], group[self.capacity(size) :]
        if rest:
            self.groups[size] = rest
        else:
            del self.groups[size]
        self.count -= len(batch)
        self.pixels -= len(batch) * size[0] * size[1]
        return batch


def _run_batch(runner: InferenceModel, items: list[_Decoded]) -> list[ScoreResult]:
    arrays = [it.pixels for it in items if it.pixels is not None]
    h, w = arrays[0].shape[:2]
    try:
        with torch.inference_mode():
            scores = runner(_to_float_batch(arrays, runner.device), owned=True).cpu().tolist()
    except Exception as exc:  # noqa: BLE001 - a failed batch is reported per input
        if len(items) > 1 and isinstance(exc, (MemoryError, RuntimeError)):
            # Perhaps only the batch was too large: retry one by one before giving up.
            return [r for it in items for r in _run_batch(runner, [it])]
        return [ScoreResult(it.path, None, f"{type(exc).__name__}: {exc}", w, h) for it in items]
    return [ScoreResult(it.path, float(s), None, w, h) for it, s in zip(items, scores, strict=True)]


def score_paths(
    model: QualiCLIP,
    paths: Iterable[str | Path],
    *,
    batch_size: int = 8,
    workers: int = 2,
    precision: Precision = "fp32",
    progress: bool = False,
    fuse: bool = True,
    compile: bool = False,
    lookahead: int = DEFAULT_LOOKAHEAD,
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
    threads: int | None = None,
) -> Iterator[ScoreResult]:
    """Score image files, yielding one :class:`ScoreResult` per path, in input order.

    Images are never resized. Images of equal size found within the next ``lookahead`` inputs
    share a forward pass (at most ``batch_size`` images and ``max_batch_pixels`` pixels; a larger
    image goes alone). Decoding runs in ``workers`` threads ahead of the model. A file that cannot
    be decoded, or is smaller than the model's minimum, gets a row with its error.

    Args:
        model: the scorer, in eval mode.
        paths: image files; consumed lazily (a generator of millions of paths is fine).
        batch_size: most images per forward pass.
        workers: decoding threads.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA); see the module docstring.
        progress: show a progress bar on stderr.
        fuse: use the fused inference copy of a ResNet tower (same scores to float rounding).
        compile: ``torch.compile`` the tower instead (inductor with freezing). Pays off only for
            long runs of one image size: it compiles once per size.
        lookahead: most decoded images waiting for same-size company (bounds memory).
        max_batch_pixels: most pixels in one forward pass (bounds memory).
        threads: intra-op threads for torch during the call (default: torch's setting, one per
            physical core).

    Returns:
        an iterator of results; scoring happens as it is consumed.

    Raises:
        ValueError: a non-positive size argument, unknown precision, fp16 off CUDA.
    """
    for name, value in (
        ("batch_size", batch_size), ("workers", workers), ("lookahead", lookahead),
        ("max_batch_pixels", max_batch_pixels),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    runner = prepare(model, precision, fuse=fuse, compile=compile)  # validates early
    return _score_paths(runner, paths, batch_size, workers, progress, lookahead,
                        max_batch_pixels, threads)


def _score_paths(
    runner: InferenceModel,
    paths: Iterable[str | Path],
    batch_size: int,
    workers: int,
    progress: bool,
    lookahead: int,
    max_batch_pixels: int,
    threads: int | None,
) -> Iterator[ScoreResult]:
    total = len(paths) if isinstance(paths, Sized) else None
    bar = _progress_bar(total) if progress else None
    grouper = _Grouper(batch_size, max_batch_pixels, lookahead, DEFAULT_LOOKAHEAD_PIXELS)
    done: dict[int, ScoreResult] = {}
    next_index = 0

    def run_and_emit(batches: Iterable[list[_Decoded]]) -> Iterator[ScoreResult]:
        """Score ``batches``, then yield every result whose turn (input order) has come."""
        nonlocal next_index
        for batch in batches:
            done.update(zip((it.index for it in batch), _run_batch(runner, batch), strict=True))
        while next_index in done:
            if bar is not None:
                bar.update(1)
            yield done.pop(next_index)
            next_index += 1

    decoded = _decoded_in_order(
        (str(p) for p in paths), runner.min_size, workers, prefetch=max(2, 2 * workers)
    )
    with _torch_threads(threads):
        for item in decoded:
            if item.pixels is None:
                done[item.index] = ScoreResult(item.path, None, item.error)
                yield from run_and_emit(())
            else:
                yield from run_and_emit(grouper.add(item))
        yield from run_and_emit(grouper.drain())
    if bar is not None:
        bar.close()


def _progress_bar(total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="scoring")


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_score(model: QualiCLIP, path: str | Path) -> float:
    """One image scored the plain way: decode, convert, normalise, one fp32 forward, batch 1.

    The engine's results are tested against this, and the benchmark times a loop of it (with the
    model's ``attnpool.full_attention`` set, as the reference pipeline's N x N pooling).
    """
    from qualiclip.images import load_image

    with torch.inference_mode():
        x = load_image(path, min_size=model.min_size)[None].to(model.device)
        return float(model(x)[0])

