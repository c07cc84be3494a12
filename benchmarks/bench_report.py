"""How heavy is ``qualiclip score --report``, and how fast does the page open?

Usage:
    python benchmarks/bench_report.py [--photos FOLDER] [--synthetic 10000] [--size 320x240]
        [--model random-micro] [--map] [--screenshot report.png] [--keep DIR]

Two reports are written with the command as a user runs it (``qualiclip score FOLDER --report
FILE``): one for ``--photos`` (default: ``../shared/data/pristine``, else the built-in set of
``builtin_photos.py``) and one for ``--synthetic`` generated PNGs of ``--size`` (smooth colour
fields with edges, each different). Each is then opened in headless Chromium (Debian's
``chromium`` and ``chromedriver``, driven by Selenium, as ``tests/test_web.py`` does) from a
``file://`` URL, three times with a fresh browser each time. Printed per report: images, file
size, bytes per thumbnail, the time ``qualiclip score`` took in all (scoring included), and,
from the page's Performance API, first paint and first contentful paint, the time the script had
built the grid (``performance.mark("qualiclip-grid")``) and the load event (median of three,
milliseconds since navigation start), and how many thumbnails were given their data at first
(the lazy loading: only those near the viewport).

``--model`` defaults to ``random-micro`` (the smallest model: the report, not the model, is
measured); a random model's batch-norm statistics are randomised (seed 2), as in the tests, so
that scores differ between images and the grid's order means something; a trained model
(``--model qualiclip-open``) is used as it is. ``--screenshot`` saves the
``--photos`` report as a PNG (full page height, 1280 px wide), and with ``--map`` a second one,
``NAME-maps.png``, with the maps beside the photos.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from builtin_photos import photo_paths
from qualiclip.model import create_model

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def model_file(name: str, folder: Path) -> Path | str:
    """What the CLI loads: a random model with random batch-norm statistics, else ``name``.

    A random model's statistics (zero mean, unit variance) give every image nearly the same
    score; randomised, the scores differ and the grid's order means something. A trained model
    is used as it is.
    """
    if not name.startswith("random-"):
        return name
    model = create_model(name)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    path = folder / f"{name}-bn2.pth"
    torch.save(model.official_state_dict(), path)
    return path


def synthetic(folder: Path, count: int, width: int, height: int) -> Path:
    """``count`` different PNGs: colour gradients, a disc, light noise."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    for i in range(count):
        f = rng.uniform(20, 90, 3)
        img = np.stack([127 + 100 * np.sin(xx / f[c] + i + c) * np.cos(yy / f[(c + 1) % 3])
                        for c in range(3)], axis=-1)
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, 60)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 4, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"s{i:05d}.png",
                                                                    compress_level=1)
    return folder


def write_report(inputs: Path, report: Path, model: Path | str, maps: Path | None) -> float:
    cmd = [sys.executable, "-m", "qualiclip.cli", "score", str(inputs), "--model", str(model),
           "--device", "cpu", "--no-progress", "-o", os.devnull, "--format", "csv",
           "--report", str(report)]
    if maps is not None:
        cmd += ["--map", str(maps)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode not in (0, 1) or not report.is_file():
        raise SystemExit(f"qualiclip score failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise SystemExit("needs Chromium and chromedriver: apt-get install chromium "
                         "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='qc-bench-')}",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def open_times(report: Path, repeats: int) -> dict[str, float]:
    """Median over ``repeats`` fresh browsers of the page's paint and load times (ms)."""
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        driver = browser()
        driver.set_page_load_timeout(600)
        try:
            driver.get(report.as_uri())  # returns after the load event
            got = driver.execute_script("""
                const t = {};
                for (const e of performance.getEntriesByType("paint")) t[e.name] = e.startTime;
                const g = performance.getEntriesByName("qualiclip-grid")[0];
                const n = performance.getEntriesByType("navigation")[0];
                t.grid = g ? g.startTime : NaN;
                t.load = n ? n.loadEventEnd : NaN;
                t.figures = document.querySelectorAll("#grid figure").length;
                t.loaded = Array.from(document.querySelectorAll("#grid img.photo"))
                    .filter((i) => i.getAttribute("src")).length;
                return t;
            """)
        finally:
            driver.quit()
        runs.append(got)
    return {k: statistics.median(float(r[k]) for r in runs) for k in runs[0]}


def screenshot(report: Path, target: Path) -> None:
    driver = browser()
    try:
        driver.get(report.as_uri())
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(8000, int(height) + 40))
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight);"
                              "window.scrollTo(0, 0)")
        time.sleep(1.0)  # lazy thumbnails that came into view get their data
        driver.save_screenshot(str(target))
        if driver.execute_script("return document.getElementById('beside') !== null"):
            driver.execute_script("document.getElementById('beside').click()")
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1280, min(8000, int(height) + 40))
            time.sleep(1.0)
            beside = target.with_name(f"{target.stem}-maps{target.suffix}")
            driver.save_screenshot(str(beside))
            print(f"screenshot with the maps beside the photos: {beside}")
    finally:
        driver.quit()


def report_line(name: str, report: Path, images: int, seconds: float,
                times: dict[str, float]) -> None:
    size = report.stat().st_size
    print(f"{name:>16}: {images:>6} images, {size / 1e6:7.2f} MB ({size / max(images, 1) / 1e3:.1f}"
          f" kB per image), written in {seconds:6.1f} s; first paint "
          f"{times.get('first-paint', float('nan')):7.0f} ms, first contentful paint "
          f"{times.get('first-contentful-paint', float('nan')):7.0f} ms, grid built "
          f"{times['grid']:7.0f} ms, load {times['load']:7.0f} ms; {times['figures']:.0f} "
          f"thumbnails in the grid, {times['loaded']:.0f} given their data at first", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", metavar="FOLDER", default=None)
    parser.add_argument("--synthetic", type=int, default=10_000,
                        help="generated images for the large report (0: none)")
    parser.add_argument("--size", default="320x240", help="WxH of the generated images")
    parser.add_argument("--model", default="random-micro")
    parser.add_argument("--map", action="store_true", help="reports with dense maps")
    parser.add_argument("--repeats", type=int, default=3, help="browser openings per report")
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="copy the reports here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights = model_file(args.model, tmp)
        photos, which = photo_paths(args.photos, tmp / "builtin")
        print(which)
        changed = " (batch-norm statistics randomised)" if weights != args.model else ""
        print(f"model {args.model}{changed}, maps "
              f"{'dense' if args.map else 'off'}; Chromium {browser_version()}", flush=True)
        sets = [("photos", photos[0].parent, len(photos))]
        if args.synthetic:
            started = time.perf_counter()
            folder = synthetic(tmp / "synthetic", args.synthetic, width, height)
            print(f"generated {args.synthetic} {width}x{height} PNGs in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            sets.append((f"synthetic {args.size}", folder, args.synthetic))
        for name, folder, count in sets:
            report = tmp / f"report-{count}.html"
            maps = tmp / f"maps-{count}" if args.map else None
            seconds = write_report(folder, report, weights, maps)
            report_line(name, report, count, seconds, open_times(report, args.repeats))
            if name == "photos" and args.screenshot is not None:
                screenshot(report, args.screenshot)
                print(f"screenshot: {args.screenshot}")
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(report, args.keep / report.name)


def browser_version() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    try:
        return subprocess.run([chromium, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
