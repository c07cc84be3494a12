"""int8 scoring: the ResNet image tower quantised after training, run by ONNX Runtime.

The recipe (post-training static quantisation, QDQ format):

1. The tower's trunk (stem and bottlenecks, batch norms folded as in :mod:`qualiclip.fused`) is
   exported as an ONNX graph from CLIP-normalised float pixels to the last feature map, with
   dynamic batch, height and width: images are never resized.
2. ONNX Runtime's ``quantize_static`` inserts quantise/dequantise pairs around the convolutions,
   ReLUs, residual sums and average pools: weights as signed 8-bit integers per output channel,
   activations as unsigned 8-bit integers per tensor, their ranges (min/max) measured on a small
   calibration set. The first convolution (3 input channels, under 1% of the work) stays float.
   ONNX Runtime then runs integer convolutions (``QLinearConv``), with VNNI or AMX where the CPU
   has them. On CPUs without VNNI the weights use 7 bits, so that the 16-bit sums of AVX2's
   multiply-add pairs cannot saturate.
3. The attention pooling and the prompt head stay in PyTorch, in float32: they are a small part
   of the work and hold the score's fine structure.

Calibration images are generated at first use from four small public-domain / CC0 photos
shipped in ``assets/calibration`` (see its README): crops of the photos as they are, and
versions degraded by :mod:`qualiclip.degradations` so that activation ranges cover damaged
images too. A separate set (other crops, other distortions) checks the result: the Spearman
correlation of int8 and fp32 scores over it must reach :data:`FIDELITY_MIN_SPEARMAN` for
``precision="auto"`` to pick int8 (an explicit ``int8`` runs regardless, and the report says how
close it came).

The quantised graph and its report are cached under ``<cache dir>/int8/`` (see
:func:`qualiclip.pretrained.cache_dir`), named by the sha256 of the model's own tensors (so a
fine-tuned model never reuses another's calibration) and by the recipe; both are written to a
temporary name and renamed. Needs the ``onnx`` extra (``pip install 'qualiclip[onnx]'``).

Why ONNX Runtime rather than PyTorch's own quantisation: in a first measurement on this
project's 2-core AMD EPYC (AVX2, no VNNI) ONNX Runtime's int8 tower ran about 1.9x the fused fp32
engine and PyTorch's eager x86 quantisation of the same folded tower about 1.4x (not recorded
with its command; ``benchmarks/bench_int8_backends.py`` measures both side by side, and
``docs/performance.md`` holds what it has measured); and ``torch.ao.quantization`` announces its
removal in favour of torchao (its PT2E flow has already left torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qualiclip import degradations, images, metrics, precision, pretrained
from qualiclip.clip import ModifiedResNet
from qualiclip.fused import FusedConv, FusedResNet

__all__ = [
    "CALIBRATION_PHOTOS", "FIDELITY_MIN_SPEARMAN", "QUANTIZED_OPS", "RECIPE_VERSION",
    "Int8Report", "Int8Tower", "calibration_images", "check_images", "check_quantizable",
    "int8_report", "int8_tower",
]

#: The shipped photos calibration and check images are cut from (``assets/calibration``).
CALIBRATION_PHOTOS: tuple[str, ...] = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg")
#: ONNX operators quantised; everything after the trunk stays float.
QUANTIZED_OPS: tuple[str, ...] = ("Conv", "Relu", "Add", "AveragePool")
#: Bumped whenever the recipe changes, so old cache entries are not reused.
RECIPE_VERSION = 1
#: The fidelity budget: Spearman of int8 against fp32 scores that ``auto`` requires (issue 21).
FIDELITY_MIN_SPEARMAN = 0.995

_INPUT, _OUTPUT = "x", "features"
#: (distortion, level) pairs applied to each photo: calibration and check sets share no pair.
_CALIBRATION_DAMAGE = (("gaussian_blur", 3), ("white_noise", 4), ("jpeg", 4), ("darken", 3),
                       ("color_saturation2", 3))
_CHECK_DAMAGE = (("gaussian_blur", 2), ("gaussian_blur", 5), ("white_noise", 2),
                 ("white_noise", 5), ("jpeg", 2), ("jpeg", 5), ("brighten", 3),
                 ("motion_blur", 3), ("impulse_noise", 3))


class _Scorer(Protocol):
    """What quantisation needs of a :class:`qualiclip.model.QualiCLIP` (imported from nowhere
    above this module)."""

    visual: nn.Module

    def state_dict(self) -> dict[str, Any]: ...
    def normalize_input(self, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor: ...
    def scores_from_features(self, features: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Int8Report:
    """A calibrated int8 tower: where its graph is, and how closely it follows fp32.

    Attributes:
        path: the quantised ONNX graph (trunk only: normalised pixels in, feature map out).
        key: its cache name (recipe and the sha256 of the model's tensors).
        spearman: Spearman correlation of int8 and fp32 scores over the check images.
        max_abs_diff: the largest |int8 - fp32| score over them.
        check_images: how many check images.
        calibration_images: how many calibration images set the activation ranges.
        weight_bits: 8, or 7 on CPUs without VNNI (see the module docstring).
        seconds: time calibration took (export, quantisation, check) when it was made.
        onnxruntime: the ONNX Runtime version that quantised it.
    """

    path: Path
    key: str
    spearman: float
    max_abs_diff: float
    check_images: int
    calibration_images: int
    weight_bits: int
    seconds: float
    onnxruntime: str

    @property
    def holds(self) -> bool:
        """Whether int8 meets the fidelity budget (:data:`FIDELITY_MIN_SPEARMAN`)."""
        return self.spearman >= FIDELITY_MIN_SPEARMAN

    def describe(self) -> str:
        """One line: ``Spearman 0.998 and max |diff| 2.1e-03 against fp32 on 40 check images``."""
        return (f"Spearman {self.spearman:.4f} and max |diff| {self.max_abs_diff:.1e} against "
                f"fp32 on {self.check_images} check images")


# --- the tower at run time ----------------------------------------------------------------------


class Int8Tower:
    """The quantised trunk in an ONNX Runtime session, and the model's own float pooling.

    It offers what the engine uses of :class:`qualiclip.fused.FusedResNet`: :meth:`trunk`
    (dense quality maps read the feature map) and :meth:`forward_owned`.

    Args:
        path: a graph written by :func:`int8_report`.
        attnpool: the model's attention pool (shared, not copied).
        threads: ONNX Runtime's intra-op threads (default: torch's current setting).
    """

    def __init__(self, path: str | Path, attnpool: nn.Module, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.enable_mem_pattern = False  # shapes change from batch to batch
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.attnpool = attnpool
        self.dtype = torch.float32

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map ``[B, C, H/32, W/32]`` (float32) of CLIP-normalised ``x``."""
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()  # NCHW, as exported
        out = self.session.run([_OUTPUT], {_INPUT: feed})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def forward_owned(self, box: list[torch.Tensor]) -> torch.Tensor:
        """Pooled features of the one input in ``box`` (emptied, as the fused tower's is)."""
        return self.attnpool(self.trunk(box.pop()))


