"""Contact sheets of the degradation model, for judging the distortions by eye.

A sheet has one row per distortion type (24) and six columns: the pristine image, then levels 1..5.
All levels of a row share the same random parameters (angle, shift, noise seed), so a row shows the
intensity growing and nothing else changing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from qualiclip.degradations import DISTORTION_TYPES, NUM_LEVELS, apply_distortion, sample_params

LABEL_WIDTH = 190
HEADER_HEIGHT = 22


def to_pil(x: Tensor) -> Image.Image:
    """An RGB tensor ``[3, H, W]`` in [0, 1] as an 8-bit PIL image."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3, H, W], got {tuple(x.shape)}")
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def center_square(x: Tensor, size: int) -> Tensor:
    """Cut the central square of ``x`` ``[3, H, W]`` and resize it (antialiased) to ``size``."""
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = x[None, :, top : top + s, left : left + s]
    if s != size:
        square = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)
    return square[0].clamp(0, 1)


def contact_sheet(image: Tensor, size: int = 256, seed: int = 0) -> Image.Image:
    """Draw every distortion type at every level on a centre crop of ``image``.

    Args:
        image: RGB image ``[3, H, W]`` in [0, 1].
        size: side of each tile in pixels (the image's centre square is resized to it).
        seed: seed of the random parameters.

    Returns:
        A PIL image of ``24`` rows by ``6`` columns with a label column and a header row.
    """
    tile = center_square(image, size)
    batch = tile.unsqueeze(0).expand(NUM_LEVELS, -1, -1, -1).contiguous()
    levels = torch.arange(1, NUM_LEVELS + 1)
    g = torch.Generator().manual_seed(seed)
    width = LABEL_WIDTH + (NUM_LEVELS + 1) * size
    sheet = Image.new("RGB", (width, HEADER_HEIGHT + len(DISTORTION_TYPES) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for col, label in enumerate(["pristine"] + [f"level {i}" for i in levels.tolist()]):
        draw.text((LABEL_WIDTH + col * size + 4, 5), label, fill="black")
    pristine = to_pil(tile)
    for row, name in enumerate(DISTORTION_TYPES):
        top = HEADER_HEIGHT + row * size
        # One draw of the parameters, repeated for every level of the row.
        drawn = sample_params(name, 1, g)
        params = {k: v.repeat_interleave(NUM_LEVELS, 0) for k, v in drawn.items()}
        out = apply_distortion(batch, name, levels, params=params)
        draw.text((6, top + size // 2 - 6), name, fill="black")
        sheet.paste(pristine, (LABEL_WIDTH, top))
        for col in range(NUM_LEVELS):
            sheet.paste(to_pil(out[col]), (LABEL_WIDTH + (col + 1) * size, top))
    return sheet
