"""qualiclip-open, the model qualiclip ships: it loads offline from the package, verified, and it
ranks real damage below the original (a property of the weights, not a snapshot of them)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from qualiclip import create_model
from qualiclip.degradations import apply_distortion
from qualiclip.pretrained import PRETRAINED, QUALICLIP_OPEN_FILE, packaged_path

MAX_BYTES = 25 * 2**20


@pytest.fixture(scope="module")
def open_model() -> torch.nn.Module:
    return create_model("qualiclip-open").eval()


def _photos() -> dict[str, torch.Tensor]:
    """scikit-image's colour photographs (none is among qualiclip-open's training photos)."""
    data = pytest.importorskip("skimage.data")
    return {
        name: torch.from_numpy(np.ascontiguousarray(getattr(data, name)()[..., :3]))
        .permute(2, 0, 1)[None].float() / 255
        for name in ("astronaut", "coffee", "chelsea", "rocket")
    }


def test_the_packaged_weights_match_their_table_and_fit_the_size_limit() -> None:
    path = packaged_path(QUALICLIP_OPEN_FILE)
    assert path.is_file(), f"{path} is missing: package it with scripts/package_model.py"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == QUALICLIP_OPEN_FILE.sha256
    assert len(data) == QUALICLIP_OPEN_FILE.size <= MAX_BYTES
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    assert state["prompts_features"].shape[0] == 2 * len(PRETRAINED["qualiclip-open"].prompt_pairs)
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())
    assert not any(k.startswith("clip_model.transformer.") for k in state)  # no text tower


def test_it_loads_with_no_network_and_an_empty_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")
    monkeypatch.setenv("QUALICLIP_HOME", str(tmp_path / "cache"))
    model = create_model("qualiclip-open").eval()
    with torch.no_grad():
        score = float(model(torch.rand(1, 3, 96, 128))[0])
    assert 0.0 <= score <= 1.0
    assert not (tmp_path / "cache").exists()  # nothing was downloaded or cached


@pytest.mark.slow
def test_a_sharp_photo_outscores_its_blurred_copies(open_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, x in _photos().items():
            crop = x[..., :384, :384]
            blur2 = apply_distortion(crop, "gaussian_blur", [4], g)  # sigma 2
            blur5 = apply_distortion(crop, "gaussian_blur", [5], g)  # sigma 5
            s = [float(open_model(v)[0]) for v in (crop, blur2, blur5)]
            assert s[0] > s[1] > s[2], f"{name}: sharp, sigma 2, sigma 5 scored {s}"


@pytest.mark.slow
def test_noise_scores_lower_than_the_original(open_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, x in _photos().items():
            crop = x[..., :384, :384]
            noisy = apply_distortion(crop, "white_noise", [5], g)
            s = [float(open_model(v)[0]) for v in (crop, noisy)]
            assert s[0] > s[1], f"{name}: original, white noise scored {s}"
