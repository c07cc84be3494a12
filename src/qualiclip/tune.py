"""Prompt learning on human opinion scores (QualiCLIP+): ``qualiclip tune``.

QualiCLIP itself needs no opinion scores. Where a rated dataset exists, pyiqa's QualiCLIP+ learns
prompt context on it (:mod:`qualiclip.prompt_learning`): the image tower and the text tower stay
frozen and only the context vectors train. pyiqa's recipe (``options/train/QualiCLIP/*.yml``) is
the default: 16 vectors per prompt, Adam at 2e-3, a cosine schedule over 50 epochs stepped once
per epoch, MSE + PLCC loss (:func:`qualiclip.losses.opinion_losses`) on opinion scores normalised
to [0, 1] by the dataset's range, random 384-pixel crops with horizontal flips, batches of 8, and
the score ``mean over pairs of softmax(exp(logit_scale) / 2 * cos)[0]``.

A run folder (``--out``) holds:

* ``split.json``: which images trained the prompts and which were held out, with the dataset's
  name. Scores of the training images no longer measure anything: evaluate on the held-out ones
  (for ``biq2021``, whose test split is otherwise never trained on, the file says so);
* ``prompts.pth``: the prompts in pyiqa's format, rewritten after each epoch
  (``qualiclip score --model BASE --prompts DIR/prompts.pth``; pyiqa loads it too);
* ``tune-state.pt``: the learner, the optimizer and the position, for ``--resume``;
* ``history.jsonl``: the loss every step, held-out SRCC/PLCC every epoch;
* ``evaluation.json``: the held-out split scored by the base model as it is and with the
  learned prompts: SRCC and PLCC with bootstrap 95% intervals.

Runs resume exactly: the batches of an epoch depend on ``(seed, epoch)`` and the crops of a
batch on ``(seed, epoch, batch)`` only. The held-out images' features are computed once at
full resolution (the towers are frozen), so validating costs a matrix product.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from qualiclip import datasets, images, metrics
from qualiclip.clip import CLIP, build_clip
from qualiclip.losses import opinion_losses
from qualiclip.model import QualiCLIP, create_model, resolve_device, scores_from_similarities
from qualiclip.pretrained import resolve_weights
from qualiclip.prompt_learning import PYIQA_TEMPERATURE, LearnedPrompts, save_prompt_file
from qualiclip.prompts import PROMPT_PAIRS, flatten_pairs
from qualiclip.tokenizer import tokenize
from qualiclip.weight_files import load_tensors

STATE_FORMAT = "qualiclip-tune-1"
#: Files ``tune`` writes in its folder (and ``--overwrite`` removes).
RUN_FILES = ("split.json", "prompts.pth", "tune-state.pt", "history.jsonl", "evaluation.json")
#: Settings a resumed run may change: how long it runs, where, and how it reports.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "device", "workers", "bootstrap", "progress",
                     "cache_dir", "trust_torchscript", "out")


@dataclass(frozen=True)
class TuneConfig:
    """One prompt-learning run; defaults are pyiqa's QualiCLIP+ recipe.

    Attributes:
        model: the base weights (a name or a checkpoint with the text tower).
        dataset: a dataset name of :mod:`qualiclip.datasets` (with ``root``) or a CSV file.
        root: the dataset's folder (for a CSV, the base of relative paths).
        out: the run folder.
        n_ctx: context vectors per prompt.
        epochs: epochs of the cosine schedule.
        batch_size: crops per step.
        lr: Adam's learning rate at the start of the schedule.
        crop: side of the random square crops (smaller images: their shorter side).
        flip: random horizontal flips.
        val_fraction: share of the images held out.
        seed: the split, the initial context, the batches and the crops.
        limit: use only the first N items of the dataset.
        max_steps: stop after this many steps (the schedule still spans ``epochs``);
            ``--resume`` continues.
        weight_mse, weight_plcc: loss weights.
        dmos: a generic CSV's scores are lower-is-better.
        device: where to run.
        workers: DataLoader processes decoding and cropping (0: in the main process).
        bootstrap: resamples of the final evaluation's intervals.
        progress: a progress bar on stderr.
        cache_dir, trust_torchscript: as for :func:`qualiclip.model.create_model`.
    """

    model: str = "qualiclip"
    dataset: str = ""
    root: str | None = None
    out: str = ""
    n_ctx: int = 16
    epochs: int = 50
    batch_size: int = 8
    lr: float = 2e-3
    crop: int = 384
    flip: bool = True
    val_fraction: float = 0.2
    seed: int = 123
    limit: int | None = None
    max_steps: int | None = None
    weight_mse: float = 1.0
    weight_plcc: float = 1.0
    dmos: bool = False
    device: str = "cpu"
    workers: int = 2
    bootstrap: int = 1000
    progress: bool = True
    cache_dir: str | None = None
    trust_torchscript: bool = False

    def __post_init__(self) -> None:
        for name in ("n_ctx", "epochs", "batch_size", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("limit", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.workers < 0 or self.bootstrap < 0:
            raise ValueError("workers and bootstrap must be >= 0")
        if not self.dataset or not self.out:
            raise ValueError("a dataset and an output folder are needed")


# --- the split ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Training and held-out items, with targets normalised to [0, 1] (higher is better)."""

    dataset: str
    train: list[tuple[str, float]]
    val: list[tuple[str, float]]
    mos_range: tuple[float, float]
    higher_is_better: bool


