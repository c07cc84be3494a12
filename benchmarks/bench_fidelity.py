"""How far reduced precisions move scores: Spearman and |Δscore| against fp32, SRCC against people.

Usage:
    python benchmarks/bench_fidelity.py [--model NAME|FILE] [--precisions bf16,int8]
        [--photos 200] [--pristine] [--mos-images 2000] [--json FILE]

Every photo is scored by the engine (:func:`qualiclip.engine.score_paths`) in fp32 and in each
precision. Printed per precision: the Spearman correlation of its scores with fp32's over the
photos, the largest and the mean |score - fp32 score|, and on BIQ2021's test split the SRCC of
each precision's scores against the mean opinion scores and its difference from fp32's. The
budget (issue 21): Spearman >= 0.995 over >= 200 photos and SRCC within 0.005 of fp32; each row
says whether it holds.

Photos: the first ``--photos`` of ``$QUALICLIP_SHARED/data/biq2021-test`` (or
``../shared/data/biq2021-test``) and, with ``--pristine``, the pristine photos of
``data/pristine`` besides; the SRCC uses the first ``--mos-images`` of BIQ2021 (all 2,000 by
default). ``--model``: any name or checkpoint ``create_model`` takes (a trained model, for the
budget to mean anything: by default ``qualiclip-open``, shipped in the package);
``random-rn50`` gets random batch-norm statistics as in ``bench_score.py``. int8 is calibrated
for the model first (cached; its own check is printed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MIN_SPEARMAN, MAX_SRCC_DROP = 0.995, 0.005


def _shared() -> Path:
    env = os.environ.get("QUALICLIP_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def _biq2021(limit: int) -> tuple[list[str], np.ndarray]:
    root = _shared() / "data" / "biq2021-test"
    with open(root / "mos.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:limit]
    paths = [str(root / "images" / r["Image Name"]) for r in rows]
    return paths, np.array([float(r["MOS"]) for r in rows])


def _model(name: str) -> Any:
    if name == "random-rn50":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_score import build_model

        return build_model("cpu")
    from qualiclip.model import create_model

    return create_model(name).eval()


def _scores(model: Any, paths: list[str], precision: str, batch_size: int) -> np.ndarray:
    from qualiclip.engine import score_paths

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # emulated bf16
        rows = list(score_paths(model, paths, precision=precision, batch_size=batch_size))
    failed = [r for r in rows if not r.ok]
    if failed:
        raise RuntimeError(f"{failed[0].path}: {failed[0].error}")
    return np.array([r.score for r in rows], dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", default="qualiclip-open",
                   help="name or checkpoint (default: qualiclip-open, the trained model shipped "
                   "in the package)")
    p.add_argument("--precisions", default="bf16,int8")
    p.add_argument("--photos", type=int, default=200, help="BIQ2021 photos for the agreement")
    p.add_argument("--pristine", action="store_true", help="add the pristine photos")
    p.add_argument("--mos-images", type=int, default=2000, help="BIQ2021 photos for the SRCC")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table as JSON")
    args = p.parse_args(argv)

    import torch

    from qualiclip import heap, metrics
    from qualiclip.precision import describe_cpu

    heap.reuse_freed_memory()  # timed as the command scores (QUALICLIP_REUSE_MEMORY=0 refuses it)
    name = args.model
    model = _model(name)
    precisions = [q for q in args.precisions.split(",") if q != "fp32"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {describe_cpu()}; "
          f"model {name}; load average {os.getloadavg()[0]:.2f}")
    if "int8" in precisions:
        from qualiclip.quantize import int8_report

        start = time.perf_counter()
        report = int8_report(model)
        print(f"int8 calibration ({time.perf_counter() - start:.1f} s, {report.weight_bits}-bit "
              f"weights): its own check: {report.describe()}")

    agree_paths, _ = _biq2021(args.photos)
    if args.pristine:
        agree_paths += sorted(str(f) for f in (_shared() / "data" / "pristine").glob("*.png"))
    mos_paths, mos = _biq2021(args.mos_images)
    every = list(dict.fromkeys(agree_paths + mos_paths))
    index = {path: i for i, path in enumerate(every)}
    agree = [index[path] for path in agree_paths]
    rated = [index[path] for path in mos_paths]

    scores, seconds = {}, {}
    for precision in ["fp32", *precisions]:
        start = time.perf_counter()
        scores[precision] = _scores(model, every, precision, args.batch_size)
        seconds[precision] = time.perf_counter() - start
    ref = scores["fp32"]
    srcc_fp32 = metrics.srcc(ref[rated], mos)
    print(f"\n{len(agree)} photos for the agreement ({args.photos} BIQ2021"
          f"{' + pristine' if args.pristine else ''}), {len(rated)} BIQ2021 photos for the SRCC; "
          f"fp32 scores spread (sd) {ref[agree].std():.4f}")
    print(f"{'precision':<10}{'Spearman vs fp32':>17}{'max |d|':>10}{'mean |d|':>10}"
          f"{'SRCC vs MOS':>13}{'d SRCC':>9}{'s':>8}  budget")
    table: list[dict[str, Any]] = []
    for precision in ["fp32", *precisions]:
        s = scores[precision]
        rho = metrics.srcc(s[agree], ref[agree])
        diff = np.abs(s[agree] - ref[agree])
        srcc = metrics.srcc(s[rated], mos)
        holds = rho >= MIN_SPEARMAN and abs(srcc - srcc_fp32) <= MAX_SRCC_DROP
        row = {"precision": precision, "spearman_vs_fp32": rho, "max_abs_diff": diff.max(),
               "mean_abs_diff": diff.mean(), "srcc_vs_mos": srcc, "srcc_change": srcc - srcc_fp32,
               "seconds": seconds[precision], "holds": bool(holds)}
        table.append({k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()})
        verdict = "-" if precision == "fp32" else "holds" if holds else "FAILS"
        print(f"{precision:<10}{rho:>17.4f}{diff.max():>10.2e}{diff.mean():>10.2e}"
              f"{srcc:>13.4f}{srcc - srcc_fp32:>+9.4f}{seconds[precision]:>8.1f}  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "cpu": describe_cpu(),
                                               "photos": len(agree), "mos_images": len(rated),
                                               "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
