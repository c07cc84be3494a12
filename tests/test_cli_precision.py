"""Precisions the device cannot run are usage errors (exit 2, one line), in every subcommand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qualiclip import cli


@pytest.fixture()
def one_photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    return tmp_path / "a.png"


@pytest.mark.parametrize("command", ["score", "eval", "serve"])
def test_fp16_on_cpu_is_a_usage_error(command, one_photo, tmp_path, capsys):
    args = {
        "score": ["score", str(one_photo)],
        "eval": ["eval", "--dataset", "synthetic", "--root", str(tmp_path), "--bootstrap", "0"],
        "serve": ["serve", "--port", "0"],
    }[command]
    status = cli.main([*args, "--model", "random-tiny", "--device", "cpu", "--precision", "fp16"])
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE
    assert "fp16 needs a CUDA device" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_ray_fp16_on_cpu_actors_is_a_usage_error(one_photo, tmp_path, capsys):
    status = cli.main(["score", "--engine", "ray", "-o", str(tmp_path / "out"), str(one_photo),
                       "--model", "random-tiny", "--precision", "fp16"])
    assert status == cli.EXIT_USAGE
    assert "fp16 needs a CUDA device" in capsys.readouterr().err


def test_bf16_scores_on_any_cpu(one_photo, capsys):
    """bf16 runs on every CPU: through oneDNN where it can, else PyTorch's own convolution."""
    status = cli.main(["score", str(one_photo), "--model", "random-tiny", "--precision", "bf16",
                       "--format", "csv", "--no-progress"])
    out = capsys.readouterr().out
    assert status == cli.EXIT_OK
    assert str(one_photo) in out
