"""The HTTP service as a user runs it: a real server process on loopback, spoken to over HTTP.

Scores must equal the local engine's; oversized, non-image and truncated uploads must get 413,
415 and 400, and whatever the decoder raises for one file is that file's error; non-ASCII file
names come back intact; slow clients are cut off at the request deadline, and one hanging up is
one INFO line; 200 requests from 8 concurrent clients must all succeed. In-process tests cover
the micro-batcher's lanes and turns, the pixel budgets and that no request writes a file.
Without the 'serve' extra the tests are skipped (with the reason) outside CI and fail in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port, perturb_batch_norms, running_server
from qualiclip import engine
from qualiclip.cli import main
from qualiclip.model import QualiCLIP, create_model

pytestmark = pytest.mark.slow  # among the heaviest: `scripts/test.sh --fast` leaves it out

ATOL = 1e-5
MAX_BYTES = 1_000_000
MAX_PIXELS = 200_000
REQUEST_TIMEOUT = 3.0


def _require_serve():
    from qualiclip import serve

    try:
        serve.require_serve()
        import httpx
    except ImportError as exc:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI installs the 'serve' and 'dev' extras, but: {exc}", pytrace=False)
        pytest.skip(f"the 'serve' extra (and httpx) is not installed: {exc}")
    return httpx


def _tiny_with_random_bn() -> QualiCLIP:
    """The random tiny model with random batch-norm statistics, so scores differ by image."""
    model = create_model("random-tiny")
    perturb_batch_norms(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(_tiny_with_random_bn().official_state_dict(), path)
    return path


def _image(h: int, w: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good images of three sizes (PNG and JPEG), written to files for the local engine."""
    folder = tmp_path_factory.mktemp("images")
    sizes = [(64, 96), (96, 64), (80, 80)]
    out = {}
    for i in range(9):
        fmt = "JPEG" if i % 2 else "PNG"
        name = f"img{i}.{fmt.lower()}"
        (folder / name).write_bytes(_image(*sizes[i % 3], seed=i, fmt=fmt))
        out[name] = folder / name
    return out


@pytest.fixture(scope="module")
def expected(checkpoint: Path, images: dict[str, Path]) -> dict[str, float]:
    model = create_model(str(checkpoint))
    results = engine.score_paths(model, list(images.values()), batch_size=4)
    return {Path(r.path).name: float(r.score) for r in results if r.score is not None}


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(checkpoint: Path, server_log: Path) -> Iterator[str]:
    """``qualiclip serve`` as a real process on loopback; its base URL."""
    _require_serve()
    args = ["--model", str(checkpoint), "--device", "cpu", "--max-bytes", str(MAX_BYTES),
            "--max-pixels", str(MAX_PIXELS), "--no-access-log",
            "--request-timeout", str(REQUEST_TIMEOUT)]
    with running_server(args, free_port(), server_log, timeout=600) as url:  # a busy machine
        yield url


def _post_raw(url: str, data: bytes, ctype: str = "image/png"):
    import httpx

    return httpx.post(f"{url}/score", content=data, headers={"Content-Type": ctype}, timeout=30)


def test_raw_body_scores_equal_local_engine(
    server: str, images: dict[str, Path], expected: dict[str, float]
) -> None:
    for name, path in images.items():
        ctype = "image/jpeg" if name.endswith(".jpeg") else "image/png"
        r = _post_raw(server, path.read_bytes(), ctype)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["precision"] == "fp32"
        (row,) = body["results"]
        assert row["error"] is None
        assert abs(row["score"] - expected[name]) <= ATOL, name
        with Image.open(path) as im:
            assert (row["width"], row["height"]) == im.size
    spread = max(expected.values()) - min(expected.values())
    assert spread > 100 * ATOL  # the comparison can tell images apart


def test_multipart_many_files_in_order(
    server: str, images: dict[str, Path], expected: dict[str, float]
) -> None:
    import httpx

    names = list(images)[:5]
    files = [("files", (n, images[n].read_bytes(), "application/octet-stream")) for n in names]
    files.insert(2, ("files", ("broken.png", images[names[0]].read_bytes()[:300], "image/png")))
    r = httpx.post(f"{server}/score", files=files, data={"note": "a plain field"}, timeout=30)
    assert r.status_code == 200, r.text  # some files scored: 200, the bad one has its error
    rows = r.json()["results"]
    assert [row["filename"] for row in rows] == [*names[:2], "broken.png", *names[2:]]
    assert rows[2]["score"] is None and "broken.png" in rows[2]["error"]
    for row in rows[:2] + rows[3:]:
        assert abs(row["score"] - expected[row["filename"]]) <= ATOL


