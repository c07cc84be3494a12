"""Batch scoring: decode in parallel, batch images of the same size, one result per input.

Every input gets a :class:`ScoreResult` in input order; an input that cannot be read or scored
gets its error text instead of a score, and the others are scored regardless.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qualiclip.model import QualiCLIP

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


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


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast region for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device; use bf16 on CPUs")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def score_tensors(
    model: QualiCLIP, batch: torch.Tensor, precision: str = "fp32"
) -> torch.Tensor:
    """Scores ``[B]`` (float32, CPU) of a batch ``[B, 3, H, W]`` of RGB in [0, 1]."""
    device = model.device
    with torch.inference_mode(), autocast_context(device, precision):
        x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return model(x).float().cpu()


def _decode(path: str, min_size: int) -> tuple[str, torch.Tensor | None, str | None]:
    from qualiclip.images import load_image

    try:
        return path, load_image(path, min_size=min_size), None
    except Exception as exc:  # noqa: BLE001 - every failure becomes this input's error row
        return path, None, f"{type(exc).__name__}: {exc}"


def _flush(
    model: QualiCLIP, pending: list[tuple[str, torch.Tensor]], precision: str
) -> Iterator[ScoreResult]:
    if not pending:
        return
    batch = torch.stack([t for _, t in pending])
    try:
        scores = score_tensors(model, batch, precision).tolist()
    except Exception as exc:  # noqa: BLE001 - a failed batch is reported per input
        for path, t in pending:
            yield ScoreResult(path, None, f"{type(exc).__name__}: {exc}", t.shape[2], t.shape[1])
        return
    for (path, t), s in zip(pending, scores, strict=True):
        yield ScoreResult(path, float(s), None, t.shape[2], t.shape[1])


def score_paths(
    model: QualiCLIP,
    paths: Iterable[str | Path],
    *,
    batch_size: int = 8,
    workers: int = 2,
    precision: Precision = "fp32",
    progress: bool = False,
) -> Iterator[ScoreResult]:
    """Score image files, yielding one :class:`ScoreResult` per path, in input order.

    Consecutive images of equal size share a forward pass (up to ``batch_size``); images are
    never resized. Decoding runs in ``workers`` threads ahead of the model.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    autocast_context(model.device, precision)  # validate early
    items: Sequence[str] = [str(p) for p in paths]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="img", desc="scoring")
    pending: list[tuple[str, torch.Tensor]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = pool.map(lambda p: _decode(p, model.min_size), items)
        for path, tensor, error in decoded:
            if pending and (
                error is not None
                or len(pending) == batch_size
                or tensor is None
                or tensor.shape != pending[0][1].shape
            ):
                yield from _advance(bar, _flush(model, pending, precision))
                pending = []
            if error is not None or tensor is None:
                yield from _advance(bar, [ScoreResult(path, None, error)])
            else:
                pending.append((path, tensor))
        yield from _advance(bar, _flush(model, pending, precision))
    if bar is not None:
        bar.close()


def _advance(bar: Any, results: Iterable[ScoreResult]) -> Iterator[ScoreResult]:
    for r in results:
        if bar is not None:
            bar.update(1)
        yield r
