"""``qualiclip tune``: prompt learning on opinion scores, on a tiny model and a generated set.

Images are smooth gradients with noise whose strength sets their opinion score, so the task is
learnable; the base is ``random-tiny`` (text tower included), crops are small: each run takes
seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qualiclip import cli, tune
from qualiclip.losses import opinion_losses
from qualiclip.model import create_model
from qualiclip.prompt_learning import read_prompt_file

pytestmark = pytest.mark.slow  # among the heaviest: `scripts/test.sh --fast` leaves it out


@pytest.fixture(scope="module")
def rated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images, ``path,score`` CSV; the noisier, the lower the score."""
    root = tmp_path_factory.mktemp("rated")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        ramp = np.linspace(40, 215, 48 * 56).reshape(48, 56, 1)
        sigma = 3 * (i % 12)
        pixels = np.clip(ramp + rng.normal(0, sigma + 0.1, (48, 56, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"im{i:02d}.png")
        rows.append((f"im{i:02d}.png", 5 - sigma / 10))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "score"), *rows])
    return root / "labels.csv"


def _config(rated: Path, out: Path, **changes: object) -> tune.TuneConfig:
    base = dict(model="random-tiny", dataset=str(rated), out=str(out), epochs=2, batch_size=4,
                crop=32, workers=0, bootstrap=50, progress=False, n_ctx=4, lr=0.05)
    return tune.TuneConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_opinion_losses_are_pyiqas() -> None:
    pred = torch.tensor([0.2, 0.4, 0.9], requires_grad=True)
    mos = torch.tensor([0.1, 0.5, 0.7])
    terms = opinion_losses(pred, mos)
    r = np.corrcoef(pred.detach().numpy(), mos.numpy())[0, 1]
    assert terms["mse"].item() == pytest.approx(np.mean((pred.detach().numpy() - mos.numpy())**2))
    assert terms["plcc"].item() == pytest.approx((1 - r) / 2, abs=1e-6)
    assert terms["total"].item() == pytest.approx(terms["mse"].item() + terms["plcc"].item())
    one = opinion_losses(pred[:1], mos[:1])
    assert one["plcc"].item() == pytest.approx(0.1)  # batch of one: the absolute error


def test_split_is_seeded_disjoint_and_normalised(rated: Path, tmp_path: Path) -> None:
    cfg = _config(rated, tmp_path / "a", val_fraction=0.25)
    split = tune.make_split(cfg)
    assert len(split.val) == 6 and len(split.train) == 18
    assert not {p for p, _ in split.train} & {p for p, _ in split.val}
    targets = [m for _, m in split.train + split.val]
    assert min(targets) == 0.0 and max(targets) == 1.0  # a CSV's own range, mapped to [0, 1]
    assert tune.make_split(cfg) == split
    assert tune.make_split(_config(rated, tmp_path / "a", seed=1)).val != split.val
    dmos = tune.make_split(_config(rated, tmp_path / "a", dmos=True))
    flipped = {p: m for p, m in dmos.train + dmos.val}
    assert all(flipped[p] == pytest.approx(1 - m) for p, m in split.train)
    with pytest.raises(ValueError, match="at least 3 held out"):
        tune.make_split(_config(rated, tmp_path / "a", limit=8))


def test_batches_are_repeatable_and_cover_the_epoch() -> None:
    first = tune.epoch_batches(10, 4, seed=1, epoch=0)
    assert first == tune.epoch_batches(10, 4, seed=1, epoch=0)
    assert first != tune.epoch_batches(10, 4, seed=1, epoch=1)
    assert [len(b) for b in first] == [4, 4]  # full batches only
    items = [i for batch in first for i, _ in batch]
    assert len(set(items)) == 8
    assert len({s for batch in first for _, s in batch}) == 8  # every crop its own seed
    assert tune.epoch_batches(3, 8, seed=0, epoch=0)[0].__len__() == 3


def test_lr_follows_pyiqas_cosine_per_epoch(rated: Path, tmp_path: Path) -> None:
    cfg = _config(rated, tmp_path, epochs=50, lr=2e-3)
    assert tune.lr_at(cfg, 0) == pytest.approx(2e-3)
    assert tune.lr_at(cfg, 25) == pytest.approx(1e-3)
    assert tune.lr_at(cfg, 50) == pytest.approx(0.0, abs=1e-12)


def test_steps_learn_the_context_only(rated: Path, tmp_path: Path) -> None:
    cfg = _config(rated, tmp_path)
    tuner = tune.build_tuner(cfg)
    frozen = {k: v.clone() for k, v in tuner.base.state_dict().items()}
    text_before = {k: v.clone() for k, v in tuner.clip.state_dict().items()
                   if not k.startswith("visual.")}
    batch, targets = torch.rand(4, 3, 32, 32), torch.tensor([0.1, 0.4, 0.6, 0.9])
    ctx = tuner.learned.ctx.detach().clone()
    losses = [tune.tune_step(tuner, batch, targets, cfg)["total"] for _ in range(15)]
    assert losses[-1] < losses[0]  # one batch is fitted
    assert not torch.equal(tuner.learned.ctx, ctx)
    for k, v in tuner.base.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    for k, v in text_before.items():
        assert torch.equal(tuner.clip.state_dict()[k], v), k


