"""Training checkpoints and run folders: save and load, every RNG state, exact resume.

A checkpoint (``ckpt-NNNNNN.pt``) holds the configuration, model, optimizer, scheduler, every
random state (torch, NumPy, Python, the degradation generator; one set per rank) and the number
of samples each rank consumed, in types ``torch.load(weights_only=True)`` reads, so a run
continues exactly and a model can be rebuilt from the file alone.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qualiclip.clip import load_visual
from qualiclip.model import QualiCLIP
from qualiclip.train_config import config_from_dict
from qualiclip.weight_files import load_tensors

CHECKPOINT_FORMAT = "qualiclip-train-1"


def names(items: Sequence[str], limit: int = 10) -> str:
    """``a, b, c and 4 more``: a list of names for a one-line message."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a step may touch, in types ``torch.load(weights_only=True)`` reads."""
    # NumPy's global generator: our code draws from it nowhere, but user hooks and libraries may.
    key, arr, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": key,
            "state": torch.from_numpy(np.asarray(arr).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
        "degrade": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    ns = state["numpy"]
    legacy = (ns["key"], ns["state"].numpy().astype(np.uint32), ns["pos"], ns["has_gauss"])
    np.random.set_state((*legacy, ns["cached"]))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    generator.set_state(state["degrade"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint_paths(out: str | Path) -> list[Path]:
    """Checkpoints in ``out``, oldest first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(out).glob("ckpt-*.pt")
        if (m := re.fullmatch(r"ckpt-(\d+)\.pt", p.name))
    ]
    return [p for _, p in sorted(found)]


def _load(path: str | Path) -> Any:
    try:
        return load_tensors(path)
    except ValueError as exc:  # corrupt, or no checkpoint at all: say so for a training run
        raise ValueError(
            f"{path} is not a qualiclip training checkpoint ({CHECKPOINT_FORMAT}): {exc}"
        ) from exc


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``) and check its format.

    Raises:
        ValueError: the file is no qualiclip training checkpoint (corrupt, or another kind).
    """
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a qualiclip training checkpoint ({CHECKPOINT_FORMAT})")
    return ckpt


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> QualiCLIP:
    """Rebuild the scorer from a training checkpoint alone (``ckpt-*.pt``)."""
    ckpt = load_training_checkpoint(path)
    state = ckpt["model"]
    visual_sd = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.visual.")}
    cfg = config_from_dict(ckpt["config"])
    pairs = tuple((p, n) for p, n in cfg.model.prompt_pairs)
    model = QualiCLIP(
        load_visual(visual_sd), state["model.prompt_features"], prompt_pairs=pairs, name=str(path)
    )
    return model.to(device).eval()


#: Files the trainer writes in ``log.out`` (checkpoints are ``ckpt-NNNNNN.pt``).
RUN_FILES = ("config.json", "history.jsonl", "validation.json", "model.pth")


def existing_run_files(out: str | Path) -> list[Path]:
    """Files of a training run already in ``out`` (none for a new or unrelated folder)."""
    folder = Path(out)
    if not folder.is_dir():
        return []
    named = [folder / n for n in RUN_FILES if (folder / n).exists()]
    ckpts = checkpoint_paths(folder)
    temps = [
        p
        for p in folder.glob("*.tmp")
        if p.name[: -len(".tmp")] in RUN_FILES or re.fullmatch(r"ckpt-\d+\.pt\.tmp", p.name)
    ]
    return [*named, *ckpts, *sorted(temps)]


def clear_run(out: str | Path) -> list[Path]:
    """Delete the training-run files of ``out`` (and nothing else); returns what was deleted."""
    gone = existing_run_files(out)
    for path in gone:
        path.unlink()
    return gone


def check_out(
    out: str | Path, *, resume: str | Path | None = None, overwrite: bool = False
) -> None:
    """Refuse an output folder that would mix two runs.

    A folder holding a run's files (:func:`existing_run_files`) is accepted only to resume
    (:func:`fit` then also checks its ``config.json`` against the run) or to overwrite.

    Raises:
        ValueError: the folder holds another run, or both ``resume`` and ``overwrite``.
    """
    out = Path(out)
    if resume is not None and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if resume is None and not overwrite:
        held = existing_run_files(out)
        if held:
            raise ValueError(
                f"{out} holds another training run ({names([p.name for p in held], 4)}): "
                "continue it with --resume, or replace it with --overwrite"
            )


class RunWriter:
    """Rank 0's files: ``history.jsonl`` (appended) and ``validation.json`` (rewritten)."""

    def __init__(self, out: Path, active: bool, resumed_step: int) -> None:
        self.active = active
        self.history = out / "history.jsonl"
        self.validation_path = out / "validation.json"
        self.validation: list[dict[str, Any]] = []
        if not active:
            return
        if resumed_step and self.history.exists():  # drop what the resumed steps will redo
            keep = [
                ln
                for ln in self.history.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) <= resumed_step
            ]
            self.history.write_text("".join(ln + "\n" for ln in keep))
        elif self.history.exists():
            self.history.unlink()
        if resumed_step and self.validation_path.exists():
            old = json.loads(self.validation_path.read_text())
            self.validation = [r for r in old if r["step"] <= resumed_step]

    def log(self, record: dict[str, Any]) -> None:
        if self.active:
            with open(self.history, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def log_validation(self, record: dict[str, Any]) -> None:
        if self.active:
            self.validation.append(record)
            self.validation_path.write_text(json.dumps(self.validation, indent=1) + "\n")
            self.log({"event": "validation", **record})


def iter_history(out: str | Path) -> Iterator[dict[str, Any]]:
    """Records of ``history.jsonl`` in ``out``."""
    with open(Path(out) / "history.jsonl") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
