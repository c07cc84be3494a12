"""Run every CUDA check of qualiclip within a time budget and write one JSON report.

Run it through ``scripts/gpu_check.sh`` (which installs carried wheels and sets the paths); see
``docs/performance.md`` ("Checking the GPU path") for how a lent GPU machine is prepared.

On a machine with CUDA, in this order, each step under its own time limit and all of them under
``--budget`` seconds (default 480: 8 minutes):

1. ``gpu path tests`` and ``cuda tests``: every test that needs CUDA (``tests/test_gpu_path.py``
   whole, the CUDA tests of ``tests/test_degradations.py`` and ``tests/test_maps.py``);
2. ``cpu/cuda agreement``: the tests that compare a CUDA result with the CPU's (degradations for
   the same seed, quality maps), as a step of their own so the report names them;
3. ``score e2e eager`` and ``score e2e compiled``: ``benchmarks/bench_score.py --device cuda``
   on 1024x768 JPEGs, with the reference loop: eager in fp32, bf16 and fp16 with the compute and
   decode ceilings, then fp16 ``--compile``; each with ``--decode cpu`` and ``--decode gpu``
   (nvJPEG);
4. ``train step split``: ``benchmarks/bench_train.py --device cuda --preset paper``, the step
   taken apart (data wait, degradations, forward/backward, optimizer).

Without CUDA it is a dry run: it says what it would run, marks every step skipped, writes the
report and exits 0. With CUDA it exits 1 when a step failed or ran out of time.

The report (``--out``, default ``$OUT/gpu_check.json`` where ``$OUT`` is set, as on the lent
machine, else ``.gpu/gpu_check.json``, ignored by git): the machine (GPU name, torch, CUDA),
each step's command, status, seconds, exit status, the benchmarks' own JSON results and the tail
of its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: float
    json_out: str | None = None  # where the step writes its own JSON result
    status: str = "pending"
    seconds: float = 0.0
    exit_status: int | None = None
    result: Any = None
    output_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _plan(py: str, work: Path, images: int) -> list[Step]:
    """The steps, most needed first; each limit is a cap (a step that ends early leaves its time
    to the others), and the limits add up to under the default budget."""
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    workers = str(min(14, os.cpu_count() or 2))
    score = [py, "benchmarks/bench_score.py", "--device", "cuda", "--images", str(images),
             "--batch-size", "32", "--workers", workers, "--repeats", "2", "--no-memory"]
    eager, compiled = str(work / "score_eager.json"), str(work / "score_compiled.json")
    train_json = str(work / "train.json")
    return [
        Step("gpu path tests", [*pytest, "tests/test_gpu_path.py"], 60),
        Step("cuda tests", [*pytest, "tests/test_degradations.py", "tests/test_maps.py", "-k",
                            "cuda and not matches_cpu and not maps_agree"], 45),
        Step("cpu/cuda agreement",
             [*pytest, "tests/test_degradations.py::test_cuda_matches_cpu_for_the_same_seed",
              "tests/test_maps.py::test_cpu_and_cuda_maps_agree"], 35),
        # Eager and compiled apart, so that a compile that outruns its limit leaves the eager
        # figures (each benchmark writes its JSON only at its end).
        Step("score e2e eager", [*score, "--json", eager], 110, json_out=eager),
        Step("score e2e compiled", [*score, "--precisions", "fp16", "--compile", "--no-ceilings",
                                    "--json", compiled], 150, json_out=compiled),
        Step("train step split",
             [py, "benchmarks/bench_train.py", "--device", "cuda", "--preset", "paper",
              "--steps", "10", "--warmup", "2", "--workers", workers, "--json", train_json], 70,
             json_out=train_json),
    ]


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = bool(torch.cuda.is_available())
        if info["cuda"]:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", cuda_runtime=torch.version.cuda,
                        gpus=torch.cuda.device_count())
    except Exception as exc:  # noqa: BLE001 - the report says why there is no torch
        info.update(torch=None, cuda=False, torch_error=f"{type(exc).__name__}: {exc}")
    for module in ("torchvision", "onnxruntime", "ftfy"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - absent: recorded as such
            info[module] = None
    return info


def _run(step: Step, remaining: float, env: dict[str, str]) -> None:
    limit = max(1.0, min(step.limit_s, remaining))
    start = time.monotonic()
    try:
        proc = subprocess.run(step.command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=limit, check=False)
        step.exit_status = proc.returncode
        step.status = "passed" if proc.returncode == 0 else "failed"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        step.status = "timeout"
        raw = (exc.stdout or b"") + (exc.stderr or b"")
        output = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        step.extra["limit_s"] = limit
    step.seconds = round(time.monotonic() - start, 1)
    step.output_tail = output[-4000:]
    if step.json_out and Path(step.json_out).is_file():
        step.result = json.loads(Path(step.json_out).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", default=None,
                   help="the JSON report (default: $OUT/gpu_check.json, else .gpu/gpu_check.json)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps (480)")
    p.add_argument("--images", type=int, default=512, help="photos for the scoring benchmark")
    p.add_argument("--dry-run", action="store_true", help="plan only, as without CUDA")
    args = p.parse_args(argv)
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / ".gpu"
    out = Path(args.out) if args.out else folder / "gpu_check.json"
    work = out.parent / "gpu_check_work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    machine = _machine()
    steps = _plan(sys.executable, work, args.images)
    dry = args.dry_run or not machine.get("cuda")
    why = "--dry-run" if args.dry_run else "no CUDA device: torch.cuda.is_available() is False"
    print(f"gpu_check: {machine.get('gpu') or 'no GPU'}; torch {machine.get('torch')}; "
          f"budget {args.budget:.0f} s" + (f"; dry run ({why})" if dry else ""), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for step in steps:
        remaining = args.budget - (time.monotonic() - started)
        if dry or remaining < 5:
            step.status = "skipped"
            step.extra["why"] = why if dry else "the budget is spent"
            print(f"  would run [{step.name}] (limit {step.limit_s:.0f} s): "
                  f"{shlex.join(step.command)}", flush=True)
            continue
        print(f"  running [{step.name}] ...", flush=True)
        _run(step, remaining, env)
        print(f"  [{step.name}] {step.status} in {step.seconds:.0f} s", flush=True)
    report = {
        "machine": machine, "dry_run": dry, "budget_s": args.budget,
        "total_s": round(time.monotonic() - started, 1),
        "steps": [asdict(s) for s in steps],
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    failed = [s.name for s in steps if s.status in ("failed", "timeout")]
    print(f"gpu_check: report {out}; " + (f"failed: {', '.join(failed)}" if failed
                                          else "skipped (dry run)" if dry else "all passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
