"""Ray Data scoring: equal to the local engine, a row for every input, resumable without rescoring.

One local Ray (2 CPUs) serves the whole module. Without Ray installed the Ray tests are skipped
(with the reason) outside CI and fail in CI, which installs the 'ray' extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb_batch_norms
from qualiclip import engine, ray_scoring
from qualiclip.cli import main
from qualiclip.model import create_model

ATOL = 1e-5
# Ray Data's own use of its deprecated settings, not ours.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"), pytest.mark.slow]


def _require_ray():
    try:
        return ray_scoring.require_ray()
    except ImportError as exc:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI installs the 'ray' extra, but: {exc}", pytrace=False)
        pytest.skip(f"Ray is not installed: {exc}")


@pytest.fixture(scope="module")
def ray_local():
    ray = _require_ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random tiny model with random batch-norm statistics, so scores differ by image."""
    model = create_model("random-tiny")
    perturb_batch_norms(model, seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.official_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """30 inputs: 26 images of four sizes (PNG and JPEG) and 4 bad files."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(64, 96), (96, 64), (80, 80), (72, 100)]
    paths = []
    for i in range(26):
        h, w = sizes[i % 4]
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        path = folder / f"img{i:02d}.{'jpg' if i % 3 else 'png'}"
        image.save(path)
        paths.append(path)
    whole = (folder / "img01.jpg").read_bytes()
    bad = {
        "truncated.jpg": whole[: len(whole) // 2],
        "not_an_image.jpg": b"hello, I am text",
        "empty.png": b"",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    Image.new("RGB", (20, 50)).save(folder / "too_small.png")
    paths.append(folder / "too_small.png")
    return [os.path.abspath(p) for p in paths]


def _config(checkpoint: Path, **kwargs: object) -> ray_scoring.RayScoreConfig:
    base: dict = dict(model=str(checkpoint), device="cpu", batch_size=4, rows_per_part=8,
                      progress=False)
    return ray_scoring.RayScoreConfig(**{**base, **kwargs})


def _local(checkpoint: Path, paths: list[str]) -> dict[str, engine.ScoreResult]:
    model = create_model(str(checkpoint))
    return {r.path: r for r in engine.score_paths(model, paths, batch_size=4)}


def test_equals_local_engine_and_every_input_has_a_row(
    ray_local: object, checkpoint: Path, inputs: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "results"
    summary = ray_scoring.score_to_folder(inputs, out, _config(checkpoint))
    assert (summary.inputs, summary.already_done, summary.scored, summary.failed) == (30, 0, 26, 4)
    assert summary.describe() == "30 inputs: 26 scored, 4 failed, 0 already done"
    rows = ray_scoring.read_results(out).to_pylist()
    assert Counter(r["path"] for r in rows) == Counter(inputs)  # each input exactly once
    local = _local(checkpoint, inputs)
    sha = create_model(str(checkpoint)).weights_sha256
    for row in rows:
        expected = local[row["path"]]
        assert row["model"] == str(checkpoint) and row["weights_sha256"] == sha
        assert row["precision"] == "fp32"
        if expected.error is not None:
            assert row["score"] is None and row["error"], row
            continue
        assert row["error"] is None, row
        assert abs(row["score"] - expected.score) <= ATOL, row["path"]
        assert (row["width"], row["height"]) == (expected.width, expected.height)
    scores = [r["score"] for r in rows if r["score"] is not None]
    assert max(scores) - min(scores) > 100 * ATOL  # the comparison can tell images apart
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert "truncated" in errors["truncated.jpg"] and "too small" in errors["too_small.png"]
    assert not list(out.glob(".*.tmp"))


class _Interrupted(Exception):
    pass


def test_interrupted_run_resumes_scoring_each_image_once(
    ray_local: object, checkpoint: Path, inputs: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "results"
    config = _config(checkpoint, rows_per_part=5)

    def stop_after_first_part(part: Path, rows: int) -> None:
        raise _Interrupted(part)

    # An interruption after the first part file: that part stays, nothing half-written does.
    with pytest.raises(_Interrupted):
        ray_scoring.score_to_folder(inputs, out, config, on_part=stop_after_first_part)
    first_parts = ray_scoring.part_files(out, "parquet")
    assert len(first_parts) == 1 and not list(out.glob(".*.tmp"))
    first_bytes = first_parts[0].read_bytes()
    first_paths = set(ray_scoring.read_results(out).column("path").to_pylist())
    assert len(first_paths) == 5

    resumed = ray_scoring.score_to_folder(inputs, out, config)
    assert (resumed.already_done, resumed.scored + resumed.failed) == (5, 25)
    new_paths = [
        p for part in resumed.parts
        for p in ray_scoring._read_part(part, "parquet", ("path",)).column("path").to_pylist()
    ]
    assert not first_paths & set(new_paths)  # nothing scored before was computed again
    assert first_parts[0].read_bytes() == first_bytes  # finished parts are left alone
    rows = ray_scoring.read_results(out).to_pylist()
    assert Counter(r["path"] for r in rows) == Counter(inputs)

    again = ray_scoring.score_to_folder(inputs, out, config)
    assert (again.already_done, again.scored, again.failed, again.parts) == (30, 0, 0, ())
    assert again.failed_earlier == 4 and not again.ok  # the error rows are still there


def test_cli_engine_ray_writes_csv_parts(
    ray_local: object, checkpoint: Path, inputs: list[str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "scores.csv"
    list_file = tmp_path / "list.txt"
    list_file.write_text("\n".join(inputs[:10]) + "\n", encoding="utf-8")
    argv = ["score", "--engine", "ray", "--model", str(checkpoint), "--device", "cpu",
            "--output", str(out), "--no-progress", "--batch-size", "4", str(list_file)]
    assert main(argv) == 0  # the first ten inputs are good images
    assert "10 inputs: 10 scored, 0 failed, 0 already done" in capsys.readouterr().err
    table = ray_scoring.read_results(out, "csv")
    local = _local(checkpoint, inputs[:10])
    got = dict(zip(table.column("path").to_pylist(), table.column("score").to_pylist(),
                   strict=True))
    assert sorted(got) == sorted(inputs[:10])
    for path, score in got.items():
        assert abs(score - local[path].score) <= ATOL
    # A second run over all inputs adds only the other 20 (4 of which fail: exit status 1).
    assert main([*argv[:-1], *inputs]) == 1
    assert "30 inputs: 16 scored, 4 failed, 10 already done" in capsys.readouterr().err
    assert ray_scoring.read_results(out, "csv").num_rows == 30
    # Nothing left to do, but the output holds error rows for these inputs: still exit 1.
    assert main([*argv[:-1], *inputs]) == 1
    err = capsys.readouterr().err
    assert "30 inputs: 0 scored, 0 failed, 30 already done (4 of them failed)" in err
    assert main(argv) == 0  # the first ten have scores


def test_names_that_are_not_utf8_get_rows(
    ray_local: object, checkpoint: Path, inputs: list[str], tmp_path: Path
) -> None:
    """A file name with bytes that are not UTF-8 is scored and written as \\xNN text."""
    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: undecodable as UTF-8
    Image.open(inputs[0]).save(os.path.join(os.fsencode(folder), b"caf\xe9.png"))
    out = tmp_path / "results"
    summary = ray_scoring.score_to_folder([str(folder)], out, _config(checkpoint))
    assert (summary.scored, summary.failed) == (1, 0)
    (row,) = ray_scoring.read_results(out).to_pylist()
    # A corrupt file with such a name: its error (which names it) is a row, not a dead job.
    bad = tmp_path / "odd-bad"
    bad.mkdir()
    with open(os.path.join(os.fsencode(bad), b"bad\xff.jpg"), "wb") as f:
        f.write(b"not an image at all")
    bad_out = tmp_path / "bad-results"
    failed = ray_scoring.score_to_folder([str(bad)], bad_out, _config(checkpoint))
    assert (failed.scored, failed.failed) == (0, 1)
    (bad_row,) = ray_scoring.read_results(bad_out).to_pylist()
    assert bad_row["path"].endswith("bad\\xff.jpg") and "bad\\xff.jpg" in bad_row["error"]
    assert row["path"] == str(folder / "caf\\xe9.png") and row["score"] is not None
    assert ray_scoring.display_path(str(folder / name)) == row["path"]
    again = ray_scoring.score_to_folder([str(folder)], out, _config(checkpoint))
    assert (again.already_done, again.scored) == (1, 0)  # found again under the same text


def test_ray_output_is_quiet_unless_verbose(
    checkpoint: Path, inputs: list[str], tmp_path: Path
) -> None:
    """A fresh process: Ray's own start-up and worker lines stay off the terminal by default."""
    _require_ray()
    argv = [sys.executable, "-m", "qualiclip.cli", "score", "--engine", "ray", "--model",
            str(checkpoint), "--device", "cpu", "--no-progress", "-o", str(tmp_path / "o"),
            *inputs[:3]]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_NUM_CPUS": "1"})
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == [ln for ln in lines if ln.startswith("qualiclip score:")], lines


def test_refuses_to_mix_models_or_formats(checkpoint: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    _require_ray()
    row = {"path": ["/x.png"], "score": [0.5], "error": [None], "width": [64], "height": [64],
           "model": ["random-tiny"], "weights_sha256": [None], "precision": ["fp32"]}
    table = pa.Table.from_pydict(row, schema=ray_scoring._schema())
    ray_scoring._write_part(table, tmp_path, "part-a-00000.parquet", "parquet")
    tiny = ray_scoring.RayScoreConfig(model="random-tiny")
    assert ray_scoring.scored_paths(tmp_path, tiny) == {"/x.png"}
    with pytest.raises(ValueError, match="holds scores of model random-tiny"):
        ray_scoring.scored_paths(tmp_path, ray_scoring.RayScoreConfig(model=str(checkpoint)))
    with pytest.raises(ValueError, match="parquet parts"):
        ray_scoring.scored_paths(
            tmp_path, ray_scoring.RayScoreConfig(model="random-tiny", output_format="csv")
        )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        ray_scoring.RayScoreConfig(concurrency=0)
    with pytest.raises(ValueError, match="output_format"):
        ray_scoring.RayScoreConfig(output_format="json")  # type: ignore[arg-type]


def test_without_ray_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes 'import ray' fail
    with pytest.raises(ImportError, match=r"pip install 'qualiclip\[ray\]'"):
        ray_scoring.require_ray()
    assert main(["score", "--engine", "ray", "-o", "out", "x.png"]) == 2


def test_importing_qualiclip_does_not_import_ray() -> None:
    code = (
        "import sys, qualiclip, qualiclip.cli, qualiclip.ray_scoring; "
        "sys.exit('ray' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_quiet_ray_core_filters_core_lines_and_passes_the_rest(tmp_path: Path) -> None:
    """Lines with the C++ core's prefix are dropped; others and progress updates pass, in order."""
    script = tmp_path / "s.py"
    script.write_text(
        "import os, sys\n"
        "from qualiclip.ray_scoring import quiet_ray_core\n"
        "with quiet_ray_core():\n"
        "    os.write(2, b'[2026-01-01 12:00:00,000 E 12 34] core_worker.cc:2465: noise\\n')\n"
        "    os.write(2, b'kept line\\n')\n"
        "    os.write(2, b'progress 10%\\r')\n"
        "    os.write(2, b'progress 20%\\r')\n"
        "    os.write(2, b'[2026-01-01 12:00:00,000 I 1 1] logging.cc:1: more noise\\n')\n"
        "    os.write(2, b'tail without newline')\n"
        "sys.stderr.write('after\\n')\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == b"kept line\nprogress 10%\rprogress 20%\rtail without newlineafter\n"


def test_quiet_ray_core_survives_a_closed_stderr(tmp_path: Path) -> None:
    """With stderr a closed pipe, the filter keeps draining: no hang, no traceback."""
    script = tmp_path / "s.py"
    script.write_text(
        "import os\n"
        "from qualiclip.ray_scoring import quiet_ray_core\n"
        "with quiet_ray_core():\n"
        "    for _ in range(2000):\n"
        "        os.write(2, b'x' * 100 + b'\\n')\n"
        "print('done')\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    proc.stderr.close()  # the reader of stderr is gone
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == b"done"


# --- foreign files, full disks, SIGTERM (hostile input, round 3) --------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_foreign_part_file_is_a_clean_usage_error(tmp_path: Path, capsys, fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    _require_ray()
    foreign = pa.table({"name": ["x.png"], "value": [1.0]})
    part = tmp_path / f"part-0001.{fmt}"
    if fmt == "csv":
        pcsv.write_csv(foreign, part)
    else:
        pq.write_table(foreign, part)
    config = ray_scoring.RayScoreConfig(model="random-tiny", output_format=fmt)
    with pytest.raises(ValueError, match=rf"part-0001\.{fmt} is not a qualiclip part file"):
        ray_scoring.scored_paths(tmp_path, config)
    code = main(["score", str(tmp_path), "--engine", "ray", "--model", "random-tiny",
                 "--format", fmt, "-o", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a qualiclip part file" in err and "Traceback" not in err


def test_a_full_disk_while_writing_parts_is_one_line(
    ray_local, checkpoint: Path, inputs: list[str], tmp_path: Path, monkeypatch, capsys
) -> None:
    from conftest import fill_disk_after

    fill_disk_after(monkeypatch, 0)
    out = tmp_path / "parts"
    code = main(["score", *inputs[:4], "--engine", "ray", "--model", str(checkpoint),
                 "--device", "cpu", "--format", "csv", "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device (ENOSPC)" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == []  # no part, no temporary file


def test_ray_init_keeps_the_sigterm_rule(monkeypatch) -> None:
    """``ray.init`` installs its own SIGTERM handler (exit 15 at once); ours stays in force."""
    import signal
    import types

    from qualiclip import stopping

    def init(**_: object) -> None:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    monkeypatch.setattr(ray_scoring, "require_ray", lambda: fake)
    with stopping.terminate_as_interrupt():
        ours = signal.getsignal(signal.SIGTERM)
        assert ray_scoring.init_ray(None) is True
        assert signal.getsignal(signal.SIGTERM) is ours


def test_refusal_of_another_model_never_prints_none(checkpoint: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    _require_ray()
    row = {"path": ["/x.png"], "score": [0.5], "error": [None], "width": [64], "height": [64],
           "model": ["random-tiny"], "weights_sha256": [None], "precision": ["fp32"]}
    table = pa.Table.from_pydict(row, schema=ray_scoring._schema())
    ray_scoring._write_part(table, tmp_path, "part-a-00000.parquet", "parquet")
    with pytest.raises(ValueError) as refused:
        ray_scoring.scored_paths(tmp_path, ray_scoring.RayScoreConfig(model=str(checkpoint)))
    message = str(refused.value)
    assert "None" not in message and "random-tiny (random weights)" in message, message
    sha = create_model(str(checkpoint)).weights_sha256
    assert f"(sha256 {sha})" in message
