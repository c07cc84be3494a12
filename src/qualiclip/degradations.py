"""Synthetic distortions for QualiCLIP training: 24 types in 7 groups, 5 intensity levels each.

The types and level tables are those of KADID-10k (Lin et al., QoMEX 2019) as used by ARNIQA
(Agnolucci et al., WACV 2024), which QualiCLIP (arXiv 2403.11176) reuses. Every distortion is a pure
tensor function on a batch ``x`` of RGB images ``[B, 3, H, W]`` in ``[0, 1]`` with one level (1..5,
1 mildest) per sample; the output has the same shape, dtype and device and is clipped to ``[0, 1]``.

Randomness is split from application. :func:`sample_params` draws every random quantity a type
needs (a motion angle, a shift direction, patch positions, per-sample noise seeds) from a
``torch.Generator``; :func:`apply_distortion` is deterministic given those parameters. The two
crops of a training pair can thus receive exactly the same distortion (see :func:`distort_pairs`),
and a batch gives exactly what its samples give one by one. Every random number, parameters and
noise fields alike, is drawn on the CPU with a CPU generator and then moved to the images' device,
so a seed gives the same distortions on a CPU and on a GPU (up to float rounding in the arithmetic).

The codecs are Pillow's, run over the samples of a batch in parallel: JPEG in threads, JPEG 2000
(whose codec holds the GIL) in worker processes; see :func:`set_codec_processes`.

Where ours differs from ARNIQA's port (all documented at the function):
- colour conversions use proper RGB order (ARNIQA swaps to BGR before several Lab conversions);
- ``quantization`` takes its thresholds at equal-population quantiles of the grey histogram
  (KADID used multi-level Otsu, ARNIQA equal-width bins) and outputs bin midpoints;
- ``color_shift`` draws its direction uniformly on the full circle (ARNIQA: first quadrant only);
- ``jpeg2000`` uses up to 8 wavelet resolutions, fewer when the image is too small for 8.

The module is long because it holds the 24 distortion functions, each short, beside the one
table, sampler and composition code they share (docs/method.md §3); the colour-space
conversions they use are :mod:`qualiclip.color`'s.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(2, 3, 64, 64)
    >>> y = apply_distortion(x, "gaussian_blur", [1, 5], g)
    >>> y.shape
    torch.Size([2, 3, 64, 64])
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qualiclip import _codec as _codec_mod
from qualiclip._codec import CODEC_WORKERS
from qualiclip.color import (
    hsv_to_rgb,
    lab_to_rgb,
    rgb_to_gray,
    rgb_to_hsv,
    rgb_to_lab,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
)

Params = dict[str, Tensor]
LevelsLike = int | Sequence[int] | Tensor

DISTORTION_GROUPS: dict[str, tuple[str, ...]] = {
    "blur": ("gaussian_blur", "lens_blur", "motion_blur"),
    "color": ("color_diffusion", "color_shift", "color_saturation1", "color_saturation2"),
    "compression": ("jpeg2000", "jpeg"),
    "noise": ("white_noise", "white_noise_cc", "impulse_noise", "multiplicative_noise"),
    "brightness": ("brighten", "darken", "mean_shift"),
    "spatial": ("jitter", "non_eccentricity_patch", "pixelate", "quantization", "color_block"),
    "sharpness": ("high_sharpen", "linear_contrast_change", "non_linear_contrast_change"),
}
"""The 7 groups of docs/method.md §3 mapped to their types, in table order."""

DISTORTION_TYPES: tuple[str, ...] = tuple(t for ts in DISTORTION_GROUPS.values() for t in ts)
"""All 24 type names in table order."""

GROUP_OF: dict[str, str] = {t: g for g, ts in DISTORTION_GROUPS.items() for t in ts}

LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_blur": (0.1, 0.5, 1.0, 2.0, 5.0),  # sigma
    "lens_blur": (1, 2, 4, 6, 8),  # disk radius, px
    "motion_blur": (1, 2, 4, 6, 10),  # line length, px
    "color_diffusion": (1, 3, 6, 8, 12),
    "color_shift": (1, 3, 6, 8, 12),  # green-channel shift, px
    "color_saturation1": (0.4, 0.2, 0.1, 0.0, -0.4),  # HSV saturation factor
    "color_saturation2": (1, 2, 3, 6, 9),  # CIELAB a/b factor
    "jpeg2000": (16, 32, 45, 120, 170),  # compression ratio
    "jpeg": (43, 36, 24, 7, 4),  # quality
    "white_noise": (0.001, 0.002, 0.003, 0.005, 0.01),  # variance
    "white_noise_cc": (0.0001, 0.0005, 0.001, 0.002, 0.003),  # variance (YCbCr)
    "impulse_noise": (0.001, 0.005, 0.01, 0.02, 0.03),  # density
    "multiplicative_noise": (0.001, 0.005, 0.01, 0.02, 0.05),  # variance
    "brighten": (0.1, 0.2, 0.4, 0.7, 1.1),
    "darken": (0.05, 0.1, 0.2, 0.4, 0.8),
    "mean_shift": (0.0, 0.08, -0.08, 0.15, -0.15),
    "jitter": (0.05, 0.1, 0.2, 0.5, 1.0),  # std of the displacement, px
    "non_eccentricity_patch": (20, 40, 60, 80, 100),  # number of patches
    "pixelate": (0.01, 0.05, 0.1, 0.2, 0.5),  # strength
    "quantization": (20, 16, 13, 10, 7),  # number of levels
    "color_block": (2, 4, 6, 8, 10),  # number of blocks
    "high_sharpen": (1, 2, 3, 6, 12),  # unsharp amount
    "linear_contrast_change": (0.0, 0.15, -0.4, 0.3, -0.6),
    "non_linear_contrast_change": (0.4, 0.3, 0.2, 0.1, 0.05),  # output half-range
}
"""The 5 parameter values of each type, level 1 (mildest) to level 5 (strongest)."""

NUM_LEVELS = 5
_NOISE_SEEDED = ("white_noise", "white_noise_cc", "impulse_noise", "multiplicative_noise", "jitter")
_MAX_PATCHES = 100  # non_eccentricity_patch at level 5
_MAX_BLOCKS = 10  # color_block at level 5


@dataclass(frozen=True)
class Composition:
    """An ordered set of distortion types from distinct groups, applied one after another.

    Attributes:
        types: type names (keys of :data:`LEVELS`), at most one per group, in application order.
    """

    types: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in self.types:
            _check_name(name)
        groups = [GROUP_OF[t] for t in self.types]
        if len(set(groups)) != len(groups):
            raise ValueError(f"a composition takes at most one type per group, got {self.types}")


# --- validation --------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in LEVELS:
        valid = ", ".join(DISTORTION_TYPES)
        raise ValueError(f"unknown distortion type {name!r}; valid types: {valid}")


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor in [0, 1], got {x.dtype}")


def as_levels(levels: LevelsLike, batch_size: int) -> Tensor:
    """Validate levels and return them as a CPU ``LongTensor`` of shape ``[batch_size]``.

    Args:
        levels: one level for the whole batch, or one per sample; each in 1..5.
        batch_size: number of samples.

    Returns:
        The levels, one per sample.
    """
    t = torch.as_tensor(levels).detach().cpu()
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError(f"levels must be integers in 1..{NUM_LEVELS}, got {t.tolist()}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch_size).clone()
    if t.numel() != batch_size:
        raise ValueError(f"got {t.numel()} levels for a batch of {batch_size}")
    if t.numel() and (int(t.min()) < 1 or int(t.max()) > NUM_LEVELS):
        raise ValueError(f"levels must be in 1..{NUM_LEVELS}, got {t.tolist()}")
    return t


# --- random parameters -------------------------------------------------------------------------


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """The CPU generator every draw of a call is made with.

    CPU and CUDA generators seeded alike give different streams, so drawing on the images'
    device would tie the distortions to the device. A CPU generator (or ``None``, torch's global
    CPU generator) is used as is. A generator of another device is used for one draw only: a
    63-bit seed for a fresh CPU generator that then makes every draw of the call, so the result
    stays a deterministic function of that generator's state (checkpointing its state still gives
    exact resume) but, unlike a CPU generator, not of its seed alone across device types.
    """
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device)
    return torch.Generator().manual_seed(int(seed.item()))


def _draw(kind: str, shape: tuple[int, ...], generator: torch.Generator | None,
          dtype: torch.dtype | None = None) -> Tensor:
    """Every random number of this module comes from here, drawn on the CPU.

    ``kind`` is ``"uniform"`` ([0, 1)) or ``"normal"``; ``generator`` must be a CPU generator or
    ``None`` (see :func:`_cpu_generator`). Drawing on the CPU and moving the result to the images'
    device makes a seed mean the same numbers on every device; the fields are at most a few
    values per pixel, cheap next to the distortions that use them.
    """
    fn = torch.randn if kind == "normal" else torch.rand
    return fn(shape, generator=generator, dtype=dtype, device="cpu")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    return _draw("uniform", shape, generator)


def sample_params(name: str, batch_size: int, generator: torch.Generator | None = None) -> Params:
    """Draw the random parameters of one distortion type for a batch.

    Geometric parameters (angles, shifts, patch positions, colours) are stored as fractions or
    angles independent of the image size; noise is represented by one integer seed per sample.

    Args:
        name: distortion type.
        batch_size: number of samples.
        generator: source of randomness; ``None`` uses torch's global generator. Draws are made
            on the CPU, so a CPU generator's seed gives the same parameters and noise fields for
            images on any device; a CUDA generator only seeds a CPU one (:func:`_cpu_generator`).

    Returns:
        A dict of CPU tensors, first dimension ``batch_size`` (empty for deterministic types).
    """
    _check_name(name)
    generator = _cpu_generator(generator)
    b = batch_size
    if name in _NOISE_SEEDED:
        seeds = (_rand((b,), generator) * 2.0**52).long()
        return {"seed": seeds}
    if name == "motion_blur":
        return {"angle": _rand((b,), generator) * math.pi}
    if name == "color_shift":
        return {"angle": _rand((b,), generator) * 2 * math.pi}
    if name == "non_eccentricity_patch":
        return {"src": _rand((b, _MAX_PATCHES, 2), generator),
                "offset": _rand((b, _MAX_PATCHES, 2), generator)}
    if name == "color_block":
        return {"pos": _rand((b, _MAX_BLOCKS, 2), generator),
                "color": _rand((b, _MAX_BLOCKS, 3), generator)}
    return {}


def _seeded_noise(seeds: Tensor, shape: tuple[int, ...], device: torch.device, kind: str,
                  dtype: torch.dtype) -> Tensor:
    """One independent noise tensor per sample, each from its own seed (batch == looped).

    Drawn on the CPU whatever ``device`` is (see :func:`_draw`), then moved there. Each sample
    has its own generator, so the samples are drawn in threads (torch's samplers release the GIL)
    with the same result as one after another.
    """

    def one(seed: int) -> Tensor:
        return _draw(kind, shape, torch.Generator().manual_seed(int(seed)), dtype)

    out = list(_threads().map(one, seeds.tolist()))
    noise = torch.stack(out) if out else torch.empty((0, *shape), dtype=dtype)
    return noise.to(device)


# --- filters -----------------------------------------------------------------------------------


def _gaussian_1d(sigma: float, half: int | None = None) -> Tensor:
    """Normalised Gaussian of size 2*ceil(2*sigma)+1 (the size rule of KADID) or 2*half+1."""
    half = math.ceil(2 * sigma) if half is None else half
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-(t * t) / (2 * sigma * sigma))
    g[g < torch.finfo(torch.float64).eps * g.max()] = 0  # as fspecial: drop negligible taps
    return (g / g.sum()).float()


def _gaussian_blur(x: Tensor, sigma: float, half: int | None = None) -> Tensor:
    """Separable Gaussian blur with replicated borders, any channel count."""
    k = _gaussian_1d(sigma, half).to(x)
    r = k.numel() // 2
    if r == 0:
        return x
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                 groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"),
                    k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _filter2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Correlate every channel with ``kernel`` ``[k, k]`` (shared) or ``[B, k, k]`` (per sample)."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape[-2:]
    xp = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    kernel = kernel.to(x)
    if kernel.dim() == 2:
        return F.conv2d(xp, kernel.expand(c, 1, kh, kw), groups=c)
    weight = kernel[:, None].expand(b, c, kh, kw).reshape(b * c, 1, kh, kw)
    out = F.conv2d(xp.reshape(1, b * c, *xp.shape[-2:]), weight, groups=b * c)
    return out.reshape(b, c, h, w)


@functools.lru_cache(maxsize=16)
def _disk_kernel(radius: int) -> Tensor:
    """Pillbox of the given radius: each tap is the pixel's area covered by the disk."""
    sub = 16  # supersampling per pixel side; area error well under 1%
    off = (torch.arange(sub, dtype=torch.float64) + 0.5) / sub - 0.5
    t = (torch.arange(-radius, radius + 1, dtype=torch.float64)[:, None] + off).reshape(-1)
    inside = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius * radius).double()
    n = 2 * radius + 1
    k = inside.reshape(n, sub, n, sub).mean((1, 3))
    return (k / k.sum()).float()


