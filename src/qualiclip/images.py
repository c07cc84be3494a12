"""Turn image files, bytes, PIL images, arrays and tensors into RGB inputs for the model, safely.

The model takes RGB in [0, 1] at full resolution (docs/method.md §5), so everything here is
about getting exactly the pixels a viewer sees, or refusing with a message that says why:

* EXIF orientation is applied (phone photos are often stored sideways with an Orientation tag).
* Palette, greyscale, alpha, CMYK, 1-bit, 16-bit and float images become RGB; 16-bit sources keep
  their precision (divided by 65535, not quantised to 8 bits first).
* A pixel limit, checked on the header *before* decoding, guards against decompression bombs (a
  small file that expands to gigabytes). It is configurable per call or by ``QUALICLIP_MAX_PIXELS``.
* Truncated and corrupt files raise :class:`ImageDecodeError`; they are never padded with grey.
* Images whose shorter side is below ``min_size`` are rejected: the network downsamples by 32.

Batch engines call :func:`decode_rgb` (integer pixels, cheap to queue) and convert them per
batch; :func:`load_image` is the one-image convenience. This is the one image path of the
package (scoring, the service, training crops and NIQE all decode here), which is why the module
is longer than most. Which files to read is :mod:`qualiclip.inputs`' concern.

Example:
    >>> from qualiclip.images import load_image
    >>> x = load_image("photo.jpg")  # doctest: +SKIP
    >>> x.shape, x.dtype  # doctest: +SKIP
    (torch.Size([3, 768, 1024]), torch.float32)
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import sys
import warnings
from collections.abc import Sequence
from typing import IO, Any, Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DECODE_FAILURES",
    "DEFAULT_MAX_PIXELS",
    "DecodeFailure",
    "EXIF_ORIENTATION",
    "ImageDecodeError",
    "ImageSource",
    "as_decode_error",
    "as_pixels",
    "decode_rgb",
    "load_image",
    "max_pixels_from_env",
    "pixels_to_tensor",
    "to_batch",
]

#: Default decompression-bomb guard: 180 megapixels (a 16k x 11k image). A decoded 8-bit RGB image
#: of that size takes 540 MB, its float32 tensor 2.2 GB; raise it with ``QUALICLIP_MAX_PIXELS``.
DEFAULT_MAX_PIXELS = 180_000_000

#: What :func:`decode_rgb` and :func:`load_image` accept.
ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Image.Image

#: EXIF tag of the orientation (value 1: the pixels are stored as they are shown).
EXIF_ORIENTATION = 0x0112

_WHITE = (255, 255, 255, 255)


#: Why an input is not an image we can score (:attr:`ImageDecodeError.reason`):
#: ``unreadable`` (missing, not a regular file, no permission), ``not_an_image`` (no decoder
#: knows the format), ``malformed`` (a bad header, truncated or corrupt data, NaN pixels),
#: ``too_large`` (over the pixel limit), ``out_of_memory`` (no room to decode it), ``too_small``
#: (a side under the model's minimum).
DecodeFailure = Literal[
    "unreadable", "not_an_image", "malformed", "too_large", "out_of_memory", "too_small"
]
DECODE_FAILURES: tuple[str, ...] = get_args(DecodeFailure)


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message names it and says why.

    Args:
        message: ``"<input>: <what is wrong>"``, for people.
        reason: the kind of failure, for programs (the HTTP service maps it to a status).
    """

    def __init__(self, message: str, reason: DecodeFailure) -> None:
        super().__init__(message)
        self.reason: DecodeFailure = reason

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, DecodeFailure]]:
        # Unpickled (from a worker process) with its reason, not by ``cls(*args)``.
        return type(self), (str(self), self.reason)


def max_pixels_from_env() -> int:
    """Return the pixel limit from ``QUALICLIP_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`.

    Read at call time (not import time) so that a limit set after import still applies.

    Raises:
        ValueError: the variable is set but is not a positive integer.
    """
    raw = os.environ.get("QUALICLIP_MAX_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))  # accept "2e8" as well as "200000000"
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"QUALICLIP_MAX_PIXELS must be a positive integer, got {raw!r}")
    return value


