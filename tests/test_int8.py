"""int8 and auto: every precision's code runs on every CPU kind, refusals are one line, fidelity.

The CPU probes (:mod:`qualiclip.precision`'s flags, PyTorch's dispatch level, native bf16) are
replaced to play three machines: AVX2 only (this project's AMD EPYC), AVX-512 with VNNI, and
AMX (Sapphire Rapids). The code each would run then runs here: int8's calibration with 7-bit or
8-bit weights, auto's order, bf16 through oneDNN where this CPU's oneDNN has bf16 kernels and
through PyTorch's convolution elsewhere. Fidelity is checked on the golden tiny checkpoint over
200 photos of BIQ2021 (its own budget is for trained models; docs/precision.md).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb_batch_norms, require_shared
from qualiclip import cli, engine, fused, images, metrics, precision, quantize
from qualiclip.model import QualiCLIP, create_model

pytestmark = pytest.mark.slow  # among the heaviest: `scripts/test.sh --fast` leaves it out

pytest.importorskip("onnxruntime", reason="int8 needs the 'onnx' extra")
pytest.importorskip("onnx", reason="int8 needs the 'onnx' extra")

#: The probes of three kinds of CPU: flags as Linux lists them, PyTorch's level, native bf16.
CPU_KINDS: dict[str, tuple[frozenset[str], str, bool]] = {
    "avx2": (frozenset({"sse4_2", "avx", "avx2", "fma"}), "AVX2", False),
    "avx512-vnni": (frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
                    "AVX512", False),
    "amx": (frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
                       "amx_bf16", "amx_int8"}), "AVX512", True),
}


def _play(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    flags, capability, bf16 = CPU_KINDS[kind]
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "_torch_capability", lambda: capability)
    # (engine imported native_bf16 by name for its warning; precision's own use is auto's.)
    monkeypatch.setattr(precision, "native_bf16", lambda device: bf16 and device.type == "cpu")
    monkeypatch.setattr(engine, "native_bf16", lambda device: bf16 and device.type == "cpu")


@pytest.fixture(scope="session")
def int8_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session, so each (model, weight bits) is calibrated once."""
    return tmp_path_factory.mktemp("qualiclip-home")


@pytest.fixture()
def home(int8_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QUALICLIP_HOME", str(int8_home))
    return int8_home


@pytest.fixture(scope="module")
def tiny() -> QualiCLIP:
    return perturb_batch_norms(create_model("random-tiny"), seed=3).eval()  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def _fresh(tiny: QualiCLIP) -> None:
    engine._PREPARED.pop(tiny, None)  # each test prepares under its own probes
    engine._ANNOUNCED.clear()


def _batch(seed: int = 6) -> torch.Tensor:
    return torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(seed))


# --- probes -------------------------------------------------------------------------------------


def test_cpu_flags_are_read_from_the_kernel() -> None:
    flags = precision.cpu_flags()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        assert flags == frozenset()
        return
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() in
                 ("flags", "Features")), None)
    assert flags == (frozenset(line.split(":", 1)[1].split()) if line else frozenset())


@pytest.mark.parametrize(("kind", "int8", "bits"), [("avx2", "avx2", 7),
                                                    ("avx512-vnni", "vnni", 8), ("amx", "amx", 8)])
def test_int8_kind_of_each_cpu(kind: str, int8: str, bits: int,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    _play(monkeypatch, kind)
    assert precision.cpu_int8_kind() == int8
    assert precision.int8_unavailable("cpu") is None
    assert f"int8 by {int8}" in precision.describe_cpu()


def test_cpu_without_integer_dot_products_refuses_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"sse2", "avx"}))
    monkeypatch.setattr(precision, "_torch_capability", lambda: "DEFAULT")
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    assert precision.cpu_int8_kind() is None
    with pytest.raises(precision.PrecisionError, match="integer dot products"):
        precision.check_precision("cpu", "int8")
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    assert precision.cpu_int8_kind() == "arm"


def test_int8_needs_a_cpu_and_the_onnx_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(precision.PrecisionError, match="CPUs only"):
        precision.check_precision("cuda", "int8")
    real = precision.importlib.util.find_spec
    monkeypatch.setattr(precision.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else real(name))
    with pytest.raises(precision.PrecisionError, match=r"pip install 'qualiclip\[onnx\]'"):
        precision.check_precision("cpu", "int8")
    assert precision.auto_candidates("cpu")[0] != "int8"


