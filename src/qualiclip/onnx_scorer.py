"""Scoring with an exported ONNX graph through ONNX Runtime.

:class:`OnnxScorer` is a :class:`qualiclip.model.Scorer`, as :class:`qualiclip.model.QualiCLIP`
is: ``forward`` maps float RGB ``[B, 3, H, W]`` in [0, 1] to scores ``[B]``, and it carries
``name``, ``weights_sha256``, ``min_size``, ``device``, ``input_dtype`` and ``check_precision``. So
``create_model("model.onnx")`` plugs into :func:`qualiclip.engine.score_paths`, the HTTP service
and Ray scoring, with their decoding, batching and error rows.

The graph (written by :mod:`qualiclip.onnx_export`) holds everything: normalisation, the image
tower, the prompt features and the score formula. Its metadata (the ``qualiclip.*`` keys of
:data:`METADATA_KEYS`) says what it was exported from. onnxruntime is imported when a scorer is
built (``pip install 'qualiclip[onnx]'``).

Imports nothing of qualiclip's but :mod:`qualiclip.precision`, so that the model factory can
return a scorer without reaching up into the exporter or the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qualiclip.precision import PrecisionError

__all__ = ["INPUT_NAME", "METADATA_KEYS", "OUTPUT_NAME", "OnnxScorer", "require_onnxruntime"]

INPUT_NAME, OUTPUT_NAME = "images", "scores"

#: Metadata every exported graph carries (``metadata_props``), key -> meaning.
METADATA_KEYS: dict[str, str] = {
    "qualiclip.name": "the weights' name or file name",
    "qualiclip.weights_sha256": "sha256 of the weight file (empty when unknown)",
    "qualiclip.formula": "official, pyiqa, or empty when the exporter was not told",
    "qualiclip.logit_scale": "the softmax scale s of the score formula",
    "qualiclip.pooling": "attention-pooling mode of the tower (none, original, interpolate)",
    "qualiclip.input": "uint8 (0..255) or float32 (0..1): RGB [B, 3, H, W], never resized",
    "qualiclip.dtype": "fp32 or fp16: the precision of the image tower",
    "qualiclip.min_size": "smallest image side, in pixels",
    "qualiclip.version": "qualiclip version that exported the graph",
}

_INSTALL_HINT = "ONNX scoring needs onnxruntime: pip install 'qualiclip[onnx]'"


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module; ``ImportError`` saying how to install it when it is missing."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return onnxruntime


def _providers(ort: Any, device: str | torch.device) -> list[str]:
    """ONNX Runtime execution providers for ``device``: CUDA's where asked for and present."""
    kind = torch.device("cuda" if str(device) == "auto" else device).type
    available = ort.get_available_providers()
    if kind == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if kind == "cuda" and str(device) != "auto":
        raise ValueError(
            "device 'cuda' asked for, but this onnxruntime has no CUDA execution provider "
            "(install onnxruntime-gpu)"
        )
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"an ONNX model runs on 'cpu' or 'cuda', not {str(device)!r}")
    return ["CPUExecutionProvider"]


class OnnxScorer(nn.Module):
    """A scorer that runs an exported QualiCLIP graph with ONNX Runtime.

    Args:
        path: an ``.onnx`` file written by :func:`qualiclip.onnx_export.export_onnx`.
        device: ``"cpu"``, ``"cuda"`` (ONNX Runtime's CUDA execution provider) or ``"auto"``
            (CUDA when this onnxruntime has it). Tensors stay on the CPU either way: ONNX
            Runtime moves them, so :attr:`device` is always the CPU.
        threads: intra-op threads of the session (default: ONNX Runtime's, one per core).

    Shape:
        ``forward``: ``[B, 3, H, W]`` RGB, float in [0, 1] (or uint8 for a uint8 graph) ->
        ``[B]`` float32 scores in [0, 1].

    Raises:
        ImportError: onnxruntime is not installed.
        ValueError: the file is missing, not a graph ONNX Runtime can load, or not one
            qualiclip exported; or ``device`` cannot be had.
    """

    def __init__(
        self, path: str | Path, device: str | torch.device = "cpu", *, threads: int | None = None
    ) -> None:
        super().__init__()
        ort = require_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = _providers(ort, device)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own classes for bad files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{self.path}: not a loadable ONNX graph ({first})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "qualiclip.input" not in meta:
            raise ValueError(
                f"{self.path}: not exported by qualiclip (no qualiclip.* metadata); export with "
                "'qualiclip export --model NAME --onnx FILE'"
            )
        self.metadata: dict[str, str] = dict(meta)
        self.name: str = meta.get("qualiclip.name") or self.path.name
        self.weights_sha256: str | None = meta.get("qualiclip.weights_sha256") or None
        self.formula: str | None = meta.get("qualiclip.formula") or None
        self.pooling: str | None = meta.get("qualiclip.pooling") or None
        self.logit_scale = float(meta.get("qualiclip.logit_scale", "nan"))
        self.input_kind: str = meta["qualiclip.input"]
        self.graph_dtype: str = meta.get("qualiclip.dtype", "fp32")
        self.min_size: int = int(meta.get("qualiclip.min_size", "32"))
        self.providers: list[str] = list(self.session.get_providers())

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def input_dtype(self) -> torch.dtype:
        """Float inputs are float32 whatever the graph's own precision (it converts them)."""
        return torch.float32

    def extra_repr(self) -> str:
        return (f"{str(self.path)!r}, name={self.name!r}, input={self.input_kind}, "
                f"dtype={self.graph_dtype}, providers={self.providers}")

    def check_precision(self, precision: str) -> None:
        """Refuse a PyTorch precision: the graph runs in the precision it was exported in.

        Raises:
            PrecisionError: ``precision`` is not ``"fp32"`` (or ``"auto"``, which means fp32 here).
        """
        if precision not in ("fp32", "auto"):
            raise PrecisionError(
                f"an ONNX model runs in the precision it was exported in ({self.graph_dtype}), "
                f"so precision {precision!r} does not apply: use fp32 (export with --fp16 for a "
                "half-precision graph)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"images must be at least {self.min_size} px on each side, "
                f"got {tuple(x.shape[-2:])}"
            )
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            raise PrecisionError(
                "autocast (precision bf16 or fp16) cannot reach inside ONNX Runtime: an ONNX "
                f"model runs in the precision it was exported in ({self.graph_dtype}); use fp32"
            )
        if x.shape[0] == 0:
            return torch.empty(0)
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: self._feed(x)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def _feed(self, x: torch.Tensor) -> np.ndarray:
        """``x`` as the graph's input: contiguous NCHW, uint8 or float32."""
        x = x.detach().cpu()
        if self.input_kind == "uint8":
            if x.dtype == torch.uint8:
                return x.contiguous().numpy()
            if not x.is_floating_point():
                raise TypeError(f"expected uint8 or float RGB, got {x.dtype}")
            # Float pixels decoded from 8-bit images are k/255 exactly, so this is lossless for
            # them; 16-bit images are scored at 8 bits.
            return x.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).contiguous().numpy()
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point RGB in [0, 1], got {x.dtype}")
        return x.float().contiguous().numpy()
