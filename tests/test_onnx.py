"""The scorer exported as one ONNX graph, scored with ONNX Runtime, against the engine.

Needs the 'onnx' extra (onnx, onnxruntime): skipped with the reason where it is missing, a
failure in CI (which installs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb_batch_norms

if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
    import onnx
    import onnxruntime as ort
else:
    onnx = pytest.importorskip("onnx", reason="needs the 'onnx' extra: pip install onnx")
    ort = pytest.importorskip(
        "onnxruntime", reason="needs the 'onnx' extra: pip install onnxruntime"
    )

import qualiclip
from qualiclip import cli, engine
from qualiclip.model import Scorer, create_model
from qualiclip.onnx_export import DEFAULT_OPSET, OPSETS, export_onnx
from qualiclip.onnx_scorer import OnnxScorer
from qualiclip.precision import PrecisionError

ATOL = 1e-4  # ONNX Runtime against the engine's fp32 scores
#: Heights x widths: square, wide, tall (none a multiple of another's grid).
SIZES = [(64, 64), (64, 160), (128, 96)]


def pixels(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random uint8 RGB."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def tiny_file(golden_dir: Path) -> Path:
    return golden_dir / "qualiclip_tiny_official_format.pth"


@pytest.fixture(scope="module")
def tiny(tiny_file: Path) -> qualiclip.QualiCLIP:
    return create_model(tiny_file)


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    result = export_onnx(tiny, path, formula="official")
    assert result.max_abs_diff is not None and result.max_abs_diff <= ATOL
    return path


@pytest.fixture(scope="module")
def rn50() -> qualiclip.QualiCLIP:
    """RN50-sized, random, with one prompt pair that tells random images apart.

    A random tower's features point almost the same way for every image, so random prompts
    give near-equal scores; the pair (d, -d), with d the difference of two images' features,
    turns the small differences between images into different scores.
    """
    model = perturb_batch_norms(create_model("random-rn50"))
    with torch.no_grad():
        features = model.image_features(pixels((2, 3, 64, 64), seed=99).float() / 255.0)
    d = torch.nn.functional.normalize(features[0] - features[1], dim=0)
    model.prompt_features = torch.stack([d, -d])[None]
    return model


@pytest.fixture(scope="module")
def rn50_onnx(rn50, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "rn50.onnx"
    export_onnx(rn50, path, check=False)  # compared below
    return path


# --- scores --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "rn50"])
@pytest.mark.slow
def test_scores_equal_the_engine_at_three_sizes_in_batches(which, request):
    model = request.getfixturevalue(which)
    scorer = create_model(request.getfixturevalue(f"{which}_onnx"))
    assert isinstance(scorer, OnnxScorer)
    spread = []
    for i, (h, w) in enumerate(SIZES):
        batch = pixels((3, 3, h, w), seed=i).float() / 255.0
        expected = engine.score_tensors(model, batch)
        got = engine.score_tensors(scorer, batch)
        assert got.shape == (3,) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        spread.append(float(expected.max() - expected.min()))
    assert max(spread) > 10 * ATOL  # the scores really differ, so equality says something


def test_uint8_pixels_go_straight_into_the_graph(tiny, tiny_onnx):
    batch = pixels((2, 3, 96, 128), seed=7)
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "images" and graph_input.type == "tensor(uint8)"
    got = session.run(["scores"], {"images": batch.numpy()})[0]
    expected = engine.score_tensors(tiny, batch.float() / 255.0)
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL, rtol=0)
    # The scorer module takes uint8 tensors as they are.
    torch.testing.assert_close(OnnxScorer(tiny_onnx)(batch), expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_float_input_graph(tiny, tmp_path):
    path = tmp_path / "float.onnx"
    export_onnx(tiny, path, input_kind="float32")
    batch = torch.rand(2, 3, 64, 96)  # not multiples of 1/255: no rounding on the way in
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    got = session.run(["scores"], {"images": batch.numpy()})[0]
    np.testing.assert_allclose(got, engine.score_tensors(tiny, batch).numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling", ["interpolate", "original"])
@pytest.mark.slow
def test_other_pooling_modes(tiny_file, tmp_path, pooling):
    model = create_model(tiny_file, pooling=pooling)
    path = tmp_path / f"{pooling}.onnx"
    export_onnx(model, path)
    scorer = create_model(path, pooling=pooling)
    sizes = SIZES[1:] if pooling == "interpolate" else [(224, 224)]  # 'original' fixes the size
    for h, w in sizes:
        batch = pixels((2, 3, h, w), seed=h).float() / 255.0
        torch.testing.assert_close(
            engine.score_tensors(scorer, batch), engine.score_tensors(model, batch),
            atol=ATOL, rtol=0,
        )


@pytest.mark.slow
def test_pyiqa_formula_is_exported_and_asked_for(tiny_file, tmp_path):
    model = create_model(tiny_file, formula="pyiqa")
    path = tmp_path / "pyiqa.onnx"
    export_onnx(model, path, formula="pyiqa")
    scorer = create_model(path, formula="pyiqa")
    assert scorer.logit_scale == pytest.approx(model.logit_scale)
    batch = pixels((2, 3, 64, 96), seed=3).float() / 255.0
    torch.testing.assert_close(
        engine.score_tensors(scorer, batch), engine.score_tensors(model, batch), atol=ATOL, rtol=0
    )
    assert create_model(path).formula == "pyiqa"  # the graph's own formula, unless asked
    with pytest.raises(ValueError, match="exported with formula 'pyiqa'"):
        create_model(path, formula="official")


def test_python_api_scores_a_file_and_a_tensor(tiny, tiny_onnx, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(pixels((80, 112, 3), seed=4).numpy()).save(image)
    scorer = create_model(tiny_onnx)
    assert qualiclip.score(scorer, image) == pytest.approx(qualiclip.score(tiny, image), abs=ATOL)
    x = torch.rand(3, 64, 64)
    assert qualiclip.score(scorer, x) == pytest.approx(qualiclip.score(tiny, x), abs=1e-2)


# --- the graph -----------------------------------------------------------------------------------


def test_batch_height_and_width_are_symbolic(tiny_onnx):
    graph = onnx.load(str(tiny_onnx)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim] == ["batch"]


def test_pooling_has_no_token_by_token_attention(tiny_onnx, tmp_path):
    """Every intermediate tensor of a 2 x 11 grid (23 tokens): none is N x N."""
    proto = onnx.load(str(tiny_onnx))
    known = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for name in node.output:
            if name and name not in known:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                known.add(name)
    path = tmp_path / "all_outputs.onnx"
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens = 2 * 11 + 1
    outputs = session.run(None, {"images": pixels((1, 3, 64, 352), seed=5).numpy()})
    shapes = [np.shape(o) for o in outputs]
    assert any(tokens in s for s in shapes)  # the tokens are seen...
    assert not [s for s in shapes if list(s).count(tokens) > 1]  # ...never against each other


def test_metadata_says_what_was_exported(tiny_file, tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["qualiclip.weights_sha256"] == hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    assert meta["qualiclip.name"] == create_model(tiny_file).name
    assert meta["qualiclip.formula"] == "official"
    assert float(meta["qualiclip.logit_scale"]) == 100.0
    assert meta["qualiclip.input"] == "uint8" and meta["qualiclip.dtype"] == "fp32"
    assert meta["qualiclip.pooling"] == "none" and meta["qualiclip.min_size"] == "32"
    assert meta["qualiclip.version"] == qualiclip.__version__
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [
        DEFAULT_OPSET
    ]
    scorer = OnnxScorer(tiny_onnx)
    assert (scorer.name, scorer.weights_sha256, scorer.min_size) == (
        meta["qualiclip.name"], meta["qualiclip.weights_sha256"], 32
    )
    assert scorer.device == torch.device("cpu")


@pytest.mark.parametrize("opset", [OPSETS[0], OPSETS[-1]])
@pytest.mark.slow
def test_lowest_and_highest_opset(tiny, tmp_path, opset):
    result = export_onnx(tiny, tmp_path / "g.onnx", opset=opset)  # checked at another size
    assert result.max_abs_diff is not None and result.max_abs_diff <= ATOL
    proto = onnx.load(str(result.path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]


@pytest.mark.slow
def test_fp16_export_has_half_weights_and_close_scores(tiny, tmp_path):
    path = tmp_path / "half.onnx"
    result = export_onnx(tiny, path, fp16=True)
    proto = onnx.load(str(path))
    kernels = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    kinds = {i.data_type for i in proto.graph.initializer if i.name in kernels}
    assert kernels and kinds == {onnx.TensorProto.FLOAT16}  # every convolution kernel
    assert result.metadata["qualiclip.dtype"] == "fp16"
    assert result.size_bytes < 0.6 * export_onnx(tiny, tmp_path / "full.onnx").size_bytes
    # This CPU provider runs fp16 kernels: compare with the fp32 model (half rounding).
    batch = pixels((2, 3, 64, 96), seed=6).float() / 255.0
    torch.testing.assert_close(
        engine.score_tensors(OnnxScorer(path), batch), engine.score_tensors(tiny, batch),
        atol=1e-2, rtol=0,
    )


@pytest.mark.filterwarnings("ignore:bf16 is emulated")
def test_bf16_under_autocast_is_refused(tiny_onnx):
    with pytest.raises(PrecisionError, match="ONNX"):
        engine.score_tensors(create_model(tiny_onnx), torch.rand(1, 3, 64, 64), precision="bf16")


def test_the_onnx_scorer_is_a_scorer(tiny_onnx):
    scorer = create_model(tiny_onnx)
    assert isinstance(scorer, OnnxScorer)
    for member in sorted(n for n in vars(Scorer) if not n.startswith("_")):
        assert hasattr(scorer, member), member
    assert scorer.input_dtype == torch.float32 and scorer.device == torch.device("cpu")
    scorer.check_precision("fp32")
    with pytest.raises(PrecisionError, match="ONNX model"):
        scorer.check_precision("bf16")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter
def test_unusable_files_are_value_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="not a loadable ONNX graph"):
        create_model(bad)
    with pytest.raises(ValueError, match="no such ONNX file"):
        create_model(tmp_path / "missing.onnx")
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.ReLU(), (torch.rand(1, 3),), str(foreign), dynamo=False)
    with pytest.raises(ValueError, match="not exported by qualiclip"):
        create_model(foreign)


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Good photos of two sizes, a corrupt file and an image too small to score."""
    root = tmp_path_factory.mktemp("photos")
    for i, (h, w) in enumerate([(72, 96), (72, 96), (100, 64)]):
        Image.fromarray(pixels((h, w, 3), seed=10 + i).numpy()).save(root / f"p{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    Image.fromarray(pixels((16, 200, 3), seed=20).numpy()).save(root / "small.png")
    return root


def _score_rows(folder: Path, model: str, out: Path, *extra: str) -> tuple[int, list[dict]]:
    code = cli.main(["score", str(folder), "--model", model, "--format", "json", "-o", str(out),
                     "--no-progress", "--device", "cpu", *extra])
    return code, json.loads(out.read_text()) if out.exists() else []


@pytest.mark.slow
def test_cli_export_then_score_gives_the_pytorch_rows(folder, tiny_file, tmp_path, capsys):
    graph = tmp_path / "tiny.onnx"
    assert cli.main(["export", "--model", str(tiny_file), "--onnx", str(graph)]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().err
    code_pt, rows_pt = _score_rows(folder, str(tiny_file), tmp_path / "pt.json")
    code_ox, rows_ox = _score_rows(folder, str(graph), tmp_path / "onnx.json")
    assert code_pt == code_ox == 1
    assert len(rows_ox) == 5
    for pt, ox in zip(rows_pt, rows_ox, strict=True):
        assert (pt["path"], pt["error"], pt["width"], pt["height"]) == (
            ox["path"], ox["error"], ox["width"], ox["height"]
        )
        if pt["score"] is None:
            assert ox["score"] is None
        else:
            assert ox["score"] == pytest.approx(pt["score"], abs=ATOL)
    errors = {Path(r["path"]).name: r["error"] for r in rows_ox if r["error"]}
    assert set(errors) == {"corrupt.png", "small.png"}
    assert "32" in errors["small.png"]  # says the minimum


def test_cli_refuses_a_pytorch_precision_for_an_onnx_model(folder, tiny_onnx, tmp_path, capsys):
    code, rows = _score_rows(folder, str(tiny_onnx), tmp_path / "x.json", "--precision", "bf16")
    assert code == 2 and rows == []
    err = capsys.readouterr().err
    assert "ONNX model" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--onnx", "{tmp}/out.txt"], "must end in .onnx"),
        (["--onnx", "{tmp}/no/such/out.onnx"], "no folder"),
        (["--onnx", "{tmp}/out.onnx", "--opset", "9"], "--opset must be in"),
        (["--onnx", "{tmp}/out.onnx", "--model", "no-such-model"], "no-such-model"),
        (["--onnx", "{tmp}/out.onnx", "--model", "{tmp}/in.onnx"], "already an ONNX graph"),
        (["--onnx", "{tmp}/out.onnx", "--input", "uint16"], "invalid choice"),
    ],
)
def test_cli_export_usage_errors_exit_2(tmp_path, capsys, tiny_file, args, message):
    argv = ["export", "--model", str(tiny_file)]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.onnx*"))  # nothing half-written


