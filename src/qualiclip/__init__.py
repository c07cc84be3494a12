"""qualiclip: QualiCLIP no-reference image quality assessment.

Score images with the authors' released weights or your own, train the model from pristine
images, evaluate against human opinion scores, and scale scoring out.

Example:
    >>> import qualiclip
    >>> model = qualiclip.create_model("qualiclip")  # downloads once, verified  # doctest: +SKIP
    >>> qualiclip.score(model, "photo.jpg")               # doctest: +SKIP
    0.71
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "QualiCLIP", "QualiCLIPMetric", "QualityLoss", "QualityScore", "create_metric",
    "create_model", "list_models", "quality_map", "score", "score_paths", "__version__",
]

_LAZY = {
    "QualiCLIP": "qualiclip.model",
    "QualiCLIPMetric": "qualiclip.quality_metric",  # needs the 'metric' extra (torchmetrics)
    "QualityLoss": "qualiclip.quality_loss",
    "QualityScore": "qualiclip.quality_loss",
    "create_metric": "qualiclip.quality_loss",
    "create_model": "qualiclip.model",
    "list_models": "qualiclip.model",
    "quality_map": "qualiclip.maps",
    "score": "qualiclip.engine",
    "score_paths": "qualiclip.engine",
}


def __getattr__(name: str) -> Any:
    # Imported on first use so that `qualiclip --help` does not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qualiclip' has no attribute {name!r}")