def _motion_kernels(length: float, angles: Tensor) -> Tensor:
    """Anti-aliased line kernels ``[B, k, k]`` of ``length`` px at ``angles`` (radians).

    Each tap weighs ``max(0, 1 - d)`` with ``d`` its distance to the segment, as MATLAB's
    ``fspecial('motion')`` used by KADID; length 1 is the identity.
    """
    half = (max(1.0, length) - 1) / 2
    r = math.ceil(half)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    py, px = torch.meshgrid(t, t, indexing="ij")
    dx, dy = torch.cos(angles.double())[:, None, None], -torch.sin(angles.double())[:, None, None]
    proj = (px * dx + py * dy).clamp(-half, half)
    dist = torch.sqrt((px - proj * dx) ** 2 + (py - proj * dy) ** 2)
    k = (1 - dist).clamp(min=0)
    return (k / k.sum((1, 2), keepdim=True)).float()


def _per_value(x: Tensor, values: Tensor, params: Params,
               fn: Callable[[Tensor, float, Params], Tensor]) -> Tensor:
    """Run ``fn(x_sub, value, params_sub)`` once per distinct level value in the batch.

    Used where a level changes a shape (kernel size, image size, number of bins).
    """
    vals = values.tolist()
    if len(set(vals)) == 1:
        return fn(x, float(vals[0]), params)
    out = torch.empty_like(x)
    for v in sorted(set(vals)):
        idx = torch.tensor([i for i, u in enumerate(vals) if u == v], device=x.device)
        sub = {k: t[idx.cpu()] for k, t in params.items()}
        out[idx] = fn(x[idx], float(v), sub)
    return out