@pytest.mark.parametrize(("kind", "order"), [
    ("avx2", ("int8", "fp32")),
    ("avx512-vnni", ("int8", "fp32")),
    ("amx", ("bf16", "int8", "fp32")),  # measured bf16 first where AMX has it
])
def test_auto_tries_the_native_precisions_fastest_first(
    kind: str, order: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _play(monkeypatch, kind)
    assert precision.auto_candidates("cpu") == order
    assert precision.auto_candidates("cuda") == ("fp32",)
    flags, capability, _ = CPU_KINDS[kind]
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # AVX512-BF16, no AMX
    if "amx_int8" not in flags:
        assert precision.auto_candidates("cpu") == ("int8", "bf16", "fp32")


# --- every precision's path, on every kind ------------------------------------------------------


@pytest.mark.parametrize("kind", list(CPU_KINDS))
@pytest.mark.parametrize("chosen", ["fp32", "bf16", "int8", "auto"])
def test_each_precision_runs_its_path_on_each_cpu_kind(
    kind: str, chosen: str, tiny: QualiCLIP, home: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _play(monkeypatch, kind)
    x = _batch()
    fp32 = engine.score_tensors(tiny, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # emulated bf16
        got = engine.score_tensors(tiny, x, chosen)
    runner = engine.prepare(tiny, chosen)
    expected = chosen
    if chosen == "auto":  # AMX: bf16 first; elsewhere int8 where its check met the budget
        holds = kind != "amx" and quantize.int8_report(tiny).holds
        expected = "bf16" if kind == "amx" else "int8" if holds else "fp32"
    assert runner.precision == expected
    if expected == "int8":
        assert isinstance(runner.visual, quantize.Int8Tower)
        bits = quantize.int8_report(tiny).weight_bits
        assert bits == (7 if kind == "avx2" else 8)
    else:
        assert isinstance(runner.visual, fused.FusedResNet)
        assert runner.visual.dtype == precision.compute_dtype(expected)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fp32, atol=3e-2, rtol=0)
    err = capsys.readouterr().err
    if chosen == "auto":
        (line,) = [ln for ln in err.splitlines() if "precision auto" in ln]
        assert f"precision auto -> {expected}" in line and "CPU (" in line


def test_auto_takes_int8_when_its_fidelity_holds(
    tiny: QualiCLIP, home: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _play(monkeypatch, "avx2")
    report = quantize.int8_report(tiny)
    monkeypatch.setattr(quantize, "FIDELITY_MIN_SPEARMAN", report.spearman - 1e-6)
    assert engine.resolve_precision(tiny, "auto") == "int8"
    assert engine.resolve_precision(tiny, "auto") == "int8"
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "precision auto" in ln]
    assert len(lines) == 1 and "int8 met: Spearman" in lines[0]  # printed once


def test_int8_dense_maps_read_the_quantised_feature_map(tiny: QualiCLIP, home: Path) -> None:
    from qualiclip.maps import quality_map

    pixels = (_batch()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    qmap = quality_map(tiny, pixels, "dense", precision="int8")
    fp32 = quality_map(tiny, pixels, "dense")
    assert qmap.values.shape == fp32.values.shape == (3, 4)
    assert abs(qmap.score - fp32.score) < 3e-2 and np.abs(qmap.values - fp32.values).max() < 5e-2


# --- the cache ----------------------------------------------------------------------------------


def test_calibration_is_cached_by_the_weights(
    tiny: QualiCLIP, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _play(monkeypatch, "avx2")
    first = quantize.int8_report(tiny)
    folder = home / "int8"
    assert first.path.parent == folder and first.path.is_file()
    assert first.key in first.path.name and tiny.weights_sha256 is None  # keyed by the tensors
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left
    record = json.loads((folder / f"{first.key}.json").read_text())
    assert record["spearman"] == first.spearman and record["calibration_images"] == 24

    def refuse(*args: object) -> None:
        raise AssertionError("calibrated again although cached")

    monkeypatch.setattr(quantize, "_calibrate", refuse)
    assert quantize.int8_report(tiny) == first
    other = perturb_batch_norms(create_model("random-tiny"), seed=4).eval()
    with pytest.raises(AssertionError, match="calibrated again"):
        quantize.int8_report(other)  # other weights, another key


def test_calibration_and_check_images_are_fixed_and_apart() -> None:
    cal, check = quantize.calibration_images(), quantize.check_images()
    assert (len(cal), len(check)) == (24, 40)
    assert all(a.dtype == np.uint8 and a.ndim == 3 and min(a.shape[:2]) >= 64 for a in cal + check)
    again = quantize.calibration_images()
    assert all(np.array_equal(a, b) for a, b in zip(cal, again, strict=True))
    assert not any(a.shape == b.shape and np.array_equal(a, b) for a in cal for b in check)


# --- refusals: exit 2, one line -----------------------------------------------------------------


@pytest.fixture()
def one_photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    return tmp_path / "a.png"


def _one_line_usage_error(status: int, err: str, text: str) -> None:
    assert status == cli.EXIT_USAGE
    assert text in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", ["score", "eval", "serve"])
def test_int8_without_onnxruntime_is_a_usage_error(
    command: str, one_photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = precision.importlib.util.find_spec
    monkeypatch.setattr(precision.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else real(name))
    args = {
        "score": ["score", str(one_photo)],
        "eval": ["eval", "--dataset", "synthetic", "--root", str(tmp_path), "--bootstrap", "0"],
        "serve": ["serve", "--port", "0"],
    }[command]
    status = cli.main([*args, "--model", "random-tiny", "--device", "cpu", "--precision", "int8"])
    _one_line_usage_error(status, capsys.readouterr().err, "int8 needs onnxruntime")


def test_int8_of_a_vit_tower_is_a_usage_error(
    one_photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vit = require_shared("golden") / "clip_tiny_vit.pt"
    status = cli.main(["score", str(one_photo), "--model", str(vit), "--precision", "int8"])
    _one_line_usage_error(status, capsys.readouterr().err, "int8 quantises CLIP ResNet")


def test_int8_with_compile_is_a_usage_error(
    one_photo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status = cli.main(["score", str(one_photo), "--model", "random-tiny", "--precision", "int8",
                       "--compile"])
    _one_line_usage_error(status, capsys.readouterr().err, "--compile applies to fp32")
    _play(monkeypatch, "avx2")  # auto with --compile stays with the float precisions
    model = create_model("random-tiny")
    assert engine.resolve_precision(model, "auto", compile=True) == "fp32"
    assert "int8 passed over: --compile" in capsys.readouterr().err


def test_ray_int8_on_gpu_actors_is_a_usage_error(
    one_photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["score", "--engine", "ray", "-o", str(tmp_path / "out"), str(one_photo),
                       "--model", "random-tiny", "--precision", "int8",
                       "--num-gpus-per-actor", "1"])
    _one_line_usage_error(status, capsys.readouterr().err, "int8 runs on CPUs only")


# --- rows name the precision --------------------------------------------------------------------


@pytest.mark.parametrize(("asked", "named"), [("fp32", "fp32"), ("int8", "int8")])
def test_score_rows_name_the_precision(
    asked: str, named: str, one_photo: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["score", str(one_photo), "--model", "random-tiny", "--precision", asked,
                       "--format", "csv", "--no-progress"])
    out = capsys.readouterr().out
    assert status == cli.EXIT_OK
    (row,) = list(csv.DictReader(out.splitlines()))
    assert row["precision"] == named and float(row["score"]) >= 0


def test_auto_rows_name_what_auto_chose(
    one_photo: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["score", str(one_photo), "--model", "random-tiny", "--precision", "auto",
                       "--format", "jsonl", "--no-progress"])
    captured = capsys.readouterr()
    assert status == cli.EXIT_OK
    (row,) = [json.loads(line) for line in captured.out.splitlines()]
    chose = [ln for ln in captured.err.splitlines() if "precision auto ->" in ln]
    assert len(chose) == 1 and f"-> {row['precision']} " in chose[0]
    assert row["precision"] in precision.PRECISIONS


# --- fidelity on the golden checkpoint ----------------------------------------------------------


def test_int8_and_bf16_follow_fp32_on_200_photos(home: Path) -> None:
    """Spearman of int8 and of bf16 scores against fp32 over 200 BIQ2021 photos: >= 0.995.

    The golden checkpoint's weights are random (its SRCC against people is about 0.05), so only
    agreement with fp32 is asked of it here; docs/precision.md has the trained-model figures.
    """
    shared = require_shared("data/biq2021-test")
    golden = require_shared("golden") / "qualiclip_tiny_official_format.pth"
    model = create_model(str(golden)).eval()
    with open(shared / "mos.csv", newline="", encoding="utf-8") as f:
        names = [row["Image Name"] for row in csv.DictReader(f)][:200]
    paths = [str(shared / "images" / name) for name in names]
    scores = {}
    for p in ("fp32", "int8", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rows = list(engine.score_paths(model, paths, precision=p, batch_size=8))
        assert all(r.ok for r in rows)
        scores[p] = np.array([r.score for r in rows])
    assert np.ptp(scores["fp32"]) > 0.05  # the photos are told apart
    for p in ("int8", "bf16"):
        assert metrics.srcc(scores[p], scores["fp32"]) >= quantize.FIDELITY_MIN_SPEARMAN, p
        assert np.abs(scores[p] - scores["fp32"]).max() < 0.05, p


def test_int8_input_pixels_round_trip(tiny: QualiCLIP, home: Path) -> None:
    """Integer pixels through :func:`qualiclip.score` take the same int8 path as tensors."""
    pixels = (_batch()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    from_array = engine.score(tiny, pixels, precision="int8")
    from_tensor = engine.score_tensors(tiny, images.pixels_to_tensor([pixels]), "int8")
    assert isinstance(from_array, float)
    assert abs(from_array - float(from_tensor[0])) < 1e-6
