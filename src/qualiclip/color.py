"""Colour spaces as tensor functions: RGB <-> CIELAB, HSV and YCbCr, and grey.

Each function maps a batch ``[B, 3, H, W]`` to the same shape (grey: ``[B, 1, H, W]``) and keeps
dtype and device. RGB is sRGB in [0, 1]; CIELAB uses scikit-image's sRGB-to-XYZ matrix and D65
white point (``tests/test_degradations.py`` compares the two). The inverse conversions do not
clip: a colour pushed out of gamut (the saturation distortions of :mod:`qualiclip.degradations`
do this on purpose) is clipped by the caller.

Example:
    >>> import torch
    >>> x = torch.rand(1, 3, 8, 8)
    >>> torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "hsv_to_rgb", "lab_to_rgb", "rgb_to_gray", "rgb_to_hsv", "rgb_to_lab", "rgb_to_ycbcr",
    "ycbcr_to_rgb",
]

_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_D65 = (0.950456, 1.0, 1.088754)


def _mix(x: Tensor, m: Tensor) -> Tensor:
    return torch.einsum("ij,bjhw->bihw", m.to(x), x)


def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB in [0, 1] to CIELAB (D65): L in [0, 100], a/b roughly in [-128, 127].

    Shape: ``[B, 3, H, W]`` -> ``[B, 3, H, W]``.
    """
    lin = torch.where(x > 0.04045, ((x.clamp(min=0) + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = _mix(lin, _RGB_TO_XYZ)
    xyz = xyz / torch.tensor(_D65, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIELAB (D65) to sRGB, not clipped (out-of-gamut colours fall outside [0, 1]).

    Shape: ``[B, 3, H, W]`` -> ``[B, 3, H, W]``.
    """
    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], 1)
    d = 6 / 29
    xyz = torch.where(f > d, f**3, 3 * d * d * (f - 4 / 29))
    xyz = xyz * torch.tensor(_D65, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    lin = _mix(xyz, torch.linalg.inv(_RGB_TO_XYZ.double()).float())
    return torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308) ** (1 / 2.4) - 0.055,
                       12.92 * lin)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB in [0, 1] to HSV with hue, saturation and value all in [0, 1].

    Shape: ``[B, 3, H, W]`` -> ``[B, 3, H, W]``.
    """
    v, imax = x.max(1)
    c = v - x.min(1).values
    s = torch.where(v > 0, c / v.clamp(min=1e-12), torch.zeros_like(v))
    r, g, b = x.unbind(1)
    cc = c.clamp(min=1e-12)
    h = torch.where(imax == 0, ((g - b) / cc) % 6, torch.where(imax == 1, (b - r) / cc + 2,
                                                                 (r - g) / cc + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV (all in [0, 1]) to RGB; also defined for saturation outside [0, 1] (not clipped).

    Shape: ``[B, 3, H, W]`` -> ``[B, 3, H, W]``.
    """
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(1, 3, 1, 1)
    k = (n + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def rgb_to_ycbcr(x: Tensor) -> Tensor:
    """RGB in [0, 1] to YCbCr (BT.601, full range, chroma centred on 0.5).

    Shape: ``[B, 3, H, W]`` -> ``[B, 3, H, W]``.
    """
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack([y, (b - y) * 0.564 + 0.5, (r - y) * 0.713 + 0.5], 1)


def ycbcr_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_ycbcr` (not clipped). Shape: ``[B, 3, H, W]``."""
    y, cb, cr = x[:, 0], x[:, 1] - 0.5, x[:, 2] - 0.5
    return torch.stack([y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb], 1)


def rgb_to_gray(x: Tensor) -> Tensor:
    """RGB in [0, 1] to BT.601 luma (the Y of :func:`rgb_to_ycbcr`).

    Shape: ``[B, 3, H, W]`` -> ``[B, 1, H, W]``.
    """
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