def _col(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x).view(-1, 1, 1, 1)


# --- blur --------------------------------------------------------------------------------------


def _d_gaussian_blur(x: Tensor, v: Tensor, p: Params) -> Tensor:
    return _per_value(x, v, p, lambda xs, s, _: _gaussian_blur(xs, s))


def _d_lens_blur(x: Tensor, v: Tensor, p: Params) -> Tensor:
    return _per_value(x, v, p, lambda xs, r, _: _filter2d(xs, _disk_kernel(int(r))))


def _d_motion_blur(x: Tensor, v: Tensor, p: Params) -> Tensor:
    def one(xs: Tensor, length: float, ps: Params) -> Tensor:
        if length <= 1:
            return xs
        return _filter2d(xs, _motion_kernels(length, ps["angle"]))

    return _per_value(x, v, p, one)


# --- colour ------------------------------------------------------------------------------------


def _d_color_diffusion(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Blur the CIELAB chroma with sigma 1.5*amount+2, then scale it by amount (KADID)."""

    def one(xs: Tensor, amount: float, _: Params) -> Tensor:
        lab = rgb_to_lab(xs)
        ab = _gaussian_blur(lab[:, 1:], 1.5 * amount + 2) * amount
        return lab_to_rgb(torch.cat([lab[:, :1], ab], 1))

    return _per_value(x, v, p, one)


def _percentile(t: Tensor, q: float) -> Tensor:
    """Per-sample percentile of ``[B, N]`` by rank (as ARNIQA's ``perc``)."""
    n = t.shape[1]
    i = min(max(round(n * q / 100.0), 1), n) - 1
    return t.kthvalue(i + 1, dim=1).values


def _d_color_shift(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Shift green by ``amount`` px, blended in where a smoothed edge map is strong (KADID)."""
    b, _, h, w = x.shape
    g = F.pad(rgb_to_gray(x), (1, 1, 1, 1), mode="replicate")
    gx = (g[..., 1:-1, 2:] - g[..., 1:-1, :-2]) / 2
    gy = (g[..., 2:, 1:-1] - g[..., :-2, 1:-1]) / 2
    e = _gaussian_blur(torch.sqrt(gx * gx + gy * gy), 4.0).flatten(1)
    lo, hi = e.min(1, keepdim=True).values, e.max(1, keepdim=True).values
    e = torch.where(hi > lo, (e - lo) / (hi - lo).clamp(min=1e-12), e)
    e = torch.maximum(torch.minimum(e, _percentile(e, 99)[:, None]),
                      1 - _percentile(1 - e, 99)[:, None]).view(b, 1, h, w)
    ang = p["angle"].double()
    sx = torch.round(torch.cos(ang) * v.double()).long().to(x.device)
    sy = torch.round(torch.sin(ang) * v.double()).long().to(x.device)
    rows = (torch.arange(h, device=x.device)[None] - sy[:, None]).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device)[None] - sx[:, None]).clamp(0, w - 1)
    bi = torch.arange(b, device=x.device)[:, None, None]
    shifted = x[:, 1][bi, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    green = shifted * e + x[:, 1:2] * (1 - e)
    return torch.cat([x[:, :1], green, x[:, 2:]], 1)


def _d_color_saturation1(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Multiply HSV saturation by the factor (negative values invert the hue, as KADID)."""
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([hsv[:, :1], hsv[:, 1:2] * _col(v, x), hsv[:, 2:]], 1)
    return hsv_to_rgb(hsv)


def _d_color_saturation2(x: Tensor, v: Tensor, p: Params) -> Tensor:
    lab = rgb_to_lab(x)
    return lab_to_rgb(torch.cat([lab[:, :1], lab[:, 1:] * _col(v, x)], 1))


# --- compression (real codecs) -----------------------------------------------------------------


def set_codec_processes(processes: int | None) -> None:
    """Choose how many worker processes run the ``jpeg2000`` distortion.

    Pillow's JPEG 2000 codec holds the GIL while it encodes and decodes (it reads and writes
    through Python file objects), so threads run it one crop at a time; worker processes run it
    in parallel. The processes use the same codec with the same settings: the output is identical
    to the in-process one, only faster. They are forked on first use on Linux (elsewhere spawned,
    which, as any spawned multiprocessing, needs an ``if __name__ == "__main__":`` guard in the
    calling script) and live until the interpreter exits or this is called again; they die
    with it however it ends, SIGKILL included (:func:`qualiclip._codec.worker_start`). A daemonic
    process (such as a DataLoader worker, already one of many) cannot start processes and codes
    in-process.

    Args:
        processes: the number of worker processes; 0 or 1 codes in this process; ``None``
            restores the default: ``$QUALICLIP_CODEC_PROCESSES`` if set, else the CPU count.
    """
    if processes is not None and processes < 0:
        raise ValueError(f"processes must be >= 0, got {processes}")
    CODEC_WORKERS.processes = processes
    CODEC_WORKERS.shutdown_processes()


def _threads() -> ThreadPoolExecutor:
    return CODEC_WORKERS.threads()


def _j2k_processes() -> int:
    return CODEC_WORKERS.process_count()


def _get_j2k_pool(n_jobs: int) -> ProcessPoolExecutor | None:
    return CODEC_WORKERS.j2k_pool(n_jobs)


def _codec(x: Tensor, v: Tensor, fmt: str) -> Tensor:
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    arrs = [np.ascontiguousarray(a) for a in arr]
    values = [float(q) for q in v.tolist()]
    pool = _get_j2k_pool(len(arrs)) if fmt == "JPEG2000" else None
    results: list[np.ndarray] | None = None
    if pool is not None:
        try:
            results = list(pool.map(_codec_mod.roundtrip, arrs, [fmt] * len(arrs), values))
        except (BrokenProcessPool, OSError) as e:
            warnings.warn(f"JPEG 2000 worker processes failed ({e}); coding in this process "
                          "from now on (same output, slower)", RuntimeWarning, stacklevel=2)
            set_codec_processes(0)
    if results is None:
        jobs = [_threads().submit(_codec_mod.roundtrip, a, fmt, q)
                for a, q in zip(arrs, values, strict=True)]
        results = [j.result() for j in jobs]
    out = torch.from_numpy(np.stack(results))
    return out.to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255


def _d_jpeg2000(x: Tensor, v: Tensor, p: Params) -> Tensor:
    return _codec(x, v, "JPEG2000")


def _d_jpeg(x: Tensor, v: Tensor, p: Params) -> Tensor:
    return _codec(x, v, "JPEG")


# --- noise -------------------------------------------------------------------------------------


def _normal(x: Tensor, p: Params) -> Tensor:
    return _seeded_noise(p["seed"], tuple(x.shape[1:]), x.device, "normal", x.dtype)


def _d_white_noise(x: Tensor, v: Tensor, p: Params) -> Tensor:
    return x + _normal(x, p) * _col(v.sqrt(), x)


def _d_white_noise_cc(x: Tensor, v: Tensor, p: Params) -> Tensor:
    return ycbcr_to_rgb(rgb_to_ycbcr(x) + _normal(x, p) * _col(v.sqrt(), x))


def _d_impulse_noise(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Salt and pepper: each value becomes 1 with probability d/2 and 0 with probability d/2."""
    u = _seeded_noise(p["seed"], tuple(x.shape[1:]), x.device, "uniform", x.dtype)
    d = _col(v, x)
    return torch.where(u < d / 2, torch.ones_like(x), torch.where(u < d, torch.zeros_like(x), x))


def _d_multiplicative_noise(x: Tensor, v: Tensor, p: Params) -> Tensor:
    return x + x * _normal(x, p) * _col(v.sqrt(), x)


# --- brightness --------------------------------------------------------------------------------


def _midpoint_curve(x: Tensor, mid: Tensor) -> Tensor:
    """The parabola through (0, 0), (0.5, mid), (1, 1): MATLAB spline on 3 points (KADID curves)."""
    a = 2 - 4 * mid
    return (a * x * x + (1 - a) * x).clamp(0, 1)


def _d_brighten(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Average of the tone curve on RGB (weight 2) and on L* (weight 1), as KADID."""
    mid = _col(0.5 + v / 2, x)
    lab = rgb_to_lab(x)
    lum = _midpoint_curve(lab[:, :1] / 100, mid) * 100
    j = lab_to_rgb(torch.cat([lum, lab[:, 1:]], 1)).clamp(0, 1)
    return (2 * _midpoint_curve(x, mid) + j) / 3


def _d_darken(x: Tensor, v: Tensor, p: Params) -> Tensor:
    return _midpoint_curve(x, _col(0.5 - v / 2, x))


def _d_mean_shift(x: Tensor, v: Tensor, p: Params) -> Tensor:
    return x + _col(v, x)


# --- spatial -----------------------------------------------------------------------------------


def _d_jitter(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Five rounds of bilinear resampling at a Gaussian random displacement (KADID imscatter)."""
    b, _, h, w = x.shape
    rounds = 5
    shifts = _seeded_noise(p["seed"], (rounds, 2, h, w), x.device, "normal", x.dtype)
    shifts = shifts * _col(v, x).unsqueeze(1)
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    y = x
    for i in range(rounds):
        gx = (xx + shifts[:, i, 0]) * (2 / max(w - 1, 1)) - 1
        gy = (yy + shifts[:, i, 1]) * (2 / max(h - 1, 1)) - 1
        y = F.grid_sample(y, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border",
                          align_corners=True)
    return y


def _patch_starts(frac: Tensor, size: int, patch: int, margin: int) -> Tensor:
    lo, hi = margin, size - patch - margin
    if hi < lo:  # too small for the margin: anywhere the patch fits
        lo, hi = 0, size - patch
    return torch.round(frac * (hi - lo)).long() + lo


def _d_non_eccentricity_patch(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Copy ``n`` 16x16 patches, one after another, to a random offset within +-8 px (KADID)."""
    b, c, h, w = x.shape
    ps, radius = 16, 16
    if h < ps or w < ps:
        return x
    dev = x.device
    src, off = p["src"].to(dev), p["offset"].to(dev)
    hs, ws = _patch_starts(src[..., 0], h, ps, radius), _patch_starts(src[..., 1], w, ps, radius)
    hd = (hs + torch.round((off[..., 0] - 0.5) * radius).long()).clamp(0, h - ps)
    wd = (ws + torch.round((off[..., 1] - 0.5) * radius).long()).clamp(0, w - ps)
    counts = v.long().to(dev)
    ar = torch.arange(ps, device=dev)
    ch = torch.arange(c, device=dev)[None, :, None, None]
    y = x.clone()
    for k in range(int(v.max()) if v.numel() else 0):
        act = (counts > k).nonzero().squeeze(1)
        bi = act[:, None, None, None]

        def rows(t: Tensor, act: Tensor = act, k: int = k) -> Tensor:
            return (t[act, k][:, None] + ar)[:, None, :, None]

        def cols(t: Tensor, act: Tensor = act, k: int = k) -> Tensor:
            return (t[act, k][:, None] + ar)[:, None, None, :]

        y[bi, ch, rows(hd), cols(wd)] = y[bi, ch, rows(hs), cols(ws)]
    return y


def _d_pixelate(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Nearest-neighbour down-sample by z = 0.95 - strength**0.6, then back up (KADID)."""

    def one(xs: Tensor, strength: float, _: Params) -> Tensor:
        h, w = xs.shape[-2:]
        z = 0.95 - strength**0.6
        small = F.interpolate(xs, size=(max(1, int(h * z)), max(1, int(w * z))), mode="nearest")
        return F.interpolate(small, size=(h, w), mode="nearest")

    return _per_value(x, v, p, one)


def _d_quantization(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Quantise every RGB value to ``n`` levels with thresholds from the grey histogram.

    The ``n - 1`` thresholds sit at the grey image's equal-population quantiles (KADID used
    multi-level Otsu, ARNIQA equal-width bins); each value becomes the midpoint of its bin, the
    outer bins closed by 0 and 1. Our choice: KADID replaced values by their bin index stretched to
    [0, 1], which equalises the histogram and makes even 20 levels a strong tone change; midpoints
    keep the tones, so the distortion grows from mild (20 levels) to strong (7).
    """

    def one(xs: Tensor, n: float, _: Params) -> Tensor:
        levels = int(n)
        gray = rgb_to_gray(xs).flatten(1).sort(dim=1).values
        q = torch.arange(1, levels, device=xs.device, dtype=torch.float64) / levels
        idx = torch.round(q * (gray.shape[1] - 1)).long()
        thresholds = gray[:, idx].contiguous()
        b = xs.shape[0]
        edges = torch.cat([xs.new_zeros(b, 1), thresholds, xs.new_ones(b, 1)], 1)
        centres = (edges[:, 1:] + edges[:, :-1]) / 2
        bins = torch.searchsorted(thresholds, xs.flatten(1).contiguous())
        return centres.gather(1, bins).view_as(xs)

    return _per_value(x, v, p, one)


def _d_color_block(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Paste ``n`` 32x32 blocks of a random flat colour at random positions (KADID)."""
    b, c, h, w = x.shape
    bs_h, bs_w = min(32, h), min(32, w)
    dev = x.device
    pos, color = p["pos"].to(dev), p["color"].to(x)
    py = torch.floor(pos[..., 0] * (h - bs_h + 1)).long().clamp(max=h - bs_h)
    px = torch.floor(pos[..., 1] * (w - bs_w + 1)).long().clamp(max=w - bs_w)
    counts = v.long().to(dev)
    ar_h, ar_w = torch.arange(h, device=dev)[None], torch.arange(w, device=dev)[None]
    y = x
    for k in range(int(v.max()) if v.numel() else 0):
        rows = (ar_h >= py[:, k, None]) & (ar_h < py[:, k, None] + bs_h)
        cols = (ar_w >= px[:, k, None]) & (ar_w < px[:, k, None] + bs_w)
        mask = rows[:, :, None] & cols[:, None, :] & (counts > k)[:, None, None]
        y = torch.where(mask[:, None], color[:, k, :, None, None], y)
    return y


# --- sharpness and contrast --------------------------------------------------------------------


def _d_high_sharpen(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Unsharp mask on L*: L + amount * (L - G*L), G a 13x13 Gaussian of sigma 6 (KADID)."""
    lab = rgb_to_lab(x)
    lum = lab[:, :1]
    lum = lum + _col(v, x) * (lum - _gaussian_blur(lum, 6.0, half=6))
    return lab_to_rgb(torch.cat([lum, lab[:, 1:]], 1))


@functools.lru_cache(maxsize=8)
def _contrast_spline(amount: float) -> tuple[Tensor, Tensor]:
    """Not-a-knot cubic spline through (0,0), (0.3, 0.25-a/4), (0.5,0.5), (0.7,0.75+a/4), (1,1).

    This is KADID's ``curves`` for linear contrast change (MATLAB ``spline``). Returns the
    breakpoints ``[5]`` and the coefficients ``[4, 4]`` (highest power first, per interval).
    """
    from scipy.interpolate import CubicSpline

    xs = np.array([0.0, 0.3, 0.5, 0.7, 1.0])
    ys = np.array([0.0, 0.25 - amount / 4, 0.5, 0.75 + amount / 4, 1.0])
    cs = CubicSpline(xs, ys, bc_type="not-a-knot")
    return torch.from_numpy(xs), torch.from_numpy(np.ascontiguousarray(cs.c))


def _d_linear_contrast_change(x: Tensor, v: Tensor, p: Params) -> Tensor:
    def one(xs: Tensor, amount: float, _: Params) -> Tensor:
        breaks, coef = _contrast_spline(amount)
        breaks, coef = breaks.to(xs), coef.to(xs)
        i = torch.bucketize(xs.contiguous(), breaks[1:-1], right=True)
        t = xs - breaks[i]
        c = coef[:, i]
        return ((c[0] * t + c[1]) * t + c[2]) * t + c[3]

    return _per_value(x, v, p, one)


def _d_non_linear_contrast_change(x: Tensor, v: Tensor, p: Params) -> Tensor:
    """Map [0, 1] linearly onto [0.5 - value, 0.5 + value] (KADID's contrast compression)."""
    value = _col(v, x)
    return 2 * value * x.clamp(0, 1) + 0.5 - value


_DISTORTIONS: dict[str, Callable[[Tensor, Tensor, Params], Tensor]] = {
    "gaussian_blur": _d_gaussian_blur,
    "lens_blur": _d_lens_blur,
    "motion_blur": _d_motion_blur,
    "color_diffusion": _d_color_diffusion,
    "color_shift": _d_color_shift,
    "color_saturation1": _d_color_saturation1,
    "color_saturation2": _d_color_saturation2,
    "jpeg2000": _d_jpeg2000,
    "jpeg": _d_jpeg,
    "white_noise": _d_white_noise,
    "white_noise_cc": _d_white_noise_cc,
    "impulse_noise": _d_impulse_noise,
    "multiplicative_noise": _d_multiplicative_noise,
    "brighten": _d_brighten,
    "darken": _d_darken,
    "mean_shift": _d_mean_shift,
    "jitter": _d_jitter,
    "non_eccentricity_patch": _d_non_eccentricity_patch,
    "pixelate": _d_pixelate,
    "quantization": _d_quantization,
    "color_block": _d_color_block,
    "high_sharpen": _d_high_sharpen,
    "linear_contrast_change": _d_linear_contrast_change,
    "non_linear_contrast_change": _d_non_linear_contrast_change,
}


# --- public application ------------------------------------------------------------------------


def apply_distortion(x: Tensor, name: str, levels: LevelsLike,
                     generator: torch.Generator | None = None,
                     params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Apply one distortion type to a batch, each sample at its own level.

    Args:
        x: RGB images in [0, 1].
        name: distortion type, one of :data:`DISTORTION_TYPES`.
        levels: one level (1..5) for all samples or one per sample.
        generator: used only when ``params`` is None, to draw them with :func:`sample_params`.
        params: random parameters from :func:`sample_params` for this batch; pass the same ones
            to distort two batches identically.

    Returns:
        The distorted images, clipped to [0, 1], same dtype and device as ``x``.

    Shape:
        ``x``: ``[B, 3, H, W]`` -> ``[B, 3, H, W]``.
    """
    _check_name(name)
    _check_images(x)
    b = x.shape[0]
    lv = as_levels(levels, b)
    if b == 0:
        return x.clone()
    p = dict(params) if params is not None else sample_params(name, b, generator)
    for key, t in p.items():
        if t.shape[0] != b:
            raise ValueError(f"params[{key!r}] holds {t.shape[0]} samples, the batch has {b}")
    p = {k: t.cpu() for k, t in p.items()}
    values = torch.tensor([LEVELS[name][i - 1] for i in lv.tolist()], dtype=torch.float64)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    y = _DISTORTIONS[name](work, values, p)
    return y.clamp(0, 1).to(x.dtype)


def sample_composition(generator: torch.Generator | None = None,
                       max_distortions: int = 4) -> Composition:
    """Draw k (uniform in 1..max) types from k distinct groups, in random order (ARNIQA).

    Args:
        generator: source of randomness; ``None`` uses torch's global generator.
        max_distortions: largest number of types, 1..7.

    Returns:
        The drawn :class:`Composition`.
    """
    n_groups = len(DISTORTION_GROUPS)
    if not 1 <= max_distortions <= n_groups:
        raise ValueError(f"max_distortions must be in 1..{n_groups}, got {max_distortions}")
    generator = _cpu_generator(generator)
    u = _rand((1 + n_groups * 2,), generator)
    k = 1 + min(int(u[0] * max_distortions), max_distortions - 1)
    order = torch.argsort(u[1 : 1 + n_groups])[:k].tolist()
    groups = list(DISTORTION_GROUPS)
    types = []
    for g_index in order:
        members = DISTORTION_GROUPS[groups[g_index]]
        pick = min(int(u[1 + n_groups + g_index] * len(members)), len(members) - 1)
        types.append(members[pick])
    return Composition(tuple(types))


def sample_composition_params(composition: Composition, batch_size: int,
                              generator: torch.Generator | None = None) -> list[Params]:
    """Random parameters for every type of a composition, in order (see :func:`sample_params`)."""
    generator = _cpu_generator(generator)
    return [sample_params(t, batch_size, generator) for t in composition.types]


def apply_composition(x: Tensor, composition: Composition, levels: LevelsLike,
                      generator: torch.Generator | None = None,
                      params: Sequence[Mapping[str, Tensor]] | None = None) -> Tensor:
    """Apply the types of a composition one after another, all at each sample's level.

    Args:
        x: RGB images in [0, 1].
        composition: the types to apply, in order.
        levels: one level (1..5) for all samples or one per sample; every type uses it.
        generator: used only when ``params`` is None.
        params: one dict per type from :func:`sample_composition_params`.

    Returns:
        The distorted images. Shape: ``[B, 3, H, W]`` -> ``[B, 3, H, W]``.
    """
    _check_images(x)
    if params is None:
        params = sample_composition_params(composition, x.shape[0], generator)
    if len(params) != len(composition.types):
        raise ValueError(f"got {len(params)} parameter sets for {len(composition.types)} types")
    y = x
    for name, p in zip(composition.types, params, strict=True):
        y = apply_distortion(y, name, levels, params=p)
    return y


def _reseed(params: list[Params], generator: torch.Generator | None) -> list[Params]:
    out = []
    for p in params:
        q = dict(p)
        if "seed" in q:
            q["seed"] = (_rand((q["seed"].shape[0],), generator) * 2.0**52).long()
        out.append(q)
    return out


def distort_pairs(crops_a: Tensor, crops_b: Tensor,
                  composition: Composition | Sequence[Composition],
                  generator: torch.Generator | None = None, *,
                  levels: Sequence[int] = (1, 2, 3, 4, 5),
                  share_noise: bool = False) -> tuple[Tensor, Tensor]:
    """Degrade the two crops of each training pair at every level with the same distortion.

    Both crops of sample i get the same types, levels and geometric parameters (angles, shifts,
    patch positions); the noise seeds differ unless ``share_noise``. Within a crop, every level
    uses the same parameters, so levels differ only in intensity.

    Args:
        crops_a: first crops, RGB in [0, 1].
        crops_b: second crops, same shape as ``crops_a``.
        composition: one composition for the batch, or one per sample.
        generator: source of randomness.
        levels: the levels to produce, in order.
        share_noise: give both crops the same noise too.

    Returns:
        ``(a, b)``, the distorted crops at each level.

    Shape:
        ``crops_a``, ``crops_b``: ``[B, 3, H, W]`` -> each ``[B, L, 3, H, W]``, L = ``len(levels)``.
    """
    _check_images(crops_a)
    if crops_b.shape != crops_a.shape:
        raise ValueError(f"crop shapes differ: {tuple(crops_a.shape)} vs {tuple(crops_b.shape)}")
    b, n_lv = crops_a.shape[0], len(levels)
    as_levels(list(levels), n_lv)
    generator = _cpu_generator(generator)
    if not isinstance(composition, Composition):
        return _distort_pairs_grouped(crops_a, crops_b, list(composition), generator,
                                      levels, share_noise)
    params_a = sample_composition_params(composition, b, generator)
    params_b = params_a if share_noise else _reseed(params_a, generator)
    # One call for both crops and all levels: sample-major, level-minor.
    x = torch.cat([crops_a, crops_b]).repeat_interleave(n_lv, dim=0)
    lv = torch.tensor(list(levels)).repeat(2 * b)
    params = [{k: torch.cat([pa[k], pb[k]]).repeat_interleave(n_lv, dim=0) for k in pa}
              for pa, pb in zip(params_a, params_b, strict=True)]
    y = apply_composition(x, composition, lv, params=params).view(2, b, n_lv, *x.shape[1:])
    return y[0], y[1]


def _distort_pairs_grouped(crops_a: Tensor, crops_b: Tensor, comps: list[Composition],
                           generator: torch.Generator | None, levels: Sequence[int],
                           share_noise: bool) -> tuple[Tensor, Tensor]:
    if len(comps) != crops_a.shape[0]:
        raise ValueError(f"got {len(comps)} compositions for a batch of {crops_a.shape[0]}")
    n_lv = len(levels)
    out_a = crops_a.new_empty((crops_a.shape[0], n_lv, *crops_a.shape[1:]))
    out_b = torch.empty_like(out_a)
    for comp in dict.fromkeys(comps):  # first-seen order keeps generator use deterministic
        idx = torch.tensor([i for i, c in enumerate(comps) if c == comp], device=crops_a.device)
        ya, yb = distort_pairs(crops_a[idx], crops_b[idx], comp, generator, levels=levels,
                               share_noise=share_noise)
        out_a[idx], out_b[idx] = ya, yb
    return out_a, out_b


def degrade_batch(
    crops: Tensor,
    generator: torch.Generator,
    *,
    levels: Sequence[int] = (1, 2, 3, 4, 5),
    max_distortions: int = 4,
) -> Tensor:
    """One random composition per sample, applied at every level to both crops.

    Args:
        crops: crop pairs, uint8 (0..255) or float in [0, 1], on the training device.
        generator: degradation randomness; a CPU generator gives the same result on every
            device (every draw is made on the CPU).
        levels: levels to produce, mildest first.
        max_distortions: most types in a composition.

    Returns:
        Degraded crops in [0, 1], float32.

    Shape:
        ``[B, 2, 3, H, W]`` -> ``[B, L, 2, 3, H, W]``.
    """
    x = crops.float() / 255.0 if not crops.is_floating_point() else crops.float()
    comps = [sample_composition(generator, max_distortions) for _ in range(x.shape[0])]
    a, b = distort_pairs(x[:, 0], x[:, 1], comps, generator, levels=tuple(levels))
    return torch.stack([a, b], dim=2)
