"""Training checkpoints and run folders: save and load, every RNG state, exact resume.

A checkpoint (``ckpt-NNNNNN.pt``) holds the configuration, model, optimizer, scheduler, every
random state (torch, NumPy, Python, the degradation generator; one set per rank) and the number
of samples each rank consumed, in types ``torch.load(weights_only=True)`` reads, so a run
continues exactly and a model can be rebuilt from the file alone.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qualiclip.clip import load_visual
from qualiclip.model import QualiCLIP
from qualiclip.output_files import append_line, open_output
from qualiclip.train_config import config_from_dict
from qualiclip.weight_files import load_tensors

CHECKPOINT_FORMAT = "qualiclip-train-1"

logger = logging.getLogger("qualiclip.train")


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
    """``torch.save`` to ``path`` whole or not at all, durably (a checkpoint a crash right
    after must still find).

    Raises:
        OutputError: the file could not be written (a full disk: "No space left on device",
            not torch's "unexpected pos"); no temporary file is left.
    """
    with open_output(path, durable=True) as stream:
        torch.save(obj, stream)


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
    temps = [p for p in folder.glob("*.tmp") if _is_run_temp(p.name)]
    return [*named, *ckpts, *sorted(temps)]


def _is_run_temp(name: str) -> bool:
    """A temporary file of a run's file, left by a killed process: ``.config.json.1a2b3c4d.tmp``
    (:mod:`qualiclip.output_files`), or ``ckpt-000010.pt.tmp`` from earlier versions."""
    found = re.fullmatch(r"\.(.+)\.[0-9a-f]{8}\.tmp", name) or re.fullmatch(r"(.+)\.tmp", name)
    if found is None:
        return False
    base = found.group(1)
    return base in RUN_FILES or re.fullmatch(r"ckpt-\d+\.pt", base) is not None


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


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None``, so ``json.dumps`` writes JSON.

    Python's ``json`` writes ``NaN`` and ``Infinity``, which no JSON parser outside Python
    reads; a metric that is not a number (an SRCC of constant scores, an infinite gradient
    norm) is logged as ``null``.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _dumps(value: Any, **options: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, **options)


class RunWriter:
    """Rank 0's files: ``history.jsonl`` (appended) and ``validation.json`` (rewritten).

    Every record is JSON (no ``NaN``: see :func:`json_safe`). Lines are appended whole
    (:func:`qualiclip.output_files.append_line`) and ``validation.json`` is replaced whole, so a
    crash leaves at worst a torn last line of the log, from a version that wrote otherwise: a
    resume drops it with a warning; any other broken line is an error naming the file and line.
    """

    def __init__(self, out: Path, active: bool, resumed_step: int) -> None:
        self.active = active
        self.history = out / "history.jsonl"
        self.validation_path = out / "validation.json"
        self.validation: list[dict[str, Any]] = []
        if not active:
            return
        if resumed_step and self.history.exists():  # drop what the resumed steps will redo
            records = read_history(self.history)
            keep = [r for r in records if r.get("step", 0) <= resumed_step]
            with open_output(self.history, "w", encoding="utf-8") as fh:
                fh.writelines(_dumps(r) + "\n" for r in keep)
            self.validation = self._resumed_validation(records, resumed_step)
        elif self.history.exists():
            self.history.unlink()

    def _resumed_validation(
        self, records: list[dict[str, Any]], resumed_step: int
    ) -> list[dict[str, Any]]:
        """The validations up to the resumed step: from ``validation.json``, or rebuilt from the
        log's validation events when that file is missing or unreadable."""
        try:
            old = json.loads(self.validation_path.read_text(encoding="utf-8"))
            if not isinstance(old, list):
                raise ValueError("not a list of records")
        except FileNotFoundError:
            old = None
        except (OSError, ValueError) as exc:
            logger.warning("%s is unreadable (%s); rebuilt from %s", self.validation_path, exc,
                           self.history.name)
            old = None
        if old is None:
            old = [{k: v for k, v in r.items() if k != "event"}
                   for r in records if r.get("event") == "validation"]
        return [r for r in old if isinstance(r, dict) and r.get("step", 0) <= resumed_step]

    def log(self, record: dict[str, Any]) -> None:
        if self.active:
            append_line(self.history, _dumps(record))

    def log_validation(self, record: dict[str, Any]) -> None:
        if self.active:
            self.validation.append(json_safe(record))
            with open_output(self.validation_path, "w", encoding="utf-8") as fh:
                fh.write(_dumps(self.validation, indent=1) + "\n")
            self.log({"event": "validation", **record})


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``history.jsonl``, tolerating a torn last line (dropped, with a warning).

    Raises:
        ValueError: another line is not a JSON record; the message names the file and line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if n == len(lines):  # a write cut short by a crash: nothing after it was written
                logger.warning("%s: dropped its torn last line %d (%s)", path, n, exc)
                break
            raise ValueError(f"{path} line {n} is not a JSON record ({exc}); fix or remove "
                             "that line to resume") from None
        records.append(record)
    return records


def iter_history(out: str | Path) -> Iterator[dict[str, Any]]:
    """Records of ``history.jsonl`` in ``out`` (see :func:`read_history`)."""
    yield from read_history(Path(out) / "history.jsonl")