def test_oversized_uploads_get_413(server: str) -> None:
    import httpx

    big = os.urandom(MAX_BYTES + 1)
    r = _post_raw(server, big)
    assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    r = httpx.post(f"{server}/score", content=chunks(), headers={"Content-Type": "image/png"},
                   timeout=30)
    assert r.status_code == 413, r.text
    many_pixels = _image(500, 500, seed=1)  # 250,000 pixels > MAX_PIXELS, yet a small file
    assert len(many_pixels) < MAX_BYTES
    r = _post_raw(server, many_pixels)
    detail = r.json()["detail"]
    assert r.status_code == 413 and "too large" in detail
    assert "--max-pixels" in detail and "500x500" in detail and "QUALICLIP_" not in detail


def test_non_images_get_415(server: str, images: dict[str, Path]) -> None:
    import httpx

    r = _post_raw(server, b"just some text, not an image", "image/jpeg")
    assert r.status_code == 415 and "not an image" in r.json()["results"][0]["error"]
    png = next(iter(images.values())).read_bytes()
    r = _post_raw(server, png, "text/plain")
    assert r.status_code == 415 and "content type" in r.json()["detail"]
    r = httpx.post(f"{server}/score", files=[("f", ("a.txt", b"hello", "text/plain"))],
                   timeout=30)
    assert r.status_code == 415, r.text


def test_every_decode_failure_has_its_status() -> None:
    from qualiclip import serve
    from qualiclip.images import DECODE_FAILURES

    assert {reason: serve.decode_status(reason) for reason in DECODE_FAILURES} == {
        "unreadable": 400, "not_an_image": 415, "malformed": 400, "too_large": 413,
        "out_of_memory": 413, "too_small": 400,
    }


def test_truncated_and_too_small_get_400(server: str, images: dict[str, Path]) -> None:
    jpeg = next(p for n, p in images.items() if n.endswith(".jpeg")).read_bytes()
    r = _post_raw(server, jpeg[: len(jpeg) // 2], "image/jpeg")
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    r = _post_raw(server, _image(20, 60, seed=3))
    assert r.status_code == 400 and "too small" in r.json()["detail"]
    r = _post_raw(server, b"")
    assert r.status_code == 400


# Headers that Pillow's plugins reject with ValueError (not their usual OSError).
BAD_IHDR = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00IHDR\x00\x00\x00\x00"
BAD_PPM = b"P6\n4x 48\n255\n"


def test_malformed_headers_are_one_files_error(
    server: str, images: dict[str, Path], expected: dict[str, float]
) -> None:
    import httpx

    good = list(images)[:2]
    files = [
        ("files", (good[0], images[good[0]].read_bytes(), "image/png")),
        ("files", ("ihdr.png", BAD_IHDR, "image/png")),
        ("files", ("header.ppm", BAD_PPM, "image/x-portable-pixmap")),
        ("files", (good[1], images[good[1]].read_bytes(), "image/jpeg")),
    ]
    r = httpx.post(f"{server}/score", files=files, timeout=30)
    assert r.status_code == 200, r.text  # as for any bad file among good ones
    rows = r.json()["results"]
    assert [row["filename"] for row in rows] == [good[0], "ihdr.png", "header.ppm", good[1]]
    for row in (rows[0], rows[3]):
        assert abs(row["score"] - expected[row["filename"]]) <= ATOL
    assert rows[1]["score"] is None and rows[1]["error"].startswith("ihdr.png: ")
    assert "IHDR" in rows[1]["error"]
    assert rows[2]["score"] is None and rows[2]["error"].startswith("header.ppm: ")
    for data in (BAD_IHDR, BAD_PPM):  # alone: the file's own status
        r = _post_raw(server, data, "application/octet-stream")
        assert r.status_code == 400, r.text
        assert r.json()["detail"] == r.json()["results"][0]["error"]


def _multipart(parts: list[tuple[bytes, bytes]], close: bool = True) -> tuple[bytes, str]:
    """A multipart/form-data body built by hand: ``(Content-Disposition value, data)`` parts."""
    boundary = "qualiclipBoundary7MA4YWxk"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Disposition: " + disposition
        + b"\r\nContent-Type: image/png\r\n\r\n" + data + b"\r\n"
        for disposition, data in parts
    )
    if close:
        body += b"--" + boundary.encode() + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary}"


def test_non_ascii_filenames_come_back_intact(server: str, images: dict[str, Path]) -> None:
    png = images["img0.png"].read_bytes()
    parts = [
        ('form-data; name="files"; filename="日本.png"'.encode(), png),  # RFC 7578: raw UTF-8
        ('form-data; name="files"; filename="café.jpg"'.encode(), png),
        # RFC 5987: the extended form wins over the ASCII fallback
        (b"form-data; name=\"files\"; filename=\"euro.jpg\"; filename*=UTF-8''%E2%82%ACuro.jpg",
         png),
        (b"form-data; name=\"files\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC%20b.png", png),
    ]
    body, ctype = _multipart(parts)
    r = _post_raw(server, body, ctype)
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [row["filename"] for row in rows] == ["日本.png", "café.jpg", "€uro.jpg", "日本 b.png"]
    assert all(row["score"] is not None for row in rows)


