"""QualiCLIPMetric: a torchmetrics Metric; its state is reduced correctly across processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchmetrics")

from qualiclip.engine import score_tensors
from qualiclip.model import create_model
from qualiclip.quality_metric import QualiCLIPMetric


def _images(seed: int, n: int, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_mean_over_every_batch_whatever_their_sizes() -> None:
    model = create_model("random-tiny")
    metric = QualiCLIPMetric(model)
    batches = [_images(0, 3), _images(1, 1, (96, 64)), _images(2, 2)]
    for batch in batches:
        metric.update(batch)
    scores = torch.cat([score_tensors(model, b) for b in batches])
    assert metric.count.item() == 6
    assert metric.compute().item() == pytest.approx(scores.mean().item(), abs=1e-6)
    metric.reset()
    metric.update(batches[1][0])  # one [3, H, W] image
    assert metric.compute().item() == pytest.approx(scores[3].item(), abs=1e-6)
    uint8 = (batches[0] * 255).round().to(torch.uint8)
    metric.reset()
    metric.update(uint8)
    expected = score_tensors(model, uint8.float() / 255).mean()
    assert metric.compute().item() == pytest.approx(expected.item(), abs=1e-6)


def test_forward_gives_the_batch_value_and_accumulates() -> None:
    metric = QualiCLIPMetric("random-tiny")
    a, b = _images(0, 2), _images(1, 2)
    value_a = metric(a)
    metric(b)
    expected = (metric.model(a).sum() + metric.model(b).sum()) / 4
    assert value_a.item() == pytest.approx(metric.model(a).mean().item(), abs=1e-6)
    assert metric.compute().item() == pytest.approx(expected.item(), abs=1e-6)


def test_training_mode_does_not_reach_the_scorer() -> None:
    metric = QualiCLIPMetric("random-tiny", model_options={"formula": "pyiqa"})
    holder = torch.nn.ModuleDict({"m": metric}).train()
    assert holder["m"].training and not metric.model.training
    assert metric.model.formula == "pyiqa"
    assert not any(p.requires_grad for p in metric.model.parameters())
    with pytest.raises(ValueError, match="precision"):
        QualiCLIPMetric("random-tiny", precision="fp64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = QualiCLIPMetric("random-tiny")
        # Unequal shares: rank 0 sees 3 images, rank 1 sees 1.
        metric.update(_images(10 + rank, 3 if rank == 0 else 1))
        value = metric.compute()  # synchronised across the group
        torch.save({"value": value, "count": metric.count}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_is_the_mean_over_all_processes(tmp_path: Path) -> None:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model = create_model("random-tiny")
    everything = torch.cat([score_tensors(model, _images(10, 3)),
                            score_tensors(model, _images(11, 1))])
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # The mean over 4 images, not the mean of the two processes' means.
        assert got["value"].item() == pytest.approx(everything.mean().item(), abs=1e-6)
