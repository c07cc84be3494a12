"""QualiCLIP as a torchmetrics metric: the mean score of everything seen, across processes.

Needs the ``metric`` extra (``pip install 'qualiclip[metric]'``: torchmetrics); nothing else of
qualiclip imports this module. The state is a sum of scores and a count, both reduced by summing
when torchmetrics synchronises processes (DDP), so ``compute()`` is the mean over every image of
every process, whatever the batch sizes.

Example:
    >>> metric = QualiCLIPMetric("random-tiny")
    >>> metric.update(torch.rand(4, 3, 64, 64))
    >>> float(metric.compute()) > 0
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from torchmetrics import Metric
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "qualiclip's torchmetrics metric needs torchmetrics: pip install 'qualiclip[metric]'"
    ) from exc

from qualiclip.engine import score_tensors
from qualiclip.model import Scorer, create_model
from qualiclip.precision import PRECISIONS

__all__ = ["QualiCLIPMetric"]


class QualiCLIPMetric(Metric):
    """Mean QualiCLIP score of the images passed to :meth:`update`.

    Args:
        model: a scorer (:class:`qualiclip.model.QualiCLIP`, or what :func:`create_model`
            gives for an exported ``.onnx`` graph) or a name/checkpoint for :func:`create_model`
            (``"qualiclip"``, ``"qualiclip+"``, ...); it moves with the metric (``.to()``).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA).
        model_options: :func:`create_model` options for a name (``prompts``, ``formula``, ...).
        **kwargs: torchmetrics' ``Metric`` options (``sync_on_compute``, ``process_group``, ...).

    ``update(images)`` takes ``[B, 3, H, W]`` (or ``[3, H, W]``) RGB, float in [0, 1] or uint8
    0..255, at any size the tower takes; images are scored whole, never resized. Scores are
    computed without gradients (for a differentiable score, see
    :class:`qualiclip.quality_loss.QualityLoss`).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    score_sum: torch.Tensor
    count: torch.Tensor

    def __init__(
        self,
        model: Scorer | str | Path = "qualiclip",
        *,
        precision: str = "fp32",
        model_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        scorer = create_model(model, "cpu", **(model_options or {})) \
            if isinstance(model, (str, Path)) else model
        if isinstance(scorer, nn.Module):  # QualiCLIP and ONNX scorers are: they move with .to()
            scorer.eval().requires_grad_(False)
        self.model: Scorer = scorer
        self.precision = precision
        # float64 sums: a million float32 scores keep their digits.
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def train(self, mode: bool = True) -> QualiCLIPMetric:
        """The scorer stays in eval mode (a training loop's ``.train()`` reaches metrics too)."""
        super().train(mode)
        if isinstance(self.model, nn.Module):
            self.model.eval()
        return self

    def update(self, images: torch.Tensor) -> None:
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.dtype == torch.uint8:
            images = images.float() / 255
        scores = score_tensors(self.model, images, self.precision)
        self.score_sum += scores.to(self.score_sum.device, torch.float64).sum()
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        """The mean score (float32); NaN before any image was seen."""
        return (self.score_sum / self.count).float()
