"""Agreement with human opinion: SRCC, PLCC, KRCC, the logistic fit and bootstrap intervals.

The metrics are the three every IQA paper reports (VQEG, "Final report from the Video Quality
Experts Group on the validation of objective models of video quality assessment", 2000/2003):

- SRCC, Spearman's rank correlation: monotonic agreement.
- PLCC, Pearson's linear correlation, raw and after the monotonic 4-parameter logistic
  ``f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2`` fitted from predictions to opinion
  scores, which removes a model's non-linear scale before measuring linear agreement.
- KRCC, Kendall's tau-b.

Sign convention: every correlation is reported so that a positive value means "the model agrees
with people". When exactly one of (model, labels) is lower-is-better, the predictions are negated
before correlating. NIQE is a lower-is-better model; DMOS datasets (LIVE, CSIQ) carry
lower-is-better labels. Negating a model that is lower-is-better on a DMOS dataset would be wrong
twice, hence the exclusive-or.

A leaf module (NumPy and SciPy only): evaluation and training validation both use it.

Example:
    >>> m = compute_metrics([0.1, 0.4, 0.35, 0.8], [1.0, 2.0, 3.0, 4.0], bootstrap=0)
    >>> round(m.srcc, 3)
    0.8
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, stats

FloatArray = NDArray[np.float64]

# --- metrics -----------------------------------------------------------------------------------


def _pair(pred: ArrayLike, mos: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Validate two score vectors: same length, finite, at least 3 entries."""
    x = np.asarray(pred, dtype=np.float64).ravel()
    y = np.asarray(mos, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"predictions and labels differ in length: {x.size} vs {y.size}")
    if x.size < 3:
        raise ValueError(f"need at least 3 scored items to correlate, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("predictions and labels must be finite (found NaN or inf)")
    return x, y


def _pearson_rows(x: FloatArray, y: FloatArray) -> FloatArray:
    """Pearson correlation of each row of ``x`` with the same row of ``y`` (NaN when constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=-1) / den
    return np.clip(r, -1.0, 1.0)


def srcc(pred: ArrayLike, mos: ArrayLike) -> float:
    """Spearman rank correlation (ties get average ranks), as ``scipy.stats.spearmanr``."""
    x, y = _pair(pred, mos)
    return float(_pearson_rows(stats.rankdata(x), stats.rankdata(y)))


def plcc(pred: ArrayLike, mos: ArrayLike) -> float:
    """Pearson linear correlation of raw predictions with labels, as ``scipy.stats.pearsonr``."""
    x, y = _pair(pred, mos)
    return float(_pearson_rows(x, y))


def krcc(pred: ArrayLike, mos: ArrayLike) -> float:
    """Kendall's tau-b (accounts for ties), as ``scipy.stats.kendalltau``."""
    x, y = _pair(pred, mos)
    return float(stats.kendalltau(x, y).statistic)


#: Fewest pairs the logistic PLCC is computed on. With four parameters, four points or fewer can
#: be passed through exactly (its PLCC would be 1 by construction, not a measurement), and SciPy
#: refuses fewer than four; below this the logistic PLCC is undefined (NaN).
LOGISTIC_MIN_POINTS = 5


def logistic4(x: ArrayLike, b1: float, b2: float, b3: float, b4: float) -> FloatArray:
    """The monotonic 4-parameter logistic of VQEG: ``(b1 - b2) / (1 + exp(-(x - b3)/|b4|)) + b2``.

    ``b1`` and ``b2`` are the upper and lower asymptotes (swapped for a decreasing curve), ``b3``
    the midpoint and ``|b4|`` the width; the absolute value keeps the curve's direction in
    ``b1 - b2`` alone, so the fit is monotonic whatever sign the optimiser gives ``b4``.
    """
    z = -(np.asarray(x, dtype=np.float64) - b3) / max(abs(b4), 1e-12)
    return (b1 - b2) * _sigmoid_of_neg(z) + b2


def _sigmoid_of_neg(z: FloatArray) -> FloatArray:
    """``1 / (1 + exp(z))`` without overflow warnings for large ``|z|``."""
    return np.exp(-np.logaddexp(0.0, z))


@dataclass(frozen=True)
class LogisticFit:
    """Parameters of :func:`logistic4` fitted to (prediction, label) pairs.

    Attributes:
        b1, b2, b3, b4: the fitted parameters (see :func:`logistic4`).
        converged: False when ``curve_fit`` failed; the parameters are then the linear
            fallback described in :func:`fit_logistic`.
    """

    b1: float
    b2: float
    b3: float
    b4: float
    converged: bool

    def __call__(self, x: ArrayLike) -> FloatArray:
        return logistic4(x, self.b1, self.b2, self.b3, self.b4)


def fit_logistic(pred: ArrayLike, mos: ArrayLike, *, maxfev: int = 20000) -> LogisticFit:
    """Fit the 4-parameter logistic from predictions to labels by least squares.

    Initial values follow the usual recipe: asymptotes at the label extremes (ordered by the sign
    of the raw correlation so the fit starts on the right slope), midpoint at the mean
    prediction, width one standard deviation of the predictions. When ``scipy.optimize.curve_fit``
    does not converge, the fallback is a near-linear logistic (midpoint at the mean, width ten
    standard deviations, asymptotes set so that its slope matches the least-squares line), whose
    PLCC equals the raw PLCC to within a fraction of a percent.

    Args:
        pred: model predictions, shape (N,).
        mos: opinion scores, shape (N,).
        maxfev: evaluation budget for the optimiser.

    Returns:
        The fitted :class:`LogisticFit`.

    Raises:
        ValueError: fewer than :data:`LOGISTIC_MIN_POINTS` pairs.
    """
    x, y = _pair(pred, mos)
    if x.size < LOGISTIC_MIN_POINTS:
        raise ValueError(f"the logistic fit needs at least {LOGISTIC_MIN_POINTS} pairs, "
                         f"got {x.size}")
    sx = float(x.std()) or 1.0
    increasing = np.corrcoef(x, y)[0, 1] >= 0 if x.std() > 0 and y.std() > 0 else True
    hi, lo = float(y.max()), float(y.min())
    p0 = (hi, lo, float(x.mean()), sx) if increasing else (lo, hi, float(x.mean()), sx)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(logistic4, x, y, p0=p0, maxfev=maxfev)
        if np.all(np.isfinite(params)):
            b1, b2, b3, b4 = (float(v) for v in params)
            return LogisticFit(b1, b2, b3, abs(b4), converged=True)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        pass
    # Fallback: the logistic is linear near its midpoint with slope (b1 - b2) / (4 |b4|).
    slope = float(np.polyfit(x, y, 1)[0])
    width = 10.0 * sx
    half = 2.0 * slope * width
    mid_y = float(np.polyval(np.polyfit(x, y, 1), x.mean()))
    return LogisticFit(mid_y + half, mid_y - half, float(x.mean()), width, converged=False)


def plcc_logistic(pred: ArrayLike, mos: ArrayLike) -> float:
    """PLCC between the labels and the 4-parameter logistic fitted to the predictions.

    Signed: negative when the fitted logistic decreases (the model disagrees with the labels).
    NaN with fewer than :data:`LOGISTIC_MIN_POINTS` pairs.
    """
    x, y = _pair(pred, mos)
    if x.size < LOGISTIC_MIN_POINTS:
        return math.nan
    return _logistic_corr(fit_logistic(x, y), x, y)


def _logistic_corr(fit: LogisticFit, x: FloatArray, y: FloatArray) -> float:
    """PLCC of the fitted curve with the labels, negative when the fitted curve decreases.

    A decreasing fit means the model disagrees with people; keeping the sign stops a perfectly
    anti-correlated model from reporting a PLCC of +1 after the fit.
    """
    sign = 1.0 if fit.b1 >= fit.b2 else -1.0
    return sign * float(_pearson_rows(fit(x), y))


def bootstrap_ci(
    pred: ArrayLike,
    mos: ArrayLike,
    statistic: str,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of SRCC or PLCC.

    Resamples (prediction, label) pairs with replacement, all resamples at once as one
    ``(resamples, N)`` index matrix, so 1000 resamples of 2000 items take well under a second.

    Args:
        pred: predictions, shape (N,).
        mos: labels, shape (N,).
        statistic: ``"srcc"`` or ``"plcc"``.
        resamples: number of bootstrap resamples (>= 1).
        level: coverage of the interval, in (0, 1).
        seed: seed of the resampling generator (same seed, same interval).

    Returns:
        ``(low, high)``; NaN bounds when every resample was degenerate.
    """
    if statistic not in ("srcc", "plcc"):
        raise ValueError(f"statistic must be 'srcc' or 'plcc', got {statistic!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x, y = _pair(pred, mos)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    xs, ys = x[idx], y[idx]
    if statistic == "srcc":
        xs, ys = stats.rankdata(xs, axis=1), stats.rankdata(ys, axis=1)
    values = _pearson_rows(xs, ys)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return (float(low), float(high))


@dataclass(frozen=True)
class Metrics:
    """Agreement of one model's predictions with opinion scores.

    Correlations are signed so that positive means agreement (see the module docstring).

    Attributes:
        n: number of (prediction, label) pairs used.
        srcc, plcc, plcc_logistic, krcc: the correlations; ``plcc_logistic`` is NaN with fewer
            than :data:`LOGISTIC_MIN_POINTS` pairs.
        srcc_ci, plcc_ci: bootstrap percentile intervals, or None when not computed.
        logistic_converged: whether the logistic fit behind ``plcc_logistic`` converged (False
            when there was too little data to fit).
        flipped: whether predictions were negated before correlating.
    """

    n: int
    srcc: float
    plcc: float
    plcc_logistic: float
    krcc: float
    srcc_ci: tuple[float, float] | None = None
    plcc_ci: tuple[float, float] | None = None
    logistic_converged: bool = True
    flipped: bool = False


def compute_metrics(
    pred: ArrayLike,
    mos: ArrayLike,
    *,
    pred_higher_is_better: bool = True,
    mos_higher_is_better: bool = True,
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Metrics:
    """All metrics of one model on one dataset.

    Args:
        pred: predictions, shape (N,).
        mos: opinion scores, shape (N,).
        pred_higher_is_better: False for models like NIQE where a lower value means better.
        mos_higher_is_better: False for DMOS-style labels.
        bootstrap: bootstrap resamples for the SRCC and PLCC intervals; 0 skips them.
        level: interval coverage.
        seed: bootstrap seed.

    Returns:
        A :class:`Metrics`.
    """
    x, y = _pair(pred, mos)
    flipped = pred_higher_is_better != mos_higher_is_better
    if flipped:
        x = -x
    fit = fit_logistic(x, y) if x.size >= LOGISTIC_MIN_POINTS else None
    srcc_ci = plcc_ci = None
    if bootstrap > 0:
        srcc_ci = bootstrap_ci(x, y, "srcc", resamples=bootstrap, level=level, seed=seed)
        plcc_ci = bootstrap_ci(x, y, "plcc", resamples=bootstrap, level=level, seed=seed)
    return Metrics(
        n=int(x.size),
        srcc=srcc(x, y),
        plcc=plcc(x, y),
        plcc_logistic=_logistic_corr(fit, x, y) if fit is not None else math.nan,
        krcc=krcc(x, y),
        srcc_ci=srcc_ci,
        plcc_ci=plcc_ci,
        logistic_converged=fit is not None and fit.converged,
        flipped=flipped,
    )
