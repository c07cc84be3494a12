"""NIQE: agreement with a port of the MATLAB release, hand-computed steps, properties."""

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


# Reference values ("ref64z" of docs/niqe.md): BasicSR 1.4.2's NumPy port of the MATLAB release
# (basicsr/metrics/niqe.py, its `niqe` function with the release's model), its imresize run in
# float64 as MATLAB computes in double, plus one line taking MSCN coefficients with
# |I - mu| < 1e-9 as exact zeros; on the luminance of the decoded photo: MATLAB rgb2gray ("gray")
# or Y of rgb2ycbcr ("y"), rounded half away from zero. The first three photos have no flat area,
# and there the port without the added line gives the same values.
REFERENCE = {
    # name: (gray, y)
    "ss01 (558).jpg": (4.11558487619261, 4.228513403668044),
    "ss02 (1437).jpg": (2.277390798436128, 2.135713676833051),
    "ss03 (4032).jpg": (6.234508379237094, 6.154413211052739),
    "ss01 (926).jpg": (5.678163438614306, 5.645567115161922),
    "ss03 (699).jpg": (3.9252652931044447, 3.8241667965741253),
    "ss03 (2831).jpg": (8.523660106867279, 8.388332851325147),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_matches_matlab_port(model: N.NIQEModel, name: str) -> None:
    from conftest import require_shared
    from qualiclip.images import decode_rgb

    rgb = decode_rgb(require_shared("data/biq2021-test/images") / name)
    gray, y = REFERENCE[name]
    assert model.score(rgb) == pytest.approx(gray, rel=1e-8)
    assert model.score(rgb, "y") == pytest.approx(y, rel=1e-8)


def test_shipped_model_is_the_documented_file() -> None:
    import hashlib

    path = N.find_params() if not os.environ.get(N.PARAMS_ENV) else None
    if path is None:
        pytest.skip(f"${N.PARAMS_ENV} chooses another model")
    assert path.name == N.PARAMS_FILE
    # The checksum recorded in src/qualiclip/assets/README.md.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == "99215d2a987562121cf11b3bd1b5f43368da2ff41071cf9a80f4f55caab8614c"
    m = N.NIQEModel.load(path)
    np.testing.assert_allclose(m.cov, m.cov.T)
    assert np.all(np.linalg.eigvalsh(m.cov) > 0)
    with np.load(path) as d:
        w = np.outer(N.gaussian_window(), N.gaussian_window())
        np.testing.assert_allclose(d["gaussian_window"], w, atol=1e-15)


def test_niqe_rises_with_blur_and_noise(model: N.NIQEModel) -> None:
    from skimage import data

    lum = N.to_luminance(data.coffee())
    clean = model.score_luminance(lum)
    blurred = [model.score_luminance(ndimage.gaussian_filter(lum, s)) for s in (1.0, 2.0, 4.0)]
    rng = np.random.default_rng(0)
    noisy = [
        model.score_luminance(np.clip(lum + rng.normal(scale=s, size=lum.shape), 0, 255))
        for s in (10.0, 25.0)
    ]
    assert clean < blurred[0] < blurred[1] < blurred[2]
    assert clean < noisy[0] < noisy[1]


def test_luminance_as_matlab() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]],
                   dtype=np.uint8)
    # MATLAB: rgb2gray(uint8([255 0 0; 0 255 0; 0 0 255])) = 76, 150, 29.
    np.testing.assert_array_equal(N.to_luminance(rgb), [[76, 150, 29, 255, 0]])
    # rgb2ycbcr's Y: 16 + 65.481 = 81.481, 16 + 128.553, 16 + 24.966; white 235, black 16.
    np.testing.assert_array_equal(N.to_luminance(rgb, "y"), [[81, 145, 41, 235, 16]])
    # Float in [0, 1] and 16-bit inputs land on the same levels.
    np.testing.assert_array_equal(N.to_luminance(rgb.astype(np.float32) / 255),
                                  [[76, 150, 29, 255, 0]])
    np.testing.assert_array_equal(N.to_luminance(rgb.astype(np.uint16) * 257, "y"),
                                  [[81, 145, 41, 235, 16]])
    # MATLAB rounds half away from zero, NumPy half to even.
    np.testing.assert_array_equal(N.to_luminance(np.array([[0.5, 1.5, 2.5]]) / 255), [[1, 2, 3]])
    with pytest.raises(ValueError, match="luminance"):
        N.to_luminance(rgb, "lab")  # type: ignore[arg-type]


