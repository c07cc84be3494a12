"""Metrics against SciPy, the logistic fit on known curves, bootstrap, the loop and the CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from conftest import run_main
from qualiclip import evaluate as E
from qualiclip import metrics as M
from qualiclip.niqe import NIQEResult

# Fixed arrays with ties in both vectors (ties are where hand-rolled rank code goes wrong).
PRED = np.array([0.3, 1.2, 1.2, 0.7, 2.5, 1.9, 0.1, 0.7, 3.0, 2.2, 1.5, 0.9])
MOS = np.array([1.0, 2.0, 2.5, 2.0, 4.1, 3.3, 1.1, 1.5, 4.8, 3.3, 2.9, 2.2])


def test_metrics_agree_with_scipy() -> None:
    assert M.srcc(PRED, MOS) == pytest.approx(stats.spearmanr(PRED, MOS).statistic, abs=1e-12)
    assert M.plcc(PRED, MOS) == pytest.approx(stats.pearsonr(PRED, MOS).statistic, abs=1e-12)
    assert M.krcc(PRED, MOS) == pytest.approx(stats.kendalltau(PRED, MOS).statistic, abs=1e-12)


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="length"):
        M.srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        M.plcc([1, 2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        M.krcc([1, np.nan, 3], [1, 2, 3])


@pytest.mark.parametrize("params", [(4.5, 1.2, 1.0, 0.7), (1.0, 5.0, -2.0, 1.5)])
def test_logistic_fit_recovers_known_parameters(params: tuple[float, ...]) -> None:
    rng = np.random.default_rng(1)
    x = np.sort(rng.uniform(-6, 6, 400))
    y = M.logistic4(x, *params) + rng.normal(scale=0.02, size=x.size)
    fit = M.fit_logistic(x, y)
    assert fit.converged
    np.testing.assert_allclose([fit.b1, fit.b2, fit.b3, fit.b4], params, atol=0.05)
    assert M.plcc_logistic(x, y) * np.sign(params[0] - params[1]) > 0.999


def test_logistic_fallback_when_fit_fails() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=200)
    y = 2 * x + rng.normal(size=200)
    fit = M.fit_logistic(x, y, maxfev=1)  # an evaluation budget of 1 makes curve_fit give up
    assert not fit.converged
    # The near-linear fallback keeps the raw linear agreement.
    assert np.corrcoef(fit(x), y)[0, 1] == pytest.approx(M.plcc(x, y), abs=2e-3)


def test_bootstrap_matches_a_plain_loop() -> None:
    lo, hi = M.bootstrap_ci(PRED, MOS, "srcc", resamples=200, seed=3)
    idx = np.random.default_rng(3).integers(0, PRED.size, size=(200, PRED.size))
    loop = [stats.spearmanr(PRED[i], MOS[i]).statistic for i in idx]
    loop = np.asarray(loop)[np.isfinite(loop)]
    np.testing.assert_allclose([lo, hi], np.quantile(loop, [0.025, 0.975]), atol=1e-9)
    assert M.bootstrap_ci(PRED, MOS, "srcc", resamples=200, seed=3) == (lo, hi)
    assert lo <= M.srcc(PRED, MOS) <= hi


def test_lower_is_better_flips_sign_once() -> None:
    up = M.compute_metrics(PRED, MOS, bootstrap=0)
    niqe_like = M.compute_metrics(-PRED, MOS, pred_higher_is_better=False, bootstrap=0)
    assert niqe_like.flipped and niqe_like.srcc == pytest.approx(up.srcc)
    assert niqe_like.plcc == pytest.approx(up.plcc)
    # A lower-is-better model on DMOS labels: two flips cancel.
    both = M.compute_metrics(-PRED, -MOS, pred_higher_is_better=False,
                             mos_higher_is_better=False, bootstrap=0)
    assert not both.flipped and both.krcc == pytest.approx(up.krcc)
    anti = M.compute_metrics(-PRED, MOS, bootstrap=0)
    assert anti.srcc < 0 and anti.plcc_logistic < 0


@pytest.mark.parametrize("n", [3, 4])
def test_logistic_plcc_is_undefined_below_the_points_a_fit_needs(n: int) -> None:
    # Four parameters through four points or fewer: the curve can pass through them all, so its
    # PLCC would be 1 by construction (or the fit would refuse to run at all).
    m = M.compute_metrics(PRED[:n], MOS[:n], bootstrap=0)
    assert np.isnan(m.plcc_logistic) and not m.logistic_converged
    assert m.srcc == pytest.approx(M.srcc(PRED[:n], MOS[:n]))
    assert np.isnan(M.plcc_logistic(PRED[:n], MOS[:n]))
    five = M.compute_metrics(PRED[:M.LOGISTIC_MIN_POINTS], MOS[:M.LOGISTIC_MIN_POINTS],
                             bootstrap=0)
    assert np.isfinite(five.plcc_logistic)


@pytest.mark.slow
def test_cli_eval_on_three_images_reports_logistic_plcc_as_undefined(tmp_path: Path) -> None:
    for i in range(3):
        _photo(tmp_path / f"{i}.png", i)
    table = tmp_path / "labels.csv"
    table.write_text("path,score\n" + "".join(f"{i}.png,{i + 1}\n" for i in range(3)))
    proc = subprocess.run(
        [sys.executable, "-m", "qualiclip.cli", "eval", "--dataset", str(table), "--model",
         "random-tiny", "--device", "cpu", "--bootstrap", "10", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    row = next(line.split() for line in proc.stdout.splitlines()
               if line.startswith("random-tiny"))
    assert "n/a" in row
    assert f"PLCC-log needs at least {M.LOGISTIC_MIN_POINTS}" in proc.stdout


class FakeScorer:
    """Scores = a known function of the MOS, or an error for chosen paths."""

    def __init__(self, name: str, table: dict[str, float], higher_is_better: bool = True):
        self.name, self.table, self.higher_is_better = name, table, higher_is_better

    def score_paths(self, paths, *, progress=False):  # type: ignore[no-untyped-def]
        for p in paths:
            ok = p in self.table
            yield NIQEResult(p, self.table.get(p), None if ok else "broken")

    def score_tensors(self, images):  # type: ignore[no-untyped-def]
        # Sharpness: mean absolute horizontal gradient (falls as blur rises).
        return (images[..., 1:] - images[..., :-1]).abs().mean(dim=(1, 2, 3)).double().numpy()


def test_evaluate_items_counts_failures_and_writes_csv(tmp_path: Path) -> None:
    items = [(f"img{i}.png", float(m)) for i, m in enumerate(MOS)]
    good = {p: float(-3 * m) for p, m in items[:-2]}  # perfect but lower-is-better
    report = E.evaluate_items(
        items, [FakeScorer("a", good, higher_is_better=False)], bootstrap=50
    )
    (res,) = report.models
    assert (res.n_used, res.n_failed) == (len(items) - 2, 2)
    assert res.metrics is not None and res.metrics.srcc == pytest.approx(1.0)
    assert [p for p, _ in res.failures] == ["img10.png", "img11.png"]
    assert report.n_failed == 2 and "a" in E.format_table(report)
    out = tmp_path / "scores.csv"
    E.write_scores_csv(report, out)
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [p for p, _ in items]
    assert rows[-1]["a"] == "" and rows[-1]["error"] == "a: broken"
    assert float(rows[0]["a"]) == pytest.approx(-3 * MOS[0])


def test_table_and_csv_name_each_models_precision(tmp_path: Path) -> None:
    """A CLIP model's precision (as it ran, ``auto`` resolved) is in the table and every CSV
    row; a scorer without one (NIQE) shows ``-`` and is left out of the CSV's column."""
    items = [(f"img{i}.png", float(m)) for i, m in enumerate(MOS)]
    table = {p: float(m) for p, m in items}
    clip = FakeScorer("clip", table)
    clip.precision = "int8"  # type: ignore[attr-defined]
    report = E.evaluate_items(items, [clip, FakeScorer("plain", table)], bootstrap=0)
    assert [m.precision for m in report.models] == ["int8", None]
    lines = E.format_table(report).splitlines()
    assert lines[0].split()[:2] == ["model", "precision"]
    assert lines[2].split()[:2] == ["clip", "int8"] and lines[3].split()[:2] == ["plain", "-"]
    out = tmp_path / "scores.csv"
    E.write_scores_csv(report, out)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(items) and {r["precision"] for r in rows} == {"clip: int8"}


