"""Tests for qualiclip.pretrained: verified, cached downloads and checkpoint readers.

The network is never used: ``qualiclip.pretrained._urlopen`` is patched with a fake server whose
bytes and checksums the tests choose. Checkpoint readers are checked against the golden files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, require_shared
from qualiclip import pretrained
from qualiclip.pretrained import (
    BPE_VOCAB,
    PRETRAINED,
    ChecksumError,
    OfflineError,
    RemoteFile,
    add_to_cache,
    cache_dir,
    cached_path,
    download,
    is_cached,
    load_checkpoint,
    resolve_weights,
)
from qualiclip.prompts import PROMPT_PAIRS

PAYLOAD = bytes(range(256)) * 4000 + b"qualiclip"  # ~1 MB: more than one read chunk


def _remote(data: bytes = PAYLOAD, *, urls: tuple[str, ...] = ("https://a.example/w.pt",),
            size: int | None = -1, filename: str = "w.pt") -> RemoteFile:
    return RemoteFile(
        name="test weights",
        urls=urls,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data) if size == -1 else size,
        filename=filename,
        licence="MIT",
    )


class FakeServer:
    """Stands in for ``_urlopen``: serves bytes per URL, or raises, and records every call."""

    def __init__(self, routes: dict[str, bytes | Exception]) -> None:
        self.routes = routes
        self.calls: list[str] = []

    def __call__(self, url: str, timeout: float) -> io.BytesIO:
        self.calls.append(url)
        answer = self.routes.get(url, urllib.error.URLError("no route to host"))
        if isinstance(answer, Exception):
            raise answer
        return io.BytesIO(answer)


@pytest.fixture()
def serve(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, bytes | Exception]], FakeServer]:
    monkeypatch.delenv("QUALICLIP_OFFLINE", raising=False)

    def install(routes: dict[str, bytes | Exception]) -> FakeServer:
        server = FakeServer(routes)
        monkeypatch.setattr(pretrained, "_urlopen", server)
        return server

    return install


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- download -----------------------------------------------------------------------------------


def test_correct_checksum_accepted_and_cached(tmp_path: Path, serve: Callable, capsys) -> None:
    file = _remote()
    server = serve({file.urls[0]: PAYLOAD})
    path = download(file, tmp_path, progress=True)
    assert path == tmp_path / "w.pt" and path.read_bytes() == PAYLOAD
    assert server.calls == [file.urls[0]]
    assert "w.pt" in capsys.readouterr().err  # progress bar on stderr
    again = download(file, tmp_path, progress=False)
    assert again == path and server.calls == [file.urls[0]]  # no second fetch
    assert _files(tmp_path) == ["w.pt", "w.pt.sha256"]  # no temporary files left


def test_verified_digest_remembered_until_file_changes(
    tmp_path: Path, serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _remote()
    serve({file.urls[0]: PAYLOAD})
    path = download(file, tmp_path, progress=False)
    hashed: list[str] = []
    real = pretrained.sha256_file

    def counting(p: Path) -> str:
        hashed.append(str(p))
        return real(p)

    monkeypatch.setattr(pretrained, "sha256_file", counting)
    download(file, tmp_path, progress=False)
    assert hashed == []  # sidecar matched size + mtime: not re-hashed
    os.utime(path, ns=(1, 1))  # touched: the sidecar no longer vouches for it
    download(file, tmp_path, progress=False)
    assert hashed == [str(path)]


def test_wrong_checksum_rejected_and_removed(tmp_path: Path, serve: Callable) -> None:
    file = _remote()
    bad = bytes(len(PAYLOAD))  # same size, different bytes
    serve({file.urls[0]: bad})
    with pytest.raises(ChecksumError) as info:
        download(file, tmp_path, progress=False)
    text = str(info.value)
    assert file.sha256 in text and hashlib.sha256(bad).hexdigest() in text
    assert _files(tmp_path) == []  # nothing partial or wrong left behind


def test_wrong_size_and_oversized_stream(tmp_path: Path, serve: Callable) -> None:
    file = _remote()
    serve({file.urls[0]: PAYLOAD[:-5]})
    with pytest.raises(ChecksumError, match=f"expected {len(PAYLOAD)} bytes, got"):
        download(file, tmp_path, progress=False)
    serve({file.urls[0]: PAYLOAD * 3})
    with pytest.raises(ChecksumError, match="more than the expected"):
        download(file, tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_corrupted_cache_redownloaded(tmp_path: Path, serve: Callable) -> None:
    file = _remote()
    server = serve({file.urls[0]: PAYLOAD})
    target = tmp_path / file.filename
    target.write_bytes(b"\0" * len(PAYLOAD))  # right size, wrong bytes (e.g. disk damage)
    assert download(file, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert len(server.calls) == 1
    target.write_bytes(PAYLOAD[:100])  # a partial copy from an old tool
    assert download(file, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert len(server.calls) == 2


def test_offline_error_text(
    tmp_path: Path, serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _remote(urls=("https://a.example/w.pt", "https://b.example/w.pt"))
    server = serve({})
    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        download(file, tmp_path)
    text = str(info.value)
    for needle in ("w.pt", file.sha256, str(tmp_path / "w.pt"), str(len(PAYLOAD)), *file.urls):
        assert needle in text, needle
    assert server.calls == []
    assert isinstance(info.value, RuntimeError)
    assert "qualiclip models --add w.pt PATH" in text  # a command, not a Python call


def test_offline_text_names_the_add_command_for_every_known_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command the offline message suggests is one `models --add` accepts."""
    from qualiclip import cli, pretrained

    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")
    for file in (pretrained.QUALICLIP_FILE, pretrained.CLIP_RN50_FILE, pretrained.BPE_VOCAB):
        with pytest.raises(OfflineError) as info:
            download(file, tmp_path)
        (line,) = [ln for ln in str(info.value).splitlines() if "models --add" in ln]
        name = line.split("--add ")[1].split()[0]
        wrong = tmp_path / "wrong"
        wrong.write_bytes(b"not it")
        # A known name: the file is checked (and refused for its checksum: exit 1, not 2).
        assert cli.main(["models", "--add", name, str(wrong), "--cache-dir", str(tmp_path)]) == 1


