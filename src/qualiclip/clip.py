"""CLIP image and text towers with OpenAI's state-dict names.

The modules mirror the layout of OpenAI CLIP (Radford et al., "Learning Transferable Visual Models
From Natural Language Supervision", 2021) so that released checkpoints load unchanged: a modified
ResNet (three-convolution stem, anti-aliased strided blocks, attention pooling) or a ViT for
images, and a causal transformer for text. Sizes are read from a state dict's tensors
(:func:`config_from_state_dict`), so any compatible checkpoint builds the right model.

QualiCLIP scores images at full resolution. The ResNet's attention pooling therefore supports
three ways of treating its positional embedding (``pooling``):

- ``"none"`` (QualiCLIP's default): no positional embedding; any input size works.
- ``"original"``: OpenAI's behaviour; the input grid must match the embedding (224 px for RN50).
- ``"interpolate"``: the authors' ``pos_embedding=True``: the ``(G*G+1, C)`` table is treated as a
  one-channel image and resized bicubically to ``(H*W+1, C)``, along the token axis.

Only the first (mean) token's output is kept, so pooling queries with that token alone: O(N)
memory in the number of grid cells instead of the O(N^2) of full self-attention, with the same
result (the full form is kept for reference as ``full_attention=True``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Pooling = Literal["none", "original", "interpolate"]
POOLING_MODES: tuple[str, ...] = ("none", "original", "interpolate")

#: Keys some released checkpoints carry beside the tensors; they are dropped on load.
EXTRA_KEYS: tuple[str, ...] = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class CLIPConfig:
    """Sizes of a CLIP model; field names follow OpenAI's ``CLIP`` constructor.

    ``vision_layers`` is a 4-tuple of block counts for a ResNet and an int for a ViT
    (``vision_patch_size`` is ``None`` for a ResNet). ``transformer_layers == 0`` means a model
    without a text tower (enough to score when the prompt features are stored).
    """

    embed_dim: int
    image_resolution: int
    vision_layers: tuple[int, int, int, int] | int
    vision_width: int
    vision_patch_size: int | None
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, tuple)

    @property
    def has_text(self) -> bool:
        return self.transformer_layers > 0


#: OpenAI CLIP RN50.
RN50 = CLIPConfig(
    embed_dim=1024,
    image_resolution=224,
    vision_layers=(3, 4, 6, 3),
    vision_width=64,
    vision_patch_size=None,
)

#: The tiny ResNet CLIP of the golden reference files (random weights; for tests).
TINY_RN = CLIPConfig(
    embed_dim=64,
    image_resolution=224,
    vision_layers=(1, 1, 1, 1),
    vision_width=16,
    vision_patch_size=None,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
)


# --- ResNet image tower


class Bottleneck(nn.Module):
    """ResNet bottleneck whose stride is an average pool before ``conv3`` (anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool: nn.Module = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            # "-1" keeps OpenAI's key numbering: the pool has no parameters, the conv is "0".
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention pooling of a feature map, queried by the mean token.

    Args:
        spacial_dim: side of the grid the positional embedding was trained for (7 for RN50).
        embed_dim: channels of the feature map.
        num_heads: attention heads.
        output_dim: channels of the pooled output.
        pooling: positional-embedding mode, one of :data:`POOLING_MODES`.

    Shape:
        input ``[B, C, H, W]``, output ``[B, output_dim]``.
    """

    def __init__(
        self,
        spacial_dim: int,
        embed_dim: int,
        num_heads: int,
        output_dim: int | None = None,
        pooling: Pooling = "none",
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by {num_heads} heads")
        self.positional_embedding = nn.Parameter(
            torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads
        self.pooling: Pooling = pooling
        #: Run full N x N self-attention and keep token 0 (reference behaviour; O(N^2) memory).
        self.full_attention = False

    def _positional(self, tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
        if self.pooling == "none":
            return None
        table = self.positional_embedding
        if self.pooling == "original":
            if tokens != table.shape[0]:
                side = math.isqrt(table.shape[0] - 1)
                raise ValueError(
                    f"pooling='original' needs a {side}x{side} feature grid ({side * 32} px input "
                    f"for a ResNet); got {tokens - 1} cells. Use pooling='none' or 'interpolate'."
                )
            return table.to(dtype)
        resized = F.interpolate(table[None, None], size=(tokens, table.shape[1]), mode="bicubic")
        return resized[0, 0].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, HW+1, C]
        pos = self._positional(x.shape[1], x.dtype)
        if pos is not None:
            x = x + pos
        if self.full_attention:
            return self._projected_attention(x, x)
        if self.training:
            # Training keeps the projected form, so every parameter gets its gradient (k_proj's
            # bias gets an exact zero, as in the reference) and DDP sees all of them used.
            return self._projected_attention(x, x[:, :1])
        return self._first_token_attention(x)

    def _projected_attention(self, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Attention with every token's key and value projected, as in the reference.

        ``queries`` is all of ``x`` (the reference's N x N form) or its first token; the output
        of token 0 is kept either way.

        Shape:
            ``[B, N, C]``, ``[B, Q, C]`` -> ``[B, out]``.
        """
        b, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q_proj(queries).view(b, -1, heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, n, heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, n, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, Q, d]
        return self.c_proj(out[:, :, 0].reshape(b, c))

    def _first_token_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Token 0 alone queries: :meth:`_projected_attention`'s output in O(N·C), for inference.

        Key and value projections of all N tokens are never formed. For head ``h`` with query
        ``q_h``, the logit of token ``j`` is ``q_h · (K_h x_j + k_h) / sqrt(d)``: the bias term is
        the same for every ``j`` and cancels in the softmax, so the logits are ``x_j · u_h`` with
        ``u_h = K_h^T q_h / sqrt(d)``. With weights ``a_hj`` summing to one, the head's output
        ``sum_j a_hj (V_h x_j + v_h)`` is ``V_h (sum_j a_hj x_j) + v_h``. That replaces two
        ``N x C x C`` products (about 13 GFLOP for RN50 at 1024x768) with four small ones.

        Shape:
            ``[B, N, C]`` -> ``[B, out]``.
        """
        b, _, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q_proj(x[:, 0]).view(b, heads, d)
        k_weight = self.k_proj.weight.view(heads, d, c).to(q.dtype)
        u = torch.einsum("bhd,hdc->bch", q, k_weight) * d**-0.5  # [B, C, heads]
        weights = torch.bmm(x, u.to(x.dtype)).softmax(dim=1)  # [B, N, heads]
        pooled = torch.bmm(weights.transpose(1, 2), x)  # [B, heads, C]
        v_weight = self.v_proj.weight.view(heads, d, c).to(pooled.dtype)
        out = torch.einsum("bhc,hdc->bhd", pooled, v_weight).reshape(b, c) + self.v_proj.bias
        return self.c_proj(out)


class ModifiedResNet(nn.Module):
    """OpenAI CLIP's ResNet: 3-conv stem, anti-aliased downsampling, attention pooling.

    Shape:
        input ``[B, 3, H, W]`` (CLIP-normalised), output ``[B, output_dim]``.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        output_dim: int,
        heads: int,
        input_resolution: int = 224,
        width: int = 64,
        pooling: Pooling = "none",
    ) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        stages = []
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(
            input_resolution // 32, width * 32, heads, output_dim, pooling=pooling
        )

    #: Smallest input side: five halvings leave a 1x1 grid.
    min_size = 32

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling: ``[B, 3, H, W] -> [B, 32*width, H/32, W/32]``."""
        x = self.stem(x.to(self.conv1.weight.dtype))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.trunk(x))


# --- transformers


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as OpenAI CLIP does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, causal: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )
        self.ln_2 = LayerNorm(d_model)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[L, B, D]`` (sequence first, as OpenAI CLIP)."""
        mask = None
        if self.causal:
            n = x.shape[0]
            mask = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """OpenAI CLIP's ViT image tower (fixed input resolution).

    Shape:
        input ``[B, 3, R, R]`` with R the configured resolution, output ``[B, output_dim]``.
    """

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.min_size = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        grid = input_resolution // patch_size
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_resolution, self.input_resolution):
            raise ValueError(
                f"this ViT takes {self.input_resolution}x{self.input_resolution} inputs, "
                f"got {tuple(x.shape[-2:])}"
            )
        x = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).transpose(0, 1)
        x = self.transformer(x).transpose(0, 1)
        return self.ln_post(x[:, 0, :]) @ self.proj


