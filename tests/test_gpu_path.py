"""The device path of scoring: uint8 pixels staged and converted on the device, GPU decoding.

What runs on a CPU is tested here on the CPU (the staging buffers are exercised unpinned, the GPU
decoder is stood in for by one with PIL's pixels); what needs CUDA is skipped without it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb_batch_norms
from qualiclip import engine, heap, images, reading
from qualiclip.cli import main
from qualiclip.model import QualiCLIP, create_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.fixture()
def tiny() -> QualiCLIP:
    model = create_model("random-tiny")
    perturb_batch_norms(model, 1)
    return model.eval()


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _arrays(dtype: type, n: int = 3, h: int = 40, w: int = 56) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    top = np.iinfo(dtype).max
    # Both ends of the range: 0 and the maximum (65535 wraps to -1 in int16 on the way).
    arrays = [rng.integers(0, top + 1, (h, w, 3), dtype=dtype) for _ in range(n)]
    arrays[0][0, 0] = [0, top, top - 1]
    return arrays


# --- one conversion ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_staged_conversion_gives_the_same_floats(dtype):
    arrays = _arrays(dtype)
    direct = images.pixels_to_tensor(arrays)
    buf = torch.empty((3, 40, 56, 3), dtype=torch.int16 if dtype == np.uint16 else torch.uint8)
    staged = images.pixels_to_tensor(arrays, staging=buf)
    assert staged.shape == direct.shape == (3, 3, 40, 56)
    assert staged.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(staged, direct)
    # ... and the floats load_image gives for the same pixels
    for i, arr in enumerate(arrays):
        assert torch.equal(direct[i], images._array_to_tensor(arr))
    scale = 65535.0 if dtype == np.uint16 else 255.0
    assert float(direct[0, 1, 0, 0]) == 1.0 and float(direct[0, 0, 0, 0]) == 0.0
    assert float(direct[0, 2, 0, 0]) == float(np.float32(scale - 1) / np.float32(scale))


def test_tensors_decoded_on_the_device_convert_alike():
    arrays = _arrays(np.uint8)
    tensors = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    assert torch.equal(images.pixels_to_tensor(tensors), images.pixels_to_tensor(arrays))


def test_conversion_refuses_mixed_or_wrong_inputs():
    a, b = _arrays(np.uint8, 2)
    with pytest.raises(ValueError, match="one size"):
        images.pixels_to_tensor([a, b[:20]])
    with pytest.raises(ValueError, match="uint8 or uint16"):
        images.pixels_to_tensor([a.astype(np.float32)])
    with pytest.raises(ValueError, match="does not fit"):
        images.pixels_to_tensor([a], staging=torch.empty((2, 40, 56, 3), dtype=torch.uint8))
    with pytest.raises(ValueError, match="no images"):
        images.pixels_to_tensor([])


# --- the staging pool --------------------------------------------------------------------------


class _Fence:
    def __init__(self, done: bool) -> None:
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def test_pool_reuses_a_finished_buffer():
    pool = heap.StagingPool(pin=False)
    a = pool.acquire((2, 8, 8, 3), torch.uint8)
    pool.release(a, _Fence(done=True))
    b = pool.acquire((2, 8, 8, 3), torch.uint8)
    assert b.data_ptr() == a.data_ptr() and pool.allocations == 1
    c = pool.acquire((1, 8, 8, 3), torch.uint8)  # another shape: a buffer of its own
    assert c.data_ptr() != a.data_ptr() and pool.allocations == 2


def test_pool_makes_a_new_buffer_while_the_copy_runs_then_waits_at_its_bound():
    pool = heap.StagingPool(pin=False, per_shape=2)
    shape = (1, 4, 4, 3)
    a = pool.acquire(shape, torch.uint8)
    busy = _Fence(done=False)
    pool.release(a, busy)
    b = pool.acquire(shape, torch.uint8)  # a's copy is still running: not a
    assert b.data_ptr() != a.data_ptr() and not busy.waited
    c = pool.acquire(shape, torch.uint8)  # b in use, a in flight: at the bound, wait for a
    assert c.data_ptr() == a.data_ptr() and busy.waited
    assert pool.allocations == 2


def test_pool_keeps_a_bounded_number_of_bytes():
    pool = heap.StagingPool(pin=False, max_bytes=1000)
    bufs = [pool.acquire((1, 10, 10, 3), torch.uint8) for _ in range(2)]  # 300 bytes each
    bufs += [pool.acquire((1, 20, 10, 3), torch.uint8)]  # 600 bytes
    fences = [_Fence(done=False) for _ in bufs]
    for buf, fence in zip(bufs, fences, strict=True):
        pool.release(buf, fence)
        assert pool.free_bytes <= 1000
    assert pool.free_bytes == 900  # the oldest 300 went, after its copy was waited for
    assert fences[0].waited and not fences[2].waited


def test_engine_staged_path_gives_the_same_scores(tiny, monkeypatch):
    """The CUDA path's staging, exercised on the CPU: same scores, buffers reused."""
    arrays = [_photo(64, 96, i) for i in range(5)] + [_photo(70, 90, 9)]
    plain, passes = engine.score_arrays(tiny, arrays, batch_size=2)
    runner = engine.prepare(tiny)
    pool = heap.StagingPool(pin=False)
    monkeypatch.setattr(runner, "staging", pool)
    staged, staged_passes = engine.score_arrays(tiny, arrays, batch_size=2)
    assert staged_passes == passes == [2, 2, 1, 1]
    for p, s in zip(plain, staged, strict=True):
        assert isinstance(p, float) and isinstance(s, float)
        assert abs(p - s) <= 1e-6
    # shapes (2, 64, 96), (1, 64, 96) and (1, 70, 90): one buffer each, reused
    assert pool.allocations == 3
    engine.score_arrays(tiny, arrays, batch_size=2)
    assert pool.allocations == 3


