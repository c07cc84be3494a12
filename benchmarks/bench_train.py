"""Where a training step's time goes: data wait, degradations, forward/backward, optimizer.

Usage:
    python benchmarks/bench_train.py [--preset tiny|paper] [--steps 20] [--warmup 2]
        [--device cpu|cuda] [--workers N] [--batch-size N] [--init NAME] [--precision P]
        [--pristine FOLDER] [--seed 0]

The step is :func:`qualiclip.train.train_step`'s, taken apart so each phase can be timed (on CUDA
each phase ends with a synchronisation, so a phase's figure is its own):

* **data wait**: ``next()`` on the training DataLoader (decode and crop pairs, in
  ``--workers`` worker processes ahead of the step; with ``--degrade-in loader`` the workers
  also degrade each sample, and the degradations phase is left empty);
* **degradations**: ``degradations.degrade_batch`` on the training device (one random
  composition per image, every level, both crops);
* **forward/backward**: the similarity model under the preset's autocast, the QualiCLIP losses,
  ``backward()``;
* **optimizer**: gradient clipping, AdamW, the scheduler.

Printed: the median and mean of each phase over ``--steps`` timed steps (after ``--warmup``),
its share of the step, and steps per second over the timed steps. The ``paper`` preset starts
from OpenAI's RN50 weights; ``--init random-rn50`` (the default for ``paper`` here) has the same
shapes and speed without the download.

Pristine images: ``--pristine``, else ``$QUALICLIP_SHARED/data/pristine`` or
``../shared/data/pristine``, else the built-in set of ``builtin_photos.py`` (printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from builtin_photos import photo_paths
from qualiclip import degradations
from qualiclip.crops import PristineCropPairs, ResumableSampler, find_images
from qualiclip.losses import qualiclip_losses
from qualiclip.train import SimilarityModel, build_model, make_optimizer, set_train_mode
from qualiclip.train_config import PRESETS

PHASES = ("data wait", "degradations", "forward/backward", "optimizer")


def _pristine(arg: str | None, scratch: Path) -> list[Path]:
    if arg:
        return find_images(arg)
    photos, which = photo_paths(None, scratch)
    print(which, flush=True)
    return photos


def _autocast(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return None


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    cfg = PRESETS[args.preset]
    init = args.init or ("random-rn50" if args.preset == "paper" else cfg.model.init)
    data = dataclasses.replace(
        cfg.data,
        workers=cfg.data.workers if args.workers is None else args.workers,
        batch_size=args.batch_size or cfg.data.batch_size,
    )
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, _ = build_model(dataclasses.replace(cfg.model, init=init), device)
    set_train_mode(model, cfg.model.bn)
    net = SimilarityModel(model)
    optimizer = make_optimizer(model, cfg.optim)
    amp = _autocast(args.precision or cfg.optim.precision, device)
    generator = torch.Generator().manual_seed(args.seed)
    dataset: Any = PristineCropPairs(_pristine(args.pristine, scratch), data.crop_size,
                                     min_overlap=data.min_overlap, seed=args.seed)
    if args.degrade_in == "loader":
        from qualiclip.train import DegradedCropPairs  # not in releases before it existed

        dataset = DegradedCropPairs(dataset, levels=data.levels,
                                    max_distortions=data.max_distortions, seed=args.seed)
    loader = DataLoader(
        dataset, batch_size=data.batch_size, drop_last=True, num_workers=data.workers,
        sampler=ResumableSampler(len(dataset), seed=args.seed),
        pin_memory=device.type == "cuda", persistent_workers=data.workers > 0,
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    times: dict[str, list[float]] = {p: [] for p in PHASES}
    batches = iter(loader)
    total_steps = args.warmup + args.steps
    start_timed = 0.0
    for step in range(total_steps):
        if step == args.warmup:
            start_timed = sync()
        t0 = sync()
        batch = next(batches)
        if "degraded" in batch:  # degraded in the workers: only the copy is left
            crops = batch["degraded"].to(device, non_blocking=True)
        else:
            crops = batch["crops"].to(device, non_blocking=True)
        t1 = sync()
        x = crops if "degraded" in batch else degradations.degrade_batch(
            crops, generator, levels=data.levels, max_distortions=data.max_distortions)
        b, n_lv = x.shape[:2]
        t2 = sync()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            sims = net(x.flatten(0, 2))
        sims = sims.float().view(b, n_lv, 2, -1, 2)
        terms = qualiclip_losses(sims[..., 0], sims[..., 1], **asdict(cfg.loss))
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        t3 = sync()
        clip = cfg.optim.grad_clip
        nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        optimizer.step()
        t4 = sync()
        if step >= args.warmup:
            for name, (a, z) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4)), strict=True):
                times[name].append(z - a)
    elapsed = sync() - start_timed
    return {"times": times, "elapsed": elapsed, "init": init, "data": data, "amp": amp}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="pristine images per step")
    p.add_argument("--init", default=None, help="start point (paper: random-rn50 by default)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None)
    p.add_argument("--pristine", default=None, help="folder of pristine images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--degrade-in", choices=("step", "loader"), default="step",
                   help="step: degrade_batch in the step (the default of training); loader: "
                   "each sample in the DataLoader workers (data.degrade_in = 'loader')")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the phases' times and the ratios as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    with tempfile.TemporaryDirectory() as scratch:  # the built-in photos, when used
        out = run(args, Path(scratch))
    data, times = out["data"], out["times"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device} "
          f"({_device_name(args.device)}), load average {load:.2f}")
    print(f"preset {args.preset} (init {out['init']}): {data.batch_size} images x "
          f"{len(data.levels)} levels x 2 crops of {data.crop_size} px per step, "
          f"{data.workers} DataLoader workers, degradations in the {args.degrade_in}, "
          f"autocast {out['amp'] or 'off'}; "
          f"{args.steps} timed steps after {args.warmup}")
    step_total = sum(sum(v) for v in times.values())
    print(f"{'phase':<18}{'median ms':>11}{'mean ms':>10}{'share':>8}")
    for name in PHASES:
        v = times[name]
        print(f"{name:<18}{1000 * statistics.median(v):>11.1f}{1000 * statistics.fmean(v):>10.1f}"
              f"{sum(v) / step_total:>8.0%}")
    steps_s = args.steps / out["elapsed"]
    print(f"{'step':<18}{1000 * out['elapsed'] / args.steps:>21.1f} ms mean: {steps_s:.3f} steps/s")
    fb = statistics.median(times["forward/backward"])
    med = statistics.median([sum(t) for t in zip(*times.values(), strict=True)])
    print(f"median step / median forward+backward: {med / fb:.2f}x")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "preset": args.preset, "device": _device_name(args.device), "torch": torch.__version__,
            "degrade_in": args.degrade_in, "workers": data.workers, "steps": args.steps,
            "median_ms": {n: 1000 * statistics.median(times[n]) for n in PHASES},
            "steps_per_s": steps_s, "median_step_over_forward_backward": med / fb,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
