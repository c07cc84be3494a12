"""QualiCLIP's training objective: consistency and ranking margin losses on prompt similarities.

QualiCLIP (Agnolucci et al., arXiv 2403.11176, §3) fine-tunes CLIP's image encoder so that the
cosine similarity of an image to a positive prompt ("Good photo.") falls, and to the negative
prompt ("Bad photo.") rises, as a synthetic degradation grows; two overlapping crops of the same
image under the same degradation should get the same similarities. Three margin ranking losses
express this:

* ``L_cons = mean max(0, |s(x_i^A) - s(x_i^B)| - m_cons)`` for s in {s_p, s_n}, every level i;
* ``L_pos  = mean max(0, s_p(x_j) - s_p(x_i) + m_rank)`` for levels i < j (level 0 mildest);
* ``L_neg  = mean max(0, s_n(x_i) - s_n(x_j) + m_rank)`` for levels i < j;
* ``total  = w_cons L_cons + w_pos L_pos + w_neg L_neg``.

Every mean runs over the batch, the prompt pairs and (for the ranking terms) the two crops, each
crop ranked against itself at the other levels. The paper's margin and weight values could not be
read offline; the defaults in :class:`LossConfig` are ours (see its docstring).

Prompt learning on opinion scores (QualiCLIP+, :mod:`qualiclip.tune`) fits scores to human
ratings instead, with pyiqa's two terms (:func:`opinion_losses`): the mean squared error and
``(1 - PLCC) / 2`` over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LossConfig", "level_pairs", "opinion_losses", "qualiclip_losses"]


@dataclass(frozen=True)
class LossConfig:
    """Margins and weights of the QualiCLIP objective.

    Defaults are ours, not the paper's (its values could not be read offline): ``margin_rank``
    0.05 asks adjacent levels to differ by 0.05 in cosine, which at the scoring scale of 100
    is a logit gap of 5; ``margin_cons`` 0.025 tolerates half that between the two crops,
    whose content differs slightly. Weights are 1, the unweighted sum.

    Attributes:
        margin_cons: tolerated gap between the two crops' similarities (``m_cons``).
        margin_rank: required gap between a milder and a stronger level (``m_rank``).
        weight_cons: weight of ``L_cons`` in the total.
        weight_pos: weight of ``L_pos`` in the total.
        weight_neg: weight of ``L_neg`` in the total.
    """

    margin_cons: float = 0.025
    margin_rank: float = 0.05
    weight_cons: float = 1.0
    weight_pos: float = 1.0
    weight_neg: float = 1.0


def level_pairs(levels: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Return index tensors ``(i, j)`` of every level pair with ``i < j``.

    Args:
        levels: the number of degradation levels L.
        device: where the index tensors live.

    Returns:
        Two LongTensors of length ``L * (L - 1) / 2``; ``i[k] < j[k]``.
    """
    i, j = torch.triu_indices(levels, levels, offset=1, device=device)
    return i, j


def _check_similarities(s_pos: Tensor, s_neg: Tensor) -> None:
    if not isinstance(s_pos, Tensor) or not isinstance(s_neg, Tensor):
        raise TypeError("s_pos and s_neg must be tensors")
    if s_pos.shape != s_neg.shape:
        raise ValueError(f"s_pos {tuple(s_pos.shape)} and s_neg {tuple(s_neg.shape)} differ")
    if s_pos.dim() != 4 or s_pos.shape[2] != 2:
        raise ValueError(
            f"similarities must have shape [B, L, 2, P] (2 crops), got {tuple(s_pos.shape)}"
        )
    if s_pos.shape[1] < 2:
        raise ValueError(f"need at least 2 degradation levels, got L={s_pos.shape[1]}")