def test_score_on_integer_pixels_matches_the_float_model(tiny):
    for arr in (_photo(64, 80, 3), (_photo(64, 80, 4).astype(np.uint16) * 257)):
        expected = float(tiny(images._array_to_tensor(arr)[None])[0])
        assert abs(engine.score(tiny, arr) - expected) <= 1e-5
    with pytest.raises(ValueError, match="at least"):
        engine.score(tiny, _photo(16, 16, 1))


# --- decoding ----------------------------------------------------------------------------------


def _files(folder: Path) -> list[Path]:
    paths = []
    for i in range(4):
        p = folder / f"p{i}.jpg"
        Image.fromarray(_photo(64, 96, i)).save(p, quality=90)
        paths.append(p)
    png = folder / "q.png"
    Image.fromarray(_photo(64, 96, 8)).save(png)
    rotated = folder / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_photo(64, 96, 9)).save(rotated, exif=exif)
    broken = folder / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:200])
    return [*paths, png, rotated, broken]


def test_decode_gpu_without_cuda_is_refused(tiny, tmp_path):
    paths = _files(tmp_path)
    with pytest.raises(ValueError, match="GPU decoding needs"):
        engine.score_paths(tiny, paths, decode="gpu")
    with pytest.raises(ValueError, match="decode must be one of"):
        engine.score_paths(tiny, paths, decode="nvjpeg")  # type: ignore[arg-type]


@pytest.mark.skipif(CUDA, reason="the fallback is what a machine without CUDA does")
def test_decode_auto_falls_back_to_cpu_threads(tiny, tmp_path):
    paths = _files(tmp_path)
    assert reading.gpu_jpeg_decoder("cpu") is None
    auto = list(engine.score_paths(tiny, paths, decode="auto"))
    cpu = list(engine.score_paths(tiny, paths, decode="cpu"))
    assert auto == cpu
    assert [r.ok for r in auto] == [True] * 6 + [False]


