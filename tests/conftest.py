"""Shared test fixtures.

Tests that need the reference files beside the project (golden outputs,
pristine photos, the human-rated test set) find them at ``$QUALICLIP_SHARED`` or ``../shared``
from the repository root. In CI (``CI=true``) a missing folder fails the test; elsewhere it is
skipped with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def find_shared() -> Path | None:
    """Return the shared reference folder, or None when it is not there."""
    env = os.environ.get("QUALICLIP_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared")
    for path in candidates:
        if (path / "golden").is_dir():
            return path
    return None


def require_shared(sub: str = "") -> Path:
    """Return ``shared/sub``; fail in CI and skip elsewhere when it is missing."""
    root = find_shared()
    path = root / sub if root is not None else None
    if path is None or not path.exists():
        reason = (
            f"shared reference folder {sub or ''!s} not found: set QUALICLIP_SHARED or place "
            f"it at {REPO_ROOT.parent / 'shared'}"
        )
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require_shared("golden")


def perturb_batch_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every batch norm random statistics and affine terms (a new model has 0/1), so that
    scores differ from image to image and BN folding is really exercised. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model
