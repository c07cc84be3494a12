"""The web page as a user uses it: Chromium (headless) driven by Selenium, against a real
``qualiclip serve`` process on 127.0.0.1.

It picks two good images and a broken file, and checks that the page shows the scores the
JSON API returns for the same files, a quality map over each good image, the server's error
text for the broken one, the model's name and weights' checksum, and the server's limits; the
table sorts by score. A screenshot is saved as an artefact: ``$QUALICLIP_WEB_SCREENSHOT``, else
``tests/artifacts/web.png`` (git-ignored).

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (the 'dev'
extra): in CI (``CI=true``) their absence fails the test, elsewhere it is skipped with the
reason. ``$QUALICLIP_WEB_MODEL`` serves another checkpoint (a trained one, for a telling
screenshot); the default is the random tiny model with random batch-norm statistics.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import find_shared, free_port, perturb_batch_norms, running_server
from qualiclip.model import create_model

pytestmark = pytest.mark.slow  # among the heaviest: `scripts/test.sh --fast` leaves it out

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
WAIT_S = 180


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _missing(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"CI installs the browser test's needs, but: {reason}", pytrace=False)
    pytest.skip(reason)


def _browser() -> tuple[str, str]:
    """Paths of Chromium and its driver (Debian's packages), or skip/fail saying what is not
    there."""
    try:
        import httpx  # noqa: F401
        import selenium  # noqa: F401

        from qualiclip import serve

        serve.require_serve()
    except ImportError as exc:
        _missing(f"selenium, httpx or the 'serve' extra is not installed: {exc}")
    chromium = next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        _missing("Chromium and chromedriver are not installed "
                 "(apt-get install -y chromium chromium-driver)")
    assert chromium is not None and driver is not None
    return chromium, driver


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 13 + c) * np.cos(yy / 9 - c) for c in range(3)], axis=-1)
    return np.clip(127 + 90 * base + rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two photos (from the shared folder when there, else drawn) and a broken JPEG."""
    folder = tmp_path_factory.mktemp("upload")
    shared = find_shared()
    pristine = shared / "data" / "pristine" if shared is not None else None
    out = []
    for i, name in enumerate(("kodim03.png", "kodim23.png")):
        target = folder / name
        if pristine is not None and (pristine / name).is_file():
            shutil.copy(pristine / name, target)
        else:
            Image.fromarray(_photo(192, 256, seed=i)).save(target)
        out.append(target)
    jpeg = io.BytesIO()
    Image.fromarray(_photo(64, 64, seed=9)).save(jpeg, "JPEG")
    broken = folder / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG at all" + jpeg.getvalue()[40:80])
    out.append(broken)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``qualiclip serve`` on a free loopback port; its base URL."""
    _browser()

    model_path = os.environ.get("QUALICLIP_WEB_MODEL")
    if not model_path:
        model = perturb_batch_norms(create_model("random-tiny"), seed=2).eval()
        model_path = str(tmp_path_factory.mktemp("model") / "tiny.pth")
        torch.save(model.official_state_dict(), model_path)
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", model_path, "--device", "cpu", "--no-access-log", "--max-files", "16",
            "--max-bytes", "8000000", "--max-pixels", "4000000"]
    with running_server(args, free_port(), log, timeout=120) as url:
        yield url


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    chromium, chromedriver = _browser()
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


def _api_results(url: str, files: list[Path]) -> dict[str, dict[str, Any]]:
    """What ``POST /score`` answers for each file on its own, by file name."""
    import httpx

    rows = {}
    for path in files:
        r = httpx.post(f"{url}/score", files={"files": (path.name, path.read_bytes())},
                       timeout=120)
        (row,) = r.json()["results"]
        rows[path.name] = row
    return rows


def _rows(driver: Any) -> list[dict[str, Any]]:
    """The table as shown, read in one script (the page re-renders it as results arrive)."""
    rows: list[dict[str, Any]] = driver.execute_script("""
        return Array.from(document.querySelectorAll("#results tbody tr"), (tr) => ({
            name: tr.dataset.name, score: tr.dataset.score || null,
            cells: Array.from(tr.cells, (td) => td.textContent),
            error: tr.querySelector("td.error") !== null,
        }));
    """)
    return rows


def test_page_scores_maps_and_refuses_like_the_api(
    server: str, driver: Any, files: list[Path]
) -> None:
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = httpx.get(f"{server}/models", timeout=10).json()["models"][0]
    limits = httpx.get(f"{server}/limits", timeout=10).json()
    expected = _api_results(server, files)

    driver.get(server + "/")
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == model["name"])
    assert driver.find_element(By.ID, "model-sha").text == (model["weights_sha256"] or
                                                          "(not recorded)")
    wait.until(lambda d: "up to 16 files" in d.find_element(By.ID, "limits").text)
    limit_text = driver.find_element(By.ID, "limits").text
    assert f"{limits['max_pixels']:,} pixels" in limit_text and "7.6 MB" in limit_text

    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in files))
    done = ("scored", "refused", "failed")
    wait.until(lambda d: len(rows := _rows(d)) == 3
               and all(r["cells"][5].startswith(done) or r["error"] for r in rows))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#maps img.map")) == 2)
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && "
                                              "arguments[0].naturalWidth > 0", img)
                             for img in d.find_elements(By.CSS_SELECTOR, "#maps img.map")))

    rows = {r["name"]: r for r in _rows(driver)}
    assert set(rows) == {p.name for p in files}
    for name, api in expected.items():
        row = rows[name]
        if api["error"] is None:
            assert row["score"] is not None and not row["error"], row
            assert float(row["score"]) == pytest.approx(api["score"], abs=1e-5)
            assert float(row["cells"][2]) == pytest.approx(api["score"], abs=6e-5)
            assert row["cells"][3] == f"{api['width']}×{api['height']}"
        else:
            assert row["error"] and row["score"] is None, row
            assert row["cells"][5] == api["error"]
    assert sum(api["error"] is None for api in expected.values()) == 2
    figures = driver.find_elements(By.CSS_SELECTOR, "#maps figure")
    assert sorted(f.get_attribute("data-name") for f in figures) == sorted(
        name for name, api in expected.items() if api["error"] is None)
    for figure in figures:
        img = figure.find_element(By.TAG_NAME, "img")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].naturalWidth", img) > 0

    # Sorting by score: best first, the row without a score last; again: worst first.
    driver.find_element(By.CSS_SELECTOR, 'th[data-key="score"] button').click()
    order = [r["name"] for r in _rows(driver)]
    good = sorted((n for n, a in expected.items() if a["error"] is None),
                  key=lambda n: -expected[n]["score"])
    assert order == [*good, "broken.jpg"]
    driver.find_element(By.CSS_SELECTOR, 'th[data-key="score"] button').click()
    assert [r["name"] for r in _rows(driver)] == [*good[::-1], "broken.jpg"]

    target = Path(os.environ.get("QUALICLIP_WEB_SCREENSHOT") or ARTIFACTS / "web.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(800, int(height) + 40))
    assert driver.save_screenshot(str(target)), target
    with Image.open(target) as shot:
        assert shot.width > 0 and shot.height > 0
