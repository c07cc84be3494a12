"""scripts/setup.sh: which torch it installs, checked through its --dry-run (nothing installed).

The default takes torch as pip resolves it (this project's machines: the local CPU wheel; plain
PyPI: the CUDA build); ``--cpu`` or ``QUALICLIP_TORCH=cpu`` installs the pinned torch from
PyTorch's CPU-only wheel index first, so the CUDA packages never come.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _setup(*args: str, torch_choice: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "QUALICLIP_TORCH"}
    if torch_choice is not None:
        env["QUALICLIP_TORCH"] = torch_choice
    return subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--dry-run", *args],
                          capture_output=True, text=True, env=env, timeout=60, cwd=REPO)


def _pinned_torch() -> str:
    text = (REPO / "constraints.txt").read_text()
    match = re.search(r"^torch==\S+", text, flags=re.MULTILINE)
    assert match, "constraints.txt pins torch"
    return match.group(0)


def test_default_installs_with_the_constraints_and_no_other_index() -> None:
    proc = _setup()
    assert proc.returncode == 0, proc.stderr
    assert "-c constraints.txt" in proc.stdout
    assert "-e .[dev,eval,serve,ray,onnx,metric]" in proc.stdout
    assert CPU_INDEX not in proc.stdout


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cpu_choice_installs_the_pinned_torch_from_the_cpu_index_first(how: str) -> None:
    proc = _setup("--cpu", "serve") if how == "flag" else _setup("serve", torch_choice="cpu")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "pip install" in ln]
    torch_line = next(i for i, ln in enumerate(lines) if CPU_INDEX in ln)
    package_line = next(i for i, ln in enumerate(lines) if "-e .[serve]" in ln)
    assert torch_line < package_line
    assert _pinned_torch() in lines[torch_line]
    assert CPU_INDEX not in lines[package_line]


def test_an_unknown_choice_is_a_usage_error() -> None:
    proc = _setup(torch_choice="cuda12")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "QUALICLIP_TORCH" in proc.stderr
