"""Batch scoring on a Ray cluster (Ray Data), resumable, with nothing lost on bad input.

The pipeline::

    paths (folders, globs, list files) -> ray.data.from_items
        -> map_batches(_ActorScorer)   # one model per actor; decode + same-size batches inside
        -> iter_batches on the driver   # each batch becomes one part file, written atomically

Each actor loads the model once and scores its batches with :func:`qualiclip.engine.score_paths`
(qualiclip's own image reader in threads, images of equal size in one forward pass), so a
distributed score equals the local one. A file that cannot be read becomes a row with its error;
nothing raised by one input stops the job.

Results are a folder of part files (``part-<run>-<n>.parquet`` or ``.csv``) with the columns of
:data:`COLUMNS`. Parts are written by the driver to a temporary name and renamed, so a run that is
interrupted keeps every finished part and never leaves half a file. Running again with the same
output folder first reads the paths already there and scores only the rest, adding new parts.
Results are small (about 100 bytes per image), so routing them through the driver costs little
and buys that atomicity.

Ray is an optional extra (``pip install 'qualiclip[ray]'``): importing this module does not need
it; calling :func:`score_to_folder` without it raises an ``ImportError`` that says so.

Example:
    >>> from qualiclip.ray_scoring import RayScoreConfig, score_to_folder
    >>> summary = score_to_folder(["photos/"], "results/", RayScoreConfig(model="qualiclip"))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RAY_INSTALL_HINT = "Ray Data scoring needs the 'ray' extra: pip install 'qualiclip[ray]'"

OutputFormat = Literal["parquet", "csv"]
OUTPUT_FORMATS: tuple[str, ...] = ("parquet", "csv")

#: Columns of every part file, in order.
COLUMNS: tuple[str, ...] = (
    "path", "score", "error", "width", "height", "model", "weights_sha256", "precision",
)


@dataclass(frozen=True)
class RayScoreConfig:
    """How to score on Ray.

    Args:
        model: weight name or checkpoint path (as for :func:`qualiclip.model.create_model`); a
            path must be readable on every node.
        device: device inside each actor; ``"auto"`` uses the actor's GPU when it has one.
        pooling, formula, prompts, cache_dir, trust_torchscript: as for ``create_model``
            (a prompt file, like a checkpoint, must be readable on every node).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA), ``"int8"`` (CPU) or ``"auto"``
            (each actor picks for its own device; the ``precision`` column says what it ran).
        batch_size: paths per actor call (Ray Data batch) and most images per forward pass.
        decode_threads: image-decoding threads inside each actor.
        concurrency: number of scoring actors (each holds one model).
        num_cpus_per_actor: CPUs reserved per actor (decoding and, on CPUs, the forward pass).
        num_gpus_per_actor: GPUs per actor; fractions share a GPU between actors.
        rows_per_part: results per part file (an interruption loses at most this many).
        output_format: ``"parquet"`` or ``"csv"``.
        progress: show Ray Data's progress display.
    """

    model: str = "qualiclip"
    device: str = "auto"
    pooling: str | None = None
    formula: str | None = None
    prompts: str | None = None
    cache_dir: str | None = None
    trust_torchscript: bool = False
    precision: str = "fp32"
    batch_size: int = 16
    decode_threads: int = 2
    concurrency: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    rows_per_part: int = 1000
    output_format: OutputFormat = "parquet"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "decode_threads", "concurrency", "rows_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_cpus_per_actor < 0 or self.num_gpus_per_actor < 0:
            raise ValueError("num_cpus_per_actor and num_gpus_per_actor must be >= 0")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(
                f"output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}"
            )
        from qualiclip.precision import PRECISION_CHOICES

        if self.precision not in PRECISION_CHOICES:
            raise ValueError(
                f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")


@dataclass(frozen=True)
class ScoreSummary:
    """What one :func:`score_to_folder` call did, and what the output holds for its inputs.

    Attributes:
        inputs: paths the inputs expanded to.
        already_done: of those, paths that had a row in the output before this run (skipped).
        scored: rows with a score written by this run.
        failed: rows with an error written by this run.
        failed_earlier: of the ``already_done`` paths, those whose row is an error.
    """

    inputs: int
    already_done: int
    scored: int
    failed: int
    failed_earlier: int = 0
    parts: tuple[Path, ...] = field(default_factory=tuple)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every input has a score in the output (none failed, in this run or before)."""
        return self.inputs > 0 and not self.failed and not self.failed_earlier

    def describe(self) -> str:
        """One line: ``N inputs: S scored, M failed, K already done (F of them failed)``."""
        earlier = f" ({self.failed_earlier} of them failed)" if self.failed_earlier else ""
        return (
            f"{self.inputs} inputs: {self.scored} scored, {self.failed} failed, "
            f"{self.already_done} already done{earlier}"
        )


