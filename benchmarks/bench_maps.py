"""Do quality maps point at the damage, and how long does a map take?

Usage:
    python benchmarks/bench_maps.py [--model CKPT | --train-steps 200] [--photos FOLDER]
        [--count 10] [--blur 4] [--noise 25] [--window 224] [--stride 112]
        [--timing-model random-rn50]

1. **Meaning.** A model trained by ``qualiclip train --preset tiny`` (``--model`` gives its
   ``model.pth``; otherwise a run of ``--train-steps`` steps is made on the pristine photos in
   a temporary folder). For each of ``--count`` photos, taken evenly from ``--photos FOLDER``
   (default: ``$QUALICLIP_SHARED/data/pristine`` or ``../shared/data/pristine``, else the
   built-in set of ``builtin_photos.py``), the left half is damaged (Gaussian blur of radius
   ``--blur``, or Gaussian noise of standard deviation ``--noise`` grey levels) and both maps
   are computed. Printed per kind and damage: the mean map value over the left and right halves
   (averaged over photos), how many photos have the damaged half lower, and the same for the
   undamaged photos (the control: halves of a pristine photo differ too), with the change of
   the left-minus-right difference from the untouched photo's.
2. **Time to first result.** A 1024x768 JPEG (a pristine photo scaled up) sent to the HTTP
   service (in-process, after its start-up warm-up): ``POST /score`` and ``POST /map`` (dense),
   first request and the best of three; and ``quality_map`` of both kinds called directly. With
   ``--timing-model`` (default ``random-rn50``: QualiCLIP's RN50 size with random weights; time
   does not depend on the weights) and with the trained tiny model.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from builtin_photos import photo_paths
from qualiclip.maps import MAP_KINDS, half_means, quality_map
from qualiclip.model import QualiCLIP, create_model


def train_tiny(steps: int, photos: list[Path], out: Path) -> Path:
    listing = out / "pristine.txt"  # a list file: the chosen folder's photos, wherever they are
    listing.write_text("".join(f"{p.resolve()}\n" for p in photos))
    cmd = [sys.executable, "-m", "qualiclip.cli", "train", "--preset", "tiny", "--pristine",
           str(listing), "--out", str(out / "run"), "--max-steps", str(steps), "--no-progress"]
    print("training:", " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"trained {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return out / "run" / "model.pth"


def damaged(pixels: np.ndarray, how: str, blur: float, noise: float, seed: int) -> np.ndarray:
    """``pixels`` with the left half blurred or noised (the blur sees the whole image, so the
    seam is not an edge of its own)."""
    out = pixels.copy()
    half = pixels.shape[1] // 2
    if how == "blur":
        soft = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(blur)))
        out[:, :half] = soft[:, :half]
    else:
        rng = np.random.default_rng(seed)
        grain = rng.normal(0.0, noise, out[:, :half].shape)
        out[:, :half] = np.clip(out[:, :half] + grain, 0, 255).astype(np.uint8)
    return out


def meaning(model: QualiCLIP, photos: list[Path], args: argparse.Namespace) -> None:
    print(f"\n== left half damaged, {len(photos)} photos "
          f"(window {args.window}, stride {args.stride}) ==")
    print("left/right: mean map value over the left (damaged) and right (sharp) halves, averaged "
          "over photos;\nlower: photos whose left half is lower; shift: the left-minus-right "
          "difference minus\nthat of the untouched photo (photos differ between halves too), and "
          "how many photos it is negative for")
    print(f"{'kind':8} {'left half':12} {'left':>7} {'right':>7} {'diff':>8} {'lower':>8} "
          f"{'shift':>8} {'neg':>8}")
    for kind in MAP_KINDS:
        control: list[float] = []
        for how in ("none", "blur", "noise"):
            lefts, rights = [], []
            for i, path in enumerate(photos):
                with Image.open(path) as im:
                    pixels = np.asarray(im.convert("RGB"))
                image = pixels if how == "none" else damaged(pixels, how, args.blur, args.noise,
                                                             seed=i)
                qmap = quality_map(model, image, kind, window=args.window, stride=args.stride)
                left, right = half_means(qmap)
                lefts.append(left)
                rights.append(right)
            lo, hi = np.array(lefts), np.array(rights)
            diff = lo - hi
            if how == "none":
                control = list(diff)
            shift = diff - np.array(control)
            label = {"none": "untouched", "blur": f"blur r={args.blur:g}",
                     "noise": f"noise sd={args.noise:g}"}[how]
            n = len(photos)
            print(f"{kind:8} {label:12} {lo.mean():7.4f} {hi.mean():7.4f} {diff.mean():+8.4f} "
                  f"{int((lo < hi).sum()):>3} of {n:<2} {shift.mean():+8.4f} "
                  f"{int((shift < 0).sum()):>3} of {n:<2}", flush=True)


def photo_1024x768(photos: list[Path]) -> bytes:
    with Image.open(photos[0]) as im:
        big = im.convert("RGB").resize((1024, 768), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def timing(name: str, model: QualiCLIP, jpeg: bytes) -> None:
    from starlette.testclient import TestClient

    from qualiclip import serve

    print(f"\n== time to first result, 1024x768 JPEG, {name}, "
          f"{torch.get_num_threads()} threads ==")
    # The service answers for the localhost names only (its default --allowed-host).
    with TestClient(serve.create_app(model), base_url="http://localhost") as client:  # warms up
        for route in ("/score", "/map"):
            times = []
            for _ in range(3):
                started = time.perf_counter()
                r = client.post(route, files={"files": ("photo.jpg", jpeg, "image/jpeg")})
                times.append(time.perf_counter() - started)
                assert r.status_code == 200, r.text
            print(f"HTTP POST {route:6}: first {times[0]:.2f} s, best {min(times):.2f} s",
                  flush=True)
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    for kind in MAP_KINDS:
        times = []
        for _ in range(2):
            started = time.perf_counter()
            qmap = quality_map(model, pixels, kind)
            times.append(time.perf_counter() - started)
        print(f"quality_map {kind:7}: {min(times):.2f} s (grid {qmap.grid[0]}x{qmap.grid[1]})",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model.pth of a tiny-preset training run")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--photos", metavar="FOLDER", default=None,
                        help="photos to damage and to train on (default: ../shared's pristine "
                        "photos, else a built-in set)")
    parser.add_argument("--count", type=int, default=10, help="photos to damage (default 10)")
    parser.add_argument("--blur", type=float, default=4.0)
    parser.add_argument("--noise", type=float, default=25.0)
    parser.add_argument("--window", type=int, default=224)
    parser.add_argument("--stride", type=int, default=112)
    parser.add_argument("--timing-model", default="random-rn50")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()

    if args.count < 1:
        parser.error("--count must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        photos, which = photo_paths(args.photos, Path(tmp) / "photos")
        print(which, flush=True)
        step = max(1, len(photos) // args.count)
        chosen = photos[::step][: args.count]
        path = (Path(args.model) if args.model
                else train_tiny(args.train_steps, photos, Path(tmp)))
        trained = create_model(str(path)).eval()
        meaning(trained, chosen, args)
        if not args.no_timing:
            jpeg = photo_1024x768(chosen)
            timing(f"trained tiny ({path})", trained, jpeg)
            timing(args.timing_model, create_model(args.timing_model).eval(), jpeg)


if __name__ == "__main__":
    main()
