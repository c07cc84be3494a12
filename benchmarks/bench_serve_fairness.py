"""Fairness and memory of ``qualiclip serve``: small requests while one maximal request runs.

Usage:
    python benchmarks/bench_serve_fairness.py [--model random-tiny] [--big-images 8]
        [--big-size 6000x4000] [--small-size 224x224] [--small-every 0.5] [--max-small 400]
        [--timeout 300] [-- SERVER OPTIONS...]

Starts ``qualiclip serve`` as its own process on 127.0.0.1 (a free port, loopback only), with
the default limits (``--max-pixels`` 24e6 and ``--max-bytes`` 32 MiB admit eight 24-megapixel
PNGs, which compress to a few tens of KB each). Then:

1. times a few small requests on the idle server (their own work);
2. sends one maximal request: a multipart body of ``--big-images`` PNGs of ``--big-size``;
3. meanwhile sends one small request every ``--small-every`` seconds (one at a time, at most
   ``--max-small``) until the maximal request is answered.

Printed: the maximal request's status and duration, the small requests' latency while it ran
(median, 90th percentile, max) against the idle latency, and the server's peak RSS (``VmHWM`` of
``/proc/<pid>/status``) before and after the maximal request. Arguments after ``--`` go to
``qualiclip serve`` (e.g. ``-- --max-pixels-in-flight 48000000``).

Run it from the repository root with ``PYTHONPATH=src`` (the server is ``python -m
qualiclip.cli`` with the same interpreter and environment).
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def _png(width: int, height: int, seed: int) -> bytes:
    """A PNG that decodes to ``width x height`` pixels yet compresses well (smooth rows)."""
    rng = np.random.default_rng(seed)
    row = np.repeat(rng.integers(0, 256, (max(width // 64, 1), 3), dtype=np.uint8), 64, axis=0)
    row = np.resize(row, (width, 3))
    pixels = np.broadcast_to(row, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    argv = sys.argv[1:]
    server_extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random-tiny")
    parser.add_argument("--big-images", type=int, default=8)
    parser.add_argument("--big-size", type=_size, default=(6000, 4000))
    parser.add_argument("--small-size", type=_size, default=(224, 224))
    parser.add_argument("--small-every", type=float, default=0.5)
    parser.add_argument("--max-small", type=int, default=400)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    import httpx

    print(f"building {args.big_images} PNGs of {args.big_size[0]}x{args.big_size[1]} ...",
          flush=True)
    big = [_png(*args.big_size, seed=i) for i in range(args.big_images)]
    small = _png(*args.small_size, seed=99)
    print(f"maximal request: {args.big_images} files, {sum(map(len, big)) / 1024:.0f} KB; "
          f"small request: one {args.small_size[0]}x{args.small_size[1]} PNG", flush=True)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "qualiclip.cli", "serve", "--model", args.model,
           "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
           *server_extra]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            return _measure(httpx, proc, url, big, small, args)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
            print("server log (last lines):", *tail, sep="\n  ")


def _measure(httpx, proc, url, big, small, args) -> int:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            print(f"server exited with {proc.returncode}")
            return 1
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            print("server did not start in 120 s")
            return 1
        time.sleep(0.2)

    def small_request(client) -> float:
        start = time.perf_counter()
        r = client.post(f"{url}/score", content=small, headers={"Content-Type": "image/png"})
        r.raise_for_status()
        return time.perf_counter() - start

    with httpx.Client(timeout=args.timeout) as client:
        idle = [small_request(client) for _ in range(5)]
    rss_before = _peak_rss_mib(proc.pid)

    outcome: dict[str, object] = {}

    def send_big() -> None:
        files = [("files", (f"big{i}.png", data, "image/png")) for i, data in enumerate(big)]
        start = time.perf_counter()
        try:
            r = httpx.post(f"{url}/score", files=files, timeout=args.timeout)
            outcome["status"] = r.status_code
            outcome["errors"] = [row["error"] for row in r.json().get("results", [])
                                 if row["error"]]
        except httpx.HTTPError as exc:
            outcome["status"] = f"{type(exc).__name__}: {exc}"
        outcome["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=send_big)
    thread.start()
    busy: list[float] = []
    stop = time.monotonic() + args.timeout
    with httpx.Client(timeout=args.timeout) as client:
        time.sleep(args.small_every)
        while thread.is_alive() and len(busy) < args.max_small and time.monotonic() < stop:
            busy.append(small_request(client))
            time.sleep(args.small_every)
    thread.join(timeout=max(0.0, stop - time.monotonic()))
    rss_after = _peak_rss_mib(proc.pid)

    print(f"maximal request: status {outcome.get('status')} in {outcome.get('seconds', 0):.1f} s"
          + (f"; errors: {outcome['errors']}" if outcome.get("errors") else ""))
    print(f"small requests, idle server: median {statistics.median(idle) * 1000:.0f} ms, "
          f"max {max(idle) * 1000:.0f} ms ({len(idle)} requests)")
    if busy:
        ordered = sorted(busy)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        print(f"small requests during the maximal one: {len(busy)} answered, median "
              f"{statistics.median(busy):.2f} s, p90 {p90:.2f} s, max {max(busy):.2f} s")
    else:
        print("small requests during the maximal one: none sent (it finished first)")
    print(f"server peak RSS (VmHWM): {rss_before:.0f} MiB before the maximal request, "
          f"{rss_after:.0f} MiB after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
