"""``qualiclip score --report``: one self-contained HTML page, checked as a file and in a browser.

The file: nothing in it is fetched from elsewhere, thumbnails are at most 256 px, a file name
cannot close the data's ``<script>``, it is written whole (temp file and rename). The page, in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium as in
``tests/test_web.py``; in CI their absence fails the test, elsewhere it is skipped): the grid is
sorted by score, worst first, and best first on request; the "worst N" and threshold filters
show what they say; the failed files are listed with their reasons; with maps, each thumbnail
has its map.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from qualiclip import cli
from qualiclip.engine import ScoreResult
from qualiclip.report import THUMB_SIDE, ReportInfo, write_report


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _photo(path: Path, seed: int, size: tuple[int, int] = (300, 200)) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (9 + seed) + c) * np.cos(yy / 7 - c) for c in range(3)], -1)
    Image.fromarray(np.clip(127 + 90 * base + rng.normal(0, 10, (h, w, 3)), 0, 255)
                    .astype(np.uint8)).save(path)
    return path


SCORES = {"a.png": 0.61, "b.png": 0.35, "c.png": 0.52, "d.png": 0.18, "e.png": 0.44}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of five photos of known scores (one with a tricky name) and two failures."""
    folder = tmp_path_factory.mktemp("photos")
    results = [ScoreResult(str(_photo(folder / name, i)), score, None, 300, 200)
               for i, (name, score) in enumerate(SCORES.items())]
    results.append(ScoreResult(str(folder / "broken.jpg"), None,
                               f"{folder / 'broken.jpg'}: truncated file"))
    results.append(ScoreResult(str(folder / "</script><b>x.jpg"), None, "not an image"))
    target = folder / "report.html"
    write_report(results, target, ReportInfo("my-model", "ab" * 32, "fp32"))
    return target


def test_report_is_one_self_contained_file(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing fetched
    assert "@import" not in text and "url(http" not in text
    assert text.count("</script>") == 2  # the data's and the script's: no name closes either
    data = json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)'
                                r"</script>", text, re.S).group(1))
    assert sorted(Path(r["p"]).name for r in data["rows"]) == sorted(SCORES)
    for row in data["rows"]:
        head, encoded = row["t"].split(",", 1)
        assert head == "data:image/webp;base64"
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as thumb:
            assert max(thumb.size) <= THUMB_SIDE and (thumb.width, thumb.height) == (
                row["tw"], row["th"])
    assert "my-model" in text and "ab" * 32 in text and "fp32" in text
    assert sorted(p.name for p in report.parent.iterdir() if p.name.startswith(".")) == []


def test_cli_writes_the_report_and_refuses_a_bad_target(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"p{i}.png", i, (96, 64))
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    target = tmp_path / "report.html"
    code = cli.main(["score", str(folder), "--model", "random-tiny", "--no-progress",
                     "--report", str(target), "--map", str(tmp_path / "maps")])
    assert code == 1  # one input failed; the report is written all the same
    err = capsys.readouterr().err
    assert f"report {target}" in err and "3 scored, 1 failed" in err
    text = target.read_text()
    assert "bad.png" in text and 'id="beside"' in text and '"m":"data:image/webp' in text
    for bad, message in ((tmp_path / "r.txt", "must end in .html"),
                         (tmp_path / "no" / "r.html", "no folder")):
        assert cli.main(["score", str(folder), "--report", str(bad)]) == 2
        assert message in capsys.readouterr().err


# --- in a browser ------------------------------------------------------------------------------


def _browser_paths() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError as exc:
        reason = f"selenium is not installed: {exc}"
    else:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        driver = shutil.which("chromedriver")
        if chromium and driver:
            return chromium, driver
        reason = ("Chromium and chromedriver are not installed (apt-get install -y chromium "
                  "chromium-driver)")
    if _in_ci():
        pytest.fail(f"CI installs the browser test's needs, but: {reason}", pytrace=False)
    pytest.skip(reason)
    raise AssertionError  # unreachable


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    chromium, chromedriver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qualiclip-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,1400"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _grid(driver: Any) -> list[tuple[str, float]]:
    return [(name, float(score)) for name, score in driver.execute_script(
        'return Array.from(document.querySelectorAll("#grid figure"), '
        "(f) => [f.dataset.name, f.dataset.score]);")]


def _set(driver: Any, element_id: str, value: str) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'));", element_id, value)


@pytest.mark.slow
def test_page_sorts_filters_and_lists_failures(driver: Any, report: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(report.as_uri())
    ascending = sorted(SCORES, key=SCORES.__getitem__)
    assert [n for n, _ in _grid(driver)] == ascending  # worst first
    shown = {n: s for n, s in _grid(driver)}
    assert shown == pytest.approx(SCORES)
    labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#grid .score")]
    assert labels == [f"{SCORES[n]:.4f}" for n in ascending]  # the score on each thumbnail
    first = driver.find_element(By.CSS_SELECTOR, "#grid img.photo")
    assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                 first) > 0

    driver.execute_script("const s = document.getElementById('sort'); s.value = 'desc';"
                          "s.dispatchEvent(new Event('input'));")
    assert [n for n, _ in _grid(driver)] == ascending[::-1]
    _set(driver, "worst", "2")
    assert [n for n, _ in _grid(driver)] == ascending[:2][::-1]  # the worst two, best first
    _set(driver, "worst", "")
    _set(driver, "below", "0.5")
    assert sorted(n for n, _ in _grid(driver)) == sorted(n for n, s in SCORES.items() if s <= 0.5)
    assert driver.find_element(By.ID, "shown").text == "showing 3 of 5"

    failed = driver.execute_script(
        'return Array.from(document.querySelectorAll("#failed tbody tr"), '
        "(tr) => Array.from(tr.cells, (td) => td.textContent));")
    folder = report.parent  # a folder "<" holding "script><b>x.jpg" makes such a path
    assert dict(failed) == {str(folder / "broken.jpg"): "truncated file",
                            str(folder / "</script><b>x.jpg"): "not an image"}
    assert driver.find_element(By.ID, "model-name").text == "my-model"
    assert driver.find_element(By.ID, "model-sha").text == "ab" * 32
