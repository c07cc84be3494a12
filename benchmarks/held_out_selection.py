"""Choose a run's checkpoint and softmax scale on its own held-out pristine photos.

What qualiclip-open's step and scale were chosen on (never on a human-rated set): the photos a
run held out (every ``val_every_kth``-th of its pristine folder, as training split them), each
downscaled to at most ``--max-side`` px, scored as they are, with Gaussian blur σ = 2 and σ = 5,
with JPEG quality 8, and with six camera-like distortions at random levels. Printed per
checkpoint and scale, as one JSON line: the share of photos ordered original > σ 2 > σ 5
(``blur``), the share with original > JPEG q8 (``jpeg``), the SRCC of score against minus the
level pooled over all photos (``cross``: originals at level 0, the six distortions), and the
median score of the originals (``median``: near 1 means the pair probabilities saturate).
Image features are computed once per image; every scale reuses them.

Example::

    python benchmarks/held_out_selection.py runs/qualiclip-open --steps 500 1000 2000 3000 \\
        --scales 100 30 10 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from bench_own_model import CAMERA_KINDS, _fit, _jpeg
from qualiclip import degradations
from qualiclip.checkpoints import model_from_checkpoint
from qualiclip.crops import split_every_kth
from qualiclip.images import load_image
from qualiclip.train_config import config_from_dict

SUFFIXES = (".png", ".jpg", ".jpeg")


def held_out_photos(run: Path) -> list[Path]:
    """The photos ``run`` held out, split as training split them."""
    data = config_from_dict(json.loads((run / "config.json").read_text())).data
    photos = sorted(p for p in Path(data.pristine).iterdir() if p.suffix.lower() in SUFFIXES)
    return split_every_kth(photos, data.val_every_kth)[1]


@torch.no_grad()
def similarities(ckpt: Path, images: list[torch.Tensor], seed: int) -> list[list[tuple]]:
    """Per photo: ``(similarities [P, 2], level, kind)`` of the original and its variants."""
    model = model_from_checkpoint(ckpt).eval()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = []
    for x in images:
        variants = [
            (x, 0, "original"),
            (degradations.apply_distortion(x, "gaussian_blur", [4], g), 4, "blur2"),
            (degradations.apply_distortion(x, "gaussian_blur", [5], g), 5, "blur5"),
            (_jpeg(x, 8), 5, "jpeg8"),
        ]
        for kind in rng.choice(CAMERA_KINDS, size=6, replace=False):
            level = int(rng.integers(1, 6))
            variants.append((degradations.apply_distortion(x, str(kind), [level], g), level,
                             "camera"))
        rows.append([(model.similarities(model.image_features(v))[0], lv, k)
                     for v, lv, k in variants])
    return rows


def figures(rows: list[list[tuple]], scale: float) -> dict[str, float]:
    """Ordering shares, pooled SRCC and median original score at one softmax scale."""
    scores = [[float(torch.softmax(scale * s, dim=-1)[..., 0].mean()) for s, _, _ in row]
              for row in rows]
    pooled = [(sc[0], 0) for sc in scores] + [
        (sc[i], row[i][1]) for sc, row in zip(scores, rows, strict=True) for i in range(len(row))
        if row[i][2] == "camera"
    ]
    cross = spearmanr([s for s, _ in pooled], [-lv for _, lv in pooled]).statistic
    return {
        "blur": round(float(np.mean([s[0] > s[1] > s[2] for s in scores])), 3),
        "jpeg": round(float(np.mean([s[0] > s[3] for s in scores])), 3),
        "cross": round(float(cross), 3),
        "median": round(float(np.median([s[0] for s in scores])), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a training run folder (config.json, ckpt-*.pt)")
    p.add_argument("--steps", type=int, nargs="+", required=True, help="checkpoint steps")
    p.add_argument("--scales", type=float, nargs="+", default=[100.0, 30.0, 10.0, 3.0])
    p.add_argument("--max-side", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    photos = held_out_photos(args.run)
    print(f"{len(photos)} held-out photos of {args.run}", flush=True)
    images = [_fit(load_image(path)[None], args.max_side) for path in photos]
    for step in args.steps:
        rows = similarities(args.run / f"ckpt-{step:06d}.pt", images, args.seed)
        out = {"step": step, **{f"s{s:g}": figures(rows, s) for s in args.scales}}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
