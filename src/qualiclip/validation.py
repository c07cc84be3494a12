"""Validation during training: do scores fall with the degradation level, and agree with people?

Two measures, both computed on the rank that logs: the ordering of scores over fixed degraded
sequences of held-out pristine images (built once, seeded, so every validation sees the same
images), and, when a human-rated ``path,score`` CSV is given, SRCC and PLCC against it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qualiclip import degradations
from qualiclip.crops import PristineCropPairs
from qualiclip.datasets import read_csv
from qualiclip.images import load_image
from qualiclip.metrics import plcc, srcc
from qualiclip.model import QualiCLIP
from qualiclip.train_config import DataConfig, ValidationConfig

logger = logging.getLogger("qualiclip.train")

def build_level_validation(
    paths: Sequence[Path], data: DataConfig, val: ValidationConfig
) -> Tensor:
    """Fixed degraded sequences of held-out images, built once.

    Each held-out image gives ``crops_per_image`` crop pairs (seeded) and each pair
    ``compositions_per_crop`` fixed compositions, applied at every level; both crops of a pair
    become sequences.

    Shape:
        returns ``[N, L, 3, S, S]`` float32 on the CPU, N = images x crops x compositions x 2.
    """
    ds = PristineCropPairs(
        paths,
        data.crop_size,
        min_overlap=data.min_overlap,
        seed=val.seed,
        small_images=data.small_images,
    )
    g = torch.Generator().manual_seed(val.seed)
    seqs = []
    failed: set[str] = set()
    for index in range(len(ds)):
        for crop in range(val.crops_per_image):
            sample = ds[(index, crop)]  # "epoch" = crop number: independent positions
            for line in filter(None, sample["skipped"].split("\n")):
                if line not in failed:
                    failed.add(line)
                    logger.warning("unusable held-out image %s (replaced by the next one)", line)
            pair = sample["crops"]
            for _ in range(val.compositions_per_crop):
                x = degradations.degrade_batch(
                    pair[None], g, levels=data.levels, max_distortions=data.max_distortions
                )
                seqs.append(x[0].transpose(0, 1))  # [2, L, 3, S, S]
    return torch.cat(seqs)


@torch.no_grad()
def validate_levels(model: QualiCLIP, sequences: Tensor, batch_size: int = 32) -> dict[str, float]:
    """Does the score fall as the degradation level rises?

    Args:
        model: the scorer (put in eval mode here; the caller restores train mode).
        sequences: degraded sequences, mildest level first.
        batch_size: images per forward pass.

    Returns:
        ``level_accuracy``: fraction of level pairs i < j (over all sequences) whose scores are
        ordered correctly (milder scores higher; a tie counts as wrong); ``level_srcc``: mean
        over sequences of the SRCC between score and level, sign flipped so 1 is perfect;
        ``score_mean``.

    Shape:
        sequences: ``[N, L, 3, S, S]``.
    """
    from scipy.stats import spearmanr

    model.eval()
    n, n_lv = sequences.shape[:2]
    flat = sequences.flatten(0, 1)
    scores = torch.cat(
        [
            model(flat[k : k + batch_size].to(model.device)).float().cpu()
            for k in range(0, flat.shape[0], batch_size)
        ]
    ).view(n, n_lv)
    i, j = torch.triu_indices(n_lv, n_lv, offset=1)
    accuracy = (scores[:, i] > scores[:, j]).double().mean().item()
    levels = -np.arange(n_lv)
    rhos = [spearmanr(levels, row).statistic for row in scores.numpy()]
    srcc = float(np.mean([0.0 if np.isnan(r) else r for r in rhos]))
    return {"level_accuracy": accuracy, "level_srcc": srcc, "score_mean": scores.mean().item()}


@torch.no_grad()
def validate_rated(model: QualiCLIP, csv_path: str | Path, limit: int = 0) -> dict[str, float]:
    """SRCC and PLCC of full-resolution scores against human scores (``path,score`` CSV)."""
    model.eval()
    rows = read_csv(csv_path).head(limit or None).items
    pred = [float(model(load_image(p)[None].to(model.device))[0]) for p, _ in rows]
    mos = [s for _, s in rows]
    return {"rated_srcc": srcc(pred, mos), "rated_plcc": plcc(pred, mos), "rated_n": len(rows)}