def make_split(cfg: TuneConfig) -> Split:
    """Read the dataset and split it at random (by ``cfg.seed``) into training and held-out.

    Raises:
        ValueError: an unknown dataset, or too few items for both parts (3 held out at least,
            so correlations mean something).
    """
    ds = datasets.load_dataset(cfg.dataset, cfg.root, higher_is_better=not cfg.dmos)
    ds = ds.head(cfg.limit)
    mos = np.array([m for _, m in ds.items], dtype=np.float64)
    lo, hi = ds.info.score_range
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        lo, hi = float(mos.min()), float(mos.max())  # a generic CSV: its own range
    if hi <= lo:
        raise ValueError(f"{ds.info.name}: every opinion score is {lo}; nothing to learn")
    target = (mos - lo) / (hi - lo)
    if not ds.info.higher_is_better:
        target = 1.0 - target
    n_val = round(len(ds.items) * cfg.val_fraction)
    if n_val < 3 or len(ds.items) - n_val < 1:
        raise ValueError(
            f"{ds.info.name}: {len(ds.items)} images cannot be split {1 - cfg.val_fraction:.0%}/"
            f"{cfg.val_fraction:.0%} with at least 3 held out and 1 to train on"
        )
    order = np.random.default_rng(cfg.seed).permutation(len(ds.items))
    rows = [(str(ds.items[i][0]), float(target[i])) for i in order]
    return Split(ds.info.name, rows[n_val:], rows[:n_val], (lo, hi), ds.info.higher_is_better)


def write_split(split: Split, path: Path) -> None:
    note = (f"The prompts were learned on the 'train' images of {split.dataset}: their scores no "
            "longer measure the model. Evaluate on 'val' only.")
    if split.dataset == "biq2021":
        note += (" biq2021 is BIQ2021's official test split, which qualiclip otherwise never "
                 "trains on; after this run, only its 'val' images are unseen.")
    record = {"dataset": split.dataset, "trained_on": note, "mos_range": list(split.mos_range),
              "higher_is_better": split.higher_is_better,
              "targets": "opinion scores mapped to [0, 1] by mos_range (flipped if lower is "
                         "better)",
              "train": [list(r) for r in split.train], "val": [list(r) for r in split.val]}
    _write_text(path, json.dumps(record, indent=1) + "\n")


def read_split(path: Path) -> Split:
    d = json.loads(path.read_text())
    rows = {k: [(str(p), float(m)) for p, m in d[k]] for k in ("train", "val")}
    return Split(d["dataset"], rows["train"], rows["val"], tuple(d["mos_range"]),
                 bool(d["higher_is_better"]))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- data ---------------------------------------------------------------------------------------


class RatedCrops(Dataset):
    """Random square crops (and flips) of rated images; item ``(index, seed)`` is repeatable.

    An image that cannot be decoded gives ``None`` (the batch goes on without it, and the
    loop names it once).
    """

    def __init__(self, items: Sequence[tuple[str, float]], crop: int, flip: bool) -> None:
        self.items = list(items)
        self.crop = crop
        self.flip = flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, float] | tuple[str, str]:
        index, seed = key
        path, target = self.items[index]
        try:
            pixels = images.decode_rgb(path)
        except images.ImageDecodeError as exc:
            return path, str(exc)
        rng = np.random.default_rng(seed)
        h, w = pixels.shape[:2]
        side = min(self.crop, h, w)
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out = pixels[top : top + side, left : left + side]
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        return np.ascontiguousarray(out), target