def test_an_image_given_as_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    expected = "photo.png: not a PyTorch checkpoint \\(it is a PNG image\\)"
    with pytest.raises(ValueError, match=expected) as info:
        load_checkpoint(tmp_path / "photo.png")
    assert "weights_only" not in str(info.value)


def test_offline_with_stale_cache_says_so(
    tmp_path: Path, serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _remote()
    (tmp_path / file.filename).write_bytes(b"junk")
    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")
    with pytest.raises(OfflineError, match="wrong checksum was removed"):
        download(file, tmp_path)
    assert _files(tmp_path) == []


def test_network_failure_is_offline_error(tmp_path: Path, serve: Callable) -> None:
    file = _remote(urls=("https://a.example/w.pt", "https://b.example/w.pt"))
    server = serve({file.urls[0]: urllib.error.URLError("Name or service not known"),
                    file.urls[1]: TimeoutError("timed out")})
    with pytest.raises(OfflineError) as info:
        download(file, tmp_path, progress=False)
    text = str(info.value)
    assert "Name or service not known" in text and "timed out" in text
    assert file.sha256 in text and str(tmp_path / "w.pt") in text
    assert server.calls == list(file.urls)
    assert _files(tmp_path) == []


def test_connection_lost_mid_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            if self.tell() > 1000:
                raise ConnectionResetError("connection reset by peer")
            return super().read(min(n or 500, 500))

    file = _remote()
    monkeypatch.delenv("QUALICLIP_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "_urlopen", lambda url, timeout: Broken(PAYLOAD))
    with pytest.raises(OfflineError, match="connection reset"):
        download(file, tmp_path, progress=False)
    assert _files(tmp_path) == []  # the partial temporary file is gone


def test_fallback_to_second_url(tmp_path: Path, serve: Callable) -> None:
    file = _remote(urls=("https://a.example/w.pt", "https://b.example/w.pt"))
    server = serve({file.urls[0]: urllib.error.URLError("down"), file.urls[1]: PAYLOAD})
    assert download(file, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.calls == list(file.urls)
    # A mirror serving wrong bytes (an HTML error page, say) is skipped as well.
    target = tmp_path / file.filename
    target.unlink()
    server = serve({file.urls[0]: b"<html>rate limited</html>", file.urls[1]: PAYLOAD})
    assert download(file, tmp_path, progress=False).read_bytes() == PAYLOAD


def test_unknown_size_checks_digest_only(tmp_path: Path, serve: Callable) -> None:
    file = _remote(size=None)
    serve({file.urls[0]: PAYLOAD})
    assert download(file, tmp_path, progress=False).read_bytes() == PAYLOAD


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUALICLIP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert cache_dir() == tmp_path / "home"
    monkeypatch.delenv("QUALICLIP_HOME")
    assert cache_dir() == tmp_path / "xdg" / "qualiclip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cache_dir() == tmp_path / "user" / ".cache" / "qualiclip"
    assert cached_path("qualiclip") == tmp_path / "user" / ".cache" / "qualiclip" / "QualiCLIP.pth"


def test_add_to_cache_and_is_cached(
    tmp_path: Path, serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _remote()
    entry = dataclasses.replace(PRETRAINED["qualiclip"], name="tiny", file=file)
    monkeypatch.setitem(PRETRAINED, "tiny", entry)
    cache = tmp_path / "cache"
    assert not is_cached("tiny", cache)
    local = tmp_path / "by-hand.pt"
    local.write_bytes(PAYLOAD[::-1])
    with pytest.raises(ChecksumError, match=file.sha256):
        add_to_cache(local, "tiny", cache)
    assert not is_cached("tiny", cache)
    local.write_bytes(PAYLOAD)
    assert add_to_cache(local, "tiny", cache) == cache / "w.pt"
    assert is_cached("tiny", cache)
    server = serve({})
    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")
    assert download("tiny", cache).read_bytes() == PAYLOAD  # found without the network
    assert server.calls == []


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="qualiclip, clip-rn50, clip-iqa"):
        download("nope")


# --- the table ----------------------------------------------------------------------------------


def test_table_entries() -> None:
    q = PRETRAINED["qualiclip"]
    assert q.file.sha256 == "5818e085ac4b3d297cdd183fd2b1d8a4ddb2242e5bb7fd24b2cd66d7d132bc7e"
    assert q.file.size == 408_494_502 and q.licence == "CC BY-NC 4.0"
    assert q.file.urls[0].startswith("https://huggingface.co/") and "github.com" in q.file.urls[1]
    assert q.prompt_pairs == PROMPT_PAIRS and len(q.prompt_pairs) == 7 and q.logit_scale == 100
    rn50, iqa = PRETRAINED["clip-rn50"], PRETRAINED["clip-iqa"]
    assert rn50.file is iqa.file and rn50.licence == "MIT"
    # The table's literal digest agrees with the content address OpenAI publishes in the URL.
    assert f"/{rn50.file.sha256}/" in rn50.file.urls[0]
    assert rn50.prompt_pairs == PROMPT_PAIRS
    assert iqa.prompt_pairs == (("Good photo.", "Bad photo."),)
    for entry in PRETRAINED.values():
        assert entry.mean == (0.48145466, 0.4578275, 0.40821073)
        assert entry.std == (0.26862954, 0.26130258, 0.27577711)


def test_bpe_vocab_entry_matches_shipped_copies() -> None:
    shared = require_shared("vocab") / BPE_VOCAB.filename
    assert pretrained.sha256_file(shared) == BPE_VOCAB.sha256
    package = REPO_ROOT / "src" / "qualiclip" / BPE_VOCAB.filename
    if package.exists():
        assert pretrained.sha256_file(package) == BPE_VOCAB.sha256


def test_remote_file_validation() -> None:
    with pytest.raises(ValueError, match="64 hex"):
        RemoteFile("x", ("https://x",), "abc", 1, "x.pt", "MIT")
    with pytest.raises(ValueError, match="bare file name"):
        dataclasses.replace(_remote(), filename="../x.pt")


# --- checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden() -> Path:
    return require_shared("golden")


@pytest.fixture(scope="module")
def reference(golden: Path) -> dict[str, torch.Tensor]:
    """The plain state dict as torch itself reads it: what every reader must reproduce."""
    return torch.load(golden / "clip_tiny_rn.pt", map_location="cpu", weights_only=True)


def _assert_same(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(ref)
    for key, value in ref.items():
        assert state[key].dtype == (torch.float32 if value.is_floating_point() else value.dtype)
        assert torch.equal(state[key], value.to(state[key].dtype)), key


def test_three_golden_formats_agree(golden: Path, reference: dict[str, torch.Tensor]) -> None:
    plain, none1 = load_checkpoint(golden / "clip_tiny_rn.pt")
    script, none2 = load_checkpoint(golden / "clip_tiny_rn_torchscript.pt", trust_torchscript=True)
    official, features = load_checkpoint(golden / "qualiclip_tiny_official_format.pth")
    assert none1 is None and none2 is None
    for state in (plain, script, official):
        _assert_same(state, reference)
    io_ref = torch.load(golden / "clip_tiny_io.pt", map_location="cpu", weights_only=True)
    assert features is not None and features.shape == (14, 64) and features.dtype == torch.float32
    assert torch.equal(features, io_ref["prompts_features"])


def test_torchscript_refused_without_trust(golden: Path) -> None:
    path = golden / "clip_tiny_rn_torchscript.pt"
    assert pretrained.is_torchscript_archive(path)
    assert not pretrained.is_torchscript_archive(golden / "clip_tiny_rn.pt")
    with pytest.raises(ValueError, match="TorchScript.*trust_torchscript=True"):
        load_checkpoint(path)


@pytest.mark.slow
def test_wrapped_ddp_and_fp16(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    ddp = {f"module.{k}": v for k, v in reference.items()}
    torch.save({"state_dict": ddp, "epoch": 3}, tmp_path / "ddp.pt")
    state, _ = load_checkpoint(tmp_path / "ddp.pt")
    _assert_same(state, reference)
    torch.save({"model": dict(reference)}, tmp_path / "model.pt")
    _assert_same(load_checkpoint(tmp_path / "model.pt")[0], reference)
    meta = dict(reference, input_resolution=torch.tensor(224), vocab_size=torch.tensor(49408))
    torch.save(meta, tmp_path / "meta.pt")
    _assert_same(load_checkpoint(tmp_path / "meta.pt")[0], reference)
    half = {k: v.half() if v.is_floating_point() else v for k, v in reference.items()}
    torch.save(half, tmp_path / "half.pt")
    state, _ = load_checkpoint(tmp_path / "half.pt")
    key = "visual.conv1.weight"
    assert state[key].dtype == torch.float32
    assert torch.equal(state[key], reference[key].half().float())


def test_our_prompt_feature_layout(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    feats = torch.randn(7, 2, 64)
    visual = {k: v for k, v in reference.items() if k.startswith("visual.")}
    torch.save({**visual, "prompt_features": feats, "mean": torch.zeros(1, 3, 1, 1),
                "std": torch.ones(1, 3, 1, 1)}, tmp_path / "q.pt")
    state, got = load_checkpoint(tmp_path / "q.pt")
    assert set(state) == set(visual)
    assert got is not None and torch.equal(got[0], feats[0, 0]) and torch.equal(got[1], feats[0, 1])
    assert torch.equal(got[2], feats[1, 0])


def test_not_a_checkpoint(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(2048))
    with pytest.raises(ValueError, match="garbage.pth"):
        load_checkpoint(garbage)
    unsafe = tmp_path / "unsafe.pt"
    unsafe.write_bytes(pickle.dumps({"visual.x": os.system}, protocol=2))  # names a callable
    with pytest.raises(ValueError, match="unsafe.pt: the checkpoint holds Python objects") as info:
        load_checkpoint(unsafe)  # weights_only refuses arbitrary objects
    assert "weights_only" not in str(info.value)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a CLIP checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.slow
def test_resolve_weights_by_name_and_path(
    tmp_path: Path, golden: Path, reference: dict[str, torch.Tensor], serve: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = golden / "clip_tiny_rn_torchscript.pt"
    data = script.read_bytes()
    file = _remote(data, urls=("https://x.example/tiny.pt",), filename="tiny.pt")
    entry = dataclasses.replace(PRETRAINED["clip-rn50"], name="tiny-rn", file=file)
    monkeypatch.setitem(PRETRAINED, "tiny-rn", entry)
    serve({file.urls[0]: data})
    got = resolve_weights("tiny-rn", tmp_path, progress=False)
    assert got.entry is entry and got.prompt_features is None and got.sha256 == file.sha256
    _assert_same(got.state, reference)
    # The same archive given by path is trusted because its checksum is in the table...
    got = resolve_weights(script)
    assert got.entry is None and got.sha256 == file.sha256
    _assert_same(got.state, reference)
    # ...and refused when it is not.
    monkeypatch.delitem(PRETRAINED, "tiny-rn")
    with pytest.raises(ValueError, match="trust_torchscript"):
        resolve_weights(script)
    assert resolve_weights(script, trust_torchscript=True).state.keys() == reference.keys()
    with pytest.raises(ValueError, match="not an existing file"):
        resolve_weights(tmp_path / "nothing.pt")


# --- packaged weights ----------------------------------------------------------------------


def test_a_packaged_file_is_verified_at_every_load_and_never_fetched(
    tmp_path: Path, serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve({})
    shipped = tmp_path / "assets" / "own.pth"
    shipped.parent.mkdir()
    shipped.write_bytes(PAYLOAD)
    file = dataclasses.replace(
        _remote(), urls=(), filename="own.pth", packaged=True
    )
    monkeypatch.setattr(pretrained, "packaged_path", lambda f: tmp_path / "assets" / f.filename)
    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")  # nothing to fetch, so offline does not matter
    cache = tmp_path / "cache"
    assert download(file, cache) == shipped
    assert pretrained.cached_path(file, cache) == shipped and not cache.exists()
    with pytest.raises(ValueError, match="ships with qualiclip"):
        add_to_cache(shipped, file, cache)
    shipped.write_bytes(PAYLOAD[:-1] + b"!")  # same size, other bytes
    with pytest.raises(ChecksumError, match="sha256 mismatch.*reinstall"):
        download(file, cache)
    shipped.unlink()
    with pytest.raises(ChecksumError, match="missing from this qualiclip install"):
        download(file, cache)
    assert server.calls == []
    with pytest.raises(ValueError, match="URL"):
        dataclasses.replace(file, packaged=False)


def test_the_qualiclip_download_message_offers_the_packaged_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")
    with pytest.raises(OfflineError, match="--model qualiclip-open"):
        download("qualiclip", tmp_path)
    with pytest.raises(OfflineError) as info:
        download("clip-rn50", tmp_path)
    assert "qualiclip-open" not in str(info.value)
