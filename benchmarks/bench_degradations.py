"""Time every distortion type: milliseconds per 224x224 crop.

Usage:
    python benchmarks/bench_degradations.py [--batch 32] [--repeats 5] [--threads N] [--device cpu]
        [--types jpeg2000,jpeg] [--serial]

Each type runs on a batch of crops cut from real photos (scikit-image's sample images) with the
levels 1..5 spread over the batch, ``--repeats`` times after one warm-up; the table shows the
median time divided by the batch size. Targets (issue 3): median over types <= 5 ms, max <= 50 ms.

``--serial`` adds a reference column in the same run: ``jpeg2000`` coded in this process (as
before worker processes, ``set_codec_processes(0)``), and checks that both give identical pixels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from qualiclip.degradations import (
    DISTORTION_TYPES,
    apply_distortion,
    sample_params,
    set_codec_processes,
)

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


def _time_type(x: torch.Tensor, name: str, levels: torch.Tensor, repeats: int,
               device: torch.device) -> tuple[float, torch.Tensor]:
    """Median seconds of one batch, and the output of the last run."""
    g = torch.Generator().manual_seed(0)
    times = []
    y = x
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        params = sample_params(name, x.shape[0], g)
        y = apply_distortion(x, name, levels, params=params)
        _sync(device)
        if r:  # the first run warms caches (kernels, worker pools, scipy import)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), y


def bench(batch: int, size: int, repeats: int, device: torch.device,
          types: tuple[str, ...] = DISTORTION_TYPES,
          serial: bool = False) -> dict[str, tuple[float, float | None, bool | None]]:
    """Milliseconds per crop for each type (median over repeats).

    Returns, per type: the default time, the in-process reference time (``serial`` and the
    type is ``jpeg2000``, else None), and whether the two outputs are identical.
    """
    x = _crops(batch, size).to(device)
    levels = torch.arange(batch) % 5 + 1
    results: dict[str, tuple[float, float | None, bool | None]] = {}
    for name in types:
        sec, y = _time_type(x, name, levels, repeats, device)
        ref_ms, same = None, None
        if serial and name == "jpeg2000":
            set_codec_processes(0)
            try:
                ref, y_ref = _time_type(x, name, levels, repeats, device)
            finally:
                set_codec_processes(None)
            ref_ms, same = ref * 1000 / batch, bool(torch.equal(y, y_ref))
        results[name] = (sec * 1000 / batch, ref_ms, same)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--types", default=",".join(DISTORTION_TYPES),
                    help="comma-separated types to time (default: all 24)")
    ap.add_argument("--serial", action="store_true",
                    help="also time jpeg2000 in this process, the reference, in the same run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    types = tuple(t for t in args.types.split(",") if t)
    unknown = [t for t in types if t not in DISTORTION_TYPES]
    if unknown:
        ap.error(f"unknown types {unknown}; valid: {', '.join(DISTORTION_TYPES)}")
    device = torch.device(args.device)
    res = bench(args.batch, args.size, args.repeats, device, types, args.serial)
    print(f"device {device}, torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, "
          f"batch {args.batch} crops of {args.size}x{args.size}, levels 1..5 spread over the "
          f"batch, median of {args.repeats}")
    print(f"{'type':28s} {'ms/crop':>8s}" + (f" {'in-process':>10s} {'identical':>9s}"
                                            if args.serial else ""))
    for name, (ms, ref_ms, same) in res.items():
        extra = ""
        if args.serial:
            extra = f" {ref_ms:10.2f} {str(same):>9s}" if ref_ms is not None else f" {'':10s}"
        print(f"{name:28s} {ms:8.2f}{extra}")
    times = {k: v[0] for k, v in res.items()}
    med, worst = statistics.median(times.values()), max(times.values())
    worst_name = max(times, key=lambda k: times[k])
    print(f"median over types: {med:.2f} ms; max: {worst:.2f} ms ({worst_name})")
    print(f"{'PASS' if med <= MEDIAN_TARGET_MS else 'FAIL'} median <= {MEDIAN_TARGET_MS} ms")
    print(f"{'PASS' if worst <= MAX_TARGET_MS else 'FAIL'} max <= {MAX_TARGET_MS} ms")
    if any(same is False for _, _, same in res.values()):
        print("FAIL: worker processes and in-process coding differ")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
