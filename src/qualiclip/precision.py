"""Precisions: which exist for scoring and for training, what each device can run, autocast.

Scoring (:data:`PRECISIONS`): ``fp32`` (default) runs everywhere. ``bf16`` runs on every CPU and
on CUDA devices that support it; it is fast only where the hardware has bf16 arithmetic
(AVX512-BF16/AMX CPUs, Ampere+ GPUs): elsewhere it is emulated, slower than fp32, and
:func:`qualiclip.engine.prepare` warns. ``fp16`` is CUDA only. The measured effect of each on
scores is in ``docs/precision.md``.

Training (:data:`TRAIN_PRECISIONS`, ``optim.precision``): ``auto`` (bf16 autocast on CUDA
devices that support it, else fp32), ``fp32``, or ``bf16`` (autocast on any device, CPU
included); see :func:`train_autocast_dtype`.

A leaf module: it imports nothing of qualiclip's, and torch only when called, so the command
line can offer :data:`PRECISIONS` and :data:`TRAIN_PRECISIONS` without loading torch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch

#: A scoring precision.
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

#: A training precision (``optim.precision``).
TrainPrecision = Literal["auto", "fp32", "bf16"]
TRAIN_PRECISIONS: tuple[str, ...] = get_args(TrainPrecision)


class PrecisionError(ValueError):
    """A precision this device cannot run; the message says what the machine lacks."""


def check_precision(device: torch.device | str, precision: str) -> None:
    """Refuse up front a precision that ``device`` cannot run.

    fp32 runs everywhere. bf16 runs on every CPU (through oneDNN where its bf16 kernels work,
    else through PyTorch's own convolution: see :func:`qualiclip.fused.onednn_bf16_works`) and
    on CUDA devices that support it. fp16 is CUDA only: CPUs have no fast fp16 convolution.

    Raises:
        PrecisionError: the precision is unknown, or ``device`` cannot run it.
    """
    import torch

    device = torch.device(device)
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise PrecisionError(
            f"fp16 needs a CUDA device, and this run is on {device.type}: use fp32, or bf16 "
            "(runs on any CPU; fast only with AVX512-BF16 or AMX)"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(
            f"bf16 is not supported by {torch.cuda.get_device_name(device)}: use fp16 or fp32"
        )


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast region for ``precision`` on ``device`` (a no-op for fp32).

    Raises:
        PrecisionError: unknown precision, or one ``device`` cannot run (:func:`check_precision`).
    """
    import torch

    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic in hardware (else it is emulated, and slow)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu: Any = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return True  # MPS and others: leave it to the backend


def compute_dtype(precision: str) -> torch.dtype:
    """The tensor dtype of ``precision``."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]



def train_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training precision ``precision`` on ``device``; None for fp32.

    Raises:
        ValueError: ``precision`` is not one of :data:`TRAIN_PRECISIONS`.
    """
    import torch

    if precision not in TRAIN_PRECISIONS:
        raise ValueError(
            f"optim.precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {precision!r}"
        )
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16 else None
