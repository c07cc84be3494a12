"""An inference copy of the ResNet image tower with batch norms folded in and oneDNN fusions.

Every batch norm is folded into the convolution before it (exact in eval mode up to float
rounding), and on CPUs the ReLU and the residual sum run inside oneDNN's convolution as post-ops
(``mkldnn._convolution_pointwise``). In the plain model about a third of the time goes to the
memory-bound batch-norm, ReLU and add passes over large feature maps; here they cost nothing.
Memory is channels-last throughout, the residual sum is written into the shortcut's buffer and
each intermediate map is freed as soon as it is consumed.

Imports only :mod:`qualiclip.clip` (the tower it copies).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from qualiclip.clip import Bottleneck, ModifiedResNet


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to ``bn(conv(x))`` in eval mode.

    ``bn(y) = (y - mean) * g / sqrt(var + eps) + b``, so scaling each output channel's kernel by
    ``g / sqrt(var + eps)`` and adding ``b - mean * g / sqrt(var + eps)`` as a bias gives the same
    map. Folded in float64, so the only difference is the final rounding to the conv's dtype.

    Returns:
        ``(weight, bias)`` in ``conv.weight``'s dtype, on its device.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("batch norm without running statistics cannot be folded")
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    dtype = conv.weight.dtype
    return weight.to(dtype).detach(), bias.to(dtype).detach()


def _mkldnn_fusion_available() -> bool:
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and hasattr(ops, "_convolution_pointwise_")


def _onednn_runs(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and onednn_bf16_works())


class FusedConv(nn.Module):
    """A convolution with its batch norm folded in, an optional ReLU and residual sum.

    ``forward(x, residual)`` is ``relu(conv(x) + residual)``; on CPUs with oneDNN the sum and the
    ReLU are post-ops of the convolution and the result is written into ``residual``'s buffer
    (which the caller gives up), so no extra feature map is allocated.
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> None:
        super().__init__()
        weight, bias = fold_batch_norm(conv, bn)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride = [int(s) for s in conv.stride]
        if isinstance(conv.padding, str):
            raise ValueError(f"string padding {conv.padding!r} is not supported")
        self.padding = [int(p) for p in conv.padding]
        self.dilation = [int(d) for d in conv.dilation]
        self.groups = int(conv.groups)
        self.relu = relu
        self.use_mkldnn = _mkldnn_fusion_available()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        unary = "relu" if self.relu else "none"
        if self.use_mkldnn and x.device.type == "cpu" and _onednn_runs(x.dtype):
            args = (self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
            ops = torch.ops.mkldnn
            if residual is None:
                return ops._convolution_pointwise(x, *args, unary, [], "")
            # relu(conv(x) + residual), written into residual's buffer (the caller gives it up).
            residual = residual.contiguous(memory_format=torch.channels_last)
            return ops._convolution_pointwise_.binary(
                residual, x, *args, "add", 1.0, unary if self.relu else None, [], ""
            )
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        if residual is not None:
            y += residual
        return y.relu_() if self.relu else y


class FusedBottleneck(nn.Module):
    """:class:`qualiclip.clip.Bottleneck` with folded batch norms (inference only)."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1 = FusedConv(block.conv1, block.bn1, relu=True)
        self.conv2 = FusedConv(block.conv2, block.bn2, relu=True)
        self.avgpool = block.avgpool
        self.conv3 = FusedConv(block.conv3, block.bn3, relu=True)
        self.down_pool: nn.Module | None = None
        self.down_conv: FusedConv | None = None
        if block.downsample is not None:
            pool, conv, bn = block.downsample
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                raise TypeError("a Bottleneck's shortcut must be (pool, Conv2d, BatchNorm2d)")
            self.down_pool, self.down_conv = pool, FusedConv(conv, bn, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out = self.avgpool(out)
        if self.down_conv is not None and self.down_pool is not None:
            x = self.down_conv(self.down_pool(x))
        # x (the block input, or the shortcut just computed) is not needed after the sum, so the
        # sum is written into it.
        return self.conv3(out, residual=x)


class FusedResNet(nn.Module):
    """An inference copy of a :class:`~qualiclip.clip.ModifiedResNet` trunk, batch norms folded.

    The copy's weights are independent of the source (later training does not reach it); the
    attention pooling is the source's own module, shared.

    Args:
        visual: the ResNet image tower, in eval mode.
        dtype: dtype of the copy's weights (bf16/fp16 for reduced precision).

    Shape:
        ``trunk``: ``[B, 3, H, W]`` (CLIP-normalised) -> ``[B, 32 * width, H / 32, W / 32]``.
    """

    def __init__(self, visual: ModifiedResNet, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if visual.training:
            raise ValueError("fold batch norms of a model in eval mode (call model.eval())")
        self.stem = nn.ModuleList(
            [
                FusedConv(visual.conv1, visual.bn1, relu=True),
                FusedConv(visual.conv2, visual.bn2, relu=True),
                FusedConv(visual.conv3, visual.bn3, relu=True),
            ]
        )
        self.avgpool = visual.avgpool
        blocks = [
            block
            for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
            for block in layer.children()
        ]
        if not all(isinstance(block, Bottleneck) for block in blocks):
            raise TypeError("FusedResNet expects ModifiedResNet layers made of Bottleneck blocks")
        self.blocks = nn.ModuleList(FusedBottleneck(b) for b in blocks if isinstance(b, Bottleneck))
        self.to(dtype=dtype)
        self.dtype = dtype
        # The pooling is the source's own module, kept in a tuple so it is not registered (and
        # not copied or cast along with the folded weights).
        self._attnpool: tuple[nn.Module] = (visual.attnpool,)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_owned([x])

    def trunk_owned(self, box: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`trunk` of the one input in ``box``, which is emptied.

        When the caller keeps no other reference, the input is freed as soon as the first
        convolution has read it instead of living through the whole pass: for a 144-megapixel
        photo that is 1.7 GB of float32 pixels.
        """
        x = box.pop().to(self.dtype).contiguous(memory_format=torch.channels_last)
        for conv in self.stem:
            x = conv(x)
        x = self.avgpool(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attnpool[0](self.trunk_owned([x]))

    def forward_owned(self, box: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` of the one input in ``box``, which is emptied (:meth:`trunk_owned`)."""
        return self._attnpool[0](self.trunk_owned(box))


@functools.cache
def onednn_bf16_works() -> bool:
    """Whether oneDNN's fused bf16 convolution runs on this CPU, found by running one once.

    oneDNN's bf16 kernels need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; on other CPUs (AVX2-only
    ones such as AMD Zen 3) the fused convolution raises, while PyTorch's own convolution still
    computes in bf16. Probing, rather than reading CPU flags, follows whatever this build of
    PyTorch and oneDNN accept.
    """
    if not _mkldnn_fusion_available():
        return False
    x = torch.ones(1, 2, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.ones(2, 2, 1, 1, dtype=torch.bfloat16)
    try:
        torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "relu",
                                                [], "")
    except RuntimeError:
        return False
    return True