def _describe(source: object) -> str:
    """A short name for error messages: the path, the stream's name, or the kind of object."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, (str, bytes)) and name else "<stream>"


def _os_error_text(exc: OSError) -> str:
    """What an ``OSError`` from stat/open means for the user, without a traceback."""
    code = exc.errno
    if code == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if code == errno.ENOENT:
        return "no such file"
    if code == errno.ENOTDIR:
        return "no such file (a part of the path is not a folder)"
    if code == errno.ENAMETOOLONG:
        return "file name too long for the file system"
    return f"cannot read file: {exc.strerror or exc}"


def _not_regular_text(path: str | os.PathLike[str], mode: int) -> str:
    """Why a path that exists is not read: a folder, or a FIFO, device or socket."""
    if stat.S_ISDIR(mode):
        try:
            with os.scandir(path):
                pass
        except OSError as exc:  # an unreadable folder found by a scan is reported, not skipped
            return f"folder cannot be read: {exc.strerror or exc}"
        return "is a directory, not an image file"
    kind = (
        "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a special file"
    )
    return f"not a regular file ({kind}); only regular files are read"


def _open_regular_file(path: str | os.PathLike[str], name: str) -> IO[bytes]:
    """Open a regular file for reading; anything else is refused without ever blocking.

    Opening a FIFO for reading waits for a writer, and reading a device can wait for ever, so the
    type is checked before opening, the open itself does not block (``O_NONBLOCK``), and the type
    is checked again on the descriptor in case the path was swapped in between.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ImageDecodeError(f"{name}: {_os_error_text(exc)}", "unreadable") from exc
    except ValueError as exc:  # e.g. an embedded NUL byte
        raise ImageDecodeError(f"{name}: invalid path ({exc})", "unreadable") from exc
    if not stat.S_ISREG(mode):
        raise ImageDecodeError(f"{name}: {_not_regular_text(path, mode)}", "unreadable")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageDecodeError(f"{name}: {_os_error_text(exc)}", "unreadable") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageDecodeError(f"{name}: {_not_regular_text(path, mode)}", "unreadable")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open(
    source: ImageSource, name: str, max_pixels: int, files: contextlib.ExitStack
) -> tuple[Image.Image, bool]:
    """Open ``source`` lazily (header only). Returns the image and whether we own (may close) it.

    A file we open is registered on ``files`` (closed when the caller's stack unwinds).
    """
    if isinstance(source, Image.Image):
        return source, False
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp: Any = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        fp = files.enter_context(_open_regular_file(source, name))
    elif hasattr(source, "read"):
        fp = source
        # PIL needs to seek back after sniffing the format; pipes and sockets cannot.
        seekable = getattr(source, "seekable", None)
        if not (callable(seekable) and seekable()):
            fp = io.BytesIO(source.read())
    else:
        raise TypeError(
            "image source must be a path, bytes, a binary file object or a PIL image, "
            f"got {type(source).__name__}"
        )
    _raise_pil_limit_to(max_pixels)
    with warnings.catch_warnings():
        # Our own limit (checked next, on the header) is the policy; PIL's warning at ~89 MP would
        # only be noise for the images between its threshold and ours.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(fp), True
        except UnidentifiedImageError as exc:
            if _is_tiff(fp):  # a TIFF Pillow has no mode for (float RGB): tifffile may read it
                raise _OtherTiff(as_decode_error(name, exc), fp) from exc
            raise as_decode_error(name, exc, header=True) from exc
        except Image.DecompressionBombError as exc:
            # PIL's own check ran first (inside Image.open); say which limit is ours.
            raise ImageDecodeError(
                f"{name}: too large: {exc} (limit: {max_pixels} pixels; raise it with "
                "QUALICLIP_MAX_PIXELS or max_pixels=)", "too_large"
            ) from exc
        except OSError as exc:
            if exc.errno is not None:  # a real I/O error (permissions, disk), not bad data
                raise ImageDecodeError(
                    f"{name}: cannot read file: {exc.strerror}", "unreadable"
                ) from exc
            raise as_decode_error(name, exc, header=True) from exc
        except Exception as exc:  # plugins raise ValueError, SyntaxError, ... (raised again)
            # Whatever a format plugin raises on a malformed header is this file's error.
            raise as_decode_error(name, exc, header=True) from exc


