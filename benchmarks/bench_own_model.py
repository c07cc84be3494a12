"""Does a trained model rank damage the way people would? Checks on photos it never saw.

Three figures for a model trained by ``qualiclip train`` (issue "a model of our own"), all from
held-out pristine photos, none from human ratings:

* **ordering**: for each photo (the whole image, at full resolution), whether the score falls
  from the original to a Gaussian blur of sigma 2 to one of sigma 5, and from the original to a
  JPEG of quality 8; the share of photos for which each holds.
* **cross-image SRCC**: every photo at several single distortions of kinds cameras make
  (blur, motion blur, noise, JPEG, exposure, contrast) at random levels 1..5, the original as
  level 0, all photos pooled: Spearman correlation of the score with minus the level. Unlike
  the within-photo ordering of training's validation, this asks scores of *different* photos
  to be comparable, as a human-rated set does.
* **speed**: seconds to score a 1024x768 image, against RN50-sized random weights in the same
  run (``--speed``).

Example::

    python benchmarks/bench_own_model.py --model qualiclip-open --photos ../shared/data/pristine \\
        --match 'live-*' --speed
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

import qualiclip
from qualiclip import degradations
from qualiclip.checkpoints import model_from_checkpoint
from qualiclip.images import load_image

#: Single distortions of the kinds cameras make, for the cross-image SRCC.
CAMERA_KINDS = (
    "gaussian_blur", "motion_blur", "lens_blur", "white_noise", "white_noise_cc", "jpeg",
    "darken", "brighten", "linear_contrast_change", "color_saturation1",
)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    arr = (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)[None].float() / 255


@torch.no_grad()
def ordering(model: torch.nn.Module, photos: list[Path], max_side: int) -> dict[str, float]:
    """Shares of photos with original > blur 2 > blur 5 and original > JPEG q8."""
    g = torch.Generator().manual_seed(0)
    blur_ok = jpeg_ok = 0
    for path in photos:
        x = _fit(load_image(path)[None], max_side)
        b2 = degradations.apply_distortion(x, "gaussian_blur", [4], g)  # sigma 2
        b5 = degradations.apply_distortion(x, "gaussian_blur", [5], g)  # sigma 5
        s = [float(model(v)[0]) for v in (x, b2, b5, _jpeg(x, 8))]
        blur_ok += s[0] > s[1] > s[2]
        jpeg_ok += s[0] > s[3]
    n = len(photos)
    return {"blur_order": blur_ok / n, "jpeg_order": jpeg_ok / n, "photos": n}


@torch.no_grad()
def cross_image_srcc(
    model: torch.nn.Module, photos: list[Path], max_side: int, per_photo: int = 6, seed: int = 0
) -> float:
    """SRCC of scores against minus the level, pooled over photos (originals at level 0)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    scores, levels = [], []
    for path in photos:
        x = _fit(load_image(path)[None], max_side)
        scores.append(float(model(x)[0]))
        levels.append(0)
        for kind in rng.choice(CAMERA_KINDS, size=per_photo, replace=False):
            level = int(rng.integers(1, 6))
            scores.append(float(model(degradations.apply_distortion(x, str(kind), [level], g))[0]))
            levels.append(level)
    return float(spearmanr(scores, -np.asarray(levels)).statistic)


def _fit(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """Downscale (area) so the longer side is at most ``max_side``; never upscale."""
    h, w = x.shape[-2:]
    scale = max_side / max(h, w)
    if scale >= 1:
        return x
    size = (max(32, round(h * scale)), max(32, round(w * scale)))
    return torch.nn.functional.interpolate(x, size=size, mode="area")


@torch.no_grad()
def seconds_per_image(model: torch.nn.Module, repeats: int = 3) -> float:
    x = torch.rand(1, 3, 768, 1024)
    qualiclip.score(model, x)
    start = time.perf_counter()
    for _ in range(repeats):
        qualiclip.score(model, x)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="a model name, a trained model.pth or a training checkpoint ckpt-*.pt")
    p.add_argument("--logit-scale", type=float, default=None,
                   help="the softmax scale to score with (default: the model's own)")
    p.add_argument("--photos", required=True, help="folder of held-out pristine photos")
    p.add_argument("--match", default="*", help="glob of file names in --photos (default: all)")
    p.add_argument("--max-side", type=int, default=1024, help="downscale larger photos to this")
    p.add_argument("--per-photo", type=int, default=6, help="distorted copies per photo")
    p.add_argument("--speed", action="store_true", help="also time a 1024x768 image vs RN50")
    args = p.parse_args(argv)

    photos = sorted(Path(args.photos).glob(args.match))
    photos = [q for q in photos if q.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif")]
    if not photos:
        print(f"no photos match {args.match!r} in {args.photos}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if Path(args.model).name.startswith("ckpt-"):
        model = model_from_checkpoint(args.model)
    else:
        model = qualiclip.create_model(args.model)
    if args.logit_scale is not None:
        model.logit_scale = args.logit_scale
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, {platform.machine()}; model {args.model}")
    order = ordering(model, photos, args.max_side)
    print(f"ordering on {order['photos']} photos: original > blur s2 > blur s5: "
          f"{order['blur_order']:.3f}; original > JPEG q8: {order['jpeg_order']:.3f}")
    rho = cross_image_srcc(model, photos, args.max_side, args.per_photo)
    print(f"cross-image SRCC (camera-like distortions, {args.per_photo} per photo): {rho:.3f}")
    if args.speed:
        ours = seconds_per_image(model)
        rn50 = seconds_per_image(qualiclip.create_model("random-rn50"))
        print(f"1024x768 image: {ours:.3f} s, RN50 {rn50:.3f} s: {rn50 / ours:.1f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
