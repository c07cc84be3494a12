"""Writing score results as a table, CSV, JSON or JSON lines (streamed where the format allows)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from typing import TextIO

from qualiclip.engine import ScoreResult

FORMATS: tuple[str, ...] = ("table", "csv", "json", "jsonl")
FIELDS: tuple[str, ...] = ("path", "score", "error", "width", "height", "model")


def result_row(result: ScoreResult, model_name: str) -> dict[str, object]:
    return {
        "path": result.path,
        "score": result.score,
        "error": result.error,
        "width": result.width,
        "height": result.height,
        "model": model_name,
    }


def write_results(
    results: Iterable[ScoreResult],
    fmt: str,
    output: str | None = None,
    *,
    model_name: str = "",
) -> int:
    """Write ``results`` in ``fmt`` to ``output`` (a path) or stdout; return how many failed.

    CSV and JSON lines are written row by row as results arrive, so a long run's output is usable
    while it goes on and nothing scored is lost if it is interrupted.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    stream: TextIO = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        return _write(results, fmt, stream, model_name)
    finally:
        if output:
            stream.close()


def _write(results: Iterable[ScoreResult], fmt: str, stream: TextIO, model_name: str) -> int:
    failed = 0
    rows: list[dict[str, object]] = []
    writer = csv.DictWriter(stream, fieldnames=FIELDS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    for result in results:
        failed += not result.ok
        row = result_row(result, model_name)
        if writer is not None:
            writer.writerow(row)
        elif fmt == "jsonl":
            stream.write(json.dumps(row) + "\n")
        else:
            rows.append(row)
        if fmt in ("csv", "jsonl"):
            stream.flush()
    if fmt == "json":
        json.dump(rows, stream, indent=2)
        stream.write("\n")
    elif fmt == "table":
        _write_table(rows, stream)
    return failed


def _write_table(rows: list[dict[str, object]], stream: TextIO) -> None:
    width = max([len("path")] + [len(str(r["path"])) for r in rows])
    stream.write(f"{'path'.ljust(width)}  {'score':>8}  error\n")
    for r in rows:
        score = f"{r['score']:.4f}" if isinstance(r["score"], float) else "-"
        stream.write(f"{str(r['path']).ljust(width)}  {score:>8}  {r['error'] or ''}\n")
