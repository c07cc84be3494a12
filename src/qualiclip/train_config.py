"""Training configuration: frozen dataclasses, presets, TOML/dict overrides, checks, resume rules.

Every number of a run lives here, as configuration with documented defaults rather than
constants: the paper's margins, optimizer settings and schedule could not be read offline, so
every value in :data:`PRESETS` except the crop size 224, L = 5 and the RN50 start point is ours
(see ``docs/method.md``). An unknown key is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from qualiclip import degradations
from qualiclip.crops import MIN_SIDE, SCAN_MODES, SMALL_IMAGE_POLICIES
from qualiclip.losses import LossConfig
from qualiclip.precision import TRAIN_PRECISIONS, TrainPrecision
from qualiclip.pretrained import PRETRAINED, RANDOM_MODELS
from qualiclip.prompts import PROMPT_PAIRS
from qualiclip.train_choices import (
    BN_MODES,
    DEGRADE_IN,
    PROMPT_FEATURE_SOURCES,
    BatchNormMode,
    DegradeIn,
    PromptFeatures,
)

# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Start point and trainable parts.

    Attributes:
        init: a name from :data:`qualiclip.pretrained.PRETRAINED` (``"clip-rn50"``), a key of
            :data:`qualiclip.pretrained.RANDOM_MODELS`, or a checkpoint file (OpenAI-keyed or
            the authors' format).
        bn: ``"frozen"`` keeps batch-norm statistics fixed (eval mode) while the rest trains;
            ``"train"`` updates them (needed from random initialisation).
        prompt_pairs: the (positive, negative) prompts trained and stored with the model.
        prompt_features: where the prompt features come from: ``"text"`` (the start point's
            text tower encodes ``prompt_pairs``, as in the paper) or ``"orthogonal"`` (fixed,
            seeded, mutually orthogonal unit vectors, one per prompt; for a random start point,
            whose text tower gives features with no meaning and arbitrary angles between
            pairs, so that moving an image's feature toward every positive and away from every
            negative prompt is one consistent direction). With ``"orthogonal"`` the exported
            model holds no text tower.
        init_seed: seed of a random initialisation (and of orthogonal prompt features).
    """

    init: str = "clip-rn50"
    bn: BatchNormMode = "frozen"
    prompt_pairs: tuple[tuple[str, str], ...] = PROMPT_PAIRS
    prompt_features: PromptFeatures = "text"
    init_seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Pristine images, crops and degradations.

    Attributes:
        pristine: folder, ``.txt`` list, or image file of pristine images.
        val_dir: held-out pristine images; empty means every ``val_every_kth`` image of
            ``pristine`` is held out (sorted order).
        val_every_kth: hold-out period when ``val_dir`` is empty (0: no validation images).
        crop_size: side of the square crops (224 in the paper).
        min_overlap: IoU lower bound between the two crops of a pair.
        levels: degradation levels used (1 mildest .. 5 strongest), increasing.
        max_distortions: most distortion types in one composition (ARNIQA's 4).
        batch_size: pristine images per step and rank (each gives 2 x L crops).
        workers: DataLoader worker processes (decode and crop).
        degrade_in: where crops are degraded: ``"step"`` (the whole batch on the training
            device, from the run's degradation generator) or ``"loader"`` (each sample in the
            DataLoader workers, from a generator seeded by ``(seed, epoch, index)``: off the
            step's critical path, the same for any number of workers; other draws than
            ``"step"``'s, from the same distributions).
        small_images: ``"upscale"`` or ``"skip"`` images smaller than the crop.
        scan: how files are checked before step 0: ``"decode"`` (every file decoded once,
            finds truncated data) or ``"header"`` (fast, for very large sets); see
            :data:`qualiclip.crops.SCAN_MODES`.
        strict: refuse to start when any pristine or held-out file is unusable (the error
            lists them); otherwise such files are skipped, named in a warning and counted.
    """

    pristine: str = ""
    val_dir: str = ""
    val_every_kth: int = 10
    crop_size: int = 224
    min_overlap: float = 0.5
    levels: tuple[int, ...] = (1, 2, 3, 4, 5)
    max_distortions: int = 4
    batch_size: int = 16
    workers: int = 4
    degrade_in: DegradeIn = "step"
    small_images: str = "upscale"
    scan: str = "decode"
    strict: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and numerics.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW decay on weight matrices and convolutions (not on biases, norms,
            embeddings of size < 2 dims).
        betas: AdamW betas.
        eps: AdamW epsilon.
        grad_clip: maximum global gradient norm (0 disables clipping).
        precision: ``"auto"`` (bf16 autocast on CUDA when supported, else fp32), ``"fp32"``,
            or ``"bf16"`` (autocast on any device, CPU included).
    """

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: TrainPrecision = "auto"


@dataclass(frozen=True)
class ScheduleConfig:
    """Length and learning-rate schedule: linear warm-up, then cosine decay.

    Attributes:
        epochs: passes over the training images (used when ``max_steps`` is 0).
        max_steps: optimizer steps; overrides ``epochs`` when > 0.
        warmup_steps: linear warm-up from 0 to ``lr``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    epochs: int = 10
    max_steps: int = 0
    warmup_steps: int = 500
    min_lr_ratio: float = 0.01


@dataclass(frozen=True)
class LogConfig:
    """Outputs and their frequency.

    Attributes:
        out: output folder.
        log_every: steps between JSON-lines records in ``history.jsonl``.
        checkpoint_every: steps between checkpoints (0: only the final one).
        keep_checkpoints: how many recent checkpoints to keep (0 keeps all).
        progress: show a progress bar (rank 0).
    """

    out: str = "qualiclip-run"
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass(frozen=True)
class ValidationConfig:
    """Held-out checks.

    Attributes:
        every: steps between validations (0: only before and after training).
        crops_per_image: fixed crop pairs per held-out image.
        compositions_per_crop: fixed compositions per crop pair.
        batch_size: images per forward pass.
        seed: seed of the fixed crops and compositions.
        rated_csv: optional ``path,score`` CSV of human-rated images (SRCC/PLCC of scores).
        rated_limit: use at most this many rated images (0: all).
    """

    every: int = 500
    crops_per_image: int = 4
    compositions_per_crop: int = 2
    batch_size: int = 32
    seed: int = 1234
    rated_csv: str = ""
    rated_limit: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint as a plain dict."""

    seed: int = 0
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


#: ``paper``: the paper's setting as far as it is known (RN50 from OpenAI's weights, 224 px
#: crops, L = 5, seven prompt pairs); batch size, learning rate, schedule and margins are ours.
#: ``tiny``: a small CLIP-shaped ResNet from random initialisation, for CPU runs and tests
#: (64 px crops, 1500 steps). ``open``: qualiclip-open, trained from random weights on
#: openly licensed photos (``scripts/pristine_photos.py``) on CPUs: a CLIP-shaped ResNet of
#: width 32 (``random-small``), 128 px crops, the text tower's prompt features.
PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(),
    "tiny": TrainConfig(
        model=ModelConfig(init="random-tiny", bn="train"),
        data=DataConfig(val_every_kth=5, crop_size=64, batch_size=8, workers=1),
        optim=OptimConfig(lr=2e-3, weight_decay=0.01, precision="fp32"),
        schedule=ScheduleConfig(max_steps=1500, warmup_steps=30),
        log=LogConfig(log_every=10, checkpoint_every=200),
        validation=ValidationConfig(every=100, batch_size=64),
    ),
    "open": TrainConfig(
        model=ModelConfig(init="random-small", bn="train"),
        data=DataConfig(
            pristine="data/pristine-open", val_every_kth=5, crop_size=128, batch_size=8,
            workers=2, degrade_in="loader",
        ),
        optim=OptimConfig(lr=2e-3, weight_decay=0.01, precision="fp32"),
        schedule=ScheduleConfig(max_steps=3000, warmup_steps=200),
        log=LogConfig(log_every=10, checkpoint_every=250, keep_checkpoints=0),
        validation=ValidationConfig(every=250, batch_size=32),
    ),
}


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check a TOML/JSON/CLI value against the type of the field's default."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        inner = default[0] if default else None
        return tuple(
            _coerce(v, inner, f"{where}[{n}]") if inner is not None else v
            for n, v in enumerate(value)
        )
    if not isinstance(value, type(default)) or isinstance(value, bool):
        raise TypeError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def _replace(obj: Any, updates: Mapping[str, Any], where: str) -> Any:
    if not isinstance(updates, Mapping):
        raise TypeError(f"{where or 'config'}: expected a table, got {updates!r}")
    valid = {f.name for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        name = f"{where}.{key}" if where else key
        if key not in valid:
            raise ValueError(
                f"unknown configuration key {name!r}; valid keys here: {', '.join(sorted(valid))}"
            )
        current = getattr(obj, key)
        if is_dataclass(current):
            changes[key] = _replace(current, value, name)
        else:
            changes[key] = _coerce(value, current, name)
    return dataclasses.replace(obj, **changes)


def config_from_dict(updates: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Apply nested ``updates`` (from TOML, JSON or a checkpoint) to ``base``.

    Raises:
        ValueError: an unknown key; the message names it and lists the valid keys.
        TypeError: a value of the wrong type.
    """
    return _replace(base or TrainConfig(), updates, "")


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Preset, then TOML file, then overrides (later wins).

    Args:
        path: a TOML file whose tables mirror :class:`TrainConfig` (``[optim] lr = 1e-5``);
            a top-level ``preset = "tiny"`` key picks the base when ``preset`` is None.
        preset: a key of :data:`PRESETS` (default ``"paper"``).
        overrides: nested dict applied last (the CLI flags).
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # tomllib is 3.11+; tomli is the same parser, a dependency on 3.10
        import tomli as tomllib

    table: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    name = preset or table.pop("preset", None) or "paper"
    table.pop("preset", None)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    cfg = config_from_dict(table, PRESETS[name])
    return config_from_dict(overrides or {}, cfg)


@dataclass(frozen=True)
class _Range:
    """Where a numeric setting may lie (the ends open or closed)."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def describe(self) -> str:
        if self.high == math.inf:
            return f"a finite number {'>' if self.low_open else '>='} {_number(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(value: float) -> str:
    """A bound as written: integers in full (2147483647, not 2.14748e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


_COUNT = 2**31 - 1  # counts and sizes: far beyond any run, and within every integer type used
_SEED = 2**32 - 1  # NumPy's seeds

#: The range of every numeric setting (for a list, of each entry), by dotted key. A setting
#: missing here is not checked: tests/test_train.py fails for any numeric setting without one.
NUMERIC_RANGES: dict[str, _Range] = {
    "seed": _Range(0, _SEED),
    "model.init_seed": _Range(0, _SEED),
    "data.val_every_kth": _Range(0, _COUNT),
    "data.crop_size": _Range(max(8, MIN_SIDE), _COUNT),
    "data.min_overlap": _Range(0.0, 1.0),
    "data.levels": _Range(1, degradations.NUM_LEVELS),
    "data.max_distortions": _Range(1, len(degradations.DISTORTION_GROUPS)),
    "data.batch_size": _Range(1, _COUNT),
    "data.workers": _Range(0, _COUNT),
    "optim.lr": _Range(0.0, low_open=True),
    "optim.weight_decay": _Range(0.0),
    "optim.betas": _Range(0.0, 1.0, high_open=True),
    "optim.eps": _Range(0.0, low_open=True),
    "optim.grad_clip": _Range(0.0),
    # Margins are gaps between cosines, which lie in [-1, 1].
    "loss.margin_cons": _Range(0.0, 2.0),
    "loss.margin_rank": _Range(0.0, 2.0),
    "loss.weight_cons": _Range(0.0),
    "loss.weight_pos": _Range(0.0),
    "loss.weight_neg": _Range(0.0),
    "schedule.epochs": _Range(0, _COUNT),
    "schedule.max_steps": _Range(0, _COUNT),
    "schedule.warmup_steps": _Range(0, _COUNT),
    "schedule.min_lr_ratio": _Range(0.0, 1.0),
    "log.log_every": _Range(1, _COUNT),
    "log.checkpoint_every": _Range(0, _COUNT),
    "log.keep_checkpoints": _Range(0, _COUNT),
    "validation.every": _Range(0, _COUNT),
    "validation.crops_per_image": _Range(1, _COUNT),
    "validation.compositions_per_crop": _Range(1, _COUNT),
    "validation.batch_size": _Range(1, _COUNT),
    "validation.seed": _Range(0, _SEED),
    "validation.rated_limit": _Range(0, _COUNT),
}


def _numeric_problems(cfg: TrainConfig) -> Iterator[str]:
    """Every numeric setting finite and in its :data:`NUMERIC_RANGES` range."""
    flat = _flat(asdict(cfg))
    for key, rule in NUMERIC_RANGES.items():
        value = flat[key]
        entries = value if isinstance(value, list) else [value]
        bad = [v for v in entries
               if not isinstance(v, int | float) or isinstance(v, bool) or not rule.holds(v)]
        if bad or not entries:
            which = "entries" if isinstance(value, list) else ""
            yield f"{key} {which + ' ' if which else ''}must be {rule.describe()}, got {value!r}"


def _prompt_problems(pairs: Any) -> Iterator[str]:
    if not pairs:
        yield "model.prompt_pairs is empty: give at least one (positive, negative) pair"
    for n, pair in enumerate(pairs, 1):
        if len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
            yield (f"model.prompt_pairs must hold (positive, negative) pairs of non-empty "
                   f"prompts; pair {n} is {list(pair)!r}")
            return


def _config_problems(cfg: TrainConfig) -> Iterator[str]:
    m, d, o, sc, v = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.validation
    yield from _numeric_problems(cfg)
    yield from _prompt_problems(m.prompt_pairs)
    if m.bn not in BN_MODES:
        yield f"model.bn must be one of {', '.join(BN_MODES)}, got {m.bn!r}"
    if m.prompt_features not in PROMPT_FEATURE_SOURCES:
        yield (f"model.prompt_features must be one of {', '.join(PROMPT_FEATURE_SOURCES)}, "
               f"got {m.prompt_features!r}")
    if m.init not in RANDOM_MODELS and not Path(m.init).is_file():
        if m.init not in PRETRAINED:
            valid = ", ".join([*PRETRAINED, *RANDOM_MODELS])
            yield f"model.init {m.init!r} is not a file nor one of {valid}"
    if not d.pristine:
        yield "data.pristine is empty: give a folder or list of pristine images (--pristine)"
    for key, where in (("data.pristine", d.pristine), ("data.val_dir", d.val_dir)):
        if where and not Path(where).exists():
            yield f"{key}: {where} does not exist"
    if v.rated_csv and not Path(v.rated_csv).is_file():
        yield f"validation.rated_csv: {v.rated_csv} is not a file"
    if d.val_every_kth == 1:
        yield f"data.val_every_kth must be 0 or >= 2, got {d.val_every_kth}"
    if list(d.levels) != sorted(set(d.levels)):
        yield f"data.levels must be increasing, got {list(d.levels)}"
    if len(o.betas) != 2:
        yield f"optim.betas must be two numbers, got {list(o.betas)}"
    if d.degrade_in not in DEGRADE_IN:
        yield f"data.degrade_in must be one of {', '.join(DEGRADE_IN)}, got {d.degrade_in!r}"
    if sc.max_steps == 0 and sc.epochs < 1:
        yield f"schedule.epochs must be >= 1 when schedule.max_steps is 0, got {sc.epochs}"
    if d.small_images not in SMALL_IMAGE_POLICIES:
        yield f"data.small_images must be one of {', '.join(SMALL_IMAGE_POLICIES)}"
    if d.scan not in SCAN_MODES:
        yield f"data.scan must be one of {', '.join(SCAN_MODES)}, got {d.scan!r}"
    if o.precision not in TRAIN_PRECISIONS:
        yield f"optim.precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {o.precision!r}"
    from qualiclip.model import resolve_device

    try:
        resolve_device(cfg.device)
    except (ValueError, RuntimeError) as exc:
        yield f"device: {exc}"


def check_config(cfg: TrainConfig) -> None:
    """Refuse a configuration that cannot run, before anything is loaded or written.

    Checks values (choices; every number finite and in its :data:`NUMERIC_RANGES` range;
    levels; prompt pairs), that the named folders and files exist and that the device is there;
    the images themselves are checked later, by the data scan.

    Raises:
        ValueError: every problem found, one per clause.
    """
    problems = list(_config_problems(cfg))
    if problems:
        raise ValueError("; ".join(problems))


#: Settings a resumed run may change: its length, how often it logs, checkpoints and
#: validates, and where and how it runs. Changing the length reshapes the rest of the cosine
#: decay; everything else (model, data, losses, optimizer, validation set, seed) must match, or
#: the resumed run would not continue the same experiment.
RESUME_MAY_CHANGE: frozenset[str] = frozenset(
    {
        "schedule.max_steps",
        "schedule.epochs",
        "log.out",
        "log.log_every",
        "log.checkpoint_every",
        "log.keep_checkpoints",
        "log.progress",
        "validation.every",
        "validation.batch_size",
        "device",
        "data.workers",
        "data.scan",
        "data.strict",
    }
)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.loads(json.dumps(v))  # tuples and lists compare equal
    return out


def check_resumable(saved: Mapping[str, Any], cfg: TrainConfig, source: str = "") -> None:
    """Refuse to continue a run whose configuration differs beyond :data:`RESUME_MAY_CHANGE`.

    Args:
        saved: the configuration stored in a checkpoint (keys it lacks take their defaults).
        cfg: the configuration of the run about to continue it.
        source: the checkpoint's name, for the message.

    Raises:
        ValueError: naming each differing key with its saved and new value.
    """
    old = _flat(asdict(config_from_dict(saved)))
    new = _flat(asdict(cfg))
    diff = [k for k in sorted(new) if old.get(k) != new[k] and k not in RESUME_MAY_CHANGE]
    if diff:
        changes = ", ".join(f"{k} ({old.get(k)!r} -> {new[k]!r})" for k in diff)
        where = f" {source}" if source else ""
        raise ValueError(
            f"cannot resume{where}: the configuration differs in {changes}; "
            "only the length, logging/checkpoint/validation intervals, device, workers and "
            "output folder may change"
        )