def test_run_writes_a_prompt_file_that_scores_as_evaluated(rated: Path, tmp_path: Path) -> None:
    cfg = _config(rated, tmp_path / "run")
    result = tune.tune(cfg, log=lambda _: None)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == sorted(tune.RUN_FILES)
    assert result.steps == 2 * (18 // 4) and result.failures == []
    split = json.loads((out / "split.json").read_text())
    assert "learned on the 'train' images" in split["trained_on"]
    raw = torch.load(result.prompts, weights_only=True)
    assert set(raw["params"]) == {"prompt_learner.ctx", "prompt_learner.token_prefix",
                                  "prompt_learner.token_suffix"}
    assert raw["qualiclip"]["base"] == "random-tiny" and raw["qualiclip"]["n_ctx"] == 4
    # The evaluation's "after" is what the prompt file gives when scoring the held-out images.
    model = create_model("random-tiny", prompts=result.prompts)
    base = create_model("random-tiny")
    paths = [p for p, _ in split["val"]]
    mos = [m for _, m in split["val"]]
    from qualiclip import metrics
    from qualiclip.engine import score

    after = [score(model, p) for p in paths]
    before = [score(base, p) for p in paths]
    ev = result.evaluation
    assert ev["images"] == 5
    assert ev["after"]["srcc"] == pytest.approx(metrics.srcc(after, mos), abs=1e-9)
    assert ev["before"]["srcc"] == pytest.approx(metrics.srcc(before, mos), abs=1e-9)
    lo, hi = ev["after"]["srcc_ci"]
    assert lo <= hi
    assert json.loads((out / "evaluation.json").read_text())["after"]["srcc"] == ev["after"]["srcc"]
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r.get("event") == "validation"] == [1, 2]
    assert read_prompt_file(result.prompts).learned  # loadable


def test_resume_is_exact(rated: Path, tmp_path: Path) -> None:
    whole = tune.tune(_config(rated, tmp_path / "whole"), log=lambda _: None)
    part = _config(rated, tmp_path / "part", max_steps=3)  # stops inside the first epoch
    assert tune.tune(part, log=lambda _: None).steps == 3
    resumed = tune.tune(_config(rated, tmp_path / "part"), resume=True, log=lambda _: None)
    assert resumed.steps == whole.steps
    a = torch.load(whole.prompts, weights_only=True)["params"]
    b = torch.load(resumed.prompts, weights_only=True)["params"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "history.jsonl").read_text()
             .splitlines() if "event" not in x]
    assert steps == list(range(whole.steps))  # nothing logged twice


def test_folders_and_resume_are_checked(rated: Path, tmp_path: Path) -> None:
    tune.tune(_config(rated, tmp_path / "run", epochs=1), log=lambda _: None)
    with pytest.raises(ValueError, match="--resume, or replace it with --overwrite"):
        tune.tune(_config(rated, tmp_path / "run", epochs=1), log=lambda _: None)
    with pytest.raises(ValueError, match="lr: 0.05 -> 0.1"):
        tune.tune(_config(rated, tmp_path / "run", lr=0.1), resume=True, log=lambda _: None)
    with pytest.raises(ValueError, match="no tune-state.pt"):
        tune.tune(_config(rated, tmp_path / "empty"), resume=True, log=lambda _: None)
    with pytest.raises(ValueError, match="val_fraction"):
        _config(rated, tmp_path, val_fraction=1.0)


def test_cli_tune(rated: Path, tmp_path: Path, capsys) -> None:
    args = ["tune", "--model", "random-tiny", "--dataset", str(rated), "--out",
            str(tmp_path / "cli"), "--epochs", "1", "--crop", "32", "--batch-size", "4",
            "--workers", "0", "--n-ctx", "4", "--bootstrap", "20", "--no-progress",
            "--device", "cpu"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "cli" / "prompts.pth")
    assert "held-out split: 5 images; SRCC [95% interval] without learned prompts" in captured.err
    assert cli.main(args) == 2  # the folder holds the run now
    assert "--resume, or replace it with --overwrite" in capsys.readouterr().err
    assert cli.main([*args[:3], "--dataset", str(tmp_path / "none.csv"), *args[5:],
                     "--overwrite"]) == 2
    assert cli.main(["score", str(rated.parent / "im00.png"), "--model", "random-tiny",
                     "--prompts", str(tmp_path / "cli" / "prompts.pth")]) == 0


def test_unreadable_training_images_are_skipped_and_named(rated: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    lines = rated.read_text().splitlines()
    for line in lines[1:]:
        name = line.split(",")[0]
        (root / name).write_bytes((rated.parent / name).read_bytes())
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "labels.csv").write_text("\n".join([*lines, "broken.png,2.0"]) + "\n")
    result = tune.tune(_config(root / "labels.csv", tmp_path / "run", seed=5),
                       log=lambda _: None)
    assert any("broken.png" in f for f in result.failures)
