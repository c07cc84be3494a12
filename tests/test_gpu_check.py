"""scripts/gpu_check.sh without CUDA: a dry run that starts, plans every step and skips cleanly.

The real run needs a GPU machine (docs/performance.md, "Checking the GPU path"); here the test
makes sure the one command a lent machine is given still starts, still names tests and
benchmarks that exist, and writes its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="with CUDA the script runs for real"
)


@pytest.mark.slow
def test_dry_run_plans_every_step_and_skips_them(tmp_path: Path) -> None:
    out = tmp_path / "report" / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable  # the interpreter running the tests has qualiclip's needs
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run" in proc.stdout and "Traceback" not in proc.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["machine"]["cuda"] is False
    steps = {s["name"]: s for s in report["steps"]}
    assert set(steps) == {"gpu path tests", "cuda tests", "cpu/cuda agreement", "score e2e eager",
                          "score e2e compiled", "train step split"}
    assert all(s["status"] == "skipped" and s["extra"]["why"] for s in steps.values())
    assert sum(s["limit_s"] for s in steps.values()) <= report["budget_s"] <= 480
    compiled = steps["score e2e compiled"]["command"]
    assert "--compile" in compiled and "--device" in compiled
    for step in steps.values():  # every test and script it names exists
        for arg in step["command"]:
            if arg.startswith(("tests/", "benchmarks/")):
                file, _, test = arg.partition("::")
                assert (REPO / file).is_file(), arg
                assert not test or f"def {test}(" in (REPO / file).read_text(), arg