def qualiclip_losses(
    s_pos: Tensor,
    s_neg: Tensor,
    *,
    margin_cons: float = LossConfig.margin_cons,
    margin_rank: float = LossConfig.margin_rank,
    weight_cons: float = LossConfig.weight_cons,
    weight_pos: float = LossConfig.weight_pos,
    weight_neg: float = LossConfig.weight_neg,
) -> dict[str, Tensor]:
    """Compute QualiCLIP's consistency and ranking losses as named terms.

    Args:
        s_pos: cosine similarity of each degraded crop to each positive prompt.
        s_neg: the same for the negative prompts.
        margin_cons: ``m_cons``, the gap between the two crops left unpenalised.
        margin_rank: ``m_rank``, the gap required between a milder and a stronger level.
        weight_cons: weight of ``L_cons`` in ``total``.
        weight_pos: weight of ``L_pos`` in ``total``.
        weight_neg: weight of ``L_neg`` in ``total``.

    Returns:
        ``{"cons", "pos", "neg", "total"}``, each a scalar tensor (differentiable).

    Shape:
        s_pos, s_neg: ``[B, L, 2, P]``: batch, degradation level (index 0 mildest), crop (A, B),
        prompt pair.

    Example:
        >>> s = torch.linspace(0.5, 0.1, 5).view(1, 5, 1, 1).expand(1, 5, 2, 7)
        >>> qualiclip_losses(s, 0.6 - s)["total"].item()
        0.0
    """
    _check_similarities(s_pos, s_neg)
    # Consistency: both crops of a level share content and degradation, so their similarities
    # should agree up to the margin; s_p and s_n count equally.
    gaps = torch.stack([s_pos[:, :, 0] - s_pos[:, :, 1], s_neg[:, :, 0] - s_neg[:, :, 1]])
    cons = torch.relu(gaps.abs() - margin_cons).mean()

    i, j = level_pairs(s_pos.shape[1], s_pos.device)
    # Ranking within each crop: level i is milder than level j, so s_p must be higher there
    # and s_n lower, each by the margin.
    pos = torch.relu(s_pos[:, j] - s_pos[:, i] + margin_rank).mean()
    neg = torch.relu(s_neg[:, i] - s_neg[:, j] + margin_rank).mean()

    total = weight_cons * cons + weight_pos * pos + weight_neg * neg
    return {"cons": cons, "pos": pos, "neg": neg, "total": total}


def opinion_losses(
    pred: Tensor, mos: Tensor, *, weight_mse: float = 1.0, weight_plcc: float = 1.0
) -> dict[str, Tensor]:
    """pyiqa's losses for fitting scores to opinion scores, as named terms.

    ``mse`` is the mean squared error; ``plcc`` is ``(1 - r) / 2`` with ``r`` the Pearson
    correlation of the batch (in [0, 1]; pyiqa's ``PLCCLoss``), the absolute error for a batch
    of one, whose correlation is undefined.

    Args:
        pred: scores ``[B]``.
        mos: opinion scores ``[B]``, on the scores' scale (normalised to [0, 1]).
        weight_mse, weight_plcc: weights in ``total``.

    Returns:
        ``{"mse", "plcc", "total"}``, scalar tensors (differentiable).

    Example:
        >>> y = torch.tensor([0.1, 0.5, 0.9])
        >>> round(opinion_losses(y, y)["total"].item(), 6)
        0.0
    """
    if pred.shape != mos.shape or pred.ndim != 1:
        raise ValueError(f"pred {tuple(pred.shape)} and mos {tuple(mos.shape)} must be [B]")
    mse = torch.mean((pred - mos) ** 2)
    if pred.shape[0] > 1:
        vx = torch.nn.functional.normalize(pred - pred.mean(), dim=0)
        vy = torch.nn.functional.normalize(mos - mos.mean(), dim=0)
        plcc = (1 - (vx * vy).sum()) / 2
    else:
        plcc = (pred - mos).abs().mean()
    return {"mse": mse, "plcc": plcc, "total": weight_mse * mse + weight_plcc * plcc}
