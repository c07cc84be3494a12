"""NIQE, the Natural Image Quality Evaluator: an opinion-unaware baseline in NumPy/SciPy.

A. Mittal, R. Soundararajan, A. C. Bovik, "Making a 'Completely Blind' Image Quality Analyzer",
IEEE Signal Processing Letters 20(3), 2013. NIQE measures how far the natural-scene statistics of
an image are from those of pristine photographs; **lower is better** (0 would be pristine).

qualiclip computes NIQE as the authors' MATLAB release does (``computequality.m``,
``computefeature.m``, ``estimateaggdparam.m`` of ``niqe_release.zip``, LIVE, UT Austin), with the
release's pristine model, so that its figures are comparable with published NIQE figures:

1. Luminance on the 0..255 scale. ``"gray"`` (the default): MATLAB's ``rgb2gray`` of the uint8
   image, as ``computequality.m`` does and as the pristine model was fitted
   (``estimatemodelparam.m``). ``"y"``: the Y channel of MATLAB's ``rgb2ycbcr`` (ITU-R BT.601,
   16..235), the convention of the BasicSR and pyiqa ports. Both round to integers the way
   MATLAB's uint8 output does (half away from zero).
2. The image is cropped to whole 96 x 96 blocks (top-left part kept, as ``computequality.m``).
3. MSCN coefficients ``(I - mu) / (sigma + 1)``: local mean and deviation from a 7 x 7 Gaussian
   window of sigma 7/6 (``fspecial('gaussian', 7, 7/6)``), image borders replicated
   (``imfilter(..., 'replicate')``). Where the local mean equals the pixel to within 1e-9 grey
   levels the coefficient is set to its exact value, 0 (see :func:`mscn`): the one step where
   qualiclip is exact where floating-point ports, MATLAB's included, leave a rounding residue.
4. Per block, 18 features (``computefeature.m``): an asymmetric generalised Gaussian (AGGD) fit of
   the MSCN coefficients (shape, mean of the left and right scales), then AGGD fits of the
   products of each coefficient with its horizontal, vertical and two diagonal neighbours (shape,
   mean, left scale, right scale). Neighbours wrap around inside the block (``circshift``).
5. The second scale is MATLAB's ``imresize(im, 0.5)`` of the cropped image (bicubic, antialiased,
   symmetric borders, no rounding), with 48 x 48 blocks, so both scales cover the same regions.
6. The quality is ``sqrt((mu_p - mu_d)^T pinv((cov_p + cov_d) / 2) (mu_p - mu_d))``, with
   ``(mu_p, cov_p)`` the pristine model and ``mu_d`` the per-feature mean of the image's block
   features ignoring NaN (``nanmean``), ``cov_d`` their covariance over blocks without NaN
   (``nancov``).

The shipped model ``qualiclip/assets/niqe_matlab_params.npz`` holds ``mu_prisparam`` and
``cov_prisparam`` of the release's ``modelparameters.mat`` (see that folder's README). Another
model (an .npz with ``mu``/``cov``, or a MATLAB .mat with ``mu_prisparam``/``cov_prisparam``) can
be chosen with ``$QUALICLIP_NIQE_PARAMS``; it must have been fitted with these features.

Example:
    >>> from skimage import data                                   # doctest: +SKIP
    >>> NIQEModel.load().score(data.astronaut())                   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.resources
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from numpy.typing import NDArray
from scipy import io as sio
from scipy import linalg, ndimage, special

FloatArray = NDArray[np.float64]
Luminance = Literal["gray", "y"]
_J = TypeVar("_J")
_R = TypeVar("_R")

PATCH_SIZE = 96
PARAMS_FILE = "niqe_matlab_params.npz"
PARAMS_ENV = "QUALICLIP_NIQE_PARAMS"
LUMINANCES: tuple[Luminance, ...] = ("gray", "y")
# MATLAB rgb2gray: the first row of the inverse of the NTSC RGB-to-YIQ matrix.
RGB2GRAY = (0.298936021293775, 0.587043074451121, 0.114020904255103)
# MATLAB rgb2ycbcr, Y row, for values on the 0..255 scale (its uint8 path divides by 255).
RGB2Y = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
Y_OFFSET = 16.0

# Shape grid of the moment-matching fit, as in estimateaggdparam.m (0.2:0.001:10, 9801 values).
# |I - mu| below this (grey levels) is rounding residue of an exact 0; see mscn().
_ZERO_TOL = 1e-9

_ALPHAS = np.linspace(0.2, 10.0, 9801)
# r(alpha) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) rises monotonically with alpha, so the
# nearest grid point can be found by bisection instead of an argmin over 9801 entries per fit.
_RATIO = np.exp(
    2 * special.gammaln(2 / _ALPHAS) - special.gammaln(1 / _ALPHAS) - special.gammaln(3 / _ALPHAS)
)


def _round_half_up(x: FloatArray) -> FloatArray:
    """MATLAB's rounding of non-negative values (half away from zero, not NumPy's half to even)."""
    return np.floor(x + 0.5)


def to_luminance(image: NDArray[np.generic], luminance: Luminance = "gray") -> FloatArray:
    """Integer luminance levels on the 0..255 scale, as the MATLAB release sees a uint8 image.

    Args:
        image: (H, W) grey or (H, W, 3) RGB (a fourth, alpha channel is ignored): uint8,
            uint16 (full scale 65535) or float in [0, 1]. Other bit depths are first brought to
            the 8-bit scale, unrounded, then converted and rounded once.
        luminance: ``"gray"`` (MATLAB ``rgb2gray``) or ``"y"`` (Y of MATLAB ``rgb2ycbcr``);
            a grey image is taken as its own luminance either way.

    Returns:
        float64 array of shape (H, W) holding integers in 0..255.
    """
    if luminance not in LUMINANCES:
        raise ValueError(f"luminance must be one of {LUMINANCES}, got {luminance!r}")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim != 2:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, 3), got {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float64) * 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float64) / 257.0
    else:
        x = arr.astype(np.float64)
    if x.ndim == 3:
        weights, offset = (RGB2GRAY, 0.0) if luminance == "gray" else (RGB2Y, Y_OFFSET)
        # Summed channel by channel, in MATLAB's order, for identical rounding of ties.
        x = weights[0] * x[..., 0] + weights[1] * x[..., 1] + weights[2] * x[..., 2] + offset
    return np.clip(_round_half_up(x), 0.0, 255.0)


# --- MATLAB imresize (bicubic, antialiased) ------------------------------------------------------


def _cubic(x: FloatArray) -> FloatArray:
    """Keys' cubic kernel with a = -0.5, the kernel of MATLAB's ``imresize(..., 'bicubic')``."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def _resize_weights(in_len: int, out_len: int, scale: float) -> tuple[FloatArray, NDArray[np.intp]]:
    """Per output sample: the weights and (0-based) input indices MATLAB's ``imresize`` uses."""
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    # Output sample x (1-based) sits at u in input coordinates: pixel centres map onto each other.
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    dist = u[:, None] - idx
    # Antialiasing stretches the kernel by 1/scale (and scales it to keep unit area).
    w = scale * _cubic(scale * dist) if antialias else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    # Out-of-range taps mirror the image including its edge sample ('symmetric' padding).
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    indices = mirror[np.mod(idx.astype(np.intp) - 1, 2 * in_len)]
    keep = np.any(w != 0, axis=0)  # MATLAB drops taps that are zero for every output
    return w[:, keep], indices[:, keep]


