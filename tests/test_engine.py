"""The batch engine against a plain reference loop, the fused tower against the model, grouping."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from conftest import perturb_batch_norms
from qualiclip import engine, fused, heap, precision
from qualiclip.clip import CLIPConfig, build_visual
from qualiclip.images import load_image
from qualiclip.model import QualiCLIP, create_model
from qualiclip.reading import Decoded

ATOL = 1e-5  # the engine's promise: fp32 scores equal the reference pipeline's to 1e-5


def _perturb_batch_norms(model: nn.Module, seed: int = 1) -> None:
    """Random BN statistics and affine terms, so folding them is really tested (init is 0/1)."""
    perturb_batch_norms(model, seed)


@pytest.fixture()
def tiny() -> QualiCLIP:
    model = create_model("random-tiny")
    _perturb_batch_norms(model)
    # Larger prompt features spread the random model's scores away from a constant.
    return model.eval()


def _reference_loop(model: QualiCLIP, paths: list[Path]) -> list[float | None]:
    """Per image: decode, convert, normalise, one fp32 forward with full N x N pooling, batch 1."""
    model.visual.attnpool.full_attention = True
    out: list[float | None] = []
    try:
        for p in paths:
            try:
                x = load_image(p, min_size=model.min_size)[None]
            except ValueError:
                out.append(None)
                continue
            with torch.no_grad():
                out.append(float(model(x)[0]))
    finally:
        model.visual.attnpool.full_attention = False
    return out


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _write_inputs(folder: Path) -> list[Path]:
    sizes = [(64, 96), (96, 64), (64, 96), (70, 90), (64, 96), (96, 64), (64, 96), (64, 96)]
    paths = []
    for i, (h, w) in enumerate(sizes):
        ext = ".jpg" if i % 2 else ".png"
        p = folder / f"img{i}{ext}"
        Image.fromarray(_photo(h, w, i)).save(p)
        paths.append(p)
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    small = folder / "small.png"
    Image.fromarray(_photo(16, 40, 99)).save(small)
    deep = folder / "deep.png"  # 16-bit greyscale: the engine must keep its 16 bits
    grey16 = (np.linspace(0, 65535, 64 * 96).reshape(64, 96)).astype(np.uint16)
    Image.fromarray(grey16).save(deep)
    missing = folder / "missing.png"
    # Errors in between valid images of the same size, so groups span them.
    return [*paths[:3], corrupt, *paths[3:5], small, deep, missing, *paths[5:]]


@pytest.mark.parametrize("batch_size,lookahead", [(1, 1), (3, 4), (8, 32)])
@pytest.mark.slow
def test_engine_equals_reference_loop(tmp_path, tiny, batch_size, lookahead):
    paths = _write_inputs(tmp_path)
    expected = _reference_loop(tiny, paths)
    results = list(
        engine.score_paths(tiny, paths, batch_size=batch_size, lookahead=lookahead, workers=2)
    )
    assert [r.path for r in results] == [str(p) for p in paths]
    for r, e in zip(results, expected, strict=True):
        if e is None:
            assert r.score is None and r.error, r
        else:
            assert r.error is None and r.score is not None, r
            assert abs(r.score - e) <= ATOL, (r.path, r.score, e)
    assert sum(r.ok for r in results) == 9
    assert "corrupt" in (results[3].error or "") or results[3].error
    assert "too small" in (results[6].error or "")
    by_name = {Path(r.path).name: r for r in results}
    assert (by_name["img1.jpg"].width, by_name["img1.jpg"].height) == (64, 96)


def test_engine_scores_differ_between_images(tmp_path, tiny):
    """Guards the equality test against a model whose scores do not depend on the image."""
    paths = _write_inputs(tmp_path)
    scores = [r.score for r in engine.score_paths(tiny, paths) if r.ok]
    assert max(scores) - min(scores) > 1e-4


def test_unfused_and_fused_agree_and_accept_generators(tmp_path, tiny):
    paths = _write_inputs(tmp_path)
    fused = [r.score for r in engine.score_paths(tiny, (p for p in paths), batch_size=4)]
    plain = [r.score for r in engine.score_paths(tiny, paths, batch_size=4, fuse=False)]
    for a, b in zip(fused, plain, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert abs(a - b) <= ATOL


@pytest.mark.parametrize("use_mkldnn", [True, False])
@pytest.mark.parametrize("relu,residual", [(True, False), (False, False), (True, True)])
def test_fused_conv_equals_conv_then_batch_norm(use_mkldnn, relu, residual):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    bn = nn.BatchNorm2d(16)
    _perturb_batch_norms(bn)
    bn.eval()
    fconv = fused.FusedConv(conv, bn, relu=relu)
    fconv.use_mkldnn = use_mkldnn and fconv.use_mkldnn
    x = torch.randn(2, 8, 21, 30).contiguous(memory_format=torch.channels_last)
    other = torch.randn(2, 16, 11, 15)
    with torch.no_grad():
        expected = bn(conv(x)) + (other if residual else 0)
        expected = expected.relu() if relu else expected
        got = fconv(x, other.clone() if residual else None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (65, 97), (128, 96)])
def test_fused_tower_features_equal_the_model(tiny, size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(3))
    tower = fused.FusedResNet(tiny.visual)
    with torch.no_grad():
        expected = tiny.visual(tiny.normalize(x))
        got = tower(tiny.normalize(x))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_score_tensors_matches_model_and_leaves_input(tiny):
    x = torch.rand(3, 3, 64, 80, generator=torch.Generator().manual_seed(4))
    before = x.clone()
    got = engine.score_tensors(tiny, x)
    with torch.no_grad():
        expected = tiny(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(x, before)


def test_model_score_runs_the_engine_in_bounded_chunks(tiny):
    x = torch.rand(5, 3, 64, 80, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = tiny(x)
    engine._PREPARED.pop(tiny, None)
    torch.testing.assert_close(engine.score(tiny, x), expected, atol=ATOL, rtol=0)
    (runner,) = (entry[1] for entry in engine._PREPARED[tiny].values())
    assert isinstance(runner.visual, fused.FusedResNet)  # the fast path, not the plain model
    # Chunks of two images, then one: the same scores as one pass.
    chunked = engine.score_tensors(tiny, x, max_batch_pixels=2 * 64 * 80 + 1)
    torch.testing.assert_close(chunked, expected, atol=ATOL, rtol=0)
    assert engine.score_tensors(tiny, x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="fp16"):
        engine.score(tiny, x, precision="fp16")
    with pytest.raises(ValueError, match="batch"):
        engine.score_tensors(tiny, x[0])


def test_prepared_copy_follows_weight_changes(tiny):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    first = engine.score_tensors(tiny, x)
    assert engine.prepare(tiny) is engine.prepare(tiny)  # cached while unchanged
    _perturb_batch_norms(tiny, seed=7)  # in-place, as an optimiser step or load_state_dict
    with torch.no_grad():
        expected = tiny(x)
    got = engine.score_tensors(tiny, x)
    assert abs(float(got[0]) - float(first[0])) > 1e-6
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_bf16_is_close_to_fp32(tiny):
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    with pytest.warns(RuntimeWarning) if not precision.native_bf16(tiny.device) else _no_warning():
        bf16 = engine.score_tensors(tiny, x, "bf16")
    fp32 = engine.score_tensors(tiny, x)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=2e-2, rtol=0)


def test_bf16_without_onednn_bf16_runs_pytorch_convolutions(tiny, monkeypatch):
    """On CPUs whose oneDNN has no bf16 kernels (AVX2-only), bf16 takes PyTorch's convolution."""
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    fp32 = engine.score_tensors(tiny, x)
    monkeypatch.setattr(fused, "onednn_bf16_works", lambda: False)
    calls: list[torch.dtype] = []
    conv2d = fused.F.conv2d

    def spy(inp: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(inp.dtype)
        return conv2d(inp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fused.F, "conv2d", spy)
    engine._PREPARED.pop(tiny, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bf16 = engine.score_tensors(tiny, x, "bf16")
    runner = engine.prepare(tiny, "bf16")
    n_convs = sum(isinstance(m, fused.FusedConv) for m in runner.visual.modules())
    assert n_convs > 0 and calls == [torch.bfloat16] * n_convs  # one pass, every conv in bf16
    torch.testing.assert_close(bf16, fp32, atol=2e-2, rtol=0)


def test_onednn_bf16_probe_agrees_with_running_it():
    """The probe answers what running the fused bf16 convolution does on this CPU."""
    fused.onednn_bf16_works.cache_clear()
    works = fused.onednn_bf16_works()
    x = torch.rand(1, 4, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.rand(4, 4, 3, 3).to(torch.bfloat16)
    try:
        torch.ops.mkldnn._convolution_pointwise(x, w, None, [1, 1], [1, 1], [1, 1], 1, "none",
                                                [], "")
        ran = True
    except RuntimeError:
        ran = False
    assert works == ran


def test_precision_refused_up_front():
    with pytest.raises(precision.PrecisionError, match="fp16 needs a CUDA device"):
        precision.check_precision("cpu", "fp16")
    with pytest.raises(precision.PrecisionError, match="precision must be one of"):
        precision.check_precision("cpu", "int4")
    precision.check_precision("cpu", "bf16")  # any CPU runs bf16 (oneDNN or PyTorch's own kernels)
    precision.check_precision("cpu", "fp32")


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_bad_arguments_raise(tiny, tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        engine.score_tensors(tiny, torch.rand(1, 3, 64, 64), "fp16")
    with pytest.raises(ValueError, match="precision"):
        list(engine.score_paths(tiny, [], precision="int4"))  # type: ignore[arg-type]
    for kw in ("batch_size", "workers", "lookahead", "max_batch_pixels", "threads"):
        with pytest.raises(ValueError, match=kw):
            engine.score_paths(tiny, [], **{kw: 0})
    tiny.train()  # batch norms on batch statistics cannot be folded: the model runs as it is
    assert engine.prepare(tiny).visual is tiny.visual


def test_any_scorer_module_is_accepted():
    class MeanScorer(nn.Module):
        device = torch.device("cpu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))

    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(engine.score_tensors(MeanScorer(), x), x.mean(dim=(1, 2, 3)))


def test_threads_setting_is_restored(tmp_path, tiny):
    before = torch.get_num_threads()
    paths = _write_inputs(tmp_path)[:2]
    assert all(r.ok for r in engine.score_paths(tiny, paths, threads=1))
    assert torch.get_num_threads() == before


def test_large_images_go_one_per_batch(tmp_path, tiny, monkeypatch):
    sizes: list[int] = []
    real = engine._run_batch

    def spy(runner, items):  # type: ignore[no-untyped-def]
        sizes.append(len(items))
        return real(runner, items)

    monkeypatch.setattr(engine, "_run_batch", spy)
    paths = []
    for i in range(3):
        p = tmp_path / f"big{i}.png"
        Image.fromarray(_photo(96, 128, i)).save(p)
        paths.append(p)
    rows = list(engine.score_paths(tiny, paths, batch_size=8, max_batch_pixels=96 * 128))
    assert all(r.ok for r in rows) and sizes == [1, 1, 1]


def test_vit_tower_is_scored_unfused(tmp_path):
    config = CLIPConfig(32, 32, 1, 64, 16, transformer_layers=0)
    torch.manual_seed(0)
    model = QualiCLIP(build_visual(config), torch.randn(7, 2, 32)).eval()
    p = tmp_path / "a.png"
    Image.fromarray(_photo(32, 32, 1)).save(p)
    (row,) = engine.score_paths(model, [p])
    with torch.no_grad():
        expected = float(model(load_image(p)[None])[0])
    assert row.score is not None and abs(row.score - expected) <= ATOL


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([(4, 4), (4, 8), (8, 4), (16, 16)]), max_size=40),
    batch_size=st.integers(1, 5),
    lookahead=st.integers(1, 8),
)
@pytest.mark.slow
def test_grouper_batches_equal_sizes_within_bounds(sizes, batch_size, lookahead):
    grouper = engine._Grouper(batch_size, max_batch_pixels=200, lookahead=lookahead,
                              max_pixels=10**9)
    seen: list[int] = []
    batches = []
    for i, (h, w) in enumerate(sizes):
        item = Decoded(i, str(i), np.zeros((h, w, 3), np.uint8), None)
        batches += list(grouper.add(item))
        assert grouper.count < lookahead
    batches += list(grouper.drain())
    for batch in batches:
        shapes = {b.pixels.shape for b in batch if b.pixels is not None}
        assert len(shapes) == 1
        h, w, _ = shapes.pop()
        assert 1 <= len(batch) <= max(1, min(batch_size, 200 // (h * w)))
        seen += [b.index for b in batch]
    assert sorted(seen) == list(range(len(sizes)))


_FAULTS_SCRIPT = """
import resource, sys, torch
from qualiclip import engine, heap  # as scoring runs: the engine's imports settle the heap first
applied = heap.reuse_freed_memory()
def faults_of_one_map():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)  # a 64 MiB feature map, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):  # (the first maps settle the heap; an aligned block needs some slack)
    faults_of_one_map()
with heap._allocator_as_is():  # a very large pass: maps come fresh and go back
    fresh = faults_of_one_map()
for _ in range(3):
    faults_of_one_map()
print(applied, faults_of_one_map(), fresh)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("env_value", ["1", "0"])
@pytest.mark.slow
def test_freed_feature_maps_are_reused_unless_opted_out(env_value):
    env = {**os.environ, heap.REUSE_MEMORY_ENV: env_value}
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    applied, faults, fresh = out[0] == "True", int(out[1]), int(out[2])
    pages = 64 * 2**20 // 4096
    assert fresh > pages // 2  # a fresh mapping: a fault per page
    if env_value == "0":
        assert not applied and faults > pages // 2
    else:
        assert applied and faults < pages // 20  # the freed block is reused (again)


_LIBRARY_SCRIPT = """
import sys, torch, qualiclip
from qualiclip import cli, heap
model = qualiclip.create_model("random-tiny")
qualiclip.score(model, torch.rand(3, 64, 64))
print(heap.reusing_freed_memory())
cli.main(["score", sys.argv[1], "--model", "random-tiny", "--no-progress"])
print(heap.reusing_freed_memory())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.slow
def test_the_allocator_is_tuned_by_the_command_not_by_a_library_call(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "a.png")
    env = {k: v for k, v in os.environ.items() if k != heap.REUSE_MEMORY_ENV}
    out = subprocess.run([sys.executable, "-c", _LIBRARY_SCRIPT, str(tmp_path / "a.png")],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"  # scoring through the library left malloc alone
    assert out[-1] == "True"  # the command made the choice


def test_very_large_passes_score_the_same(tiny, monkeypatch):
    heap.reuse_freed_memory()  # as the command makes it: very large passes step around it
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = tiny(x)
    monkeypatch.setattr(heap, "LARGE_PASS_PIXELS", 1)  # every pass counts as very large
    torch.testing.assert_close(engine.score_tensors(tiny, x), expected, atol=ATOL, rtol=0)


def test_heap_valve_trims_only_past_twice_the_largest_working_set():
    # Resident size after each pass, above a floor of 100: a working set of 50 with kept blocks
    # creeping up, then larger images (a working set of 300).
    passes = [
        (150, False),  # the first pass: working set 50
        (160, False), (200, False),  # 100 held: not more than 2 x 50
        (201, True),  # 101 held: trimmed
        (150, False),  # measured afresh: still 50
        (400, True),  # a larger image: 300 held > 100, trimmed
        (400, False),  # measured afresh: working set 300
        (700, False),  # 600 held: not more than 2 x 300
        (701, True),
    ]
    readings = iter([100] + [r for r, _ in passes] + [1100, 1400, 1401])
    trims: list[int] = []
    valve = heap.HeapValve(factor=2.0, resident=lambda: next(readings),
                             trim=lambda: trims.append(1))
    for reading, trimmed in passes:
        before = len(trims)
        valve.before_pass(pixels=10)  # reads the floor once, before the first pass
        valve.after_pass()
        assert (len(trims) > before) == trimmed, reading
    assert valve.working_set == 300 and valve.trims == 3
    # A pass over more pixels than any before is measured, not judged: 1000 held, working set 1000.
    valve.before_pass(pixels=40)
    valve.after_pass()
    assert valve.working_set == 1000 and valve.trims == 3
    valve.before_pass(pixels=40)
    valve.after_pass()  # 1300 held: within 2 x 1000
    assert valve.trims == 3


def test_the_pass_frees_its_input_after_the_first_convolution(tiny):
    """A very large image's float pixels do not live through the whole forward pass."""
    import weakref

    runner = engine.prepare(tiny)
    assert isinstance(runner.visual, fused.FusedResNet)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = tiny(x.clone())
    alive: list[bool] = []
    ref = weakref.ref(x)
    hook = runner.visual.stem[1].register_forward_pre_hook(
        lambda module, args: alive.append(ref() is not None)
    )
    try:
        box = [x]
        del x
        got = runner.run_owned(box)
    finally:
        hook.remove()
    assert alive == [False] and box == []  # gone before the second convolution ran
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
