"""Pristine crop pairs for QualiCLIP training.

QualiCLIP (arXiv 2403.11176, §3) cuts two random overlapping crops from each pristine image; both
then receive the same synthetic degradation at every level. This module does the part that
belongs in DataLoader workers: decode, (optionally) upscale, crop, and return ``uint8`` tensors.
Degradation runs later, batched on the training device (:mod:`qualiclip.train`).

Every sample is a pure function of ``(seed, epoch, index)``: the sampler hands the dataset
``(index, epoch)`` keys and the crop positions come from a generator seeded by those numbers, so
a resumed run sees exactly the crops an uninterrupted run would, whatever the worker count.

Bad files (unreadable, truncated, not an image, too small) are found by :func:`scan_images`
before training starts; one that still fails in a worker (a header scan lets a truncated JPEG
through) is replaced by the next usable image, deterministically, and the sample says which
file it stands in for, so the training loop can name it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from qualiclip.images import ImageDecodeError, decode_rgb
from qualiclip.inputs import IMAGE_EXTENSIONS, list_image_paths

__all__ = [
    "MIN_SIDE",
    "SCAN_MODES",
    "SMALL_IMAGE_POLICIES",
    "EpochSampler",
    "PristineCropPairs",
    "ResumableSampler",
    "ScanResult",
    "crop_iou",
    "find_images",
    "sample_crop_pair",
    "scan_images",
    "split_every_kth",
]

logger = logging.getLogger(__name__)

#: What to do with an image smaller than the crop: ``"upscale"`` its shorter side to the crop
#: size (bicubic) or ``"skip"`` it (logged once, when the dataset is built).
SMALL_IMAGE_POLICIES = ("upscale", "skip")
#: Shorter side, in pixels, below which a pristine image is unusable whatever the policy: such a
#: thumbnail upscaled to a crop holds no pristine detail (the scorer's own floor, see images.py).
MIN_SIDE = 32
#: How :func:`scan_images` checks a file: ``"decode"`` decodes it fully (finds truncated data;
#: 24-36 ms per 768x512 PNG measured on a busy 2-core machine), ``"header"`` reads the header
#: only (under 0.1 ms; truncated data is then found, and skipped, only when a worker reads it).
SCAN_MODES = ("decode", "header")

CropBox = tuple[int, int]  # (top, left) of a square crop


def find_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """List pristine images: a folder (searched recursively), a text file of paths, or paths.

    Args:
        source: a directory, a ``.txt`` file with one path per line (relative to the file), or a
            sequence of image paths; expanded by :func:`qualiclip.inputs.list_image_paths`.

    Returns:
        Sorted image paths (sorting makes splits and sampling independent of the file system).

    Raises:
        ValueError: when the source does not exist or holds no image.
    """
    items = [source] if isinstance(source, str | Path) else list(source)
    if isinstance(source, str | Path) and not Path(source).exists():
        raise ValueError(f"pristine image source not found: {source}")
    paths = list_image_paths(items, list_files=True)
    paths = sorted(paths)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {source}")
    return paths


def split_every_kth(paths: Sequence[Path], k: int) -> tuple[list[Path], list[Path]]:
    """Hold out every k-th image (indices k-1, 2k-1, ...) for validation.

    Args:
        paths: images in a fixed (sorted) order.
        k: hold-out period; 0 holds out nothing.

    Returns:
        ``(train, validation)`` lists.
    """
    if k < 0 or k == 1:
        raise ValueError(f"hold-out period must be 0 or >= 2, got {k}")
    if k == 0:
        return list(paths), []
    val = [p for n, p in enumerate(paths) if n % k == k - 1]
    train = [p for n, p in enumerate(paths) if n % k != k - 1]
    return train, val


def crop_iou(a: CropBox, b: CropBox, size: int) -> float:
    """Intersection over union of two ``size`` x ``size`` square crops given by (top, left)."""
    dy = max(0, size - abs(a[0] - b[0]))
    dx = max(0, size - abs(a[1] - b[1]))
    inter = dy * dx
    return inter / (2 * size * size - inter)


def sample_crop_pair(
    height: int, width: int, size: int, min_overlap: float, rng: np.random.Generator
) -> tuple[CropBox, CropBox]:
    """Draw two square crops inside an image whose IoU is at least ``min_overlap``.

    Crop A is uniform over the image. Crop B's offset from A is drawn uniformly among the
    offsets that keep B inside the image and the IoU above the bound: the largest shift per
    axis follows from ``IoU = I / (2 s^2 - I)`` with ``I = (s - |dy|)(s - |dx|)``; offsets
    in that square that still fail the bound (both axes shifted) are redrawn.

    Args:
        height: image height (>= size).
        width: image width (>= size).
        size: crop side.
        min_overlap: IoU lower bound in [0, 1].
        rng: NumPy generator (seeded by the caller).

    Returns:
        ``((top_a, left_a), (top_b, left_b))``.
    """
    top_a = int(rng.integers(0, height - size + 1))
    left_a = int(rng.integers(0, width - size + 1))
    # With the other axis unshifted, I = s (s - d) and IoU >= t  <=>  d <= s (1 - t) / (1 + t).
    max_shift = int(math.floor(size * (1.0 - min_overlap) / (1.0 + min_overlap)))
    lo_y, hi_y = max(0, top_a - max_shift), min(height - size, top_a + max_shift)
    lo_x, hi_x = max(0, left_a - max_shift), min(width - size, left_a + max_shift)
    for _ in range(100):
        b = (int(rng.integers(lo_y, hi_y + 1)), int(rng.integers(lo_x, hi_x + 1)))
        if crop_iou((top_a, left_a), b, size) >= min_overlap:
            return (top_a, left_a), b
    return (top_a, left_a), (top_a, left_a)  # only reachable for min_overlap close to 1


def _decode_uint8(path: Path) -> np.ndarray:
    """RGB ``uint8`` pixels through the project's safe decoder (16-bit sources rounded to 8)."""
    arr = decode_rgb(path, min_size=MIN_SIDE)
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return arr