def require_ray() -> Any:
    """Import and return the ``ray`` module, or raise an ``ImportError`` naming the extra."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(f"{RAY_INSTALL_HINT} ({exc})") from exc
    return ray


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False
) -> bool:
    """Connect to a Ray cluster, or start a local one; no-op when Ray is already initialised.

    Args:
        address: ``"auto"`` (a cluster started with ``ray start`` on this machine),
            ``"ray://host:10001"`` or ``"host:6379"``; ``None`` starts a local Ray (unless
            ``RAY_ADDRESS`` is set, which Ray itself honours).
        num_cpus: CPUs of a local Ray (default: all).
        verbose: keep Ray's own log output (start-up, workers) on the terminal.

    Returns:
        whether this call initialised Ray (the caller may then shut it down).
    """
    from qualiclip.stopping import keeping_handlers

    ray = require_ray()
    if ray.is_initialized():
        return False
    # Ray's start-up lines, its workers' log lines and Ray Data's plan messages flood a terminal
    # that only wants the summary; they are shown with verbose=True.
    quiet = {} if verbose else {"logging_level": logging.ERROR, "log_to_driver": False}
    # ray.init makes SIGTERM exit at once (status 15); the caller's rule (qualiclip.stopping:
    # finish the parts written, exit 143) stays in force.
    with keeping_handlers():
        if address:
            ray.init(address=address, **{"log_to_driver": True, **quiet})
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    return True


@contextlib.contextmanager
def _ray_logging(verbose: bool) -> Iterator[None]:
    """Ray's and Ray Data's Python loggers at ERROR for the call, unless ``verbose``."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    before = [lg.level for lg in loggers]
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, before, strict=True):
            lg.setLevel(level)


# --- results on disk ---------------------------------------------------------------------------


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()), ("score", pa.float64()), ("error", pa.string()),
            ("width", pa.int64()), ("height", pa.int64()), ("model", pa.string()),
            ("weights_sha256", pa.string()), ("precision", pa.string()),
        ]
    )


def part_files(output: str | Path, fmt: OutputFormat) -> list[Path]:
    """Finished part files of format ``fmt`` in ``output``, sorted by name."""
    folder = Path(output)
    return sorted(folder.glob(f"part-*.{fmt}")) if folder.is_dir() else []


def read_results(output: str | Path, fmt: OutputFormat = "parquet") -> Any:
    """All finished parts of ``output`` as one ``pyarrow.Table`` with :data:`COLUMNS`."""
    import pyarrow as pa

    tables = [_read_part(p, fmt, COLUMNS) for p in part_files(output, fmt)]
    return pa.concat_tables(tables) if tables else _schema().empty_table()


