"""Fast scoring: a model readied for inference, tensors in bounded chunks, files in batches.

Every input gets a :class:`ScoreResult` in input order; an input that cannot be read or scored
gets its error text instead of a score, and the others are scored regardless.

What makes it fast (each measured by ``benchmarks/bench_score.py``):

* **A fused copy of the ResNet tower** (:mod:`qualiclip.fused`), built once per model and
  precision by :func:`prepare`: batch norms folded into the convolutions, ReLU and residual sums
  fused into oneDNN's convolutions.
* **Channels-last** memory throughout (oneDNN's fast layout); decoded ``H x W x 3`` pixels are
  already channels-last, so no transpose is ever made.
* **O(N) attention pooling** (the first token queries alone; :mod:`qualiclip.clip`).
* **Decoding in threads** (PIL releases the GIL) ahead of the model (:mod:`qualiclip.reading`),
  and **images of equal size grouped** into one forward pass within a bounded look-ahead window;
  results are put back in input order.
* **Freed feature maps reused** on Linux (:mod:`qualiclip.heap`).
* **Bounded memory**: batches are capped by pixels as well as count, so a 12-megapixel photo
  scores with RN50 in well under 4 GiB, at full resolution.

On a GPU (see ``docs/performance.md``):

* **Pixels cross as uint8** (a quarter of float32's size) through reused page-locked buffers
  (:class:`qualiclip.heap.StagingPool`), asynchronously, and are converted and normalised on the
  device (:func:`qualiclip.images.pixels_to_tensor`, the one conversion every path shares).
* **One pass in flight**: the next batch is staged and queued while the device computes this
  one; scores come back without stalling the queue.
* **Optional JPEG decoding on the GPU** (``decode="gpu"``/``"auto"``; nvJPEG through
  torchvision, the ``gpu`` extra; :mod:`qualiclip.reading`), with CPU decoding in threads for
  everything else.

The module is longer than most because tensors, decoded arrays and files all reach the same
prepared model through the same grouping and pass launcher here; reading files, the tower, the
allocator policy and the precisions it uses live in :mod:`qualiclip.reading`,
:mod:`qualiclip.fused`, :mod:`qualiclip.heap` and :mod:`qualiclip.precision`.

Precisions are those of :mod:`qualiclip.precision`.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qualiclip import heap, images
from qualiclip.clip import ModifiedResNet
from qualiclip.fused import FusedResNet
from qualiclip.model import NonFiniteScoreError, QualiCLIP, Scorer, checked_scores
from qualiclip.precision import (
    PRECISION_CHOICES,
    PRECISIONS,
    Precision,
    PrecisionChoice,
    PrecisionError,
    auto_candidates,
    autocast_context,
    check_precision,
    compute_dtype,
    describe_cpu,
    native_bf16,
)
from qualiclip.reading import Decode, Decoded, JpegDecoder, decoded_in_order, resolve_decoder

__all__ = [
    "DEFAULT_MAX_BATCH_PIXELS", "PRECISIONS", "PRECISION_CHOICES", "Decode", "InferenceModel",
    "Precision", "PrecisionChoice", "ScoreResult", "check_precision", "error_text", "prepare",
    "resolve_precision", "score", "score_arrays", "score_paths",
    "score_tensors",
]


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


# --- the prepared model ------------------------------------------------------------------------


class InferenceModel:
    """A scorer readied for fast inference in one precision.

    Built by :func:`prepare` (cached per model and precision). A :class:`QualiCLIP` runs a fused
    copy of its ResNet tower, or with ``int8`` the quantised one of :mod:`qualiclip.quantize`
    (calibrated at first use); ``fuse=False`` keeps the model's own tower (used for non-ResNet
    towers and to measure what fusing gains). Any other scorer (an ONNX graph's) is called as
    it is.
    """

    def __init__(
        self, model: Scorer, precision: str = "fp32", fuse: bool = True, compile: bool = False
    ) -> None:
        autocast_context(model.device, precision)  # validates precision / device
        self.model = model
        self.precision = precision
        self.device = model.device
        # A QualiCLIP's tower can be fused or compiled; other scorers are called as they are.
        visual = model.visual if isinstance(model, QualiCLIP) else None
        training = isinstance(model, QualiCLIP) and model.training
        self.visual: Any = visual
        if precision == "int8":
            if compile:
                raise PrecisionError("--compile applies to fp32, bf16 and fp16 towers; int8 runs "
                                     "in ONNX Runtime")
            if not isinstance(model, QualiCLIP):
                raise PrecisionError(f"int8 quantises a QualiCLIP model's ResNet tower, and this "
                                     f"scorer is a {type(model).__name__}: use fp32")
            from qualiclip import quantize

            self.visual = quantize.int8_tower(model)
        elif compile and visual is not None:
            # Inductor does its own batch-norm folding and oneDNN fusions ("freezing"); it
            # compiles once per input size (tens of seconds for RN50 on two cores).
            self.visual = torch.compile(visual, dynamic=False, options={"freezing": True})
        elif fuse and isinstance(visual, ModifiedResNet) and not training:
            # (A model in training mode is run as it is: its batch norms use batch statistics.)
            dtype = torch.float32 if self.device.type != "cpu" else compute_dtype(precision)
            # (Prepacking weights into oneDNN's blocked layout was measured and not kept: no
            # faster at 1024x768, and it ties the layout to one input size.)
            self.visual = FusedResNet(visual, dtype).to(self.device)
        # Page-locked buffers that uint8 pixels cross to the GPU in (none on a CPU: pixels are
        # converted straight into the model's input there).
        self.staging = heap.StagingPool() if self.device.type == "cuda" else None

    def to_input(
        self, pixels: Sequence[np.ndarray | torch.Tensor]
    ) -> tuple[torch.Tensor, Callable[[], None]]:
        """Decoded pixels as this model's float input on its device, and a function to call once
        the input has been queued for use (it hands the staging buffer back)."""
        first = pixels[0]
        if self.staging is None or isinstance(first, torch.Tensor):
            return images.pixels_to_tensor(pixels, self.device), _nothing
        h, w = first.shape[:2]
        dtype = torch.int16 if first.dtype == np.uint16 else torch.uint8
        buf = self.staging.acquire((len(pixels), h, w, 3), dtype)
        try:
            x = images.pixels_to_tensor(pixels, self.device, staging=buf)
        except BaseException:
            self.staging.release(buf)
            raise
        staging = self.staging

        on_cuda = self.device.type == "cuda"

        def release() -> None:
            fence = torch.cuda.Event() if on_cuda else None
            if fence is not None:
                fence.record()  # after the copy out of ``buf`` on the current stream
            staging.release(buf, fence)

        return x, release

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
        return self.run_owned([model.normalize_input(x, inplace=owned)], normalized=True)

    def run_owned(self, box: list[torch.Tensor], *, normalized: bool = False) -> torch.Tensor:
        """Scores of the one input in ``box`` (as :meth:`__call__` takes it), which is emptied.

        The input is normalised in place and, with the fused tower, freed as soon as its first
        convolution has read it (:meth:`qualiclip.fused.FusedResNet.trunk_owned`), so a very
        large image does not hold its float pixels through the whole pass. The caller must keep
        no other reference to it.
        """
        model = self.model
        if not isinstance(model, QualiCLIP):
            return self(box.pop(), owned=True)
        x = box.pop()
        if not normalized:
            x = model.normalize_input(x, inplace=True)
        pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        with heap.forward_pass(self.device, pixels):
            with torch.inference_mode(), autocast_context(self.device, self.precision):
                x = x.contiguous(memory_format=torch.channels_last)
                if hasattr(self.visual, "forward_owned"):  # fused or int8: frees x early
                    box.append(x)
                    del x
                    features = self.visual.forward_owned(box)
                else:
                    features = self.visual(x)
                    del x
            scores = model.scores_from_features(F.normalize(features.float(), dim=-1))
            del features  # the pass's maps are freed before the heap is measured
        return scores


def _nothing() -> None:
    return None


_PREPARED: weakref.WeakKeyDictionary[Scorer, dict[tuple[Any, ...], tuple[Any, InferenceModel]]]
_PREPARED = weakref.WeakKeyDictionary()


def _state_key(model: Scorer) -> tuple[Any, ...]:
    """What a prepared copy depends on: a module's tensors and mode (a scorer that is no
    module has no state of ours to follow)."""
    if not isinstance(model, nn.Module):
        return ()
    # In-place updates (optimiser steps, load_state_dict) bump a tensor's version; .to() moves it.
    tensors = (*model.parameters(), *model.buffers())
    return (*((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors), model.training)


def prepare(
    model: Scorer, precision: str = "fp32", *, fuse: bool = True, compile: bool = False
) -> InferenceModel:
    """The :class:`InferenceModel` of ``model``: built once, reused while its weights are unchanged.

    ``precision="auto"`` is resolved here (:func:`resolve_precision`); the result's
    ``precision`` says what it became.

    Raises:
        PrecisionError: unknown precision, or one the model's device cannot run.
    """
    key, state = (precision, fuse, compile), _state_key(model)
    cache = _PREPARED.setdefault(model, {})
    hit = cache.get(key)
    if hit is not None and hit[0] == state:
        return hit[1]
    if precision == "auto":
        chosen = resolve_precision(model, "auto", compile=compile)
        prepared = prepare(model, chosen, fuse=fuse, compile=compile)
        cache[key] = (_state_key(model), prepared)
        return prepared
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


#: What ``auto`` chose, per device and model, announced once per process.
_ANNOUNCED: set[tuple[str, str, str]] = set()


def resolve_precision(model: Scorer, precision: str, *, compile: bool = False) -> str:
    """The precision that ``precision`` stands for with ``model``: itself, or what ``auto`` picks.

    ``auto`` takes the first of :func:`qualiclip.precision.auto_candidates` that holds for this
    model: the fastest precision the device runs natively, int8 only for a ResNet tower whose
    calibration met the fidelity budget (:func:`qualiclip.quantize.int8_report`, which calibrates
    at first use). A scorer that is not a QualiCLIP module (an ONNX graph) runs as exported:
    fp32. With ``compile`` (``torch.compile`` of the tower) ``auto`` picks among the float
    precisions only: the int8 tower runs in ONNX Runtime. The choice and its reason go to stderr
    once per process.

    Raises:
        PrecisionError: ``precision`` is unknown, or one the model's device (or the model: an
            ONNX graph, a tower int8 cannot take) cannot run, or int8 with ``compile``.
    """
    model.check_precision(precision)  # the device's, or an ONNX graph's own, limits
    if precision == "int8":
        if compile:
            raise PrecisionError("--compile applies to fp32, bf16 and fp16 towers, and int8 runs "
                                 "in ONNX Runtime: drop --compile, or use another precision")
        from qualiclip import quantize

        quantize.check_quantizable(model)  # a ResNet tower; calibration waits for prepare
    if precision != "auto":
        return precision
    chosen, notes = "fp32", []
    # A scorer other than a QualiCLIP module (an ONNX graph) runs as it was exported: fp32.
    qualiclip = model if isinstance(model, QualiCLIP) else None
    for candidate in (auto_candidates(model.device) if qualiclip is not None else ()):
        if candidate == "int8" and qualiclip is not None:
            if compile:
                notes.append("int8 passed over: --compile applies to float towers")
                continue
            if not isinstance(qualiclip.visual, ModifiedResNet):
                notes.append("int8 passed over: not a ResNet tower")
                continue
            from qualiclip import quantize

            report = quantize.int8_report(qualiclip)
            budget = f"the budget is Spearman >= {quantize.FIDELITY_MIN_SPEARMAN}"
            notes.append(f"int8 {'met' if report.holds else 'passed over'}: "
                         f"{report.describe()}; {budget}")
            if not report.holds:
                continue
        chosen = candidate
        break
    where = describe_cpu() if model.device.type == "cpu" else model.device.type
    announced = (str(model.device), model.name, chosen)
    if announced not in _ANNOUNCED:
        _ANNOUNCED.add(announced)
        print(f"qualiclip: precision auto -> {chosen} on this {where}"
              + "".join(f"; {note}" for note in notes), file=sys.stderr, flush=True)
    return chosen


def score_tensors(
    model: Scorer,
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
        precision: one of :data:`PRECISION_CHOICES`.
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


@torch.inference_mode()
def score(model: Scorer, x: Any, *, precision: str = "fp32") -> float | torch.Tensor:
    """Score one image or a batch with the fast path.

    A model in eval mode runs its fused inference copy (:func:`prepare`, built once and reused
    while the weights are unchanged): the same scores as ``model(x)`` to float rounding, faster.
    A batch runs in chunks of at most :data:`DEFAULT_MAX_BATCH_PIXELS` pixels.

    Args:
        model: the scorer.
        x: a path, bytes, PIL image, NumPy array (``HxWx3`` or ``HxW``; uint8, uint16 or float
            in [0, 1]), tensor ``[3, H, W]``, or tensor batch ``[B, 3, H, W]``.
        precision: ``"fp32"`` (default), ``"bf16"``, ``"fp16"`` (CUDA only), ``"int8"`` (CPU
            only) or ``"auto"``; see ``docs/precision.md`` for the effect on scores.

    Returns:
        a float for a single image, a ``[B]`` tensor (on the CPU) for a batch.

    Raises:
        ValueError: unknown precision, one the device cannot run, or an image too small.

    Example:
        >>> import qualiclip
        >>> model = qualiclip.create_model("random-tiny")
        >>> 0.0 <= qualiclip.score(model, torch.rand(3, 64, 80)) <= 1.0
        True
    """
    batched = isinstance(x, torch.Tensor) and x.ndim == 4
    dtype = model.input_dtype
    pixels = images.as_pixels(x, min_size=model.min_size)
    if isinstance(pixels, list) and dtype == torch.float32 and isinstance(model, QualiCLIP):
        # Integer pixels take the engine's own conversion (uint8 to the device, converted there).
        outcomes, _ = score_arrays(model, pixels, precision=precision, batch_size=len(pixels))
        first = outcomes[0]
        for out in outcomes:
            if isinstance(out, Exception):
                raise out
        assert not isinstance(first, Exception)  # noqa: S101 - raised just above
        return float(first)
    if isinstance(pixels, list):
        batch = images.pixels_to_tensor(pixels)  # one image, or one array's equal-size images
    else:
        batch = pixels
    scores = score_tensors(model, batch.to(dtype=dtype), precision)
    return scores if batched else float(scores[0])


# --- scoring files -----------------------------------------------------------------------------


class _Grouper:
    """Holds decoded images by size until a batch is full or the look-ahead window is."""

    def __init__(self, batch_size: int, max_batch_pixels: int, lookahead: int, max_pixels: int):
        self.batch_size, self.max_batch_pixels = batch_size, max_batch_pixels
        self.lookahead, self.max_pixels = lookahead, max_pixels
        self.groups: dict[tuple[int, int, str], list[Decoded]] = {}
        self.count = self.pixels = 0

    def capacity(self, key: tuple[int, int, str]) -> int:
        return max(1, min(self.batch_size, self.max_batch_pixels // (key[0] * key[1])))

    def add(self, item: Decoded) -> Iterator[list[Decoded]]:
        """Take ``item``; yield the batches that must run now."""
        key = item.key
        group = self.groups.setdefault(key, [])
        group.append(item)
        self.count += 1
        self.pixels += key[0] * key[1]
        if len(group) >= self.capacity(key):
            yield self._take(key)
        while self.count and (self.count >= self.lookahead or self.pixels >= self.max_pixels):
            yield self._take(self._oldest())

    def drain(self) -> Iterator[list[Decoded]]:
        while self.count:
            yield self._take(self._oldest())

    def _oldest(self) -> tuple[int, int, str]:
        return min(self.groups, key=lambda key: self.groups[key][0].index)

    def _take(self, key: tuple[int, int, str]) -> list[Decoded]:
        group = self.groups[key]
        batch, rest = group[: self.capacity(key)], group[self.capacity(key) :]
        if rest:
            self.groups[key] = rest
        else:
            del self.groups[key]
        self.count -= len(batch)
        self.pixels -= len(batch) * key[0] * key[1]
        return batch


Outcomes = list[float | Exception]


def _launch(
    runner: InferenceModel, pixels: Sequence[np.ndarray | torch.Tensor]
) -> Callable[[], Outcomes]:
    """Start one pass over equal-size decoded images; the returned function gives its outcomes.

    On a CPU the pass is done before this returns. On CUDA it is only queued: the scores come
    back through an asynchronous copy, so the caller can stage and queue the next pass before
    waiting for this one. A pass that fails for several images (out of memory, say) is retried
    one image at a time before anyone's failure is reported.
    """
    try:
        with torch.inference_mode():
            x, release = runner.to_input(pixels)
            box = [x]
            del x  # the pass holds the only reference, and drops it after the first convolution
            try:
                scores = runner.run_owned(box)
            finally:
                box.clear()
                release()
            if runner.device.type != "cuda":
                ready = checked_scores([float(s) for s in scores.cpu().tolist()])
                return lambda: list(ready)
            host = scores.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
    except Exception as exc:  # noqa: BLE001 - a failed pass is reported per image
        if len(pixels) > 1 and isinstance(exc, (MemoryError, RuntimeError)):
            parts = [_launch(runner, [p]) for p in pixels]
            return lambda: [r for part in parts for r in part()]
        failed: Outcomes = [exc] * len(pixels)
        return lambda: list(failed)

    def wait() -> Outcomes:
        try:
            done.synchronize()
            return checked_scores([float(s) for s in host.tolist()])
        except Exception as exc:  # noqa: BLE001 - an asynchronous failure, reported per image
            return [exc] * len(pixels)

    return wait


def error_text(exc: Exception) -> str:
    """A failed image's error in its row: the exception's type and message, or our own message
    alone (a score that is not a number)."""
    return str(exc) if isinstance(exc, NonFiniteScoreError) else f"{type(exc).__name__}: {exc}"


def _in_flight(runner: InferenceModel) -> int:
    """Passes queued ahead of the one waited for: one on CUDA (stage the next while this one
    computes), none elsewhere (a CPU's cores are all busy with the pass)."""
    return 1 if runner.device.type == "cuda" else 0


def _run_batch(runner: InferenceModel, items: list[Decoded]) -> Callable[[], list[ScoreResult]]:
    """Start the pass over ``items``; the returned function gives their rows."""
    pixels = [it.pixels for it in items if it.pixels is not None]
    key = items[0].key
    h, w = key[0], key[1]
    wait = _launch(runner, pixels)

    def rows() -> list[ScoreResult]:
        return [
            ScoreResult(it.path, None, error_text(out), w, h)
            if isinstance(out, Exception) else ScoreResult(it.path, out, None, w, h)
            for it, out in zip(items, wait(), strict=True)
        ]

    return rows


def score_arrays(
    model: Scorer,
    arrays: list[np.ndarray],
    *,
    precision: str = "fp32",
    batch_size: int = 8,
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
) -> tuple[list[float | Exception], list[int]]:
    """Score decoded ``H x W x 3`` images (uint8 or uint16), equal sizes sharing passes.

    The grouping is :func:`score_paths`'s (at most ``batch_size`` images and
    ``max_batch_pixels`` pixels a pass; a larger image goes alone), for images already in
    memory: the HTTP service and :func:`score` on integer pixels use it. The pixels are converted
    by :func:`qualiclip.images.pixels_to_tensor` (on the device, on a GPU).

    Returns:
        ``(outcomes, passes)``: each image's score or exception, in input order, and the number
        of images in each forward pass.
    """
    runner = prepare(model, precision)
    everything = sum(a.shape[0] * a.shape[1] for a in arrays) + 1  # no look-ahead bound here
    grouper = _Grouper(batch_size, max_batch_pixels, len(arrays) + 1, everything)
    items = [Decoded(i, "", arr, None) for i, arr in enumerate(arrays)]
    batches = [b for it in items for b in grouper.add(it)] + list(grouper.drain())
    outcomes: list[float | Exception] = [0.0] * len(arrays)
    queued: deque[tuple[list[Decoded], Callable[[], Outcomes]]] = deque()
    for i, batch in enumerate(batches):
        queued.append((batch, _launch(runner, [it.pixels for it in batch
                                               if it.pixels is not None])))
        while queued and (len(queued) > _in_flight(runner) or i == len(batches) - 1):
            done, wait = queued.popleft()
            for it, out in zip(done, wait(), strict=True):
                outcomes[it.index] = out
    return outcomes, [len(b) for b in batches]


def score_paths(
    model: Scorer,
    paths: Iterable[str | Path],
    *,
    batch_size: int = 8,
    workers: int = 2,
    precision: PrecisionChoice = "fp32",
    progress: bool = False,
    fuse: bool = True,
    compile: bool = False,
    lookahead: int = DEFAULT_LOOKAHEAD,
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
    threads: int | None = None,
    decode: Decode = "auto",
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
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA), ``"int8"`` (CPU) or ``"auto"``
            (:func:`resolve_precision`); see ``docs/precision.md``.
        progress: show a progress bar on stderr.
        fuse: use the fused inference copy of a ResNet tower (same scores to float rounding).
        compile: ``torch.compile`` the tower instead (inductor with freezing). Pays off only for
            long runs of one image size: it compiles once per size.
        lookahead: most decoded images waiting for same-size company (bounds memory).
        max_batch_pixels: most pixels in one forward pass (bounds memory).
        threads: intra-op threads for torch during the call (default: torch's setting, one per
            physical core).
        decode: ``"auto"`` decodes plain JPEGs on the GPU when the model is on CUDA and
            torchvision's nvJPEG is installed (the ``gpu`` extra), everything else in CPU
            threads; ``"cpu"`` always uses the threads; ``"gpu"`` is ``"auto"`` that refuses to
            run without GPU decoding. nvJPEG's pixels differ slightly from libjpeg's, so scores
            differ in the third or fourth decimal (see ``docs/performance.md``).

    Returns:
        an iterator of results; scoring happens as it is consumed.

    Raises:
        ValueError: a non-positive size argument, unknown precision, fp16 off CUDA, an unknown
            ``decode``, or ``decode="gpu"`` where GPU decoding is unavailable.
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
    decoder = resolve_decoder(decode, runner.device)
    return _score_paths(runner, paths, batch_size, workers, progress, lookahead,
                        max_batch_pixels, threads, decoder)


def _score_paths(
    runner: InferenceModel,
    paths: Iterable[str | Path],
    batch_size: int,
    workers: int,
    progress: bool,
    lookahead: int,
    max_batch_pixels: int,
    threads: int | None,
    decoder: JpegDecoder | None = None,
) -> Iterator[ScoreResult]:
    total = len(paths) if isinstance(paths, Sized) else None
    bar = progress_bar(total) if progress else None
    grouper = _Grouper(batch_size, max_batch_pixels, lookahead, DEFAULT_LOOKAHEAD_PIXELS)
    done: dict[int, ScoreResult] = {}
    queued: deque[tuple[list[Decoded], Callable[[], list[ScoreResult]]]] = deque()
    next_index = 0

    def settle(keep: int) -> None:
        while len(queued) > keep:
            batch, rows = queued.popleft()
            done.update(zip((it.index for it in batch), rows(), strict=True))

    def run_and_emit(batches: Iterable[list[Decoded]], keep: int) -> Iterator[ScoreResult]:
        """Start ``batches``, leaving at most ``keep`` passes unfinished, then yield every
        result whose turn (input order) has come."""
        nonlocal next_index
        for batch in batches:
            queued.append((batch, _run_batch(runner, batch)))
            settle(keep)
        settle(keep)
        while next_index in done:
            if bar is not None:
                bar.update(1)
            yield done.pop(next_index)
            next_index += 1

    decoded = decoded_in_order(
        (str(p) for p in paths), runner.model.min_size, workers, prefetch=max(2, 2 * workers),
        decoder=decoder,
    )
    keep = _in_flight(runner)
    with _torch_threads(threads):
        for item in decoded:
            if item.pixels is None:
                done[item.index] = ScoreResult(item.path, None, item.error)
                yield from run_and_emit((), keep)
            else:
                yield from run_and_emit(grouper.add(item), keep)
        yield from run_and_emit(grouper.drain(), 0)
    if bar is not None:
        bar.close()


def progress_bar(total: int | None) -> Any:
    """The progress bar of scoring on stderr (tqdm's): ``total`` images, or unknown."""
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
