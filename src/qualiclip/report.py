"""A scored folder as one self-contained HTML page: thumbnails sorted by score, to look at.

``qualiclip score photos/ --report report.html`` writes a single file that opens in any browser,
offline, and can be mailed or archived: every thumbnail is inlined as a WebP data URL (at most
:data:`THUMB_SIDE` px a side), the script and style sheet are inlined from the package's
``assets/report/``, and nothing is fetched from anywhere. The page holds

* the model's name, the precision and the weights' sha256, and how many files were scored or
  failed;
* a histogram of the scores (inline SVG, drawn here);
* a grid of thumbnails sorted by score (worst first, or best first, or by name), each with its
  score, filtered to the worst N and/or the scores at or below a threshold;
* with ``--map``, each thumbnail's quality map (over the photo in grey, :func:`maps.overlay`),
  shown on hover or beside the photo;
* the files that failed, with their reasons.

Thumbnails are made after scoring, in threads, by decoding each scored file again with the one
decoder (:func:`qualiclip.images.decode_rgb`: EXIF orientation, alpha, bit depth as for scoring)
and scaling it down. The rows are embedded as JSON and the grid is built by the page's script,
which gives an ``<img>`` its data only as it nears the viewport (``loading="lazy"`` and an
``IntersectionObserver``), so a report of 10,000 photos stays usable
(``benchmarks/bench_report.py`` measures size and time to first paint). The file is written to a
temporary name beside the target and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from qualiclip import images
from qualiclip.engine import ScoreResult
from qualiclip.maps import QualityMap, overlay, range_note, to_uint8
from qualiclip.output_files import InputFiles, open_output

#: Longest side of a thumbnail in pixels.
THUMB_SIDE = 256
#: WebP quality of thumbnails: at 256 px, artefacts stay below what the page shows.
THUMB_QUALITY = 70
#: Bins of the score histogram.
HISTOGRAM_BINS = 20


@dataclass(frozen=True)
class ReportInfo:
    """What the page says about the run.

    Attributes:
        model: the model's name (or checkpoint path).
        weights_sha256: its weights' checksum, or None for random weights.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        map_kind: ``dense`` or ``windows`` when maps were drawn, else None.
        title: the page's title.
    """

    model: str
    weights_sha256: str | None
    precision: str
    map_kind: str | None = None
    title: str = "qualiclip report"


@dataclass
class ReportRows:
    """Collects the rows (and maps) that stream past to the other outputs, for the report.

    ``rows.collect(results)`` yields every result unchanged and keeps it; ``rows.add_map`` is
    the ``on_map`` callback of :func:`qualiclip.maps.write_maps`.
    """

    results: list[ScoreResult] = field(default_factory=list)
    maps: dict[str, QualityMap] = field(default_factory=dict)

    def collect(self, results: Iterable[ScoreResult]) -> Iterator[ScoreResult]:
        for result in results:
            self.results.append(result)
            yield result

    def add_map(self, result: ScoreResult, qmap: QualityMap) -> None:
        self.maps[str(result.path)] = qmap


@dataclass(frozen=True)
class ReportStats:
    """What :func:`write_report` wrote: the file, its size, and how many rows of each kind."""

    path: Path
    size_bytes: int
    scored: int
    failed: int
    thumbnails: int


def write_report(
    results: Sequence[ScoreResult],
    path: str | os.PathLike[str],
    info: ReportInfo,
    *,
    maps: dict[str, QualityMap] | None = None,
    workers: int = 2,
    inputs: InputFiles | None = None,
) -> ReportStats:
    """Write the HTML report of ``results`` to ``path`` whole or not at all
    (:func:`qualiclip.output_files.open_output`: a temporary file renamed over the name, never
    through a link, never over one of ``inputs``).

    Args:
        results: one row per input, scored or failed (e.g. collected by :class:`ReportRows`).
        path: the ``.html`` file to write.
        info: the model, precision and checksum the page names.
        maps: quality maps by path (as ``str(result.path)``), drawn beside their thumbnails.
        workers: threads that decode files and encode thumbnails.
        inputs: files the report must never be.

    Returns:
        A :class:`ReportStats`.

    Raises:
        OutputError: the file could not be written (the message names it and the errno).
    """
    target = Path(path)
    maps = maps or {}
    scored = [r for r in results if r.ok and r.score is not None]
    failed = [r for r in results if not r.ok]
    thumbs = 0
    with open_output(target, "w", encoding="utf-8", errors="surrogateescape",
                     inputs=inputs) as out:
        out.write(_head(info, scored, failed))
        out.write('<script id="report-data" type="application/json">{"rows":[')
        rows = _thumbnail_rows(scored, maps, workers)
        for i, row in enumerate(rows):
            thumbs += row.get("t") is not None
            out.write(("," if i else "") + _json(row))
        out.write("]}</script>\n")
        out.write(f"<script>{_asset('report.js')}</script>\n</body>\n</html>\n")
    return ReportStats(target, target.stat().st_size, len(scored), len(failed), thumbs)


# --- thumbnails --------------------------------------------------------------------------------


def _thumbnail_rows(scored: Sequence[ScoreResult], maps: dict[str, QualityMap],
                    workers: int) -> Iterator[dict[str, object]]:
    """One JSON-ready row per scored result, in order; thumbnails made in ``workers`` threads,
    at most ``4 * workers`` ahead of the writer (memory stays bounded)."""
    def make(result: ScoreResult) -> dict[str, object]:
        return _row(result, maps.get(str(result.path)))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: list = []
        for result in scored:
            pending.append(pool.submit(make, result))
            if len(pending) >= 4 * max(1, workers):
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _row(result: ScoreResult, qmap: QualityMap | None) -> dict[str, object]:
    row: dict[str, object] = {"p": str(result.path), "s": round(float(result.score or 0.0), 6),
                              "w": result.width, "h": result.height}
    try:
        pixels = to_uint8(images.decode_rgb(result.path))
    except (images.ImageDecodeError, OSError, ValueError) as exc:  # changed since it was scored
        row["x"] = f"no thumbnail: {exc}"
        return row
    photo = Image.fromarray(pixels)
    photo.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    row["t"], row["tw"], row["th"] = _data_url(photo), photo.width, photo.height
    if qmap is not None and qmap.image_size == pixels.shape[:2]:
        drawn = overlay(pixels, qmap, max_side=THUMB_SIDE, legend=False)
        row["m"] = _data_url(drawn)
        row["n"] = range_note(qmap)
    return row


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=THUMB_QUALITY, method=4)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _json(value: object) -> str:
    """JSON safe inside a ``<script>`` element: ``<`` escaped, so no ``</script>`` can occur."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("<", "\\u003c")


