"""The one way outputs are written: no links followed, never over an input, all or nothing,
and one line naming the path and the errno when the disk refuses (full, read-only)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fill_disk_after, tmpfs
from qualiclip import output_files
from qualiclip.output_files import (
    InputFiles,
    OutputError,
    SameFileError,
    append_line,
    open_output,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_text_and_bytes_replace_the_target_atomically(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with open_output(target, "w", encoding="utf-8", newline="") as f:
        f.write("path,score\r\n")
        assert target.read_text() == "old\n"  # nothing visible under the name until the end
    assert target.read_bytes() == b"path,score\r\n"
    with open_output(target) as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and leftovers(tmp_path) == []


def test_a_failure_in_the_block_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("[1]\n")
    with pytest.raises(RuntimeError), open_output(target, "w") as f:
        f.write("[2, ")
        raise RuntimeError("scoring failed")
    assert target.read_text() == "[1]\n" and leftovers(tmp_path) == []


def test_a_symlink_at_the_name_is_replaced_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(victim)
    before = victim.read_bytes()
    link = tmp_path / "maps" / "photo.map.npy"
    link.parent.mkdir()
    link.symlink_to(victim)
    with open_output(link) as f:
        np.save(f, np.zeros(3))
    assert victim.read_bytes() == before
    assert not link.is_symlink() and np.load(link).shape == (3,)


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "dotdot"])
def test_an_output_that_is_an_input_by_inode_is_refused(tmp_path: Path, kind: str) -> None:
    victim = tmp_path / "in" / "photo.png"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    other = tmp_path / "out"
    other.mkdir()
    target = {"symlink": other / "x.csv", "hardlink": other / "x.csv",
              "dotdot": other / ".." / "in" / "photo.png"}[kind]
    if kind == "symlink":
        target.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, target)
    inputs = InputFiles.of([victim])
    assert inputs.input_at(target) == str(victim)
    with pytest.raises(SameFileError, match="is one of the inputs"), open_output(
        target, inputs=inputs
    ) as f:
        f.write(b"destroyed")
    assert victim.read_bytes() == b"precious" and leftovers(other) == []
    assert InputFiles.of([victim]).input_at(tmp_path / "unrelated") is None


def test_full_disk_is_one_line_naming_path_and_errno(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "scores.json"
    target.write_text("[]\n")
    fill_disk_after(monkeypatch, 8192)
    with pytest.raises(OutputError) as info, open_output(target, "w") as f:
        for i in range(5000):
            f.write(json.dumps({"path": f"img{i}.jpg", "score": 0.5}) + ",\n")
    message = str(info.value)
    assert message == f"cannot write {target}: No space left on device (ENOSPC)"
    assert info.value.errno == errno.ENOSPC and "\n" not in message
    assert target.read_text() == "[]\n" and leftovers(tmp_path) == []


def test_a_library_that_rewords_the_failure_still_reports_the_errno(tmp_path, monkeypatch):
    """torch.save says 'unexpected pos' when its writes fail; the OS's reason is what counts."""
    fill_disk_after(monkeypatch, 4096)
    target = tmp_path / "ckpt-000010.pt"
    with pytest.raises(OutputError, match=r"ckpt-000010\.pt: No space left on device \(ENOSPC\)"):
        with open_output(target, durable=True) as f:
            torch.save({"w": torch.zeros(100_000)}, f)
    assert not target.exists() and leftovers(tmp_path) == []


def test_pillow_numpy_and_arrow_write_through_the_stream(tmp_path: Path) -> None:
    with open_output(tmp_path / "a.png") as f:
        Image.new("RGB", (5, 4), "blue").save(f, format="PNG")
    with open_output(tmp_path / "a.tif") as f:  # TIFF seeks back while writing
        Image.new("RGB", (5, 4), "blue").save(f, format="TIFF")
    with open_output(tmp_path / "a.npy") as f:
        np.save(f, np.arange(4))
    assert Image.open(tmp_path / "a.png").size == (5, 4)
    assert Image.open(tmp_path / "a.tif").size == (5, 4)
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2, 3]


def test_interrupt_keeps_a_completed_file_only_when_asked(tmp_path: Path) -> None:
    kept, dropped = tmp_path / "kept.json", tmp_path / "dropped.png"
    with pytest.raises(KeyboardInterrupt), open_output(kept, "w", keep_on_interrupt=True) as f:
        f.write("[]\n")  # the writer completed its file before letting the interrupt through
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), open_output(dropped) as f:
        f.write(b"\x89PNG half")
        raise KeyboardInterrupt
    assert kept.read_text() == "[]\n" and not dropped.exists() and leftovers(tmp_path) == []


def test_append_line_never_leaves_half_a_line(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "history.jsonl"
    append_line(log, json.dumps({"step": 1}))

    def half(fd: int, data) -> int:
        os.write(fd, bytes(memoryview(data)[:5]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output_files, "_write", half)
    with pytest.raises(OutputError, match="history.jsonl: No space left on device"):
        append_line(log, json.dumps({"step": 2, "loss": 0.5}))
    monkeypatch.undo()
    append_line(log, json.dumps({"step": 3}))
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 3]


def test_append_line_does_not_follow_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "photo.jpg"
    victim.write_bytes(b"precious")
    (tmp_path / "history.jsonl").symlink_to(victim)
    with pytest.raises(OutputError, match="history.jsonl"):
        append_line(tmp_path / "history.jsonl", "{}")
    assert victim.read_bytes() == b"precious"


def test_missing_folder_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"cannot write .*nowhere/x.csv: No such file"):
        with open_output(tmp_path / "nowhere" / "x.csv", "w") as f:
            f.write("x")


# --- a real file system: tmpfs, full and read-only (needs root and mount; skipped elsewhere) ---


def test_real_full_disk_and_read_only_file_system(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=64k") as small:
        (small / "keep.json").write_text("[]\n")
        with pytest.raises(OutputError, match="No space left on device .ENOSPC."):
            with open_output(small / "keep.json") as f:
                f.write(os.urandom(256 * 1024))
        assert (small / "keep.json").read_text() == "[]\n"
        assert leftovers(small) == []
        with pytest.raises(OutputError, match="No space left on device"):
            for _ in range(100):
                append_line(small / "log.jsonl", "x" * 4000)
        assert all(ln == "x" * 4000 for ln in (small / "log.jsonl").read_text().splitlines())
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        with pytest.raises(OutputError, match=r"ro/x.csv: Read-only file system \(EROFS\)"):
            with open_output(ro / "x.csv", "w") as f:
                f.write("x")


def test_devices_and_pipes_are_written_into_never_replaced(tmp_path: Path) -> None:
    with open_output("/dev/null", "w") as f:  # as root, a rename would replace /dev/null
        f.write("rows\n")
    assert Path("/dev/null").is_char_device()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    read_end = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with open_output(fifo) as f:
            f.write(b"through the pipe")
        assert os.read(read_end, 100) == b"through the pipe"
    finally:
        os.close(read_end)
    assert fifo.is_fifo() and leftovers(tmp_path) == []


def test_a_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "shared.csv"
    target.write_text("old")
    target.chmod(0o640)
    with open_output(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640