def int8_tower(model: _Scorer, cache_dir: str | os.PathLike[str] | None = None,
               threads: int | None = None) -> Int8Tower:
    """The int8 tower of ``model``: calibrated at first use, then read from the cache.

    Raises:
        PrecisionError: int8 cannot run here, or ``model`` has no CLIP ResNet tower.
    """
    report = int8_report(model, cache_dir)
    visual = model.visual
    assert isinstance(visual, ModifiedResNet)  # noqa: S101 - int8_report checked it
    return Int8Tower(report.path, visual.attnpool, threads)


# --- calibration and its cache ------------------------------------------------------------------


def int8_report(model: _Scorer, cache_dir: str | os.PathLike[str] | None = None, *,
                announce: Callable[[str], None] | None = None) -> Int8Report:
    """The calibrated int8 tower of ``model``, from the cache or made now (and cached).

    Making it exports the trunk, quantises it on :func:`calibration_images` and scores
    :func:`check_images` in int8 and fp32: seconds for small towers, about a minute for RN50
    on two cores. ``announce`` (default: a line on stderr) is told when that happens.

    Raises:
        PrecisionError: int8 cannot run here (:func:`qualiclip.precision.int8_unavailable`), or
            ``model`` has no CLIP ResNet image tower.
    """
    check_quantizable(model)
    weight_bits = 8 if precision.cpu_int8_kind() in ("amx", "vnni", "arm") else 7
    key = f"int8-v{RECIPE_VERSION}-w{weight_bits}-{_tensors_sha256(model)}"
    folder = pretrained.cache_dir(cache_dir) / "int8"
    graph, record = folder / f"{key}.onnx", folder / f"{key}.json"
    cached = _read_report(record, graph)
    if cached is not None:
        return cached
    (announce or _to_stderr)(
        f"int8: calibrating the image tower for these weights (once; cached in {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    report = _calibrate(model, graph, key, weight_bits)
    _write_atomic(record, json.dumps({**asdict(report), "path": graph.name}, indent=2).encode())
    return report


def check_quantizable(model: object) -> None:
    """Refuse up front what int8 cannot take: this machine (see
    :func:`qualiclip.precision.int8_unavailable`) or a model without a CLIP ResNet tower.

    Raises:
        PrecisionError: saying which, in one line.
    """
    why = precision.int8_unavailable("cpu")
    if why is not None:
        raise precision.PrecisionError(why)
    visual = getattr(model, "visual", None)
    if not isinstance(visual, ModifiedResNet):
        what = f"a {type(visual).__name__} image tower" if visual is not None else "no image tower"
        raise precision.PrecisionError(
            f"int8 quantises CLIP ResNet image towers, and this scorer has {what}: use fp32")


def _to_stderr(message: str) -> None:
    print(f"qualiclip: {message}", file=sys.stderr, flush=True)


def _tensors_sha256(model: _Scorer) -> str:
    """sha256 of every tensor of ``model`` (names, dtypes, shapes, values) and its logit scale."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(repr(float(getattr(model, "logit_scale", 0.0))).encode())
    return digest.hexdigest()


def _read_report(record: Path, graph: Path) -> Int8Report | None:
    try:
        fields = json.loads(record.read_text(encoding="utf-8"))
        fields["path"] = graph
        report = Int8Report(**fields)
    except (OSError, ValueError, TypeError):
        return None  # absent or from another version: made again
    return report if graph.is_file() else None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _calibrate(model: _Scorer, graph: Path, key: str, weight_bits: int) -> Int8Report:
    """Export, quantise and check; the graph is renamed into place only when all went well."""
    import onnxruntime as ort

    start = time.perf_counter()
    visual = model.visual
    assert isinstance(visual, ModifiedResNet)  # noqa: S101 - checked by the caller
    calibration = [_normalized(model, a) for a in calibration_images()]
    with tempfile.TemporaryDirectory(prefix="qualiclip-int8-") as tmp:
        float_graph = Path(tmp) / "trunk.onnx"
        _export_trunk(visual, float_graph)
        quantized = Path(tmp) / "trunk.int8.onnx"
        _quantize(float_graph, quantized, calibration, reduce_range=weight_bits == 7)
        tower = Int8Tower(quantized, visual.attnpool)
        spearman, max_diff, n_checked = _fidelity(model, tower)
        _write_atomic(graph, quantized.read_bytes())
    return Int8Report(
        path=graph, key=key, spearman=spearman, max_abs_diff=max_diff, check_images=n_checked,
        calibration_images=len(calibration), weight_bits=weight_bits,
        seconds=round(time.perf_counter() - start, 2), onnxruntime=ort.__version__,
    )


def _export_trunk(visual: ModifiedResNet, path: Path) -> None:
    """The BN-folded trunk as ONNX: normalised ``[B, 3, H, W]`` -> ``[B, C, H/32, W/32]``."""
    was_training = visual.training
    visual.eval()
    try:
        tower = FusedResNet(visual)
    finally:
        visual.train(was_training)
    for module in tower.modules():
        if isinstance(module, FusedConv):
            module.use_mkldnn = False  # plain convolutions, which the exporter knows

    class Trunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = tower

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tower.trunk(x)

    example = torch.zeros(1, 3, 64, 96)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter announces its deprecation; dynamic axes keep sizes free.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            Trunk().eval(), (example,), str(path), dynamo=False, opset_version=17,
            input_names=[_INPUT], output_names=[_OUTPUT], do_constant_folding=True,
            dynamic_axes={_INPUT: {0: "batch", 2: "height", 3: "width"},
                          _OUTPUT: {0: "batch", 2: "rows", 3: "cols"}},
        )


def _quantize(source: Path, target: Path, batches: list[torch.Tensor], reduce_range: bool) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items: Iterator[torch.Tensor] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {_INPUT: x.contiguous().numpy()}

    # The first convolution stays float: its 3-channel input quantised per tensor cost a trained
    # tiny model 0.009 of SRCC on BIQ2021 (0.004 with it float), for under 1% of the work.
    first_conv = next(n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Conv")
    with _quiet_onnxruntime():
        quantize_static(
            str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=[first_conv],
            per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """ONNX Runtime's quantiser logs advice through the root logger ("consider pre-processing":
    shapes are dynamic here, so there is nothing to infer); it is not for our users."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _fidelity(model: _Scorer, tower: Int8Tower) -> tuple[float, float, int]:
    """Spearman and max |diff| of int8 against fp32 scores on the check images."""
    visual = model.visual
    int8, fp32 = [], []
    with torch.inference_mode():
        for arr in check_images():
            x = _normalized(model, arr)
            fp32.append(float(model.scores_from_features(F.normalize(visual(x), dim=-1))[0]))
            pooled = tower.forward_owned([x])
            int8.append(float(model.scores_from_features(F.normalize(pooled, dim=-1))[0]))
    a, b = np.asarray(int8), np.asarray(fp32)
    spearman = metrics.srcc(a, b) if np.ptp(b) > 0 else float("nan")
    return float(spearman), float(np.abs(a - b).max()), len(a)


