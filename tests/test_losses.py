"""Tests for qualiclip.losses: hand-computed cases of the consistency and ranking terms."""

from __future__ import annotations

import pytest
import torch

from qualiclip.losses import level_pairs, qualiclip_losses


def _ordered(b: int = 2, levels: int = 5, prompts: int = 3, step: float = 0.1) -> torch.Tensor:
    """s_p falling by ``step`` per level, identical for both crops: shape [B, L, 2, P]."""
    s = 0.6 - step * torch.arange(levels, dtype=torch.float64)
    return s.view(1, levels, 1, 1).expand(b, levels, 2, prompts).clone()


def test_level_pairs_lists_every_i_less_than_j() -> None:
    i, j = level_pairs(4)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 2),
        (1, 3),
        (2, 3),
    ]


def test_zero_when_every_ordering_holds_by_the_margin() -> None:
    s_pos = _ordered()
    s_neg = 1.0 - s_pos  # rises by 0.1 per level
    out = qualiclip_losses(s_pos, s_neg, margin_cons=0.01, margin_rank=0.05)
    for name in ("cons", "pos", "neg", "total"):
        assert out[name].item() == 0.0, name


def test_one_swapped_pair_in_s_pos() -> None:
    # One sample, one prompt, 3 levels, crop A only differs: s_p(A) = [0.2, 0.5, 0.1].
    # Pairs (0,1): 0.5-0.2+m = 0.35; (0,2): 0.1-0.2+m < 0 -> 0; (1,2): 0.1-0.5+m < 0 -> 0.
    # Crop B is ordered [0.5, 0.3, 0.1]: all zero. Mean over 3 pairs x 2 crops = 0.35 / 6.
    m = 0.05
    s_pos = torch.tensor([[0.2, 0.5], [0.5, 0.3], [0.1, 0.1]], dtype=torch.float64)
    s_pos = s_pos.view(1, 3, 2, 1)
    s_neg = torch.tensor([0.0, 0.2, 0.4], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 2, 1)
    out = qualiclip_losses(s_pos, s_neg, margin_cons=1.0, margin_rank=m)
    assert out["pos"].item() == pytest.approx((0.5 - 0.2 + m) / 6)
    assert out["neg"].item() == 0.0
    assert out["cons"].item() == 0.0  # margin 1 hides the crop gaps
    assert out["total"].item() == pytest.approx(out["pos"].item())


def test_one_swapped_pair_in_s_neg_counts_per_prompt() -> None:
    # Two prompts; only prompt 1 of crop B has levels 0 and 1 swapped in s_n: [0.3, 0.1].
    m = 0.02
    s_pos = _ordered(b=1, levels=2, prompts=2)
    s_neg = torch.tensor([0.1, 0.3], dtype=torch.float64).view(1, 2, 1, 1).repeat(1, 1, 2, 2)
    s_neg[0, :, 1, 1] = torch.tensor([0.3, 0.1], dtype=torch.float64)
    out = qualiclip_losses(s_pos, s_neg, margin_cons=0.5, margin_rank=m)
    # One level pair x 2 crops x 2 prompts = 4 terms, one of them 0.3 - 0.1 + m.
    assert out["neg"].item() == pytest.approx((0.2 + m) / 4)
    assert out["pos"].item() == 0.0


def test_ranking_margin_is_enforced_between_close_levels() -> None:
    # Correct order but a gap of 0.01 < margin 0.05 costs 0.04 for every adjacent pair.
    s_pos = _ordered(b=1, levels=2, prompts=1, step=0.01)
    s_neg = 1.0 - s_pos
    out = qualiclip_losses(s_pos, s_neg, margin_cons=0.0, margin_rank=0.05)
    assert out["pos"].item() == pytest.approx(0.04)
    assert out["neg"].item() == pytest.approx(0.04)


def test_consistency_counts_both_prompts_and_the_margin() -> None:
    # 1 sample, 1 level pair, 1 prompt; crop gap 0.1 in s_p, 0.0 in s_n; margin 0.03.
    s_pos = torch.tensor([[[0.5], [0.4]], [[0.2], [0.2]]], dtype=torch.float64).unsqueeze(0)
    s_neg = torch.tensor([[[0.1], [0.1]], [[0.4], [0.4]]], dtype=torch.float64).unsqueeze(0)
    out = qualiclip_losses(s_pos, s_neg, margin_cons=0.03, margin_rank=0.0)
    # Terms: s_p level0 0.07, s_p level1 0, s_n 0, 0 -> mean 0.07 / 4.
    assert out["cons"].item() == pytest.approx(0.07 / 4)


def test_weights_combine_terms() -> None:
    s_pos = torch.rand(2, 5, 2, 7, generator=torch.Generator().manual_seed(0))
    s_neg = torch.rand(2, 5, 2, 7, generator=torch.Generator().manual_seed(1))
    out = qualiclip_losses(s_pos, s_neg, weight_cons=2.0, weight_pos=0.5, weight_neg=3.0)
    expected = 2.0 * out["cons"] + 0.5 * out["pos"] + 3.0 * out["neg"]
    assert torch.allclose(out["total"], expected)


def test_gradient_flows_to_both_similarities() -> None:
    s_pos = torch.rand(2, 5, 2, 3, requires_grad=True)
    s_neg = torch.rand(2, 5, 2, 3, requires_grad=True)
    qualiclip_losses(s_pos, s_neg)["total"].backward()
    assert s_pos.grad is not None and s_pos.grad.abs().sum() > 0
    assert s_neg.grad is not None and s_neg.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "shape_p, shape_n",
    [
        ((2, 5, 3, 7), (2, 5, 3, 7)),
        ((2, 5, 2), (2, 5, 2)),
        ((2, 5, 2, 7), (2, 4, 2, 7)),
        ((2, 1, 2, 7), (2, 1, 2, 7)),
    ],
)
def test_bad_shapes_raise(shape_p: tuple[int, ...], shape_n: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        qualiclip_losses(torch.zeros(shape_p), torch.zeros(shape_n))
