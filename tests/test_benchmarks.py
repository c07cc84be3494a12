"""The benchmarks run as the README writes them on a clone without ``../shared``.

Each is run as a user runs it, with ``QUALICLIP_SHARED`` pointing at an empty folder: without a
folder of photos they use the built-in set (``benchmarks/builtin_photos.py``) and say so. Only
the smallest settings are used: what is checked is that they run, not what they measure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qualiclip.model import create_model

pytestmark = pytest.mark.slow  # among the heaviest: `scripts/test.sh --fast` leaves it out

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QUALICLIP_SHARED": str(tmp_path / "no-shared")}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def test_builtin_photos_are_photos_of_one_size(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from builtin_photos import write_builtin_photos
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    paths = write_builtin_photos(tmp_path, count=9, side=128)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    assert len(arrays) == 9 and all(a.shape == (128, 128, 3) for a in arrays)
    assert all(a.std() > 10 for a in arrays)  # not flat
    assert len({a.tobytes() for a in arrays}) == 9  # each one different


@pytest.mark.slow
def test_bench_train_runs_without_a_photo_folder(tmp_path: Path) -> None:
    proc = _bench("bench_train.py", "--preset", "tiny", "--steps", "1", "--warmup", "0",
                  "--workers", "0", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "built-in" in proc.stdout and "steps/s" in proc.stdout


@pytest.mark.slow
def test_bench_maps_takes_a_folder_and_a_count(tmp_path: Path) -> None:
    model = tmp_path / "tiny.pth"
    torch.save(create_model("random-tiny").official_state_dict(), model)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(
            folder / f"p{i}.png")
    proc = _bench("bench_maps.py", "--model", str(model), "--photos", str(folder), "--count",
                  "2", "--window", "64", "--stride", "32", "--no-timing", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"photos: 3 from {folder}" in proc.stdout
    assert "left half damaged, 2 photos" in proc.stdout
