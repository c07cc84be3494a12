"""Fairness and memory of ``qualiclip serve``: small requests while large ones run or were left.

Usage:
    python benchmarks/bench_serve_fairness.py [--scenario all|one|clients|map|abandoned]
        [--model random-tiny] [--big-size 6000x4000] [--big-images 8] [--clients 12]
        [--map-clients 3] [--abandoned 3] [--small-size 224x224] [--small-every 0.5]
        [--max-small 400] [--timeout 900] [-- SERVER OPTIONS...]

Each scenario starts its own ``qualiclip serve`` process on 127.0.0.1 (a free port, loopback
only; a fresh process, so its peak RSS is the scenario's), with the default limits
(``--max-pixels`` 24e6 and ``--max-bytes`` 32 MiB admit eight 24-megapixel PNGs, which compress to
a few tens of KB each). It times a few small requests on the idle server, then puts on the load
and meanwhile sends one small request (a ``--small-size`` PNG) every ``--small-every`` seconds,
one at a time, until the load is answered:

* ``one``: one ``/score`` request of ``--big-images`` PNGs of ``--big-size``;
* ``clients``: ``--clients`` concurrent clients, each one ``/score`` of one ``--big-size`` PNG;
* ``map``: ``--map-clients`` concurrent clients, each one ``/map`` (the default kind) of one
  ``--big-size`` PNG; the small requests are ``/map`` too (the web page's endpoint);
* ``abandoned``: ``--abandoned`` clients each send one ``/map`` of a ``--big-size`` PNG and hang
  up as soon as it is sent; then one more client sends a ``/score`` of one ``--big-size`` PNG
  (the "follower", which should not wait for work nobody will read), with small ``/score``
  requests meanwhile until the follower is answered.

Printed per scenario: the large requests' statuses and durations, the small requests' latency
(median, 90th percentile, max) against the idle latency, and the server's peak RSS (``VmHWM`` of
``/proc/<pid>/status``) before and after the load; then one summary line per scenario, with the
small requests' median and max as ratios to the idle median of the same run.
Arguments after ``--`` go to ``qualiclip serve`` (e.g. ``-- --max-pixels-in-flight 48000000``).

Run it from the repository root with ``PYTHONPATH=src`` (the server is ``python -m
qualiclip.cli`` with the same interpreter and environment: point ``PYTHONPATH`` at another
checkout's ``src`` to measure that version).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SCENARIOS = ("one", "clients", "map", "abandoned")


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


@dataclass
class Outcome:
    """What one scenario measured."""

    name: str
    idle: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    large: list[tuple[Any, float]] = field(default_factory=list)  # (status, seconds)
    rss_before: float = float("nan")
    rss_after: float = float("nan")
    health: dict[str, Any] = field(default_factory=dict)


def main() -> int:
    argv = sys.argv[1:]
    server_extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=("all", *SCENARIOS), default="all")
    parser.add_argument("--model", default="random-tiny")
    parser.add_argument("--big-size", type=_size, default=(6000, 4000))
    parser.add_argument("--big-images", type=int, default=8)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--map-clients", type=int, default=3)
    parser.add_argument("--abandoned", type=int, default=3)
    parser.add_argument("--small-size", type=_size, default=(224, 224))
    parser.add_argument("--small-every", type=float, default=0.5)
    parser.add_argument("--max-small", type=int, default=400)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)

    print(f"building PNGs of {args.big_size[0]}x{args.big_size[1]} ...", flush=True)
    big = _png(*args.big_size, seed=0)
    small = _png(*args.small_size, seed=99)
    print(f"large file: {len(big) / 1024:.0f} KB; small file: one "
          f"{args.small_size[0]}x{args.small_size[1]} PNG", flush=True)
    outcomes = []
    for name in SCENARIOS if args.scenario == "all" else (args.scenario,):
        print(f"\n== {name}", flush=True)
        outcome = _with_server(args, server_extra, lambda url, pid, n=name: _SCENARIOS[n](
            url, pid, big, small, args))
        if outcome is None:
            return 1
        _report(outcome)
        outcomes.append(outcome)
    # Ratios to the idle latency measured in the same run: the machine's speed and load cancel.
    print("\nscenario   idle median   small median (x idle)   small max (x idle)   small n   "
          "large done in (max)   peak RSS before -> after")
    for o in outcomes:
        busy = o.busy or [float("nan")]
        idle = statistics.median(o.idle)
        median, worst = statistics.median(busy), max(busy)
        print(f"{o.name:<10} {idle:>9.2f} s   {median:>8.2f} s ({median / idle:>6.1f}x)   "
              f"{worst:>8.2f} s ({worst / idle:>6.1f}x)   {len(o.busy):>7}   "
              f"{max(s for _, s in o.large):>17.1f} s   "
              f"{o.rss_before:>6.0f} -> {o.rss_after:>6.0f} MiB")
    return 0


def _with_server(
    args: argparse.Namespace, server_extra: list[str], measure: Callable[[str, int], Outcome]
) -> Outcome | None:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "qualiclip.cli", "serve", "--model", args.model,
           "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
           *server_extra]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    print(f"server exited with {proc.returncode}")
                    return None
                try:
                    if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    print("server did not start in 300 s")
                    return None
                time.sleep(0.2)
            return measure(url, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-4:]
            print("server log (last lines):", *tail, sep="\n  ")


def _post(url: str, path: str, files: list[bytes], timeout: float) -> tuple[Any, float]:
    """``(status, seconds)`` of one multipart POST (the status is the error text on failure)."""
    import httpx

    parts = [("files", (f"f{i}.png", data, "image/png")) for i, data in enumerate(files)]
    start = time.perf_counter()
    try:
        status: Any = httpx.post(f"{url}{path}", files=parts, timeout=timeout).status_code
    except httpx.HTTPError as exc:
        status = f"{type(exc).__name__}: {exc}"
    return status, time.perf_counter() - start


def _hang_up_after_sending(url: str, path: str, data: bytes) -> None:
    """Send one multipart POST of ``data`` in full, then close the connection unread."""
    boundary = "benchBoundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\""
            f"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + body)


def _load(
    url: str, pid: int, small: bytes, small_path: str, args: argparse.Namespace, name: str,
    large: list[Callable[[], tuple[Any, float]]], before: Callable[[], None] = lambda: None,
) -> Outcome:
    """Idle small requests; then ``before()``, the ``large`` calls in threads, and small
    requests every ``--small-every`` seconds until they are all answered."""
    out = Outcome(name)
    out.idle = [_post(url, small_path, [small], args.timeout)[1] for _ in range(5)]
    out.rss_before = _peak_rss_mib(pid)
    before()
    results: list[tuple[Any, float]] = []
    threads = [threading.Thread(target=lambda call=call: results.append(call())) for call in large]
    for thread in threads:
        thread.start()
    stop = time.monotonic() + args.timeout
    time.sleep(args.small_every)
    while (any(t.is_alive() for t in threads) and len(out.busy) < args.max_small
           and time.monotonic() < stop):
        status, seconds = _post(url, small_path, [small], args.timeout)
        if status != 200:
            print(f"small request: status {status}")
        out.busy.append(seconds)
        time.sleep(args.small_every)
    for thread in threads:
        thread.join(timeout=max(0.0, stop - time.monotonic()))
    out.large = results
    out.rss_after = _peak_rss_mib(pid)
    import httpx

    out.health = httpx.get(f"{url}/healthz", timeout=30).json()
    return out


def _one(url: str, pid: int, big: bytes, small: bytes, args: argparse.Namespace) -> Outcome:
    files = [big] * args.big_images
    return _load(url, pid, small, "/score", args, "one",
                 [lambda: _post(url, "/score", files, args.timeout)])


def _clients(url: str, pid: int, big: bytes, small: bytes, args: argparse.Namespace) -> Outcome:
    calls = [lambda: _post(url, "/score", [big], args.timeout)] * args.clients
    return _load(url, pid, small, "/score", args, "clients", calls)


def _map(url: str, pid: int, big: bytes, small: bytes, args: argparse.Namespace) -> Outcome:
    calls = [lambda: _post(url, "/map", [big], args.timeout)] * args.map_clients
    return _load(url, pid, small, "/map", args, "map", calls)


def _abandoned(url: str, pid: int, big: bytes, small: bytes, args: argparse.Namespace) -> Outcome:
    def hang_ups() -> None:
        for _ in range(args.abandoned):
            _hang_up_after_sending(url, "/map", big)

    return _load(url, pid, small, "/score", args, "abandoned",
                 [lambda: _post(url, "/score", [big], args.timeout)], before=hang_ups)


_SCENARIOS: dict[str, Callable[[str, int, bytes, bytes, argparse.Namespace], Outcome]] = {
    "one": _one, "clients": _clients, "map": _map, "abandoned": _abandoned,
}


def _report(o: Outcome) -> None:
    statuses = sorted({str(status) for status, _ in o.large})
    seconds = [s for _, s in o.large]
    print(f"large requests: {len(o.large)}, statuses {statuses}, done in median "
          f"{statistics.median(seconds):.1f} s, max {max(seconds):.1f} s")
    print(f"small requests, idle server: median {statistics.median(o.idle) * 1000:.0f} ms, "
          f"max {max(o.idle) * 1000:.0f} ms ({len(o.idle)} requests)")
    if o.busy:
        ordered = sorted(o.busy)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        print(f"small requests under load: {len(o.busy)} answered, median "
              f"{statistics.median(o.busy):.2f} s, p90 {p90:.2f} s, max {max(o.busy):.2f} s")
    else:
        print("small requests under load: none sent (the load finished first)")
    print(f"server peak RSS (VmHWM): {o.rss_before:.0f} MiB before the load, "
          f"{o.rss_after:.0f} MiB after")
    counters = {k: o.health[k] for k in ("images", "forwards", "maps", "dropped")
                if k in o.health}
    print(f"server counters: {counters}")


if __name__ == "__main__":
    sys.exit(main())
