"""Tests for qualiclip.train: configuration, gradients, exact resume, export, DDP, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qualiclip import checkpoints, degradations, train, train_config
from qualiclip.cli import main
from qualiclip.losses import LossConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small synthetic 'photos': smooth gradients with texture."""
    folder = tmp_path_factory.mktemp("pristine")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128] / 128.0
    for n in range(8):
        base = np.stack([np.sin(xx * (n + 1) * 3), np.cos(yy * (n + 2) * 2), xx * yy], -1)
        img = (base * 0.4 + 0.5 + rng.normal(0, 0.05, base.shape)).clip(0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"p{n}.png")
    return folder


def _cfg(pristine: Path, out: Path, **schedule: int) -> train_config.TrainConfig:
    return train_config.load_config(
        preset="tiny",
        overrides={
            "data": {
                "pristine": str(pristine),
                "crop_size": 64,
                "batch_size": 2,
                "workers": 0,
                "val_every_kth": 4,
                "max_distortions": 2,
            },
            "schedule": {"max_steps": 4, "warmup_steps": 1, **schedule},
            "log": {
                "out": str(out),
                "log_every": 1,
                "checkpoint_every": 2,
                "keep_checkpoints": 0,
                "progress": False,
            },
            "validation": {"every": 0, "crops_per_image": 1, "compositions_per_crop": 1},
        },
    )


# --- configuration ---------------------------------------------------------------------------


def test_toml_overrides_preset_and_unknown_key_is_named(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('preset = "tiny"\n[optim]\nlr = 1\n[data]\nlevels = [1, 3, 5]\n')
    cfg = train_config.load_config(good, overrides={"schedule": {"max_steps": 7}})
    assert cfg.model.init == "random-tiny"  # from the preset
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.levels == (1, 3, 5)
    assert cfg.schedule.max_steps == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1e-5\n")
    with pytest.raises(ValueError, match=r"optim\.learning_rate.*valid keys here: .*lr"):
        train_config.load_config(bad)
    top = tmp_path / "top.toml"
    top.write_text("epoch = 3\n")
    with pytest.raises(ValueError, match="'epoch'.*schedule"):
        train_config.load_config(top)
    with pytest.raises(TypeError, match="data.crop_size"):
        train_config.config_from_dict({"data": {"crop_size": "big"}})
    with pytest.raises(ValueError, match="unknown preset"):
        train_config.load_config(preset="huge")


def test_config_round_trips_through_a_plain_dict() -> None:
    cfg = train_config.PRESETS["tiny"]
    plain = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert train_config.config_from_dict(plain) == cfg


def test_lr_schedule_warms_up_then_decays() -> None:
    f = [train.lr_factor(k, 4, 20, 0.1) for k in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:], strict=False))
    assert train.lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


# --- model and step --------------------------------------------------------------------------