# --- the page around the data ------------------------------------------------------------------


#: The page may load nothing from anywhere: images only from data URLs, its own inline code.
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'")


def _asset(name: str) -> str:
    return resources.files("qualiclip").joinpath("assets", "report", name).read_text("utf-8")


def _head(info: ReportInfo, scored: Sequence[ScoreResult], failed: Sequence[ScoreResult]) -> str:
    """Everything before the data: header, controls, histogram, failures (static HTML, so the
    page paints before the rows are parsed)."""
    esc = html.escape
    sha = info.weights_sha256 or "(none: random weights)"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    histogram = _histogram([float(r.score or 0.0) for r in scored])
    maps = (f'<label><input type="checkbox" id="beside"> maps beside the photos '
            f'({esc(info.map_kind or "")}; hover a photo to see its map)</label>'
            if info.map_kind else "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>{esc(info.title)}</title>
<style>{_asset("report.css")}</style>
</head>
<body>
<header>
<h1>{esc(info.title)}</h1>
<dl class="run">
<dt>model</dt><dd id="model-name">{esc(info.model)}</dd>
<dt>precision</dt><dd id="precision">{esc(info.precision)}</dd>
<dt>weights sha256</dt><dd id="model-sha"><code>{esc(sha)}</code></dd>
<dt>files</dt><dd id="counts">{len(scored)} scored, {len(failed)} failed</dd>
<dt>written</dt><dd>{when}</dd>
</dl>
</header>
<section id="histogram"><h2>Scores</h2>{histogram}</section>
<section id="controls">
<label>sort <select id="sort"><option value="asc">worst first</option>
<option value="desc">best first</option><option value="name">by name</option></select></label>
<label>worst <input type="number" id="worst" min="1" step="1" placeholder="all"></label>
<label>score at most <input type="number" id="below" min="0" max="1" step="0.01"
placeholder="any"></label>
{maps}
<span id="shown"></span>
</section>
<main id="grid" aria-label="thumbnails sorted by score"></main>
{_failures(failed)}
"""


def _histogram(scores: Sequence[float]) -> str:
    """An inline SVG bar chart of ``scores`` in :data:`HISTOGRAM_BINS` bins between their
    minimum and maximum (scores of one model often span a narrow part of [0, 1])."""
    if not scores:
        return '<p class="empty">no scores</p>'
    lo, hi = min(scores), max(scores)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.005, hi + 0.005
    counts, edges = np.histogram(np.asarray(scores), bins=HISTOGRAM_BINS, range=(lo, hi))
    width, height, pad = 600, 160, 20
    bar_w = (width - 2 * pad) / HISTOGRAM_BINS
    top = max(1, int(counts.max()))
    bars = []
    for i, count in enumerate(counts):
        h = (height - 2 * pad) * int(count) / top
        x, y = pad + i * bar_w, height - pad - h
        bars.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" '
                    f'height="{h:.1f}" data-lo="{edges[i]:.6f}" data-hi="{edges[i + 1]:.6f}">'
                    f"<title>{edges[i]:.3f}-{edges[i + 1]:.3f}: {int(count)}</title></rect>")
    ticks = (f'<text x="{pad}" y="{height - 4}">{lo:.3f}</text>'
             f'<text x="{width - pad}" y="{height - 4}" text-anchor="end">{hi:.3f}</text>'
             f'<text x="{pad}" y="{pad - 6}">{top} files</text>')
    mean = float(np.mean(scores))
    median = float(np.median(scores))
    return (f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="histogram of {len(scores)} scores">{"".join(bars)}{ticks}'
            f'</svg><p class="stats">{len(scores)} scores: mean {mean:.4f}, median '
            f"{median:.4f}, range {lo:.4f} - {hi:.4f}</p>")


def _failures(failed: Sequence[ScoreResult]) -> str:
    if not failed:
        return '<section id="failed"><h2>Failed</h2><p>none</p></section>'
    rows = "".join(
        f'<tr><td class="path">{html.escape(str(r.path))}</td>'
        f'<td class="reason">{html.escape(_reason(r))}</td></tr>'
        for r in failed
    )
    return (f'<section id="failed"><h2>Failed ({len(failed)})</h2><table>'
            f"<thead><tr><th>file</th><th>reason</th></tr></thead><tbody>{rows}</tbody>"
            "</table></section>")


def _reason(result: ScoreResult) -> str:
    """The error without the file's name in front (the table names the file)."""
    return (result.error or "").removeprefix(f"{result.path}: ")


def describe(stats: ReportStats) -> str:
    """One line for the terminal: where the report is and what it holds."""
    size = stats.size_bytes / 1e6
    return f"report {stats.path} ({size:.1f} MB): {stats.scored} scored, {stats.failed} failed"
