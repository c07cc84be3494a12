"""Learned prompt context (QualiCLIP+) and prompt files in pyiqa's format.

QualiCLIP+ (pyiqa's ``qualiclip+`` models; after CoOp, Zhou et al. 2022, and CLIP-IQA+, Wang et
al. 2023) keeps CLIP and QualiCLIP's image tower as they are and learns, for each of the 14
prompts, ``n_ctx`` context vectors that take the place of word embeddings. The token embeddings
fed to the text tower for prompt ``i`` are::

    [start] ctx_i[:n_ctx//2] <the prompt's own tokens> ctx_i[n_ctx//2:] [end] [padding ...]

start token, the first half of the context, the prompt's tokens, the second half, then the
end-of-text token and the padding; the feature is read at the end token, position
``1 + n_ctx + len(prompt tokens)``. The score is the usual mean over antonym pairs of the
positive prompt's softmax probability, with pyiqa's scale ``exp(logit_scale) / 2``
(:mod:`qualiclip.model`).

A prompt file is pyiqa's (so files move both ways): ``torch.save`` of ::

    {"params": {
        "prompt_learner.ctx":          [P, n_ctx, W]  (or [n_ctx, W]: one context for all),
        "prompt_learner.token_prefix": [P, 1, W]      the start token's embedding,
        "prompt_learner.token_suffix": [P, L-1-n_ctx, W]  the prompt's tokens, end, padding}}

with ``P`` prompts (14: QualiCLIP's 7 pairs, positive first), ``W`` the text tower's width and
``L`` its context length (77). pyiqa builds ``token_suffix`` by embedding the tokens of
``"X X ... X <prompt>"`` (``n_ctx`` X's) and keeping what follows the X's; that is the prompt's
own tokens from position 1 on, which is how :meth:`LearnedPrompts.initial` builds it.
qualiclip's files add a ``"qualiclip"`` dict beside ``"params"`` (the prompt pairs, the base
weights, the tuning run), which pyiqa does not read. Facts from pyiqa's
``pyiqa/archs/qualiclip_arch.py``; the code is ours.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qualiclip.clip import CLIP
from qualiclip.prompts import PROMPT_PAIRS, PromptPair
from qualiclip.weight_files import load_tensors

__all__ = [
    "CTX_KEY", "PREFIX_KEY", "SUFFIX_KEY", "LearnedPrompts", "PromptFile", "read_prompt_file",
    "save_prompt_file",
]

CTX_KEY = "prompt_learner.ctx"
PREFIX_KEY = "prompt_learner.token_prefix"
SUFFIX_KEY = "prompt_learner.token_suffix"
#: The temperature pyiqa divides ``exp(logit_scale) * cos`` by for QualiCLIP and QualiCLIP+.
PYIQA_TEMPERATURE = 2.0
#: pyiqa's defaults for QualiCLIP+: 16 context vectors per prompt, initialised N(0, 0.02).
DEFAULT_N_CTX = 16
CTX_INIT_STD = 0.02


def prompt_lengths(tokens: torch.Tensor) -> list[int]:
    """Number of BPE tokens of each prompt, from its token ids ``[P, L]`` (start, BPE, end, 0s).

    The end-of-text token has the highest id, so it sits at ``argmax``; the prompt's own tokens
    are the ones between it and the start token.
    """
    return [int(i) - 1 for i in tokens.argmax(dim=-1)]


class LearnedPrompts(nn.Module):
    """Context vectors around each prompt's tokens; pyiqa's ``PromptLearner`` in our terms.

    Args:
        ctx: ``[P, n_ctx, W]`` context per prompt, or ``[n_ctx, W]`` shared by all prompts.
        token_prefix: ``[P, 1, W]`` the start token's embedding.
        token_suffix: ``[P, L - 1 - n_ctx, W]`` the prompt's token embeddings, the end token's,
            then padding.
        lengths: each prompt's number of BPE tokens (:func:`prompt_lengths`).

    Shape:
        :meth:`embeddings` ``[P, L, W]``; :meth:`text_features` ``[P, D]``.

    Raises:
        ValueError: shapes that do not fit together, naming them.
    """

    token_prefix: torch.Tensor
    token_suffix: torch.Tensor

    def __init__(
        self,
        ctx: torch.Tensor,
        token_prefix: torch.Tensor,
        token_suffix: torch.Tensor,
        lengths: Sequence[int],
    ) -> None:
        super().__init__()
        _check_shapes(ctx, token_prefix, token_suffix, lengths)
        self.ctx = nn.Parameter(ctx.detach().float().clone())
        self.register_buffer("token_prefix", token_prefix.detach().float().clone())
        self.register_buffer("token_suffix", token_suffix.detach().float().clone())
        self.lengths = [int(n) for n in lengths]

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[-2])

    @property
    def context_length(self) -> int:
        return 1 + self.n_ctx + int(self.token_suffix.shape[1])

    @classmethod
    def initial(
        cls,
        clip: CLIP,
        tokens: torch.Tensor,
        n_ctx: int = DEFAULT_N_CTX,
        generator: torch.Generator | None = None,
    ) -> LearnedPrompts:
        """A fresh learner as pyiqa starts one: context drawn from N(0, 0.02²), one per prompt.

        Args:
            clip: the base model; its token embedding gives the prefix and suffix.
            tokens: ``[P, L]`` token ids of the bare prompts
                (:func:`qualiclip.tokenizer.tokenize`).
            n_ctx: context vectors per prompt (pyiqa: 16).
            generator: source of the initial context (seeded runs repeat).
        """
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        lengths = prompt_lengths(tokens)
        room = tokens.shape[1] - 2 - n_ctx
        if max(lengths) > room:
            raise ValueError(
                f"a prompt of {max(lengths)} tokens and {n_ctx} context vectors do not fit in "
                f"{tokens.shape[1]} tokens (start and end included); shorten it or lower n_ctx"
            )
        device = clip.token_embedding.weight.device
        with torch.no_grad():
            embedded = clip.token_embedding(tokens.to(device)).float()
        width = embedded.shape[-1]
        ctx = torch.empty(tokens.shape[0], n_ctx, width)
        ctx.normal_(0.0, CTX_INIT_STD, generator=generator)
        suffix = embedded[:, 1 : tokens.shape[1] - n_ctx]
        return cls(ctx.to(device), embedded[:, :1], suffix, lengths)

    def embeddings(self) -> torch.Tensor:
        """Token embeddings ``[P, L, W]``: start, ctx first half, prompt, ctx second half, rest."""
        ctx: torch.Tensor = self.ctx
        if ctx.ndim == 2:
            ctx = ctx.expand(len(self.lengths), -1, -1)
        half = self.n_ctx // 2
        rows = [
            torch.cat([self.token_prefix[i], ctx[i, :half], self.token_suffix[i, :n],
                       ctx[i, half:], self.token_suffix[i, n:]])
            for i, n in enumerate(self.lengths)
        ]
        return torch.stack(rows)

    def eot_positions(self) -> torch.Tensor:
        """``[P]`` where each prompt's end-of-text token lies (its feature is read there)."""
        return torch.tensor([1 + self.n_ctx + n for n in self.lengths], device=self.ctx.device)

    def text_features(self, clip: CLIP) -> torch.Tensor:
        """Text features ``[P, D]`` (not normalised) of the prompts with the learned context."""
        if clip.context_length != self.context_length:
            raise ValueError(
                f"the prompt context spans {self.context_length} tokens, the text tower takes "
                f"{clip.context_length}"
            )
        width = int(clip.token_embedding.weight.shape[1])
        if width != self.ctx.shape[-1]:
            raise ValueError(
                f"the prompt context is {self.ctx.shape[-1]} wide and the text tower is {width} "
                "wide: the prompts were learned for another base model"
            )
        return clip.encode_token_embeddings(self.embeddings(), self.eot_positions())

    def file_params(self) -> dict[str, torch.Tensor]:
        """The ``params`` dict of a pyiqa prompt file (contiguous CPU float32 copies)."""
        return {
            CTX_KEY: self.ctx.detach().float().cpu().contiguous().clone(),
            PREFIX_KEY: self.token_prefix.float().cpu().contiguous().clone(),
            SUFFIX_KEY: self.token_suffix.float().cpu().contiguous().clone(),
        }


