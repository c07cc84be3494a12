"""Scoring speed and memory: qualiclip's engine against a reference-style loop (issues 6, 21).

Usage:
    python benchmarks/bench_score.py [--images 8] [--size 1024x768]
        [--precisions fp32,bf16,int8,auto] [--repeats 3] [--batch-size 8] [--workers 2]
        [--device cpu] [--memory-size 4000x3000] [--no-memory]

One run, on the same JPEG files and the same RN50-sized QualiCLIP with random weights (speed does
not depend on the weights; batch norms get random statistics so none is an identity):

* **reference**: per image, decode with PIL, convert, normalise, one fp32 forward with full N x N
  attention pooling (``attnpool.full_attention = True``), batch 1, default memory format;
* **engine**: :func:`qualiclip.engine.score_paths` in each precision (CPU default: fp32, bf16,
  int8 and auto; int8 is calibrated before the timed passes, and auto's row names what it chose);
* **fp32 no-reuse** (CPU): the engine in fp32 with ``QUALICLIP_REUSE_MEMORY=0``, to show what
  reusing freed feature maps gains (``qualiclip.heap.reuse_freed_memory``);
* **onnx** (CPU, when onnxruntime is installed; ``--no-onnx`` skips it): the same model exported
  with :func:`qualiclip.onnx_export.export_onnx` (uint8 input, fp32) and scored by
  :func:`~qualiclip.engine.score_paths` through :class:`qualiclip.onnx_scorer.OnnxScorer`, so
  decoding and batching are the engine's and only the forward pass differs. Also printed: the
  graph's file size and its load time (session creation in a fresh process).

Ceilings and GPU rows (``--ceilings``, on by default; ``--no-ceilings`` leaves them out):

* **compute P**: the prepared tower (:func:`qualiclip.engine.prepare`) on a batch of
  ``--batch-size`` random images already on the device, in precision P (the fastest the engine
  could go if decoding and copying were free);
* **decode cpu**: decoding alone, in the engine's ``--workers`` threads; **decode gpu** (CUDA):
  nvJPEG through torchvision, batches of 64 (a failed row says when torchvision is missing);
* on CUDA, the reference runs under fp16 autocast (the authors' setting), and the engine also
  runs in fp16 with ``decode="gpu"`` and, with ``--compile``, with ``torch.compile`` (those
  compile once per size: the warm-up pass pays for it).

``--device cuda`` example (512 photos as the GPU figures in ``docs/performance.md``)::

    python benchmarks/bench_score.py --device cuda --images 512 --batch-size 32 --workers 14 \
        --compile --no-memory

Each run is a fresh subprocess (so its peak RSS is its own) that warms up on one image, then times
``--repeats`` passes over all the photos; the fastest pass counts, as the fastest matmul does for
the peak. Printed: the CPU's flags, images per second, the ratios to the reference and to the
engine's fp32, peak RSS, achieved GFLOP/s (FLOPs of what each run computes, counted by
``torch.utils.flop_counter`` on one image: the engine's attention pooling does less work than the
reference's; int8 runs count the same operations, as GOP/s) against the matmul peak of the row's
own precision measured in the same run (fp32: a 4096^2 ``torch.mm`` on the same threads, best of
the measurements before and after each run; bf16: the same in bf16; int8: ONNX Runtime's
``MatMulInteger``, uint8 x int8 with constant weights, the kernel family of int8's convolutions),
the seconds of every pass, and the largest score difference of each run against the engine's
fp32.

Then peak memory for one ``--memory-size`` image: the engine against the reference loop, the latter
under an address-space cap (``--memory-cap-gib``), retried at smaller sizes if it does not survive.

Photos: ``$QUALICLIP_SHARED/data/pristine`` or ``../shared/data/pristine`` (Kodak and LIVE,
768x512), scaled to cover ``--size`` and centre-cropped; the built-in set of ``builtin_photos.py``
otherwise.
Targets (issue 6): engine fp32 >= 1.1x the reference and >= 70% of the matmul peak; engine bf16
>= 2x the reference. Issue 21 (ratios to the engine's fp32): int8 >= 1.5x on AVX2-only CPUs and
>= 2x with VNNI or AMX; on AMX the fastest precision >= 4x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from builtin_photos import photo_paths

FP32_SPEEDUP, FP32_PEAK_FRACTION, BF16_SPEEDUP = 1.1, 0.70, 2.0
INT8_SPEEDUP_AVX2, INT8_SPEEDUP_VNNI, AMX_FASTEST_SPEEDUP = 1.5, 2.0, 4.0
#: CPU flags worth printing beside the figures (what the precisions' kernels use).
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
               "amx_tile", "amx_bf16", "amx_int8", "asimddp")


# --- inputs ------------------------------------------------------------------------------------


def _sources() -> list[np.ndarray]:
    with tempfile.TemporaryDirectory() as scratch:
        paths, which = photo_paths(None, Path(scratch), count=8)
        print(which, flush=True)
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _cover_crop(arr: np.ndarray, width: int, height: int) -> Image.Image:
    im = Image.fromarray(arr)
    scale = max(width / im.width, height / im.height)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    im = im.resize(size, Image.Resampling.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    return im.crop((left, top, left + width, top + height))


def write_photos(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """``count`` JPEGs (quality 90) of exactly ``width`` x ``height``."""
    sources = _sources()
    paths = []
    for i in range(count):
        path = folder / f"photo{i:04d}_{width}x{height}.jpg"
        _cover_crop(sources[i % len(sources)], width, height).save(path, quality=90)
        paths.append(path)
    return paths


# --- model, FLOPs, matmul peak -----------------------------------------------------------------


def build_model(device: str) -> Any:
    from qualiclip.model import create_model

    model = create_model("random-rn50", device=device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def count_gflop(model: Any, width: int, height: int, full_attention: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.visual.attnpool.full_attention = full_attention
    x = torch.rand(1, 3, height, width, device=model.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    model.visual.attnpool.full_attention = False
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(device: str, dtype: torch.dtype = torch.float32, n: int = 4096) -> float:
    """Best of 5 ``n x n`` matmuls, in GFLOP/s (TF32 off on CUDA: single precision proper)."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def int8_matmul_peak_gops(n: int = 2048, threads: int | None = None) -> float | None:
    """Best of 4 ``n x n`` uint8 x int8 -> int32 products in ONNX Runtime (``MatMulInteger``,
    weights constant as a quantised convolution's are), in GOP/s; None without onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.integers(-64, 64, (n, n), dtype=np.int8), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, {"a": a})
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- one measured run (in a child process) -----------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_reference(model: Any, paths: list[str], device: str) -> list[float]:
    """The reference pipeline: per image decode, convert, normalise, full-attention forward
    (under fp16 autocast on CUDA, as the authors run it)."""
    model.visual.attnpool.full_attention = True
    scores = []
    cuda = device.startswith("cuda")
    for path in paths:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)[None].to(device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            scores.append(float(model(x)[0]))  # the model normalises with CLIP's mean/std
    return scores


def run_engine(model: Any, paths: list[str], precision: str, batch: int, workers: int,
               decode: str = "cpu", compile: bool = False) -> list:
    from qualiclip.engine import score_paths

    extra: dict[str, Any] = {"decode": decode} if decode != "cpu" else {}
    if compile:
        extra["compile"] = True
    rows = list(score_paths(model, paths, batch_size=batch, workers=workers, precision=precision,
                            **extra))
    failed = [r for r in rows if not r.ok]
    if failed:
        raise RuntimeError(f"engine failed on {failed[0].path}: {failed[0].error}")
    return [r.score for r in rows]


def run_compute(model: Any, files: list[str], spec: dict[str, Any]) -> list[float]:
    """The prepared tower on ready device batches: as many images as ``files``, no decoding."""
    from qualiclip.engine import prepare

    runner = prepare(model, spec["precision"], compile=spec.get("compile", False))
    with Image.open(files[0]) as im:
        w, h = im.size
    g = torch.Generator().manual_seed(0)
    ready = torch.rand(spec["batch"], 3, h, w, generator=g).to(model.device)
    ready = ready.contiguous(memory_format=torch.channels_last)
    done: list[float] = []
    with torch.inference_mode():
        while len(done) < len(files):
            n = min(spec["batch"], len(files) - len(done))
            done += runner(ready[:n].clone()).float().cpu().tolist()  # clone: normalised in place
    return done


def run_decode(files: list[str], spec: dict[str, Any]) -> list[float]:
    """Decoding alone: the engine's CPU threads, or nvJPEG in batches of 64 (``gpu``)."""
    if spec["decoder"] == "gpu":
        from torchvision.io import ImageReadMode, decode_jpeg

        sizes: list[float] = []
        for i in range(0, len(files), 64):
            data = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8)
                    for f in files[i:i + 64]]
            out = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
            sizes += [float(t.shape[-1]) for t in out]
        return sizes
    from qualiclip.reading import decoded_in_order

    workers = spec["workers"]
    items = decoded_in_order(files, 32, workers, prefetch=max(2, 2 * workers))
    return [float(it.pixels.shape[1]) if it.pixels is not None else 0.0 for it in items]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement described by ``spec``; warm up on the first file, then time all."""
    if spec.get("cap_gib"):
        cap = int(spec["cap_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    paths, device = spec["paths"], spec["device"]
    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)  # the emulated-bf16 notice; printed by us
    from qualiclip import heap

    heap.reuse_freed_memory()  # as the command runs (QUALICLIP_REUSE_MEMORY=0 refuses it)

    load_s = None
    if spec["mode"] == "onnx":
        from qualiclip.onnx_scorer import OnnxScorer

        start = time.perf_counter()
        model: Any = OnnxScorer(spec["onnx"])
        load_s = time.perf_counter() - start
    else:
        model = build_model(device)

    def once(files: list[str]) -> list[float]:
        if spec["mode"] == "reference":
            return run_reference(model, files, device)
        if spec["mode"] == "compute":
            return run_compute(model, files, spec)
        if spec["mode"] == "decode":
            return run_decode(files, spec)
        precision = "fp32" if spec["mode"] == "onnx" else spec.get("precision", spec["mode"])
        return run_engine(model, files, precision, spec["batch"], spec["workers"],
                          spec.get("decode", "cpu"), spec.get("compile", False))

    rss_start = _peak_rss_mib()
    warmup_s = None
    if spec.get("warmup", True):
        # A compiled tower compiles once per input shape: warm it up on a full batch. int8 is
        # calibrated here at first use (then read from the cache).
        start = time.perf_counter()
        once(paths[:spec["batch"]] if spec.get("compile") else paths[:1])
        warmup_s = time.perf_counter() - start
    peak_before = matmul_peak_gflops(device) if spec.get("peak", True) else None
    passes = []
    for _ in range(spec.get("repeats", 1)):
        _sync(device)
        start = time.perf_counter()
        scores = once(paths)
        _sync(device)
        passes.append(time.perf_counter() - start)
    seconds = min(passes)
    peak_after = matmul_peak_gflops(device) if spec.get("peak", True) else None
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {
        "seconds": seconds,
        "passes": passes,
        "images_per_s": len(paths) / seconds,
        "scores": scores,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_at_start_mib": rss_start,
        "peak_gpu_mib": peak_gpu,
        "matmul_peak": max(peak_before, peak_after) if peak_before and peak_after else None,
        "load": os.getloadavg()[0],
        "load_s": load_s,
        "warmup_s": warmup_s,
        "precision_used": _precision_used(model, spec),
    }


def _precision_used(model: Any, spec: dict[str, Any]) -> str | None:
    """The precision a run computed in (``auto`` resolved), None for decoding alone."""
    if spec["mode"] in ("reference", "onnx"):
        return "fp32"
    if spec["mode"] == "decode":
        return None
    from qualiclip.engine import prepare

    return prepare(model, spec.get("precision", spec["mode"])).precision


def spawn(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; return its result or ``{"error": ...}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ)
    if not spec.get("reuse_memory", True):
        env["QUALICLIP_REUSE_MEMORY"] = "0"  # the C allocator as it is (heap.reuse_freed_memory)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"error": f"exit status {proc.returncode}: {tail}"}


# --- the report ---------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 1024x768, got {text!r}") from None
    return w, h


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--images", type=int, default=8, help="photos to score per run")
    p.add_argument("--size", type=_size, default=(1024, 768), help="WxH of the photos")
    p.add_argument("--precisions", default=None,
                   help="engine precisions, comma-separated (default fp32,bf16,int8,auto; CUDA: "
                   "fp32,bf16,fp16)")
    p.add_argument("--compile", action="store_true",
                   help="also run the engine and the compute ceiling with torch.compile")
    p.add_argument("--no-ceilings", action="store_true",
                   help="leave out the compute-only and decode-only rows")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes over the photos per run; the fastest counts, as for the peak")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="engine decoding threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (all runs)")
    p.add_argument("--memory-size", type=_size, default=(4000, 3000))
    p.add_argument("--memory-cap-gib", type=float, default=12.0,
                   help="address-space cap for the reference's memory run")
    p.add_argument("--no-memory", action="store_true", help="skip the large-image memory part")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime run")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the runs, peaks and verdicts as JSON (scores left out)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _decode_ms(paths: list[Path]) -> tuple[float, float]:
    """Milliseconds per image to decode: serially, and with two threads (PIL drops the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from qualiclip.images import decode_rgb

    start = time.perf_counter()
    for p in paths:
        decode_rgb(p)
    serial = (time.perf_counter() - start) / len(paths) * 1e3
    with ThreadPoolExecutor(2) as pool:
        start = time.perf_counter()
        list(pool.map(decode_rgb, paths))
        threaded = (time.perf_counter() - start) / len(paths) * 1e3
    return serial, threaded


def _timing_runs(
    args: argparse.Namespace, paths: list[Path], onnx_path: Path | None
) -> dict[str, dict[str, Any]]:
    common = {"paths": [str(p) for p in paths], "device": args.device,
              "batch": args.batch_size, "workers": args.workers, "repeats": args.repeats}
    plan: list[tuple[str, dict[str, Any]]] = [("reference", {"mode": "reference"})]
    plan += [(mode, {"mode": mode}) for mode in args.precisions.split(",")]
    if args.device == "cpu" and "fp32" in args.precisions.split(","):
        # What reusing freed memory gains: the same engine with the C allocator left alone.
        plan.append(("fp32 no-reuse", {"mode": "fp32", "reuse_memory": False}))
    plan += _device_rows(args)
    if onnx_path is not None:
        plan.append(("onnx", {"mode": "onnx", "onnx": str(onnx_path)}))
    runs: dict[str, dict[str, Any]] = {}
    for label, spec in plan:
        print(f"running {label} on {len(paths)} images ...", flush=True)
        runs[label] = spawn({**common, **spec})
        if "error" in runs[label]:
            print(f"  {label} failed: {runs[label]['error']}")
    return runs


def _device_rows(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """GPU decoding and compiled runs of the engine, then the compute and decode ceilings."""
    cuda = args.device.startswith("cuda")
    best = "fp16" if cuda else "fp32"
    rows: list[tuple[str, dict[str, Any]]] = []
    if cuda:
        rows.append((f"{best} gpu-decode", {"mode": "engine", "precision": best,
                                            "decode": "gpu"}))
    if args.compile:
        rows.append((f"{best} compile", {"mode": "engine", "precision": best, "compile": True,
                                         "decode": "auto"}))
        if cuda:
            rows.append((f"{best} compile cpu-dec", {"mode": "engine", "precision": best,
                                                     "compile": True, "decode": "cpu"}))
    if args.no_ceilings:
        return rows
    from qualiclip.precision import native_bf16

    for precision in dict.fromkeys([best, *args.precisions.split(",")]):
        if precision == "auto" or (precision == "bf16"
                                   and not native_bf16(torch.device(args.device))):
            continue  # auto is one of the others; emulated bf16: no ceiling worth measuring
        rows.append((f"compute {precision}", {"mode": "compute", "precision": precision}))
    if args.compile:
        rows.append((f"compute {best} compile", {"mode": "compute", "precision": best,
                                                 "compile": True}))
    rows.append(("decode cpu", {"mode": "decode", "decoder": "cpu"}))
    if cuda:
        rows.append(("decode gpu", {"mode": "decode", "decoder": "gpu"}))
    return rows


def _print_speed(args: argparse.Namespace, runs: dict[str, dict[str, Any]],
                 peaks: dict[str, float | None], gflop_ref: float,
                 gflop_engine: float) -> list[str]:
    """The table, one row per run; returns the verdict lines.

    ``peaks``: the best matmul rate of each precision in this run (fp32 also per child run).
    """
    ref, fp32 = runs["reference"], runs.get("fp32", {})
    print(f"\n{'run':<14} {'ran':>5} {'img/s':>8} {'s/img':>7} {'x ref':>6} {'x fp32':>6} "
          f"{'GFLOP/s':>8} {'mm peak':>8} {'% peak':>7} {'load':>5} {'peak RSS':>9}  "
          "max |score - engine fp32|")
    passes: list[str] = []
    for mode, r in runs.items():
        if "error" in r:
            print(f"{mode:<14} failed: {r['error']}")
            continue
        ran = r.get("precision_used") or "-"
        gflop = gflop_ref if mode == "reference" else 0.0 if mode.startswith("decode") else (
            gflop_engine)
        achieved = gflop * r["images_per_s"]
        ratio = r["images_per_s"] / ref["images_per_s"] if "error" not in ref else float("nan")
        vs_fp32 = (f"{r['images_per_s'] / fp32['images_per_s']:6.2f}" if "images_per_s" in fp32
                   else f"{'-':>6}")
        diff = ""
        if "scores" in fp32 and not mode.startswith(("compute", "decode")):
            pairs = zip(r["scores"], fp32["scores"], strict=True)
            diff = f"{max(abs(a - b) for a, b in pairs):.2e}"
        local = (r["matmul_peak"] or peaks["fp32"]) if ran == "fp32" else peaks.get(ran)
        share = f"{100 * achieved / local:6.1f}%" if local and achieved else f"{'-':>7}"
        shown_peak = f"{local:8.1f}" if local else f"{'-':>8}"
        print(f"{mode:<14} {ran:>5} {r['images_per_s']:8.3f} {1 / r['images_per_s']:7.2f} "
              f"{ratio:6.2f} {vs_fp32} {achieved:8.1f} {shown_peak} {share} {r['load']:5.2f} "
              f"{r['peak_rss_mib']:7.0f} MiB  {diff}")
        passes.append(f"{mode}: " + ", ".join(f"{t:.2f}" for t in r.get("passes", [])))
    print("seconds per pass (the fastest counts): " + "; ".join(passes))
    warm = [f"{m}: {r['warmup_s']:.1f}" for m, r in runs.items() if r.get("warmup_s") is not None]
    print("warm-up seconds (int8's first use includes its calibration): " + "; ".join(warm))
    return _verdicts(runs, peaks, gflop_engine)


def _verdicts(runs: dict[str, dict[str, Any]], peaks: dict[str, float | None],
              gflop_engine: float) -> list[str]:
    """The targets of issues 6 and 21 against this run's figures."""
    from qualiclip.precision import cpu_int8_kind

    out: list[str] = []
    ref, fp32 = runs["reference"], runs.get("fp32", {})
    speed = {m: r["images_per_s"] for m, r in runs.items() if "images_per_s" in r}
    if "fp32" in speed and "reference" in speed:
        ratio = speed["fp32"] / ref["images_per_s"]
        out.append(_verdict(f"engine fp32 >= {FP32_SPEEDUP}x reference", ratio, FP32_SPEEDUP,
                            f"{ratio:.2f}x"))
        achieved, best = gflop_engine * speed["fp32"], peaks["fp32"] or float("nan")
        local = fp32.get("matmul_peak") or best
        out.append(_verdict(
            f"engine fp32 >= {FP32_PEAK_FRACTION:.0%} of the matmul peak measured around it",
            achieved / local, FP32_PEAK_FRACTION, f"{achieved / local:.1%} of {local:.0f}"))
        out.append(_verdict(
            f"engine fp32 >= {FP32_PEAK_FRACTION:.0%} of the best matmul peak of the whole run",
            achieved / best, FP32_PEAK_FRACTION, f"{achieved / best:.1%} of {best:.0f}"))
    if "bf16" in speed and "reference" in speed:
        ratio = speed["bf16"] / ref["images_per_s"]
        out.append(_verdict(f"engine bf16 >= {BF16_SPEEDUP}x reference", ratio, BF16_SPEEDUP,
                            f"{ratio:.2f}x"))
    if "fp32" not in speed:
        return out
    kind = cpu_int8_kind()
    if "int8" in speed:
        target = INT8_SPEEDUP_AVX2 if kind in ("avx2", "arm") else INT8_SPEEDUP_VNNI
        ratio = speed["int8"] / speed["fp32"]
        out.append(_verdict(f"engine int8 >= {target}x engine fp32 (int8 by {kind})", ratio,
                            target, f"{ratio:.2f}x"))
    if kind == "amx":
        fastest = max(speed.get(p, 0.0) for p in ("fp32", "bf16", "int8", "auto"))
        ratio = fastest / speed["fp32"]
        out.append(_verdict(f"AMX: fastest precision >= {AMX_FASTEST_SPEEDUP}x engine fp32",
                            ratio, AMX_FASTEST_SPEEDUP, f"{ratio:.2f}x"))
    return out


def _export_onnx(args: argparse.Namespace, model: Any, folder: Path) -> Path | None:
    """The benchmark model as an ONNX graph, or ``None`` (skipped, or onnx not installed)."""
    if args.no_onnx or args.device != "cpu":
        return None
    try:
        import onnxruntime  # noqa: F401

        from qualiclip.onnx_export import export_onnx
    except ImportError as exc:
        print(f"onnx run skipped: {exc} (pip install 'qualiclip[onnx]')")
        return None
    start = time.perf_counter()
    result = export_onnx(model, folder / "bench_rn50.onnx", check=False)
    print(f"exported {result.path.name} in {time.perf_counter() - start:.1f} s")
    return result.path


def _print_onnx(runs: dict[str, dict[str, Any]], onnx_path: Path | None) -> None:
    r, fp32 = runs.get("onnx", {}), runs.get("fp32", {})
    if onnx_path is None or "images_per_s" not in r:
        return
    import onnxruntime

    ratio = (f" = {r['images_per_s'] / fp32['images_per_s']:.2f}x the engine's fp32 "
             f"{fp32['images_per_s']:.3f} img/s" if "images_per_s" in fp32 else "")
    size_mb = onnx_path.stat().st_size / 1e6
    print(f"ONNX Runtime {onnxruntime.__version__} (CPU): graph {size_mb:.1f} MB, loaded in "
          f"{r['load_s']:.2f} s (fresh process); {r['images_per_s']:.3f} img/s"
          f"{ratio}")


def _write_json(path: str, runs: dict[str, dict[str, Any]], peaks: dict[str, float | None],
                verdicts: list[str], gflop_ref: float, gflop_engine: float) -> None:
    from qualiclip.precision import cpu_flags, describe_cpu

    report = {
        "torch": torch.__version__, "cpu": describe_cpu(),
        "cpu_flags": [f for f in SHOWN_FLAGS if f in cpu_flags()],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gflop_per_image": {"reference": gflop_ref, "engine": gflop_engine},
        "matmul_peaks": peaks, "verdicts": verdicts,
        "runs": {m: {k: v for k, v in r.items() if k != "scores"} for m, r in runs.items()},
    }
    Path(path).write_text(json.dumps(report, indent=2))


def _verdict(what: str, value: float, target: float, shown: str) -> str:
    return f"{'PASS' if value >= target else 'FAIL'}  {what}: {shown}"


def _memory(args: argparse.Namespace, folder: Path) -> None:
    w, h = args.memory_size
    print(f"\npeak memory for one {w}x{h} image (fresh process each, peak RSS incl. torch "
          "runtime; model built before the first figure):")
    (big,) = write_photos(folder, 1, w, h)
    base = {"device": args.device, "batch": 1, "workers": 1, "warmup": False, "peak": False}
    eng = spawn({**base, "mode": "fp32", "paths": [str(big)]})
    _print_memory(f"engine fp32 {w}x{h}", eng)
    sizes = [(w, h), (w * 3 // 4, h * 3 // 4), (w // 2, h // 2), (w // 4, h // 4)]
    for sw, sh in sizes:
        (path,) = write_photos(folder, 1, sw, sh)
        ref = spawn({**base, "mode": "reference", "paths": [str(path)],
                     "cap_gib": args.memory_cap_gib})
        _print_memory(f"reference {sw}x{sh} (cap {args.memory_cap_gib:g} GiB)", ref)
        if "error" not in ref:
            break


def _print_memory(label: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  {label:<40} did not survive: {r['error'][:160]}")
        return
    gpu = f", GPU peak {r['peak_gpu_mib']:.0f} MiB" if r.get("peak_gpu_mib") else ""
    print(f"  {label:<40} peak RSS {r['peak_rss_mib']:7.0f} MiB ({r['peak_rss_mib'] / 1024:.2f} "
          f"GiB; {r['rss_at_start_mib']:.0f} MiB with the model loaded){gpu}, {r['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.precisions is None:
        args.precisions = ("fp32,bf16,fp16" if args.device.startswith("cuda")
                           else "fp32,bf16,int8,auto")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # reaches the children
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    w, h = args.size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    from qualiclip.precision import cpu_flags, describe_cpu, native_bf16

    print(f"native bf16 on {args.device}: {native_bf16(torch.device(args.device))}; "
          f"{describe_cpu()}; flags: {' '.join(f for f in SHOWN_FLAGS if f in cpu_flags())}")
    with tempfile.TemporaryDirectory(prefix="qualiclip-bench-") as tmp:
        folder = Path(tmp)
        paths = write_photos(folder, args.images, w, h)
        serial, threaded = _decode_ms(paths)
        print(f"{len(paths)} JPEGs {w}x{h}; decode {serial:.1f} ms/image serially, "
              f"{threaded:.1f} ms/image with 2 threads")
        model = build_model("cpu")
        gflop_ref = count_gflop(model, w, h, full_attention=True)
        gflop_engine = count_gflop(model, w, h, full_attention=False)
        onnx_path = _export_onnx(args, model, folder)
        del model
        print(f"FLOPs per image: reference (N x N pooling) {gflop_ref:.1f} GFLOP, engine "
              f"(first-token pooling) {gflop_engine:.1f} GFLOP")
        peak_before = matmul_peak_gflops(args.device)
        runs = _timing_runs(args, paths, onnx_path)
        peak_after = matmul_peak_gflops(args.device)
        peak = max([peak_before, peak_after]
                   + [r["matmul_peak"] for r in runs.values() if r.get("matmul_peak")])
        bf16_peak = matmul_peak_gflops(args.device, torch.bfloat16)
        int8_peak = int8_matmul_peak_gops() if args.device == "cpu" else None
        int8_text = f"{int8_peak:.1f} GOP/s" if int8_peak else "not measured (no onnxruntime)"
        print(f"\nmatmul peak fp32: {peak_before:.1f} GFLOP/s before, {peak_after:.1f} after; "
              f"best of the run incl. around each timed run {peak:.1f}; bf16 matmul "
              f"{bf16_peak:.1f} GFLOP/s; int8 (ONNX Runtime MatMulInteger) {int8_text}; "
              f"load average {os.getloadavg()[0]:.2f}")
        peaks = {"fp32": peak, "bf16": bf16_peak, "int8": int8_peak}
        verdicts = _print_speed(args, runs, peaks, gflop_ref, gflop_engine)
        _print_onnx(runs, onnx_path)
        print()
        for line in verdicts:
            print(line)
        if args.json:
            _write_json(args.json, runs, peaks, verdicts, gflop_ref, gflop_engine)
        if not args.no_memory:
            _memory(args, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
