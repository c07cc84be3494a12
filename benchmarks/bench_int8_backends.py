"""int8's two candidate backends side by side: ONNX Runtime's QDQ graph and PyTorch's own x86
quantisation, against the engine's fp32 tower, in one process.

Usage:
    python benchmarks/bench_int8_backends.py [--model random-rn50] [--images 4]
        [--size 1024x768] [--rounds 3]

Both int8 towers quantise the same thing the same way: the BN-folded trunk of
:class:`qualiclip.fused.FusedResNet` with its first convolution left in float, weights int8 per
output channel, activations uint8 per tensor, ranges set on the same 24 calibration images
(:func:`qualiclip.quantize.calibration_images`); the attention pooling and the prompt head stay in
float for both.

* **onnxruntime**: what ``precision="int8"`` runs (:func:`qualiclip.quantize.int8_tower`:
  exported, ``quantize_static`` in QDQ format, run by ONNX Runtime's CPU provider);
* **pytorch**: ``torch.ao.quantization``'s eager mode with the ``x86`` engine (oneDNN/FBGEMM
  kernels), its default x86 ``qconfig`` (histogram observer, reduced range), fused
  convolution + ReLU and ``add_relu`` modules. (``torch.ao.quantization`` announces its removal in
  favour of torchao; the PT2E flow has already left torch, so eager mode is what torch 2.13
  itself offers.)

Printed: images per second of each on the same ``--images`` photos (batch of all of them, the
best of ``--rounds`` interleaved rounds), the ratio to fp32, and each int8 tower's Spearman and
max |score - fp32| over the 40 check images of :mod:`qualiclip.quantize`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import _cover_crop, _size, _sources, build_model


def _conv(fused: Any, relu: bool | None = None) -> nn.Module:
    """A plain (quantisable) convolution from a :class:`FusedConv`, its ReLU fused in
    (``relu``: the FusedConv's own by default)."""
    import torch.ao.nn.intrinsic as nni

    out_ch, in_per_group, kh, kw = fused.weight.shape
    conv = nn.Conv2d(in_per_group * fused.groups, out_ch, (kh, kw), stride=fused.stride,
                     padding=fused.padding, dilation=fused.dilation, groups=fused.groups)
    with torch.no_grad():
        conv.weight.copy_(fused.weight)
        conv.bias.copy_(fused.bias)
    return nni.ConvReLU2d(conv, nn.ReLU()) if (fused.relu if relu is None else relu) else conv


class _Block(nn.Module):
    def __init__(self, block: Any) -> None:
        from torch.ao.nn.quantized import FloatFunctional

        super().__init__()
        self.conv1, self.conv2, self.avgpool = _conv(block.conv1), _conv(block.conv2), block.avgpool
        self.conv3 = _conv(block.conv3, relu=False)  # its ReLU comes after the sum
        self.down_pool = block.down_pool
        self.down_conv = _conv(block.down_conv) if block.down_conv is not None else None
        self.add = FloatFunctional()  # relu(conv3 + shortcut) as one quantised op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.avgpool(self.conv2(self.conv1(x)))
        if self.down_conv is not None:
            x = self.down_conv(self.down_pool(x))
        return self.add.add_relu(self.conv3(out), x)


class _Trunk(nn.Module):
    """The folded trunk for eager quantisation; the first convolution stays float."""

    def __init__(self, tower: Any) -> None:
        import torch.ao.quantization as tq

        super().__init__()
        self.first = _conv(tower.stem[0])
        self.quant = tq.QuantStub()
        self.stem = nn.Sequential(*[_conv(c) for c in tower.stem[1:]])
        self.avgpool = tower.avgpool
        self.blocks = nn.Sequential(*[_Block(b) for b in tower.blocks])
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(self.first(x))
        return self.dequant(self.blocks(self.avgpool(self.stem(x))))


def pytorch_int8_trunk(model: Any) -> nn.Module:
    """The model's trunk quantised by ``torch.ao.quantization`` (eager, x86 engine)."""
    import torch.ao.quantization as tq

    from qualiclip.fused import FusedResNet
    from qualiclip.images import pixels_to_tensor
    from qualiclip.quantize import calibration_images

    torch.backends.quantized.engine = "x86"
    trunk = _Trunk(FusedResNet(model.visual)).eval()
    trunk.qconfig = tq.get_default_qconfig("x86")  # type: ignore[assignment]
    trunk.first.qconfig = None  # type: ignore[assignment]  # float, as in the ONNX recipe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of torch.ao.quantization
        tq.prepare(trunk, inplace=True)
        with torch.inference_mode():
            for pixels in calibration_images():
                trunk(model.normalize_input(pixels_to_tensor([pixels])))
        tq.convert(trunk, inplace=True)
    return trunk


def _scores_with(model: Any, trunk: Callable[[torch.Tensor], torch.Tensor],
                 x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        pooled = model.visual.attnpool(trunk(model.normalize_input(x.clone())))
        return model.scores_from_features(F.normalize(pooled.float(), dim=-1))


def _agreement(model: Any, runs: dict[str, Callable[[torch.Tensor], torch.Tensor]]
               ) -> dict[str, tuple[float, float]]:
    from qualiclip import engine, metrics
    from qualiclip.images import pixels_to_tensor
    from qualiclip.quantize import check_images

    got: dict[str, list[float]] = {name: [] for name in runs}
    fp32: list[float] = []
    for pixels in check_images():
        x = pixels_to_tensor([pixels])
        fp32.append(float(engine.score_tensors(model, x)[0]))
        for name, run in runs.items():
            got[name].append(float(run(x)[0]))
    ref = np.asarray(fp32)
    return {name: (metrics.srcc(np.asarray(v), ref), float(np.abs(np.asarray(v) - ref).max()))
            for name, v in got.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", default="random-rn50",
                   help="random-rn50 (random batch norms, as bench_score.py) or a name/checkpoint")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=_size, default=(1024, 768))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from qualiclip import engine, quantize
    from qualiclip.model import create_model
    from qualiclip.precision import describe_cpu

    model = build_model("cpu") if args.model == "random-rn50" else create_model(args.model).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {describe_cpu()}; "
          f"model {args.model}; load average {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()
    report = quantize.int8_report(model)
    print(f"onnxruntime: calibrated in {time.perf_counter() - start:.1f} s (or cached)", flush=True)
    start = time.perf_counter()
    pt_trunk = pytorch_int8_trunk(model)
    print(f"pytorch: calibrated in {time.perf_counter() - start:.1f} s", flush=True)

    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32 engine": lambda x: engine.score_tensors(model, x),
        "int8 onnxruntime": lambda x: engine.score_tensors(model, x, "int8"),
        "int8 pytorch x86": lambda x: _scores_with(
            model, lambda y: pt_trunk(y.contiguous(memory_format=torch.channels_last)), x),
    }
    agreement = _agreement(model, {k: v for k, v in runs.items() if k != "fp32 engine"})

    w, h = args.size
    sources = _sources()
    x = torch.stack([torch.from_numpy(np.array(_cover_crop(sources[i % len(sources)], w, h)))
                     .permute(2, 0, 1) for i in range(args.images)]).float() / 255
    for run in runs.values():
        run(x[:1])  # warm up
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):  # interleaved, so that load changes reach every backend
        for name, run in runs.items():
            start = time.perf_counter()
            run(x)
            best[name] = min(best[name], time.perf_counter() - start)
    fp32 = args.images / best["fp32 engine"]
    print(f"\n{args.images} photos of {w}x{h}, one batch, best of {args.rounds} rounds; load "
          f"average {os.getloadavg()[0]:.2f}; onnxruntime's own check: {report.describe()}")
    print(f"{'backend':<18}{'img/s':>8}{'x fp32':>8}{'Spearman':>10}{'max |d|':>10}")
    for name in runs:
        speed = args.images / best[name]
        rho, diff = agreement.get(name, (1.0, 0.0))
        print(f"{name:<18}{speed:>8.3f}{speed / fp32:>8.2f}{rho:>10.4f}{diff:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
