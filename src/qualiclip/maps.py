"""Quality maps: where in an image QualiCLIP finds quality lost, in two kinds.

* ``"dense"``: one forward pass. Each cell of the tower's last feature map (1/32 of the input)
  is taken through the attention pool's value and output projections, ``c_proj(v_proj(x_j))``,
  L2-normalised and compared with the prompt pairs exactly as the global feature is
  (:meth:`QualiCLIP.scores_from_features`). This is the attention pool with each cell attending
  only to itself, the usual way dense predictions are read from a CLIP ResNet; the N x N
  attention is never formed, so memory stays O(N) as for scoring. The global score comes from
  the same pass (the pool's first-token path).
* ``"windows"``: the model's own score of overlapping crops (``window`` px, every ``stride``
  px; the last crop of a row or column is aligned to the image's edge). Slower, but each cell
  is a real QualiCLIP score of that crop. Crops of equal size share forward passes, in chunks of
  at most ``max_batch_pixels`` pixels, cut from the decoded image as they are needed.

Values are in [0, 1], higher is better, as scores are. :func:`overlay` draws a map over its
image's luminance (a colour ramp computed here, no plotting library; a map flatter than
:data:`FLAT_RANGE` is drawn flat and says so); :func:`write_maps` writes the photo and its map
side by side as a PNG (and optionally the raw ``.npy``) for each scored file, for
``qualiclip score --map``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from qualiclip import engine, heap, images
from qualiclip.clip import AttentionPool2d, ModifiedResNet
from qualiclip.engine import DEFAULT_MAX_BATCH_PIXELS, ScoreResult
from qualiclip.model import NonFiniteScoreError, QualiCLIP, Scorer
from qualiclip.output_files import InputFiles, OutputError, make_folder, open_output
from qualiclip.precision import autocast_context
from qualiclip.reading import Decode, decoded_in_order, resolve_decoder

__all__ = [
    "DEFAULT_STRIDE", "DEFAULT_WINDOW", "FLAT_RANGE", "MAP_KINDS", "MapKind", "QualityMap",
    "colorize", "display_range", "half_means", "map_files", "map_kinds", "map_name", "map_root",
    "overlay", "overlay_png", "quality_map", "range_note", "score_paths_with_maps", "to_uint8",
    "upsample", "write_maps",
]

MapKind = Literal["dense", "windows"]
MAP_KINDS: tuple[str, ...] = ("dense", "windows")
#: Default crop side and step of ``"windows"`` maps: the model's training resolution, half-overlap.
DEFAULT_WINDOW = 224
DEFAULT_STRIDE = 112
#: The dense map's cell: the ResNet tower halves the resolution five times.
DENSE_CELL = 32

#: Smallest range (maximum minus minimum) of a map's values that is drawn stretched over the whole
#: colour ramp. Below it, differences between places are of the size that arises without any
#: damage: the left and right halves of untouched photos differed by 0.019-0.023 on average in
#: ``benchmarks/bench_maps.py`` (tiny model trained 200 steps), and numerics alone move a score
#: by up to 2e-3 (bf16 6.8e-4, GPU JPEG decoding 1.6e-3; docs/precision.md, README). Such a map is
#: drawn over this range around its mean, so it looks nearly uniform, and says so in its legend.
FLAT_RANGE = 0.02

# Anchor colours of the ramp (low quality first): dark violet, blue, teal, green, yellow; the
# lightness rises steadily, so the order reads in grey too.
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class QualityMap:
    """A quality map and its grid.

    Cell ``(i, j)`` covers rows ``origins_y[i] : origins_y[i] + cell[0]`` and columns
    ``origins_x[j] : origins_x[j] + cell[1]`` of the image. Dense cells tile the image at
    :data:`DENSE_CELL` px (the last row or column may end short of, or past, the edge by less
    than a cell: the tower rounds sizes); window cells overlap when ``stride < cell``.

    Attributes:
        values: ``[rows, cols]`` float32 in [0, 1], higher is better.
        kind: ``"dense"`` or ``"windows"``.
        image_size: ``(height, width)`` of the image in pixels.
        cell: ``(height, width)`` of a cell in pixels.
        stride: ``(vertical, horizontal)`` step between cells in pixels.
        origins_y, origins_x: top row and left column of each cell row and column.
        score: the image's global score, when the map's pass computed it (dense) else ``None``.
    """

    values: np.ndarray
    kind: str
    image_size: tuple[int, int]
    cell: tuple[int, int]
    stride: tuple[int, int]
    origins_y: np.ndarray
    origins_x: np.ndarray
    score: float | None = None

    @property
    def flat(self) -> bool:
        """Whether the values span less than :data:`FLAT_RANGE`: no place is measurably worse
        than another, and a picture stretched from minimum to maximum would show noise."""
        return float(self.values.max() - self.values.min()) < FLAT_RANGE

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the map."""
        return int(self.values.shape[0]), int(self.values.shape[1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the values as nested lists (row-major) and the grid geometry."""
        return {
            "kind": self.kind,
            "rows": self.grid[0],
            "cols": self.grid[1],
            "values": [[round(float(v), 6) for v in row] for row in self.values],
            "image_height": self.image_size[0],
            "image_width": self.image_size[1],
            "cell": list(self.cell),
            "stride": list(self.stride),
            "origins_y": [int(v) for v in self.origins_y],
            "origins_x": [int(v) for v in self.origins_x],
            "min": float(self.values.min()),
            "max": float(self.values.max()),
            "mean": float(self.values.mean()),
            "flat": self.flat,
        }


#: Why a scorer has no dense map (see :func:`map_kinds`).
NO_DENSE_MAP = ("dense maps need a CLIP ResNet image tower (a feature map and an attention pool), "
                "which this model does not have")


def map_kinds(model: Scorer) -> tuple[str, ...]:
    """The kinds of map ``model`` can draw, the preferred first: ``("dense", "windows")`` for a
    QualiCLIP with a CLIP ResNet tower, ``("windows",)`` for any other scorer (a ViT tower, an
    ONNX graph: they score crops, but have no feature map to read cells from)."""
    if isinstance(model, QualiCLIP) and isinstance(model.visual, ModifiedResNet):
        return ("dense", "windows")
    return ("windows",)


def quality_map(
    model: Scorer,
    image: Any,
    kind: MapKind | str = "dense",
    *,
    window: int = DEFAULT_WINDOW,
    stride: int = DEFAULT_STRIDE,
    precision: str = "fp32",
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
    on_pass: Callable[[int, int], None] | None = None,
) -> QualityMap:
    """The quality map of one image, computed on the model's device.

    Args:
        model: the scorer, in eval mode. ``"dense"`` needs a CLIP ResNet tower (``trunk`` and
            an attention pool); ``"windows"`` works with any.
        image: what :func:`qualiclip.score` takes for one image: a path, bytes, PIL image,
            NumPy array ``H x W x 3`` (uint8, uint16, or float in [0, 1]) or tensor ``[3, H, W]``.
        kind: ``"dense"`` (one pass, 1/32 resolution) or ``"windows"`` (scores of crops).
        window: side of a crop in pixels (``"windows"``; clamped to the image's sides).
        stride: step between crops in pixels (``"windows"``).
        precision: as for scoring (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"int8"``, ``"auto"``).
        max_batch_pixels: most pixels in one forward pass of crops (``"windows"``).
        on_pass: called after each forward pass with ``(done, total)``: crops scored so far and
            in all (``(1, 1)`` for the one pass of a dense map). Whatever it raises stops the
            map there (the HTTP service stops the map of a client that hung up this way).

    Returns:
        the map and its grid.

    Raises:
        ValueError: unknown kind, a window or stride under the model's minimum side or 1, an
            image too small, or a ``"dense"`` map of a tower without a feature map.
        NonFiniteScoreError: the model produced NaN or infinity for a cell or the score.
        ImageDecodeError: a path or bytes that cannot be decoded.

    Example:
        >>> import qualiclip
        >>> model = qualiclip.create_model("random-tiny")
        >>> qmap = quality_map(model, torch.rand(3, 96, 128))
        >>> qmap.grid, qmap.kind
        ((3, 4), 'dense')
    """
    if kind not in MAP_KINDS:
        raise ValueError(f"kind must be one of {MAP_KINDS}, got {kind!r}")
    pixels = _pixels(image, model.min_size)
    report = on_pass or (lambda done, total: None)
    if kind == "dense":
        qmap = _dense_map(model, pixels, precision)
        report(1, 1)
    else:
        qmap = _windows_map(model, pixels, window, stride, precision, max_batch_pixels, report)
    # The scores' rule holds for every cell: NaN is no quality (nor a colour to draw).
    if not np.isfinite(qmap.values).all() or (qmap.score is not None
                                               and not math.isfinite(qmap.score)):
        raise NonFiniteScoreError()
    return qmap


# --- inputs ------------------------------------------------------------------------------------


def _pixels(image: Any, min_size: int) -> np.ndarray | torch.Tensor:
    """Integer ``H x W x 3`` pixels (files, integer arrays) or a float ``[3, H, W]``, by
    :func:`qualiclip.images.as_pixels`.

    Integer pixels stay integers until a crop is cut, so a large image costs 3 (or 6) bytes a
    pixel while its windows are scored.
    """
    found = images.as_pixels(image, min_size=min_size)
    if len(found) != 1:
        raise ValueError(f"a quality map is of one image, got a batch of {len(found)}")
    pixels = found[0]
    h, w = _size(pixels)
    if min(h, w) < min_size:
        raise ValueError(f"images must be at least {min_size} px on each side, got {(h, w)}")
    return pixels


def _size(pixels: np.ndarray | torch.Tensor) -> tuple[int, int]:
    if isinstance(pixels, np.ndarray):
        return int(pixels.shape[0]), int(pixels.shape[1])
    return int(pixels.shape[1]), int(pixels.shape[2])


def _float_crops(
    pixels: np.ndarray | torch.Tensor, boxes: list[tuple[int, int, int, int]],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Float ``[B, 3, h, w]`` in [0, 1] on ``device`` of equal-size crops ``(top, left, h, w)``.

    Integer pixels convert by :func:`qualiclip.images.pixels_to_tensor`, the conversion of
    every scored file (so a crop scores as the cropped file would).
    """
    if isinstance(pixels, torch.Tensor):
        crops = torch.stack([pixels[:, t:t + h, l:l + w] for t, l, h, w in boxes])
        return crops.to(device, torch.float32)
    return images.pixels_to_tensor([pixels[t:t + h, l:l + w] for t, l, h, w in boxes], device)


# --- dense -------------------------------------------------------------------------------------


_NO_DENSE = "dense maps need a CLIP ResNet image tower (a feature map and an attention pool)"


def dense_maps_unavailable(model: object) -> str | None:
    """Why ``model`` cannot draw dense maps (an ONNX graph, a ViT tower), or None if it can;
    ``kind="windows"`` works with any scorer."""
    if isinstance(model, QualiCLIP) and isinstance(model.visual, ModifiedResNet):
        return None
    return _NO_DENSE


def _dense_map(model: Scorer, pixels: np.ndarray | torch.Tensor, precision: str) -> QualityMap:
    if not (isinstance(model, QualiCLIP) and isinstance(model.visual, ModifiedResNet)):
        raise ValueError(f"{_NO_DENSE}; use kind='windows'")
    pool = model.visual.attnpool
    runner = engine.prepare(model, precision)
    trunk = runner.visual.trunk  # the fused copy's (or, compiled or unfused, the tower's own)
    h, w = _size(pixels)
    x = _float_crops(pixels, [(0, 0, h, w)], model.device)
    x = model.normalize_input(x, inplace=True)
    with heap.forward_pass(model.device, h * w), torch.inference_mode():
        with autocast_context(model.device, runner.precision):  # "auto" resolved
            fmap = trunk(x.contiguous(memory_format=torch.channels_last))  # [1, C, gh, gw]
            del x
            rows, cols = int(fmap.shape[-2]), int(fmap.shape[-1])
            pooled = pool(fmap)  # the global feature: eval mode's first-token path, O(N)
            local = _local_features(pool, fmap)  # [N, D]
            del fmap
        values = model.scores_from_features(F.normalize(local.float(), dim=-1))
        score = model.scores_from_features(F.normalize(pooled.float(), dim=-1))
    grid = values.reshape(rows, cols).cpu().numpy().astype(np.float32)
    return QualityMap(
        values=grid, kind="dense", image_size=(h, w), cell=(DENSE_CELL, DENSE_CELL),
        stride=(DENSE_CELL, DENSE_CELL), origins_y=np.arange(rows) * DENSE_CELL,
        origins_x=np.arange(cols) * DENSE_CELL, score=float(score[0]),
    )


def _local_features(pool: AttentionPool2d, fmap: torch.Tensor) -> torch.Tensor:
    """``c_proj(v_proj(x_j))`` of every cell ``x_j`` of ``fmap`` ``[1, C, gh, gw]``: ``[N, D]``.

    This is the pool's output for a query that attends only to cell ``j``: the softmax over a
    single key is 1, so queries and keys drop out, and the heads' outputs concatenated are
    ``v_proj(x_j)`` itself. The cell gets the positional embedding the pool would add to it
    (none in QualiCLIP's ``pooling="none"``).
    """
    tokens = fmap.flatten(2).transpose(1, 2)[0]  # [N, C]
    positional = pool._positional(tokens.shape[0] + 1, tokens.dtype)
    if positional is not None:
        tokens = tokens + positional[1:]
    return pool.c_proj(pool.v_proj(tokens))


# --- windows -----------------------------------------------------------------------------------


def _starts(length: int, window: int, stride: int) -> list[int]:
    """Crop origins along one side: every ``stride`` px, the last one flush with the edge."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def _windows_map(
    model: Scorer, pixels: np.ndarray | torch.Tensor, window: int, stride: int,
    precision: str, max_batch_pixels: int, report: Callable[[int, int], None],
) -> QualityMap:
    if window < model.min_size:
        raise ValueError(f"window must be at least the model's minimum side {model.min_size} px, "
                         f"got {window}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    if max_batch_pixels < 1:
        raise ValueError(f"max_batch_pixels must be >= 1, got {max_batch_pixels}")
    h, w = _size(pixels)
    ch, cw = min(window, h), min(window, w)
    ys, xs = _starts(h, ch, stride), _starts(w, cw, stride)
    boxes = [(t, l, ch, cw) for t in ys for l in xs]
    per_pass = max(1, max_batch_pixels // (ch * cw))
    dtype = model.input_dtype
    scores: list[torch.Tensor] = []
    for i in range(0, len(boxes), per_pass):
        # Crops are cut per pass: memory is one pass's crops, not all of them.
        crops = _float_crops(pixels, boxes[i:i + per_pass], model.device).to(dtype=dtype)
        scores.append(engine.score_tensors(model, crops, precision,
                                           max_batch_pixels=max_batch_pixels))
        del crops
        report(min(i + per_pass, len(boxes)), len(boxes))
    values = torch.cat(scores).reshape(len(ys), len(xs)).numpy().astype(np.float32)
    return QualityMap(
        values=values, kind="windows", image_size=(h, w), cell=(ch, cw),
        stride=(min(stride, h), min(stride, w)), origins_y=np.asarray(ys),
        origins_x=np.asarray(xs), score=None,
    )


# --- drawing -----------------------------------------------------------------------------------


def colorize(values: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """RGB uint8 ``[..., 3]`` of ``values`` on the ramp, ``vmin`` darkest, ``vmax`` brightest."""
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip((np.asarray(values, dtype=np.float32) - vmin) / span, 0.0, 1.0)
    pos = t * (len(_RAMP) - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    rgb = _RAMP[lo] * (1.0 - frac) + _RAMP[lo + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def upsample(qmap: QualityMap, size: tuple[int, int]) -> np.ndarray:
    """The map at ``size`` = ``(height, width)`` (the image's size, or a scaled copy of it).

    Dense maps are interpolated bilinearly between cell centres; a window map gives each pixel
    the mean of the windows that contain it (exact coverage, so the overlap is not blurred
    twice).
    """
    out_h, out_w = size
    if qmap.kind == "dense":
        small = Image.fromarray(qmap.values.astype(np.float32), mode="F")
        return np.asarray(small.resize((out_w, out_h), Image.Resampling.BILINEAR), dtype=np.float32)
    img_h, img_w = qmap.image_size

    def coverage(origins: np.ndarray, cell: int, length: int, out: int) -> np.ndarray:
        centre = (np.arange(out) + 0.5) * (length / out)  # pixel centres in image coordinates
        return ((centre[:, None] >= origins[None, :])
                & (centre[:, None] < origins[None, :] + cell)).astype(np.float32)

    ay = coverage(qmap.origins_y, qmap.cell[0], img_h, out_h)  # [out_h, rows]
    ax = coverage(qmap.origins_x, qmap.cell[1], img_w, out_w)  # [out_w, cols]
    total = ay @ qmap.values.astype(np.float32) @ ax.T
    count = ay.sum(1)[:, None] * ax.sum(1)[None, :]
    return total / np.maximum(count, 1.0)


def range_note(qmap: QualityMap) -> str | None:
    """A warning for a map too flat to mean anything (see :data:`FLAT_RANGE`), else None."""
    if not qmap.flat:
        return None
    spread = float(qmap.values.max() - qmap.values.min())
    return f"flat map: range {spread:.4f} < {FLAT_RANGE}, no place is worse than another"


def display_range(qmap: QualityMap) -> tuple[float, float]:
    """The values drawn darkest and brightest: the map's minimum and maximum, so differences
    within one image show; for a flat map, :data:`FLAT_RANGE` around its mean (clipped to
    [0, 1]), so that noise is not stretched into structure."""
    lo, hi = float(qmap.values.min()), float(qmap.values.max())
    if not qmap.flat:
        return lo, hi
    centre = min(max((lo + hi) / 2, FLAT_RANGE / 2), 1 - FLAT_RANGE / 2)
    return centre - FLAT_RANGE / 2, centre + FLAT_RANGE / 2


def overlay(
    image: np.ndarray | Image.Image,
    qmap: QualityMap,
    *,
    alpha: float = 0.6,
    value_range: tuple[float, float] | None = None,
    legend: bool = True,
    max_side: int | None = 1600,
    layout: Literal["overlay", "side-by-side"] = "overlay",
) -> Image.Image:
    """The map in colour over its image's luminance, as an RGB PIL image.

    The photo shows through in grey only, so its own colours never mix with the map's: a red
    roof does not read as a low value. The colours come from one ramp, dark violet (low) to
    yellow (high), whose lightness rises steadily, so it reads in grey too.

    Args:
        image: the image the map was computed from (RGB uint8 ``H x W x 3``, or PIL).
        qmap: its map.
        alpha: opacity of the colours over the grey photo.
        value_range: values drawn darkest and brightest; ``None``: :func:`display_range` (the
            map's own minimum and maximum, so differences within one image show, unless the map
            is flat; the legend gives the numbers).
        legend: add a bar under the picture with the ramp, its two end values and, for a flat
            map, :func:`range_note`.
        max_side: scale the photo down so its longer side is at most this (``None``: never).
        layout: ``"overlay"``, or ``"side-by-side"``: the photo in its own colours on the left,
            the map over its luminance on the right.
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = pil.convert("RGB")
    if (pil.height, pil.width) != qmap.image_size:
        raise ValueError(f"the map is of a {qmap.image_size[1]}x{qmap.image_size[0]} image, got "
                         f"{pil.width}x{pil.height}")
    if layout not in ("overlay", "side-by-side"):
        raise ValueError(f"layout must be 'overlay' or 'side-by-side', got {layout!r}")
    scale = 1.0 if max_side is None else min(1.0, max_side / max(pil.size))
    out_w, out_h = max(1, round(pil.width * scale)), max(1, round(pil.height * scale))
    if scale < 1.0:
        pil = pil.resize((out_w, out_h), Image.Resampling.BILINEAR)
    vmin, vmax = value_range or display_range(qmap)
    colours = colorize(upsample(qmap, (out_h, out_w)), vmin, vmax).astype(np.float32)
    grey = np.asarray(pil.convert("L"), dtype=np.float32)[..., None]  # ITU-R 601 luminance
    mapped = Image.fromarray(np.rint(grey * (1 - alpha) + colours * alpha).astype(np.uint8))
    picture = mapped
    if layout == "side-by-side":
        gap = max(4, out_w // 100)
        picture = Image.new("RGB", (2 * out_w + gap, out_h), (255, 255, 255))
        picture.paste(pil, (0, 0))
        picture.paste(mapped, (out_w + gap, 0))
    return _with_legend(picture, vmin, vmax, range_note(qmap)) if legend else picture


def _with_legend(picture: Image.Image, vmin: float, vmax: float,
                 note: str | None = None) -> Image.Image:
    bar_h = max(22, picture.width // 20)  # stays legible when the page scales the picture down
    note_h = bar_h if note else 0
    canvas = Image.new("RGB", (picture.width, picture.height + bar_h + note_h), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    font_px = round(bar_h * 0.7)
    try:
        font: Any = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow before 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    label_w = min(round(font_px * 3.2), picture.width // 4)
    ramp_w = max(1, picture.width - 2 * label_w)
    ramp = colorize(np.linspace(vmin, vmax, ramp_w, dtype=np.float32), vmin, vmax)
    canvas.paste(Image.fromarray(np.repeat(ramp[None], bar_h - 6, axis=0)),
                 (label_w, picture.height + 3))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, picture.height + 2), f"{vmin:.3f}", fill=(0, 0, 0), font=font)
    draw.text((label_w + ramp_w + 3, picture.height + 2), f"{vmax:.3f}", fill=(0, 0, 0),
              font=font)
    if note:
        draw.text((2, picture.height + bar_h + 2), note, fill=(150, 40, 0), font=font)
    return canvas


def overlay_png(
    image: np.ndarray | Image.Image, qmap: QualityMap, *, compress_level: int = 1,
    **options: Any,
) -> bytes:
    """:func:`overlay` encoded as PNG bytes (``options`` are its keywords).

    zlib level 1 by default: on a 768x576 photo overlay it encoded in about half the time of
    Pillow's default level 6, for a file about 15% larger (photos compress little either way).
    """
    buffer = io.BytesIO()
    overlay(image, qmap, **options).save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()


# --- files -------------------------------------------------------------------------------------


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels at 8 bits for drawing: 16-bit values rounded to the nearest 8-bit one."""
    if pixels.dtype == np.uint16:
        return (pixels.astype(np.uint32) * 255 + 32767) // 65535  # rounded, exact integers
    return pixels


def map_root(paths: Iterable[str | os.PathLike[str]]) -> Path | None:
    """The folder that map names are relative to: the deepest one holding every input.

    None when there is no such folder (inputs on different drives) or no input.
    """
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if not folders:
        return None
    try:
        return Path(os.path.commonpath(sorted(folders)))
    except ValueError:
        return None


def map_name(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """The relative name of an input's maps, without suffix: its path below ``root``.

    ``a/photo.png`` gives ``a/photo.png.map`` (files ``.map.png`` and ``.map.npy``): the whole
    relative path, file extension included, so two inputs never share a map (``a/photo.png``,
    ``b/photo.png`` and ``a/photo.jpg`` get three) and each map names its input. Without a
    ``root`` (or for a path outside it) the input's absolute path is mirrored.
    """
    absolute = Path(os.path.abspath(path))
    if root is not None:
        with contextlib.suppress(ValueError):
            rel = absolute.relative_to(os.path.abspath(root))
            if rel.parts:
                return rel.with_name(rel.name + ".map")
    drive = absolute.drive.rstrip(":\\/")
    rel = Path(drive, *absolute.parts[1:]) if absolute.parts[1:] else Path("image")
    return rel.with_name(rel.name + ".map")


def map_files(
    paths: Iterable[str | os.PathLike[str]], outdir: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None, *, npy: bool = False,
) -> list[Path]:
    """Every file :func:`write_maps` may write for ``paths`` (to check them before scoring)."""
    suffixes = (".png", ".npy") if npy else (".png",)
    names = [Path(outdir) / map_name(p, root) for p in paths]
    return [n.with_name(n.name + s) for n in names for s in suffixes]


def _map_folder(outdir: Path, name: Path) -> Path:
    """``outdir``'s sub-folder for ``name``, created; never through a symlink inside ``outdir``."""
    folder = outdir
    for part in name.parent.parts:
        folder = folder / part
        if folder.is_symlink():
            raise ValueError(f"{folder} is a symlink; maps are never written through links")
        make_folder(folder)
    return folder


#: Write failures that belong to one map's name, not to the folder or the disk: that input's
#: error row, while the others are still mapped (a 250-byte file name is a valid input whose
#: map name, 8 bytes longer, is not).
_ONE_FILES_ERRNOS = frozenset({errno.ENAMETOOLONG})


def _drawable(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Decoded pixels as an 8-bit ``H x W x 3`` array to draw beside the map."""
    if isinstance(pixels, torch.Tensor):  # decoded on the GPU: uint8 [3, H, W]
        return pixels.permute(1, 2, 0).cpu().numpy()
    return to_uint8(pixels)


def _write_map_files(
    folder: Path, name: Path, pixels: np.ndarray | torch.Tensor, qmap: QualityMap, *,
    npy: bool, inputs: InputFiles | None,
) -> None:
    """The photo (decoded ``pixels``) beside its map as ``folder/name.png`` and, with ``npy``,
    the raw values as ``name.npy``: each written by :func:`~qualiclip.output_files.open_output`
    (complete or not at all, never through a link, never over one of ``inputs``).

    Raises:
        OutputError: a file could not be written.
        ValueError: a folder on the way is a symlink.
    """
    place = _map_folder(folder, name)
    picture = overlay(_drawable(pixels), qmap, layout="side-by-side")
    with open_output(place / f"{name.name}.png", inputs=inputs) as f:
        picture.save(f, format="PNG")
    if npy:
        with open_output(place / f"{name.name}.npy", inputs=inputs) as f:
            np.save(f, qmap.values)


def _map_failed(exc: Exception) -> str:
    """A failed map's error: an output error's own message (it names the file and errno),
    anything else's type and message."""
    if isinstance(exc, OutputError):
        return f"quality map failed: {exc}"
    return f"quality map failed: {type(exc).__name__}: {exc}"


def write_maps(
    model: Scorer,
    results: Iterable[ScoreResult],
    outdir: str | os.PathLike[str],
    *,
    kind: MapKind | str = "dense",
    npy: bool = False,
    window: int = DEFAULT_WINDOW,
    stride: int = DEFAULT_STRIDE,
    precision: str = "fp32",
    root: str | os.PathLike[str] | None = None,
    inputs: InputFiles | None = None,
    on_map: Callable[[ScoreResult, QualityMap], None] | None = None,
) -> Iterator[ScoreResult]:
    """Pass ``results`` through, writing each scored file's map into ``outdir`` on the way.

    For input ``root/a/photo.jpg`` the overlay is ``outdir/a/photo.jpg.map.png`` (and the raw
    values ``photo.jpg.map.npy`` with ``npy``): :func:`map_name` mirrors the input's path below
    ``root`` (default: its absolute path), so no two inputs share a map and each map names its
    input. Files are written by :func:`qualiclip.output_files.open_output`: complete or not at
    all, never through a symlink, never over one of ``inputs``. ``on_map(result, qmap)`` is
    called with each map drawn (the HTML report keeps them).

    Rows that already carry an error pass unchanged; a file whose map fails keeps its score and
    gets the map's error, so it counts as failed.

    Each file is decoded again here, after it was scored; :func:`score_paths_with_maps` scores
    and maps files with one decoding each.

    Raises:
        OutputError: a map could not be written (a full disk, a read-only folder): the run
            stops, as every later map would fail the same way. A map whose name alone is
            refused (too long) is that input's error instead.
    """
    folder = Path(outdir)
    make_folder(folder)
    for result in results:
        if not result.ok:
            yield result
            continue
        try:
            pixels = images.decode_rgb(result.path, min_size=model.min_size)
            qmap = quality_map(model, pixels, kind, window=window, stride=stride,
                               precision=precision)
            _write_map_files(folder, map_name(result.path, root), pixels, qmap, npy=npy,
                             inputs=inputs)
            if on_map is not None:
                on_map(result, qmap)
        except Exception as exc:  # noqa: BLE001 - a failed map is this file's error, not the run's
            _raise_if_the_runs(exc)
            yield dataclasses.replace(result, error=_map_failed(exc))
            continue
        yield result


def _raise_if_the_runs(exc: Exception) -> None:
    """Raise ``exc`` again if it is the folder's or the disk's (every later map would fail
    the same way): only a map whose name alone is refused (too long) is that input's error."""
    if isinstance(exc, OutputError) and exc.errno not in _ONE_FILES_ERRNOS:
        raise exc


def score_paths_with_maps(
    model: Scorer,
    paths: Iterable[str | os.PathLike[str]],
    outdir: str | os.PathLike[str],
    *,
    kind: MapKind | str = "dense",
    npy: bool = False,
    window: int = DEFAULT_WINDOW,
    stride: int = DEFAULT_STRIDE,
    precision: str = "fp32",
    workers: int = 2,
    decode: Decode = "auto",
    progress: bool = False,
    root: str | os.PathLike[str] | None = None,
    inputs: InputFiles | None = None,
    on_map: Callable[[ScoreResult, QualityMap], None] | None = None,
) -> Iterator[ScoreResult]:
    """Score image files and write their maps, decoding each file once (``score --map``).

    Files are decoded in ``workers`` threads ahead of the model, as for
    :func:`qualiclip.engine.score_paths` (``decode`` as there), and each file's map is computed
    from its pixels. A ``"dense"`` map's pass gives the file's score as well (the attention
    pool's global feature of the same feature map, :attr:`QualityMap.score`); a ``"windows"``
    map's file is scored by the engine from the same pixels. Files, names (``root``),
    ``inputs`` and ``on_map`` are as for :func:`write_maps`. A file that cannot be decoded or
    scored gets a row with its error and no map; a file whose map fails keeps its score (from
    the engine) and gets the map's error.

    Returns:
        one :class:`~qualiclip.engine.ScoreResult` per path, in input order; the work happens
        as it is consumed.

    Raises:
        ValueError: an unknown ``kind``, ``workers < 1``, a precision the model's device cannot
            run, or a ``decode`` that cannot be had here (as :func:`~qualiclip.engine.score_paths`).
        OutputError: as for :func:`write_maps`: a map the folder or the disk refused.
    """
    if kind not in MAP_KINDS:
        raise ValueError(f"kind must be one of {MAP_KINDS}, got {kind!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    engine.prepare(model, precision)  # validates the precision before any file is read
    decoder = resolve_decoder(decode, model.device)
    folder = Path(outdir)

    def results() -> Iterator[ScoreResult]:
        make_folder(folder)
        decoded = decoded_in_order((os.fspath(p) for p in paths), model.min_size, workers,
                                   prefetch=max(2, 2 * workers), decoder=decoder)
        for item in decoded:
            if item.pixels is None:
                yield ScoreResult(item.path, None, item.error)
                continue
            yield _score_and_map(model, item.path, item.pixels, folder, kind, window, stride,
                                 precision, npy=npy, root=root, inputs=inputs, on_map=on_map)

    return _with_progress(results(), paths) if progress else results()


def _score_and_map(
    model: Scorer, path: str, pixels: np.ndarray | torch.Tensor, folder: Path,
    kind: str, window: int, stride: int, precision: str, *, npy: bool,
    root: str | os.PathLike[str] | None, inputs: InputFiles | None,
    on_map: Callable[[ScoreResult, QualityMap], None] | None,
) -> ScoreResult:
    """One decoded file's row, its map written on the way."""
    h, w = _size(pixels)
    score: float | None = None
    try:
        qmap = quality_map(model, pixels, kind, window=window, stride=stride, precision=precision)
        score = qmap.score
        if score is None:  # a window map: the whole image's score, from the same pixels
            score = float(engine.score(model, pixels, precision=precision))
        result = ScoreResult(path, score, None, w, h)
        _write_map_files(folder, map_name(path, root), pixels, qmap, npy=npy, inputs=inputs)
        if on_map is not None:
            on_map(result, qmap)
    except Exception as exc:  # noqa: BLE001 - a failed map is this file's error, not the run's
        _raise_if_the_runs(exc)
        if score is None:  # the map's pass failed: the row is the engine's, as without --map
            try:
                score = float(engine.score(model, pixels, precision=precision))
            except Exception as scoring:  # noqa: BLE001 - this file's error, as score_paths'
                return ScoreResult(path, None, engine.error_text(scoring), w, h)
        return ScoreResult(path, score, _map_failed(exc), w, h)
    return result


def _with_progress(
    results: Iterator[ScoreResult], paths: Iterable[object]
) -> Iterator[ScoreResult]:
    bar = engine.progress_bar(len(paths) if isinstance(paths, Sized) else None)
    for result in results:
        bar.update(1)
        yield result
    bar.close()


def half_means(qmap: QualityMap) -> tuple[float, float]:
    """Mean map value over the image's left and right halves (pixel-weighted, at image scale
    divided down to at most 512 px a side)."""
    h, w = qmap.image_size
    scale = min(1.0, 512 / max(h, w))
    full = upsample(qmap, (max(1, math.floor(h * scale)), max(1, math.floor(w * scale))))
    half = full.shape[1] // 2
    return float(full[:, :half].mean()), float(full[:, full.shape[1] - half:].mean())