def test_multipart_without_closing_boundary_says_so(
    server: str, images: dict[str, Path]
) -> None:
    png = images["img0.png"].read_bytes()
    body, ctype = _multipart([(b'form-data; name="files"; filename="a.png"', png)], close=False)
    r = _post_raw(server, body, ctype)
    assert r.status_code == 400
    assert "closing boundary" in r.json()["detail"]
    body, ctype = _multipart([(b'form-data; name="files"; filename="a.png"', png)])
    assert _post_raw(server, body, ctype).status_code == 200  # the same body, closed


def _wait_closed(sock: socket.socket, limit: float, trickle: bytes | None = None) -> float:
    """Seconds until the server closes ``sock`` (sending ``trickle`` every 0.5 s meanwhile), or
    ``inf`` when it is still open after ``limit`` seconds."""
    start = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - start < limit:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except OSError:  # reset by the server
            return time.monotonic() - start
        if trickle is not None:
            try:
                sock.sendall(trickle)
            except OSError:
                return time.monotonic() - start
    return float("inf")


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_slow_clients_are_disconnected(server: str, server_log: Path) -> None:
    # Headers trickled a line every half second: never complete, never idle.
    with _connect(server) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: localhost\r\n")
        waited = _wait_closed(sock, REQUEST_TIMEOUT + 10, trickle=b"X-Slow: 1\r\n")
    assert REQUEST_TIMEOUT - 0.5 <= waited <= REQUEST_TIMEOUT + 5, waited
    # A body that stops after a few bytes.
    with _connect(server) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" * 10)
        waited = _wait_closed(sock, REQUEST_TIMEOUT + 10)
    assert REQUEST_TIMEOUT - 0.5 <= waited <= REQUEST_TIMEOUT + 5, waited
    assert "request headers not received within" in server_log.read_text()


def test_client_hanging_up_mid_body_is_one_info_line(server: str, server_log: Path) -> None:
    with _connect(server) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" * 250)
        time.sleep(0.3)
    mine: list[str] = []
    deadline = time.monotonic() + 10
    while not mine and time.monotonic() < deadline:
        time.sleep(0.2)
        mine = [line for line in server_log.read_text().splitlines() if f":{port} " in line]
    assert len(mine) == 1 and mine[0].startswith("INFO:") and "disconnected" in mine[0], mine
    text = server_log.read_text()
    assert "Traceback" not in text and "ClientDisconnect" not in text and "ERROR" not in text


def test_models_healthz_and_openapi(server: str, checkpoint: Path) -> None:
    import httpx

    (info,) = httpx.get(f"{server}/models", timeout=10).json()["models"]
    assert info["name"] == checkpoint.name  # the file's name, never its path
    assert info["weights_sha256"] == create_model(str(checkpoint)).weights_sha256
    assert info["precision"] == "fp32"
    assert httpx.get(f"{server}/healthz", timeout=10).json()["status"] == "ok"
    schema = httpx.get(f"{server}/openapi.json", timeout=10).json()
    body = schema["paths"]["/score"]["post"]["requestBody"]["content"]
    assert {"image/*", "multipart/form-data"} <= set(body)
    assert httpx.get(f"{server}/docs", timeout=10).status_code == 200


def test_200_requests_from_8_concurrent_clients(
    server: str, images: dict[str, Path], expected: dict[str, float]
) -> None:
    import httpx

    payloads = [(n, p.read_bytes()) for n, p in images.items()]
    jobs = [payloads[i % len(payloads)] for i in range(200)]

    with httpx.Client(timeout=60) as client:

        def send(job: tuple[str, bytes]) -> tuple[str, int, float | None]:
            name, data = job
            r = client.post(f"{server}/score", content=data,
                            headers={"Content-Type": "application/octet-stream"})
            return name, r.status_code, r.json()["results"][0]["score"]

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(send, job) for job in jobs]
            outcomes = [f.result(timeout=120) for f in futures]
        seconds = time.perf_counter() - start
    assert [status for _, status, _ in outcomes] == [200] * 200
    for name, _, score in outcomes:
        assert score is not None and abs(score - expected[name]) <= ATOL
    health = httpx.get(f"{server}/healthz", timeout=10).json()
    print(f"\n200 requests, 8 clients: {seconds:.2f} s, {200 / seconds:.0f} requests/s; "
          f"{health['images']} images in {health['forwards']} forward passes "
          f"(largest batch {health['largest_batch']})")


# --- in process ----------------------------------------------------------------------------


