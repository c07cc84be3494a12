"""Self-supervised QualiCLIP training: the model to train, ``train_step``, validation, ``fit``.

The authors of QualiCLIP (Agnolucci et al., arXiv 2403.11176) released no training code; this is
our implementation of the method as the paper describes it (``docs/method.md`` §1 and §4). The
configuration lives in :mod:`qualiclip.train_config`, checkpoints and run folders in
:mod:`qualiclip.checkpoints`:

1. per pristine image, two overlapping crops (:class:`qualiclip.crops.PristineCropPairs`);
2. one random composition of distortions per sample, applied at levels 1..L to both crops, in
   batches on the training device (:func:`qualiclip.degradations.distort_pairs`);
3. cosine similarities of every degraded crop to every (positive, negative) prompt, the image
   tower trainable and the prompt features computed once by the frozen text tower, which is
   then dropped from the device;
4. the consistency and ranking margin losses of :mod:`qualiclip.losses`.

What is ours (the paper's values could not be read offline): every number in :data:`PRESETS`
except the crop size 224, L = 5 and the RN50 start point; the warm-up + cosine schedule; frozen
batch-norm statistics when fine-tuning (``bn="frozen"``: CLIP RN50's statistics come from a
huge batch, and the small per-step batches here would only add noise to them; the affine terms
still train); the IoU bound between the two crops.

Bad data does not stop a run: every file is checked before step 0 and unusable ones are named
and left out (or, with ``data.strict``, refused before anything is written); an output folder
holding another run is refused unless resumed or overwritten.

Runs are exactly resumable: a checkpoint holds the model, optimizer, scheduler, every RNG state
(torch, NumPy, Python, the degradation generator; one set per rank) and the number of samples
each rank consumed. Crops depend on ``(seed, epoch, index)`` only, so a resumed run continues
with the same batches and the same degradations as an uninterrupted one.

Distributed: launch the same command with ``torchrun --nproc-per-node N -m qualiclip.cli train
...``; ``RANK``/``WORLD_SIZE`` select DistributedDataParallel (NCCL on CUDA, gloo on CPU), each
rank reads its share of every epoch, rank 0 logs, validates and writes checkpoints.

The module is longer than most because the loop, the run's state (model, optimizer, scheduler,
generator, position) and its distributed set-up are read together: configuration, checkpoints
and validation live in their own modules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from qualiclip import degradations
from qualiclip.checkpoints import (
    CHECKPOINT_FORMAT,
    RunWriter,
    atomic_save,
    check_out,
    checkpoint_paths,
    clear_run,
    load_training_checkpoint,
    names,
    rng_state,
    set_rng_state,
)
from qualiclip.clip import build_clip
from qualiclip.crops import (
    PristineCropPairs,
    ResumableSampler,
    find_images,
    scan_images,
    split_every_kth,
)
from qualiclip.losses import LossConfig, qualiclip_losses
from qualiclip.model import QualiCLIP
from qualiclip.output_files import open_output
from qualiclip.precision import train_autocast_dtype
from qualiclip.prompts import PromptPair
from qualiclip.train_choices import BN_MODES
from qualiclip.train_config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_config,
    check_resumable,
    config_from_dict,
    load_config,
)
from qualiclip.validation import build_level_validation, validate_levels, validate_rated

__all__ = [
    "DataChangedError",
    "DataRecord",
    "NonFiniteLossError",
    "SimilarityModel",
    "build_model",
    "fit",
    "lr_factor",
    "make_optimizer",
    "RunPlan",
    "plan_run",
    "set_train_mode",
    "train_step",
]

logger = logging.getLogger(__name__)

# --- model -------------------------------------------------------------------------------------


class SimilarityModel(nn.Module):
    """The training view of a :class:`QualiCLIP`: images in, prompt similarities out.

    A module of its own so DistributedDataParallel can wrap the exact computation it must
    synchronise. Prompt features are a buffer of the wrapped model: they never get gradients.

    Shape:
        ``[N, 3, H, W]`` RGB in [0, 1] -> ``[N, P, 2]`` cosines (positive, negative).
    """

    def __init__(self, model: QualiCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        # Channels-last matches the tower's layout (see build_model): oneDNN and cuDNN run
        # its convolutions without reordering (1.5x a training step of the tiny tower on a CPU).
        x = x.contiguous(memory_format=torch.channels_last)
        return self.model.similarities(self.model.image_features(x))


def _init_state(init: str, seed: int, trust_torchscript: bool = False) -> dict[str, Tensor]:
    """OpenAI-keyed CLIP tensors of the start point: a random model, named weights, or a file
    (checked for NaN, infinity and wrong shapes as every weight file is)."""
    from qualiclip.pretrained import resolve_weights

    return resolve_weights(init, seed=seed, trust_torchscript=trust_torchscript).state


def orthogonal_prompt_features(pairs: int, dim: int, seed: int = 0) -> Tensor:
    """Fixed prompt features for a model trained from random weights: ``2P`` orthonormal rows.

    A random text tower's features carry no meaning, and the angles between them are arbitrary
    (a random tiny tower put one pair's positive prompt at cosine 0.83 to another pair's
    negative one), so the ranking losses of different pairs pull an image's feature in
    conflicting directions. With mutually orthogonal prompts, moving toward every positive and
    away from every negative prompt is one consistent direction.

    Args:
        pairs: number of (positive, negative) prompt pairs P.
        dim: feature width D (at least ``2 * pairs``).
        seed: the rows are a function of ``(pairs, dim, seed)`` only.

    Returns:
        ``[2P, D]`` float32, positive first in each pair, rows orthonormal.

    Example:
        >>> f = orthogonal_prompt_features(7, 64)
        >>> torch.allclose(f @ f.T, torch.eye(14), atol=1e-5)
        True
    """
    if dim < 2 * pairs:
        raise ValueError(f"{2 * pairs} orthogonal prompt features need a width >= that, got {dim}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, 2 * pairs, generator=g, dtype=torch.float64))
    return q.T.float().contiguous()


def build_model(
    cfg: ModelConfig, device: torch.device | str = "cpu", *, trust_torchscript: bool = False
) -> tuple[QualiCLIP, dict[str, Tensor]]:
    """Build the trainable model from its start point.

    The prompt features are computed once (by the text tower, or fixed orthogonal ones, see
    :attr:`ModelConfig.prompt_features`); the text tower's tensors are then kept on the CPU
    for the final export in the authors' format (only ``logit_scale`` with orthogonal
    features, which no text tower produced). The image tower is channels-last.

    Returns:
        ``(model, text_state)``: the QualiCLIP model (image tower trainable, prompt features a
        buffer) on ``device``, and the OpenAI-keyed non-image tensors to export with it.
    """
    if cfg.bn not in BN_MODES:
        raise ValueError(f"model.bn must be one of {', '.join(BN_MODES)}, got {cfg.bn!r}")
    state = _init_state(cfg.init, cfg.init_seed, trust_torchscript)
    clip = build_clip(state)
    pairs: tuple[PromptPair, ...] = tuple((p, n) for p, n in cfg.prompt_pairs)
    if cfg.prompt_features == "orthogonal":
        features = orthogonal_prompt_features(len(pairs), clip.config.embed_dim, cfg.init_seed)
        model = QualiCLIP(clip.visual, features, prompt_pairs=pairs, name="trained")
        text_state = {k: v.detach().clone() for k, v in state.items() if k == "logit_scale"}
    else:
        if not clip.config.has_text:
            raise ValueError(
                f"init {cfg.init!r} has no text tower to compute prompt features with "
                "(model.prompt_features = 'orthogonal' needs none)"
            )
        model = QualiCLIP.from_clip(clip, pairs, name="trained")
        text_state = {
            k: v.detach().clone() for k, v in state.items() if not k.startswith("visual.")
        }
    del clip, state
    for name, p in model.visual.named_parameters():
        # QualiCLIP pools without the positional embedding: it gets no gradient, so it is
        # frozen (DistributedDataParallel also requires every trainable parameter to be used).
        p.requires_grad_(name != "attnpool.positional_embedding")
    # Module.to takes memory_format at run time; its type stubs do not list it.
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, text_state


def set_train_mode(model: nn.Module, bn: str) -> None:
    """Training mode, with batch norms in eval mode when their statistics are frozen."""
    model.train()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# --- one step ----------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    generator: torch.Generator,
    levels: Sequence[int] = (1, 2, 3, 4, 5),
    max_distortions: int = 4,
    loss: LossConfig | None = None,
    grad_clip: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Degrade, embed, rank, update: one optimisation step of QualiCLIP.

    Args:
        model: a :class:`SimilarityModel` (or DistributedDataParallel around one) in train mode.
        batch: ``{"crops": uint8 [B, 2, 3, H, W]}`` from the DataLoader, or
            ``{"degraded": float [B, L, 2, 3, H, W]}`` already degraded there
            (:class:`DegradedCropPairs`; then ``generator`` only names the device).
        optimizer: over the image tower's parameters.
        scheduler: stepped once after the optimizer.
        generator: degradation randomness on the model's device.
        levels: degradation levels, mildest first.
        max_distortions: most types per composition.
        loss: margins and weights.
        grad_clip: global gradient-norm bound (0: none).
        autocast_dtype: mixed-precision dtype (``torch.bfloat16``) or None for fp32.

    Returns:
        Plain floats: ``loss`` (total), ``cons``, ``pos``, ``neg``, ``grad_norm``, ``lr``.

    Raises:
        NonFiniteLossError: the loss or the gradient norm is NaN or infinite; the optimizer and
            scheduler were not stepped.
    """
    device = generator.device
    if "degraded" in batch:
        x = batch["degraded"].to(device, non_blocking=True)
    else:
        crops = batch["crops"].to(device, non_blocking=True)
        x = degradations.degrade_batch(
            crops, generator, levels=levels, max_distortions=max_distortions
        )
    b, n_lv = x.shape[:2]

    with torch.autocast(
        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        sims = model(x.flatten(0, 2))  # [B*L*2, P, 2]
    sims = sims.float().view(b, n_lv, 2, -1, 2)  # [B, L, crop, P, (pos, neg)]
    terms = qualiclip_losses(sims[..., 0], sims[..., 1], **asdict(loss or LossConfig()))

    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    total, grad_norm = terms["total"].item(), float(norm)
    if not (math.isfinite(total) and math.isfinite(grad_norm)):
        # Checked before the update: the weights stay those of the last good step. The norm
        # is all-reduced under DDP, so every rank stops at the same step.
        raise NonFiniteLossError(total, grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()

    logs = {"loss": total}
    logs.update({k: v.item() for k, v in terms.items() if k != "total"})
    logs.update(grad_norm=grad_norm, lr=float(lr))
    return logs


class NonFiniteLossError(ValueError):
    """The loss or the gradient norm of a step is NaN or infinite: the step was not taken."""

    def __init__(self, loss: float, grad_norm: float) -> None:
        what = (f"the loss ({loss})" if not math.isfinite(loss)
                else f"the gradient norm ({grad_norm})")
        super().__init__(f"{what} became non-finite")


class DegradedCropPairs(Dataset):
    """Crop pairs degraded where they are made: in the DataLoader's workers, ahead of the step.

    Each sample gets its composition and parameters from its own CPU generator, seeded by
    ``(seed, epoch, index)`` like its crops, so a batch does not depend on the number of workers
    or on which worker made it, and a resumed run continues exactly (nothing to checkpoint).
    The codecs (JPEG, JPEG 2000) and every other type then run in parallel worker processes
    while the model computes, instead of in the step.

    Shape:
        ``dataset[(index, epoch)]["degraded"]``: float32 ``[L, 2, 3, H, W]`` in [0, 1]; the
        uint8 ``"crops"`` are dropped.
    """

    def __init__(
        self, pairs: PristineCropPairs, *, levels: Sequence[int], max_distortions: int, seed: int
    ) -> None:
        self.pairs, self.levels, self.max_distortions = pairs, tuple(levels), max_distortions
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def generator(self, index: int, epoch: int) -> torch.Generator:
        """The sample's degradation generator (a stream apart from its crops' generator)."""
        words = np.random.SeedSequence([self.seed, epoch, index, _DEGRADE_STREAM]).generate_state(2)
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index, epoch = (key, 0) if isinstance(key, int) else key
        sample = self.pairs[key]
        crops = sample.pop("crops")
        sample["degraded"] = degradations.degrade_batch(
            crops[None], self.generator(index, epoch), levels=self.levels,
            max_distortions=self.max_distortions,
        )[0]
        return sample


#: Tells the degradation seeds apart from the crop seeds of the same ``(seed, epoch, index)``.
_DEGRADE_STREAM = 0x6465_6772


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: QualiCLIP, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW on the image tower; no weight decay on biases and norm parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.visual.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


# --- distributed -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
    """Pick the device; join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    from qualiclip.model import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = _Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


# --- the run -----------------------------------------------------------------------------------


@dataclass
class _Images:
    """The run's images after the scan, and what was left out (by name, with the reason)."""

    train: list[Path]
    val: list[Path]
    bad: list[tuple[str, str]]
    small: list[str]


def _scan_data(data: DataConfig, info: _Dist, record: DataRecord | None = None) -> _Images:
    """Find, check and split the pristine images; rank 0 scans, every rank gets its verdict.

    Args:
        record: the files of the run being resumed (see :func:`_split`).

    Raises:
        ValueError: no image at all, no usable image left, or ``data.strict`` and some file
            unusable (the message lists them).
        DataChangedError: resuming on files other than the checkpoint's, not allowed.
    """
    if not data.pristine:
        raise ValueError("data.pristine is empty: give a folder or list of pristine images")
    found = find_images(data.pristine)
    val_found = find_images(data.val_dir) if data.val_dir else []
    verdict: list[Any] = [None]
    if info.main:
        start = time.perf_counter()
        scan = scan_images(
            [*found, *val_found],
            crop_size=data.crop_size,
            small_images=data.small_images,
            mode=data.scan,
            threads=max(1, data.workers),
        )
        logger.info(
            "checked %d images (%s) in %.1f s",
            len(found) + len(val_found),
            data.scan,
            time.perf_counter() - start,
        )
        verdict[0] = (
            [str(p) for p in scan.usable],
            [(str(p), why) for p, why in scan.bad],
            [str(p) for p in scan.small],
        )
    if info.world_size > 1:
        dist.broadcast_object_list(verdict, src=0)
    usable_names, bad, small = verdict[0]
    usable = set(usable_names)
    if info.main:
        for name, why in bad:
            logger.warning("unusable pristine image %s: %s", name, why)
        for name in small:
            logger.warning("skipping %s: smaller than the %d px crop", name, data.crop_size)
    if bad and data.strict:
        raise ValueError(
            f"{len(bad)} of {len(found) + len(val_found)} pristine images are unusable "
            f"(data.strict): {names([n for n, _ in bad])}"
        )
    keep = [p for p in found if str(p) in usable]
    if data.val_dir:
        train, val = keep, [p for p in val_found if str(p) in usable]
    else:
        train, val = split_every_kth(keep, data.val_every_kth)
    if record is not None:
        train, val = _split(train, val, record, pool=keep, main=info.main)
    if len(train) // info.world_size < 1:
        raise ValueError(
            f"no usable training image left in {data.pristine} "
            f"({len(found)} found, {len(bad)} unusable, {len(small)} smaller than the crop)"
        )
    return _Images(train, val, bad, small)


class DataChangedError(ValueError):
    """A resume whose training or validation files differ from its checkpoint's."""


@dataclass(frozen=True)
class DataRecord:
    """The files a resumed run's checkpoint trained and validated on, and what may change.

    Attributes:
        train, val: the files as recorded (``None`` for a checkpoint written before runs
            recorded them).
        allow_change: continue on the files found now (``--allow-data-change``).
        source: the checkpoint's name, for messages.
    """

    train: tuple[str, ...] | None
    val: tuple[str, ...] | None
    allow_change: bool = False
    source: str = "the checkpoint"

    @classmethod
    def of(cls, state: Mapping[str, Any], allow_change: bool, source: str) -> DataRecord:
        data = state.get("data")
        if not isinstance(data, Mapping):
            return cls(None, None, allow_change, source)
        return cls(tuple(data["train"]), tuple(data["val"]), allow_change, source)


def _split(
    train: list[Path], val: list[Path], record: DataRecord, *, pool: list[Path], main: bool
) -> tuple[list[Path], list[Path]]:
    """The training and validation files of a resumed run, from the scan's split
    ``(train, val)`` and ``pool``, the usable pristine files (those ``data.val_dir`` holds are
    never trained on).

    * The same files as recorded: the scan's split (which then equals the record).
    * Other files, without ``allow_change``: refused (:class:`DataChangedError`).
    * Other files, with ``allow_change``: the validation set stays the recorded one (its files
      still usable here; a vanished one is named), so scores before and after the change are
      comparable; every other usable file trains, added ones included.
    * No record (a checkpoint from before runs recorded their files): nothing can be checked;
      said once, and the split computed now is what the next checkpoints record and keep.
    """
    if record.train is None or record.val is None:
        if main:
            logger.warning(
                "%s holds no record of its training and validation files (it was written before "
                "qualiclip recorded them): the data could not be checked; the split computed "
                "now (%d training, %d held-out images) is recorded and kept from here on",
                record.source, len(train), len(val))
        return train, val
    now_train, now_val = [str(p) for p in train], [str(p) for p in val]
    if now_train == list(record.train) and now_val == list(record.val):
        return train, val
    before, now = {*record.train, *record.val}, {*now_train, *now_val}
    added, removed = sorted(now - before), sorted(before - now)
    if not record.allow_change:
        raise DataChangedError(
            f"the data changed since {record.source}: {len(added)} added"
            f"{' (' + names(added, 3) + ')' if added else ''}, {len(removed)} removed"
            f"{' (' + names(removed, 3) + ')' if removed else ''}"
            f"{'' if added or removed else ', the split differs'}; resume with "
            "--allow-data-change to train on the files found now (the held-out set stays as "
            "recorded), or restore the files"
        )
    held = set(record.val)
    kept_val = [Path(v) for v in record.val if v in now]
    trained = [p for p in pool if str(p) not in held]
    if main:
        gone = [v for v in record.val if v not in now]
        logger.warning(
            "the data changed since %s (%d added, %d removed): training on the %d usable files "
            "found now; the held-out set stays as recorded (%d images%s)", record.source,
            len(added), len(removed), len(trained), len(kept_val),
            f"; gone: {names(gone, 3)}" if gone else "")
    return trained, kept_val


def _total_steps(cfg: TrainConfig, n_train: int, world_size: int) -> int:
    if cfg.schedule.max_steps > 0:
        return cfg.schedule.max_steps
    return max(1, cfg.schedule.epochs * (n_train // world_size) // cfg.data.batch_size)


@dataclass
class _Run:
    cfg: TrainConfig
    info: _Dist
    device: torch.device
    model: QualiCLIP
    net: nn.Module
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    step: int = 0
    samples: int = 0
    data: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def checkpoint(self) -> dict[str, Any]:
        """Gather every rank's RNG state; the rest is identical across ranks."""
        states = [rng_state(self.generator)]
        if self.info.world_size > 1:
            gathered: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(gathered, states[0])
            states = gathered
        inner = (
            self.net.module
            if isinstance(self.net, nn.parallel.DistributedDataParallel)
            else self.net
        )
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.cfg),
            "step": self.step,
            "samples": self.samples,
            "world_size": self.info.world_size,
            "model": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": states,
            # The files this run trains and validates on, checked when it is resumed.
            "data": self.data,
        }

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        """Continue from a checkpoint whose configuration was checked (:func:`plan_run`)."""
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.samples = int(ckpt["step"]), int(ckpt["samples"])
        if ckpt["world_size"] == self.info.world_size:
            set_rng_state(ckpt["rng"][self.info.rank], self.generator)
        else:
            logger.warning(
                "resuming %d processes from a %d-process run: RNG states reseeded",
                self.info.world_size,
                ckpt["world_size"],
            )


def _save(run: _Run, out: Path) -> None:
    state = run.checkpoint()  # every rank takes part in the gather
    if run.info.main:
        atomic_save(state, out / f"ckpt-{run.step:06d}.pt")
        keep = run.cfg.log.keep_checkpoints
        if keep > 0:
            for old in checkpoint_paths(out)[:-keep]:
                old.unlink()


def _validate(run: _Run, seqs: Tensor | None, writer: RunWriter) -> dict[str, Any] | None:
    if not run.info.main or seqs is None:
        return None
    val = run.cfg.validation
    record: dict[str, Any] = {"step": run.step}
    record.update(validate_levels(run.model, seqs, val.batch_size))
    if val.rated_csv:
        record.update(validate_rated(run.model, val.rated_csv, val.rated_limit))
    set_train_mode(run.net, run.cfg.model.bn)
    writer.log_validation(record)
    return record


def _prepare(plan: RunPlan) -> tuple[_Run, dict[str, Tensor], _Images, int]:
    cfg = plan.config
    info, device = _setup(cfg)
    seed = cfg.seed + info.rank
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds libraries that use the global generator)
    random.seed(seed)
    record = (DataRecord.of(plan.state, plan.allow_data_change, str(plan.checkpoint))
              if plan.state is not None else None)
    # Before the model: bad data is refused without a download.
    images = _scan_data(cfg.data, info, record)
    model, text_state = build_model(cfg.model, device, trust_torchscript=plan.trust_torchscript)
    total = _total_steps(cfg, len(images.train), info.world_size)
    optimizer = make_optimizer(model, cfg.optim)
    s = cfg.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, s.warmup_steps, total, s.min_lr_ratio)
    )
    # A CPU generator on every device: the same seed gives the same degradations on a CPU and
    # on a GPU (qualiclip.degradations draws everything on the CPU).
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)
    run = _Run(cfg, info, device, model, SimilarityModel(model), optimizer, scheduler, generator)
    run.data = {"train": [str(p) for p in images.train], "val": [str(p) for p in images.val]}
    return run, text_state, images, total


