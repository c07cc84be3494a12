"""Reading weight files: CLIP and QualiCLIP tensors in the formats they are distributed in.

(Training checkpoints, with optimiser and RNG state, are :mod:`qualiclip.checkpoints`'; they are
read through :func:`load_tensors` here, the one safe ``torch.load``.)

Formats (docs/method.md §2):

* the authors' QualiCLIP release: ``clip_model.<OpenAI key>`` tensors + ``prompts_features``;
* a plain OpenAI-keyed CLIP state dict, possibly under ``"state_dict"``/``"model"`` and with a
  DDP ``module.`` prefix (qualiclip's training export is the authors' format);
* OpenAI's TorchScript archive (``RN50.pt``), loaded only when trusted (checksum matched, or the
  user opts in), because loading TorchScript runs code from the file.

Everything else goes through ``torch.load(..., weights_only=True)``; a file that is no checkpoint
is a ``ValueError`` saying what it is. Which files are trusted is decided by
:func:`qualiclip.pretrained.resolve_weights`.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Integer metadata OpenAI's TorchScript archives store among the weights; not parameters.
_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a TorchScript archive, judged from its zip directory (nothing is run).

    ``torch.save`` zips hold ``<root>/data.pkl`` and tensors; TorchScript adds ``<root>/code/`` and
    ``<root>/constants.pkl``.
    """
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(
        n.endswith("/constants.pkl") or n.split("/")[1:2] == ["code"] for n in names if "/" in n
    )


#: First bytes of files that are often given by mistake where a checkpoint belongs.
_NOT_CHECKPOINTS: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip file"), (b"<", "a text/HTML file"),
    (b"{", "a JSON/text file"),
)


def load_tensors(path: str | os.PathLike[str]) -> object:
    """``torch.load`` with ``weights_only=True``; a file that is no checkpoint is a ValueError
    saying what it is instead (never advice to unpickle arbitrary objects)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save zip, or a legacy pickle
        what = next((w for magic, w in _NOT_CHECKPOINTS if head.startswith(magic)), None)
        raise ValueError(
            f"{path}: not a PyTorch checkpoint"
            + (f" (it is {what})" if what else " (neither a torch.save zip nor a pickle)")
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: the checkpoint holds Python objects besides tensors, which qualiclip does "
            "not unpickle (unpickling can run code); save a state dict of tensors instead"
        ) from exc
    except Exception as exc:  # RuntimeError("invalid load key"), EOFError, zip errors, ...
        raise ValueError(
            f"{path}: not a loadable PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def _unwrap(obj: object, path: Path) -> dict[str, Any]:
    """Find the state dict inside common training wrappers ({"state_dict": ...}, {"model": ...})."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None
        )
        if inner is None or any(isinstance(k, str) and "." in k for k in obj):
            break  # keys with dots are already parameter names: this is the state dict
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{path}: not a checkpoint: expected a dict of tensors, got {type(obj)}")
    return dict(obj)


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    keys = [k for k in state if k not in ("prompts_features", "prompt_features")]
    if keys and all(k.startswith(prefix) for k in keys):
        return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _prompt_features(state: dict[str, Any], path: Path) -> torch.Tensor | None:
    """Pop prompt features: the authors' ``prompts_features`` [2P, D] or our [P, 2, D] buffer."""
    feats = state.pop("prompts_features", None)
    ours = state.pop("prompt_features", None)
    if feats is None and ours is not None:
        if not (isinstance(ours, torch.Tensor) and ours.ndim == 3 and ours.shape[1] == 2):
            raise ValueError(f"{path}: prompt_features must be [P, 2, D], got {_shape(ours)}")
        feats = ours.reshape(-1, ours.shape[-1])  # (pos_1, neg_1, pos_2, ...) order
    if feats is None:
        return None
    if not (isinstance(feats, torch.Tensor) and feats.ndim == 2 and feats.shape[0] % 2 == 0):
        raise ValueError(
            f"{path}: prompts_features must be [2P, D] (positive, negative per pair), "
            f"got {_shape(feats)}"
        )
    return feats.detach().to(torch.float32).contiguous()


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _clean_state(
    raw: dict[str, Any], path: Path
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    state = _strip_prefix(raw, "module.")  # DistributedDataParallel
    state = _strip_prefix(state, "clip_model.")  # the authors' format
    state = _strip_prefix(state, "module.")  # a DDP-wrapped authors' model
    state = _strip_prefix(state, "model.")  # qualiclip training checkpoints: {"model": {"model.*"}}
    features = _prompt_features(state, path)
    for key in _METADATA_KEYS:
        state.pop(key, None)
    # QualiCLIP.state_dict() carries the normalisation buffers beside the tower: CLIP's values,
    # which the table already holds.
    for key in ("mean", "std"):
        if isinstance(state.get(key), torch.Tensor) and state[key].numel() == 3:
            state.pop(key)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a CLIP state dict: non-tensor entries {bad[:5]}")
    if not any(k.startswith("visual.") for k in state):
        sample = ", ".join(list(state)[:5]) or "none"
        raise ValueError(
            f"{path}: not a CLIP checkpoint: no 'visual.*' image-tower keys (first keys: {sample})"
        )
    out = {
        k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach())
        for k, v in state.items()
    }
    _refuse_non_finite({**out, **({"prompts_features": features} if features is not None
                                  else {})}, path)
    return out, features


def _refuse_non_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or infinity: they would score every image ``nan``.

    Checked once, when the file is read (fractions of a second for RN50), so a broken file is
    one clear refusal instead of an error on every image.
    """
    for key, value in tensors.items():
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                plural = "value" if bad == 1 else "values"
                raise ValueError(
                    f"{path}: {key} holds {bad} non-finite {plural} (NaN or infinity) of "
                    f"{value.numel()}; the weights are broken"
                )


def load_checkpoint(
    path: str | os.PathLike[str], *, trust_torchscript: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Read a CLIP or QualiCLIP checkpoint into OpenAI-keyed float32 tensors.

    Args:
        path: the authors' QualiCLIP file, an OpenAI-keyed state dict (optionally wrapped under
            ``"state_dict"``/``"model"`` and/or with DDP's ``module.`` prefix), or an OpenAI
            TorchScript archive.
        trust_torchscript: allow ``torch.jit.load`` on a TorchScript archive. Loading TorchScript
            runs code stored in the file, so it is off unless the file's checksum matched the
            table (the factory passes True then) or the user opts in for a file they trust.

    Returns:
        ``(state_dict, prompt_features)``: OpenAI-keyed tensors (floating ones as float32; the
        metadata keys ``input_resolution``, ``context_length``, ``vocab_size`` dropped), and the
        stored prompt features ``[2P, D]`` in (positive, negative) order, or None.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a checkpoint, not a CLIP checkpoint, or an untrusted TorchScript archive.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if is_torchscript_archive(path):
        if not trust_torchscript:
            raise ValueError(
                f"{path}: is a TorchScript archive; loading one runs code stored in the file, so "
                "it is refused by default. Use the named weights (their checksum is verified), "
                "or pass trust_torchscript=True (CLI: --trust-torchscript) for a file you trust."
            )
        try:
            with warnings.catch_warnings():
                # torch 2.9+ deprecates TorchScript; OpenAI's released weights are stored so.
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*jit")
                archive = torch.jit.load(str(path), map_location="cpu")
            raw: dict[str, Any] = dict(archive.state_dict())
        except Exception as exc:
            raise ValueError(f"{path}: cannot load the TorchScript archive: {exc}") from exc
    else:
        raw = _unwrap(load_tensors(path), path)
    return _clean_state(raw, path)