def test_micro_batcher_groups_equal_sizes() -> None:
    _require_serve()
    from qualiclip.batcher import MicroBatcher
    from qualiclip.engine import score_tensors
    from qualiclip.images import to_batch

    model = _tiny_with_random_bn()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in [(64, 64), (64, 96), (64, 64), (64, 96), (64, 64), (64, 64)]]

    async def run(max_batch_pixels: int) -> tuple[list[float], object]:
        batcher = MicroBatcher(model, batch_size=8, max_wait_s=0.5, precision="fp32",
                               max_batch_pixels=max_batch_pixels)
        batcher.start()
        try:
            scores = await asyncio.gather(*(batcher.score(a) for a in arrays))
        finally:
            await batcher.close()
        return list(scores), batcher.stats

    scores, stats = asyncio.run(run(10**9))
    for a, s in zip(arrays, scores, strict=True):
        assert abs(s - float(score_tensors(model, to_batch(a))[0])) <= ATOL
    assert (stats.images, stats.forwards, stats.largest) == (6, 2, 4)  # type: ignore[attr-defined]
    # A pixel cap of two 64 x 64 images: 2 + 2 of those, the 64 x 96 ones one by one.
    capped, stats = asyncio.run(run(2 * 64 * 64))
    assert np.allclose(capped, scores, atol=ATOL, rtol=0)
    assert (stats.images, stats.forwards, stats.largest) == (6, 4, 2)  # type: ignore[attr-defined]


def test_round_robin_lanes_do_not_queue_behind_one_request() -> None:
    _require_serve()
    from qualiclip.batcher import MicroBatcher

    model = _tiny_with_random_bn()
    rng = np.random.default_rng(0)
    large = [rng.integers(0, 256, (384, 384, 3), dtype=np.uint8) for _ in range(5)]
    small = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    done: list[str] = []

    async def one(batcher: MicroBatcher, name: str, pixels: np.ndarray, owner: str) -> None:
        await batcher.score(pixels, owner)
        done.append(name)

    async def run() -> None:
        batcher = MicroBatcher(model, batch_size=8, max_wait_s=0.01, precision="fp32",
                               max_batch_pixels=2 * 64 * 64)
        assert batcher.is_large(384 * 384) and not batcher.is_large(64 * 64)
        batcher.start()
        try:
            jobs = [one(batcher, f"A{i}", large[i], "A") for i in range(4)]
            jobs += [one(batcher, "B0", large[4], "B"), one(batcher, "C0", small, "C")]
            await asyncio.gather(*jobs)
        finally:
            await batcher.close()

    asyncio.run(run())
    assert sorted(done) == ["A0", "A1", "A2", "A3", "B0", "C0"]
    # B's one image is taken in turn with A's (not after all of them); C's small one does not
    # wait for the large lane at all.
    assert done.index("B0") < done.index("A3") and done.index("C0") < done.index("A3"), done


def test_abandoned_work_stops_between_passes_and_leaves_the_lane() -> None:
    """Work whose requester is gone (its task cancelled) is dropped: a queued job never runs, a
    running one stops at its next pass, and the cancelled call returns only once the lane has let
    go of it. Other requests and the lane go on."""
    _require_serve()
    import threading

    from qualiclip.batcher import MicroBatcher

    model = _tiny_with_random_bn()
    small = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    passes: list[str] = []
    started = threading.Event()

    def many_passes(name: str):
        def work(check) -> str:
            for i in range(500):
                check()  # raises once the requester is gone
                passes.append(name)
                if i == 2:
                    started.set()
                time.sleep(0.01)
            return name
        return work

    async def run() -> tuple[int, float, str, object]:
        batcher = MicroBatcher(model, batch_size=8, max_wait_s=0.01, precision="fp32",
                               max_batch_pixels=2 * 64 * 64)
        batcher.start()
        try:
            running = asyncio.create_task(batcher.run(10**6, many_passes("A"), "A"))
            queued = asyncio.create_task(batcher.run(10**6, many_passes("B"), "B"))
            scored = asyncio.create_task(batcher.score(small, "C"))
            assert await asyncio.to_thread(started.wait, 120)
            running.cancel()
            queued.cancel()
            for task in (running, queued):
                with pytest.raises(asyncio.CancelledError):
                    await task
            stopped_at = len(passes)
            after = await batcher.run(10**6, lambda check: "D", "D")  # the large lane goes on
            return stopped_at, await scored, after, batcher.stats
        finally:
            await batcher.close()

    stopped_at, score, after, stats = asyncio.run(run())
    assert 3 <= stopped_at < 500 and len(passes) == stopped_at, (stopped_at, len(passes))
    assert "B" not in passes and after == "D" and 0.0 <= score <= 1.0
    assert stats.dropped == 2  # type: ignore[attr-defined]


def test_pixel_budget_waits_in_order_and_cancels_cleanly() -> None:
    from qualiclip.batcher import PixelBudget

    async def run() -> list[str]:
        budget, order = PixelBudget(10), []

        async def take(name: str, n: int, hold_s: float) -> None:
            async with budget.hold(n):
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(take("a6", 6, 0.05))
        await asyncio.sleep(0)
        blocked = asyncio.create_task(take("b6", 6, 0))  # waits for a6
        small = asyncio.create_task(take("c1", 1, 0))  # fits now, but must not jump the queue
        cancelled = asyncio.create_task(take("d9", 9, 0))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.gather(first, blocked, small)
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        assert budget.free == 10
        with pytest.raises(ValueError, match="never fit"):
            await take("e11", 11, 0)
        return order

    assert asyncio.run(run()) == ["a6", "b6", "c1"]


