"""QualityLoss: peak memory of a backward pass, and a 20-step toy restoration.

Usage:
    python benchmarks/bench_quality_loss.py memory [--model random-rn50] [--sizes 512 1024]
    python benchmarks/bench_quality_loss.py restore [--model random-tiny] [--steps 20]
        [--sigma 0.1] [--lr 0.01] [--crop 256] [--fidelity 0]

``memory``: for each size, a fresh process builds the loss (RN50-sized random weights by
default: memory does not depend on the weights' values), then scores one image of that size
without gradients, then computes the loss and its gradient with respect to the pixels. Printed:
the resident set once loaded (``/proc/self/statm``), and the resident-set peak
(``getrusage``'s ``ru_maxrss``) after loading (building the model peaks higher than it stays),
after the inference pass and after the backward pass, with the wall time of each pass.

``restore``: scikit-image's astronaut photo (centre crop ``--crop``), Gaussian noise of
standard deviation ``--sigma`` added, then ``--steps`` Adam steps on the pixels minimising
``QualityLoss`` (plus ``--fidelity`` times the mean squared distance to the noisy input, the
usual data term of a restoration objective). Prints each step's QualiCLIP score and PSNR
against the clean photo: the score rises; whether the PSNR does depends on how well the model
knows noise (a random model does not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure(model_name: str, size: int) -> dict[str, float]:
    from qualiclip.quality_loss import QualityLoss

    loss = QualityLoss(model_name, device="cpu", precision="fp32")
    out = {"loaded_mib": _peak_mib(), "resident_mib": _resident_mib()}
    x = torch.rand(1, 3, size, size)
    started = time.perf_counter()
    with torch.no_grad():
        loss(x)
    out["inference_s"] = time.perf_counter() - started
    out["inference_mib"] = _peak_mib()
    x.requires_grad_(True)
    started = time.perf_counter()
    loss(x).backward()
    out["backward_s"] = time.perf_counter() - started
    out["backward_mib"] = _peak_mib()
    return out


def memory(args: argparse.Namespace) -> None:
    print(f"model {args.model}, batch 1, fp32, CPU; resident set after loading, then its peak "
          "(MiB) after loading, after scoring and after the loss's backward pass")
    print(f"{'size':>10} {'resident':>8} {'loaded':>8} {'+ score':>8} {'+ backward':>10} "
          f"{'score s':>8} {'fwd+bwd s':>9}")
    for size in args.sizes:
        code = (f"import json, sys; sys.argv = ['x']; import bench_quality_loss as b; "
                f"print(json.dumps(b._measure({args.model!r}, {size})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=sys.path[0])
        if proc.returncode != 0:
            sys.exit(f"the {size}x{size} measurement failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{size:>5}x{size:<4} {r['resident_mib']:8.0f} {r['loaded_mib']:8.0f} "
              f"{r['inference_mib']:8.0f} "
              f"{r['backward_mib']:10.0f} {r['inference_s']:8.2f} {r['backward_s']:9.2f}")


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = torch.mean((x.clamp(0, 1) - ref) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def restore(args: argparse.Namespace) -> None:
    from skimage import data

    from qualiclip.quality_loss import QualityLoss

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    top = (photo.shape[1] - args.crop) // 2
    left = (photo.shape[2] - args.crop) // 2
    clean = photo[None, :, top : top + args.crop, left : left + args.crop].contiguous()
    g = torch.Generator().manual_seed(0)
    noisy = (clean + args.sigma * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    loss_fn = QualityLoss(args.model, device="cpu", precision="fp32")
    x = noisy.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=args.lr)
    with torch.no_grad():
        print(f"model {args.model}; astronaut {args.crop}x{args.crop}, noise sigma {args.sigma}")
        print(f"clean photo: score {1 - loss_fn(clean).item():.4f}")
    started = time.perf_counter()
    for step in range(args.steps + 1):
        image = x.clamp(0, 1)
        quality = loss_fn(image)
        total = quality + args.fidelity * torch.mean((image - noisy) ** 2)
        print(f"step {step:2d}: score {1 - quality.item():.4f}  PSNR {_psnr(x, clean):.2f} dB",
              flush=True)
        if step == args.steps:
            break
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    print(f"{args.steps} steps in {time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--model", default="random-rn50")
    m.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    r = sub.add_parser("restore")
    r.add_argument("--model", default="random-tiny")
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--sigma", type=float, default=0.1)
    r.add_argument("--lr", type=float, default=0.01)
    r.add_argument("--crop", type=int, default=256)
    r.add_argument("--fidelity", type=float, default=0.0)
    args = parser.parse_args()
    memory(args) if args.what == "memory" else restore(args)


if __name__ == "__main__":
    main()
