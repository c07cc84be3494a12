"""A wheel built from the repository carries the run-time package data (offline installs work)
and ``py.typed``, so type checkers read qualiclip's hints (PEP 561)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qualiclip.quantize import CALIBRATION_PHOTOS

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "qualiclip" / "assets"


@pytest.mark.slow
def test_wheel_ships_the_vocabulary_niqe_model_web_page_and_report(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", minversion="77")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(project)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("qualiclip-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n: zf.read(n) for n in zf.namelist() if n.startswith("qualiclip/assets/")}
        typed = "qualiclip/py.typed" in zf.namelist()
    assert typed, f"py.typed is not in {wheel.name}: type checkers would ignore qualiclip's hints"
    web = sorted(p.relative_to(ASSETS).as_posix() for folder in ("web", "report")
                 for p in (ASSETS / folder).iterdir())
    assert web, "the web page's and report's files are missing from the repository"
    calibration = [f"calibration/{name}" for name in CALIBRATION_PHOTOS]
    for name in ("bpe_simple_vocab_16e6.txt.gz", "niqe_matlab_params.npz",
                 "LICENSE-openai-clip.txt", "README.md", "qualiclip-open.pth", *web,
                 *calibration):
        data = shipped.get(f"qualiclip/assets/{name}")
        assert data is not None, f"{name} is not in {wheel.name}"
        expected = hashlib.sha256((ASSETS / name).read_bytes()).hexdigest()
        assert hashlib.sha256(data).hexdigest() == expected


def test_calibration_photos_match_their_provenance() -> None:
    """Each shipped calibration photo is the file the assets README describes (its sha256)."""
    readme = (ASSETS / "README.md").read_text(encoding="utf-8")
    for name in CALIBRATION_PHOTOS:
        (line,) = [ln for ln in readme.splitlines() if ln.startswith(f"| `calibration/{name}`")]
        digest = hashlib.sha256((ASSETS / "calibration" / name).read_bytes()).hexdigest()
        assert f"`{digest}`" in line, name