def _app_client(checkpoint: Path, config: object):
    _require_serve()
    from starlette.testclient import TestClient

    from qualiclip.serve import create_app

    app = create_app(create_model(str(checkpoint)), config)  # type: ignore[arg-type]
    return TestClient(app, base_url="http://localhost")  # a Host the service allows


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_pixel_budgets_bound_decoding(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from qualiclip import images as images_module
    from qualiclip.serve import ServeConfig

    real, lock = images_module.decode_rgb, threading.Lock()
    active, most = [0], [0]

    def slow_decode(*args: object, **kwargs: object) -> np.ndarray:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.5)  # long enough for every admitted decode to overlap, on a busy machine
            return real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(images_module, "decode_rgb", slow_decode)
    files = [("files", (f"{i}.png", _image(80, 80, seed=i), "image/png")) for i in range(4)]
    many = 4 * 6400  # a request's budget that takes all four
    configs = {  # the most images decoded at once
        # one image of max_pixels at a time: per request, then in each lane over the service
        "request": (ServeConfig(max_pixels=6400), 1),
        "batch lane": (ServeConfig(max_pixels=6400, max_request_pixels_in_flight=many,
                                   max_batch_pixels_in_flight=6400), 1),
        "large lane": (ServeConfig(max_pixels=6400, max_request_pixels_in_flight=many,
                                   max_batch_pixels=2 * 64 * 64, max_pixels_in_flight=6400), 1),
        # the default budgets: 80 x 80 images are batched, two passes' worth of them at once
        "neither": (ServeConfig(max_pixels=6400, max_request_pixels_in_flight=many), 4),
        # a lane's budget is the lane's: the large lane's does not bound batched images
        "other lane": (ServeConfig(max_pixels=6400, max_request_pixels_in_flight=many,
                                   max_pixels_in_flight=6400), 4),
    }
    for name, (config, expected) in configs.items():
        most[0] = 0
        with _app_client(checkpoint, config) as client:
            r = client.post("/score", files=files)
        assert r.status_code == 200 and all(row["score"] for row in r.json()["results"]), r.text
        assert most[0] == expected, (name, most[0])
    with pytest.raises(ValueError, match="at least max_pixels"):
        ServeConfig(max_pixels=6400, max_pixels_in_flight=6399)
    with pytest.raises(ValueError, match="largest image that is batched"):
        ServeConfig(max_pixels=6400, max_batch_pixels_in_flight=6399)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_any_decoder_exception_is_that_files_error(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import struct

    from qualiclip import images as images_module
    from qualiclip.serve import ServeConfig

    raised: dict[str, Exception] = {
        "value.png": ValueError("Truncated IHDR chunk"), "ni.dds": NotImplementedError("format"),
        "attr.tif": AttributeError("'NoneType' has no attribute 'x'"),
        "syntax.xbm": SyntaxError("not an XBM file"), "struct.sgi": struct.error("unpack"),
        "os.jpg": OSError("broken data stream"), "eof.gif": EOFError(),
        "index.im": IndexError("list index out of range"), "type.eps": TypeError("bad operand"),
        "zero.spi": ZeroDivisionError("division by zero"), "key.jp2": KeyError("tile"),
    }
    real = images_module.decode_rgb

    def failing_decode(source: object, **kwargs: object) -> np.ndarray:
        exc = raised.get(getattr(source, "name", ""))
        if exc is not None:
            raise exc
        return real(source, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(images_module, "decode_rgb", failing_decode)
    good = _image(64, 64, seed=5)
    names = ["good.png", *raised, "good2.png"]
    files = [("files", (n, good, "image/png")) for n in names]
    with _app_client(checkpoint, ServeConfig()) as client:
        r = client.post("/score", files=files)
        assert r.status_code == 200, r.text
        rows = r.json()["results"]
        assert [row["filename"] for row in rows] == names
        assert rows[0]["score"] is not None and rows[-1]["score"] is not None
        for row, (name, exc) in zip(rows[1:-1], raised.items(), strict=True):
            assert row["score"] is None and row["error"].startswith(f"{name}: "), row
            assert type(exc).__name__ in row["error"], row
        eof = rows[names.index("eof.gif")]["error"]
        assert "truncated" in eof
        for name in raised:  # alone: a 400, never a 500
            r = client.post("/score", files=[("files", (name, good, "image/png"))])
            assert r.status_code == 400, (name, r.text)


_WRITES: list[str] = []
_AUDITING = False


def _audit(event: str, args: tuple) -> None:
    """Record every file opened for writing (including unnamed O_TMPFILE temporary files)."""
    if not _AUDITING:
        return
    if event in ("tempfile.mkstemp", "tempfile.mkdtemp"):
        _WRITES.append(f"{event} {args}")
    elif event == "open":
        path, mode, flags = args
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (
            isinstance(flags, int) and flags & write_flags
        ):
            _WRITES.append(f"open {path!r} mode={mode} flags={flags}")


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_no_file_written_from_requests(checkpoint: Path) -> None:
    global _AUDITING
    _require_serve()
    from starlette.testclient import TestClient

    from qualiclip.serve import ServeConfig, create_app

    sys.addaudithook(_audit)  # hooks cannot be removed; it records only while _AUDITING
    rng = np.random.default_rng(0)
    noise = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (720, 720, 3), dtype=np.uint8)).save(noise, "PNG")
    big = noise.getvalue()
    assert len(big) > 1024 * 1024  # above Starlette's 1 MB spooling threshold
    app = create_app(create_model(str(checkpoint)), ServeConfig(max_bytes=8 * len(big)))
    with TestClient(app, base_url="http://localhost") as client:
        _WRITES.clear()
        _AUDITING = True
        try:
            files = [("files", (f"n{i}.png", big, "image/png")) for i in range(3)]
            r = client.post("/score", files=files)
            raw = client.post("/score", content=big, headers={"Content-Type": "image/png"})
        finally:
            _AUDITING = False
    assert r.status_code == 200 and raw.status_code == 200, r.text
    assert [row["width"] for row in r.json()["results"]] == [720] * 3
    assert _WRITES == []
    # The detector itself works: a spooled temporary file past its threshold is caught.
    _AUDITING = True
    try:
        with tempfile.SpooledTemporaryFile(max_size=10) as spool:
            spool.write(b"x" * 100)
    finally:
        _AUDITING = False
    assert _WRITES