def _normalized(model: _Scorer, pixels: np.ndarray) -> torch.Tensor:
    x = images.pixels_to_tensor([pixels])
    return model.normalize_input(x, inplace=True)


# --- the images ---------------------------------------------------------------------------------


def _photos() -> list[np.ndarray]:
    folder = files("qualiclip").joinpath("assets", "calibration")
    return [images.decode_rgb(folder.joinpath(name).read_bytes()) for name in CALIBRATION_PHOTOS]


def _crop(arr: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    h, w = arr.shape[:2]
    ch, cw = max(64, int(h * fraction)), max(64, int(w * fraction))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return np.ascontiguousarray(arr[top:top + ch, left:left + cw])


def _damaged(arr: np.ndarray, damage: tuple[tuple[str, int], ...], seed: int) -> list[np.ndarray]:
    x = images.pixels_to_tensor([arr])
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, level in damage:
        y = degradations.apply_distortion(x.clone(), name, level, g)
        out.append((y[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8))
    return out


def calibration_images() -> list[np.ndarray]:
    """The images that set int8's activation ranges: ``H x W x 3`` uint8, 24 in all.

    Per shipped photo: a crop of 90% of it as it is, and five damaged versions of it (blur,
    noise, JPEG, darkening, oversaturation at middle levels), so that ranges cover the images a
    quality model is asked about and not only clean ones. Deterministic.
    """
    rng = np.random.default_rng(21)
    out: list[np.ndarray] = []
    for i, photo in enumerate(_photos()):
        crop = _crop(photo, rng, 0.9)
        out += [crop, *_damaged(crop, _CALIBRATION_DAMAGE, seed=100 + i)]
    return out


def check_images() -> list[np.ndarray]:
    """The images the fidelity check scores in int8 and fp32: other crops (70% of each photo,
    mirrored) and other damage than :func:`calibration_images`; 40 in all. Deterministic."""
    rng = np.random.default_rng(2103)
    out: list[np.ndarray] = []
    for i, photo in enumerate(_photos()):
        crop = np.ascontiguousarray(_crop(photo, rng, 0.7)[:, ::-1])
        out += [crop, *_damaged(crop, _CHECK_DAMAGE, seed=200 + i)]
    return out