def test_device_decoding_plumbing_with_a_stand_in_decoder(tiny, tmp_path):
    """Which files go to the device decoder, and that its pixels are scored like the CPU's."""
    paths = _files(tmp_path)
    sent: list[int] = []

    def stand_in(data: torch.Tensor) -> torch.Tensor:  # libjpeg's pixels, as a 3 x H x W tensor
        import io

        sent.append(data.numel())
        rgb = np.asarray(Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB"))
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()

    runner = engine.prepare(tiny)
    args = (8, 2, False, 32, engine.DEFAULT_MAX_BATCH_PIXELS, None)
    on_device = list(engine._score_paths(runner, paths, *args, stand_in))
    on_cpu = list(engine.score_paths(tiny, paths, decode="cpu"))
    # the four plain JPEGs only: not the PNG, the rotated JPEG, or the truncated one
    assert sorted(sent) == sorted(p.stat().st_size for p in paths[:4])
    assert [r.path for r in on_device] == [r.path for r in on_cpu]
    for d, c in zip(on_device, on_cpu, strict=True):
        assert d.ok == c.ok and d.error == c.error and (d.width, d.height) == (c.width, c.height)
        if c.ok:
            assert d.score is not None and c.score is not None
            assert abs(d.score - c.score) <= 1e-6

    def failing(data: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("nvJPEG: unsupported")

    fallback = list(engine._score_paths(runner, paths, *args, failing))
    assert [r.score for r in fallback] == [r.score for r in on_cpu]


def test_cli_decode_gpu_without_cuda_is_a_usage_error(tmp_path, capsys):
    if CUDA and reading.gpu_jpeg_decoder("cuda") is not None:
        pytest.skip("GPU decoding is available here")
    (path, *_) = _files(tmp_path)
    assert main(["score", "--model", "random-tiny", str(path), "--decode", "gpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "GPU decoding needs" in err and "Traceback" not in err
    assert main(["score", "--model", "random-tiny", str(path), "--decode", "cpu",
                 "--no-progress", "--format", "csv"]) == 0


@pytest.mark.skipif(CUDA, reason="with CUDA, decode='auto' may import torchvision")
@pytest.mark.slow
def test_the_core_never_imports_torchvision(tmp_path):
    (path, *_) = _files(tmp_path)
    code = (
        "import sys, qualiclip\n"
        "from qualiclip import engine\n"
        "m = qualiclip.create_model('random-tiny')\n"
        f"assert all(r.ok for r in engine.score_paths(m, [{str(path)!r}]))\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"


# --- CUDA only ---------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_cuda_staged_conversion_equals_the_cpu_one(dtype):
    arrays = _arrays(dtype)
    pool = heap.StagingPool()
    buf = pool.acquire((3, 40, 56, 3), torch.int16 if dtype == np.uint16 else torch.uint8)
    assert buf.is_pinned()
    on_gpu = images.pixels_to_tensor(arrays, "cuda", staging=buf)
    assert torch.equal(on_gpu.cpu(), images.pixels_to_tensor(arrays))


@needs_cuda
def test_cuda_scores_equal_cpu_scores(tiny, tmp_path):
    paths = _files(tmp_path)
    cpu = list(engine.score_paths(tiny, paths, decode="cpu"))
    gpu_model = create_model("random-tiny", device="cuda")
    gpu_model.load_state_dict(tiny.state_dict())
    gpu = list(engine.score_paths(gpu_model.eval(), paths, decode="cpu", batch_size=2))
    for c, g in zip(cpu, gpu, strict=True):
        assert c.ok == g.ok
        if c.ok:
            assert c.score is not None and g.score is not None
            assert abs(c.score - g.score) <= 2e-3  # cuDNN may run fp32 convolutions in TF32
    runner = engine.prepare(gpu_model)
    # three batch shapes, at most per_shape buffers each
    assert runner.staging is not None and runner.staging.allocations <= 3 * 3


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
def test_nvjpeg_scores_are_close_to_libjpeg_scores(tiny, tmp_path):
    if reading.gpu_jpeg_decoder("cuda") is None:
        pytest.skip("torchvision has no working CUDA decode_jpeg here")
    paths = _files(tmp_path)
    gpu_model = create_model("random-tiny", device="cuda")
    gpu_model.load_state_dict(tiny.state_dict())
    cpu = list(engine.score_paths(gpu_model.eval(), paths, decode="cpu"))
    gpu = list(engine.score_paths(gpu_model, paths, decode="gpu"))
    for c, g in zip(cpu, gpu, strict=True):
        assert c.ok == g.ok and c.error == g.error
        if c.ok:
            assert c.score is not None and g.score is not None
            assert abs(c.score - g.score) <= 5e-3  # nvJPEG's IDCT and upsampling differ slightly


def test_one_pass_in_flight_keeps_input_order_and_scores(tiny, tmp_path, monkeypatch):
    """The CUDA pipeline's bookkeeping (a pass settled only after the next one started), on the
    CPU: the same rows in the same order, errors included."""
    paths = _files(tmp_path) + [tmp_path / "missing.jpg"]
    plain = list(engine.score_paths(tiny, paths, batch_size=2))
    arrays = [_photo(64, 96, i) for i in range(5)] + [_photo(70, 90, 9)]
    outcomes, _ = engine.score_arrays(tiny, arrays, batch_size=2)
    monkeypatch.setattr(engine, "_in_flight", lambda runner: 1)
    assert list(engine.score_paths(tiny, paths, batch_size=2)) == plain
    assert engine.score_arrays(tiny, arrays, batch_size=2)[0] == outcomes
