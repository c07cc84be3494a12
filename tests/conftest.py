"""Shared test fixtures.

Tests that need the reference files beside the project (golden outputs,
pristine photos, the human-rated test set) find them at ``$QUALICLIP_SHARED`` or ``../shared``
from the repository root. In CI (``CI=true``) a missing folder fails the test; elsewhere it is
skipped with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def find_shared() -> Path | None:
    """Return the shared reference folder, or None when it is not there."""
    env = os.environ.get("QUALICLIP_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared")
    for path in candidates:
        if (path / "golden").is_dir():
            return path
    return None


def require_shared(sub: str = "") -> Path:
    """Return ``shared/sub``; fail in CI and skip elsewhere when it is missing."""
    root = find_shared()
    path = root / sub if root is not None else None
    if path is None or not path.exists():
        reason = (
            f"shared reference folder {sub or ''!s} not found: set QUALICLIP_SHARED or place "
            f"it at {REPO_ROOT.parent / 'shared'}"
        )
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require_shared("golden")


def perturb_batch_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every batch norm random statistics and affine terms (a new model has 0/1), so that
    scores differ from image to image and BN folding is really exercised. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(args: Sequence[str], port: int, log: Path, timeout: float) -> Iterator[str]:
    """``qualiclip serve ARGS`` as a real process on 127.0.0.1:``port``; yields its URL once
    ``/healthz`` answers (fails the test if the process exits or ``timeout`` passes), and stops
    it afterwards. Its output goes to ``log``."""
    import httpx

    cmd = [sys.executable, "-m", "qualiclip.cli", "serve", *args, "--host", "127.0.0.1",
           "--port", str(port)]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not answer /healthz in {timeout:.0f} s:\n"
                            f"{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    """``qualiclip ARGS`` run in this process (``cli.main``), its output captured: for usage
    errors and help texts, which need no fresh interpreter (a subprocess pays for importing
    torch again). Returns what :func:`subprocess.run` would."""
    from qualiclip import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return subprocess.CompletedProcess(["qualiclip", *args], code, out.getvalue(), err.getvalue())


# --- full and read-only disks ------------------------------------------------------------------


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, budget: int, code: int = errno.ENOSPC) -> None:
    """Every output write fails with ``code`` once ``budget`` bytes went through (a full disk)."""
    written = [0]

    def write(fd: int, data: bytes | memoryview) -> int:
        size = len(memoryview(data).cast("B"))
        if written[0] + size > budget:
            raise OSError(code, os.strerror(code))
        written[0] += size
        return os.write(fd, data)

    from qualiclip import output_files

    monkeypatch.setattr(output_files, "_write", write)


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the block; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