def _resize_axis0(image: FloatArray, out_len: int, scale: float) -> FloatArray:
    w, idx = _resize_weights(image.shape[0], out_len, scale)
    out = np.zeros((out_len,) + image.shape[1:], dtype=np.float64)
    for k in range(w.shape[1]):  # tap by tap, in order, as MATLAB's resizer sums
        out += w[:, k, None] * image[idx[:, k]]
    return out


def imresize(image: FloatArray, scale: float) -> FloatArray:
    """MATLAB's ``imresize(image, scale)`` for a 2-D double image: bicubic, antialiased.

    Rows are resized first, then columns (MATLAB's order for equal scales); the output size is
    ``ceil(scale * size)``; values are neither rounded nor clipped.

    Args:
        image: shape (H, W).
        scale: the same factor for both axes, > 0.

    Returns:
        The resized image, float64.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    out_h, out_w = int(np.ceil(h * scale)), int(np.ceil(w * scale))
    rows = _resize_axis0(img, out_h, scale)
    return _resize_axis0(rows.T, out_w, scale).T


# --- features ------------------------------------------------------------------------------------


def gaussian_window(sigma: float = 7.0 / 6.0, radius: int = 3) -> FloatArray:
    """Normalised 1-D Gaussian; its outer product is ``fspecial('gaussian', 7, 7/6)``."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def mscn(image: FloatArray) -> FloatArray:
    """Mean-subtracted contrast-normalised coefficients ``(I - mu) / (sigma + 1)``.

    Args:
        image: luminance on the 0..255 scale, shape (H, W).

    Returns:
        The MSCN coefficients, shape (H, W).
    """
    w = gaussian_window()

    def blur(x: FloatArray) -> FloatArray:
        # 'nearest' is MATLAB's 'replicate'; the window is separable and symmetric.
        rows = ndimage.correlate1d(x, w, 0, mode="nearest")
        return ndimage.correlate1d(rows, w, 1, mode="nearest")

    mu = blur(image)
    sigma = np.sqrt(np.abs(blur(image * image) - mu * mu))
    coeffs = (image - mu) / (sigma + 1.0)
    # Where the local mean equals the pixel (a flat area such as a clipped highlight, a linear
    # ramp), the exact coefficient is 0, but the filtered mean lands a rounding error away, so the
    # coefficient becomes a +-1e-13 residue whose sign, set by the filter's summation order,
    # decides on which side of the AGGD fit it counts. Differences far below one grey level and
    # far above rounding are taken as the exact 0 that estimateaggdparam.m counts on neither side.
    coeffs[np.abs(image - mu) < _ZERO_TOL] = 0.0
    return coeffs