def test_serve_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    _require_serve()
    base = ["serve", "--model", "random-tiny", "--max-pixels", "1000"]
    assert main([*base, "--max-pixels-in-flight", "999"]) == 2
    assert "at least max_pixels" in capsys.readouterr().err
    assert main([*base, "--max-request-pixels-in-flight", "10"]) == 2
    assert main([*base, "--request-timeout", "0"]) == 2
    assert "--request-timeout must be positive" in capsys.readouterr().err
    assert main([*base, "--send-timeout", "0"]) == 2
    assert "--send-timeout must be positive" in capsys.readouterr().err
    assert main([*base, "--max-response-bytes", "0"]) == 2
    assert "max_response_bytes" in capsys.readouterr().err


def test_without_the_extra_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from qualiclip import serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes 'import uvicorn' fail
    with pytest.raises(ImportError, match=r"pip install 'qualiclip\[serve\]'"):
        serve.require_serve()
    assert main(["serve", "--model", "random-tiny"]) == 2


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_docs_page_loads_its_assets_from_the_service(checkpoint: Path) -> None:
    """/docs works offline: every script, style sheet and icon it names is served by us."""
    import re

    from qualiclip.serve import ServeConfig

    with _app_client(checkpoint, ServeConfig()) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
        urls += re.findall(r"""url: ?['"]([^'"]+)['"]""", page.text)
        assert urls and any(u.endswith(".js") for u in urls), page.text
        for url in urls:
            assert not re.match(r"^(https?:)?//", url), f"/docs loads {url} from elsewhere"
            assert client.get(url).status_code == 200, url


# --- hostile clients: fairness, hang-ups, unread responses, Host ---------------------------------


