"""QualityLoss, QualityScore and create_metric: QualiCLIP as a differentiable function of pixels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import perturb_batch_norms
from qualiclip.engine import score
from qualiclip.model import create_model, resolve_device
from qualiclip.quality_loss import QualityLoss, QualityScore, create_metric


@pytest.fixture(scope="module")
def tiny():
    return perturb_batch_norms(create_model("random-tiny"))


def test_loss_is_one_minus_the_mean_score(tiny) -> None:
    x = torch.rand(3, 3, 64, 80)
    with torch.no_grad():
        scores = tiny(x)
    torch.testing.assert_close(QualityLoss(tiny)(x), 1 - scores.mean())
    torch.testing.assert_close(QualityLoss(tiny, reduction="sum")(x), (1 - scores).sum())
    torch.testing.assert_close(QualityLoss(tiny, reduction="none")(x), 1 - scores)
    torch.testing.assert_close(QualityScore(tiny)(x[0]), scores[:1])  # [3, H, W] is a batch of 1


def test_gradients_match_finite_differences_in_float64() -> None:
    model = perturb_batch_norms(create_model("random-micro").double())
    loss = QualityLoss(model, precision="fp32")
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    grad = torch.autograd.grad(loss(x), x)[0]
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    # Along a random direction (every pixel at once), and along single pixels.
    directions = [torch.randn(x.shape, dtype=torch.float64, generator=g)]
    for c, i, j in [(0, 5, 7), (2, 20, 31)]:
        one = torch.zeros_like(x)
        one[0, c, i, j] = 1.0
        directions.append(one)
    with torch.no_grad():
        for v in directions:
            numeric = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
            analytic = (grad * v).sum()
            assert analytic.item() == pytest.approx(numeric.item(), rel=1e-3, abs=1e-9)


def test_weights_are_frozen_and_the_scorer_stays_in_eval_mode(tiny) -> None:
    holder = torch.nn.Sequential(QualityLoss(tiny))
    holder.train()
    loss = holder[0]
    assert loss.training and not loss.model.training
    assert not any(p.requires_grad for p in loss.parameters())
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    loss(x).backward()
    assert x.grad is not None and all(p.grad is None for p in loss.parameters())


def test_any_size_and_clear_input_errors(tiny) -> None:
    loss = QualityLoss(tiny)
    for shape in [(1, 3, 32, 32), (2, 3, 97, 130)]:
        assert torch.isfinite(loss(torch.rand(shape)))
    with pytest.raises(ValueError, match="at least 32 px"):
        loss(torch.rand(1, 3, 16, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        loss(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="reduction"):
        QualityLoss(tiny, reduction="max")
    with pytest.raises(ValueError, match="precision"):
        QualityLoss(tiny, precision="fp8")


def test_autocast_choice(tiny) -> None:
    from qualiclip.precision import PrecisionError, native_bf16

    auto = QualityLoss(tiny)
    assert auto.precision == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    with pytest.raises(PrecisionError):
        QualityLoss(tiny, precision="fp16")  # CUDA only
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    bf16 = QualityLoss(tiny, precision="bf16")(x)
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(QualityLoss(tiny, precision="fp32")(x).item(), abs=0.05)
    bf16.backward()
    assert torch.isfinite(x.grad).all()


def test_names_load_models_and_onnx_graphs_are_refused(tmp_path: Path) -> None:
    loss = QualityLoss("random-tiny", device="cpu")
    assert loss.model.name == "random-tiny"
    with pytest.raises(TypeError, match="apply to a name"):
        QualityLoss(create_model("random-tiny"), formula="pyiqa")

    class NotQualiCLIP(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="needs a QualiCLIP model"):
        QualityLoss(NotQualiCLIP())  # type: ignore[arg-type]


def test_create_metric_like_pyiqa(tmp_path: Path, tiny) -> None:
    metric = create_metric("random-tiny", device="cpu")
    assert metric.lower_better is False and metric.score_range == (0.0, 1.0)
    image = tmp_path / "a.png"
    Image.effect_noise((64, 48), 30).convert("RGB").save(image)
    model = metric.model
    one = metric(str(image))
    assert one.shape == (1,) and one.item() == pytest.approx(score(model, image), abs=1e-6)
    two = metric([str(image), image])
    assert two.shape == (2,)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(metric(x), score(model, x), atol=1e-5, rtol=0)
    assert not metric(x).requires_grad
    as_loss = create_metric("random-tiny", device="cpu", as_loss=True)
    y = x.clone().requires_grad_(True)
    out = as_loss(y)
    out.sum().backward()
    assert y.grad is not None and y.grad.abs().max() > 0


def test_the_default_device_auto_is_resolved_for_names_and_built_models() -> None:
    """``device="auto"`` (create_metric's default) means resolve_device's choice, never a
    device string handed to ``Module.to``."""
    expected = resolve_device("auto")
    assert next(create_metric("random-tiny").model.parameters()).device.type == expected.type
    loss = QualityLoss(create_model("random-tiny", "cpu"), device="auto")
    assert next(loss.model.parameters()).device.type == expected.type


def test_package_exports() -> None:
    import qualiclip

    assert qualiclip.QualityLoss is QualityLoss and qualiclip.create_metric is create_metric