def _raise_pil_limit_to(max_pixels: int) -> None:
    """Let PIL open images up to ``max_pixels`` (it refuses above 2 x ``MAX_IMAGE_PIXELS``).

    PIL checks its own module-wide limit inside ``Image.open``, before we see the header, so a user
    who asks for a larger limit than PIL's default needs PIL's raised too. It is only ever raised,
    never lowered, and only to what the user asked for.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and max_pixels > 2 * current:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1


def _check_size(im: Image.Image, name: str, max_pixels: int, min_size: int) -> None:
    """Refuse images that are too large or too small, from the header alone (before decoding)."""
    _check_dims(im.size[0], im.size[1], name, max_pixels, min_size)


def _check_dims(width: int, height: int, name: str, max_pixels: int, min_size: int) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            f"{name}: too large: {width}x{height} = {pixels} pixels > limit of {max_pixels} pixels "
            "(possible decompression bomb; raise it with QUALICLIP_MAX_PIXELS or max_pixels=)",
            "too_large",
        )
    if min(width, height) < min_size:
        raise ImageDecodeError(
            f"{name}: too small: {width}x{height} pixels; the shorter side must be at least "
            f"{min_size} pixels", "too_small",
        )


def _composite_on_white(im: Image.Image) -> Image.Image:
    """Flatten an image with alpha onto white.

    Why white: the colour stored under fully transparent pixels is arbitrary (often black, sometimes
    leftovers of editing), so scoring it would judge pixels nobody sees. Compositing scores what a
    viewer sees on the usual light page or viewer background, and is deterministic.
    """
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Decoded PIL image (any mode) -> H x W x 3 array: uint8, or uint16 for 16-bit/float data."""
    mode = im.mode
    if mode == "RGB":
        return _rgb_in_strips(im)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG, TIFF): keep all 16 bits. Mode "I" is 32-bit signed; for PNG it
        # holds 0..65535, other sources are clipped to that range.
        grey = np.asarray(im)
        grey = np.clip(grey, 0, 65535).astype(np.uint16) if mode == "I" else grey.astype(np.uint16)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":  # float grey: values in [0, 1], as every float input (float_range_problem)
        return np.repeat(_float_to_uint16(np.asarray(im, dtype=np.float32))[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        return np.asarray(_composite_on_white(im))
    # P, L, 1, CMYK, YCbCr, RGBX, HSV: PIL's own conversions (CMYK naively, without ICC profile).
    return np.asarray(im.convert("RGB"))


#: Pixels copied per strip out of a decoded RGB image (see :func:`_rgb_in_strips`).
_STRIP_PIXELS = 1 << 22


def _rgb_in_strips(im: Image.Image) -> np.ndarray:
    """A decoded RGB image as a new, writable H x W x 3 array, copied a strip at a time.

    ``np.asarray(im)`` goes through ``tobytes()``, which joins encoded chunks into one bytes
    object (two transient copies) that NumPy can only view read-only, so one more copy follows:
    for a 144-megapixel image that is ~1.3 GB on top of PIL's own 576 MB. Strips bound the extra
    memory to the result itself plus one strip.
    """
    width, height = im.size
    if width * height <= _STRIP_PIXELS:
        return np.array(im)  # small: one call, already a private copy
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = np.asarray(im.crop((0, top, width, bottom)))
    return out


_RANGE_TOLERANCE = 1e-5  # float inputs may overshoot [0, 1] by rounding; more suggests 0..255 data


def float_range_problem(lo: float, hi: float) -> str | None:
    """Why float pixels ranging over ``[lo, hi]`` are not an image in [0, 1], or None.

    The one rule for float pixels, from a file (float TIFFs) or from Python (arrays, tensors):
    values must lie in [0, 1], give or take rounding; anything else (0..255 data, HDR values
    above 1, negatives) is refused rather than guessed at or clipped.
    """
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        return f"float values must be in [0, 1], got range [{lo:.4g}, {hi:.4g}]"
    return None


def _float_to_uint16(values: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (any shape) -> uint16 at full scale 65535."""
    if not bool(np.isfinite(values).all()):
        # NaN has no grey level: scoring it as black would report a quality nobody can see.
        raise _PixelError("float image contains NaN or infinite values")
    if values.size:
        problem = float_range_problem(float(values.min()), float(values.max()))
        if problem is not None:
            raise _PixelError(problem)
    return np.rint(np.clip(values * 65535.0, 0, 65535)).astype(np.uint16)


def _apply_exif_orientation(im: Image.Image, owned: bool) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; never modifies an image the caller owns."""
    if owned:
        ImageOps.exif_transpose(im, in_place=True)
        return im
    if im.getexif().get(EXIF_ORIENTATION, 1) in (None, 1):
        return im  # nothing to do: avoid exif_transpose's full copy
    out = ImageOps.exif_transpose(im)
    return im if out is None else out


def _plugin_format(exc: BaseException, im: Image.Image | None = None) -> str | None:
    """The image format whose decoder raised ``exc`` ("PNG", "PPM", ...), if it can be told."""
    if im is not None and im.format:
        return str(im.format)
    found = None
    tb = exc.__traceback__
    while tb is not None:  # the innermost PIL image object on the stack is the failing plugin
        owner = tb.tb_frame.f_locals.get("self")
        fmt = getattr(owner, "format", None) if isinstance(owner, Image.Image) else None
        found = fmt if isinstance(fmt, str) and fmt else found
        tb = tb.tb_next
    return found


def as_decode_error(
    name: str, exc: BaseException, *, header: bool = False, im: Image.Image | None = None
) -> ImageDecodeError:
    """What an exception raised while decoding ``name`` means, as an :class:`ImageDecodeError`.

    The decoder's one wording of failures, also for exceptions raised around it (a decoder
    swapped in, a worker): an :class:`ImageDecodeError` is returned as it is; an unknown
    format, running out of memory, truncated data and anything else a format plugin raises
    each get their reason and a message naming the format where it can be told.

    Args:
        name: the input, as messages name it.
        exc: what was raised.
        header: raised while reading the header (nothing decoded yet).
        im: the image being decoded, to name its format.
    """
    if isinstance(exc, ImageDecodeError):
        return exc
    if isinstance(exc, UnidentifiedImageError):
        return ImageDecodeError(f"{name}: cannot identify image file (not an image?)",
                                "not_an_image")
    if isinstance(exc, MemoryError):
        stage = "reading the header" if header else "decoding"
        return ImageDecodeError(f"{name}: out of memory while {stage}", "out_of_memory")
    cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    fmt = _plugin_format(exc, im)
    what = f"{fmt} " if fmt else ""
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        detail = f"truncated or incomplete {what}image data ({cause})"
    elif header:
        detail = f"malformed {what}image header ({cause})"
    else:
        detail = f"corrupt or unsupported {what}image data ({cause})"
    return ImageDecodeError(f"{name}: {detail}", "malformed")


class _PixelError(ValueError):
    """Decoded pixels that cannot be scored; the caller adds the file's name to the message."""


def decode_rgb(
    source: ImageSource,
    *,
    max_pixels: int | None = None,
    min_size: int = 32,
) -> np.ndarray:
    """Decode an image to an RGB array, with every safety check of :func:`load_image`.

    This is the fast path for batch engines: integer pixels are 4x smaller than float32, so workers
    can queue them cheaply and convert a whole batch at once with :func:`to_batch`.

    Args:
        source: a path (str or ``os.PathLike``), encoded bytes, a binary file object, or a PIL image
            (then it is not modified; a lazily opened one is checked before it is decoded).
        max_pixels: refuse images with more pixels than this, judged from the header before any
            decoding. ``None`` means ``QUALICLIP_MAX_PIXELS`` or :data:`DEFAULT_MAX_PIXELS`.
        min_size: refuse images whose shorter side is below this many pixels.

    Returns:
        A C-contiguous array of shape ``(H, W, 3)``: ``uint8`` for 8-bit and lower sources,
        ``uint16`` (full scale 65535) for 16-bit and floating-point sources. Alpha is composited
        onto white, EXIF orientation is applied, animations give their first frame. Float
        pixels (grey or RGB TIFFs; RGB needs ``tifffile``, the ``tiff`` extra) must lie in
        [0, 1], the rule :func:`to_batch` applies to float arrays.

    Raises:
        ImageDecodeError: missing file, not a regular file (a folder, FIFO, device or socket),
            not an image, malformed header, truncated or corrupt data, NaN pixels, float pixels
            outside [0, 1], too large or too small. Whatever a decoder raises for the input ends
            up here, with its reason.
        TypeError: ``source`` is of an unsupported type.
        ValueError: ``max_pixels`` or ``min_size`` is not positive.
    """
    limit = max_pixels_from_env() if max_pixels is None else int(max_pixels)
    if limit <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}")
    name = _describe(source)
    with contextlib.ExitStack() as files:
        try:
            im, owned = _open(source, name, limit, files)
        except _OtherTiff as tiff:
            arr = _decode_other_tiff(tiff, name, limit, min_size)
        else:
            arr = _decode_opened(im, owned, name, limit, min_size)
    # PIL hands out read-only views of its buffer; callers (and torch.from_numpy) want to own it.
    if not (arr.flags.writeable and arr.flags.c_contiguous):
        arr = np.array(arr, order="C", copy=True)
    return arr


def _decode_opened(
    im: Image.Image, owned: bool, name: str, limit: int, min_size: int
) -> np.ndarray:
    """Check and decode an image Pillow opened (header read, nothing decoded yet)."""
    try:
        _check_size(im, name, limit, min_size)  # header only: nothing decoded yet
        try:
            im.load()  # LOAD_TRUNCATED_IMAGES stays False: a short file raises here
            oriented = _apply_exif_orientation(im, owned)
            return _to_rgb_array(oriented)
        except ImageDecodeError:
            raise
        except _PixelError as exc:
            raise ImageDecodeError(f"{name}: {exc}", "malformed") from exc
        except Exception as exc:  # PIL plugins raise OSError, SyntaxError, ... (raised again)
            raise as_decode_error(name, exc, im=im) from exc
    finally:
        if owned:
            im.close()


# --- TIFFs Pillow cannot read: float RGB ---------------------------------------------------------


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff(fp: Any) -> bool:
    try:
        fp.seek(0)
        head = fp.read(4)
        fp.seek(0)
    except (OSError, ValueError, AttributeError):
        return False
    return head in _TIFF_MAGIC


class _OtherTiff(ImageDecodeError):
    """A TIFF that Pillow could not identify; holds the stream for :mod:`tifffile`."""

    def __init__(self, refusal: ImageDecodeError, fp: Any) -> None:
        super().__init__(str(refusal), refusal.reason)
        self.fp = fp


def _decode_other_tiff(tiff: _OtherTiff, name: str, limit: int, min_size: int) -> np.ndarray:
    """Float TIFFs with 3 or 4 samples (RGB, RGB + alpha), which Pillow has no mode for,
    read with ``tifffile`` (the ``tiff`` extra) under the rule of every float input: values in
    [0, 1] (:func:`float_range_problem`). Any other TIFF Pillow cannot read stays refused."""
    try:
        import tifffile
    except ImportError:
        raise ImageDecodeError(
            f"{tiff}; if it is a float RGB TIFF, reading it needs tifffile: "
            "pip install 'qualiclip[tiff]'", tiff.reason) from None
    try:
        # A name of our own: tifffile takes a stream's from its .name, which for a file opened
        # from a descriptor (as the decoder opens regular files) is an int it cannot split.
        # The stream itself is read in place (no in-memory copy of a large float file).
        with tifffile.TiffFile(tiff.fp, name="image.tif") as tif:
            page: Any = tif.pages[0]
            samples = int(page.samplesperpixel)
            if page.dtype is None or page.dtype.kind != "f" or samples not in (3, 4):
                raise tiff
            _check_dims(int(page.imagewidth), int(page.imagelength), name, limit, min_size)
            data = np.asarray(page.asarray(), dtype=np.float32)
            separate = int(page.planarconfig) == 2
    except ImageDecodeError:
        raise
    except Exception as exc:  # tifffile raises many kinds on bad data (raised again)
        raise as_decode_error(name, exc) from exc
    if separate and data.ndim == 3:
        data = np.moveaxis(data, 0, -1)
    if data.ndim != 3 or data.shape[-1] != samples:
        raise ImageDecodeError(f"{name}: unsupported TIFF layout {data.shape}", "malformed")
    try:
        pixels = _float_to_uint16(data)
    except _PixelError as exc:
        raise ImageDecodeError(f"{name}: {exc}", "malformed") from exc
    if samples == 4:  # alpha over white, as for every image with alpha
        alpha = pixels[..., 3:].astype(np.uint32)
        rgb = pixels[..., :3].astype(np.uint32)
        pixels = ((rgb * alpha + 65535 * (65535 - alpha) + 32767) // 65535).astype(np.uint16)
    return np.ascontiguousarray(pixels[..., :3])


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = None,
    min_size: int = 32,
) -> torch.Tensor:
    """Load one image as the model's input: RGB float32 in [0, 1], full resolution.

    Args:
        source: a path, encoded bytes, a binary file object, or a PIL image.
        max_pixels: decompression-bomb limit (see :func:`decode_rgb`).
        min_size: minimum length of the shorter side in pixels.

    Returns:
        A contiguous float32 tensor in [0, 1]. 16-bit sources are divided by 65535 (no 8-bit
        quantisation on the way).

    Shape:
        ``(3, H, W)``, H and W after EXIF orientation.

    Raises:
        ImageDecodeError: the input cannot be used; the message names it and says why.
    """
    return _array_to_tensor(decode_rgb(source, max_pixels=max_pixels, min_size=min_size))


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8/uint16 array -> contiguous (..., 3, H, W) float32 in [0, 1], by the
    one conversion :func:`pixels_to_tensor`."""
    batch = pixels_to_tensor(list(arr) if arr.ndim == 4 else [arr]).contiguous()
    return batch if arr.ndim == 4 else batch[0]


def pixels_to_tensor(
    pixels: Sequence[np.ndarray | torch.Tensor],
    device: torch.device | str = "cpu",
    *,
    staging: torch.Tensor | None = None,
) -> torch.Tensor:
    """Equal-size decoded images as the model's input: float32 RGB in [0, 1] on ``device``.

    The one conversion of decoded pixels to model input: the engine's file scoring, the HTTP
    service (through ``engine.score_arrays``) and ``qualiclip.score`` on arrays all use it. uint8
    values are divided by 255, uint16 by 65535, so a pixel gets the same float on every path.

    Where the conversion happens depends on where the model is:

    * on a CPU (``device`` is the CPU and no ``staging``), each image is converted straight into
      one float buffer: no intermediate copies;
    * otherwise the pixels cross to ``device`` as they are (1 or 2 bytes a value, a quarter or
      half of float32's size), through ``staging`` when given (a page-locked host buffer
      ``[B, H, W, 3]`` of dtype uint8 for uint8 pixels, int16 for uint16 pixels, so the copy is
      asynchronous), and are converted there;
    * tensors ``[3, H, W]`` of uint8 already on ``device`` (decoded on the GPU) are converted in
      place of residence.

    Args:
        pixels: ``H x W x 3`` arrays (uint8 or uint16; one dtype when staged), or uint8
            tensors ``3 x H x W``; all of one size.
        device: where the model runs.
        staging: host buffer to stage the copy in; the caller must not reuse it before the copy
            to ``device`` has finished (record an event after this call).

    Returns:
        ``[B, 3, H, W]`` float32, channels-last in memory (a view of ``[B, H, W, 3]``).

    Raises:
        ValueError: no pixels, mixed sizes or kinds, or a staging buffer of the wrong shape.
    """
    if not pixels:
        raise ValueError("pixels_to_tensor: no images")
    device = torch.device(device)
    first = pixels[0]
    if isinstance(first, torch.Tensor):
        tensors = [p for p in pixels if isinstance(p, torch.Tensor) and p.shape == first.shape]
        if len(tensors) != len(pixels):
            raise ValueError("pixels_to_tensor: images must all be tensors of one shape")
        stacked = torch.stack([p.to(device, non_blocking=True) for p in tensors])  # [B, 3, H, W]
        # Channels-last, like decoded arrays: one transposing copy while still one byte a value.
        hwc = stacked.permute(0, 2, 3, 1).contiguous()
        return hwc.to(torch.float32).div_(255.0).permute(0, 3, 1, 2)
    arrays = [np.asarray(p) for p in pixels]
    for a in arrays:
        if a.shape != first.shape or a.ndim != 3 or a.shape[2] != 3 or a.dtype not in (
            np.uint8, np.uint16
        ):
            raise ValueError(
                "pixels_to_tensor: expected H x W x 3 uint8 or uint16 images of one size, got "
                f"{a.shape} {a.dtype} after {first.shape}"
            )
    h, w, _ = first.shape
    if device.type == "cpu" and staging is None:
        batch = torch.empty((len(arrays), h, w, 3), dtype=torch.float32)
        for i, arr in enumerate(arrays):
            if arr.dtype == np.uint16:  # torch has few uint16 kernels; NumPy converts exactly
                batch[i].copy_(torch.from_numpy(arr.astype(np.float32))).div_(65535.0)
            else:
                # Written through NumPy: the array may be read-only (np.asarray of a PIL image),
                # which torch.from_numpy warns about; uint8 -> float32 is exact either way.
                batch[i].numpy()[...] = arr
                batch[i].div_(255.0)
        # [B, H, W, 3] viewed as [B, 3, H, W] is exactly the channels-last layout.
        return batch.permute(0, 3, 1, 2)
    if any(a.dtype != first.dtype for a in arrays):
        raise ValueError("pixels_to_tensor: staged images must all have one dtype")
    wide = first.dtype == np.uint16
    # uint16 travels as int16 (same bits) and is unwrapped on the device: torch's uint16 has
    # few kernels, int16 and int32 have them all.
    dtype = torch.int16 if wide else torch.uint8
    shape = (len(arrays), h, w, 3)
    if staging is None:
        staging = torch.empty(shape, dtype=dtype)
    elif tuple(staging.shape) != shape or staging.dtype != dtype:
        raise ValueError(
            f"pixels_to_tensor: staging buffer {tuple(staging.shape)} {staging.dtype} "
            f"does not fit {shape} {dtype}"
        )
    for i, arr in enumerate(arrays):
        staging[i].numpy()[...] = arr.view(np.int16) if wide else arr  # read-only arrays too
    raw = staging.to(device, non_blocking=True)  # the conversions below copy: staging is kept
    if wide:
        values = raw.to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32).div_(65535.0)
    else:
        values = raw.to(torch.float32).div_(255.0)
    return values.permute(0, 3, 1, 2)


# --- to_batch ----------------------------------------------------------------------------------



def _check_float_range(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.numel() == 0:
        raise ValueError(f"{what}: empty input with shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: contains NaN or infinite values")
    problem = float_range_problem(float(x.min()), float(x.max()))
    if problem is not None:
        raise ValueError(f"{what}: {problem} (for 0..255 data pass uint8, or divide by 255)")
    return x.clamp(0.0, 1.0)


def _numpy_to_batch(x: np.ndarray) -> torch.Tensor:
    what = f"NumPy array with shape {x.shape} and dtype {x.dtype}"
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim == 3 and x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[3] != 3:
        hint = " (it looks like CHW: NumPy inputs are HWC, use x.transpose(1, 2, 0))" if (
            x.ndim == 4 and x.shape[1] == 3
        ) else ""
        raise ValueError(f"{what}: expected H x W, H x W x 3 or B x H x W x 3{hint}")
    if x.dtype in (np.uint8, np.uint16):
        return _array_to_tensor(x)
    if np.issubdtype(x.dtype, np.floating):
        # A copy when the array is read-only (torch.from_numpy warns about those).
        x = np.ascontiguousarray(x, dtype=np.float32)
        t = torch.from_numpy(x if x.flags.writeable else x.copy())
        return _check_float_range(t, what).movedim(-1, -3).contiguous()
    raise TypeError(f"{what}: dtype must be uint8, uint16 or floating point in [0, 1]")


def _tensor_to_batch(x: torch.Tensor) -> torch.Tensor:
    what = f"tensor with shape {tuple(x.shape)} and dtype {x.dtype}"
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected 3 x H x W or B x 3 x H x W (RGB, channels first)")
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"{what}: dtype must be uint8 or floating point in [0, 1]")
    return _check_float_range(x.to(torch.float32), what)


def to_batch(x: object) -> torch.Tensor:
    """Normalise any supported image input to a float32 batch in [0, 1].

    Accepted inputs:

    * a path (str or ``os.PathLike``) or encoded bytes: decoded with :func:`load_image`;
    * a PIL image (any mode; converted as :func:`decode_rgb` does, no size limits applied);
    * a NumPy array ``H x W`` (grey), ``H x W x 1``, ``H x W x 3`` or ``B x H x W x 3``, of dtype
      uint8 (/255), uint16 (/65535) or float (must already be in [0, 1]);
    * a torch tensor ``3 x H x W`` or ``B x 3 x H x W``, uint8 (/255) or float in [0, 1]; it stays
      on its device.

    Args:
        x: the input.

    Returns:
        A float32 tensor in [0, 1].

    Shape:
        ``(B, 3, H, W)``; B = 1 for single images.

    Raises:
        TypeError: unsupported type or dtype (the message names it).
        ValueError: unsupported shape, or float values outside [0, 1].
    """
    if isinstance(x, torch.Tensor):
        return _tensor_to_batch(x)
    if isinstance(x, np.ndarray):
        return _numpy_to_batch(x)
    if isinstance(x, Image.Image):
        return _array_to_tensor(decode_rgb(x, max_pixels=sys.maxsize, min_size=1))[None]
    if isinstance(x, (str, os.PathLike, bytes, bytearray)):
        return load_image(x)[None]
    raise TypeError(
        "expected a path, bytes, PIL image, NumPy array or torch tensor, "
        f"got {type(x).__name__}"
    )


# --- as_pixels ---------------------------------------------------------------------------------


def as_pixels(image: object, *, min_size: int = 32) -> list[np.ndarray] | torch.Tensor:
    """Any image input, as integer pixels where it has them, else as a float batch.

    The one dispatch of inputs for the functions that take "an image" (:func:`qualiclip.score`,
    :func:`qualiclip.quality_map`): files become their decoded pixels, integer arrays stay what
    they are, and everything else is :func:`to_batch`'s. Integer pixels are 3 or 6 bytes a pixel
    instead of float32's 12, and convert to the model's input by :func:`pixels_to_tensor`, the
    one conversion, where the model runs.

    Args:
        image: a path (str or ``os.PathLike``), encoded bytes, a binary file object, a PIL
            image, a NumPy array or a tensor (as :func:`to_batch` takes them).
        min_size: shortest side a file may have (see :func:`decode_rgb`); other inputs are
            checked by whoever scores them.

    Returns:
        ``H x W x 3`` uint8 or uint16 arrays (one for a file or an ``H x W x 3`` array, ``B``
        for a ``B x H x W x 3`` array), or a float32 ``[B, 3, H, W]`` batch in [0, 1].

    Raises:
        ImageDecodeError: a file or bytes that cannot be decoded.
        TypeError, ValueError: what :func:`to_batch` refuses.

    Example:
        >>> pixels = as_pixels(np.zeros((64, 80, 3), dtype=np.uint8))
        >>> len(pixels), pixels[0].shape
        (1, (64, 80, 3))
        >>> as_pixels(torch.zeros(3, 64, 80)).shape
        torch.Size([1, 3, 64, 80])
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray)) or hasattr(image, "read"):
        return [decode_rgb(image, min_size=min_size)]  # type: ignore[arg-type]
    if (isinstance(image, np.ndarray) and image.dtype in (np.uint8, np.uint16)
            and image.ndim in (3, 4) and image.shape[-1] == 3):
        return list(image) if image.ndim == 4 else [image]
    return to_batch(image)