def test_cli_score_with_a_broken_onnx_file_is_a_usage_error(folder, tmp_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    code, _ = _score_rows(folder, str(broken), tmp_path / "x.json")
    assert code == 2
    assert "not a loadable ONNX graph" in capsys.readouterr().err


def test_http_service_scores_with_an_onnx_model(tiny, tiny_onnx, folder):
    pytest.importorskip("fastapi", reason="needs the 'serve' extra")
    from starlette.testclient import TestClient

    from qualiclip.serve import create_app

    body = (folder / "p0.png").read_bytes()
    with TestClient(create_app(create_model(tiny_onnx)), base_url="http://localhost") as client:
        reply = client.post("/score", content=body, headers={"Content-Type": "image/png"})
        small = client.post("/score", content=(folder / "small.png").read_bytes(),
                            headers={"Content-Type": "image/png"})
    assert reply.status_code == 200, reply.text
    (row,) = reply.json()["results"]
    assert row["score"] == pytest.approx(qualiclip.score(tiny, folder / "p0.png"), abs=ATOL)
    assert small.status_code == 400 and small.json()["results"][0]["error"]


def test_exported_file_follows_the_umask_and_maps_name_the_flag(tiny_file, folder, tmp_path,
                                                               capsys):
    graph = tmp_path / "tiny.onnx"
    old = os.umask(0o022)
    try:
        assert cli.main(["export", "--model", str(tiny_file), "--onnx", str(graph),
                         "--no-check"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(graph.stat().st_mode) == 0o644  # as any file written with umask 022
    capsys.readouterr()
    code = cli.main(["score", str(folder), "--model", str(graph), "--map",
                     str(tmp_path / "maps"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--map-kind windows" in err and "kind='windows'" not in err, err
    assert err.count("\n") == 1


def test_map_endpoint_with_a_model_that_has_no_dense_maps(tiny, tiny_onnx, folder):
    """An ONNX graph has no feature map: /map draws windows by default, and a request for a
    dense map still gets each score, with the reason it has no map (never a 500)."""
    pytest.importorskip("fastapi", reason="needs the 'serve' extra")
    from starlette.testclient import TestClient

    from qualiclip.maps import map_kinds
    from qualiclip.serve import create_app

    scorer = create_model(tiny_onnx)
    assert map_kinds(tiny) == ("dense", "windows") and map_kinds(scorer) == ("windows",)
    files = [("files", ("p0.png", (folder / "p0.png").read_bytes(), "image/png"))]
    with TestClient(create_app(scorer), base_url="http://localhost") as client:
        assert client.get("/limits").json()["map_kinds"] == ["windows"]
        score = client.post("/score", files=files).json()["results"][0]["score"]
        default = client.post("/map", files=files)
        dense = client.post("/map?kind=dense", files=files)
    assert default.status_code == 200, default.text
    (row,) = default.json()["results"]
    assert row["map"]["kind"] == "windows" and row["overlay"].startswith("data:image/png")
    assert row["score"] == pytest.approx(score, abs=1e-6)
    assert dense.status_code == 200, dense.text
    (row,) = dense.json()["results"]
    assert row["error"] is None and row["score"] == pytest.approx(score, abs=1e-6)
    assert row["map"] is None and row["overlay"] is None
    assert "dense" in row["map_error"] and "windows" in row["map_error"], row["map_error"]