def aggd_fit(values: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Moment-matching fit of an asymmetric generalised Gaussian, one fit per row.

    The estimator of ``estimateaggdparam.m`` (Lasmar, Stitou, Berthoumieu 2009): the root mean
    squares of the negative and of the positive samples (zeros count in neither) give the
    asymmetry; ``mean(|x|)^2 / mean(x^2)`` corrected for it is matched to ``r(alpha)`` on the grid
    0.2:0.001:10.

    Args:
        values: samples, shape (N, M): N independent fits of M samples each.

    Returns:
        ``(alpha, mean, left_scale, right_scale)``, each shape (N,). A row without negative (or
        positive) samples has NaN scales and mean and, as in MATLAB where ``min`` over NaN picks
        the first entry, alpha 0.2.
    """
    sq = values * values
    neg, pos = values < 0, values > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt(np.where(neg, sq, 0.0).sum(axis=1) / neg.sum(axis=1))
        right = np.sqrt(np.where(pos, sq, 0.0).sum(axis=1) / pos.sum(axis=1))
        gamma_hat = left / right
        r_hat = np.abs(values).mean(axis=1) ** 2 / sq.mean(axis=1)
        r_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    alpha = _nearest_alpha(r_norm)
    ratio = np.exp(0.5 * (special.gammaln(1 / alpha) - special.gammaln(3 / alpha)))
    bl, br = ratio * left, ratio * right
    mean = (br - bl) * np.exp(special.gammaln(2 / alpha) - special.gammaln(1 / alpha))
    return alpha, mean, bl, br


def _nearest_alpha(r_norm: FloatArray) -> FloatArray:
    """Grid shape whose ``r(alpha)`` is nearest to each target; ties and NaN take the lower one."""
    finite = np.isfinite(r_norm)
    target = np.where(finite, r_norm, -np.inf)
    hi = np.clip(np.searchsorted(_RATIO, target), 1, _RATIO.size - 1)
    lo = hi - 1
    pick = np.where(np.abs(_RATIO[lo] - target) <= np.abs(_RATIO[hi] - target), lo, hi)
    return np.asarray(np.where(finite, _ALPHAS[pick], _ALPHAS[0]), dtype=np.float64)


def patch_features(coeffs: FloatArray, patch: int) -> FloatArray:
    """The 18 NIQE features of every non-overlapping ``patch x patch`` block of MSCN coefficients.

    Args:
        coeffs: MSCN coefficients, shape (H, W), H and W multiples of ``patch``.
        patch: block side in pixels.

    Returns:
        Features, shape (n_blocks, 18), blocks in row-major order.
    """
    h, w = coeffs.shape
    grid = coeffs.reshape(h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3)
    blocks = grid.reshape(-1, patch, patch)
    n = blocks.shape[0]
    alpha, _, bl, br = aggd_fit(blocks.reshape(n, -1))
    feats = [alpha, (bl + br) / 2.0]
    # Horizontal, vertical, main diagonal, anti-diagonal neighbours (circshift within the block).
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        prod = blocks * np.roll(blocks, shift, axis=(1, 2))
        feats += list(aggd_fit(prod.reshape(n, -1)))
    return np.stack(feats, axis=1)


def image_features(lum: FloatArray) -> FloatArray:
    """Block features of both scales of a luminance image, shape (n_blocks, 36).

    Raises:
        ValueError: when the image holds fewer than two 96 x 96 blocks.
    """
    h, w = lum.shape
    hp, wp = h // PATCH_SIZE * PATCH_SIZE, w // PATCH_SIZE * PATCH_SIZE
    if (hp // PATCH_SIZE) * (wp // PATCH_SIZE) < 2:
        raise ValueError(
            f"NIQE needs at least two {PATCH_SIZE}x{PATCH_SIZE} blocks; image is {w}x{h}"
        )
    img = np.asarray(lum[:hp, :wp], dtype=np.float64)
    f1 = patch_features(mscn(img), PATCH_SIZE)
    f2 = patch_features(mscn(imresize(img, 0.5)), PATCH_SIZE // 2)
    return np.concatenate([f1, f2], axis=1)


@dataclass(frozen=True)
class NIQEModel:
    """The pristine multivariate Gaussian of NIQE features.

    Attributes:
        mu: pristine feature mean, shape (36,).
        cov: pristine feature covariance, shape (36, 36).
        source: where the parameters came from (for messages).
    """

    mu: FloatArray
    cov: FloatArray
    source: str = ""

    @classmethod
    def from_arrays(cls, mu: FloatArray, cov: FloatArray, source: str = "") -> NIQEModel:
        """Build a model, checking the shapes."""
        mu = np.asarray(mu, dtype=np.float64).ravel()
        cov = np.asarray(cov, dtype=np.float64)
        if mu.shape != (36,) or cov.shape != (36, 36):
            raise ValueError(
                f"NIQE model needs mu (36,) and cov (36, 36), got {mu.shape} and {cov.shape}"
            )
        return cls(mu, cov, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> NIQEModel:
        """Load the pristine model: ``path``, else :func:`find_params`."""
        return _load_params(str(path) if path is not None else str(find_params()))

    def score(self, image: NDArray[np.generic], luminance: Luminance = "gray") -> float:
        """NIQE of one image (lower is better).

        Args:
            image: RGB (H, W, 3) or grey (H, W): uint8, uint16 or float in [0, 1].
            luminance: colour-to-luminance conversion, see :func:`to_luminance`.

        Returns:
            The NIQE value.
        """
        return self.score_luminance(to_luminance(image, luminance))

    def score_luminance(self, lum: FloatArray) -> float:
        """NIQE of a luminance image on the 0..255 scale, shape (H, W), used as given.

        Raises:
            ValueError: fewer than two 96 x 96 blocks, or features undefined (flat image).
        """
        feats = image_features(lum)
        with np.errstate(invalid="ignore"):
            complete = feats[np.isfinite(feats).all(axis=1)]
        if complete.shape[0] < 2 or not np.isfinite(feats).any(axis=0).all():
            raise ValueError("NIQE is undefined: fewer than two blocks have texture (flat image?)")
        diff = self.mu - np.nanmean(feats, axis=0)
        cov = (self.cov + np.cov(complete, rowvar=False)) / 2.0
        return float(np.sqrt(max(diff @ linalg.pinv(cov) @ diff, 0.0)))


def find_params() -> Path:
    """Locate the pristine NIQE model.

    Order: the file named by ``$QUALICLIP_NIQE_PARAMS`` (an explicit choice wins), then the
    package data file ``qualiclip/assets/niqe_matlab_params.npz``.

    Raises:
        FileNotFoundError: naming the file and how to get it.
    """
    env = os.environ.get(PARAMS_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"${PARAMS_ENV} points to {env!r}, which is not a file")
        return Path(env)
    packaged = importlib.resources.files("qualiclip") / "assets" / PARAMS_FILE
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(
        f"NIQE pristine model not found: qualiclip/assets/{PARAMS_FILE} is missing from this "
        "installation (it ships with qualiclip; reinstall it). Alternatively set "
        f"${PARAMS_ENV} to an .npz (mu, cov) or a MATLAB modelparameters.mat "
        "(mu_prisparam, cov_prisparam)."
    )


@functools.lru_cache(maxsize=4)
def _load_params(path: str) -> NIQEModel:
    """Read an .npz (mu/cov or mu_pris_param/cov_pris_param) or .mat (mu_prisparam/...) model."""
    if path.endswith(".mat"):
        m = sio.loadmat(path)
        if "mu_prisparam" in m and "cov_prisparam" in m:
            return NIQEModel.from_arrays(m["mu_prisparam"], m["cov_prisparam"], path)
        raise ValueError(f"{path}: no mu_prisparam/cov_prisparam variables")
    with np.load(path) as d:
        for mu_key, cov_key in (("mu", "cov"), ("mu_pris_param", "cov_pris_param")):
            if mu_key in d and cov_key in d:
                return NIQEModel.from_arrays(d[mu_key], d[cov_key], path)
        raise ValueError(f"{path}: expected arrays 'mu' and 'cov', found {sorted(d.files)}")


# --- scoring many images -----------------------------------------------------------------------


@dataclass(frozen=True)
class NIQEResult:
    """One image's NIQE, or why it has none (``path``, ``score``, ``error``: what
    :class:`qualiclip.evaluate.ScoreRow` asks of every scorer's rows)."""

    path: str
    score: float | None
    error: str | None


def read_luminance(path: str | os.PathLike[str], luminance: Luminance = "gray") -> FloatArray:
    """Decode an image file with :func:`qualiclip.images.decode_rgb`, then :func:`to_luminance`.

    Alpha is composited on white and EXIF orientation applied by the decoder; files above the
    pixel limit or with a side under 96 pixels are refused before decoding.
    """
    from qualiclip.images import decode_rgb

    return to_luminance(decode_rgb(path, min_size=PATCH_SIZE), luminance)


def _score_file(args: tuple[str, str, Luminance]) -> NIQEResult:
    """Worker: NIQE of one file; every failure becomes an error row, never an exception."""
    path, params, luminance = args
    try:
        lum = read_luminance(path, luminance)
        return NIQEResult(path, _load_params(params).score_luminance(lum), None)
    except Exception as exc:  # noqa: BLE001 - decoding and NIQE errors become this file's row
        return NIQEResult(path, None, f"{type(exc).__name__}: {exc}")


def _score_array(args: tuple[FloatArray, str]) -> float:
    lum, params = args
    return _load_params(params).score_luminance(lum)


class NIQEScorer:
    """NIQE behind the scoring interface the evaluation loop uses for every model.

    Attributes:
        name: ``"niqe"``.
        higher_is_better: False: lower NIQE means better quality.
    """

    name = "niqe"
    higher_is_better = False

    def __init__(
        self,
        workers: int = 2,
        params: str | os.PathLike[str] | None = None,
        luminance: Luminance = "gray",
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if luminance not in LUMINANCES:
            raise ValueError(f"luminance must be one of {LUMINANCES}, got {luminance!r}")
        self.params = str(params) if params is not None else str(find_params())
        self.model = _load_params(self.params)
        self.workers = workers
        self.luminance = luminance

    def score_paths(
        self, paths: Sequence[str | os.PathLike[str]], *, progress: bool = False
    ) -> Iterator[NIQEResult]:
        """NIQE of each file, in input order; unreadable files give error rows.

        Args:
            paths: image files.
            progress: show a progress bar on stderr.

        Yields:
            One :class:`NIQEResult` per path.
        """
        jobs = [(str(p), self.params, self.luminance) for p in paths]
        results = self._map(_score_file, jobs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="niqe", unit="img")
        yield from results

    def score_tensors(self, images: object) -> FloatArray:
        """NIQE of a batch of RGB images in [0, 1] (a tensor or array [B, 3, H, W]), shape (B,)."""
        arr = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images)
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {arr.shape}")
        lums = [to_luminance(np.moveaxis(x, 0, -1).astype(np.float64), self.luminance) for x in arr]
        return np.asarray(list(self._map(_score_array, [(g, self.params) for g in lums])))

    def _map(self, func: Callable[[_J], _R], jobs: list[_J]) -> Iterator[_R]:
        """Ordered map, in a pool of ``workers`` processes when there is more than one job."""
        if self.workers <= 1 or len(jobs) <= 1:
            yield from map(func, jobs)
            return
        # forkserver, not fork: the parent may hold torch threads, which children inherit badly.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        with ctx.Pool(min(self.workers, len(jobs))) as pool:
            yield from pool.imap(func, jobs, chunksize=4)