def _check_shapes(
    ctx: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor, lengths: Sequence[int]
) -> None:
    shapes = f"ctx {tuple(ctx.shape)}, token_prefix {tuple(prefix.shape)}, " \
             f"token_suffix {tuple(suffix.shape)}"
    if ctx.ndim not in (2, 3) or prefix.ndim != 3 or suffix.ndim != 3:
        raise ValueError(f"expected ctx [P, n_ctx, W] or [n_ctx, W], token_prefix [P, 1, W] and "
                         f"token_suffix [P, S, W]; got {shapes}")
    p, width = prefix.shape[0], prefix.shape[2]
    if prefix.shape[1] != 1 or suffix.shape[0] != p or suffix.shape[2] != width \
            or ctx.shape[-1] != width or (ctx.ndim == 3 and ctx.shape[0] != p):
        raise ValueError(f"prompt tensors do not fit together: {shapes}")
    if len(lengths) != p:
        raise ValueError(f"{len(lengths)} prompts for {p} rows of learned context ({shapes})")
    if lengths and (min(lengths) < 1 or max(lengths) >= suffix.shape[1]):
        raise ValueError(f"prompt lengths {list(lengths)} do not fit a suffix of "
                         f"{suffix.shape[1]} tokens")


@dataclass(frozen=True)
class PromptFile:
    """A prompt file's contents.

    Attributes:
        params: the three ``prompt_learner.*`` tensors.
        prompt_pairs: the prompts the context was learned around (a file without qualiclip's
            metadata, as pyiqa's, holds QualiCLIP's 7 pairs).
        info: qualiclip's metadata (empty for pyiqa's files).
    """

    params: dict[str, torch.Tensor]
    prompt_pairs: tuple[PromptPair, ...] = PROMPT_PAIRS
    info: dict[str, Any] = field(default_factory=dict)

    def learned(self, tokens: torch.Tensor) -> LearnedPrompts:
        """The learner for these tensors; ``tokens`` ``[P, L]`` are the prompts' token ids."""
        if tokens.shape[0] != self.params[PREFIX_KEY].shape[0]:
            raise ValueError(
                f"the file holds context for {self.params[PREFIX_KEY].shape[0]} prompts, "
                f"and {tokens.shape[0]} prompts were given"
            )
        return LearnedPrompts(self.params[CTX_KEY], self.params[PREFIX_KEY],
                              self.params[SUFFIX_KEY], prompt_lengths(tokens))