def _header_size(path: Path) -> tuple[int, int]:
    """(height, width) as stored, from the header only.

    EXIF rotation is not applied: only the shorter side is ever used, which rotation keeps, and
    reading a PNG's EXIF would decode the whole image.

    Raises:
        ImageDecodeError: the file cannot be opened as an image.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageDecodeError(
            f"{path}: cannot identify image file (not an image?)", "not_an_image"
        ) from exc
    return height, width


def _reason(exc: ImageDecodeError, path: Path) -> str:
    """The decoder's message without the file name it starts with (the caller names the file)."""
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


@dataclass
class ScanResult:
    """What :func:`scan_images` found.

    Attributes:
        usable: images to train on, in the order given.
        bad: ``(path, reason)`` of files that cannot be used (unreadable, not an image,
            truncated, shorter side below :data:`MIN_SIDE`).
        small: images smaller than the crop left out by the ``"skip"`` policy (a choice, not bad
            data).
    """

    usable: list[Path] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)
    small: list[Path] = field(default_factory=list)


def _check_one(path: Path, crop_size: int, small_images: str, mode: str) -> tuple[str, str]:
    """``("ok" | "bad" | "small", reason)`` for one file."""
    try:
        if mode == "decode":
            h, w = _decode_uint8(path).shape[:2]
        else:
            h, w = _header_size(path)
            if min(h, w) < MIN_SIDE:
                return "bad", f"too small: {w}x{h} pixels (the shorter side must be >= {MIN_SIDE})"
    except ImageDecodeError as exc:
        return "bad", _reason(exc, path)
    if small_images == "skip" and min(h, w) < crop_size:
        return "small", f"{w}x{h} is smaller than the {crop_size} px crop"
    return "ok", ""