# --- the whole model


def build_visual(config: CLIPConfig, pooling: Pooling = "none") -> nn.Module:
    """Construct (randomly initialised) the image tower that ``config`` describes."""
    if isinstance(config.vision_layers, tuple):
        return ModifiedResNet(
            layers=config.vision_layers,
            output_dim=config.embed_dim,
            heads=config.vision_width * 32 // 64,
            input_resolution=config.image_resolution,
            width=config.vision_width,
            pooling=pooling,
        )
    if config.vision_patch_size is None:
        raise ValueError("a ViT config needs vision_patch_size")
    return VisionTransformer(
        input_resolution=config.image_resolution,
        patch_size=config.vision_patch_size,
        width=config.vision_width,
        layers=config.vision_layers,
        heads=config.vision_width // 64,
        output_dim=config.embed_dim,
    )


class CLIP(nn.Module):
    """CLIP image and text towers (OpenAI layout). The constructor never loads weights.

    Args:
        config: model sizes.
        pooling: ResNet attention-pooling mode (see the module docstring).

    Example:
        >>> model = CLIP(TINY_RN)
        >>> model.encode_image(torch.zeros(1, 3, 64, 96)).shape
        torch.Size([1, 64])
    """

    def __init__(self, config: CLIPConfig, pooling: Pooling = "none") -> None:
        super().__init__()
        self.config = config
        self.context_length = config.context_length
        self.visual = build_visual(config, pooling)
        self.transformer = Transformer(
            config.transformer_width,
            config.transformer_layers,
            config.transformer_heads,
            causal=True,
        )
        self.token_embedding = nn.Embedding(config.vocab_size, config.transformer_width)
        self.positional_embedding = nn.Parameter(
            torch.empty(config.context_length, config.transformer_width)
        )
        self.ln_final = LayerNorm(config.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(config.transformer_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._initialize()

    def _initialize(self) -> None:
        # OpenAI CLIP's initialisation, so random models (tests, training from scratch) are sane.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        visual = self.visual
        if isinstance(visual, ModifiedResNet):
            std = visual.attnpool.c_proj.in_features**-0.5
            for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
                nn.init.normal_(getattr(visual.attnpool, proj).weight, std=std)
            for name, param in visual.named_parameters():
                if name.startswith("layer") and name.endswith("bn3.weight"):
                    nn.init.zeros_(param)
        width, layers = self.transformer.width, max(self.transformer.layers, 1)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for name, param in self.transformer.named_parameters():
            if name.endswith("attn.in_proj_weight"):
                nn.init.normal_(param, std=width**-0.5)
            elif name.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
                nn.init.normal_(param, std=proj_std)
            elif name.endswith("mlp.c_fc.weight"):
                nn.init.normal_(param, std=(2 * width) ** -0.5)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image features (not normalised). ``image``: CLIP-normalised ``[B, 3, H, W]``."""
        return self.visual(image)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text features (not normalised) at each row's end-of-text token.

        Args:
            text: token ids ``[B, context_length]`` from :func:`qualiclip.tokenizer.tokenize`.
        """
        if not self.config.has_text:
            raise ValueError("this CLIP model was built without a text tower")
        # The end-of-text token has the highest id in the vocabulary.
        return self.encode_token_embeddings(self.token_embedding(text), text.argmax(dim=-1))

    def encode_token_embeddings(self, embeddings: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Text features (not normalised) of sequences given as token embeddings.

        :meth:`encode_text` is this after the embedding lookup; prompt learning (CoOp, CLIP-IQA+,
        QualiCLIP+) puts learned vectors where some tokens' embeddings would be.

        Args:
            embeddings: ``[B, context_length, transformer_width]``.
            eot: ``[B]`` position of each row's end-of-text token, where its feature is read.
        """
        dtype = self.text_projection.dtype
        x = embeddings.to(dtype) + self.positional_embedding.to(dtype)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits_per_image, logits_per_text)``: scaled cosine similarities."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str, depth: int) -> int:
    return len({k.split(".")[depth] for k in state_dict if k.startswith(prefix)})


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> CLIPConfig:
    """Infer a :class:`CLIPConfig` from OpenAI-named tensors (as OpenAI's ``build_model``).

    A state dict without text-tower keys gives ``transformer_layers=0`` (image tower only).

    Raises:
        ValueError: when the keys are not those of an OpenAI-layout CLIP model.
    """
    sd = state_dict
    try:
        if "visual.proj" in sd:  # ViT
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision_layers: tuple[int, int, int, int] | int = _count_blocks(
                sd, "visual.transformer.resblocks.", 3
            )
            resolution, embed_dim = patch * grid, sd["visual.proj"].shape[1]
            patch_size: int | None = patch
        else:  # ResNet
            counts = [_count_blocks(sd, f"visual.layer{i}.", 2) for i in (1, 2, 3, 4)]
            vision_layers = (counts[0], counts[1], counts[2], counts[3])
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            resolution, embed_dim = grid * 32, sd["visual.attnpool.c_proj.weight"].shape[0]
            patch_size = None
    except KeyError as exc:
        raise ValueError(f"not an OpenAI-layout CLIP state dict: missing {exc}") from None
    if "text_projection" not in sd:
        return CLIPConfig(
            embed_dim, resolution, vision_layers, width, patch_size, transformer_layers=0
        )
    text_width = sd["ln_final.weight"].shape[0]
    return CLIPConfig(
        embed_dim=embed_dim,
        image_resolution=resolution,
        vision_layers=vision_layers,
        vision_width=width,
        vision_patch_size=patch_size,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=text_width,
        transformer_heads=text_width // 64,
        transformer_layers=_count_blocks(sd, "transformer.resblocks.", 2),
    )


def load_visual(state_dict: dict[str, torch.Tensor], pooling: Pooling = "none") -> nn.Module:
    """Build only the image tower sized from ``state_dict`` and load its ``visual.*`` weights.

    Scoring needs no text tower when the prompt features are stored with the weights.
    """
    config = config_from_state_dict(state_dict)
    visual = build_visual(config, pooling)
    weights = {k[7:]: v.float() for k, v in state_dict.items() if k.startswith("visual.")}
    load_checked(visual, weights, "visual.")
    return visual.eval()


def build_clip(state_dict: dict[str, torch.Tensor], pooling: Pooling = "none") -> CLIP:
    """Build a :class:`CLIP` sized from ``state_dict`` and load its weights (strictly, in fp32).

    A state dict with image-tower keys only builds a model whose text tower is empty.
    """
    sd = {k: v for k, v in state_dict.items() if k not in EXTRA_KEYS}
    config = config_from_state_dict(sd)
    model = CLIP(config, pooling=pooling)
    if not config.has_text:
        own = model.state_dict()
        sd = {**{k: v for k, v in own.items() if not k.startswith("visual.")}, **sd}
    load_checked(model, {k: v.float() for k, v in sd.items()})
    return model.eval()


def load_checked(module: nn.Module, weights: dict[str, torch.Tensor], prefix: str = "") -> None:
    """``module.load_state_dict(weights, strict=True)``, refusing in one line what it would
    refuse in many: the first tensor of the wrong shape (its key and both shapes), or the keys
    missing or left over.

    Raises:
        ValueError: the weights do not fit the module sized from them.
    """
    own = module.state_dict()
    for key, mine in own.items():
        theirs = weights.get(key)
        if theirs is not None and tuple(theirs.shape) != tuple(mine.shape):
            raise ValueError(
                f"{prefix}{key} has shape {tuple(theirs.shape)} in the checkpoint, but the "
                f"model its other tensors describe needs {tuple(mine.shape)}"
            )
    missing = [prefix + k for k in own if k not in weights]
    extra = [prefix + k for k in weights if k not in own]
    if missing or extra:
        parts = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("missing", missing), ("unexpected", extra)) if keys]
        raise ValueError(f"the checkpoint's keys do not fit a CLIP model: {'; '.join(parts)}")
    module.load_state_dict(weights, strict=True)
