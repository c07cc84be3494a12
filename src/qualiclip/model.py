"""The QualiCLIP scorer and the model factory.

QualiCLIP (Agnolucci, Galteri, Bertini, arXiv 2403.11176) scores an image by comparing its CLIP
image feature with the text features of antonym prompt pairs::

    score = mean over pairs p of softmax(s * [cos(f, t_p+), cos(f, t_p-)])[0]

with ``s = 100`` in the authors' release (``formula="official"``). pyiqa's port uses
``s = exp(logit_scale) / 2`` (``formula="pyiqa"``), which gives different numbers. With learned
prompts (QualiCLIP+, :mod:`qualiclip.prompt_learning`) the prompt features are computed once, at
load, by the base's text tower, and pyiqa's formula is the default: it is the one they were
learned with.

The module owns its input contract: RGB in [0, 1] at any size; CLIP normalisation and the prompt
features are buffers, so ``.to()``, ``.half()`` and ``state_dict()`` carry them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qualiclip.clip import (
    CLIP,
    Pooling,
    build_clip,
    load_visual,
)
from qualiclip.onnx_scorer import OnnxScorer
from qualiclip.precision import check_precision
from qualiclip.prompts import CLIP_MEAN, CLIP_STD, PROMPT_PAIRS, PromptPair, flatten_pairs

Formula = Literal["official", "pyiqa"]
FORMULAS: tuple[str, ...] = ("official", "pyiqa")

#: The error of an input whose score came out NaN or infinite.
NON_FINITE_SCORE = "model produced a non-finite score"


class NonFiniteScoreError(ValueError):
    """A score that is not a finite number: broken weights, or arithmetic that overflowed
    (fp16 on some inputs). Reported as that input's error, never as a score."""

    def __init__(self) -> None:
        super().__init__(NON_FINITE_SCORE)


def checked_scores(scores: Sequence[float]) -> list[float | Exception]:
    """Each score, or a :class:`NonFiniteScoreError` in place of one that is NaN or infinite.

    The one rule for what counts as a score: every row-producing path (files, arrays, the
    service, maps, evaluation) goes through it.
    """
    return [s if math.isfinite(s) else NonFiniteScoreError() for s in scores]


class Scorer(Protocol):
    """What every scorer offers the engine, the maps and the front ends.

    :class:`QualiCLIP` and :class:`qualiclip.onnx_scorer.OnnxScorer` (what :func:`create_model`
    returns for an ``.onnx`` file) both are scorers. Code that needs more than this (the image
    tower, the prompt features) asks ``isinstance(model, QualiCLIP)``.

    Shape:
        ``forward``: ``[B, 3, H, W]`` RGB in [0, 1] (of :attr:`input_dtype`) -> ``[B]`` scores
        in [0, 1], higher is better.
    """

    @property
    def name(self) -> str:
        """A label carried into outputs (the weights' name or file name)."""
        ...

    @property
    def weights_sha256(self) -> str | None:
        """Checksum of the weight file, carried into outputs; None when unknown."""
        ...

    @property
    def min_size(self) -> int:
        """Smallest image side, in pixels, the scorer takes."""
        ...

    @property
    def device(self) -> torch.device:
        """Where inputs must be."""
        ...

    @property
    def input_dtype(self) -> torch.dtype:
        """The float dtype inputs must have (float32 unless the weights were cast)."""
        ...

    def check_precision(self, precision: str) -> None:
        """Raise :class:`qualiclip.precision.PrecisionError` for a precision it cannot run."""
        ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...



def scores_from_similarities(similarities: torch.Tensor, scale: float) -> torch.Tensor:
    """QualiCLIP's score ``[B]`` from cosine similarities ``[B, P, 2]`` (positive first).

    ``mean over pairs of softmax(scale * [cos+, cos-])[0]``; prompt tuning
    (:mod:`qualiclip.tune`) differentiates through it.
    """
    return (scale * similarities).softmax(dim=-1)[..., 0].mean(dim=-1)