def read_prompt_file(path: str | os.PathLike[str]) -> PromptFile:
    """Read a pyiqa-format prompt file safely (``torch.load(weights_only=True)``).

    Accepts ``{"params": {...}}`` (pyiqa's), the bare ``params`` dict, and keys with DDP's
    ``module.`` prefix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a prompt file (the message names the keys it lacks).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    raw = load_tensors(path)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: not a prompt file: expected a dict, got {type(raw).__name__}")
    params = raw.get("params", raw)
    if not isinstance(params, Mapping):
        raise ValueError(f"{path}: not a prompt file: 'params' is {type(params).__name__}")
    params = {str(k).removeprefix("module."): v for k, v in params.items()}
    missing = [k for k in (CTX_KEY, PREFIX_KEY, SUFFIX_KEY)
               if not isinstance(params.get(k), torch.Tensor)]
    if missing:
        found = ", ".join(list(params)[:5]) or "none"
        raise ValueError(
            f"{path}: not a QualiCLIP+ prompt file: no {', '.join(missing)} "
            f"(first keys: {found})"
        )
    meta = raw.get("qualiclip")
    info: Mapping[str, Any] = meta if isinstance(meta, Mapping) else {}
    pairs = _pairs(info.get("prompt_pairs"), path) if info.get("prompt_pairs") else PROMPT_PAIRS
    tensors = {k: params[k].detach().float() for k in (CTX_KEY, PREFIX_KEY, SUFFIX_KEY)}
    _check_shapes(tensors[CTX_KEY], tensors[PREFIX_KEY], tensors[SUFFIX_KEY],
                  [1] * tensors[PREFIX_KEY].shape[0])
    return PromptFile(tensors, pairs, dict(info))


def _pairs(value: object, path: Path) -> tuple[PromptPair, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p)
        for p in value
    ):
        raise ValueError(f"{path}: qualiclip.prompt_pairs must be [positive, negative] strings")
    return tuple((str(p[0]), str(p[1])) for p in value)


def save_prompt_file(
    prompts: LearnedPrompts,
    path: str | os.PathLike[str],
    prompt_pairs: Sequence[PromptPair],
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``prompts`` as a pyiqa-format prompt file (temporary file, then rename).

    Args:
        prompts: the learner.
        path: the file to write.
        prompt_pairs: the prompts, recorded so the file can be read without assuming them.
        info: more metadata of plain types (str, numbers, lists, dicts), kept under
            ``"qualiclip"``.
    """
    path = Path(path)
    meta = {**(info or {}), "prompt_pairs": [list(p) for p in prompt_pairs]}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save({"params": prompts.file_params(), "qualiclip": meta}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
