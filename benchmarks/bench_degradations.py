"""Time every distortion type: milliseconds per 224x224 crop.

Usage:
    python benchmarks/bench_degradations.py [--batch 32] [--repeats 5] [--threads N] [--device cpu]
        [--types jpeg2000,jpeg] [--serial]

Each type runs on a batch of crops cut from real photos (scikit-image's sample images) with the
levels 1..5 spread over the batch, ``--repeats`` times after one warm-up; the table shows the
median time divided by the batch size. Targets (issue 3): median over types <= 5 ms, max <= 50 ms.

``--serial`` adds reference columns in the same run: ``jpeg2000`` coded in this process (as
before worker processes, ``set_codec_processes(0)``), and checks that both give identical pixels.
The ``cpu`` columns show the CPU time of the calling process: what is left on the critical path
of a training step when the codec runs in workers.
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
               device: torch.device) -> tuple[float, float, torch.Tensor]:
    """Median wall seconds of one batch, median CPU seconds of this process, the last output."""
    g = torch.Generator().manual_seed(0)
    times, cpu = [], []
    y = x
    for r in range(repeats + 1):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        params = sample_params(name, x.shape[0], g)
        y = apply_distortion(x, name, levels, params=params)
        _sync(device)
        if r:  # the first run warms caches (kernels, worker pools, scipy import)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu), y


Row = tuple[float, float, float | None, float | None, bool | None]


def bench(batch: int, size: int, repeats: int, device: torch.device,
          types: tuple[str, ...] = DISTORTION_TYPES, serial: bool = False) -> dict[str, Row]:
    """Milliseconds per crop for each type (median over repeats).

    Returns, per type: wall and this process's CPU ms per crop by default; the same two in
    process (``serial`` and the type is ``jpeg2000``, else None); whether the outputs are equal.
    """
    x = _crops(batch, size).to(device)
    levels = torch.arange(batch) % 5 + 1
    results: dict[str, Row] = {}
    for name in types:
        sec, cpu, y = _time_type(x, name, levels, repeats, device)
        ref_ms, ref_cpu, same = None, None, None
        if serial and name == "jpeg2000":
            set_codec_processes(0)
            try:
                ref, rcpu, y_ref = _time_type(x, name, levels, repeats, device)
            finally:
                set_codec_processes(None)
            ref_ms, ref_cpu = ref * 1000 / batch, rcpu * 1000 / batch
            same = bool(torch.equal(y, y_ref))
        results[name] = (sec * 1000 / batch, cpu * 1000 / batch, ref_ms, ref_cpu, same)
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
    print("ms/crop: wall time; cpu: CPU time of this process (not of codec workers), per crop")
    head = f"{'type':28s} {'ms/crop':>8s} {'cpu':>7s}"
    print(head + (f" {'in-process':>10s} {'cpu':>7s} {'identical':>9s}" if args.serial else ""))
    for name, (ms, cpu, ref_ms, ref_cpu, same) in res.items():
        extra = ""
        if args.serial and ref_ms is not None and ref_cpu is not None:
            extra = f" {ref_ms:10.2f} {ref_cpu:7.2f} {str(same):>9s}"
        print(f"{name:28s} {ms:8.2f} {cpu:7.2f}{extra}")
    times = {k: v[0] for k, v in res.items()}
    med, worst = statistics.median(times.values()), max(times.values())
    worst_name = max(times, key=lambda k: times[k])
    print(f"median over types: {med:.2f} ms; max: {worst:.2f} ms ({worst_name})")
    print(f"{'PASS' if med <= MEDIAN_TARGET_MS else 'FAIL'} median <= {MEDIAN_TARGET_MS} ms")
    print(f"{'PASS' if worst <= MAX_TARGET_MS else 'FAIL'} max <= {MAX_TARGET_MS} ms")
    if any(row[4] is False for row in res.values()):
        print("FAIL: worker processes and in-process coding differ")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
