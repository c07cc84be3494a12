"""Time every distortion type: milliseconds per 224x224 crop.

Usage:
    python benchmarks/bench_degradations.py [--batch 32] [--repeats 5] [--threads N] [--device cpu]

Each type runs on a batch of crops cut from real photos (scikit-image's sample images) with the
levels 1..5 spread over the batch, ``--repeats`` times after one warm-up; the table shows the
median time divided by the batch size. Targets (issue 3): median over types <= 5 ms, max <= 50 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qualiclip.degradations import DISTORTION_TYPES, apply_distortion, sample_params

MEDIAN_TARGET_MS, MAX_TARGET_MS = 5.0, 50.0


def _crops(batch: int, size: int) -> torch.Tensor:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(batch):
        img = torch.from_numpy(photos[i % len(photos)]).permute(2, 0, 1).float() / 255
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - size + 1, (1,), generator=g))
        left = int(torch.randint(0, w - size + 1, (1,), generator=g))
        out.append(img[:, top : top + size, left : left + size])
    return torch.stack(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(batch: int, size: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Return milliseconds per crop for each type (median over repeats)."""
    x = _crops(batch, size).to(device)
    levels = torch.arange(batch) % 5 + 1
    g = torch.Generator().manual_seed(0)
    results = {}
    for name in DISTORTION_TYPES:
        times = []
        for r in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            params = sample_params(name, batch, g)
            apply_distortion(x, name, levels, params=params)
            _sync(device)
            if r:  # the first run warms caches (kernels, thread pool, scipy import)
                times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times) * 1000 / batch
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    res = bench(args.batch, args.size, args.repeats, device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch} crops of "
          f"{args.size}x{args.size}, levels 1..5 spread over the batch, median of {args.repeats}")
    print(f"{'type':28s} {'ms/crop':>8s}")
    for name, ms in res.items():
        print(f"{name:28s} {ms:8.2f}")
    med, worst = statistics.median(res.values()), max(res.values())
    worst_name = max(res, key=lambda k: res[k])
    print(f"median over types: {med:.2f} ms; max: {worst:.2f} ms ({worst_name})")
    print(f"{'PASS' if med <= MEDIAN_TARGET_MS else 'FAIL'} median <= {MEDIAN_TARGET_MS} ms")
    print(f"{'PASS' if worst <= MAX_TARGET_MS else 'FAIL'} max <= {MAX_TARGET_MS} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
