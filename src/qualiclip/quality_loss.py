"""QualiCLIP as a differentiable function of pixels: a loss, and pyiqa's one-line metric.

Restoration and generation models are trained with perceptual quality terms; QualiCLIP's score
is differentiable in the input pixels (the whole image at full resolution, attention pooling
without positional embedding), so it can be one:

    >>> loss_fn = QualityLoss(create_model("random-tiny"))
    >>> restored = torch.rand(2, 3, 64, 64, requires_grad=True)
    >>> loss_fn(restored).backward()          # 1 - mean score; gradients reach the pixels
    >>> restored.grad.shape
    torch.Size([2, 3, 64, 64])

The scorer's weights are frozen and it stays in eval mode (batch-norm statistics and the O(N)
first-token attention pooling of inference), whatever ``.train()`` is called on the module that
holds the loss. :func:`create_metric` is pyiqa's ``create_metric`` for users coming from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qualiclip.model import QualiCLIP, Scorer, create_model, resolve_device
from qualiclip.precision import PRECISIONS, autocast_context, native_bf16

__all__ = ["QualityLoss", "QualityScore", "create_metric"]


def _scorer(model: QualiCLIP | str | Path, device: str | torch.device | None,
            options: dict[str, Any]) -> QualiCLIP:
    if isinstance(model, (str, Path)):
        built: Scorer = create_model(model, device or "auto", **options)
    elif options:
        raise TypeError(f"model options {sorted(options)} apply to a name, not to a built model")
    else:
        built = model
    if not isinstance(built, QualiCLIP):
        raise TypeError(
            f"a differentiable score needs a QualiCLIP model, got {type(built).__name__} "
            "(an ONNX graph has no gradients: use the checkpoint it was exported from)"
        )
    if device is not None:
        built = built.to(resolve_device(device))
    return built.eval().requires_grad_(False)


def _precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type in ("cuda", "cpu") and native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
    return precision


class QualityScore(nn.Module):
    """QualiCLIP scores ``[B]`` of RGB images in [0, 1], with gradients to the pixels.

    Args:
        model: a :class:`QualiCLIP` or a name/checkpoint for :func:`create_model`.
        device: where the scorer runs (a name is loaded there; default ``"auto"``).
        precision: ``"auto"`` (bf16 autocast where the device computes bf16 natively: recent
            GPUs, CPUs with AMX or AVX512-BF16; fp32 elsewhere), ``"fp32"``, ``"bf16"`` or
            ``"fp16"`` (CUDA). The score's head runs in float32 either way.
        **options: :func:`create_model` options for a name (``prompts``, ``formula``, ...).

    Shape:
        ``[B, 3, H, W]`` (or ``[3, H, W]``) float in [0, 1], any H, W the tower takes
        (at least 32) -> ``[B]`` in [0, 1], higher is better.
    """

    def __init__(
        self,
        model: QualiCLIP | str | Path = "qualiclip",
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__()
        self.model = _scorer(model, device, options)
        self.precision = _precision(precision, self.model.device)
        autocast_context(self.model.device, self.precision)  # refuse fp16 off CUDA up front

    def train(self, mode: bool = True) -> QualityScore:
        """Only this wrapper's flag changes: the scorer always runs as at inference."""
        self.training = mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images.unsqueeze(0)
        self.model.check_input(images)  # TypeError/ValueError naming what is wrong
        with autocast_context(self.model.device, self.precision):
            scores = self.model(images.to(self.model.device))
        # Half-precision scores become float32; a float64 model keeps float64 (gradient checks).
        return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


class QualityLoss(QualityScore):
    """``1 - QualiCLIP score``: a loss to minimise, pushing images towards high quality.

    Args:
        model, device, precision, **options: as for :class:`QualityScore`.
        reduction: ``"mean"`` (default) or ``"sum"`` over the batch, or ``"none"`` (``[B]``).

    Shape:
        ``[B, 3, H, W]`` float RGB in [0, 1] -> a scalar (``[B]`` with ``reduction="none"``).
        Memory grows with the pixels: the backward pass keeps the tower's activations
        (``docs/performance.md`` has RN50's figures at 512x512 and 1024x1024).
    """

    def __init__(
        self,
        model: QualiCLIP | str | Path = "qualiclip",
        *,
        reduction: str = "mean",
        device: str | torch.device | None = None,
        precision: str = "auto",
        **options: Any,
    ) -> None:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        super().__init__(model, device=device, precision=precision, **options)
        self.reduction = reduction

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        loss = 1.0 - super().forward(images)
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


class _Metric(QualityScore):
    """What :func:`create_metric` returns: scores of tensors, files or arrays."""

    lower_better = False
    score_range = (0.0, 1.0)

    def __init__(self, model: QualiCLIP, as_loss: bool, precision: str) -> None:
        super().__init__(model, precision=precision)
        self.as_loss = as_loss

    def forward(self, images: Any) -> torch.Tensor:
        if self.as_loss:
            return super().forward(images)
        from qualiclip.engine import score

        if isinstance(images, (list, tuple)):
            return torch.tensor([float(score(self.model, x)) for x in images])
        with torch.no_grad():
            out = score(self.model, images, precision=self.precision)
        return out if isinstance(out, torch.Tensor) else torch.tensor([out])


def create_metric(
    name: str | Path = "qualiclip",
    *,
    device: str | torch.device = "auto",
    as_loss: bool = False,
    precision: str = "auto",
    **options: Any,
) -> nn.Module:
    """pyiqa's ``pyiqa.create_metric(name, as_loss=...)``, for QualiCLIP and QualiCLIP+.

    Args:
        name: weights (``"qualiclip"``, ``"qualiclip+"``, ``"qualiclip+-spaq"``, a checkpoint).
        device: where it runs.
        as_loss: scores keep their gradients (a tensor input only); otherwise they are computed
            without (the engine's fast path) and inputs may also be file paths, PIL images or
            arrays, one or a list.
        precision: as for :class:`QualityScore`.
        **options: :func:`create_model` options.

    Returns:
        a module ``metric(x) -> [B]`` scores, higher is better (``metric.lower_better`` is
        False, ``metric.score_range`` ``(0, 1)``).

    Example:
        >>> metric = create_metric("random-tiny", device="cpu")
        >>> metric(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2])
    """
    model = _scorer(name, device, options)
    return _Metric(model, as_loss, precision)

