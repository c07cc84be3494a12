"""Codec round trips through Pillow, importable without torch.

The worker processes that run JPEG 2000 for :mod:`qualiclip.degradations` need only this module
(NumPy and Pillow): where they are spawned rather than forked, they start in a fraction of a
second and stay small.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def roundtrip(arr: np.ndarray, fmt: str, value: float) -> np.ndarray:
    """Encode an ``[H, W, 3]`` uint8 image as ``fmt`` and decode it again.

    Args:
        arr: RGB pixels, C-contiguous.
        fmt: ``"JPEG"`` (``value`` is the quality) or ``"JPEG2000"`` (``value`` is the
            compression ratio).
        value: the codec setting.

    Returns:
        The decoded RGB pixels, same shape.
    """
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=int(value))
    else:
        # OpenJPEG needs min(H, W) >= 2**(resolutions-1); ARNIQA uses 8 resolutions.
        res = max(1, min(8, int(math.log2(max(1, min(arr.shape[:2])))) + 1))
        img.save(buf, format="JPEG2000", quality_mode="rates", quality_layers=[float(value)],
                 num_resolutions=res, prog_order="LRCP")
    buf.seek(0)
    with Image.open(buf) as out:
        return np.asarray(out.convert("RGB"))
