"""Quality maps: each kind against an independent computation, the geometry, drawing, files.

A ``windows`` cell is checked against the score of the same crop, a ``dense`` cell against the
attention pool's own code run on that cell alone; the dense path must not reach the N x N
attention. ``score --map`` is run as a user runs it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import qualiclip
from conftest import perturb_batch_norms, run_main
from qualiclip import engine, maps
from qualiclip.clip import AttentionPool2d
from qualiclip.maps import QualityMap, quality_map
from qualiclip.model import QualiCLIP, create_model


@pytest.fixture(scope="module")
def model() -> QualiCLIP:
    """The random tiny model with random batch-norm statistics, so cells differ."""
    m = create_model("random-tiny")
    perturb_batch_norms(m, seed=3)
    return m.eval()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 11 + c) * np.cos(yy / 7 - c) for c in range(3)], axis=-1)
    return np.clip(127 + 90 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# --- dense -------------------------------------------------------------------------------------


def test_dense_shape_range_and_grid(model: QualiCLIP) -> None:
    image = torch.rand(3, 130, 200)
    qmap = quality_map(model, image, "dense")
    with torch.inference_mode():
        fmap = model.visual.trunk(model.normalize(image[None]))
    assert qmap.grid == tuple(fmap.shape[-2:]) == (4, 6)
    assert qmap.values.dtype == np.float32
    assert np.all((qmap.values >= 0) & (qmap.values <= 1))
    assert qmap.values.std() > 0  # cells differ: a constant map would pass the range check
    assert qmap.kind == "dense" and qmap.image_size == (130, 200)
    assert qmap.cell == qmap.stride == (32, 32)
    assert list(qmap.origins_x) == [0, 32, 64, 96, 128, 160]


def test_dense_score_is_the_models_score(model: QualiCLIP) -> None:
    image = torch.rand(3, 96, 160)
    qmap = quality_map(model, image)
    assert qmap.score == pytest.approx(qualiclip.score(model, image), abs=1e-5)
    with torch.no_grad():
        assert qmap.score == pytest.approx(float(model(image[None])), abs=1e-5)


def test_dense_cell_is_the_pool_attending_to_that_cell_alone(model: QualiCLIP) -> None:
    """Each cell equals the pool's own attention code run on that cell as its only token
    (softmax over one key), scored as the global feature is; computed on the plain tower."""
    image = torch.rand(3, 100, 140)
    qmap = quality_map(model, image)
    pool = model.visual.attnpool
    with torch.inference_mode():
        fmap = model.visual.trunk(model.normalize(image[None]))
        tokens = fmap.flatten(2).transpose(1, 2)  # [1, N, C]
        features = torch.cat([
            pool._projected_attention(tokens[:, j:j + 1], tokens[:, j:j + 1])
            for j in range(tokens.shape[1])
        ])
        expected = model.scores_from_features(F.normalize(features, dim=-1))
    np.testing.assert_allclose(qmap.values.ravel(), expected.numpy(), atol=1e-5)


def test_dense_never_forms_the_n_by_n_attention(model: QualiCLIP, monkeypatch) -> None:
    """The map and its global score come from the first-token path and per-cell projections:
    the projected (N x N capable) attention and scaled_dot_product_attention are never called."""
    def forbidden(*args, **kwargs):
        raise AssertionError("full attention was called")

    image = torch.rand(3, 160, 192)
    before = quality_map(model, image)
    monkeypatch.setattr(AttentionPool2d, "_projected_attention", forbidden)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
    assert not model.visual.attnpool.full_attention
    after = quality_map(model, image)
    np.testing.assert_array_equal(before.values, after.values)
    # The guard itself works: the reference N x N form does hit it.
    model.visual.attnpool.full_attention = True
    try:
        with pytest.raises(AssertionError, match="full attention"):
            model(image[None])
    finally:
        model.visual.attnpool.full_attention = False


def test_dense_with_interpolated_positional_embedding(model: QualiCLIP) -> None:
    """A pool that adds a positional embedding adds it to each cell too (the map changes)."""
    image = torch.rand(3, 96, 96)
    plain = quality_map(model, image).values
    pool = model.visual.attnpool
    pool.pooling = "interpolate"
    try:
        with_pos = quality_map(model, image).values
        with torch.inference_mode():
            fmap = model.visual.trunk(model.normalize(image[None]))
            tokens = fmap.flatten(2).transpose(1, 2)[0]
            pos = pool._positional(tokens.shape[0] + 1, tokens.dtype)[1:]
            feats = pool.c_proj(pool.v_proj(tokens + pos))
            expected = model.scores_from_features(F.normalize(feats, dim=-1))
    finally:
        pool.pooling = "none"
    np.testing.assert_allclose(with_pos.ravel(), expected.numpy(), atol=1e-5)
    assert not np.allclose(plain, with_pos, atol=1e-7)


# --- windows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("as_array", [False, True])
def test_every_window_cell_is_the_score_of_its_crop(model: QualiCLIP, as_array: bool) -> None:
    pixels = _photo(150, 190, seed=1)
    image = pixels if as_array else torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    qmap = quality_map(model, image, "windows", window=64, stride=40)
    assert qmap.grid == (4, 5)
    assert list(qmap.origins_y) == [0, 40, 80, 86]  # the last window is flush with the edge
    assert list(qmap.origins_x) == [0, 40, 80, 120, 126]
    for i, top in enumerate(qmap.origins_y):
        for j, left in enumerate(qmap.origins_x):
            crop = pixels[top:top + 64, left:left + 64]
            assert qmap.values[i, j] == pytest.approx(qualiclip.score(model, crop), abs=1e-5)
    assert qmap.values.std() > 0


def test_windows_are_batched_within_the_pixel_bound(model: QualiCLIP, monkeypatch) -> None:
    seen: list[int] = []
    real = engine.score_tensors

    def spy(m, batch, *args, **kwargs):
        seen.append(batch.shape[0])
        return real(m, batch, *args, **kwargs)

    monkeypatch.setattr(engine, "score_tensors", spy)
    image = _photo(128, 192, seed=2)
    small = quality_map(model, image, "windows", window=64, stride=32,
                        max_batch_pixels=3 * 64 * 64)
    assert sum(seen) == small.values.size == 15 and max(seen) == 3  # 5 passes of <= 3 crops
    seen.clear()
    big = quality_map(model, image, "windows", window=64, stride=32)
    assert seen == [15]  # equal crops share one pass when the bound allows
    np.testing.assert_allclose(small.values, big.values, atol=1e-5)


def test_each_pass_is_reported_and_a_raising_callback_stops_the_map(model: QualiCLIP) -> None:
    image = _photo(128, 192, seed=2)
    seen: list[tuple[int, int]] = []
    quality_map(model, image, "windows", window=64, stride=32, max_batch_pixels=3 * 64 * 64,
                on_pass=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 15), (6, 15), (9, 15), (12, 15), (15, 15)]  # crops done, of all

    class Gone(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        seen.append((done, total))
        if len(seen) == 2:
            raise Gone

    seen.clear()
    with pytest.raises(Gone):
        quality_map(model, image, "windows", window=64, stride=32,
                    max_batch_pixels=3 * 64 * 64, on_pass=stop_after_two)
    assert seen == [(3, 15), (6, 15)]  # no pass after the one the callback refused
    seen.clear()
    quality_map(model, image, "dense", on_pass=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 1)]


def test_window_larger_than_the_image_is_one_cell(model: QualiCLIP) -> None:
    image = _photo(70, 90, seed=3)
    qmap = quality_map(model, image, "windows")
    assert qmap.grid == (1, 1) and qmap.cell == (70, 90)
    assert qmap.values[0, 0] == pytest.approx(qualiclip.score(model, image), abs=1e-5)


def test_bad_arguments_are_clear(model: QualiCLIP) -> None:
    image = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match="kind must be one of"):
        quality_map(model, image, "heat")
    with pytest.raises(ValueError, match="window must be at least"):
        quality_map(model, image, "windows", window=16)
    with pytest.raises(ValueError, match="stride must be at least 1"):
        quality_map(model, image, "windows", stride=0)
    with pytest.raises(ValueError, match="at least 32 px"):
        quality_map(model, torch.rand(3, 20, 64))
    with pytest.raises(ValueError, match="one image"):
        quality_map(model, torch.rand(2, 3, 64, 64))


def test_a_path_and_its_pixels_give_the_same_map(model: QualiCLIP, tmp_path: Path) -> None:
    pixels = _photo(96, 128, seed=4)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    for kind in maps.MAP_KINDS:
        a = quality_map(model, tmp_path / "p.png", kind, window=64, stride=32)
        b = quality_map(model, pixels, kind, window=64, stride=32)
        np.testing.assert_array_equal(a.values, b.values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_maps_agree(model: QualiCLIP) -> None:
    image = _photo(160, 224, seed=5)
    gpu = create_model("random-tiny", device="cuda")
    gpu.load_state_dict(model.state_dict())
    gpu.eval()
    for kind in maps.MAP_KINDS:
        cpu_map = quality_map(model, image, kind, window=64, stride=32)
        gpu_map = quality_map(gpu, image, kind, window=64, stride=32)
        np.testing.assert_allclose(cpu_map.values, gpu_map.values, atol=1e-4)


# --- drawing -----------------------------------------------------------------------------------


def test_colour_ramp_ends_and_order() -> None:
    rgb = maps.colorize(np.linspace(0, 1, 50)).astype(float)
    assert tuple(rgb[0]) == (68, 1, 84) and tuple(rgb[-1]) == (253, 231, 37)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma) > 0)  # lighter as quality rises, readable in grey
    assert np.array_equal(maps.colorize(np.array([-5.0, 9.0])), rgb[[0, -1]].astype(np.uint8))


def _grid_map(values: np.ndarray, kind: str, size: tuple[int, int], cell: int,
              stride: int) -> QualityMap:
    rows, cols = values.shape
    return QualityMap(values.astype(np.float32), kind, size, (cell, cell), (stride, stride),
                      np.arange(rows) * stride, np.arange(cols) * stride)


def test_window_upsampling_averages_the_covering_windows() -> None:
    # Two 4 px windows every 2 px on a 6 x 6 image: the middle columns are covered by both.
    qmap = _grid_map(np.array([[0.2, 0.6], [0.2, 0.6]]), "windows", (6, 6), 4, 2)
    full = maps.upsample(qmap, (6, 6))
    np.testing.assert_allclose(full[:, :2], 0.2)
    np.testing.assert_allclose(full[:, 2:4], 0.4)
    np.testing.assert_allclose(full[:, 4:], 0.6)


def test_overlay_size_legend_and_colours() -> None:
    image = np.full((64, 96, 3), 128, np.uint8)
    qmap = _grid_map(np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), "dense", (64, 96), 32, 32)
    plain = np.asarray(maps.overlay(image, qmap, legend=False, alpha=1.0))
    assert plain.shape == (64, 96, 3)
    assert tuple(plain[32, 2]) == (68, 1, 84) and tuple(plain[32, 93]) == (253, 231, 37)
    assert maps.overlay(image, qmap).size == (96, 64 + 22)
    assert maps.overlay(image, qmap, max_side=48, legend=False).size == (48, 32)
    with pytest.raises(ValueError, match="96x64 image"):
        maps.overlay(np.zeros((10, 10, 3), np.uint8), qmap)


def test_overlay_colours_come_from_the_map_not_from_the_photo() -> None:
    """The photo shows through as luminance only: two photos of equal luminance and different
    hues get the same picture, so a red photo never reads as 'low quality'."""
    qmap = _grid_map(np.array([[0.1, 0.5, 0.9]]), "dense", (32, 96), 32, 32)
    red, green = np.zeros((32, 96, 3), np.uint8), np.zeros((32, 96, 3), np.uint8)
    red[..., 0], green[..., 1] = 200, 102  # 0.299 * 200 ~ 0.587 * 102: equal luminance
    a = np.asarray(maps.overlay(red, qmap, legend=False), dtype=int)
    b = np.asarray(maps.overlay(green, qmap, legend=False), dtype=int)
    assert np.abs(a - b).max() <= 1
    side = maps.overlay(red, qmap, layout="side-by-side")
    assert side.width > 2 * 96 and side.height > 32  # photo | map, legend under both
    assert tuple(np.asarray(side)[5, 5]) == (200, 0, 0)  # the photo itself, untouched


def test_a_flat_map_is_drawn_flat_and_says_so() -> None:
    flat = _grid_map(np.array([[0.500, 0.503], [0.501, 0.502]]), "dense", (64, 64), 32, 32)
    varied = _grid_map(np.array([[0.2, 0.6], [0.4, 0.5]]), "dense", (64, 64), 32, 32)
    assert flat.flat and not varied.flat
    assert maps.range_note(flat) is not None and str(maps.FLAT_RANGE) in maps.range_note(flat)
    assert maps.range_note(varied) is None and flat.to_dict()["flat"] is True
    image = np.full((64, 64, 3), 128, np.uint8)
    colours = np.asarray(maps.overlay(image, flat, legend=False, alpha=1.0), dtype=int)
    # Stretched from its minimum to its maximum, 0.003 would span the whole ramp; drawn over a
    # range of FLAT_RANGE around its mean, it stays near one colour.
    assert np.abs(colours - colours[32, 32]).max() < 40


# --- files and the CLI -------------------------------------------------------------------------


@pytest.mark.slow
def test_score_with_maps_writes_each_map_and_keeps_every_row(
    model: QualiCLIP, tmp_path: Path
) -> None:
    ckpt = tmp_path / "m.pth"
    torch.save(model.official_state_dict(), ckpt)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(_photo(96, 128, 6)).save(tmp_path / "a" / "photo.png")
    Image.fromarray(_photo(80, 100, 7)).save(tmp_path / "b" / "photo.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "maps"
    run = subprocess.run(
        [sys.executable, "-m", "qualiclip.cli", "score", str(tmp_path / "a" / "photo.png"),
         str(tmp_path / "broken.png"), str(tmp_path / "b" / "photo.jpg"), "--model", str(ckpt),
         "--device", "cpu", "--format", "json", "--no-progress", "--map", str(out),
         "--map-npy"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1, run.stderr  # the broken file fails, the others are scored
    rows = json.loads(run.stdout)
    assert [Path(r["path"]).name for r in rows] == ["photo.png", "broken.png", "photo.jpg"]
    assert rows[1]["score"] is None and rows[1]["error"]
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "a/photo.png.map.npy", "a/photo.png.map.png", "b/photo.jpg.map.npy",
        "b/photo.jpg.map.png"]
    values = np.load(out / "a" / "photo.png.map.npy")
    expected = quality_map(model, tmp_path / "a" / "photo.png").values
    np.testing.assert_allclose(values, expected, atol=1e-6)
    # photo | 4 px | map; legend (+ flat note)
    with Image.open(out / "a" / "photo.png.map.png") as im:
        flat = quality_map(model, tmp_path / "a" / "photo.png").flat
        assert im.size == (2 * 128 + 4, 96 + 22 + (22 if flat else 0))


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
@pytest.mark.slow
def test_score_map_decodes_each_file_once(
    model: QualiCLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], kind: str,
) -> None:
    """``score --map`` decodes every file exactly once; a dense map's pass gives the score.

    The command loads and prepares its own copy of the model, whose floats may differ from
    ``model``'s in the last bits: the score is checked against the map the command made (exactly)
    and against ``model`` (closely)."""
    from qualiclip import cli, images, reading

    ckpt = tmp_path / "m.pth"
    torch.save(model.official_state_dict(), ckpt)
    photos = {tmp_path / f"p{i}.png": _photo(64 + 16 * i, 96, 20 + i) for i in range(3)}
    for path, pixels in photos.items():
        Image.fromarray(pixels).save(path)
    expected = {str(p): quality_map(model, px, kind, window=64, stride=32)
                for p, px in photos.items()}
    counts: dict[str, int] = {}
    real = images.decode_rgb

    def counting(source: object, **kwargs: object) -> np.ndarray:
        counts[os.fspath(source)] = counts.get(os.fspath(source), 0) + 1
        return real(source, **kwargs)

    made: list[QualityMap] = []  # the maps the command computed, in file order
    engine_scores: list[float] = []
    real_map, real_score = maps.quality_map, engine.score

    def recording_map(*args: object, **kwargs: object) -> QualityMap:
        made.append(real_map(*args, **kwargs))
        return made[-1]

    def recording_score(*args: object, **kwargs: object) -> float:
        engine_scores.append(float(real_score(*args, **kwargs)))
        return engine_scores[-1]

    monkeypatch.setattr(images, "decode_rgb", counting)
    monkeypatch.setattr(reading, "decode_rgb", counting)
    monkeypatch.setattr(maps, "quality_map", recording_map)
    monkeypatch.setattr(engine, "score", recording_score)
    code = cli.main(["score", *map(str, photos), "--model", str(ckpt), "--device", "cpu",
                     "--format", "json", "--no-progress", "--map", str(tmp_path / "maps"),
                     "--map-kind", kind, "--map-window", "64", "--map-stride", "32",
                     "--map-npy"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert counts == {str(p): 1 for p in photos}
    assert len(made) == len(photos)
    # A dense map's pass is the score; a window map's file is scored once by the engine.
    assert len(engine_scores) == (0 if kind == "dense" else len(photos))
    for i, row in enumerate(rows):
        qmap = expected[row["path"]]
        values = np.load(tmp_path / "maps" / f"{Path(row['path']).name}.map.npy")
        np.testing.assert_allclose(values, qmap.values, atol=1e-6)
        assert row["score"] == pytest.approx(real_score(model, photos[Path(row["path"])]),
                                             abs=1e-5)
        assert row["score"] == (made[i].score if kind == "dense" else engine_scores[i])


def test_maps_of_files_decoded_on_the_device(
    model: QualiCLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JPEGs decoded on the GPU arrive as uint8 ``[3, H, W]`` tensors: their maps, scores and
    pictures are those of the same pixels decoded on the CPU (a CPU stand-in for nvJPEG)."""
    from qualiclip.images import decode_rgb

    path = tmp_path / "p.jpg"
    Image.fromarray(_photo(96, 128, 12)).save(path, quality=95)
    pixels = decode_rgb(path)

    def on_device(data: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(decode_rgb(bytes(data.numpy()))).permute(2, 0, 1).contiguous()

    monkeypatch.setattr(maps, "resolve_decoder", lambda decode, device: on_device)
    for kind in maps.MAP_KINDS:
        out = tmp_path / kind
        (row,) = maps.score_paths_with_maps(model, [path], out, kind=kind, npy=True,
                                             root=tmp_path)
        qmap = quality_map(model, pixels, kind)
        assert row.ok and (row.width, row.height) == (128, 96)
        assert row.score == pytest.approx(qualiclip.score(model, pixels), abs=1e-5)
        np.testing.assert_allclose(np.load(out / "p.jpg.map.npy"), qmap.values, atol=1e-5)
        with Image.open(out / "p.jpg.map.png") as drawn:
            expected = maps.overlay(pixels, qmap, layout="side-by-side")
            assert np.abs(np.asarray(drawn, np.int16) - np.asarray(expected, np.int16)).max() <= 1


def test_score_map_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for extra in (["--map", str(tmp_path / "file")], ["--map", str(tmp_path), "--map-window",
                                                       "8"]):
        run = run_main("score", str(tmp_path), "--model", "random-tiny", *extra)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr and "--map" in run.stderr


def test_a_failed_map_keeps_the_score_and_fails_the_row(
    model: QualiCLIP, tmp_path: Path, monkeypatch
) -> None:
    Image.fromarray(_photo(64, 64, 8)).save(tmp_path / "x.png")
    result = engine.ScoreResult(str(tmp_path / "x.png"), 0.5, None, 64, 64)

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(maps, "quality_map", boom)
    (row,) = maps.write_maps(model, [result], tmp_path / "out")
    assert row.score == 0.5 and row.error == "quality map failed: RuntimeError: out of memory"


def test_a_failed_map_pass_keeps_the_engines_score(
    model: QualiCLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pixels = _photo(64, 80, 13)
    Image.fromarray(pixels).save(tmp_path / "x.png")

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(maps, "quality_map", boom)
    (row,) = maps.score_paths_with_maps(model, [tmp_path / "x.png"], tmp_path / "out")
    assert row.error == "quality map failed: RuntimeError: out of memory"
    assert row.score == pytest.approx(qualiclip.score(model, pixels), abs=1e-6)
    assert list((tmp_path / "out").iterdir()) == []


def test_half_means_split_the_image_at_its_middle() -> None:
    qmap = _grid_map(np.array([[0.1, 0.1, 0.9, 0.9]]), "windows", (32, 128), 32, 32)
    assert maps.half_means(qmap) == pytest.approx((0.1, 0.9), abs=1e-6)


def _test_client() -> type:
    """Starlette's TestClient, or a skip (a failure in CI) without the 'serve' extra."""
    from qualiclip import serve

    try:
        serve.require_serve()
        from starlette.testclient import TestClient
    except ImportError as exc:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI installs the 'serve' extra, but: {exc}", pytrace=False)
        pytest.skip(f"the 'serve' extra is not installed: {exc}")
    return TestClient


def test_map_endpoint_answers_like_score(model: QualiCLIP) -> None:
    """``POST /map`` in-process: the map of each good file, the /score error of a bad one."""
    from qualiclip import serve

    TestClient = _test_client()
    buffer = io.BytesIO()
    Image.fromarray(_photo(96, 160, 9)).save(buffer, "PNG")
    good = ("good.png", buffer.getvalue(), "image/png")
    bad = ("bad.png", b"not a png", "image/png")
    app = serve.create_app(model, serve.ServeConfig(max_files=3))
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get("/limits").json()["max_files"] == 3
        scored = client.post("/score", files=[("files", good), ("files", bad)]).json()
        r = client.post("/map", files=[("files", good), ("files", bad)])
        assert r.status_code == 200
        mapped = r.json()["results"]
        assert mapped[0]["score"] == pytest.approx(scored["results"][0]["score"], abs=1e-5)
        grid = mapped[0]["map"]
        expected = quality_map(model, _photo(96, 160, 9))
        assert (grid["rows"], grid["cols"], grid["kind"]) == (3, 5, "dense")
        np.testing.assert_allclose(grid["values"], expected.values, atol=1e-5)
        assert mapped[0]["overlay"].startswith("data:image/png;base64,")
        assert mapped[1]["error"] == scored["results"][1]["error"] and "map" not in mapped[1]
        windows = client.post("/map?kind=windows", files=[("files", good)]).json()["results"][0]
        assert windows["map"]["kind"] == "windows"
        assert windows["score"] == pytest.approx(scored["results"][0]["score"], abs=1e-5)
        r = client.post("/map?kind=heat", files=[("files", good)])
        assert r.status_code == 400 and "kind must be one of" in r.json()["detail"]
        assert client.post("/map", files=[("files", bad)]).status_code == 415


def test_a_non_finite_map_or_score_is_an_error_row_in_the_service() -> None:
    """Broken after loading (loading refuses NaN weights): every answer is JSON with the error."""
    from qualiclip import serve

    TestClient = _test_client()
    broken = create_model("random-tiny")
    with torch.no_grad():
        broken.visual.attnpool.c_proj.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite score"):
        quality_map(broken, _photo(64, 96, 3))
    buffer = io.BytesIO()
    Image.fromarray(_photo(64, 96, 4)).save(buffer, "PNG")
    upload = ("files", ("x.png", buffer.getvalue(), "image/png"))
    with TestClient(serve.create_app(broken, serve.ServeConfig()),
                    base_url="http://localhost") as client:
        for endpoint in ("/score", "/map", "/map?kind=windows"):
            r = client.post(endpoint, files=[upload])
            assert r.headers["content-type"].startswith("application/json"), endpoint
            row = r.json()["results"][0]
            assert row["score"] is None and "model produced a non-finite score" in row["error"]
