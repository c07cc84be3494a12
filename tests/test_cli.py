"""The ``qualiclip`` command run as a user runs it: a subprocess on real files (usage errors,
which need no fresh interpreter, in this process)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_main
from qualiclip import engine
from qualiclip.model import create_model


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qualiclip.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


def photo(seed: int = 0, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """A smooth random colour field with texture (a stand-in photo), uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 9 + c) * np.cos(yy / 7 - c) for c in range(3)], axis=-1)
    noisy = 127 + 80 * base + rng.normal(0, 12, size=(h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Every kind of input a real folder holds, good and bad."""
    root = tmp_path_factory.mktemp("mixed")
    Image.fromarray(photo(1)).save(root / "plain.jpg", quality=92)
    rgba = np.dstack([photo(2), np.full((72, 96), 180, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    Image.fromarray(photo(3)[..., 0]).save(root / "grey.png")
    sixteen = photo(4)[..., 1].astype(np.uint16) * 257
    Image.fromarray(sixteen).save(root / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(photo(5, (120, 64))).save(root / "rotated.jpg", exif=exif.tobytes())
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    jpeg = io.BytesIO()
    Image.fromarray(photo(6)).save(jpeg, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    sub = root / "nested"
    sub.mkdir()
    Image.fromarray(photo(7)).save(sub / "deeper.png")
    (root / "notes.md").write_text("not an image")  # (a .txt input would be a list of paths)
    return root


GOOD = {"plain.jpg", "alpha.png", "grey.png", "deep16.png", "rotated.jpg", "deeper.png"}
BAD = {"corrupt.png", "truncated.jpg", "notes.md"}


@pytest.fixture(scope="module")
def model_file(golden_dir) -> Path:
    return golden_dir / "qualiclip_tiny_official_format.pth"


@pytest.mark.slow
def test_folder_with_bad_files_every_input_gets_a_row(mixed_folder, model_file):
    # The text file is named explicitly (folders only yield image extensions).
    result = run_cli(
        "score", str(mixed_folder), str(mixed_folder / "notes.md"),
        "--model", str(model_file), "--format", "json", "--device", "cpu",
    )
    assert result.returncode == 1, result.stderr
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert set(rows) == GOOD | BAD
    for name in GOOD:
        assert rows[name]["error"] is None, rows[name]
        assert 0.0 <= rows[name]["score"] <= 1.0
    for name in BAD:
        assert rows[name]["score"] is None and rows[name]["error"], rows[name]
    assert rows["rotated.jpg"]["width"] == 64 and rows["rotated.jpg"]["height"] == 120
    assert "3 of 9 inputs failed" in result.stderr


@pytest.mark.slow
def test_scores_equal_the_python_api(mixed_folder, model_file):
    result = run_cli(
        "score", str(mixed_folder / "plain.jpg"), str(mixed_folder / "deep16.png"),
        "--model", str(model_file), "--format", "csv", "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    model = create_model(model_file)
    for row in rows:
        assert float(row["score"]) == pytest.approx(engine.score(model, row["path"]), abs=1e-5)


@pytest.mark.slow
def test_paths_from_stdin_and_output_file(mixed_folder, model_file, tmp_path):
    listing = f"{mixed_folder / 'plain.jpg'}\n\n{mixed_folder / 'missing.jpg'}\n"
    out = tmp_path / "scores.jsonl"
    result = run_cli(
        "score", "-", "--model", str(model_file), "--format", "jsonl", "-o", str(out),
        stdin=listing,
    )
    assert result.returncode == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["plain.jpg", "missing.jpg"]
    assert rows[0]["score"] is not None and rows[1]["error"]


def test_usage_errors_exit_2(mixed_folder):
    assert run_main("score", str(mixed_folder), "--model", "no-such-model").returncode == 2
    assert run_main("score", str(mixed_folder), "--batch-size", "0").returncode == 2
    assert run_main("score").returncode == 2
    assert run_main("no-such-command").returncode == 2


@pytest.mark.slow
def test_models_lists_the_table(tmp_path):
    result = run_cli("models", "--cache-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("qualiclip", "clip-rn50", "clip-iqa"):
        assert name in result.stdout
    assert str(tmp_path) in result.stdout


@pytest.mark.slow
def test_offline_missing_weights_is_a_clean_error(tmp_path):
    Image.fromarray(photo(8)).save(tmp_path / "a.png")
    result = subprocess.run(
        [sys.executable, "-m", "qualiclip.cli", "score", str(tmp_path / "a.png"),
         "--model", "qualiclip", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "QUALICLIP_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "5818e085ac4b3d297cdd183fd2b1d8a4ddb2242e5bb7fd24b2cd66d7d132bc7e" in result.stderr
    assert str(tmp_path / "cache") in result.stderr


@pytest.mark.slow
def test_models_add_verifies_and_caches(tmp_path, golden_dir):
    bad = tmp_path / "fake.pth"
    bad.write_bytes(b"not the weights")
    result = run_cli("models", "--add", "qualiclip", str(bad), "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "c" / "QualiCLIP.pth").exists()
    assert run_main("models", "--add", "nope", str(bad)).returncode == 2


# --- hostile inputs: malformed files, special files, odd names, -o, pipes, interrupts ------------


def _main(*args: str) -> int:
    from qualiclip import cli

    return cli.main(list(args))


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(("a.jpg", "b.jpg")):
        Image.fromarray(photo(20 + i)).save(folder / name, quality=90)
    return folder


MALFORMED = {
    "ihdr.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00IHDR\x00\x00\x00\x00",
    "header.ppm": b"P6\n4x 48\n255\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_degrade_on_a_malformed_file_is_a_clear_error(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(MALFORMED[name])
    code = _main("degrade", str(path), "--type", "gaussian_blur", "-o", str(tmp_path / "o.png"))
    assert code == 1
    assert f"{name}: " in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifo_gets_a_row_in_a_scan_and_by_name(photos, tmp_path, capsys):
    import threading

    fifo = photos / "pipe.png"
    os.mkfifo(fifo)
    out = tmp_path / "rows.csv"
    box: list[int] = []
    thread = threading.Thread(
        target=lambda: box.append(_main(
            "score", str(photos), str(fifo), "--model", "random-tiny", "--no-progress",
            "--format", "csv", "-o", str(out),
        )),
        daemon=True,
    )
    thread.start()
    thread.join(60)
    assert box == [1], "qualiclip score blocked on a FIFO"
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert set(rows) == {"a.jpg", "b.jpg", "pipe.png"}
    assert "not a regular file (a FIFO" in rows["pipe.png"]["error"]
    assert rows["a.jpg"]["score"] and rows["b.jpg"]["score"]


def test_output_naming_an_input_is_refused_before_writing(photos, capsys):
    before = (photos / "b.jpg").read_bytes()
    code = _main("score", "--format", "csv", "-o", str(photos / "b.jpg"), str(photos),
                 "--model", "random-tiny")
    assert code == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert (photos / "b.jpg").read_bytes() == before
    # A new image-named file in a scanned folder would be read as an input on the next run.
    assert _main("score", "-o", str(photos / "new.png"), str(photos),
                 "--model", "random-tiny") == 2
    assert not (photos / "new.png").exists()
    assert "would be read as an input" in capsys.readouterr().err


def test_output_that_is_a_folder_is_a_usage_error(photos, tmp_path, capsys):
    code = _main("score", "-o", str(tmp_path), str(photos), "--model", "random-tiny")
    assert code == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "Traceback" not in err


def test_names_that_are_not_utf8_reach_csv_and_table_files(photos, tmp_path):
    odd = os.fsdecode(os.fsencode(str(photos)) + b"/caf\xe9.jpg")
    Image.fromarray(photo(30)).save(odd, format="JPEG")
    for fmt in ("csv", "table"):
        out = tmp_path / f"rows.{fmt}"
        code = _main("score", str(photos), "--model", "random-tiny", "--no-progress",
                     "--format", fmt, "-o", str(out))
        assert code == 0
        raw = out.read_bytes()
        assert b"/caf\xe9.jpg" in raw and b"/a.jpg" in raw and b"/b.jpg" in raw
    rows = list(csv.DictReader((tmp_path / "rows.csv").open(errors="surrogateescape")))
    assert odd in [r["path"] for r in rows]  # read back as documented, it names the file


@pytest.mark.slow
def test_strict_locale_stdout_and_stdin_list_carry_any_name(photos):
    odd = os.fsencode(str(photos)) + b"/\xff\xfe.jpg"
    Image.fromarray(photo(31)).save(os.fsdecode(odd), format="JPEG")
    uni = str(photos / "日本.jpg")
    Image.fromarray(photo(32)).save(uni)
    listing = odd + b"\n" + uni.encode() + b"\n" + os.fsencode(str(photos / "a.jpg")) + b"\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    for fmt in ("csv", "table"):
        result = subprocess.run(
            [sys.executable, "-m", "qualiclip.cli", "score", "-", "--model", "random-tiny",
             "--no-progress", "--format", fmt],
            input=listing, capture_output=True, timeout=300,
            env={**env, "LC_ALL": "C", "PYTHONIOENCODING": "ascii:strict"},
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert odd in result.stdout and uni.encode() in result.stdout


@pytest.mark.slow
def test_closed_pipe_ends_quietly(photos):
    proc = subprocess.Popen(
        [sys.executable, "-m", "qualiclip.cli", "score", str(photos), "--model", "random-tiny",
         "--no-progress", "--format", "csv"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first row, as with '| head -0'
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err


_SLOW_RUN = """
import signal, sys, time
from qualiclip import cli, reading
# Ctrl-C's handler, as at a terminal: a test run started in the background inherits SIGINT
# ignored, and Python keeps it ignored in this child too.
signal.signal(signal.SIGINT, signal.default_int_handler)
decode = reading.decode_file
def slow(index, path, min_size):
    if "slow" in path:
        time.sleep(600)  # a decode that never ends in time
    return decode(index, path, min_size)
reading.decode_file = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child is POSIX-only here")
@pytest.mark.slow
def test_interrupt_stops_within_seconds_with_rows_written(photos):
    import signal
    import time

    Image.fromarray(photo(40)).save(photos / "c_slow.jpg")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, "score", str(photos), "--model", "random-tiny",
         "--no-progress", "--format", "csv", "--batch-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]  # header, a.jpg, b.jpg
    assert lines[0].startswith("path,") and "a.jpg" in lines[1] and "b.jpg" in lines[2]
    time.sleep(0.5)  # now blocked on the slow decode
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running 30 s after SIGINT; stderr: {proc.communicate()[1][-2000:]}")
    assert code == 130 and time.monotonic() - start < 5
    assert "interrupted" in proc.stderr.read()


def test_degrade_and_maps_never_write_over_inputs(tmp_path, capsys):
    from qualiclip import cli

    photo_path = tmp_path / "p.png"
    Image.fromarray(photo(8)).save(photo_path)
    before = photo_path.read_bytes()
    argv = ["degrade", str(photo_path), "--type", "jpeg", "--level", "3", "-o", str(photo_path)]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert cli.main(["degrade", str(photo_path), "--sheet", str(photo_path)]) == cli.EXIT_USAGE
    assert photo_path.read_bytes() == before
    # --map inside the scanned folder: the overlays would be scanned as inputs next time.
    argv = ["score", str(tmp_path), "--model", "random-tiny", "--map", str(tmp_path / "maps")]
    assert cli.main(argv) == cli.EXIT_USAGE
    # An input named like a map, inside the map folder: map names mirror their input's whole
    # path, so no map can take its name; it is scored and mapped like any other input.
    maps = tmp_path.parent / f"{tmp_path.name}-maps"
    maps.mkdir()
    twin = maps / "p.map.png"
    Image.fromarray(photo(9)).save(twin)
    twin_bytes = twin.read_bytes()
    argv = ["score", str(photo_path), str(twin), "--model", "random-tiny", "--map", str(maps),
            "--no-progress"]
    assert cli.main(argv) == cli.EXIT_OK
    assert twin.read_bytes() == twin_bytes
    assert "Traceback" not in capsys.readouterr().err


def test_help_does_not_load_torch():
    """Every subcommand's flags, choices included, are declared without importing torch."""
    code = (
        "import sys\n"
        "from qualiclip import cli\n"
        "for argv in (['--help'], ['train', '--help'], ['score', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stderr.strip() == "False" and "--bn {frozen,train}" in out.stdout


# --- outputs never destroy inputs; SIGTERM; full disks (hostile input, round 3) ----------------


def _mixed_names(tmp_path: Path) -> Path:
    """Three inputs whose stems collide (a/photo.png, b/photo.png, photo-2.png)."""
    root = tmp_path / "in"
    for i, rel in enumerate(("a/photo.png", "b/photo.png", "photo-2.png")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(50 + i)).save(root / rel)
    return root


def test_a_map_name_linked_to_an_input_never_writes_the_input(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    victim = src / "photo.png"
    Image.fromarray(photo(60)).save(victim)
    before = victim.read_bytes()
    maps = tmp_path / "maps"
    maps.mkdir()
    for name in ("photo.map.npy", "photo.map.png", "photo.png.map.npy", "photo.png.map.png"):
        (maps / name).symlink_to(Path("..") / "in" / "photo.png")
    code = _main("score", str(victim), "--model", "random-tiny", "--no-progress",
                 "--map", str(maps), "--map-npy")
    assert victim.read_bytes() == before
    assert code == 2
    err = capsys.readouterr().err
    assert "is one of the inputs" in err and "Traceback" not in err


def test_a_hard_link_of_an_input_is_refused_as_output(photos, tmp_path, capsys):
    before = (photos / "a.jpg").read_bytes()
    link = tmp_path / "results.csv"
    os.link(photos / "a.jpg", link)
    code = _main("score", str(photos), "--model", "random-tiny", "--no-progress",
                 "--format", "csv", "-o", str(link))
    assert (photos / "a.jpg").read_bytes() == before
    assert code == 2 and "is one of the inputs" in capsys.readouterr().err
    sheet = tmp_path / "sheet.png"
    os.link(photos / "a.jpg", sheet)
    assert _main("degrade", str(photos / "a.jpg"), "--sheet", str(sheet), "--size", "16") == 2
    assert (photos / "a.jpg").read_bytes() == before


def test_map_names_are_unique_and_name_their_input(tmp_path):
    root = _mixed_names(tmp_path)
    maps = tmp_path / "maps"
    out = tmp_path / "rows.json"
    code = _main("score", str(root), "--model", "random-tiny", "--no-progress",
                 "--format", "json", "-o", str(out), "--map", str(maps), "--map-npy")
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 3
    inputs = sorted(str(Path(r["path"]).relative_to(root)) for r in rows)
    for suffix in (".map.png", ".map.npy"):
        written = sorted(str(p.relative_to(maps))[: -len(suffix)]
                         for p in maps.rglob(f"*{suffix}"))
        assert written == inputs  # one map per input, its relative path in the name


_MARKED_SLOW_RUN = """
import sys, time
from qualiclip import cli, output, reading
decode = reading.decode_file
def slow(index, path, min_size):
    if "slow" in path:
        time.sleep(600)  # a decode that never ends in time
    return decode(index, path, min_size)
reading.decode_file = slow
row = output.result_row
def marked(result, *args):
    with open(sys.argv[1], "a") as f:
        f.write(result.path + "\\n")
    return row(result, *args)
output.result_row = marked
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM to a child is POSIX-only here")
@pytest.mark.parametrize("fmt", ["json", "table"])
@pytest.mark.slow
def test_sigterm_keeps_the_finished_rows_and_exits_143(photos, tmp_path, fmt):
    import signal
    import time

    Image.fromarray(photo(40)).save(photos / "c_slow.jpg")
    marks, out = tmp_path / "marks", tmp_path / f"rows.{fmt}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _MARKED_SLOW_RUN, str(marks), "score", str(photos),
         "--model", "random-tiny", "--no-progress", "--format", fmt, "--batch-size", "1",
         "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while not (marks.exists() and len(marks.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == 143, proc.stderr.read() if proc.stderr else ""
    text = out.read_text()
    if fmt == "json":
        assert [Path(r["path"]).name for r in json.loads(text)] == ["a.jpg", "b.jpg"]
    else:
        assert text.splitlines()[0].startswith("path") and len(text.splitlines()) == 3
    assert "terminated" in (proc.stderr.read() if proc.stderr else "")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _fill_disk(monkeypatch, budget: int) -> None:
    """Every output write fails with ENOSPC after ``budget`` bytes (the one write primitive)."""
    from conftest import fill_disk_after

    fill_disk_after(monkeypatch, budget)


@pytest.mark.parametrize("where", ["output", "map"])
def test_a_full_disk_is_one_line_exit_1_and_no_half_file(photos, tmp_path, monkeypatch,
                                                         capsys, where):
    out, maps = tmp_path / "rows.json", tmp_path / "maps"
    out.write_text("[]\n")
    _fill_disk(monkeypatch, 0 if where == "map" else 100)  # the results' first write fails
    extra = ["--map", str(maps)] if where == "map" else []
    code = _main("score", str(photos), "--model", "random-tiny", "--no-progress",
                 "--format", "json", "-o", str(out), *extra)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "No space left on device (ENOSPC)" in err and "Traceback" not in err
    assert out.read_text() == "[]\n"  # the previous results, not half of the new ones
    made = [p for p in maps.rglob("*") if p.is_file()] if maps.exists() else []
    assert made == []  # no 0-byte map, no temporary file
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_in_eval_and_degrade(photos, tmp_path, monkeypatch, capsys):
    rated = tmp_path / "rated.csv"
    rated.write_text("path,score\n" + "".join(f"{p},{i}\n" for i, p in
                                               enumerate(sorted(photos.iterdir()))))
    _fill_disk(monkeypatch, 0)
    out = tmp_path / "scores.csv"
    code = _main("eval", "--dataset", str(rated), "--model", "random-tiny", "--no-progress",
                 "--bootstrap", "0", "-o", str(out))
    err = capsys.readouterr().err
    assert code == 1 and "scores.csv: No space left on device" in err, err
    assert not out.exists()
    target = tmp_path / "blurred.png"
    code = _main("degrade", str(photos / "a.jpg"), "--type", "gaussian_blur", "-o", str(target))
    err = capsys.readouterr().err
    assert code == 1 and "blurred.png: No space left on device (ENOSPC)" in err, err
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_map_name_too_long_is_that_inputs_error_only(tmp_path, capsys):
    """A 249-byte file name is a valid input; its map name (8 bytes more) is not a valid name."""
    src = tmp_path / "in"
    src.mkdir()
    long = src / ("x" * 245 + ".png")
    Image.fromarray(photo(80)).save(long)
    Image.fromarray(photo(81)).save(src / "short.png")
    out = tmp_path / "rows.json"
    code = _main("score", str(src), "--model", "random-tiny", "--no-progress",
                 "--format", "json", "-o", str(out), "--map", str(tmp_path / "maps"))
    assert code == 1 and "Traceback" not in capsys.readouterr().err
    rows = {Path(r["path"]).name: r for r in json.loads(out.read_text())}
    assert rows["short.png"]["error"] is None
    assert rows[long.name]["score"] is not None
    assert "File name too long" in rows[long.name]["error"]
    assert (tmp_path / "maps" / "short.png.map.png").is_file()


def test_outputs_in_a_globs_folder_are_refused_the_first_time(photos, tmp_path, capsys):
    pattern = str(photos / "*.jpg")
    assert _main("score", pattern, "--model", "random-tiny", "--no-progress",
                 "-o", str(photos / "x.jpg")) == 2
    assert not (photos / "x.jpg").exists()
    assert "would be read as an input" in capsys.readouterr().err
    png = str(photos / "*.png")
    Image.fromarray(photo(70)).save(photos / "c.png")
    assert _main("score", png, "--model", "random-tiny", "--no-progress",
                 "--map", str(photos)) == 2
    assert not list(photos.glob("*.map.*"))
    # Outputs the glob can never match are fine: a CSV beside the photos, maps in a sub-folder.
    assert _main("score", png, "--model", "random-tiny", "--no-progress", "--format", "csv",
                 "-o", str(photos / "rows.csv"), "--map", str(photos / "maps")) == 0
    assert _main("score", png, "--model", "random-tiny", "--no-progress", "--format", "csv",
                 "-o", str(photos / "rows.csv"), "--map", str(photos / "maps")) == 0


def test_a_real_full_disk_and_a_read_only_folder(photos, tmp_path, capsys):
    """The same on a real tmpfs (root on Linux only; skipped elsewhere with the reason)."""
    from conftest import tmpfs

    with tmpfs(tmp_path / "small", "size=16k") as small:
        out = small / "rows.json"
        code = _main("score", str(photos), "--model", "random-tiny", "--no-progress",
                     "--format", "json", "-o", str(out), "--map", str(small / "maps"))
        err = capsys.readouterr().err
        assert code == 1 and "No space left on device (ENOSPC)" in err, err
        assert "Traceback" not in err and not out.exists()
        # Maps finished before the disk filled stay; nothing else: no 0-byte or half map, no
        # temporary file.
        left = [p for p in small.rglob("*") if p.is_file()]
        assert all(p.name.endswith(".map.png") for p in left), left
        for p in left:
            with Image.open(p) as im:
                im.load()  # a complete PNG (a truncated one raises here)
    with tmpfs(tmp_path / "ro", "ro,size=16k") as ro:
        code = _main("score", str(photos), "--model", "random-tiny", "--no-progress",
                     "--format", "json", "-o", str(ro / "rows.json"))
        err = capsys.readouterr().err
        assert code == 1 and "Read-only file system (EROFS)" in err, err


# --- what a newcomer trips over --------------------------------------------------------------


@pytest.mark.slow
def test_output_format_follows_the_extension_unless_given(photos, tmp_path):
    base = ("score", str(photos), "--model", "random-tiny", "--no-progress")
    for suffix in ("csv", "json", "jsonl", "CSV"):
        out = tmp_path / f"s.{suffix}"
        assert _main(*base, "-o", str(out)) == 0
        text = out.read_text()
        if suffix.lower() == "csv":
            assert text.startswith("path,score,error,"), text
        elif suffix == "json":
            assert [Path(r["path"]).name for r in json.loads(text)] == ["a.jpg", "b.jpg"]
        else:
            assert [json.loads(line)["score"] > 0 for line in text.splitlines()] == [True] * 2
    explicit = tmp_path / "t.csv"
    assert _main(*base, "--format", "table", "-o", str(explicit)) == 0  # --format wins
    assert explicit.read_text().split()[:3] == ["path", "score", "error"]
    other = tmp_path / "s.txt"
    assert _main(*base, "-o", str(other)) == 0  # any other name: the table
    assert other.read_text().split()[:3] == ["path", "score", "error"]


def test_train_offline_says_where_the_weights_go_and_which_presets_need_none(
    photos, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")
    monkeypatch.setenv("QUALICLIP_HOME", str(tmp_path / "cache"))
    code = _main("train", "--pristine", str(photos), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress")
    assert code == 1
    err = capsys.readouterr().err
    assert "sha256: " in err and str(tmp_path / "cache" / "RN50.pt") in err, err
    assert "qualiclip models --add clip-rn50" in err
    assert "--preset tiny" in err  # the presets that need no download
    assert "OfflineError" not in err and "--verbose" not in err


def test_a_txt_input_is_a_list_of_paths_for_every_engine(photos, tmp_path):
    """One rule for `score`, `score --engine ray` and `train --pristine`: .txt/.lst is a list."""
    listing = photos / "list.txt"
    listing.write_text("# two photos, relative to this file\nb.jpg\n\na.jpg\n")
    out = tmp_path / "rows.json"
    assert _main("score", str(listing), "--model", "random-tiny", "--no-progress",
                 "-o", str(out)) == 0
    assert [Path(r["path"]).name for r in json.loads(out.read_text())] == ["b.jpg", "a.jpg"]


def test_output_in_a_missing_folder_is_a_one_line_usage_error(photos, tmp_path, capsys):
    target = tmp_path / "nodir" / "s.csv"
    assert _main("score", str(photos), "--model", "random-tiny", "-o", str(target)) == 2
    err = capsys.readouterr().err
    assert err == f"qualiclip score: error: -o {target}: no folder {target.parent}\n"


def test_csv_lines_end_in_lf(photos, tmp_path):
    out = tmp_path / "s.csv"
    assert _main("score", str(photos), "--model", "random-tiny", "--no-progress",
                 "-o", str(out)) == 0
    raw = out.read_bytes()
    assert raw.count(b"\n") == 3 and b"\r" not in raw


def test_main_gives_the_warning_format_back(tmp_path):
    """Warnings are one line while the command runs, Python's own format after it returns."""
    import warnings

    from qualiclip import cli

    before = warnings.formatwarning
    assert cli.main(["score", str(tmp_path), "--batch-size", "0"]) == 2
    assert warnings.formatwarning is before