class QualiCLIP(nn.Module):
    """CLIP image tower + fixed prompt features = a no-reference quality score.

    Args:
        visual: a CLIP image tower taking CLIP-normalised ``[B, 3, H, W]``.
        prompt_features: ``[P, 2, D]`` (or ``[2P, D]``, positive first) text features; they are
            L2-normalised here.
        logit_scale: the softmax scale ``s`` (100 for the authors' formula).
        mean, std: input normalisation (CLIP's).
        name: a label carried into outputs.
        prompt_pairs: the prompts behind ``prompt_features``, for display.
        weights_sha256: checksum of the weight file, carried into outputs.
        formula: the name of the formula ``logit_scale`` follows (``"official"``, ``"pyiqa"``),
            for metadata; None when unknown.

    Shape:
        ``forward``: ``[B, 3, H, W]`` RGB in [0, 1] -> ``[B]`` scores in [0, 1], higher is better.

    Example:
        >>> model = create_model("random-tiny")
        >>> model(torch.rand(2, 3, 64, 80)).shape
        torch.Size([2])
    """

    visual: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    prompt_features: torch.Tensor

    def __init__(
        self,
        visual: nn.Module,
        prompt_features: torch.Tensor,
        *,
        logit_scale: float = 100.0,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        name: str = "custom",
        prompt_pairs: Sequence[PromptPair] | None = None,
        weights_sha256: str | None = None,
        formula: str | None = None,
    ) -> None:
        super().__init__()
        if prompt_features.ndim == 2 and prompt_features.shape[0] % 2 == 0:
            prompt_features = prompt_features.reshape(-1, 2, prompt_features.shape[-1])
        if prompt_features.ndim != 3 or prompt_features.shape[1] != 2:
            raise ValueError(
                f"prompt_features must be [P, 2, D] or [2P, D], got {tuple(prompt_features.shape)}"
            )
        if prompt_pairs is not None and len(prompt_pairs) != prompt_features.shape[0]:
            raise ValueError(
                f"{len(prompt_pairs)} prompt pairs for {prompt_features.shape[0]} feature pairs"
            )
        width = getattr(visual, "output_dim", None)
        if isinstance(width, int) and prompt_features.shape[-1] != width:
            pairs = prompt_features.shape[0]
            raise ValueError(
                f"prompt features of shape {(2 * pairs, prompt_features.shape[-1])} do not fit "
                f"the image tower, whose features are {width} wide: expected {(2 * pairs, width)}"
            )
        self.visual = visual
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("prompt_features", F.normalize(prompt_features.float(), dim=-1))
        self.logit_scale = float(logit_scale)
        self.name = name
        self.prompt_pairs = tuple(prompt_pairs) if prompt_pairs is not None else None
        self.weights_sha256 = weights_sha256
        self.formula = formula
        self.min_size: int = int(getattr(visual, "min_size", 32))

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def input_dtype(self) -> torch.dtype:
        """The float dtype of the tower's weights, which inputs must match (float32 unless the
        model was cast, e.g. with ``.half()``)."""
        weight = next(self.visual.parameters(), None)
        return weight.dtype if weight is not None else torch.float32

    def check_precision(self, precision: str) -> None:
        """Refuse an unknown precision, or one this model's device cannot run.

        Raises:
            PrecisionError: see :func:`qualiclip.precision.check_precision`.
        """
        check_precision(self.device, precision)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalise RGB in [0, 1]."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def normalize_input(self, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """The model's input contract: check RGB ``[B, 3, H, W]`` in [0, 1], then normalise.

        Args:
            x: float images on the model's device.
            inplace: normalise ``x`` itself (the caller gives it up; saves one copy).

        Raises:
            TypeError, ValueError: naming what is wrong with ``x`` (see :meth:`check_input`).
        """
        self.check_input(x)
        if inplace:
            return x.sub_(self.mean.to(x.dtype)).div_(self.std.to(x.dtype))
        return self.normalize(x)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``x`` is a float RGB batch the tower takes."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point RGB in [0, 1], got {x.dtype}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"images must be at least {self.min_size} px on each side, "
                f"got {tuple(x.shape[-2:])}"
            )

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features ``[B, D]`` of RGB ``x`` in [0, 1].

        Half-precision features (under autocast) are normalised in float32.
        """
        self.check_input(x)
        features = self.visual(self.normalize(x))
        if features.dtype in (torch.float16, torch.bfloat16):
            features = features.float()
        return F.normalize(features, dim=-1)

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``[B, P, 2]`` of normalised features to each (positive, negative)."""
        return torch.einsum("bd,pkd->bpk", features, self.prompt_features.to(features.dtype))

    def scores_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]``: mean over pairs of the softmax probability of the positive prompt."""
        return scores_from_similarities(self.similarities(features), self.logit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores_from_features(self.image_features(x))

    @classmethod
    def from_clip(
        cls,
        clip: CLIP,
        prompt_pairs: Sequence[PromptPair] = PROMPT_PAIRS,
        **kwargs: Any,
    ) -> QualiCLIP:
        """Compute the prompt features once with ``clip``'s text tower and keep its image tower."""
        from qualiclip.tokenizer import tokenize

        tokens = tokenize(flatten_pairs(tuple(prompt_pairs)), clip.context_length)
        with torch.no_grad():
            features = clip.encode_text(tokens.to(clip.positional_embedding.device))
        return cls(clip.visual, features, prompt_pairs=prompt_pairs, **kwargs)

    def official_state_dict(
        self, text_state: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Weights in the authors' format: ``clip_model.<OpenAI key>`` and ``prompts_features``.

        Args:
            text_state: OpenAI-keyed text-tower tensors (and ``logit_scale``) to include, so the
                file is a complete CLIP checkpoint; without them only the image tower is saved.
        """
        visual = self.visual.state_dict()
        out = {f"clip_model.visual.{k}": v.detach().cpu().contiguous() for k, v in visual.items()}
        for k, v in (text_state or {}).items():
            if not k.startswith("visual."):
                out[f"clip_model.{k}"] = v.detach().cpu()
        out["prompts_features"] = self.prompt_features.detach().cpu().reshape(-1, self.embed_dim)
        return out

    @property
    def embed_dim(self) -> int:
        return int(self.prompt_features.shape[-1])


# --- factory ------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; other names are checked."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available here")
    return dev


def list_models() -> list[str]:
    """Names :func:`create_model` accepts: released weights, learned prompts on their base
    (QualiCLIP+), then random-weight models."""
    from qualiclip.pretrained import PRETRAINED, PRETRAINED_PROMPTS, RANDOM_MODELS

    return [*PRETRAINED, *PRETRAINED_PROMPTS, *RANDOM_MODELS]


def create_model(
    name_or_path: str | Path = "qualiclip",
    device: str | torch.device = "cpu",
    *,
    pooling: Pooling | None = None,
    formula: Formula | None = None,
    prompt_pairs: Sequence[PromptPair] | None = None,
    prompts: str | Path | None = None,
    cache_dir: str | Path | None = None,
    trust_torchscript: bool = False,
) -> QualiCLIP | OnnxScorer:
    """Build a QualiCLIP scorer from a named weight set or a checkpoint file.

    Weights come from :func:`qualiclip.pretrained.resolve_weights`; named weights carry their
    prompts, normalisation, pooling and logit scale in the table.

    Args:
        name_or_path: a name from :func:`list_models` (released weights are downloaded once,
            checksum-verified and cached) or a checkpoint path: the authors' format
            (``clip_model.*`` + ``prompts_features``), an OpenAI-keyed state dict, qualiclip's
            training export, or (with ``trust_torchscript``) an OpenAI TorchScript archive. An
            ``.onnx`` file from ``qualiclip export`` gives a scorer that runs it with ONNX
            Runtime (:class:`qualiclip.onnx_scorer.OnnxScorer`); its formula and pooling are
            fixed at export, and a ``formula`` or ``pooling`` that differs is refused.
        device: ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.
        pooling: attention-pooling mode; ``None`` means the weights' own (``"none"``, as
            QualiCLIP, for every file and table entry).
        formula: ``"official"`` (the weights' logit scale, 100) or ``"pyiqa"``
            (``exp(logit_scale) / 2``); ``None``: pyiqa's with learned prompts, else official
            (for an ``.onnx`` file, the graph's own).
        prompt_pairs: prompts to compute features for with the checkpoint's text tower, instead
            of the stored features or the weight entry's prompts.
        prompts: learned prompts (QualiCLIP+): a prompt file in pyiqa's format or a name of
            :data:`qualiclip.pretrained.PRETRAINED_PROMPTS` (downloaded and verified like
            weights). The base must hold the text tower, which computes their features once,
            here. A prompts name given as ``name_or_path`` means those prompts on their base
            (``create_model("qualiclip+")``).
        cache_dir: where downloads are kept (default: ``$QUALICLIP_HOME`` or the user cache).
        trust_torchscript: allow loading a TorchScript archive given by path.

    Returns:
        the model in eval mode on ``device``: a :class:`QualiCLIP`, or for an ``.onnx`` file an
        :class:`~qualiclip.onnx_scorer.OnnxScorer`; both are a :class:`Scorer`.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or an unusable checkpoint.
    """
    from qualiclip import pretrained

    if formula is not None and formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    if str(name_or_path).lower().endswith(".onnx"):
        if prompts is not None:
            raise ValueError(f"{name_or_path}: an ONNX graph's prompts are fixed at export")
        return _onnx_scorer(name_or_path, device, pooling, formula, prompt_pairs)
    base, prompts = pretrained.split_prompted(name_or_path, prompts)
    if prompts is not None and prompt_pairs is not None:
        raise ValueError("learned prompts come with their own prompt pairs: give one or the other")
    formula = formula or ("pyiqa" if prompts is not None else "official")
    weights = pretrained.resolve_weights(base, cache_dir, trust_torchscript=trust_torchscript)
    if prompts is not None and "text_projection" not in weights.state:
        raise ValueError(
            f"{weights.name} has no text tower (image tower and prompt features only), and "
            "learned prompts run through it: use a base that holds it, such as the authors' "
            "QualiCLIP.pth (qualiclip), clip-rn50 or a training export with its text tower"
        )
    entry, state, stored = weights.entry, weights.state, weights.prompt_features
    mode: Pooling = pooling or (entry.pooling if entry is not None else "none")
    pairs = tuple(prompt_pairs or (entry.prompt_pairs if entry is not None else PROMPT_PAIRS))
    if entry is not None and entry.prompt_pairs != PROMPT_PAIRS and not prompt_pairs:
        stored = None  # a file's stored features belong to QualiCLIP's prompts, not the entry's
    official_scale = entry.logit_scale if entry is not None else 100.0
    if formula == "pyiqa" and "logit_scale" not in state:
        raise ValueError(
            f"{weights.name}: the pyiqa formula scales by the checkpoint's logit_scale, and this "
            "checkpoint has none (image tower and prompt features only): use formula='official'"
        )
    scale = official_scale if formula == "official" else math.exp(float(state["logit_scale"])) / 2
    common: dict[str, Any] = dict(
        logit_scale=scale,
        mean=entry.mean if entry is not None else CLIP_MEAN,
        std=entry.std if entry is not None else CLIP_STD,
        name=weights.name,
        weights_sha256=weights.sha256,
        formula=formula,
    )
    if prompts is not None:
        model = _with_learned_prompts(weights, prompts, mode, common, cache_dir)
        return model.to(resolve_device(device)).eval()
    try:
        model = _build(state, stored, pairs, mode, prompt_pairs is None, common)
    except ValueError as exc:  # the file's tensors do not make a model: say which file
        raise ValueError(f"{weights.name}: {exc}") from None
    return model.to(resolve_device(device)).eval()


def _build(
    state: dict[str, torch.Tensor],
    stored: torch.Tensor | None,
    pairs: tuple[PromptPair, ...],
    mode: Pooling,
    use_stored: bool,
    common: dict[str, Any],
) -> QualiCLIP:
    """The scorer from checked tensors: stored prompt features, or the text tower's."""
    if stored is not None and use_stored and stored.shape[0] == 2 * len(pairs):
        visual = load_visual(state, mode)
        try:
            return QualiCLIP(visual, stored, prompt_pairs=pairs, **common)
        except ValueError as exc:
            raise ValueError(f"prompts_features: {exc}") from None
    if "text_projection" in state:
        clip = build_clip(state, mode)
        return QualiCLIP.from_clip(clip, pairs, **common)
    raise ValueError(
        f"the checkpoint has no text tower and no prompt features for {len(pairs)} prompt "
        "pairs; cannot build the scorer"
    )


def _with_learned_prompts(
    weights: Any, prompts: str, mode: Pooling, common: dict[str, Any], cache_dir: str | Path | None
) -> QualiCLIP:
    """The scorer of base ``weights`` whose prompt features come from a learned-prompt file."""
    from qualiclip import pretrained
    from qualiclip.prompt_learning import read_prompt_file
    from qualiclip.tokenizer import tokenize

    source = pretrained.resolve_prompts(prompts, cache_dir)
    file = read_prompt_file(source.path)
    clip = build_clip(weights.state, mode)
    tokens = tokenize(flatten_pairs(file.prompt_pairs), clip.context_length)
    with torch.no_grad():
        features = file.learned(tokens).text_features(clip)
    name, sha = pretrained.prompted_identity(
        weights.name, weights.sha256, source.name, source.sha256
    )
    common = {**common, "name": name, "weights_sha256": sha}
    return QualiCLIP(clip.visual, features, prompt_pairs=file.prompt_pairs, **common)


def _onnx_scorer(
    path: str | Path,
    device: str | torch.device,
    pooling: Pooling | None,
    formula: Formula | None,
    prompt_pairs: Sequence[PromptPair] | None,
) -> OnnxScorer:
    """An exported graph's scorer; options the graph fixed must agree with it."""
    if prompt_pairs is not None:
        raise ValueError(f"{path}: an ONNX graph's prompts are fixed at export; re-export instead")
    scorer = OnnxScorer(path, device)
    for option, asked, fixed in (("formula", formula, scorer.formula),
                                 ("pooling", pooling, scorer.pooling)):
        if asked is not None and fixed is not None and asked != fixed:
            raise ValueError(
                f"{path} was exported with {option} {fixed!r}, not {asked!r}: pass {fixed!r} "
                f"or export again with {option} {asked!r}"
            )
    return scorer
