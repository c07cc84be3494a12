"""Seeded mutants of small valid images in every format Pillow writes, for fuzzing decoders.

Shared by ``tests/test_fuzz.py`` (a bounded run in the suite) and ``benchmarks/fuzz_decode.py``
(as long as asked). Everything is deterministic given the seed: a failure is reproduced by its
seed and index alone.

The seeds are small (40 x 36 pixels, above the model's 32-pixel minimum) so that an untouched or
lightly damaged mutant still decodes and gets scored, and the mutations reach the header fields a
decoder trusts: sizes, offsets, counts, bit depths, chunk lengths.
"""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Width and height of every seed image.
SEED_SIZE = (40, 36)

#: File extensions the CLI's folder scan picks up; other formats get ``.png`` appended to theirs.
_SCANNED = {".jpg", ".png", ".bmp", ".tif", ".webp", ".gif", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Seed:
    """One valid encoded image to mutate."""

    name: str  # e.g. "png-rgba"
    ext: str  # the format's usual extension, e.g. ".png"
    data: bytes


@dataclass(frozen=True)
class Mutant:
    """A mutated file: which seed, which mutations, and the bytes."""

    index: int
    seed: str
    mutations: tuple[str, ...]
    data: bytes

    ext: str

    @property
    def filename(self) -> str:
        """A name the CLI's folder scan picks up, unique within one run."""
        return f"{self.index:06d}-{self.seed}{self.ext}" + ("" if self.ext in _SCANNED else ".png")


def _pattern(mode: str) -> Image.Image:
    """A deterministic picture with edges and gradients (so encoders emit real data)."""
    w, h = SEED_SIZE
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 6) % 256, (y * 7) % 256, ((x ^ y) * 5) % 256], axis=-1).astype(np.uint8)
    im = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = Image.fromarray(((x * 255) // w).astype(np.uint8))
        im.putalpha(alpha)
        return im
    if mode == "I;16":
        return Image.fromarray((x * 1600 + y * 10).astype(np.uint16))
    if mode == "F":
        return Image.fromarray(((x / w + y / h) / 2).astype(np.float32), mode="F")  # in [0, 1]
    if mode == "P":
        return im.quantize(16)
    return im.convert(mode)


#: seed-name prefix -> file extension, where it is not the prefix itself.
_EXTENSIONS = {"jpeg": ".jpg", "tiff": ".tif", "jpeg2000": ".jp2"}

# (name, format, mode, save options); formats this Pillow cannot write are skipped.
_SEED_SPECS: tuple[tuple[str, str, str, dict[str, object]], ...] = (
    ("png-rgb", "PNG", "RGB", {}),
    ("png-rgba", "PNG", "RGBA", {}),
    ("png-p", "PNG", "P", {}),
    ("png-16bit", "PNG", "I;16", {}),
    ("png-apng", "PNG", "RGB", {"save_all": True, "append_images": "frames"}),
    ("jpeg-rgb", "JPEG", "RGB", {"quality": 80}),
    ("jpeg-progressive", "JPEG", "RGB", {"progressive": True}),
    ("jpeg-cmyk", "JPEG", "CMYK", {}),
    ("jpeg-l", "JPEG", "L", {}),
    ("bmp-rgb", "BMP", "RGB", {}),
    ("bmp-p", "BMP", "P", {}),
    ("gif-p", "GIF", "P", {}),
    ("gif-anim", "GIF", "P", {"save_all": True, "append_images": "frames"}),
    ("tiff-rgb", "TIFF", "RGB", {}),
    ("tiff-lzw", "TIFF", "RGB", {"compression": "tiff_lzw"}),
    ("tiff-deflate", "TIFF", "RGBA", {"compression": "tiff_adobe_deflate"}),
    ("tiff-float", "TIFF", "F", {}),
    ("tiff-16bit", "TIFF", "I;16", {}),
    ("tiff-cmyk", "TIFF", "CMYK", {}),
    ("webp-lossy", "WEBP", "RGB", {"quality": 70}),
    ("webp-lossless", "WEBP", "RGBA", {"lossless": True}),
    ("ppm-rgb", "PPM", "RGB", {}),
    ("pgm-l", "PPM", "L", {}),
    ("ico-rgba", "ICO", "RGBA", {"sizes": [(40, 36)]}),
    ("tga-rgb", "TGA", "RGB", {}),
    ("tga-rle", "TGA", "RGBA", {"compression": "tga_rle"}),
    ("jpeg2000-rgb", "JPEG2000", "RGB", {}),
    ("pcx-rgb", "PCX", "RGB", {}),
    ("sgi-rgb", "SGI", "RGB", {}),
    ("dds-rgba", "DDS", "RGBA", {}),
    ("qoi-rgb", "QOI", "RGB", {}),
    ("im-rgb", "IM", "RGB", {}),
    ("spider-f", "SPIDER", "F", {}),
    ("xbm-1", "XBM", "1", {}),
    ("msp-1", "MSP", "1", {}),
    ("blp-p", "BLP", "P", {}),
    ("dib-rgb", "DIB", "RGB", {}),
)


def make_seeds() -> list[Seed]:
    """Encode the seed picture in every format (and a few modes) this Pillow can write."""
    Image.init()
    seeds = []
    for name, fmt, mode, options in _SEED_SPECS:
        if fmt not in Image.SAVE:
            continue
        im = _pattern(mode)
        opts = dict(options)
        if opts.get("append_images") == "frames":
            opts["append_images"] = [im.rotate(90 * k) for k in (1, 2)]
        buf = io.BytesIO()
        try:
            im.save(buf, format=fmt, **opts)
        except (OSError, ValueError, KeyError, TypeError):  # codec missing in this build
            continue
        ext = _EXTENSIONS.get(name.split("-")[0], "." + name.split("-")[0])
        seeds.append(Seed(name, ext, buf.getvalue()))
    return seeds


# --- mutations: each takes the bytes and a Random, returns new bytes and a short description -----


def _bit_flips(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    n = rng.choice((1, 1, 2, 4, 8, 32))
    for _ in range(n):
        # Half the flips land in the first 128 bytes, where the header is.
        pos = rng.randrange(min(len(out), 128)) if rng.random() < 0.5 else rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out), f"flip{n}"


def _truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.choice((rng.randrange(min(len(data), 64)), rng.randrange(len(data))))
    return data[:cut], f"cut@{cut}"


_INTERESTING_INTS = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
                     0xFFFFFFFF, 40, 36, 4096, 65535 * 65535 & 0xFFFFFFFF)


def _header_int(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Overwrite a 1, 2 or 4-byte integer near the start with an edge value (sizes, counts)."""
    out = bytearray(data)
    width = rng.choice((1, 2, 4))
    if len(out) < width:
        return bytes(out), "int-skip"
    pos = rng.randrange(min(len(out), 96) - width + 1)
    value = rng.choice(_INTERESTING_INTS)
    fmt = {1: "B", 2: "H", 4: "I"}[width]
    order = rng.choice("<>")
    out[pos:pos + width] = struct.pack(order + fmt, value & ((1 << (8 * width)) - 1))
    return bytes(out), f"int{width}{order}@{pos}={value}"


def _text_edit(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Replace an ASCII digit or letter near the start (text headers: PPM, XBM, EPS, IM)."""
    out = bytearray(data)
    spots = [i for i in range(min(len(out), 96)) if 0x30 <= out[i] <= 0x7A]
    if not spots:
        return bytes(out), "text-skip"
    pos = rng.choice(spots)
    out[pos] = rng.choice(b"0x9-+ \n\x00.eZ")
    return bytes(out), f"text@{pos}"


def _splice(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Duplicate, delete or insert a run of bytes (shifts every offset after it)."""
    out = bytearray(data)
    a = rng.randrange(len(out))
    b = min(len(out), a + rng.choice((1, 4, 16, 256)))
    kind = rng.randrange(3)
    if kind == 0:
        out[a:a] = out[a:b]
    elif kind == 1:
        del out[a:b]
    else:
        out[a:a] = bytes(rng.randrange(256) for _ in range(b - a))
    return bytes(out), f"splice{kind}@{a}+{b - a}"


MUTATIONS: tuple[Callable[[bytes, random.Random], tuple[bytes, str]], ...] = (
    _bit_flips, _truncate, _header_int, _text_edit, _splice,
)


def mutants(seed: int = 0, count: int | None = None, seeds: list[Seed] | None = None
            ) -> Iterator[Mutant]:
    """Yield ``count`` mutants (for ever when None), cycling through the seed images.

    Each mutant applies one to three mutations; one in twenty is left intact, so valid files are
    always in the mix (their rows must carry scores).
    """
    base = make_seeds() if seeds is None else seeds
    rng = random.Random(seed)
    index = 0
    while count is None or index < count:
        source = base[index % len(base)]
        data, done = source.data, []
        if rng.random() >= 0.05:
            for _ in range(rng.choice((1, 1, 2, 3))):
                if not data:
                    break
                data, what = rng.choice(MUTATIONS)(data, rng)
                done.append(what)
        yield Mutant(index, source.name, tuple(done), data, source.ext)
        index += 1


# --- running mutants through qualiclip -----------------------------------------------------------


@dataclass
class Tally:
    """What a fuzzing run tried and found."""

    files: int = 0
    decoded: int = 0  # decode_rgb returned pixels
    refused: int = 0  # decode_rgb raised ImageDecodeError (the one allowed failure)
    escaped: list[str] | None = None  # tracebacks of anything else
    cli_runs: int = 0
    cli_files: int = 0
    cli_rows: int = 0
    cli_ok: int = 0
    cli_errors: int = 0
    cli_bad_exit: int = 0
    cli_row_mismatch: int = 0  # files without exactly one row

    def __post_init__(self) -> None:
        self.escaped = [] if self.escaped is None else self.escaped


def decode_one(mutant: Mutant, tally: Tally, max_pixels: int) -> None:
    """Feed one mutant to ``decode_rgb``: pixels or ImageDecodeError, nothing else."""
    import traceback

    from qualiclip.images import ImageDecodeError, decode_rgb

    assert tally.escaped is not None
    tally.files += 1
    try:
        arr = decode_rgb(mutant.data, max_pixels=max_pixels)
    except ImageDecodeError:
        tally.refused += 1
        return
    except Exception:  # noqa: BLE001 - an escape is what the fuzzer looks for
        tally.escaped.append(f"{mutant.filename} {mutant.mutations}\n{traceback.format_exc()}")
        return
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype not in (np.uint8, np.uint16):
        tally.escaped.append(f"{mutant.filename}: bad array {arr.shape} {arr.dtype}")
    else:
        tally.decoded += 1


def score_folder(batch: list[Mutant], folder: str, tally: Tally) -> None:
    """Write ``batch`` into ``folder`` and score it with ``qualiclip score`` (in-process).

    Every file must get exactly one row and the exit status must be 0 or 1.
    """
    import contextlib
    import json
    import os
    import traceback

    from qualiclip import cli

    assert tally.escaped is not None
    os.makedirs(folder, exist_ok=True)
    names = set()
    for m in batch:
        with open(os.path.join(folder, m.filename), "wb") as f:
            f.write(m.data)
        names.add(m.filename)
    out = os.path.join(os.path.dirname(folder), "rows.jsonl")
    argv = ["score", folder, "--model", "random-tiny", "--format", "jsonl", "-o", out,
            "--no-progress", "--workers", "2"]
    tally.cli_runs += 1
    tally.cli_files += len(batch)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            code = cli.main(argv)
    except BaseException:  # noqa: BLE001 - an escape is what the fuzzer looks for
        tally.escaped.append(f"cli on {len(batch)} files\n{traceback.format_exc()}")
        return
    tally.cli_bad_exit += code not in (0, 1)
    with open(out, encoding="utf-8", errors="surrogateescape") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tally.cli_rows += len(rows)
    seen: dict[str, int] = {}
    for row in rows:
        name = os.path.basename(row["path"])
        seen[name] = seen.get(name, 0) + 1
        if row["error"] is None and isinstance(row["score"], float):
            tally.cli_ok += 1
        elif row["error"] and row["score"] is None:
            tally.cli_errors += 1
        else:
            tally.escaped.append(f"cli row neither score nor error: {row}")
    tally.cli_row_mismatch += sum(seen.get(n, 0) != 1 for n in names) + len(set(seen) - names)
    for name in names:
        os.remove(os.path.join(folder, name))
