"""Cross-check QualiCLIP+ scoring against pyiqa's own code on a tiny model.

Usage:
    python benchmarks/crosscheck_pyiqa_plus.py --pyiqa DIR [--base CKPT] [--seed 0]

``DIR`` holds pyiqa's ``pyiqa/archs/qualiclip_arch.py`` and ``pyiqa/archs/clip_model.py``
unchanged, with stubs for the rest of pyiqa they import (``pyiqa.utils.registry``,
``pyiqa.archs.arch_util``, ``pyiqa.archs.constants``) and OpenAI CLIP's tokenizer as the
package ``clip`` (``tokenize`` and ``simple_tokenizer``); nothing of pyiqa is imported unless
``--pyiqa`` is given, and nothing of it is in this repository. ``--base`` is a CLIP checkpoint
with a text tower in the authors' format (default: the tiny golden model of
``$QUALICLIP_SHARED/golden``).

Two directions, on the same images (3 x 224 x 224 and 2 x 160 x 288, uniform noise):

1. pyiqa's ``PromptLearner`` (``prompt_specific_ctx=True``, 16 context vectors, as pyiqa's
   QualiCLIP+) with its context redrawn at random; its state dict saved as pyiqa saves networks
   (``{"params": ...}``); scored by pyiqa's ``QualiCLIP.forward`` and by
   ``qualiclip.create_model(base, prompts=file)``, plain forward and the engine's fast path.
2. A prompt file written by qualiclip (``LearnedPrompts.initial``, whose start and prompt
   embeddings are compared with those pyiqa's learner builds; random context;
   ``save_prompt_file``) loaded into pyiqa's learner with ``load_state_dict(strict=True)`` as
   pyiqa's ``load_pretrained_network`` does, scored by both.

Prints max |difference| of the scores for each; the target is 1e-5 or less.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from qualiclip.clip import build_clip
from qualiclip.engine import score_tensors
from qualiclip.model import create_model
from qualiclip.pretrained import load_checkpoint
from qualiclip.prompt_learning import LearnedPrompts, save_prompt_file
from qualiclip.prompts import CLIP_MEAN, CLIP_STD, PROMPT_PAIRS, flatten_pairs
from qualiclip.tokenizer import tokenize

ROOT = Path(__file__).resolve().parents[1]


def default_base() -> Path:
    env = os.environ.get("QUALICLIP_SHARED")
    root = Path(env) if env else ROOT.parent / "shared"
    return root / "golden" / "qualiclip_tiny_official_format.pth"


def pyiqa_scorer(pyiqa_dir: Path, base: Path) -> nn.Module:
    """pyiqa's QualiCLIP in its ``qualiclip+`` form on ``base``, without pyiqa's downloads:
    the object's fields are set as its ``__init__`` sets them, then its own ``forward`` runs."""
    sys.path.insert(0, str(pyiqa_dir))
    from pyiqa.archs import clip_model, qualiclip_arch

    state, _ = load_checkpoint(base)
    clip = clip_model.build_model(dict(state)).float().eval()
    scorer = qualiclip_arch.QualiCLIP.__new__(qualiclip_arch.QualiCLIP)
    nn.Module.__init__(scorer)
    scorer.clip_model = [clip]
    scorer.prompt_pairs = flatten_pairs(PROMPT_PAIRS)
    scorer.model_type = "qualiclip+"
    scorer.temperature = 2
    scorer.pos_embedding = False
    scorer.prompt_learner = qualiclip_arch.PromptLearner(
        clip, scorer.prompt_pairs, n_ctx=16, ctx_init="", prompt_specific_ctx=True
    )
    scorer.default_mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    scorer.default_std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return scorer.eval()


def ours(base: Path, prompts: Path, images: list[torch.Tensor]) -> list[torch.Tensor]:
    model = create_model(base, prompts=prompts)
    with torch.no_grad():
        plain = [model(x) for x in images]
    fast = [score_tensors(model, x) for x in images]
    return [torch.cat(plain), torch.cat(fast)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyiqa", type=Path, required=True, help="folder with pyiqa's code")
    parser.add_argument("--base", type=Path, default=default_base())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    images = [torch.rand(3, 3, 224, 224, generator=g), torch.rand(2, 3, 160, 288, generator=g)]
    reference = pyiqa_scorer(args.pyiqa, args.base)
    with tempfile.TemporaryDirectory() as tmp:
        # 1. pyiqa's learner, random context, saved as pyiqa saves networks.
        with torch.no_grad():
            reference.prompt_learner.ctx.normal_(0.0, 0.5, generator=g)
        theirs = Path(tmp) / "pyiqa_prompts.pth"
        torch.save({"params": reference.state_dict()}, theirs)
        print("pyiqa prompt file keys:", sorted(reference.state_dict()))
        with torch.no_grad():
            expected = torch.cat([reference(x)[:, 0] for x in images])
        plain, fast = ours(args.base, theirs, images)
        print(f"1. pyiqa's file: scores {expected.numpy().round(6)}")
        print(f"   max |qualiclip - pyiqa|: forward {(plain - expected).abs().max():.2e}, "
              f"engine {(fast - expected).abs().max():.2e}")
        # 2. qualiclip's file, loaded by pyiqa as load_pretrained_network does.
        clip = build_clip(load_checkpoint(args.base)[0])
        tokens = tokenize(flatten_pairs(PROMPT_PAIRS), clip.context_length)
        learned = LearnedPrompts.initial(clip, tokens, 16, generator=g)
        with torch.no_grad():
            learned.ctx.normal_(0.0, 0.5, generator=g)
        built = max((learned.token_prefix - reference.prompt_learner.token_prefix).abs().max(),
                    (learned.token_suffix - reference.prompt_learner.token_suffix).abs().max())
        print(f"2. token_prefix/suffix as pyiqa's learner builds them: max |diff| {built:.2e}")
        mine = save_prompt_file(learned, Path(tmp) / "qualiclip_prompts.pth", PROMPT_PAIRS)
        reference.load_state_dict(torch.load(mine, weights_only=False)["params"], strict=True)
        with torch.no_grad():
            expected = torch.cat([reference(x)[:, 0] for x in images])
        plain, fast = ours(args.base, mine, images)
        print(f"   qualiclip's file in pyiqa: scores {expected.numpy().round(6)}")
        print(f"   max |qualiclip - pyiqa|: forward {(plain - expected).abs().max():.2e}, "
              f"engine {(fast - expected).abs().max():.2e}")


if __name__ == "__main__":
    main()
