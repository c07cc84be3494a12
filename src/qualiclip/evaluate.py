"""Agreement with human opinion: SRCC, PLCC, KRCC, bootstrap intervals, and the evaluation loop.

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

Example:
    >>> m = compute_metrics([0.1, 0.4, 0.35, 0.8], [1.0, 2.0, 3.0, 4.0], bootstrap=0)
    >>> round(m.srcc, 3)
    0.8
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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
    """
    x, y = _pair(pred, mos)
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
    """
    x, y = _pair(pred, mos)
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
        srcc, plcc, plcc_logistic, krcc: the correlations.
        srcc_ci, plcc_ci: bootstrap percentile intervals, or None when not computed.
        logistic_converged: whether the logistic fit behind ``plcc_logistic`` converged.
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
    fit = fit_logistic(x, y)
    srcc_ci = plcc_ci = None
    if bootstrap > 0:
        srcc_ci = bootstrap_ci(x, y, "srcc", resamples=bootstrap, level=level, seed=seed)
        plcc_ci = bootstrap_ci(x, y, "plcc", resamples=bootstrap, level=level, seed=seed)
    return Metrics(
        n=int(x.size),
        srcc=srcc(x, y),
        plcc=plcc(x, y),
        plcc_logistic=_logistic_corr(fit, x, y),
        krcc=krcc(x, y),
        srcc_ci=srcc_ci,
        plcc_ci=plcc_ci,
        logistic_converged=fit.converged,
        flipped=flipped,
    )


# --- scorers -----------------------------------------------------------------------------------


class ScoreRow(Protocol):
    """What a scorer yields per image (the engine's ``ScoreResult`` and ``NIQEResult`` both fit)."""

    @property
    def path(self) -> str: ...
    @property
    def score(self) -> float | None: ...
    @property
    def error(self) -> str | None: ...


class Scorer(Protocol):
    """The interface the evaluation loop needs from a model: QualiCLIP, CLIP-IQA or NIQE."""

    name: str
    higher_is_better: bool

    def score_paths(
        self, paths: Sequence[str | os.PathLike[str]], *, progress: bool = False
    ) -> Iterator[ScoreRow]: ...

    def score_tensors(self, images: Any) -> FloatArray: ...


class ModelScorer:
    """A :class:`qualiclip.model.QualiCLIP` behind the :class:`Scorer` interface.

    Args:
        name: the label shown in tables and CSV columns.
        model: the QualiCLIP module (scores in [0, 1], higher is better).
        batch_size: images of equal size per forward pass.
        workers: decoding threads.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA).
    """

    higher_is_better = True

    def __init__(
        self,
        name: str,
        model: Any,
        *,
        batch_size: int = 8,
        workers: int = 2,
        precision: str = "fp32",
    ) -> None:
        self.name = name
        self.model = model
        self.batch_size = batch_size
        self.workers = workers
        self.precision = precision

    def score_paths(
        self, paths: Sequence[str | os.PathLike[str]], *, progress: bool = False
    ) -> Iterator[ScoreRow]:
        from qualiclip.engine import score_paths

        yield from score_paths(
            self.model,
            [str(p) for p in paths],
            batch_size=self.batch_size,
            workers=self.workers,
            precision=self.precision,  # type: ignore[arg-type]
            progress=progress,
        )

    def score_tensors(self, images: Any) -> FloatArray:
        """Scores of a batch ``[B, 3, H, W]`` of RGB in [0, 1], ``batch_size`` at a time."""
        from qualiclip.engine import score_tensors

        chunks = [
            score_tensors(self.model, images[i : i + self.batch_size], self.precision).numpy()
            for i in range(0, images.shape[0], self.batch_size)
        ]
        return np.concatenate(chunks).astype(np.float64)


def create_scorer(
    name: str, *, device: str = "cpu", batch_size: int = 8, workers: int = 2
) -> Scorer:
    """A scorer by name: ``"niqe"``, or any name or checkpoint ``create_model`` accepts.

    Args:
        name: ``"niqe"`` or a model name / checkpoint path.
        device: torch device for CLIP models (NIQE runs on CPU processes).
        batch_size: batch size for CLIP models.
        workers: NIQE processes, or decoding threads for CLIP models.
    """
    if name.lower() == "niqe":
        from qualiclip.niqe import NIQEScorer

        return NIQEScorer(workers=workers)
    from qualiclip.model import create_model

    model = create_model(name, device=device)
    return ModelScorer(name, model, batch_size=batch_size, workers=workers)


# --- evaluation on a human-rated dataset -------------------------------------------------------


@dataclass(frozen=True)
class ModelResult:
    """One model on one dataset.

    Attributes:
        name: the model's label.
        metrics: the correlations, or None when fewer than 3 images were scored.
        n_used: images scored.
        n_failed: images that could not be scored (missing, undecodable, too small...).
        failures: ``(path, error)`` of each failed image.
        higher_is_better: the model's own score direction.
    """

    name: str
    metrics: Metrics | None
    n_used: int
    n_failed: int
    failures: tuple[tuple[str, str], ...]
    higher_is_better: bool


@dataclass(frozen=True)
class EvalReport:
    """Every model on one dataset, plus the per-image table.

    Attributes:
        dataset: dataset name.
        items: the ``(path, mos)`` pairs evaluated.
        models: one :class:`ModelResult` per model, in the order given.
        scores: per model name, one score (NaN when failed) per item.
        errors: per model name, one error string (empty when scored) per item.
    """

    dataset: str
    items: tuple[tuple[str, float], ...]
    models: tuple[ModelResult, ...]
    scores: dict[str, tuple[float, ...]]
    errors: dict[str, tuple[str, ...]]

    @property
    def n_failed(self) -> int:
        """Images that failed for at least one model."""
        return sum(
            any(self.errors[m.name][i] for m in self.models) for i in range(len(self.items))
        )


def evaluate_items(
    items: Sequence[tuple[str, float]],
    scorers: Sequence[Scorer],
    *,
    dataset: str = "custom",
    mos_higher_is_better: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> EvalReport:
    """Score every image with every model and correlate with the opinion scores.

    Failed images are counted and listed per model; metrics use the images that model scored.

    Args:
        items: ``(image_path, mos)`` pairs.
        scorers: the models (see :class:`Scorer`).
        dataset: name for the report.
        mos_higher_is_better: False for DMOS labels.
        bootstrap: bootstrap resamples for the intervals (0: none).
        seed: bootstrap seed.
        progress: progress bars on stderr.

    Returns:
        An :class:`EvalReport`.
    """
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be distinct, got {names}")
    paths = [str(p) for p, _ in items]
    mos = np.asarray([m for _, m in items], dtype=np.float64)
    results, scores, errors = [], {}, {}
    for scorer in scorers:
        col = np.full(len(paths), np.nan)
        err = [""] * len(paths)
        for i, row in enumerate(scorer.score_paths(paths, progress=progress)):
            if row.error is None and row.score is not None and math.isfinite(row.score):
                col[i] = row.score
            else:
                err[i] = row.error or "no score"
        ok = np.isfinite(col)
        metrics = None
        if ok.sum() >= 3:
            metrics = compute_metrics(
                col[ok],
                mos[ok],
                pred_higher_is_better=scorer.higher_is_better,
                mos_higher_is_better=mos_higher_is_better,
                bootstrap=bootstrap,
                seed=seed,
            )
        failures = tuple((paths[i], err[i]) for i in range(len(paths)) if err[i])
        results.append(
            ModelResult(scorer.name, metrics, int(ok.sum()), len(failures), failures,
                        scorer.higher_is_better)
        )
        scores[scorer.name] = tuple(float(v) for v in col)
        errors[scorer.name] = tuple(err)
    return EvalReport(dataset, tuple((p, float(m)) for p, m in zip(paths, mos, strict=True)),
                      tuple(results), scores, errors)


def _ci(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else ""


def format_table(report: EvalReport) -> str:
    """The results as an aligned text table, one row per model."""
    head = ("model", "n", "failed", "SRCC", "95% CI", "PLCC", "95% CI", "PLCC-log", "KRCC")
    rows = [head]
    for r in report.models:
        m = r.metrics
        if m is None:
            rows.append((r.name, str(r.n_used), str(r.n_failed), "-", "", "-", "", "-", "-"))
            continue
        log = f"{m.plcc_logistic:.3f}" + ("" if m.logistic_converged else "*")
        rows.append((r.name, str(r.n_used), str(r.n_failed), f"{m.srcc:.3f}", _ci(m.srcc_ci),
                     f"{m.plcc:.3f}", _ci(m.plcc_ci), log, f"{m.krcc:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_scores_csv(report: EvalReport, path: str | os.PathLike[str]) -> None:
    """Per-image scores: ``path, mos, <one column per model>, error`` (empty score = failed)."""
    names = [m.name for m in report.models]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "mos", *names, "error"])
        for i, (p, mos) in enumerate(report.items):
            vals = [report.scores[n][i] for n in names]
            errs = [f"{n}: {report.errors[n][i]}" for n in names if report.errors[n][i]]
            writer.writerow([p, repr(mos), *("" if math.isnan(v) else f"{v:.6g}" for v in vals),
                             "; ".join(errs)])


# --- synthetic benchmark -----------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticResult:
    """How well one model ranks the 5 levels of each synthetic distortion.

    Attributes:
        name: the model's label.
        per_type: per distortion type, the mean over images of the SRCC between the model's
            quality (score, negated for lower-is-better models) and the negated level: +1 means
            quality falls at every step from level 1 to 5. NaN when no image gave a defined value.
        n_images: images used.
        failures: ``(path or type, error)`` for images or distortions that could not be scored.
    """

    name: str
    per_type: dict[str, float]
    n_images: int
    failures: tuple[tuple[str, str], ...]


def _center_crop(x: Any, size: int | None) -> Any:
    if size is None:
        return x
    h, w = x.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[..., top : top + size, left : left + size]


def evaluate_synthetic(
    paths: Sequence[str | os.PathLike[str]],
    scorers: Sequence[Scorer],
    *,
    crop: int | None = 512,
    seed: int = 0,
    progress: bool = False,
) -> tuple[SyntheticResult, ...]:
    """Degrade pristine images with every distortion type at levels 1..5 and rank the scores.

    Each image (centre-cropped to ``crop`` pixels to bound the cost; None keeps it whole) gets
    the 24 types of :mod:`qualiclip.degradations` at the 5 levels, with one seeded generator per
    (image, type), so every model sees the same degraded pixels.

    Args:
        paths: pristine images.
        scorers: the models.
        crop: side of the centre crop, or None.
        seed: base seed of the distortions' random parameters.
        progress: progress bar on stderr.

    Returns:
        One :class:`SyntheticResult` per model.
    """
    import torch

    from qualiclip.degradations import DISTORTION_TYPES, NUM_LEVELS, apply_distortion
    from qualiclip.images import load_image

    levels = list(range(1, NUM_LEVELS + 1))
    per: dict[str, dict[str, list[float]]] = {s.name: {t: [] for t in DISTORTION_TYPES}
                                              for s in scorers}
    fails: dict[str, list[tuple[str, str]]] = {s.name: [] for s in scorers}
    iterator: Any = list(enumerate(paths))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="synthetic", unit="img")
    used = 0
    for k, path in iterator:
        try:
            x = _center_crop(load_image(path), crop).unsqueeze(0).expand(NUM_LEVELS, -1, -1, -1)
        except Exception as exc:  # every unreadable image is reported, never dropped silently
            for s in scorers:
                fails[s.name].append((str(path), f"{type(exc).__name__}: {exc}"))
            continue
        used += 1
        batches, kinds = [], []
        for t_idx, name in enumerate(DISTORTION_TYPES):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + k * 101 + t_idx)
            try:
                batches.append(apply_distortion(x.contiguous(), name, levels, gen))
                kinds.append(name)
            except Exception as exc:
                for s in scorers:
                    fails[s.name].append((f"{path} [{name}]", f"{type(exc).__name__}: {exc}"))
        if not batches:
            continue
        batch = torch.cat(batches)
        for s in scorers:
            try:
                scores = np.asarray(s.score_tensors(batch), dtype=np.float64)
            except Exception as exc:
                fails[s.name].append((str(path), f"{type(exc).__name__}: {exc}"))
                continue
            quality = scores if s.higher_is_better else -scores
            for i, name in enumerate(kinds):
                q = quality[i * NUM_LEVELS : (i + 1) * NUM_LEVELS]
                if np.isfinite(q).all() and np.ptp(q) > 0:
                    per[s.name][name].append(srcc(q, -np.asarray(levels, dtype=np.float64)))
    return tuple(
        SyntheticResult(
            s.name,
            {t: float(np.mean(v)) if v else math.nan for t, v in per[s.name].items()},
            used,
            tuple(fails[s.name]),
        )
        for s in scorers
    )


def format_synthetic(results: Sequence[SyntheticResult]) -> str:
    """Per-type table (rows: distortion types grouped; columns: models), with group means."""
    from qualiclip.degradations import DISTORTION_GROUPS

    names = [r.name for r in results]
    rows: list[tuple[str, ...]] = [("group", "type", *names)]

    def fmt(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:+.3f}"

    for group, types in DISTORTION_GROUPS.items():
        for t in types:
            rows.append((group, t, *(fmt(r.per_type[t]) for r in results)))
    every = [t for ts in DISTORTION_GROUPS.values() for t in ts]
    means = []
    for r in results:
        vals = np.asarray([r.per_type[t] for t in every])
        means.append(float(vals[np.isfinite(vals)].mean()) if np.isfinite(vals).any() else math.nan)
    rows.append(("all", "mean", *(fmt(v) for v in means)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