@contextlib.contextmanager
def _threaded_server(model: object, config: object, **options: object) -> Iterator[str]:
    """The service as :func:`qualiclip.serve.run` builds it (``serve.server_config``), run by
    uvicorn in a thread of this process, so that a test can patch what the service calls and
    still speak to it over real sockets. Yields its URL; its log lines go to ``caplog``."""
    _require_serve()
    import threading

    import uvicorn

    from qualiclip import serve

    port = free_port()
    server = uvicorn.Server(serve.server_config(
        model, config, host="127.0.0.1", port=port, log_config=None, access_log=False,
        **options,
    ))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600  # a bound for a busy machine, not a timing
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the in-process server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _wait_for(condition: object, limit: float = 120.0) -> bool:
    """Poll ``condition()`` every 0.1 s until it is true (``True``) or ``limit`` s pass."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _log_lines(caplog: pytest.LogCaptureFixture, *needles: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if all(n in r.getMessage() for n in needles)]


def _raw_post(path: str, body: bytes, ctype: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _files_body(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    return _multipart([(f'form-data; name="files"; filename="{n}"'.encode(), d)
                       for n, d in files])


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
@pytest.mark.parametrize("endpoint", ["score", "map"])
def test_small_requests_do_not_wait_behind_large_ones(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    """Twelve clients each send one large image, and the large ones are held (their decoding for
    /score, their map for /map); a small request is answered meanwhile, at the pixel budgets and
    in the scoring lanes alike."""
    import threading

    from qualiclip import images as images_module
    from qualiclip import maps, serve
    from qualiclip.serve import ServeConfig

    batched = 96 * 96  # images of more pixels run in the large lane
    config = ServeConfig(max_pixels=160 * 160, max_batch_pixels=2 * batched)
    release, held, headers = threading.Event(), threading.Semaphore(0), []

    def hold_if_large(pixels: int) -> None:
        if pixels > batched:
            held.release()
            release.wait(300)

    if endpoint == "score":
        real_decode = images_module.decode_rgb

        def decode(*args: object, **kwargs: object) -> np.ndarray:
            pixels = real_decode(*args, **kwargs)  # type: ignore[arg-type]
            hold_if_large(pixels.shape[0] * pixels.shape[1])
            return pixels

        monkeypatch.setattr(images_module, "decode_rgb", decode)
    else:
        real_map = maps.quality_map

        def quality_map(model: object, image: np.ndarray, *args: object, **kw: object) -> object:
            hold_if_large(image.shape[0] * image.shape[1])
            return real_map(model, image, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(maps, "quality_map", quality_map)
    real_header = serve.header_pixels

    def counted_header(data: bytes) -> tuple[int, int] | None:
        headers.append(len(data))
        return real_header(data)

    monkeypatch.setattr(serve, "header_pixels", counted_header)
    big, small = _image(160, 160, seed=1), _image(64, 64, seed=2)
    with _app_client(checkpoint, config) as client, ThreadPoolExecutor(13) as pool:

        def post(data: bytes):
            return client.post(f"/{endpoint}", content=data, headers={"Content-Type": "image/png"})

        large = [pool.submit(post, big) for _ in range(12)]
        try:
            assert held.acquire(timeout=300), "no large image reached the point where it is held"
            assert _wait_for(lambda: len(headers) >= 12)
            time.sleep(1.0)  # the other large images are now waiting at a budget or in a lane
            answer = pool.submit(post, small)
            r = answer.result(timeout=120)  # before: waited for the large ones, which never end
            large_done = [f.done() for f in large]
        finally:
            release.set()
        assert r.status_code == 200 and r.json()["results"][0]["score"] is not None, r.text
        assert not any(large_done)  # answered while every large one was still held
        assert [f.result(timeout=600).status_code for f in large] == [200] * 12


@pytest.mark.parametrize("endpoint", ["score", "map"])
def test_work_for_a_client_that_hung_up_is_dropped(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    endpoint: str,
) -> None:
    """A client sends eight images and hangs up once the first is being decoded: the others are
    never decoded nor scored, and every budget is given back."""
    import threading

    import httpx

    from qualiclip import images as images_module
    from qualiclip.serve import ServeConfig

    caplog.set_level("INFO", logger="uvicorn.error")
    real_decode, started, decoded = images_module.decode_rgb, threading.Event(), []

    def slow_decode(*args: object, **kwargs: object) -> np.ndarray:
        started.set()
        time.sleep(0.5)
        decoded.append(1)
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(images_module, "decode_rgb", slow_decode)
    n = 8
    body, ctype = _files_body([(f"{i}.png", _image(80, 80, seed=i)) for i in range(n)])
    config = ServeConfig(max_pixels=80 * 80)  # a request decodes one image at a time
    with _threaded_server(create_model(str(checkpoint)), config) as url:
        with _connect(url) as sock:
            port = sock.getsockname()[1]
            sock.sendall(_raw_post(f"/{endpoint}", body, ctype))
            assert started.wait(120)
        assert _wait_for(lambda: _log_lines(caplog, f":{port} ", "disconnected")), \
            "no line says that the client hung up"
        (line,) = _log_lines(caplog, f":{port} ", "disconnected")
        assert "dropped" in line, line
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        assert health["dropped"] >= 1
        assert all(lane["pixels_held"] == 0 and lane["waiting"] == 0
                   for lane in health["lanes"].values()), health
        time.sleep(1.0)  # nothing more is decoded later either
    assert len(decoded) <= 2, f"{len(decoded)} of {n} images decoded for a client that left"


def test_a_response_the_client_never_reads_is_dropped(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fourteen noisy maps (about 6 MB of JSON) for a client that reads nothing: the connection is
    closed ``send_timeout`` seconds after the server's buffers filled, and the response freed."""
    from qualiclip.serve import ServeConfig

    caplog.set_level("INFO", logger="uvicorn.error")
    rng = np.random.default_rng(0)
    files = []
    for i in range(14):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (440, 440, 3), dtype=np.uint8)).save(buffer, "PNG")
        files.append((f"noise{i}.png", buffer.getvalue()))
    body, ctype = _files_body(files)
    config = ServeConfig(max_bytes=2 * len(body), max_pixels=440 * 440)
    model = create_model(str(checkpoint))
    with _threaded_server(model, config, send_timeout=2.0) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
            sock.connect((host, int(port)))
            mine = f":{sock.getsockname()[1]} "
            sock.sendall(_raw_post("/map", body, ctype))
            assert _wait_for(lambda: _log_lines(caplog, mine, "not read"), limit=300), \
                "the unread response was never given up"
            received = bytearray()
            sock.settimeout(10)
            with contextlib.suppress(OSError):
                while chunk := sock.recv(1 << 16):
                    received += chunk
    head, _, got = bytes(received).partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    assert length > 4_500_000  # more than the socket buffers take: the server had to wait
    assert len(got) < length  # cut off, not delivered late


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_map_response_stays_within_max_response_bytes(checkpoint: Path) -> None:
    from qualiclip.serve import ServeConfig

    rng = np.random.default_rng(1)
    files = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
        files.append(("files", (f"n{i}.png", buffer.getvalue(), "image/png")))
    bound = 400_000  # about two of these overlays
    with _app_client(checkpoint, ServeConfig(max_response_bytes=bound)) as client:
        r = client.post("/map", files=files)
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert all(row["score"] is not None and row["map"]["rows"] > 0 for row in rows)
    kept = [row for row in rows if row["overlay"] is not None]
    left = [row for row in rows if row["overlay"] is None]
    assert kept and left, [len(row["overlay"] or "") for row in rows]
    assert all("--max-response-bytes" in row["overlay_error"] for row in left)
    assert len(r.content) <= bound