def scan_images(
    paths: Sequence[str | Path],
    *,
    crop_size: int,
    small_images: str = "upscale",
    mode: str = "decode",
    threads: int = 1,
) -> ScanResult:
    """Sort pristine files into usable, bad and (policy-)skipped before training starts.

    Args:
        paths: candidate images.
        crop_size: crop side; with ``small_images="skip"`` smaller images are left out.
        small_images: a policy of :data:`SMALL_IMAGE_POLICIES`.
        mode: ``"decode"`` (thorough) or ``"header"`` (fast), see :data:`SCAN_MODES`.
        threads: files checked at once (PIL decodes outside the GIL).

    Returns:
        A :class:`ScanResult`; nothing is logged here (the caller decides how to report).
    """
    if mode not in SCAN_MODES:
        raise ValueError(f"scan mode must be one of {SCAN_MODES}, got {mode!r}")
    if small_images not in SMALL_IMAGE_POLICIES:
        raise ValueError(
            f"small_images must be one of {SMALL_IMAGE_POLICIES}, got {small_images!r}"
        )
    files = [Path(p) for p in paths]

    def check(path: Path) -> tuple[str, str]:
        return _check_one(path, crop_size, small_images, mode)

    if threads > 1 and len(files) > 1:
        with ThreadPoolExecutor(threads) as pool:
            verdicts = list(pool.map(check, files))
    else:
        verdicts = [check(p) for p in files]
    result = ScanResult()
    for path, (verdict, reason) in zip(files, verdicts, strict=True):
        if verdict == "ok":
            result.usable.append(path)
        elif verdict == "bad":
            result.bad.append((path, reason))
        else:
            result.small.append(path)
    return result


