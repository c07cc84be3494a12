"""Photos for the benchmarks when no folder is given: the same scripts run on any clone.

Where the benchmarks find photos, in order: the folder given on the command line; the 53
pristine photos of ``$QUALICLIP_SHARED/data/pristine`` or ``../shared/data/pristine`` (Kodak and
LIVE references, beside this project's own checkouts); else a small built-in set written to a
temporary folder. The built-in set is cut from the colour photographs that scikit-image ships
(``skimage.data``: astronaut, coffee, chelsea, rocket, ..., the 'dev' extra), or, without
scikit-image, drawn: smooth colour fields with edges and texture. Figures measured on the
built-in set are not comparable with figures measured on the pristine photos; each script
prints which set it used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def shared_pristine() -> Path | None:
    """``$QUALICLIP_SHARED/data/pristine`` or ``../shared/data/pristine``, if either exists."""
    env = os.environ.get("QUALICLIP_SHARED")
    folder = (Path(env) if env else REPO.parent / "shared") / "data" / "pristine"
    return folder if folder.is_dir() else None


def _sources() -> list[np.ndarray]:
    """scikit-image's bundled colour photographs, or drawn ones without it."""
    try:
        from skimage import data
    except ImportError:
        return [_drawn(seed) for seed in range(6)]
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
             "hubble_deep_field")
    return [np.asarray(getattr(data, name)())[..., :3] for name in names]


def _drawn(seed: int, height: int = 480, width: int = 640) -> np.ndarray:
    """A stand-in photo: smooth colour gradients, a few hard-edged shapes, fine texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 6.3, size=3)
    freq = rng.uniform(2, 9, size=3)
    base = np.stack([np.sin(freq[c] * xx + phase[c]) * np.cos(freq[c] * yy - phase[c])
                     for c in range(3)], axis=-1)
    img = 128 + 80 * base
    for _ in range(4):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _cut(source: np.ndarray, index: int, side: int) -> Image.Image:
    """The ``index``-th variant of a source: a square crop at a position chosen by ``index``,
    mirrored every other time, scaled to ``side``."""
    h, w = source.shape[:2]
    crop = min(h, w) * 3 // 4
    rng = np.random.default_rng(index)
    top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    image = Image.fromarray(np.ascontiguousarray(source[top:top + crop, left:left + crop]))
    if index % 2:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize((side, side), Image.Resampling.LANCZOS)


def write_builtin_photos(folder: Path, count: int = 16, side: int = 384) -> list[Path]:
    """Write ``count`` PNG photos of ``side`` x ``side`` into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = _sources()
    paths = []
    for i in range(count):
        path = folder / f"builtin{i:03d}.png"
        _cut(sources[i % len(sources)], i // len(sources) + 7 * i, side).save(path)
        paths.append(path)
    return paths


def photo_paths(folder: str | os.PathLike[str] | None, scratch: Path,
                count: int = 16) -> tuple[list[Path], str]:
    """The photos a benchmark uses, and a line saying which set they are.

    Args:
        folder: a folder given on the command line (its images, sorted), or None.
        scratch: a temporary folder for the built-in set.
        count: size of the built-in set.
    """
    where = Path(folder) if folder is not None else shared_pristine()
    if where is not None:
        if not where.is_dir():
            raise SystemExit(f"no folder {where}")
        found = sorted(p for p in where.iterdir() if p.suffix.lower() in SUFFIXES)
        if not found:
            raise SystemExit(f"no images in {where}")
        return found, f"photos: {len(found)} from {where}"
    made = write_builtin_photos(scratch, count)
    return made, (f"photos: {len(made)} built-in (no folder given and no ../shared: figures "
                  "are not comparable with those measured on the pristine photos)")
