"""Evaluation against human opinion: scorers, the evaluation loop, tables and the synthetic check.

The correlations are those of :mod:`qualiclip.metrics` (SRCC, PLCC raw and after the logistic
fit, KRCC, bootstrap intervals), signed so that positive means the model agrees with people.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qualiclip.metrics import LOGISTIC_MIN_POINTS, FloatArray, Metrics, compute_metrics, srcc
from qualiclip.output_files import InputFiles, open_output

if TYPE_CHECKING:
    from qualiclip.model import Scorer


# --- scorers -----------------------------------------------------------------------------------


class ScoreRow(Protocol):
    """What a scorer yields per image (the engine's ``ScoreResult`` and ``NIQEResult`` both fit)."""

    @property
    def path(self) -> str: ...
    @property
    def score(self) -> float | None: ...
    @property
    def error(self) -> str | None: ...


class EvalScorer(Protocol):
    """The interface the evaluation loop needs from a method: QualiCLIP, CLIP-IQA or NIQE.

    (A :class:`qualiclip.model.Scorer`, what the engine scores with, becomes one through
    :class:`ModelScorer`.)
    """

    name: str
    higher_is_better: bool

    def score_paths(
        self, paths: Sequence[str | os.PathLike[str]], *, progress: bool = False
    ) -> Iterator[ScoreRow]: ...

    def score_tensors(self, images: Any) -> FloatArray: ...


class ModelScorer:
    """A :class:`qualiclip.model.Scorer` behind the :class:`EvalScorer` interface.

    Args:
        name: the label shown in tables and CSV columns.
        model: the scorer (QualiCLIP or an ONNX graph's; scores in [0, 1], higher is better).
        batch_size: images of equal size per forward pass.
        workers: decoding threads.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA) or ``"int8"`` (CPU): a resolved
            precision (:func:`create_scorer` resolves ``"auto"``), shown in the results table.
    """

    higher_is_better = True

    def __init__(
        self,
        name: str,
        model: Scorer,
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
    name: str,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    workers: int = 2,
    precision: str = "fp32",
    **model_options: Any,
) -> EvalScorer:
    """A scorer by name: ``"niqe"``, or any name or checkpoint ``create_model`` accepts.

    Args:
        name: ``"niqe"`` or a model name / checkpoint path.
        device: torch device for CLIP models (NIQE runs on CPU processes).
        batch_size: batch size for CLIP models.
        workers: NIQE processes, or decoding threads for CLIP models.
        precision: precision of CLIP models (see :mod:`qualiclip.precision`); ``"auto"`` is
            resolved here, once per model, and announced.
        model_options: further :func:`qualiclip.model.create_model` options (pooling, formula,
            cache_dir, trust_torchscript).

    Raises:
        ValueError: an unknown model, or a precision the device cannot run.
        FileNotFoundError: NIQE's pristine model is missing.
    """
    if name.lower() == "niqe":
        from qualiclip.niqe import NIQEScorer

        return NIQEScorer(workers=workers)
    from qualiclip.engine import resolve_precision
    from qualiclip.model import create_model

    model = create_model(name, device=device, **model_options)
    precision = resolve_precision(model, precision)  # checks it; auto resolved, announced
    return ModelScorer(name, model, batch_size=batch_size, workers=workers, precision=precision)


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
        precision: the precision a CLIP model ran in; None for other scorers (NIQE).
    """

    name: str
    metrics: Metrics | None
    n_used: int
    n_failed: int
    failures: tuple[tuple[str, str], ...]
    higher_is_better: bool
    precision: str | None = None


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
    scorers: Sequence[EvalScorer],
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
        scorers: the models (see :class:`EvalScorer`).
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
                        scorer.higher_is_better, getattr(scorer, "precision", None))
        )
        scores[scorer.name] = tuple(float(v) for v in col)
        errors[scorer.name] = tuple(err)
    return EvalReport(dataset, tuple((p, float(m)) for p, m in zip(paths, mos, strict=True)),
                      tuple(results), scores, errors)


def _ci(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else ""


def format_table(report: EvalReport) -> str:
    """The results as an aligned text table, one row per model."""
    head = ("model", "precision", "n", "failed", "SRCC", "95% CI", "PLCC", "95% CI", "PLCC-log",
            "KRCC")
    rows = [head]
    for r in report.models:
        m = r.metrics
        who = (r.name, r.precision or "-", str(r.n_used), str(r.n_failed))
        if m is None:
            rows.append((*who, "-", "", "-", "", "-", "-"))
            continue
        log = ("n/a" if math.isnan(m.plcc_logistic)
               else f"{m.plcc_logistic:.3f}" + ("" if m.logistic_converged else "*"))
        rows.append((*who, f"{m.srcc:.3f}", _ci(m.srcc_ci), f"{m.plcc:.3f}", _ci(m.plcc_ci), log,
                     f"{m.krcc:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(r.metrics is not None and math.isnan(r.metrics.plcc_logistic) for r in report.models):
        lines.append(f"n/a: PLCC-log needs at least {LOGISTIC_MIN_POINTS} scored images (its "
                     "4-parameter curve passes through fewer exactly)")
    return "\n".join(lines)


def write_scores_csv(
    report: EvalReport, path: str | os.PathLike[str], *, inputs: InputFiles | None = None
) -> None:
    """Per-image scores: ``path, mos, <one column per model>, error, precision`` (empty score =
    failed; ``precision``: ``model: precision`` of each model that has one, as ``error`` names
    each model's error, so every row says what computed its scores).

    Written whole or not at all (:func:`qualiclip.output_files.open_output`), never over one
    of ``inputs``.

    Raises:
        OutputError: the file could not be written (the message names it and the errno).
    """
    names = [m.name for m in report.models]
    precisions = "; ".join(f"{m.name}: {m.precision}" for m in report.models if m.precision)
    with open_output(path, "w", newline="", encoding="utf-8", inputs=inputs) as f:
        writer = csv.writer(f, lineterminator="\n")  # LF, as the other outputs
        writer.writerow(["path", "mos", *names, "error", "precision"])
        for i, (p, mos) in enumerate(report.items):
            vals = [report.scores[n][i] for n in names]
            errs = [f"{n}: {report.errors[n][i]}" for n in names if report.errors[n][i]]
            writer.writerow([p, repr(mos), *("" if math.isnan(v) else f"{v:.6g}" for v in vals),
                             "; ".join(errs), precisions])


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
    scorers: Sequence[EvalScorer],
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
    from qualiclip.model import NON_FINITE_SCORE

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
        except Exception as exc:  # noqa: BLE001 - every unreadable image is reported, never dropped
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
            except Exception as exc:  # noqa: BLE001 - a failed distortion is reported per image
                for s in scorers:
                    fails[s.name].append((f"{path} [{name}]", f"{type(exc).__name__}: {exc}"))
        if not batches:
            continue
        batch = torch.cat(batches)
        for s in scorers:
            try:
                scores = np.asarray(s.score_tensors(batch), dtype=np.float64)
            except Exception as exc:  # noqa: BLE001 - a scorer's failure is reported per image
                fails[s.name].append((str(path), f"{type(exc).__name__}: {exc}"))
                continue
            quality = scores if s.higher_is_better else -scores
            for i, name in enumerate(kinds):
                q = quality[i * NUM_LEVELS : (i + 1) * NUM_LEVELS]
                if not np.isfinite(q).all():  # the rule of every score: NaN is an error
                    fails[s.name].append((f"{path} [{name}]", NON_FINITE_SCORE))
                elif np.ptp(q) > 0:
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
