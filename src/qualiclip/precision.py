"""Precisions: which exist for scoring and for training, what each device can run, autocast.

Scoring (:data:`PRECISIONS`; :data:`PRECISION_CHOICES` adds ``auto``): ``fp32`` (default) runs
everywhere. ``bf16`` runs on every CPU and on CUDA devices that support it; it is fast only where
the hardware has bf16 arithmetic (AVX512-BF16/AMX CPUs, Ampere+ GPUs): elsewhere it is emulated,
slower than fp32, and :func:`qualiclip.engine.prepare` warns. ``fp16`` is CUDA only. ``int8``
runs the ResNet tower's convolutions in 8-bit integers through ONNX Runtime
(:mod:`qualiclip.quantize`): CPUs only, with AVX2 or better (x86) or any 64-bit Arm, and the
``onnx`` extra installed. ``auto`` stands for the fastest precision a device runs natively
(:func:`auto_candidates`; :func:`qualiclip.engine.resolve_precision` makes the choice). The
measured effect of each on scores is in ``docs/precision.md``.

What a CPU has is probed, never assumed: its feature flags as the kernel reports them
(:func:`cpu_flags`) and PyTorch's own dispatch level. Tests replace these probes to run every
path's code on any machine.

Training (:data:`TRAIN_PRECISIONS`, ``optim.precision``): ``auto`` (bf16 autocast on CUDA
devices that support it, else fp32), ``fp32``, or ``bf16`` (autocast on any device, CPU
included); see :func:`train_autocast_dtype`.

A leaf module: it imports nothing of qualiclip's, and torch only when called, so the command
line can offer :data:`PRECISION_CHOICES` and :data:`TRAIN_PRECISIONS` without loading torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import platform
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch

#: A scoring precision.
Precision = Literal["fp32", "bf16", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
#: What a user may ask for when scoring: a precision, or ``auto`` (see :func:`auto_candidates`).
PrecisionChoice = Literal["fp32", "bf16", "fp16", "int8", "auto"]
PRECISION_CHOICES: tuple[str, ...] = get_args(PrecisionChoice)

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
    int8 needs a CPU with integer dot products and ONNX Runtime (:func:`int8_unavailable`).
    ``auto`` is accepted everywhere: it always resolves to something the device runs.

    Raises:
        PrecisionError: the precision is unknown, or ``device`` cannot run it.
    """
    import torch

    device = torch.device(device)
    if precision not in PRECISION_CHOICES:
        raise PrecisionError(
            f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}"
        )
    if precision == "int8":
        why = int8_unavailable(device)
        if why is not None:
            raise PrecisionError(why)
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
    if precision in ("fp32", "int8", "auto"):
        # int8's tower runs in ONNX Runtime; what stays in PyTorch (pooling, head) is float.
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

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "int8": torch.float32}[precision]


# --- what this CPU has -------------------------------------------------------------------------


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (lower case), or an empty set.

    Linux's ``/proc/cpuinfo`` gives ``flags`` on x86 (``avx2``, ``avx512_vnni``, ``avx_vnni``,
    ``amx_int8``, ``amx_bf16``, ``avx512_bf16``, ...) and ``Features`` on Arm (``asimd``,
    ``asimddp``, ...). Elsewhere (macOS, Windows) the set is empty and the callers fall back on
    PyTorch's dispatch level (:func:`torch.backends.cpu.get_cpu_capability`).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.lower().split())
    except OSError:
        pass
    return frozenset()


def _torch_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_int8_kind() -> str | None:
    """How this CPU multiplies 8-bit integers, best first, or ``None`` where int8 would not pay.

    ``"amx"`` (AMX-INT8 tiles: Sapphire Rapids and later), ``"vnni"`` (AVX512-VNNI or AVX-VNNI:
    one instruction per 4-way dot product), ``"avx2"`` (AVX2's multiply-add pairs: slower, and
    ONNX Runtime's weights then use 7 bits so its 16-bit sums cannot saturate), ``"arm"`` (64-bit
    Arm: NEON is always there). ``None``: x86 without AVX2, or another architecture.
    """
    flags = cpu_flags()
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "vnni"
    if "avx2" in flags or _torch_capability() in ("AVX2", "AVX512"):
        return "avx2"
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm"
    return None


def describe_cpu() -> str:
    """What this CPU does natively, for messages: ``CPU (AVX2; int8 by avx2; bf16 emulated)``."""
    import torch

    bf16 = "native" if native_bf16(torch.device("cpu")) else "emulated"
    int8 = f"by {cpu_int8_kind()}" if cpu_int8_kind() else "not run"
    return f"CPU ({_torch_capability()}; int8 {int8}; bf16 {bf16})"


def int8_unavailable(device: torch.device | str = "cpu") -> str | None:
    """Why int8 cannot run on ``device`` here (one line), or ``None`` when it can.

    int8 runs the quantised tower in ONNX Runtime's CPU kernels, so it needs a CPU, integer dot
    products (:func:`cpu_int8_kind`) and the ``onnx`` extra (onnx to export the tower,
    onnxruntime to quantise and run it). Packages are looked up without importing them.
    """
    import torch

    device = torch.device(device)
    if device.type != "cpu":
        return (f"int8 runs on CPUs only (ONNX Runtime's integer kernels), and this run is on "
                f"{device.type}: use fp16, bf16 or fp32 there, or --device cpu")
    missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"int8 needs {' and '.join(missing)}: pip install 'qualiclip[onnx]' "
                "(or use fp32)")
    if cpu_int8_kind() is None:
        return (f"int8 needs integer dot products (AVX2 or later on x86, or 64-bit Arm), and "
                f"this CPU reports {_torch_capability()}: use fp32")
    return None


def auto_candidates(device: torch.device | str) -> tuple[str, ...]:
    """The precisions ``auto`` tries on ``device``, fastest first; the last one always runs.

    On a CPU: int8 first where it can run, then bf16 where the CPU has bf16 arithmetic (AMX or
    AVX512-BF16; emulated bf16 is slower than fp32), then fp32. On AMX CPUs bf16 comes before
    int8: oneDNN's AMX-BF16 convolutions were measured at 2.7-4.3x fp32, and ONNX Runtime's
    int8 there has not been measured. int8 is taken only where its fidelity budget holds for the
    weights (checked when the tower is calibrated: :func:`qualiclip.quantize.int8_report`).
    Elsewhere (CUDA, MPS): fp32 only, until reduced precisions' fidelity there is measured.
    """
    import torch

    device = torch.device(device)
    if device.type != "cpu":
        return ("fp32",)
    int8 = ("int8",) if int8_unavailable(device) is None else ()
    bf16 = ("bf16",) if native_bf16(device) else ()
    if bf16 and cpu_int8_kind() == "amx":
        return (*bf16, *int8, "fp32")
    return (*int8, *bf16, "fp32")


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
