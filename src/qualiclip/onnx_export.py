"""Export a QualiCLIP scorer as one ONNX graph: RGB pixels in, quality scores out.

The graph holds the whole scorer: pixel scaling and CLIP normalisation, the ResNet image tower
with its attention pooling in the first-token form (O(N) in the number of grid cells, no N x N
attention), the L2-normalised prompt features and the score formula with the model's logit
scale. Batch, height and width are dynamic (except with ``pooling="original"``, whose
positional embedding fixes the input size); images are never resized.

Input ``images``: RGB ``[B, 3, H, W]``, uint8 in 0..255 (default) or float32 in [0, 1].
Output ``scores``: float32 ``[B]`` in [0, 1], higher is better.

The export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``):
it needs no further package, and traced shapes stay symbolic for this tower (checked at three
sizes by the tests). Default opset: :data:`DEFAULT_OPSET`. The graph's ``metadata_props`` carry
the ``qualiclip.*`` keys of :data:`qualiclip.onnx_scorer.METADATA_KEYS`.

Needs the ``onnx`` extra (``pip install 'qualiclip[onnx]'``): onnx to write the metadata,
onnxruntime to check the exported graph against the PyTorch model.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qualiclip.clip import AttentionPool2d, ModifiedResNet
from qualiclip.model import QualiCLIP
from qualiclip.onnx_scorer import INPUT_NAME, OUTPUT_NAME

__all__ = ["DEFAULT_OPSET", "OPSETS", "ExportResult", "InputKind", "export_onnx"]

InputKind = Literal["uint8", "float32"]
INPUT_KINDS: tuple[str, ...] = ("uint8", "float32")
#: Opset written by default: run by ONNX Runtime 1.13 and later, TensorRT 8.6 and later.
DEFAULT_OPSET = 17
#: Opsets the export is known to produce (Einsum needs 12; Softmax's axis semantics of 13 on).
OPSETS: tuple[int, ...] = tuple(range(13, 21))
#: Largest score difference between ONNX Runtime and PyTorch that the check after an fp32
#: export accepts (float rounding differs between the two; measured differences are ~1e-7).
CHECK_ATOL = 1e-4
#: The same for an fp16 tower against the fp32 model (half rounding; measured ~1e-4 on RN50).
FP16_CHECK_ATOL = 1e-2


class _ScoreGraph(nn.Module):
    """What is traced: pixels -> scores, with the model's own normalisation and score head."""

    def __init__(self, model: QualiCLIP, input_kind: InputKind) -> None:
        super().__init__()
        self.model = model
        self.input_kind = input_kind

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.input_kind == "uint8":
            x = x / 255.0  # the decoder's division, so pixels match the engine's exactly
        # The tower casts to its own dtype (fp16 for a half export) and the head runs in fp32,
        # as the engine does under autocast.
        features = self.model.visual(self.model.normalize(x))
        return self.model.scores_from_features(F.normalize(features.float(), dim=-1))


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote, and how closely ONNX Runtime reproduces the model."""

    path: Path
    size_bytes: int
    opset: int
    metadata: dict[str, str]
    #: Largest |ONNX Runtime - PyTorch| score on a test batch; ``None`` when not checked.
    max_abs_diff: float | None


def _export_copy(model: QualiCLIP, fp16: bool) -> QualiCLIP:
    """A CPU copy in eval mode (first-token pooling), the tower in half precision if asked."""
    if not isinstance(model, QualiCLIP):
        raise TypeError(f"expected a QualiCLIP model, got {type(model).__name__}")
    if not isinstance(model.visual, ModifiedResNet):
        raise ValueError(
            f"ONNX export supports ResNet image towers; {model.name} has a "
            f"{type(model.visual).__name__}"
        )
    clone = copy.deepcopy(model).cpu().float().eval()
    _attnpool(clone).full_attention = False  # same scores; the O(N) form is exported
    if fp16:
        clone.visual.half()
    return clone


def _attnpool(model: QualiCLIP) -> AttentionPool2d:
    visual = model.visual
    assert isinstance(visual, ModifiedResNet)  # noqa: S101 - checked by _export_copy
    return visual.attnpool


def _metadata(model: QualiCLIP, input_kind: str, fp16: bool, formula: str | None) -> dict[str, str]:
    from qualiclip import __version__

    return {
        "qualiclip.name": model.name,
        "qualiclip.weights_sha256": model.weights_sha256 or "",
        "qualiclip.formula": formula or model.formula or "",
        "qualiclip.logit_scale": repr(float(model.logit_scale)),
        "qualiclip.pooling": str(_attnpool(model).pooling),
        "qualiclip.input": input_kind,
        "qualiclip.dtype": "fp16" if fp16 else "fp32",
        "qualiclip.min_size": str(model.min_size),
        "qualiclip.version": __version__,
    }


def _example(model: QualiCLIP, input_kind: str, batch: int = 2) -> torch.Tensor:
    """A non-square test batch (a fixed size for ``pooling="original"``)."""
    visual = model.visual
    assert isinstance(visual, ModifiedResNet)  # noqa: S101 - checked by _export_copy
    if visual.attnpool.pooling == "original":
        h = w = visual.input_resolution
    else:
        h, w = 2 * model.min_size, 3 * model.min_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=g)
    return pixels if input_kind == "uint8" else pixels.float() / 255.0


def export_onnx(
    model: QualiCLIP,
    path: str | Path,
    *,
    input_kind: InputKind = "uint8",
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    formula: str | None = None,
    check: bool = True,
) -> ExportResult:
    """Write ``model`` as an ONNX graph from RGB ``[B, 3, H, W]`` to scores ``[B]``.

    The file is written next to ``path`` and renamed into place, so a failed export leaves no
    partial file.

    Args:
        model: the scorer (any device; it is not modified).
        path: the ``.onnx`` file to write.
        input_kind: ``"uint8"`` (pixels 0..255, as decoders give them) or ``"float32"``
            (RGB in [0, 1], as :class:`~qualiclip.model.QualiCLIP` takes).
        fp16: run the image tower in half precision (for GPU runtimes; the head stays fp32).
            It is checked against the fp32 model to :data:`FP16_CHECK_ATOL` where ONNX
            Runtime's CPU provider can run it.
        opset: ONNX opset, one of :data:`OPSETS`.
        formula: the formula name the model was built with, recorded in the metadata (default:
            the model's own ``formula``).
        check: score a test batch with ONNX Runtime (when installed) and compare with PyTorch.

    Raises:
        ImportError: the ``onnx`` package is missing.
        ValueError: an unsupported tower, input kind or opset.
        RuntimeError: the check found ONNX Runtime's scores too far from PyTorch's.
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
    if opset not in OPSETS:
        raise ValueError(f"opset must be one of {OPSETS[0]}..{OPSETS[-1]}, got {opset}")
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'qualiclip[onnx]'") from None
    path = Path(path)
    clone = _export_copy(model, fp16)
    graph = _ScoreGraph(clone, input_kind).eval()
    example = _example(clone, input_kind)
    dynamic = {0: "batch"}
    if _attnpool(clone).pooling != "original":
        dynamic.update({2: "height", 3: "width"})
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter announces its deprecation, and the tracer warns about
            # Python values taken from shapes; the test batch of another size checks the latter.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                graph, (example,), tmp, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        proto = onnx.load(tmp)
        metadata = _metadata(clone, input_kind, fp16, formula)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = (
            f"qualiclip scorer {clone.name}: {INPUT_NAME} RGB [B, 3, H, W] {input_kind} "
            f"({'0..255' if input_kind == 'uint8' else '0..1'}, never resized) -> "
            f"{OUTPUT_NAME} [B] in [0, 1], higher is better"
        )
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        diff = _check(model, tmp, input_kind, fp16) if check else None
        # mkstemp makes the file 0600; an export is an output like the others, so it gets the
        # mode a plain open() would give it under the user's umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return ExportResult(path, path.stat().st_size, opset, metadata, diff)


def _check(model: QualiCLIP, path: str, input_kind: str, fp16: bool) -> float | None:
    """Largest score difference of ONNX Runtime and PyTorch (fp32) on a batch of another size.

    ``None`` when onnxruntime is not installed, or cannot run an fp16 graph on the CPU.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception:  # older CPU providers lack fp16 kernels (anything else is raised again)
        if fp16:
            return None
        raise
    reference = _export_copy(model, fp16=False)
    example = _example(reference, input_kind, batch=3)
    if _attnpool(reference).pooling != "original":
        example = example[..., : -reference.min_size // 2]  # not the traced size
    with torch.no_grad():
        pixels = example.float() / 255.0 if input_kind == "uint8" else example
        expected = reference(pixels)
    got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})[0])
    diff = float((got.float() - expected).abs().max())
    atol = FP16_CHECK_ATOL if fp16 else CHECK_ATOL
    if not diff <= atol:
        raise RuntimeError(
            f"the exported graph's scores differ from PyTorch's by {diff:.2e} "
            f"(more than {atol:.0e})"
        )
    return diff