def test_synthetic_benchmark_ranks_blur(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "p.png")
    (res,) = E.evaluate_synthetic([tmp_path / "p.png"], [FakeScorer("sharp", {})], crop=None)
    assert res.n_images == 1
    assert res.per_type["gaussian_blur"] == pytest.approx(1.0)
    assert res.per_type["lens_blur"] == pytest.approx(1.0)
    assert "gaussian_blur" in E.format_synthetic([res])


def _photo(path: Path, seed: int) -> None:
    from skimage import data

    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, 200, size=2)
    crop = data.astronaut()[top : top + 256, left : left + 256].astype(np.float64)
    crop += rng.normal(scale=3 * seed, size=crop.shape)  # different quality per image
    Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(path)


@pytest.mark.slow
def test_cli_eval_csv_with_niqe_reports_failed_image(tmp_path: Path) -> None:
    from test_niqe import niqe_env

    for i in range(4):
        _photo(tmp_path / f"good {i}.png", i)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    table = tmp_path / "labels.csv"
    table.write_text("path,score\n" + "".join(
        f"{name},{5 - k}\n" for k, name in
        enumerate(["good 0.png", "good 1.png", "bad.png", "good 2.png", "good 3.png"])
    ))
    out = tmp_path / "scores.csv"
    env = {**os.environ, **niqe_env()}
    proc = subprocess.run(
        [sys.executable, "-m", "qualiclip.cli", "eval", "--dataset", str(table), "--model",
         "niqe", "--output", str(out), "--bootstrap", "100", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    row = next(line.split() for line in lines if line.startswith("niqe"))
    assert row[1:4] == ["-", "4", "1"]  # no precision (not a CLIP model), n used, n failed
    assert "bad.png" in proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and rows[2]["niqe"] == "" and rows[2]["error"].startswith("niqe: ")
    assert {r["precision"] for r in rows} == {""}


def test_cli_eval_usage_errors(tmp_path: Path) -> None:
    from qualiclip.cli import main

    assert main(["eval", "--dataset", "nope", "--root", str(tmp_path), "--model", "niqe"]) == 2
    assert main(["eval", "--dataset", "biq2021", "--root", str(tmp_path / "missing")]) == 2


def test_model_scorer_chunks_batches() -> None:
    class Tiny(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))

    x = torch.rand(5, 3, 8, 8)
    got = E.ModelScorer("t", Tiny(), batch_size=2).score_tensors(x)
    np.testing.assert_allclose(got, x.mean(dim=(1, 2, 3)).numpy(), rtol=1e-6)


@pytest.mark.slow
def test_eval_cli_refuses_bad_labels_before_scoring(tmp_path: Path) -> None:
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "nan.csv").write_text("path,score\n0.png,1\n1.png,nan\n")
    run = subprocess.run(
        [sys.executable, "-m", "qualiclip.cli", "eval", "--dataset", str(tmp_path / "nan.csv"),
         "--model", "random-tiny", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2 and "nan.csv row 3" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_eval_help_and_failures_read_cleanly(tmp_path: Path) -> None:
    help_text = run_main("eval", "--help").stdout
    assert "95% intervals" in help_text and "%%" not in help_text
    for i in range(3):
        _photo(tmp_path / f"{i}.png", i)
    table = tmp_path / "labels.csv"
    table.write_text("path,score\n" + "".join(f"{i}.png,{i}\n" for i in range(3))
                     + "gone.png,3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "qualiclip.cli", "eval", "--dataset", str(table), "--model",
         "random-tiny", "--device", "cpu", "--bootstrap", "0", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    (line,) = [ln for ln in proc.stderr.splitlines() if "gone.png" in ln]
    assert line == f"random-tiny: failed: {tmp_path / 'gone.png'}: no such file"
    out = tmp_path / "scores.csv"
    subprocess.run(
        [sys.executable, "-m", "qualiclip.cli", "eval", "--dataset", str(table), "--model",
         "random-tiny", "--device", "cpu", "--bootstrap", "0", "--no-progress", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert b"\r" not in out.read_bytes()  # CSV lines end in LF