def _step_setup(bn: str) -> tuple[train.SimilarityModel, torch.optim.Optimizer, dict]:
    cfg = train_config.ModelConfig(init="random-tiny", bn=bn)
    model, text_state = train.build_model(cfg)
    net = train.SimilarityModel(model)
    opt = train.make_optimizer(model, train_config.OptimConfig(lr=1e-3))
    batch = {
        "crops": torch.randint(
            0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    }
    train.set_train_mode(net, bn)
    return net, opt, batch


def test_gradients_reach_the_image_tower_and_nothing_else() -> None:
    net, opt, batch = _step_setup("train")
    prompts = net.model.prompt_features.clone()
    grads: dict[str, torch.Tensor] = {}
    hooks = [
        p.register_hook(lambda g, n=n: grads.__setitem__(n, g))
        for n, p in net.named_parameters()
        if p.requires_grad
    ]
    logs = train.train_step(
        net,
        batch,
        opt,
        generator=torch.Generator().manual_seed(1),
        loss=LossConfig(margin_rank=0.5),
    )
    for h in hooks:
        h.remove()
    names = [n for n, _ in net.named_parameters()]
    assert names and all(n.startswith("model.visual.") for n in names)  # no text tower here
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    # Pooling without positional embedding leaves that one tensor unused, hence frozen.
    assert set(names) - trainable == {"model.visual.attnpool.positional_embedding"}
    assert set(grads) == trainable  # every trainable image-tower parameter got a gradient
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert not net.model.prompt_features.requires_grad
    assert torch.equal(net.model.prompt_features, prompts)  # unchanged by the step
    assert set(logs) == {"loss", "cons", "pos", "neg", "grad_norm", "lr"}
    assert logs["loss"] > 0


@pytest.mark.parametrize("bn", ["frozen", "train"])
@pytest.mark.slow
def test_batch_norm_statistics_follow_the_bn_setting(bn: str) -> None:
    net, opt, batch = _step_setup(bn)
    bn1 = net.model.visual.bn1
    before = bn1.running_mean.clone()
    train.train_step(net, batch, opt, generator=torch.Generator().manual_seed(1))
    assert torch.equal(bn1.running_mean, before) == (bn == "frozen")
    assert net.training and bn1.training == (bn == "train")


def test_degrade_batch_shapes_and_mildest_level_is_closest() -> None:
    x = torch.rand(3, 2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    y = degradations.degrade_batch(x, torch.Generator().manual_seed(2), levels=(1, 5))
    assert y.shape == (3, 2, 2, 3, 48, 48)
    err = (y - x[:, None]).abs().mean(dim=(2, 3, 4, 5))  # [B, L]
    assert bool((err[:, 0] <= err[:, 1]).all())


# --- runs ------------------------------------------------------------------------------------


def _losses(out: Path) -> dict[int, tuple[float, ...]]:
    return {
        r["step"]: (r["loss"], r["cons"], r["pos"], r["neg"], r["grad_norm"])
        for r in checkpoints.iter_history(out)
        if "loss" in r
    }


@pytest.mark.slow
def test_resume_gives_bit_identical_losses(pristine: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    result = train.fit(_cfg(pristine, full))
    assert result["step"] == 4
    kept = [p.name for p in checkpoints.checkpoint_paths(full)]
    assert kept == ["ckpt-000002.pt", "ckpt-000004.pt"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "ckpt-000002.pt").write_bytes((full / "ckpt-000002.pt").read_bytes())
    train.fit(_cfg(pristine, resumed), resume=resumed / "ckpt-000002.pt")
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [3, 4]
    assert a[3] == b[3] and a[4] == b[4]  # exact, not approximate
    wa = torch.load(full / "model.pth", weights_only=True)
    wb = torch.load(resumed / "model.pth", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _loader_side(cfg: train_config.TrainConfig, workers: int) -> train_config.TrainConfig:
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, degrade_in="loader", workers=workers)
    )


@pytest.mark.slow
def test_loader_side_degradations_do_not_depend_on_the_worker_count(pristine: Path) -> None:
    from torch.utils.data import DataLoader

    from qualiclip.crops import PristineCropPairs, ResumableSampler, find_images

    pairs = PristineCropPairs(find_images(pristine), 48, seed=3)
    dataset = train.DegradedCropPairs(pairs, levels=(1, 3, 5), max_distortions=3, seed=3)
    # The parent's degradation threads exist before the workers fork (as after validation).
    degradations.degrade_batch(torch.zeros(1, 2, 3, 48, 48, dtype=torch.uint8),
                               torch.Generator().manual_seed(0), max_distortions=1)

    def batches(workers: int) -> list[dict]:
        loader = DataLoader(dataset, batch_size=3, num_workers=workers, drop_last=True,
                            sampler=ResumableSampler(len(dataset), seed=3, start=2))
        it = iter(loader)
        return [next(it) for _ in range(4)]  # past the end of the first epoch

    serial, parallel = batches(0), batches(2)
    for a, b in zip(serial, parallel, strict=True):
        assert a["degraded"].shape == (3, 3, 2, 3, 48, 48) and "crops" not in a
        assert torch.equal(a["degraded"], b["degraded"]) and torch.equal(a["index"], b["index"])
    # a sample's degradations depend on its key alone
    assert torch.equal(dataset[(1, 0)]["degraded"], dataset[(1, 0)]["degraded"])
    assert not torch.equal(dataset[(1, 0)]["degraded"], dataset[(1, 1)]["degraded"])
    assert not torch.equal(dataset[(1, 0)]["degraded"], dataset[(2, 0)]["degraded"])


def test_degradation_threads_work_in_a_forked_child() -> None:
    import multiprocessing

    degradations._threads().submit(int).result()  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply_async(_submit_in_child).get(timeout=30) == 7


def _submit_in_child() -> int:
    return int(degradations._threads().submit(int, "7").result(timeout=10))


@pytest.mark.slow
def test_resume_is_exact_with_loader_side_degradations(pristine: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    train.fit(_loader_side(_cfg(pristine, full), workers=0))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "ckpt-000002.pt").write_bytes((full / "ckpt-000002.pt").read_bytes())
    # resumed with two workers: the batches do not depend on the worker count
    train.fit(_loader_side(_cfg(pristine, resumed), workers=2),
              resume=resumed / "ckpt-000002.pt")
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [3, 4]
    assert a[3] == b[3] and a[4] == b[4]
    step = _losses(tmp_path / "full")
    plain = tmp_path / "plain"
    train.fit(_cfg(pristine, plain))
    assert _losses(plain)[1] != step[1]  # the loader's draws are not the step's


@pytest.mark.slow
def test_resume_refuses_a_changed_setting(pristine: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.fit(_cfg(pristine, out, max_steps=2))
    changed = dataclasses.replace(_cfg(pristine, out), loss=LossConfig(margin_rank=0.2))
    with pytest.raises(ValueError, match="loss.margin_rank"):
        train.fit(changed, resume=out / "ckpt-000002.pt")


@pytest.mark.slow
def test_exported_model_is_in_the_authors_format(pristine: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train.fit(_cfg(pristine, out, max_steps=2))
    assert [r["step"] for r in result["validation"]] == [0, 2]
    assert 0.0 <= result["validation"][-1]["level_accuracy"] <= 1.0
    sd = torch.load(out / "model.pth", weights_only=True)
    assert all(k.startswith("clip_model.") for k in sd if k != "prompts_features")
    init = train._init_state("random-tiny", 0)
    for key in ("text_projection", "token_embedding.weight", "logit_scale"):
        assert torch.equal(sd[f"clip_model.{key}"], init[key])  # text tower from the start point
    assert set(init) == {k[len("clip_model.") :] for k in sd if k != "prompts_features"}
    pf = sd["prompts_features"]
    assert pf.shape == (14, 64)
    assert torch.allclose(pf.norm(dim=-1), torch.ones(14))
    # The checkpoint alone rebuilds the same scorer.
    from qualiclip.clip import load_visual
    from qualiclip.model import QualiCLIP

    visual = load_visual(
        {k[len("clip_model.") :]: v for k, v in sd.items() if k.startswith("clip_model.visual.")}
    )
    exported = QualiCLIP(visual, pf).eval()
    rebuilt = checkpoints.model_from_checkpoint(out / "ckpt-000002.pt")
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(exported(x), rebuilt(x))
    json.loads((out / "config.json").read_text())


@pytest.mark.slow
def test_cli_train_runs_and_reports_usage_errors(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'preset = "tiny"\n[data]\nworkers = 0\nbatch_size = 2\n'
        "[validation]\ncrops_per_image = 1\ncompositions_per_crop = 1\n"
    )
    argv = [
        "train",
        "--pristine",
        str(pristine),
        "--out",
        str(out),
        "--config",
        str(cfg),
        "--crop-size",
        "64",
        "--max-steps",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out / "model.pth")
    assert main([*argv[:-3], "--max-steps", "3", "--resume", "--no-progress"]) == 0
    assert max(r["step"] for r in checkpoints.iter_history(out)) == 3
    cfg.write_text("[data]\ncrop = 64\n")
    assert main(argv) == 2
    assert "data.crop" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_gloo_run_completes_and_its_checkpoint_loads(
    pristine: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "qualiclip.cli",
        "train",
        "--preset",
        "tiny",
        "--pristine",
        str(pristine),
        "--out",
        str(out),
        "--crop-size",
        "64",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--max-steps",
        "2",
        "--val-every",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    from qualiclip import tokenizer

    # The workers need the vocabulary too (skipped, or failed in CI, when there is none here).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUALICLIP_VOCAB": str(tokenizer.vocab_path())}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = checkpoints.load_training_checkpoint(out / "ckpt-000002.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 2
    model = checkpoints.model_from_checkpoint(out / "ckpt-000002.pt")
    assert model(torch.rand(1, 3, 64, 64)).shape == (1,)


# --- bad data, run folders, failures ---------------------------------------------------------


@pytest.fixture(scope="module")
def with_bad(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic photos plus a truncated JPEG and a text file named ``.jpg``."""
    folder = tmp_path_factory.mktemp("with_bad")
    for path in pristine.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    Image.open(pristine / "p0.png").save(folder / "trunc.jpg", quality=90)
    full = (folder / "trunc.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (folder / "notes.jpg").write_text("not a photo")
    return folder


def _with(cfg: train_config.TrainConfig, **data: object) -> train_config.TrainConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


def _quick(pristine: Path, out: Path, **schedule: int) -> train_config.TrainConfig:
    """No held-out images: these tests are about files and folders, not about learning."""
    return _with(_cfg(pristine, out, **schedule), val_every_kth=0)


@pytest.mark.slow
def test_fit_skips_unusable_files_and_names_them(
    with_bad: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        result = train.fit(_quick(with_bad, out, max_steps=1))
    names = [Path(n).name for n, _ in result["skipped"]]
    assert names == ["notes.jpg", "trunc.jpg"]
    assert "notes.jpg" in caplog.text and "trunc.jpg" in caplog.text
    assert result["images"] == 8 and (out / "model.pth").is_file()
    event = next(r for r in checkpoints.iter_history(out) if r.get("event") == "images")
    assert sorted(Path(u["path"]).name for u in event["unusable"]) == names
    # With a header-only scan the truncated file reaches the workers: skipped there, by name.
    caplog.clear()
    quick = tmp_path / "quick"
    with caplog.at_level("WARNING"):
        result = train.fit(_with(_quick(with_bad, quick, max_steps=5), scan="header"))
    assert [Path(n).name for n, _ in result["skipped"]] == ["notes.jpg", "trunc.jpg"]
    assert caplog.text.count("trunc.jpg") == 1  # logged once, however often it is drawn
    skipped = [r for r in checkpoints.iter_history(quick) if r.get("event") == "skipped"]
    assert [Path(r["path"]).name for r in skipped] == ["trunc.jpg"]
    assert "truncated" in skipped[0]["reason"]


def test_strict_refuses_before_anything_is_written(with_bad: Path, tmp_path: Path) -> None:
    out = tmp_path / "strict"
    with pytest.raises(ValueError, match=r"2 of 10 pristine images are unusable.*notes.*trunc"):
        train.fit(_with(_cfg(with_bad, out), strict=True))
    assert not out.exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "failed"
    out.mkdir()
    (out / "notes.md").write_text("mine")

    def broken(*args: object, **kwargs: object) -> dict[str, float]:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train, "train_step", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        train.fit(_quick(pristine, out))
    assert [p.name for p in out.iterdir()] == ["notes.md"]  # config.json etc. removed, not mine
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        train.fit(_quick(pristine, fresh))
    assert not fresh.exists()


@pytest.mark.slow
def test_out_holding_a_run_is_refused_unless_resume_or_overwrite(
    pristine: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train.fit(_quick(pristine, out, max_steps=2))
    (out / "notes.md").write_text("not the trainer's")
    with pytest.raises(ValueError, match="holds another training run.*--resume.*--overwrite"):
        train.fit(_quick(pristine, out, max_steps=1))
    assert (out / "ckpt-000002.pt").is_file()  # the refused run touched nothing
    with pytest.raises(ValueError, match="exclude each other"):
        train.fit(_quick(pristine, out), resume=out / "ckpt-000002.pt", overwrite=True)
    train.fit(_quick(pristine, out, max_steps=1), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "ckpt-000001.pt",
        "config.json",
        "history.jsonl",
        "model.pth",
        "notes.md",
    ]
    assert max(r["step"] for r in checkpoints.iter_history(out)) == 1
    assert checkpoints.clear_run(out) and [p.name for p in out.iterdir()] == ["notes.md"]


def test_resume_names_each_differing_setting_and_allows_length_and_cadence() -> None:
    base = train_config.PRESETS["tiny"]
    saved = dataclasses.asdict(base)
    cadence = train_config.config_from_dict(
        {
            "schedule": {"max_steps": 3000, "epochs": 2},
            "log": {"log_every": 1, "checkpoint_every": 5, "keep_checkpoints": 0, "out": "x"},
            "validation": {"every": 7, "batch_size": 3},
            "data": {"workers": 0, "scan": "header", "strict": True},
            "device": "cpu",
        },
        base,
    )
    train_config.check_resumable(saved, cadence)
    changed = train_config.config_from_dict(
        {"loss": {"margin_rank": 0.7}, "validation": {"seed": 9}, "data": {"crop_size": 96}},
        base,
    )
    with pytest.raises(ValueError, match="ckpt-9") as err:
        train_config.check_resumable(saved, changed, "from ckpt-9")
    message = str(err.value)
    for key in ("data.crop_size (64 -> 96)", "loss.margin_rank", "validation.seed (1234 -> 9)"):
        assert key in message
    assert "schedule" not in message.split(";")[0]
    # A checkpoint written before a setting existed resumes with that setting's default.
    older = json.loads(json.dumps(saved))
    del older["data"]["scan"], older["data"]["strict"]
    train_config.check_resumable(older, base)


def test_toml_is_read_with_tomli_on_python_3_10(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import types

    parser = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    calls: list[str] = []

    def load(fh: object) -> dict:
        calls.append("tomli")
        return parser.load(fh)

    monkeypatch.setitem(sys.modules, "tomli", types.SimpleNamespace(load=load))
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on 3.10: no such module
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[optim]\nlr = 0.5\n')
    assert train_config.load_config(toml).optim.lr == 0.5
    assert calls == ["tomli"]


@pytest.mark.slow
def test_cli_train_exit_statuses_and_one_line_failures(
    with_bad: Path, pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'preset = "tiny"\n[data]\nworkers = 0\nbatch_size = 2\ncrop_size = 64\nval_every_kth = 0\n'
        "[validation]\nevery = 0\ncrops_per_image = 1\ncompositions_per_crop = 1\n"
    )
    out = tmp_path / "cli"

    def run(*extra: str, pristine_dir: Path = with_bad) -> tuple[int, str, str]:
        argv = ["train", "--config", str(cfg), "--pristine", str(pristine_dir), "--out", str(out)]
        code = main([*argv, "--max-steps", "1", "--no-progress", *extra])
        got = capsys.readouterr()
        return code, got.out, got.err

    code, _, err = run("--strict")
    assert code == 1 and not out.exists()
    assert [ln for ln in err.splitlines() if "error" in ln] == [
        f"qualiclip train: error: 2 of 10 pristine images are unusable (data.strict): "
        f"{with_bad / 'notes.jpg'}, {with_bad / 'trunc.jpg'}"
    ]
    code, stdout, err = run()
    assert code == 1  # trained, but not on every file: the status says so
    assert stdout.strip() == str(out / "model.pth")
    assert err.splitlines()[-1].startswith("trained 1 steps on 8 images; skipped 2 unusable")
    assert "notes.jpg" in err and "trunc.jpg" in err
    code, _, err = run()
    assert code == 2 and "holds another training run" in err and "Traceback" not in err
    code, _, err = run("--resume", "--lr", "0.5")
    assert code == 2 and "optim.lr (0.002 -> 0.5)" in err
    code, _, err = run("--resume", "--overwrite")
    assert code == 2 and "exclude each other" in err
    code, _, err = run("--overwrite", pristine_dir=pristine)
    assert code == 0 and "skipped" not in err

    def broken(*args: object, **kwargs: object) -> dict[str, float]:
        raise RuntimeError("CUDA error: an illegal memory access\nmore details here")

    monkeypatch.setattr(train, "train_step", broken)
    code, _, err = run("--overwrite", pristine_dir=pristine)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "qualiclip train: error: RuntimeError: CUDA error: an illegal memory access "
        "(--verbose for details)"
    )
    code, _, err = run("--overwrite", "--verbose", pristine_dir=pristine)
    assert code == 1 and "Traceback" in err


def test_a_dataloader_worker_failure_reads_as_the_worker_s_own_line() -> None:
    from qualiclip.cli import _one_line

    wrapped = RuntimeError(
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nRuntimeError: disk went away\n'
    )
    assert _one_line(wrapped) == "RuntimeError: disk went away"
    assert _one_line(ValueError("no usable image\nsecond line")) == "no usable image"
    assert _one_line(KeyError("model")) == "KeyError: 'model'"


def test_degrade_in_flag_reaches_the_configuration() -> None:
    from qualiclip.cli import _train_overrides, build_parser

    args = build_parser().parse_args(["train", "--degrade-in", "loader", "--out", "x"])
    assert _train_overrides(args)["data"]["degrade_in"] == "loader"
    cfg = train_config.config_from_dict(_train_overrides(args), train_config.PRESETS["tiny"])
    assert cfg.data.degrade_in == "loader"


def test_resuming_from_a_corrupt_checkpoint_is_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "ckpt-000001.pt"
    bad.write_bytes(b"PK\x03\x04 truncated archive")
    status = main(["train", "--preset", "tiny", "--out", str(tmp_path), "--resume", str(bad)])
    err = capsys.readouterr().err
    assert status == 2 and "is not a qualiclip training checkpoint" in err
    assert "Traceback" not in err and "weights_only" not in err


@pytest.mark.slow
def test_a_resume_reads_its_checkpoint_once(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train.fit(_cfg(pristine, out, max_steps=2))
    loads: list[str] = []
    real = checkpoints.load_training_checkpoint

    def counting(path: str | Path) -> dict:
        loads.append(str(path))
        return real(path)

    monkeypatch.setattr(train, "load_training_checkpoint", counting)
    plan = train.plan_run(
        overrides={"schedule": {"max_steps": 4}}, out=out, resume="latest"
    )
    assert plan.checkpoint == out / "ckpt-000002.pt" and plan.config.schedule.max_steps == 4
    result = train.fit(plan)
    assert result["step"] == 4
    assert loads == [str(out / "ckpt-000002.pt")]


@pytest.mark.slow
def test_orthogonal_prompt_features_train_without_a_text_tower(
    pristine: Path, tmp_path: Path
) -> None:
    features = train.orthogonal_prompt_features(7, 64, seed=3)
    assert torch.allclose(features @ features.T, torch.eye(14), atol=1e-5)
    assert torch.equal(features, train.orthogonal_prompt_features(7, 64, seed=3))
    with pytest.raises(ValueError, match="width"):
        train.orthogonal_prompt_features(7, 8)
    cfg = _cfg(pristine, tmp_path / "run", max_steps=2)
    model_cfg = dataclasses.replace(cfg.model, prompt_features="orthogonal")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    result = train.fit(cfg)
    sd = torch.load(result["model_path"], weights_only=True)
    # only the image tower, the logit scale and the fixed prompt features are exported
    assert {k for k in sd if not k.startswith("clip_model.visual.")} == {
        "clip_model.logit_scale", "prompts_features"
    }
    assert torch.allclose(sd["prompts_features"], train.orthogonal_prompt_features(7, 64, 0))
    from qualiclip import create_model

    model = create_model(result["model_path"])
    assert model(torch.rand(1, 3, 64, 64)).shape == (1,)
    with pytest.raises(ValueError, match="prompt_features"):
        train_config.check_config(dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, prompt_features="learned")))


def test_training_choices_are_checked_against_their_one_list(tmp_path: Path) -> None:
    """A flag offers what the configuration accepts, and the check names the same choices."""
    from qualiclip.cli import build_parser
    from qualiclip.precision import TRAIN_PRECISIONS
    from qualiclip.train_choices import BN_MODES, DEGRADE_IN

    parser = build_parser()
    for flag, choices in (("--bn", BN_MODES), ("--degrade-in", DEGRADE_IN),
                          ("--precision", TRAIN_PRECISIONS)):
        for value in choices:
            parser.parse_args(["train", "--out", "x", flag, value])
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "--out", "x", flag, "none-of-these"])
    base = dataclasses.replace(train_config.PRESETS["tiny"], data=dataclasses.replace(
        train_config.PRESETS["tiny"].data, pristine=str(tmp_path)))
    for section, key, bad in (("model", "bn", "thawed"), ("data", "degrade_in", "gpu"),
                              ("optim", "precision", "fp16")):
        cfg = train_config.config_from_dict({section: {key: bad}}, base)
        with pytest.raises(ValueError, match=rf"{section}\.{key} must be one of .*{bad!r}"):
            train_config.check_config(cfg)


def test_training_precisions_choose_the_autocast_dtype() -> None:
    from qualiclip.precision import TRAIN_PRECISIONS, train_autocast_dtype

    cpu = torch.device("cpu")
    assert TRAIN_PRECISIONS == ("auto", "fp32", "bf16")
    assert train_autocast_dtype("fp32", cpu) is None
    assert train_autocast_dtype("bf16", cpu) is torch.bfloat16
    assert train_autocast_dtype("auto", cpu) is None  # bf16 by itself on CUDA only
    with pytest.raises(ValueError, match="optim.precision must be one of auto, fp32, bf16"):
        train_autocast_dtype("fp16", cpu)


# --- hostile input, round 3: settings, non-finite losses, data changes, torn files, signals ------


def _numeric_keys() -> list[str]:
    """Every numeric setting of a run (ints, floats and tuples of them), by dotted key."""
    flat = train_config._flat(dataclasses.asdict(train_config.TrainConfig()))
    numeric = []
    for key, value in flat.items():
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            numeric.append(key)
    return sorted(numeric)


def _set(cfg: train_config.TrainConfig, key: str, value: object) -> train_config.TrainConfig:
    *sections, name = key.split(".")
    if not sections:
        return dataclasses.replace(cfg, **{name: value})
    section = getattr(cfg, sections[0])
    return dataclasses.replace(cfg, **{sections[0]: dataclasses.replace(section, **{name: value})})


def _bad_values(key: str, value: object) -> list[object]:
    if isinstance(value, tuple):
        first = value[0]
        bads: list[object] = [(), (-1, *value[1:]), (2**40, *value[1:])]
        if isinstance(first, float):
            bads += [(float("nan"), *value[1:]), (float("inf"), *value[1:])]
        return bads
    if isinstance(value, float):
        return [float("nan"), float("inf"), float("-inf"), -1.0]
    return [-1, 2**63]


def test_every_numeric_setting_is_checked_finite_and_in_range(pristine: Path) -> None:
    good = _set(train_config.PRESETS["tiny"], "data.pristine", str(pristine))
    train_config.check_config(good)
    keys = _numeric_keys()
    assert "optim.lr" in keys and "loss.weight_pos" in keys and "optim.betas" in keys
    for key in keys:
        section, _, name = key.rpartition(".")
        value = getattr(getattr(good, section) if section else good, name)
        for bad in _bad_values(key, value):
            with pytest.raises(ValueError, match=re.escape(key)):
                train_config.check_config(_set(good, key, bad))


def test_range_messages_write_integer_bounds_in_full(pristine: Path) -> None:
    good = _set(train_config.PRESETS["tiny"], "data.pristine", str(pristine))
    for key, bad, message in [
        ("data.batch_size", 0, "data.batch_size must be in [1, 2147483647], got 0"),
        ("schedule.min_lr_ratio", 1.5, "schedule.min_lr_ratio must be in [0, 1], got 1.5"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            train_config.check_config(_set(good, key, bad))


def test_the_presets_pass_the_checks(pristine: Path) -> None:
    for name, preset in train_config.PRESETS.items():
        train_config.check_config(_set(preset, "data.pristine", str(pristine)))
        assert name  # every preset, the long-running open run's included


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[model]\nprompt_pairs = [["Good photo."]]\n', "model.prompt_pairs"),
        ('[model]\nprompt_pairs = [["Good photo.", ""]]\n', "model.prompt_pairs"),
        ("[validation]\ncrops_per_image = 0\n", "validation.crops_per_image"),
        ("[loss]\nweight_pos = nan\n", "loss.weight_pos"),
        ("[schedule]\nmin_lr_ratio = nan\n", "schedule.min_lr_ratio"),
        ("[optim]\nlr = inf\n", "optim.lr"),
    ],
)
def test_cli_config_errors_name_their_key_and_exit_2(
    pristine: Path, tmp_path: Path, capsys, toml: str, key: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\n' + toml)
    code = main(["train", "--config", str(cfg), "--pristine", str(pristine),
                 "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_cli_lr_flag_inf_is_a_usage_error(pristine: Path, tmp_path: Path, capsys) -> None:
    code = main(["train", "--preset", "tiny", "--pristine", str(pristine), "--lr", "inf",
                 "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress"])
    assert code == 2 and "optim.lr" in capsys.readouterr().err


def _strict_json(line: str) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real = train.qualiclip_losses
    calls = [0]

    def poisoned(*args: object, **kwargs: object) -> dict:
        terms = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(train, "qualiclip_losses", poisoned)
    out = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\n[data]\nworkers = 0\nbatch_size = 2\ncrop_size = 64\n'
                   "val_every_kth = 0\n[log]\ncheckpoint_every = 2\nlog_every = 1\n")
    code = main(["train", "--config", str(cfg), "--pristine", str(pristine), "--out", str(out),
                 "--max-steps", "6", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err and "step 3" in err and "Traceback" not in err
    assert [p.name for p in checkpoints.checkpoint_paths(out)] == ["ckpt-000002.pt"]
    state = checkpoints.load_training_checkpoint(out / "ckpt-000002.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "model.pth").exists()
    lines = (out / "history.jsonl").read_text().splitlines()
    assert lines and all(_strict_json(ln) for ln in lines)
    assert max(_strict_json(ln).get("step", 0) for ln in lines) == 2


def test_logs_stay_json_when_a_metric_is_not_finite(tmp_path: Path) -> None:
    writer = checkpoints.RunWriter(tmp_path, True, 0)
    writer.log({"step": 1, "loss": 0.5, "grad_norm": float("inf")})
    writer.log_validation({"step": 1, "level_srcc": float("nan"), "level_accuracy": 0.5})
    for line in (tmp_path / "history.jsonl").read_text().splitlines():
        _strict_json(line)
    assert _strict_json((tmp_path / "history.jsonl").read_text().splitlines()[0])[
        "grad_norm"] is None
    assert json.loads((tmp_path / "validation.json").read_text(),
                      parse_constant=_strict_json)[0]["level_srcc"] is None


def test_init_weights_with_nan_are_refused_in_one_line(
    pristine: Path, tmp_path: Path, capsys
) -> None:
    from qualiclip.model import create_model

    state = create_model("random-tiny").official_state_dict()
    state["clip_model.visual.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    code = main(["train", "--preset", "tiny", "--pristine", str(pristine), "--init",
                 str(tmp_path / "nan.pth"), "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code in (1, 2) and "visual.conv1.weight holds 1 non-finite value" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for p in folder.iterdir():
        (to / p.name).write_bytes(p.read_bytes())
    return to


def _recorded_val(ckpt: Path) -> list[str]:
    return list(checkpoints.load_training_checkpoint(ckpt)["data"]["val"])


@pytest.mark.slow
def test_resume_refuses_changed_data_unless_allowed_and_keeps_validation_fixed(
    pristine: Path, tmp_path: Path, caplog
) -> None:
    data = _copy(pristine, tmp_path / "data")
    out = tmp_path / "run"
    train.fit(_cfg(data, out, max_steps=2))
    val = _recorded_val(out / "ckpt-000002.pt")
    assert len(val) == 2
    Image.open(data / "p0.png").save(data / "a-new.png")  # sorts first: a new every-kth split
    with pytest.raises(ValueError, match=r"data changed.*1 added.*--allow-data-change"):
        train.fit(train.plan_run(overrides=_overrides(data, out, 4), out=out, resume="latest"))
    plan = train.plan_run(overrides=_overrides(data, out, 4), out=out, resume="latest",
                          allow_data_change=True)
    train.fit(plan)
    assert _recorded_val(out / "ckpt-000004.pt") == val  # the held-out set did not move
    train_files = checkpoints.load_training_checkpoint(out / "ckpt-000004.pt")["data"]["train"]
    assert str(data / "a-new.png") in train_files and not set(train_files) & set(val)


def _overrides(data: Path, out: Path, steps: int) -> dict:
    return {"data": {"pristine": str(data)}, "log": {"out": str(out)},
            "schedule": {"max_steps": steps}}


@pytest.mark.slow
def test_a_checkpoint_without_a_data_record_resumes_and_says_so_once(
    pristine: Path, tmp_path: Path, caplog
) -> None:
    data = _copy(pristine, tmp_path / "data")
    out = tmp_path / "run"
    train.fit(_cfg(data, out, max_steps=2))
    old = checkpoints.load_training_checkpoint(out / "ckpt-000002.pt")
    del old["data"]  # as the checkpoints written before the record existed
    torch.save(old, out / "ckpt-000002.pt")
    Image.open(data / "p0.png").save(data / "a-new.png")
    with caplog.at_level("WARNING"):
        train.fit(train.plan_run(overrides=_overrides(data, out, 4), out=out, resume="latest",
                                 allow_data_change=True))
    assert caplog.text.count("could not be checked") == 1
    first = _recorded_val(out / "ckpt-000004.pt")  # the split as first computed, recorded now
    (data / "b-new.png").write_bytes((data / "p1.png").read_bytes())
    train.fit(train.plan_run(overrides=_overrides(data, out, 6), out=out, resume="latest",
                             allow_data_change=True))
    assert _recorded_val(out / "ckpt-000006.pt") == first


@pytest.mark.slow
def test_a_torn_history_line_and_a_torn_validation_file_do_not_stop_a_resume(
    pristine: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "run"
    train.fit(_cfg(pristine, out, max_steps=2))
    with open(out / "history.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # a crash in the middle of a write
    (out / "validation.json").write_text('[{"step": 0, "level_acc')
    with caplog.at_level("WARNING"):
        train.fit(train.plan_run(overrides={"schedule": {"max_steps": 3}}, out=out,
                                 resume="latest"))
    assert "history.jsonl" in caplog.text and "validation.json" in caplog.text
    records = [_strict_json(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in records) == 3
    assert [r["step"] for r in json.loads((out / "validation.json").read_text())] == [0, 2, 3]
    # A broken line in the middle is an error that names the file and the line.
    lines = (out / "history.jsonl").read_text().splitlines()
    lines[1] = lines[1][:5]
    (out / "history.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"history.jsonl line 2"):
        train.fit(train.plan_run(overrides={"schedule": {"max_steps": 4}}, out=out,
                                 resume="latest"))
    (out / "config.json").write_text('{"seed": ')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        train.plan_run(overrides={"schedule": {"max_steps": 4}}, out=out, resume="latest")


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_named_and_leaves_no_temporary_file(
    pristine: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from conftest import fill_disk_after
    from qualiclip import output_files

    out = tmp_path / "run"
    real = output_files._write

    def full_for_checkpoints(fd: int, data) -> int:
        if "ckpt-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, os.strerror(28))
        return real(fd, data)

    if not Path("/proc/self/fd").is_dir():
        fill_disk_after(monkeypatch, 0)
    else:
        monkeypatch.setattr(output_files, "_write", full_for_checkpoints)
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\n[data]\nworkers = 0\nbatch_size = 2\ncrop_size = 64\n'
                   "val_every_kth = 0\n[log]\ncheckpoint_every = 2\n")
    code = main(["train", "--config", str(cfg), "--pristine", str(pristine), "--out", str(out),
                 "--max-steps", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "ckpt-000002.pt: No space left on device (ENOSPC)" in err, err
    assert "unexpected pos" not in err and "Traceback" not in err
    assert not out.exists()  # failed before its first checkpoint: nothing left, no temporary file


def test_train_offers_the_trust_flag_its_torchscript_message_names(
    pristine: Path, tmp_path: Path, capsys
) -> None:
    from qualiclip.cli import build_parser

    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "ts.pt"))
    args = build_parser().parse_args(["train", "--out", "x", "--trust-torchscript"])
    assert args.trust_torchscript is True
    code = main(["train", "--preset", "tiny", "--init", str(tmp_path / "ts.pt"),
                 "--pristine", str(pristine), "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "--trust-torchscript" in err and "Traceback" not in err


_TRAIN_UNTIL_STOPPED = ["--preset", "tiny", "--crop-size", "64", "--batch-size", "2",
                        "--workers", "0", "--max-steps", "100000", "--checkpoint-every", "2",
                        "--val-every", "0", "--no-progress"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM to a child is POSIX-only here")
@pytest.mark.slow
def test_sigterm_stops_training_cleanly_with_143(pristine: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qualiclip.cli", "train", "--pristine", str(pristine),
         "--out", str(out), *_TRAIN_UNTIL_STOPPED],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "ckpt-000004.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert code == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    for line in (out / "history.jsonl").read_text().splitlines():
        _strict_json(line)
    last = checkpoints.checkpoint_paths(out)[-1]
    assert checkpoints.load_training_checkpoint(last)["step"] >= 4


@pytest.mark.slow
def test_cli_summary_names_the_held_out_images_and_only_rank_0_prints_it(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'preset = "tiny"\n[data]\nworkers = 0\nbatch_size = 2\ncrop_size = 64\nval_every_kth = 4\n'
        "[validation]\nevery = 0\ncrops_per_image = 1\ncompositions_per_crop = 1\n"
    )
    argv = ["train", "--config", str(cfg), "--pristine", str(pristine), "--max-steps", "1",
            "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    got = capsys.readouterr()
    assert got.err.splitlines()[-1] == (
        "trained 1 steps on 6 images; 2 more held out for validation")
    assert got.out.strip() == str(tmp_path / "a" / "model.pth")

    # Under torchrun every process runs the command: only rank 0 closes the run.
    real_fit = train.fit

    def fit_as_rank_1(*args: object, **kwargs: object) -> dict:
        return {**real_fit(*args, **kwargs), "main": False}  # type: ignore[arg-type]

    monkeypatch.setattr(train, "fit", fit_as_rank_1)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    got = capsys.readouterr()
    assert got.out == "" and "trained" not in got.err
