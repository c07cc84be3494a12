"""Package a trained model as qualiclip's shipped weights (``qualiclip/assets/qualiclip-open.pth``).

Takes a run's ``model.pth`` (or one of its ``ckpt-*.pt``, to ship a model from the middle of a
run) and writes what scoring needs, in the authors' format: the image tower
(``clip_model.visual.*``), the stored prompt features (``prompts_features``) and
``clip_model.logit_scale`` (for ``--formula pyiqa``). The text tower is left out: its only use
was to compute the prompt features, which are stored. Floating tensors are stored as float16
(``--dtype``), halving the file; they load as float32. Prints the sha256 and size to put in
``qualiclip.pretrained.QUALICLIP_OPEN_FILE``.

Usage::

    python scripts/package_model.py runs/qualiclip-open/model.pth
    python scripts/package_model.py runs/qualiclip-open/ckpt-003000.pt --out /tmp/open.pth
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "qualiclip" / "assets" / "qualiclip-open.pth"


def scoring_state(source: Path) -> dict[str, torch.Tensor]:
    """The tensors a scorer needs, from a training run's ``model.pth`` or ``ckpt-*.pt``."""
    from qualiclip.checkpoints import load_training_checkpoint, model_from_checkpoint
    from qualiclip.pretrained import resolve_weights
    from qualiclip.train_config import config_from_dict

    if source.name.startswith("ckpt-"):
        state = model_from_checkpoint(source).official_state_dict()
        # Training leaves the logit scale as the start point had it; checkpoints do not hold it.
        init = config_from_dict(load_training_checkpoint(source)["config"]).model
        start = resolve_weights(init.init, seed=init.init_seed).state
        state["clip_model.logit_scale"] = start["logit_scale"]
        return state
    full = torch.load(source, map_location="cpu", weights_only=True)
    keep = {k: v for k, v in full.items() if k.startswith("clip_model.visual.")}
    keep["prompts_features"] = full["prompts_features"]
    if "clip_model.logit_scale" in full:
        keep["clip_model.logit_scale"] = full["clip_model.logit_scale"]
    return keep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a run's model.pth or ckpt-*.pt")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    args = p.parse_args(argv)
    if not args.source.is_file():
        print(f"package_model: error: {args.source} is not a file", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in scoring_state(args.source).items()
    }
    bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        print(f"package_model: error: non-finite values in {', '.join(bad)}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{args.out.name}.", dir=args.out.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"{args.out}\nsha256={digest}\nsize={args.out.stat().st_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