def _read_part(path: Path, fmt: OutputFormat, columns: Sequence[str]) -> Any:
    """The ``columns`` of one part file.

    Raises:
        ValueError: the file is not one of ours (other columns, not CSV or Parquet at all).
    """
    import pyarrow as pa

    schema = _schema()
    try:
        missing = [c for c in columns if c not in _OPTIONAL_COLUMNS and c not in
                   _part_column_names(path, fmt)]
        if missing:
            raise _not_ours(path, f"no column {', '.join(missing)}")
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=list(columns), schema=schema)
        import pyarrow.csv as pcsv

        convert = pcsv.ConvertOptions(
            column_types={name: schema.field(name).type for name in columns},
            include_columns=list(columns),
            strings_can_be_null=True,  # an empty error / checksum field is a null, as written
            include_missing_columns=True,  # parts written before a column existed: nulls
        )
        return pcsv.read_csv(path, convert_options=convert)
    except pa.ArrowException as exc:  # ArrowInvalid, ArrowKeyError (a missing column), ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _not_ours(path, detail) from None


def _not_ours(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"{path} is not a qualiclip part file ({detail}); move it, or write to another folder"
    )


#: Columns a part file may lack: parts written before the column existed read it as nulls.
_OPTIONAL_COLUMNS = frozenset({"precision"})


