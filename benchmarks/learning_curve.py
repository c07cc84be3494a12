"""A training run's learning curve: held-out level ordering and human-rated SRCC per checkpoint.

For each ``ckpt-NNNNNN.pt`` of a run folder (``qualiclip train --out``): the level-ordering
accuracy of the run's own validation at that step (``validation.json``, held-out pristine
photos, what settings are chosen on) and the SRCC / PLCC, with bootstrap 95% intervals, of the
checkpoint's scores against a human-rated dataset (only measured, never trained or chosen on).
Results are appended to a JSON-lines file as they come, so an interrupted run keeps them and a
second run skips the checkpoints already measured.

Example::

    python benchmarks/learning_curve.py runs/qualiclip-open --dataset biq2021 \\
        --root ../shared/data/biq2021-test --limit 500 --every 1000 -o runs/open-curve.jsonl
    python benchmarks/learning_curve.py runs/qualiclip-open --dataset biq2021 \\
        --root ../shared/data/biq2021-test --limit 400 --every 500 --logit-scale 10 \\
        -o runs/open-curve-400-s10.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qualiclip.checkpoints import checkpoint_paths, model_from_checkpoint
from qualiclip.datasets import load_dataset
from qualiclip.engine import score_paths
from qualiclip.metrics import compute_metrics


def measure(
    ckpt: Path, items: list[tuple[Path, float]], batch_size: int, logit_scale: float
) -> dict[str, float]:
    """SRCC/PLCC (with intervals) of one checkpoint's scores on ``items``."""
    model = model_from_checkpoint(ckpt)
    model.logit_scale = logit_scale
    scores = {r.path: r.score for r in score_paths(model, [str(p) for p, _ in items],
                                                     batch_size=batch_size)}
    pairs = [(scores[str(p)], mos) for p, mos in items if scores.get(str(p)) is not None]
    pred, mos = np.array([p for p, _ in pairs]), np.array([m for _, m in pairs])
    m = compute_metrics(pred, mos, bootstrap=1000)
    return {
        "n": m.n, "srcc": m.srcc, "srcc_ci": list(m.srcc_ci or ()), "plcc": m.plcc,
        "plcc_ci": list(m.plcc_ci or ()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a training run folder")
    p.add_argument("--dataset", default="biq2021", help="a dataset name or CSV (as eval takes)")
    p.add_argument("--root", help="the dataset folder")
    p.add_argument("--limit", type=int, default=0, help="the first N rated images (0: all)")
    p.add_argument("--every", type=int, default=1, help="only steps that are multiples of this")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--logit-scale", type=float, default=100.0,
                   help="softmax scale of the score (100: the authors'; qualiclip-open: 10)")
    p.add_argument("-o", "--output", type=Path, required=True, help="JSON-lines results")
    args = p.parse_args(argv)

    items = list(load_dataset(args.dataset, args.root).head(args.limit or None).items)
    val_path = args.run / "validation.json"
    validation = json.loads(val_path.read_text()) if val_path.is_file() else []
    levels = {v["step"]: v["level_accuracy"] for v in validation}
    done = set()
    if args.output.is_file():
        done = {json.loads(line)["step"] for line in args.output.read_text().splitlines() if line}
    torch.manual_seed(0)
    for ckpt in checkpoint_paths(args.run):
        step = int(ckpt.stem.split("-")[1])
        if step % args.every or step in done:
            continue
        start = time.perf_counter()
        measured = measure(ckpt, items, args.batch_size, args.logit_scale)
        row = {"step": step, "logit_scale": args.logit_scale,
               "level_accuracy": levels.get(step), **measured}
        row["seconds"] = round(time.perf_counter() - start, 1)
        with args.output.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        ci = row["srcc_ci"]
        print(f"step {step:6d}  level ordering {row['level_accuracy']}  SRCC {row['srcc']:.3f} "
              f"[{ci[0]:.3f}, {ci[1]:.3f}]  PLCC {row['plcc']:.3f}  (n={row['n']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