def test_imresize_half_is_matlabs_antialiased_bicubic() -> None:
    # Scale 1/2: the cubic kernel stretched by 2, sampled at distances 0.5, 1.5, 2.5, 3.5 from the
    # output centre: 0.5 * k(0.25), 0.5 * k(0.75), 0.5 * k(1.25), 0.5 * k(1.75) with Keys' k
    # (a = -0.5) = 0.43359375, 0.11328125, -0.03515625, -0.01171875 (they sum to 1/2 per side).
    row = np.zeros((4, 32))
    row[:, 16] = 1.0
    expected = np.zeros(16)
    expected[6:10] = [-0.01171875, 0.11328125, 0.43359375, -0.03515625]
    np.testing.assert_allclose(N.imresize(row, 0.5), np.tile(expected, (2, 1)), atol=1e-15)
    # At the border the input is mirrored including its edge sample (MATLAB's 'symmetric'):
    # output 0 sees input 0 at 0.5 and its mirror at 1.5; output 1 at 2.5 and 3.5.
    row[:] = 0.0
    row[:, 0] = 1.0
    out = N.imresize(row, 0.5)[0]
    np.testing.assert_allclose(out[:3], [0.43359375 + 0.11328125, -0.03515625 - 0.01171875, 0.0],
                               atol=1e-15)
    # Shapes are ceil(scale * size); linear ramps pass through (symmetric, normalised kernel).
    ramp = np.add.outer(np.arange(40.0), 2 * np.arange(30.0))
    small = N.imresize(ramp, 0.5)
    assert small.shape == (20, 15)
    centre_r, centre_c = 2 * np.arange(20) + 0.5, 2 * np.arange(15) + 0.5
    np.testing.assert_allclose(small[2:-2, 2:-2], np.add.outer(centre_r, 2 * centre_c)[2:-2, 2:-2])
    assert N.imresize(np.ones((7, 9)), 0.5).shape == (4, 5)