def _part_column_names(path: Path, fmt: OutputFormat) -> list[str]:
    """The column names a part file declares (its Parquet schema, or its CSV header)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return next(csv.reader(f), [])


def _write_part(table: Any, folder: Path, name: str, fmt: OutputFormat) -> Path:
    """Write ``table`` to ``folder/name`` whole or not at all
    (:func:`qualiclip.output_files.open_output`: a temporary name, then a rename)."""
    from qualiclip.output_files import open_output

    final = folder / name
    with open_output(final) as stream:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, stream)
        else:
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, stream)
    return final


def scored_paths(output: str | Path, config: RayScoreConfig) -> set[str]:
    """Paths that already have a row in ``output``.

    Raises:
        ValueError: ``output`` holds parts of the other format, or rows of another model (mixing
            two models' scores in one folder would make it meaningless).
    """
    return _existing_rows(output, config)[0]


def _identity(name: str, sha: str | None) -> str:
    """A model as the refusal names it: random weights have no checksum to show."""
    return f"{name} (sha256 {sha})" if sha else f"{name} (random weights)"


def _existing_rows(output: str | Path, config: RayScoreConfig) -> tuple[set[str], set[str]]:
    """``(paths with a row, paths whose row is an error)`` in ``output``, read in one pass; see
    :func:`scored_paths` for what is refused."""
    other = "csv" if config.output_format == "parquet" else "parquet"
    if part_files(output, other):  # type: ignore[arg-type]
        raise ValueError(
            f"{output} already holds {other} parts; use the same format or another folder"
        )
    from qualiclip.pretrained import weights_identity

    name, sha = weights_identity(config.model, config.prompts)
    done: set[str] = set()
    failed: set[str] = set()
    columns = ("path", "error", "model", "weights_sha256")
    for part in part_files(output, config.output_format):
        rows = _read_part(part, config.output_format, columns).to_pydict()
        for old_name, old_sha in set(zip(rows["model"], rows["weights_sha256"], strict=True)):
            same = old_sha == sha if (old_sha or sha) else old_name == name
            if not same:
                raise ValueError(
                    f"{part} holds scores of model {_identity(old_name, old_sha)}, not of "
                    f"{_identity(name, sha)}; write to another folder"
                )
        done.update(rows["path"])
        failed.update(p for p, e in zip(rows["path"], rows["error"], strict=True) if e)
    return done, failed


# --- the actor ---------------------------------------------------------------------------------


class _ActorScorer:
    """Ray Data callable class: loads the model once per actor, scores batches of paths."""

    def __init__(self, config: RayScoreConfig) -> None:
        from qualiclip.engine import resolve_precision
        from qualiclip.heap import reuse_freed_memory
        from qualiclip.model import create_model

        reuse_freed_memory()  # the actor's process scores and nothing else: keep freed maps
        self.config = config
        self.model = create_model(
            config.model,
            device=config.device,
            pooling=config.pooling,  # type: ignore[arg-type]
            formula=config.formula,  # type: ignore[arg-type]
            prompts=config.prompts,
            cache_dir=config.cache_dir,
            trust_torchscript=config.trust_torchscript,
        )
        # "auto" is resolved once, for this actor's device; every row names the result.
        self.precision = resolve_precision(self.model, config.precision)
        self.calls = 0

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from qualiclip.engine import score_paths

        paths = [os.fsdecode(p) for p in batch.column("fspath").to_pylist()]
        self.calls += 1
        cfg = self.config
        try:
            results = list(
                score_paths(
                    self.model, paths, batch_size=cfg.batch_size, workers=cfg.decode_threads,
                    precision=self.precision,  # type: ignore[arg-type]
                )
            )
            rows = [
                (display_path(r.path), r.score, display_path(r.error) if r.error else None,
                 r.width, r.height)
                for r in results
            ]
        except Exception as exc:  # noqa: BLE001 - a broken batch becomes error rows, not a dead job
            message = display_path(f"{type(exc).__name__}: {exc}")
            rows = [(display_path(p), None, message, None, None) for p in paths]
        n = len(paths)
        columns: list[list[Any]] = [[row[i] for row in rows] for i in range(5)]
        data = [*columns, [self.model.name] * n, [self.model.weights_sha256] * n,
                [self.precision] * n]
        return pa.Table.from_arrays(
            [pa.array(col, type=f.type) for col, f in zip(data, _schema(), strict=True)],
            schema=_schema(),
        )


#: The prefix of a line logged by Ray's C++ core (``[2026-01-01 12:00:00,000 E 123 123] x.cc:1:``).
_RAY_CORE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+:\d+: ")


def _without_core_line(line: bytes) -> bytes:
    """``line`` and its newline, or only the progress updates (``\\r``) before a core line."""
    *updates, last = line.split(b"\r")
    if _RAY_CORE_LINE.match(last):
        return b"".join(u + b"\r" for u in updates)
    return line + b"\n"


@contextlib.contextmanager
def quiet_ray_core(enabled: bool = True) -> Iterator[None]:
    """Keep the lines Ray's C++ core writes straight to the process's stderr off the terminal.

    Ray's core worker in this process logs to file descriptor 2 itself (for example a warning
    about its own actors' constructor arguments, once per actor), below Python's logging. While
    enabled, descriptor 2 goes through a pipe, and a thread passes on everything except lines
    with that core's prefix; progress bars (``\\r`` updates) pass at once.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def write(data: bytes) -> None:
        try:
            os.write(saved, data)
        except OSError:  # the terminal or pipe went away: keep draining, so no writer blocks
            pass

    def forward() -> None:
        pending = b""
        try:
            while chunk := os.read(read_end, 65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                out = b"".join(_without_core_line(ln) for ln in lines)
                if b"\r" in pending:  # a progress bar's update: no newline will come soon
                    cut = pending.rindex(b"\r") + 1
                    out, pending = out + pending[:cut], pending[cut:]
                if out:
                    write(out)
            if pending and not _RAY_CORE_LINE.match(pending):
                write(pending)
        finally:
            os.close(read_end)  # closed here, once the last byte is read, never under a read

    thread = threading.Thread(target=forward, name="qualiclip-ray-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to the end
        thread.join(timeout=5)
        if not thread.is_alive():  # else a process Ray started holds the pipe: leave both open
            os.close(saved)


def _bound_scorer(config: RayScoreConfig) -> type[_ActorScorer]:
    """The actor class with ``config`` bound: the class travels with the task, so Ray keeps no
    constructor arguments in its object store (which it warns about on every run)."""

    class _BoundScorer(_ActorScorer):
        def __init__(self) -> None:
            super().__init__(config)

    return _BoundScorer


# --- the job -----------------------------------------------------------------------------------


def display_path(path: str) -> str:
    """``path`` as valid UTF-8 text for the result columns.

    File names are bytes on POSIX; Python carries undecodable bytes as lone surrogates, which
    Arrow (and Parquet and CSV readers) refuse. Each such byte is written as ``\\xNN`` instead,
    so every name the OS can hold gets a row, and the same name always gets the same text.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Input paths as absolute strings (Ray workers run in other folders, or other machines).

    Folders, globs and ``.txt``/``.lst`` list files are expanded by
    :func:`qualiclip.inputs.list_image_paths`, as for local scoring.
    """
    from qualiclip.inputs import list_image_paths

    return [os.path.abspath(p) for p in list_image_paths(inputs, list_files=True)]


def score_to_folder(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | Path,
    config: RayScoreConfig | None = None,
    *,
    address: str | None = None,
    on_part: Callable[[Path, int], None] | None = None,
    verbose: bool = False,
) -> ScoreSummary:
    """Score images on Ray and write the results as part files in ``output``; resumable.

    Args:
        inputs: files, folders, globs, and ``.txt`` list files (one path per line).
        output: a folder (created if missing). Paths with a row there already are skipped.
        config: model, actor and output settings (default: :class:`RayScoreConfig`'s).
        address: Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``); ``None``
            reuses an initialised Ray or starts a local one.
        on_part: called with each part file written and the rows in it.
        verbose: show Ray's own log output (quiet by default: errors only).

    Returns:
        counts of this run (scored, failed) and of what ``output`` held before for the inputs
        (already done, and how many of those are error rows).

    Raises:
        ImportError: Ray is not installed (the message names ``qualiclip[ray]``).
        ValueError: ``output`` holds results of another model or format.
    """
    ray = require_ray()
    config = config or RayScoreConfig()
    start = time.perf_counter()
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output {folder} exists and is not a folder")
    paths = expand_inputs(inputs)
    done, failed_before = _existing_rows(folder, config)
    todo = [p for p in paths if display_path(p) not in done]
    n_done = len(paths) - len(todo)
    failed_earlier = sum(display_path(p) in failed_before for p in paths)
    if not todo:
        return ScoreSummary(len(paths), n_done, 0, 0, failed_earlier, (),
                            time.perf_counter() - start)
    folder.mkdir(parents=True, exist_ok=True)
    with _ray_logging(verbose):
        init_ray(address, verbose=verbose)
        # Filtered only once Ray runs: processes Ray starts must not inherit the pipe.
        with quiet_ray_core(not verbose):
            scored, failed, parts = _run_job(ray, todo, folder, config, on_part)
    return ScoreSummary(len(paths), n_done, scored, failed, failed_earlier, tuple(parts),
                        time.perf_counter() - start)


def _run_job(
    ray: Any, todo: list[str], folder: Path, config: RayScoreConfig,
    on_part: Callable[[Path, int], None] | None,
) -> tuple[int, int, list[Path]]:
    """Score ``todo`` on Ray, writing parts into ``folder``; ``(scored, failed, parts)``."""
    ray.data.DataContext.get_current().enable_progress_bars = config.progress
    blocks = max(1, min(len(todo) // config.batch_size, 4 * config.concurrency, 200))
    # The file system's bytes travel to the actors; the text column is for people and tables.
    items = [{"fspath": os.fsencode(p)} for p in todo]
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        _bound_scorer(config),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.num_cpus_per_actor,
        num_gpus=config.num_gpus_per_actor,
    )
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    parts: list[Path] = []
    scored = failed = 0
    for table in dataset.iter_batches(batch_size=config.rows_per_part, batch_format="pyarrow"):
        if table.num_rows == 0:
            continue
        name = f"part-{run}-{len(parts):05d}.{config.output_format}"
        part = _write_part(table, folder, name, config.output_format)
        parts.append(part)
        errors = table.num_rows - table.column("error").null_count
        scored, failed = scored + table.num_rows - errors, failed + errors
        if on_part is not None:
            on_part(part, table.num_rows)
    return scored, failed, parts