class PristineCropPairs(Dataset):
    """Two overlapping random crops per pristine image, as ``uint8`` tensors.

    An image that fails to decode here (unreadable, truncated, too small) does not stop
    training: the sample comes from the next image in the list that decodes, with the crop
    positions the failed key would have had, so it still depends on ``(seed, epoch, index)``
    only. ``"skipped"`` then names the failed file and why (empty when nothing failed); the
    training loop logs each name once and counts them. Only when no image decodes at all is
    :class:`~qualiclip.images.ImageDecodeError` raised.

    Args:
        paths: pristine images (see :func:`find_images`, :func:`scan_images`).
        crop_size: side of the square crops in pixels (224 in the paper).
        min_overlap: lower bound on the IoU of the two crops (ours: 0.5; the paper says only
            "overlapping").
        seed: base seed; a sample depends on ``(seed, epoch, index)`` only.
        small_images: ``"upscale"`` images whose shorter side is below ``crop_size`` (bicubic,
            aspect kept) or ``"skip"`` them; skipping reads every image header once, here.

    Shape:
        ``dataset[(index, epoch)]["crops"]``: ``[2, 3, crop_size, crop_size]`` uint8.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        crop_size: int,
        *,
        min_overlap: float = 0.5,
        seed: int = 0,
        small_images: str = "upscale",
    ) -> None:
        if crop_size < 8:
            raise ValueError(f"crop_size must be >= 8 px, got {crop_size}")
        if not 0.0 <= min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
        if small_images not in SMALL_IMAGE_POLICIES:
            raise ValueError(
                f"small_images must be one of {SMALL_IMAGE_POLICIES}, got {small_images!r}"
            )
        self.paths = [Path(p) for p in paths]
        self.crop_size = crop_size
        self.min_overlap = min_overlap
        self.seed = seed
        self.small_images = small_images
        # Per process: files already known to fail are not decoded again (same outcome).
        self._failed: dict[int, str] = {}
        if small_images == "skip":
            self.paths = [p for p in self.paths if self._big_enough(p)]
        if not self.paths:
            raise ValueError("no usable pristine image left (all smaller than the crop?)")

    def _big_enough(self, path: Path) -> bool:
        try:
            h, w = _header_size(path)
        except ImageDecodeError:
            return True  # not an image at all: reported by name when it is loaded
        if min(h, w) < self.crop_size:
            logger.warning(
                "skipping %s: %dx%d is smaller than the %d px crop", path, w, h, self.crop_size
            )
            return False
        return True

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """Decode image ``index`` (``uint8`` H x W x 3), upscaled to at least the crop size.

        Raises:
            ImageDecodeError: the file cannot be used; the message names it.
        """
        arr = _decode_uint8(self.paths[index])
        h, w = arr.shape[:2]
        if min(h, w) < self.crop_size:
            scale = self.crop_size / min(h, w)
            size = (max(self.crop_size, round(w * scale)), max(self.crop_size, round(h * scale)))
            arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC))
        return arr

    def _load_or_substitute(self, index: int) -> tuple[np.ndarray, int, list[str]]:
        """Pixels of ``index``, or of the next image that decodes; the failures on the way."""
        failures: list[str] = []
        n = len(self.paths)
        for candidate in (index + k for k in range(n)):
            candidate %= n
            if candidate not in self._failed:
                try:
                    return self.load(candidate), candidate, failures
                except ImageDecodeError as exc:
                    self._failed[candidate] = _reason(exc, self.paths[candidate])
                    logger.debug("cannot use %s: %s", self.paths[candidate], exc)
            failures.append(f"{self.paths[candidate]}: {self._failed[candidate]}")
        raise ImageDecodeError(  # (each file's own reason is in the message)
            f"none of the {n} pristine images can be decoded (first: {failures[0]})", "malformed"
        )

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index, epoch = (key, 0) if isinstance(key, int) else key
        rng = np.random.default_rng([self.seed, epoch, index])
        arr, used, failures = self._load_or_substitute(index)
        h, w = arr.shape[:2]
        s = self.crop_size
        (ta, la), (tb, lb) = sample_crop_pair(h, w, s, self.min_overlap, rng)
        crops = np.stack([arr[ta : ta + s, la : la + s], arr[tb : tb + s, lb : lb + s]])
        tensor = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).contiguous()
        # A string collates into a list of strings: the loop sees which files stood in.
        return {"crops": tensor, "index": torch.tensor(used), "skipped": "\n".join(failures)}


class EpochSampler(Sampler):
    """Shuffled ``(index, epoch)`` keys, split across ranks, resumable mid-epoch.

    Like :class:`torch.utils.data.DistributedSampler` (a permutation seeded by
    ``seed + epoch``, padded to a multiple of the world size, rank ``r`` taking every
    ``world_size``-th item from ``r``), but it yields ``(index, epoch)`` so the dataset can seed
    its crops without shared state, and ``start`` skips the samples a resumed run already saw.

    Args:
        size: number of images.
        seed: shuffling seed.
        epoch: epoch number (changes the permutation).
        start: number of this rank's samples to skip (``batches_done * batch_size``).
        rank: this process's rank.
        world_size: number of processes.
        drop_last: drop the tail so every rank gets ``size // world_size`` samples.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start
        self.rank, self.world_size = rank, world_size
        per_rank = size // world_size if drop_last else math.ceil(size / world_size)
        self.per_rank = per_rank

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.size))[:total]  # pad by repeating, like DDP
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices()[self.start :]:
            yield index, self.epoch

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class ResumableSampler(Sampler):
    """Endless ``(index, epoch)`` keys, epoch after epoch, starting at any sample position.

    One DataLoader then serves a whole run (workers are not restarted every epoch), and the
    position is a single number: the samples this rank has consumed. Epoch ``e`` is the
    permutation of :class:`EpochSampler` for ``e``, so the order does not depend on where a run
    was resumed.

    Args:
        size: number of images.
        seed: shuffling seed.
        start: samples of this rank already consumed (skipped).
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self, size: int, *, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.size, self.seed, self.start = size, seed, start
        self.rank, self.world_size = rank, world_size
        # Every epoch gives each rank the same number of samples (DDP needs equal step counts).
        self.per_rank = size // world_size
        if self.per_rank == 0:
            raise ValueError(f"{size} images cannot feed {world_size} processes")

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            sampler = EpochSampler(
                self.size,
                seed=self.seed,
                epoch=epoch,
                start=offset,
                rank=self.rank,
                world_size=self.world_size,
                drop_last=True,
            )
            yield from sampler
            epoch, offset = epoch + 1, 0
