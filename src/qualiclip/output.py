"""Writing score results as a table, CSV, JSON or JSON lines (streamed where the format allows).

Encoding: output is UTF-8, to a file and to stdout alike, whatever the locale. A file name that is
not valid UTF-8 (Python holds its undecodable bytes as surrogate escapes) is written as its raw
bytes, so each row names exactly the file on disk and reading the output back with
``errors="surrogateescape"`` gives the path to open. JSON escapes such bytes as ``\\udcXX``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, TextIO

from qualiclip.engine import ScoreResult
from qualiclip.output_files import InputFiles, open_output

FORMATS: tuple[str, ...] = ("table", "csv", "json", "jsonl")
FIELDS: tuple[str, ...] = ("path", "score", "error", "width", "height", "model", "precision")


def format_from_name(path: str | None) -> str | None:
    """The format a file name asks for by its extension (``.csv``, ``.json``, ``.jsonl``,
    case-insensitively), or None: the caller's default (the table) then applies.

    Example:
        >>> format_from_name("scores.CSV"), format_from_name("scores.txt")
        ('csv', None)
    """
    if not path:
        return None
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    return suffix if suffix in ("csv", "json", "jsonl") else None


def result_row(result: ScoreResult, model_name: str, precision: str = "") -> dict[str, object]:
    """One output row: the result, and the model and precision that scored it."""
    return {
        "path": result.path,
        "score": result.score,
        "error": result.error,
        "width": result.width,
        "height": result.height,
        "model": model_name,
        "precision": precision,
    }


def write_results(
    results: Iterable[ScoreResult],
    fmt: str,
    output: str | None = None,
    *,
    model_name: str = "",
    inputs: InputFiles | None = None,
    precision: str = "",
) -> int:
    """Write ``results`` in ``fmt`` to ``output`` (a path) or stdout; return how many failed.

    CSV and JSON lines are written row by row as results arrive (to stdout, a pipe sees each row
    at once). A file is written by :func:`qualiclip.output_files.open_output`: beside it under a
    hidden temporary name, renamed to ``output`` when the run ends, so ``output`` is always a
    complete file. An interrupted run (Ctrl-C, SIGTERM) completes the file with the rows it has
    (the JSON array closed, the table aligned) and keeps it; a failed one (a full disk) leaves
    ``output`` as it was. Every row names the model and the precision (as resolved: never
    ``auto``) that scored it.

    Args:
        inputs: files ``output`` must never be (it is refused with ``SameFileError``).
        precision: the precision that scored ``results``, for each row.

    Raises:
        OutputError: the file could not be written (its message names the path and the errno).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if output:
        with open_output(output, "w", newline="", encoding="utf-8", errors=NAME_ERRORS,
                         inputs=inputs, keep_on_interrupt=True) as stream:
            return _write(results, fmt, stream, model_name, precision)
    with _utf8_stdout() as stream:
        return _write(results, fmt, stream, model_name, precision)


#: How names that are not valid UTF-8 are written: their raw bytes (see the module docstring).
NAME_ERRORS = "surrogateescape"


@contextlib.contextmanager
def _utf8_stdout() -> Iterator[TextIO]:
    """stdout as UTF-8 text that carries any file name, whatever the locale says."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (tests, IDE consoles): it takes any str
        yield sys.stdout
        return
    sys.stdout.flush()
    stream = io.TextIOWrapper(buffer, encoding="utf-8", errors=NAME_ERRORS, write_through=True)
    try:
        yield stream
    finally:
        stream.detach()  # leaves sys.stdout's buffer open


def _write(results: Iterable[ScoreResult], fmt: str, stream: IO[str], model_name: str,
           precision: str) -> int:
    failed = 0
    rows: list[dict[str, object]] = []
    # LF line ends (the csv module's default is CRLF), as every other output and tool here.
    writer = (csv.DictWriter(stream, fieldnames=FIELDS, lineterminator="\n")
              if fmt == "csv" else None)
    if writer is not None:
        writer.writeheader()
    try:
        for result in results:
            failed += not result.ok
            row = result_row(result, model_name, precision)
            if writer is not None:
                writer.writerow(row)
            elif fmt == "jsonl":
                stream.write(json.dumps(row) + "\n")
            else:
                rows.append(row)
            if fmt in ("csv", "jsonl"):
                stream.flush()
    except KeyboardInterrupt:
        _write_collected(rows, fmt, stream)  # an interrupted run keeps the rows it has
        raise
    _write_collected(rows, fmt, stream)
    return failed


def _write_collected(rows: list[dict[str, object]], fmt: str, stream: IO[str]) -> None:
    """The formats written at the end: JSON (one array) and the table (aligned columns)."""
    if fmt == "json":
        json.dump(rows, stream, indent=2)
        stream.write("\n")
    elif fmt == "table":
        _write_table(rows, stream)
    stream.flush()


def _write_table(rows: list[dict[str, object]], stream: IO[str]) -> None:
    width = max([len("path")] + [len(str(r["path"])) for r in rows])
    stream.write(f"{'path'.ljust(width)}  {'score':>8}  error\n")
    for r in rows:
        score = f"{r['score']:.4f}" if isinstance(r["score"], float) else "-"
        stream.write(f"{str(r['path']).ljust(width)}  {score:>8}  {r['error'] or ''}\n")