def _collate(samples: list[Any]) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    """Crops cut to the batch's smallest side (centred), as one float batch; failures apart."""
    good = [s for s in samples if not isinstance(s[0], str)]
    failed = [f"{s[0]}: {s[1]}" for s in samples if isinstance(s[0], str)]
    if not good:
        return None, torch.empty(0), failed
    side = min(s[0].shape[0] for s in good)
    crops = []
    for pixels, _ in good:
        off = (pixels.shape[0] - side) // 2
        crops.append(np.ascontiguousarray(pixels[off : off + side, off : off + side]))
    targets = torch.tensor([t for _, t in good], dtype=torch.float32)
    return images.pixels_to_tensor(crops), targets, failed


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """The epoch's batches of ``(item, crop seed)``; full batches only, unless ``n`` is smaller."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    size = min(batch_size, n)
    return [
        [(i, seed * 7_919 + epoch * 1_000_003 + k * size + j) for j, i in enumerate(chunk)]
        for k, chunk in enumerate(order[s : s + size] for s in range(0, n - size + 1, size))
    ]


# --- the model ----------------------------------------------------------------------------------


@dataclass
class Tuner:
    """What a step needs: the frozen base (scorer and text tower) and the learned context."""

    base: QualiCLIP
    clip: CLIP
    learned: LearnedPrompts
    scale: float
    optimizer: torch.optim.Adam

    def text_features(self) -> torch.Tensor:
        return F.normalize(self.learned.text_features(self.clip), dim=-1)

    def scores(self, image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        sims = (image_features @ text.t()).view(image_features.shape[0], -1, 2)
        return scores_from_similarities(sims, self.scale)


def build_tuner(cfg: TuneConfig) -> Tuner:
    """Load the base twice over (the scorer as it is, and its text tower) and a fresh learner.

    Raises:
        ValueError: the base has no text tower or no logit scale.
    """
    device = resolve_device(cfg.device)
    weights = resolve_weights(cfg.model, cfg.cache_dir, trust_torchscript=cfg.trust_torchscript)
    if "text_projection" not in weights.state or "logit_scale" not in weights.state:
        raise ValueError(f"{cfg.model}: prompt learning needs the base's text tower and logit "
                         "scale, and this checkpoint holds the image tower only")
    clip = build_clip(weights.state).to(device).requires_grad_(False)
    base = create_model(cfg.model, device, cache_dir=cfg.cache_dir,
                        trust_torchscript=cfg.trust_torchscript)
    if not isinstance(base, QualiCLIP):
        raise ValueError(f"{cfg.model}: prompt learning needs a PyTorch checkpoint, not an "
                         "exported graph")
    base.requires_grad_(False)
    clip.visual = base.visual  # one image tower in memory: the scorer's
    tokens = tokenize(flatten_pairs(PROMPT_PAIRS), clip.context_length)
    learned = LearnedPrompts.initial(clip, tokens, cfg.n_ctx,
                                     torch.Generator().manual_seed(cfg.seed)).to(device)
    optimizer = torch.optim.Adam([learned.ctx], lr=cfg.lr)
    scale = math.exp(float(weights.state["logit_scale"])) / PYIQA_TEMPERATURE
    return Tuner(base, clip, learned, scale, optimizer)


def lr_at(cfg: TuneConfig, epoch: int) -> float:
    """pyiqa's ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch."""
    return cfg.lr * (1 + math.cos(math.pi * min(epoch, cfg.epochs) / cfg.epochs)) / 2


def tune_step(
    tuner: Tuner, batch: torch.Tensor, targets: torch.Tensor, cfg: TuneConfig
) -> dict[str, float]:
    """One step: frozen image features of the crops, the prompts' features through the text
    tower with the current context, scores, loss, and an update of the context alone."""
    with torch.no_grad():
        features = tuner.base.image_features(batch.to(tuner.base.device))
    pred = tuner.scores(features, tuner.text_features())
    terms = opinion_losses(pred, targets.to(pred.device), weight_mse=cfg.weight_mse,
                           weight_plcc=cfg.weight_plcc)
    tuner.optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    tuner.optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