def test_mscn_replicates_borders_and_is_exact_on_flat_areas() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(40, 50)).astype(np.float64)
    img[:, 30:] = 255.0  # a clipped highlight
    got = N.mscn(img)
    # Reference: explicit edge padding and a full 7 x 7 correlation ('replicate').
    w2 = np.outer(N.gaussian_window(), N.gaussian_window())
    pad = np.pad(img, 3, mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(pad, (7, 7))
    mu = np.einsum("ijkl,kl->ij", win, w2)
    sigma = np.sqrt(np.abs(np.einsum("ijkl,kl->ij", win * win, w2) - mu * mu))
    np.testing.assert_allclose(got[:, :33], ((img - mu) / (sigma + 1))[:, :33], atol=1e-9)
    # Where the whole window is flat the coefficient is exactly 0 (counted on neither side of
    # the fit), not a rounding residue; so is it on a ramp, whose local mean is the pixel.
    assert np.all(got[:, 33:] == 0.0) and np.all(got[:, :27] != 0.0)
    assert np.all(N.mscn(np.full((20, 30), 77.0)) == 0.0)
    ramp = np.add.outer(np.arange(20.0), 3 * np.arange(30.0))
    assert np.all(N.mscn(ramp)[3:-3, 3:-3] == 0.0)


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


def test_aggd_fit_hand_computed_cases() -> None:
    # +-1 in equal numbers: both sides' RMS 1, r = mean|x|^2 / mean x^2 = 1, above r(alpha)'s
    # supremum 3/4, so the nearest grid shape is the largest, 10.
    a, mean, bl, br = N.aggd_fit(np.array([[-1.0, 1.0, -1.0, 1.0]]))
    assert a[0] == pytest.approx(10.0) and bl[0] == pytest.approx(br[0]) and mean[0] == 0.0
    # Zeros count on neither side: left RMS 1, right RMS 2 (not sqrt(4/3)).
    _, _, bl, br = N.aggd_fit(np.array([[-1.0, 0.0, 0.0, 2.0]]))
    assert br[0] / bl[0] == pytest.approx(2.0)
    # No negative sample: scales undefined (NaN), and the shape is the grid's first entry, as
    # MATLAB's min over an all-NaN vector returns index 1.
    a, mean, bl, br = N.aggd_fit(np.array([[0.0, 1.0, 2.0, 3.0]]))
    assert a[0] == pytest.approx(0.2) and np.isnan(bl[0]) and np.isnan(mean[0])
    # Shapes are grid values 0.2, 0.201, ..., 10.
    x = stats.gennorm.rvs(1.3, size=(3, 5000), random_state=4)
    a = N.aggd_fit(x)[0]
    np.testing.assert_allclose(a * 1000, np.round(a * 1000), atol=1e-9)


def test_mat_and_basicsr_npz_models_load(tmp_path: Path, model: N.NIQEModel) -> None:
    sio.savemat(tmp_path / "m.mat", {"mu_prisparam": model.mu[None], "cov_prisparam": model.cov})
    other = N.NIQEModel.load(tmp_path / "m.mat")
    assert np.array_equal(other.mu, model.mu) and np.array_equal(other.cov, model.cov)
    np.savez(tmp_path / "b.npz", mu_pris_param=model.mu[None], cov_pris_param=model.cov)
    assert np.array_equal(N.NIQEModel.load(tmp_path / "b.npz").mu, model.mu)
    np.savez(tmp_path / "bad.npz", mean=model.mu)
    with pytest.raises(ValueError, match="expected arrays"):
        N.NIQEModel.load(tmp_path / "bad.npz")


def test_missing_params_error_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(N.PARAMS_ENV, "/nonexistent/params.npz")
    with pytest.raises(FileNotFoundError, match="QUALICLIP_NIQE_PARAMS"):
        N.find_params()


def test_small_and_flat_images_are_errors(model: N.NIQEModel) -> None:
    with pytest.raises(ValueError, match="two 96x96 blocks"):
        model.score_luminance(np.zeros((100, 150)))
    with pytest.raises(ValueError, match="undefined"):
        model.score_luminance(np.full((200, 200), 128.0))


@pytest.mark.slow
def test_scorer_keeps_order_and_reports_bad_files(tmp_path: Path) -> None:
    from skimage import data

    env = niqe_env()
    for key, value in env.items():
        os.environ.setdefault(key, value)
    img = data.astronaut()
    paths = []
    for i, size in enumerate((256, 320)):
        p = tmp_path / f"ok{i}.png"
        Image.fromarray(img[:size, :size]).save(p)
        paths.append(p)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    paths.insert(1, tmp_path / "bad.png")
    paths.append(tmp_path / "missing.png")
    # Transparent where the alpha says so: scored as composited on white, by the decoder.
    rgba = np.dstack([img[:256, :256], np.full((256, 256), 255, np.uint8)])
    rgba[:100, :100, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    paths.append(tmp_path / "alpha.png")
    scorer = N.NIQEScorer(workers=2, params=env.get(N.PARAMS_ENV))
    rows = list(scorer.score_paths(paths))
    assert [r.path for r in rows] == [str(p) for p in paths]
    assert [r.error is None for r in rows] == [True, False, True, False, True]
    assert rows[1].error is not None and "bad.png" in rows[1].error
    assert rows[3].error is not None and "no such file" in rows[3].error
    assert rows[0].score == pytest.approx(scorer.model.score(img[:256, :256]))
    white = img[:256, :256].copy()
    white[:100, :100] = 255
    assert rows[4].score == pytest.approx(scorer.model.score(white))
    # Tensors in [0, 1] give the same values as the 8-bit image.
    batch = np.moveaxis(img[None, :256, :256].astype(np.float32) / 255, -1, 1)
    np.testing.assert_allclose(scorer.score_tensors(batch), [rows[0].score], rtol=1e-12)