@dataclass(frozen=True)
class RunPlan:
    """A run checked before anything runs: what :func:`plan_run` returns and :func:`fit` takes.

    Attributes:
        config: the run's configuration (checked, and matching ``checkpoint`` where resumed).
        checkpoint: the file a resumed run continues, or None.
        state: that checkpoint, loaded once (model, optimizer, RNG, position), or None.
        overwrite: replace the run the output folder holds.
        allow_data_change: resume on files other than the checkpoint's (the held-out set
            stays as recorded; see ``_split``).
        trust_torchscript: ``model.init`` may be a TorchScript archive whose checksum is not
            in the table (loading one runs code stored in it).
    """

    config: TrainConfig
    checkpoint: Path | None = None
    state: Mapping[str, Any] | None = None
    overwrite: bool = False
    allow_data_change: bool = False
    trust_torchscript: bool = False


def _checked_plan(
    cfg: TrainConfig,
    checkpoint: Path | None,
    state: Mapping[str, Any] | None,
    overwrite: bool,
    **options: bool,
) -> RunPlan:
    """Check ``cfg``, the output folder and the resumed checkpoint, each once."""
    check_config(cfg)
    out = Path(cfg.log.out)
    check_out(out, resume=checkpoint, overwrite=overwrite)
    if state is not None:
        check_resumable(state["config"], cfg, f"from {checkpoint}")
        held_path = out / "config.json"
        if held_path.is_file():  # a checkpoint from elsewhere, into a run's folder
            try:
                held = json.loads(held_path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ValueError(f"{held_path} is not valid JSON ({exc}); every run rewrites "
                                 "it: remove it to resume") from None
            check_resumable(held, cfg, f"into {out}, whose config.json is another run's")
    return RunPlan(cfg, checkpoint, state, overwrite, **options)


def plan_run(
    *,
    config: str | Path | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    allow_data_change: bool = False,
    trust_torchscript: bool = False,
) -> RunPlan:
    """The configuration and the checkpoint of a run, checked before anything runs.

    Which configuration wins: resuming without ``config`` or ``preset`` continues the
    checkpoint's own configuration (with ``overrides`` on top); otherwise the file or preset,
    then ``overrides``. The result must pass :func:`check_config`, the output folder
    :func:`check_out`, and a resumed run :func:`check_resumable`. The checkpoint is read
    here, once; :func:`fit` uses the plan as it is.

    Args:
        config: a TOML file.
        preset: a name from :data:`PRESETS`.
        overrides: nested ``{section: {key: value}}`` settings on top.
        out: the run folder (where ``"latest"`` is looked for; ``log.out`` in ``overrides``
            sets the run's folder).
        resume: ``None``, ``"latest"`` (the newest ``ckpt-*.pt`` in ``out``) or a checkpoint.
        overwrite: replace the run the folder holds.
        allow_data_change: a resumed run may train on files other than its checkpoint's; its
            held-out set stays the recorded one.
        trust_torchscript: allow a TorchScript ``model.init`` of unknown checksum.

    Returns:
        the :class:`RunPlan` to give :func:`fit`.

    Raises:
        ValueError: any of the checks above, or no checkpoint to resume from.
    """
    overrides = dict(overrides or {})
    checkpoint: Path | None = None
    if resume is not None:
        found = checkpoint_paths(out) if out is not None else []
        if str(resume) != "latest":
            checkpoint = Path(resume)
        elif found:
            checkpoint = found[-1]
        if checkpoint is None or not checkpoint.is_file():
            raise ValueError(f"no checkpoint to resume from ({resume}, in {out})")
    state = load_training_checkpoint(checkpoint) if checkpoint else None
    if state is not None and config is None and preset is None:
        cfg = config_from_dict(overrides, config_from_dict(state["config"]))
    else:
        cfg = load_config(config, preset=preset, overrides=overrides)
    return _checked_plan(cfg, checkpoint, state, overwrite, allow_data_change=allow_data_change,
                         trust_torchscript=trust_torchscript)


def fit(
    plan: RunPlan | TrainConfig,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train QualiCLIP as planned; write checkpoints, logs and ``model.pth`` to ``log.out``.

    Nothing is written before the configuration, the images (see :class:`DataConfig` ``scan``
    and ``strict``), the model and the checkpoint to resume have all been checked; a run that
    fails before its first checkpoint removes the files it wrote.

    Args:
        plan: a :class:`RunPlan` from :func:`plan_run` (used as it is: its checkpoint is not
            read again), or a configuration, then checked here with ``resume`` and
            ``overwrite``.
        resume: with a configuration: a training checkpoint to continue from (its
            configuration must match except for :data:`RESUME_MAY_CHANGE`).
        overwrite: with a configuration: replace the run that ``log.out`` holds (its files
            only, see :func:`clear_run`); without it (or ``resume``) such a folder is refused.

    Returns:
        ``{"step", "last", "validation", "model_path", "images", "held_out", "skipped",
        "small", "main"}``: the final step, the last logged training record, the validation
        history, the exported model file, the number of training images and of held-out ones,
        ``(path, reason)`` of every unusable file left out (found by the scan or while
        training), the images skipped as smaller than the crop, and whether this process is the
        main one (rank 0; the others return the same but should not report it).

    Raises:
        ValueError: a bad configuration, a folder holding another run, a checkpoint that does
            not match, no usable image, or (``data.strict``) any unusable image.
    """
    if isinstance(plan, TrainConfig):
        checkpoint = Path(resume) if resume is not None else None
        state = load_training_checkpoint(checkpoint) if checkpoint is not None else None
        plan = _checked_plan(plan, checkpoint, state, overwrite)
    elif resume is not None or overwrite:
        raise ValueError("resume and overwrite belong to the plan: pass them to plan_run")
    cfg, out = plan.config, Path(plan.config.log.out)
    run, text_state, images, total = _prepare(plan)
    if plan.state is not None:
        run.restore(plan.state)
    if run.info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [run.device.index] if run.device.type == "cuda" else None
        run.net = DistributedDataParallel(run.net, device_ids=ids)
    loader = _loader(cfg, images.train, run)
    seqs = (
        build_level_validation(images.val, cfg.data, cfg.validation)
        if (run.info.main and images.val)
        else None
    )
    created = not out.exists()
    if run.info.main:
        out.mkdir(parents=True, exist_ok=True)
        if plan.overwrite:
            gone = clear_run(out)
            if gone:
                logger.warning("overwrite: removed %d files of the run in %s", len(gone), out)
        with open_output(out / "config.json", "w", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(cfg), indent=1) + "\n")
    writer = RunWriter(out, run.info.main, run.step)
    try:
        result = _train(run, cfg, writer, loader, seqs, total, images, text_state)
    except BaseException:
        if run.info.main and plan.checkpoint is None and not checkpoint_paths(out):
            # Nothing to resume from: the files would only pass for a run that never was.
            clear_run(out)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    return result


def _runtime_skips(batch: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(path, reason)`` of files a worker could not decode for this batch."""
    found = []
    for text in batch.get("skipped", []):
        for line in filter(None, str(text).split("\n")):
            name, _, why = line.partition(": ")
            found.append((name, why))
    return found


def _train(
    run: _Run,
    cfg: TrainConfig,
    writer: RunWriter,
    loader: DataLoader,
    seqs: Tensor | None,
    total: int,
    images: _Images,
    text_state: dict[str, Tensor],
) -> dict[str, Any]:
    from tqdm import tqdm

    out = Path(cfg.log.out)
    writer.log(
        {
            "event": "images",
            "step": run.step,
            "train": len(images.train),
            "val": len(images.val),
            "unusable": [{"path": n, "reason": r} for n, r in images.bad],
            "smaller_than_crop": images.small,
        }
    )
    if run.step == 0:
        _validate(run, seqs, writer)
    set_train_mode(run.net, cfg.model.bn)
    amp = train_autocast_dtype(cfg.optim.precision, run.device)
    bar = tqdm(
        total=total,
        initial=run.step,
        disable=not (run.info.main and cfg.log.progress),
        desc="train",
        dynamic_ncols=True,
    )
    batches = iter(loader)
    last: dict[str, Any] = {}
    skipped: dict[str, str] = {}  # found while training, on this rank
    start = time.perf_counter()
    while run.step < total:
        batch = next(batches)
        for name, why in _runtime_skips(batch):
            if name not in skipped:
                skipped[name] = why
                logger.warning("unusable pristine image %s: %s (skipped)", name, why)
                writer.log({"event": "skipped", "step": run.step, "path": name, "reason": why})
        try:
            logs = train_step(
                run.net,
                batch,
                run.optimizer,
                scheduler=run.scheduler,
                generator=run.generator,
                levels=cfg.data.levels,
                max_distortions=cfg.data.max_distortions,
                loss=cfg.loss,
                grad_clip=cfg.optim.grad_clip,
                autocast_dtype=amp,
            )
        except NonFiniteLossError as exc:
            kept = checkpoint_paths(out)
            last_good = f"the last good checkpoint, {kept[-1].name}, is kept" if kept else (
                "no checkpoint was written yet")
            raise ValueError(f"{exc} at step {run.step + 1}; training stopped ({last_good}); a "
                             "lower optim.lr or a tighter optim.grad_clip may help") from None
        run.step += 1
        run.samples += cfg.data.batch_size
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        epoch = run.samples / max(1, len(images.train) // run.info.world_size)
        last = {
            "step": run.step,
            "epoch": round(epoch, 4),
            **logs,
            "elapsed_s": round(time.perf_counter() - start, 2),
        }
        if run.step % cfg.log.log_every == 0 or run.step == total:
            writer.log(last)
        every = cfg.validation.every
        if every and run.step % every == 0 and run.step != total:
            _validate(run, seqs, writer)
        if cfg.log.checkpoint_every and run.step % cfg.log.checkpoint_every == 0:
            _save(run, out)
    bar.close()
    _validate(run, seqs, writer)
    if not checkpoint_paths(out) or checkpoint_paths(out)[-1].name != f"ckpt-{run.step:06d}.pt":
        _save(run, out)
    model_path = out / "model.pth"
    if run.info.main:
        atomic_save(run.model.official_state_dict(text_state), model_path)
    if run.info.world_size > 1:
        gathered: list[Any] = [None] * run.info.world_size
        dist.all_gather_object(gathered, skipped)
        for part in gathered:
            skipped.update({k: v for k, v in part.items() if k not in skipped})
        dist.barrier()
    bad = dict(images.bad)
    bad.update({k: v for k, v in skipped.items() if k not in bad})
    return {
        "step": run.step,
        "last": last,
        "validation": writer.validation,
        "model_path": str(model_path),
        "images": len({str(p) for p in images.train} - set(skipped)),
        "held_out": len(images.val),
        "skipped": sorted(bad.items()),
        "small": images.small,
        "main": run.info.main,
    }


def _loader(cfg: TrainConfig, paths: Sequence[Path], run: _Run) -> DataLoader:
    data = cfg.data
    dataset = PristineCropPairs(
        paths,
        data.crop_size,
        min_overlap=data.min_overlap,
        seed=cfg.seed,
        small_images=data.small_images,
    )
    source: Dataset = dataset
    if data.degrade_in == "loader":
        source = DegradedCropPairs(dataset, levels=data.levels,
                                   max_distortions=data.max_distortions, seed=cfg.seed)
    sampler = ResumableSampler(
        len(dataset),
        seed=cfg.seed,
        start=run.samples,
        rank=run.info.rank,
        world_size=run.info.world_size,
    )
    return DataLoader(
        source,
        batch_size=data.batch_size,
        sampler=sampler,
        num_workers=data.workers,
        pin_memory=run.device.type == "cuda",
        drop_last=True,
        persistent_workers=data.workers > 0,
    )