def test_host_header_is_checked_and_the_page_is_locked_down(
    server: str, checkpoint: Path, images: dict[str, Path]
) -> None:
    import httpx

    port = server.rsplit(":", 1)[1]
    for host in ("rebind.example", f"rebind.example:{port}", "localhost.example"):
        r = httpx.get(f"{server}/models", headers={"Host": host}, timeout=10)
        assert r.status_code == 400 and "--allowed-host" in r.json()["detail"], (host, r.text)
    png = images["img0.png"].read_bytes()
    r = httpx.post(f"{server}/score", content=png, timeout=30,
                   headers={"Host": "rebind.example", "Content-Type": "image/png"})
    assert r.status_code == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert httpx.get(f"{server}/healthz", headers={"Host": host}, timeout=10).status_code \
            == 200, host
    page = httpx.get(f"{server}/", timeout=10)
    csp = page.headers["content-security-policy"]
    for directive in ("default-src 'self'", "img-src 'self' data:", "frame-ancestors 'none'"):
        assert directive in csp, csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{server}/limits", timeout=10).headers["x-content-type-options"] \
        == "nosniff"
    # No response names a path of the server's machine.
    texts = [httpx.get(f"{server}/{p}", timeout=10).text for p in ("models", "healthz")]
    for endpoint in ("score", "map"):
        texts.append(httpx.post(f"{server}/{endpoint}", content=png, timeout=60,
                                headers={"Content-Type": "image/png"}).text)
    for text in texts:  # each names the model, by its file's name
        assert str(checkpoint.parent) not in text and checkpoint.name in text, text[:300]
    assert str(checkpoint.parent) not in httpx.get(f"{server}/limits", timeout=10).text


def test_allowed_hosts_follow_the_address_listened_on() -> None:
    from qualiclip.serve import LOCAL_HOSTS, ServeConfig, allowed_hosts_for, host_allowed

    assert allowed_hosts_for("127.0.0.1", None) == LOCAL_HOSTS
    assert allowed_hosts_for("::1", None) == LOCAL_HOSTS
    assert allowed_hosts_for("localhost", None) == LOCAL_HOSTS
    assert allowed_hosts_for("0.0.0.0", None) == ("*",)  # reached by names we cannot know
    assert allowed_hosts_for("127.0.0.1", ["scores.example"]) == ("scores.example",)
    assert host_allowed("scores.example:8000", ("scores.example",))
    assert host_allowed("a.scores.example", ("*.scores.example",))
    assert not host_allowed("scores.example.evil", ("*.scores.example",))
    assert not host_allowed("", LOCAL_HOSTS)  # no Host header at all
    for odd in ("localhost:80@evil.example", "[::1", "[::1]x", "localhost:8000:1", "localhost."):
        assert not host_allowed(odd, LOCAL_HOSTS), odd
    assert host_allowed("anything", ("*",))
    for ok in ("scores.example", "*.example.org", "::1", "[::1]", "10.0.0.7", "*"):
        ServeConfig(allowed_hosts=(ok,))
    for wrong in ("localhost:8000", "http://scores.example", "a/b", "a b"):
        with pytest.raises(ValueError, match="not a host name"):
            ServeConfig(allowed_hosts=(wrong,))


def test_serve_passes_its_allowed_hosts_and_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_serve()
    from qualiclip import serve

    seen: dict[str, object] = {}
    monkeypatch.setattr(serve, "run", lambda model, config, **kw: seen.update(config=config, **kw))
    args = ["serve", "--model", "random-tiny", "--allowed-host", "a.example",
            "--allowed-host", "b.example", "--send-timeout", "7", "--max-response-bytes",
            "5000000"]
    assert main(args) == 0
    config = seen["config"]
    assert config.allowed_hosts == ("a.example", "b.example")  # type: ignore[attr-defined]
    assert config.max_response_bytes == 5_000_000  # type: ignore[attr-defined]
    assert seen["send_timeout"] == 7