@torch.no_grad()
def image_features(
    model: QualiCLIP, paths: Sequence[str]
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Full-resolution features ``[N, D]`` of the images that decode, their indices, failures."""
    rows, kept, failed = [], [], []
    for i, path in enumerate(paths):
        try:
            pixels = images.decode_rgb(path, min_size=model.min_size)
        except images.ImageDecodeError as exc:
            failed.append(str(exc))
            continue
        x = images.pixels_to_tensor([pixels], model.device)
        rows.append(model.image_features(x).cpu())
        kept.append(i)
    width = model.embed_dim
    return (torch.cat(rows) if rows else torch.empty(0, width)), kept, failed


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0
    step: int = 0


def _state(cfg: TuneConfig, tuner: Tuner, pos: Position) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "config": asdict(cfg),
            "ctx": tuner.learned.ctx.detach().cpu(), "optimizer": tuner.optimizer.state_dict(),
            "epoch": pos.epoch, "batch": pos.batch, "step": pos.step}


def _save(cfg: TuneConfig, tuner: Tuner, pos: Position, split: Split, out: Path) -> None:
    tmp = out / ".tune-state.pt.tmp"
    torch.save(_state(cfg, tuner, pos), tmp)
    os.replace(tmp, out / "tune-state.pt")
    info = {"base": cfg.model, "base_sha256": tuner.base.weights_sha256, "n_ctx": cfg.n_ctx,
            "temperature": PYIQA_TEMPERATURE, "dataset": split.dataset, "epoch": pos.epoch,
            "step": pos.step, "split": "split.json"}
    save_prompt_file(tuner.learned, out / "prompts.pth", PROMPT_PAIRS, info)


def _check_out(cfg: TuneConfig, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The saved state to resume from, or None; refuses a folder holding another run (with
    ``overwrite``, its files are removed later, once the run's settings have been checked)."""
    out = Path(cfg.out)
    held = [n for n in RUN_FILES if (out / n).exists()]
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if overwrite:
        return None
    if not resume:
        if held:
            raise ValueError(f"{out} holds a tuning run ({', '.join(held)}): continue it with "
                             "--resume, or replace it with --overwrite")
        return None
    path = out / "tune-state.pt"
    if not path.is_file():
        raise ValueError(f"--resume: {out} holds no tune-state.pt to continue from")
    state = load_tensors(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a qualiclip tuning state ({STATE_FORMAT})")
    old, new = state["config"], asdict(cfg)
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new
               if k not in RESUME_MAY_CHANGE and old.get(k) != new[k]]
    if changed:
        raise ValueError(f"--resume: the run in {out} was configured otherwise: "
                         + "; ".join(changed))
    return state


@dataclass(frozen=True)
class TuneResult:
    """What a run did: the prompt file, steps, the held-out evaluation and skipped files."""

    prompts: Path
    steps: int
    evaluation: dict[str, Any]
    failures: list[str]


def tune(
    cfg: TuneConfig, *, resume: bool = False, overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Learn prompt context on the training split; evaluate before/after on the held-out split.

    Args:
        cfg: the run.
        resume: continue the run in ``cfg.out`` (its settings must match, except
            :data:`RESUME_MAY_CHANGE`).
        overwrite: replace the run in ``cfg.out`` (its files only).
        log: where one-line messages go (default: stderr).

    Raises:
        ValueError: a bad configuration, dataset or base; a folder holding another run.
    """
    say = log or (lambda text: print(text, file=sys.stderr))
    state = _check_out(cfg, resume, overwrite)
    out = Path(cfg.out)
    split = read_split(out / "split.json") if state is not None else make_split(cfg)
    tuner = build_tuner(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    pos = Position()
    if state is not None:
        with torch.no_grad():
            tuner.learned.ctx.copy_(state["ctx"])
        tuner.optimizer.load_state_dict(state["optimizer"])
        pos = Position(state["epoch"], state["batch"], state["step"])
        _trim_history(out / "history.jsonl", pos.step)
    else:
        write_split(split, out / "split.json")
        (out / "history.jsonl").unlink(missing_ok=True)
    say(f"tune: {len(split.train)} training and {len(split.val)} held-out images of "
        f"{split.dataset}; split in {out / 'split.json'}")
    val_features, kept, failures = image_features(tuner.base, [p for p, _ in split.val])
    val_mos = np.array([split.val[i][1] for i in kept])
    failures += _train(cfg, tuner, split, pos, out, val_features, val_mos)
    evaluation = _evaluate(cfg, tuner, val_features, val_mos)
    evaluation["failed"] = failures
    _write_text(out / "evaluation.json", json.dumps(evaluation, indent=1) + "\n")
    return TuneResult(out / "prompts.pth", pos.step, evaluation, failures)


def _train(
    cfg: TuneConfig, tuner: Tuner, split: Split, pos: Position, out: Path,
    val_features: torch.Tensor, val_mos: np.ndarray,
) -> list[str]:
    """Epochs from ``pos`` on (``pos`` is advanced in place); returns the files that failed."""
    from tqdm import tqdm

    data = RatedCrops(split.train, cfg.crop, cfg.flip)
    per_epoch = len(epoch_batches(len(data), cfg.batch_size, cfg.seed, 0))
    total = per_epoch * cfg.epochs if cfg.max_steps is None \
        else min(cfg.max_steps, per_epoch * cfg.epochs)
    failures: list[str] = []
    loss = float("nan")
    bar = tqdm(total=total, initial=min(pos.step, total), desc="tune", unit="step",
               disable=not cfg.progress, file=sys.stderr)
    with bar, open(out / "history.jsonl", "a") as history:
        while pos.epoch < cfg.epochs and pos.step < total:
            for group in tuner.optimizer.param_groups:
                group["lr"] = lr_at(cfg, pos.epoch)
            batches = epoch_batches(len(data), cfg.batch_size, cfg.seed, pos.epoch)
            loader = DataLoader(data, batch_sampler=batches[pos.batch:], collate_fn=_collate,
                                num_workers=cfg.workers)
            for batch, targets, failed in loader:
                failures += [f for f in failed if f not in failures]
                if batch is not None:
                    logs = tune_step(tuner, batch, targets, cfg)
                    history.write(json.dumps({"step": pos.step, "epoch": pos.epoch, **logs})
                                  + "\n")
                    loss = logs["total"]
                    bar.set_postfix(loss=f"{loss:.4f}")
                    history.flush()
                pos.step, pos.batch = pos.step + 1, pos.batch + 1
                bar.update(1)
                if pos.step >= total:
                    break
            if pos.batch >= len(batches):
                pos.epoch, pos.batch = pos.epoch + 1, 0
                record = {"epoch": pos.epoch, "step": pos.step,
                          **_correlations(tuner, val_features, val_mos)}
                history.write(json.dumps({"event": "validation", **record}) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", val_srcc=f"{record['srcc']:.3f}")
            history.flush()
            _save(cfg, tuner, pos, split, out)
    return failures


def _trim_history(path: Path, step: int) -> None:
    """Drop what an interrupted run logged after its saved state (the resumed run redoes it)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else None
        if record is not None and (record["step"] < step or (
                record.get("event") == "validation" and record["step"] <= step)):
            keep.append(line + "\n")
    _write_text(path, "".join(keep))


@torch.no_grad()
def _correlations(tuner: Tuner, features: torch.Tensor, mos: np.ndarray) -> dict[str, float]:
    pred = tuner.scores(features.to(tuner.base.device), tuner.text_features()).cpu().numpy()
    return {"srcc": metrics.srcc(pred, mos), "plcc": metrics.plcc(pred, mos)}


@torch.no_grad()
def _evaluate(
    cfg: TuneConfig, tuner: Tuner, features: torch.Tensor, mos: np.ndarray
) -> dict[str, Any]:
    """The held-out split scored by the base as it is, and with the learned prompts."""
    features = features.to(tuner.base.device)
    scores = {
        "before": tuner.base.scores_from_features(features).cpu().numpy(),
        "after": tuner.scores(features, tuner.text_features()).cpu().numpy(),
    }
    result: dict[str, Any] = {"images": int(len(mos)), "base": cfg.model}
    for name, pred in scores.items():
        m = metrics.compute_metrics(pred, mos, bootstrap=cfg.bootstrap, seed=cfg.seed)
        result[name] = {"srcc": m.srcc, "srcc_ci": m.srcc_ci, "plcc": m.plcc,
                        "plcc_ci": m.plcc_ci}
    return result

