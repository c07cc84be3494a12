"""Tests for qualiclip.images and qualiclip.inputs: decoding every mode safely, to_batch, and
input path expansion.

Real photographs from scikit-image are written by PIL in each mode and read back; expected pixels
are computed independently (NumPy on the original array), never taken from our own output.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from qualiclip import images
from qualiclip.images import (
    ImageDecodeError,
    decode_rgb,
    load_image,
    to_batch,
)
from qualiclip.inputs import IMAGE_EXTENSIONS, list_image_paths

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()[::2, ::2].copy()  # 256 x 256 x 3 uint8: enough, and fast


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return skdata.coffee()[::2, ::2].copy()  # 200 x 300 x 3: non-square, for orientation


def _save(tmp_path: Path, name: str, im: Image.Image, **kw: Any) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


# --- modes ---------------------------------------------------------------------------------------


def test_rgb_png_roundtrip_exact(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = _save(tmp_path, "a.png", Image.fromarray(astronaut))
    x = load_image(path)
    assert x.dtype == torch.float32 and x.shape == (3, 256, 256) and x.is_contiguous()
    np.testing.assert_array_equal(_as_uint8(x), astronaut)
    arr = decode_rgb(str(path))
    assert arr.dtype == np.uint8 and arr.shape == (256, 256, 3)
    np.testing.assert_array_equal(arr, astronaut)


def test_rgba_png_composited_on_white(tmp_path: Path, astronaut: np.ndarray) -> None:
    h, w, _ = astronaut.shape
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    rgba = np.dstack([astronaut, alpha])
    path = _save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA"))
    got = decode_rgb(path).astype(np.float64)
    a = alpha[:, :, None] / 255.0
    expected = astronaut * a + 255.0 * (1 - a)
    assert np.abs(got - expected).max() <= 1.0
    assert (got[:, 0] == 255).all()  # fully transparent column is white, whatever RGB was stored


def test_la_png(tmp_path: Path, astronaut: np.ndarray) -> None:
    grey = np.asarray(Image.fromarray(astronaut).convert("L"))
    la = Image.merge("LA", [Image.fromarray(grey), Image.new("L", grey.shape[::-1], 0)])
    got = decode_rgb(_save(tmp_path, "la.png", la))
    assert (got == 255).all()  # alpha 0 everywhere: all white


def test_greyscale(tmp_path: Path, astronaut: np.ndarray) -> None:
    grey = np.asarray(Image.fromarray(astronaut).convert("L"))
    got = decode_rgb(_save(tmp_path, "g.png", Image.fromarray(grey)))
    assert got.shape == grey.shape + (3,)
    for c in range(3):
        np.testing.assert_array_equal(got[:, :, c], grey)


def test_one_bit(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = _save(tmp_path, "b.png", Image.fromarray(astronaut).convert("1"))
    x = load_image(path)
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    assert 0.05 < float(x.mean()) < 0.95


def test_16bit_png_keeps_precision(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, size=(64, 96), dtype=np.uint16)
    path = _save(tmp_path, "g16.png", Image.fromarray(grey16))
    arr = decode_rgb(path)
    assert arr.dtype == np.uint16
    np.testing.assert_array_equal(arr[:, :, 1], grey16)
    x = load_image(path)
    back = (x[0].double() * 65535).round().numpy()
    np.testing.assert_array_equal(back, grey16)
    # Not quantised to 8 bits: far more than 256 distinct levels survive.
    assert torch.unique(x).numel() > 1000


def test_32bit_integer_tiff(tmp_path: Path) -> None:
    values = np.array([[-5, 0, 1000, 65535, 70000]] * 40, dtype=np.int32)
    values = np.repeat(values, 8, axis=1)
    path = _save(tmp_path, "i.tif", Image.fromarray(values))
    with Image.open(path) as im:
        assert im.mode == "I"
    got = decode_rgb(path)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got[0, ::8, 0], [0, 0, 1000, 65535, 65535])  # clipped


def test_float_tiff(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 1, 80, dtype=np.float32), (40, 1))
    path = _save(tmp_path, "f.tif", Image.fromarray(ramp, "F"))
    x = load_image(path)
    assert torch.allclose(x[2], torch.from_numpy(ramp), atol=1 / 65535)


def test_palette_gif(tmp_path: Path, astronaut: np.ndarray) -> None:
    pal = Image.fromarray(astronaut).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    path = _save(tmp_path, "p.gif", pal)
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(decode_rgb(path), expected)


def test_palette_with_transparency(tmp_path: Path) -> None:
    idx = np.zeros((40, 40), np.uint8)
    idx[:, 20:] = 1
    pal = Image.fromarray(idx, "P")
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    path = _save(tmp_path, "t.png", pal, transparency=0)
    got = decode_rgb(path)
    assert (got[:, :20] == 255).all()  # transparent black index -> white
    assert (got[:, 20:] == [200, 10, 10]).all()


def test_cmyk_jpeg(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = _save(tmp_path, "c.jpg", Image.fromarray(astronaut).convert("CMYK"), quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    got = decode_rgb(path).astype(np.int16)
    assert np.abs(got - astronaut).mean() < 4.0  # JPEG loss only; colours not inverted


def test_exif_rotated_jpeg(tmp_path: Path, coffee: np.ndarray) -> None:
    im = Image.fromarray(coffee)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, "r.jpg", im, exif=exif, quality=95)
    x = load_image(path)
    h, w, _ = coffee.shape
    assert x.shape == (3, w, h)
    got = _as_uint8(x).astype(np.int16)
    clockwise = np.rot90(coffee, k=-1)
    err_cw = np.abs(got - clockwise).mean()
    err_ccw = np.abs(got - np.rot90(coffee, k=1)).mean()
    assert err_cw < 4.0 and err_ccw > 5 * err_cw


def test_pil_input_not_modified(tmp_path: Path, coffee: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path, "r.jpg", Image.fromarray(coffee), exif=exif)
    with Image.open(path) as im:
        size = im.size
        arr = decode_rgb(im)
        assert im.size == size and im.getexif().get(0x0112) == 6
    assert arr.shape == (size[0], size[1], 3)


def test_bytes_and_file_like(tmp_path: Path, astronaut: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "PNG")
    data = buf.getvalue()
    ref = decode_rgb(data)
    np.testing.assert_array_equal(ref, astronaut)
    np.testing.assert_array_equal(decode_rgb(io.BytesIO(data)), ref)
    np.testing.assert_array_equal(decode_rgb(bytearray(data)), ref)

    class Pipe:  # readable but not seekable, like sys.stdin.buffer
        def __init__(self) -> None:
            self._buf = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self._buf.read(n)

        def seekable(self) -> bool:
            return False

    np.testing.assert_array_equal(decode_rgb(Pipe()), ref)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int"):
        decode_rgb(3)  # type: ignore[arg-type]


# --- failures -----------------------------------------------------------------------------------


def test_truncated_jpeg_raises(tmp_path: Path, astronaut: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageDecodeError, match="cut.jpg.*truncated"):
        load_image(path)


def test_truncated_png_raises(tmp_path: Path, astronaut: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="cut.png"):
        load_image(path)


def test_non_image_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ImageDecodeError, match="notes.txt: cannot identify image file"):
        load_image(path)
    with pytest.raises(ImageDecodeError, match="nope.jpg: no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageDecodeError, match="is a directory"):
        load_image(tmp_path)
    assert issubclass(ImageDecodeError, ValueError)


def test_too_small_names_minimum(tmp_path: Path) -> None:
    path = _save(tmp_path, "s.png", Image.new("RGB", (40, 20)))
    with pytest.raises(ImageDecodeError, match=r"s.png: too small: 40x20 .*at least 32 pixels"):
        load_image(path)
    assert load_image(path, min_size=20).shape == (3, 20, 40)


def test_each_failure_carries_its_reason(tmp_path: Path, astronaut: np.ndarray) -> None:
    """Programs read ``reason`` (the service maps it to a status), never the message."""
    import pickle

    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "JPEG", quality=90)
    (tmp_path / "notes.txt").write_text("hello")
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (tmp_path / "nope.jpg", {}, "unreadable"),
        (tmp_path, {}, "unreadable"),
        (tmp_path / "notes.txt", {}, "not_an_image"),
        (buf.getvalue()[: len(buf.getvalue()) // 2], {}, "malformed"),
        (b"P6\n4x 48\n255\n", {}, "malformed"),
        (_png_header_only(50_000, 50_000), {}, "too_large"),
        (buf.getvalue(), {"max_pixels": 10_000}, "too_large"),
        (buf.getvalue(), {"min_size": 512}, "too_small"),
    ]
    for source, options, reason in cases:
        with pytest.raises(ImageDecodeError) as info:
            decode_rgb(source, **options)
        assert info.value.reason == reason, (source, str(info.value))
        assert info.value.reason in images.DECODE_FAILURES
        again = pickle.loads(pickle.dumps(info.value))  # from a worker process, as it was
        assert (str(again), again.reason) == (str(info.value), reason)


def test_exceptions_around_the_decoder_get_its_wording_and_reason() -> None:
    from PIL import UnidentifiedImageError

    for exc, reason, words in (
        (MemoryError(), "out_of_memory", "x.png: out of memory while decoding"),
        (EOFError(), "malformed", "x.png: truncated or incomplete image data (EOFError)"),
        (ValueError("Truncated IHDR chunk"), "malformed", "(ValueError: Truncated IHDR chunk)"),
        (KeyError("tile"), "malformed", "x.png: corrupt or unsupported image data (KeyError"),
        (UnidentifiedImageError("?"), "not_an_image", "x.png: cannot identify image file"),
    ):
        err = images.as_decode_error("x.png", exc)
        assert err.reason == reason and words in str(err), (exc, str(err))
    same = ImageDecodeError("x.png: too small", "too_small")
    assert images.as_decode_error("x.png", same) is same


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header but carries almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(50_000, 50_000))  # 2.5 gigapixels claimed, 100 bytes stored

    def no_decode(self: object) -> None:
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageDecodeError, match=r"bomb.png: too large: .*2500000000"):
        load_image(path)
    monkeypatch.undo()
    # Under the limit, decoding starts and finds the data missing.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    path.write_bytes(_png_header_only(1000, 1000))
    with pytest.raises(ImageDecodeError, match="bomb.png: truncated"):
        load_image(path)
    # A limit above PIL's own (2 x MAX_IMAGE_PIXELS) raises PIL's, or PIL would refuse first.
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(path, max_pixels=10**10)
    assert Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS >= 10**10


def test_pixel_limit_argument_and_env(
    tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(tmp_path, "a.png", Image.fromarray(astronaut))
    with pytest.raises(ImageDecodeError, match=r"65536 pixels > limit of 10000"):
        load_image(path, max_pixels=10_000)
    monkeypatch.setenv("QUALICLIP_MAX_PIXELS", "60000")
    with pytest.raises(ImageDecodeError, match="limit of 60000"):
        load_image(path)
    assert load_image(path, max_pixels=70_000).shape == (3, 256, 256)
    monkeypatch.setenv("QUALICLIP_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="QUALICLIP_MAX_PIXELS"):
        load_image(path)


def test_pil_decompression_bomb_error_becomes_ours(
    tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(tmp_path, "a.png", Image.fromarray(astronaut))
    monkeypatch.setattr(images, "_raise_pil_limit_to", lambda n: None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="a.png: too large"):
        load_image(path, max_pixels=10**9)


# --- to_batch -----------------------------------------------------------------------------------


def test_to_batch_accepted(tmp_path: Path, astronaut: np.ndarray) -> None:
    ref = torch.from_numpy(astronaut).permute(2, 0, 1).float().div(255)[None]
    path = _save(tmp_path, "a.png", Image.fromarray(astronaut))
    cases = {
        "path": str(path),
        "pathlike": path,
        "pil": Image.fromarray(astronaut),
        "uint8 HWC": astronaut,
        "float HWC": astronaut.astype(np.float64) / 255,
        "uint16 HWC": astronaut.astype(np.uint16) * 257,
        "BHWC": astronaut[None],
        "tensor CHW": ref[0],
        "tensor BCHW": ref,
        "tensor uint8": torch.from_numpy(astronaut).permute(2, 0, 1),
    }
    for name, value in cases.items():
        out = to_batch(value)
        assert out.shape == (1, 3, 256, 256) and out.dtype == torch.float32, name
        assert torch.allclose(out, ref, atol=1e-6), name


def test_to_batch_grey_and_batch() -> None:
    grey = np.arange(64 * 48, dtype=np.uint8).reshape(64, 48)
    out = to_batch(grey)
    assert out.shape == (1, 3, 64, 48)
    assert torch.equal(out[0, 0], out[0, 2])
    assert float(out[0, 0, 1, 0]) == pytest.approx(48 / 255)
    assert to_batch(grey[:, :, None]).shape == (1, 3, 64, 48)
    assert to_batch(torch.rand(5, 3, 8, 9)).shape == (5, 3, 8, 9)


def test_to_batch_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\].*uint8"):
        to_batch(np.full((8, 8, 3), 200.0))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        to_batch(torch.full((3, 8, 8), -0.5))
    with pytest.raises(ValueError, match="NaN"):
        to_batch(torch.full((3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\(3, 16, 16\).*CHW"):
        to_batch(np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"\(8, 8, 4\)"):
        to_batch(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(1, 8, 8, 3\)"):
        to_batch(torch.zeros(1, 8, 8, 3))
    with pytest.raises(TypeError, match="int32"):
        to_batch(torch.zeros(3, 8, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="bool"):
        to_batch(np.zeros((8, 8, 3), bool))
    with pytest.raises(TypeError, match="list"):
        to_batch([1, 2, 3])


# --- list_image_paths ---------------------------------------------------------------------------


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    for rel in [
        "a/1.jpg",
        "a/2.PNG",
        "a/notes.txt",
        "a/sub/3.webp",
        "a/sub/deeper/4.tiff",
        "a/.hidden/5.jpg",
        "a/._6.jpg",
        "b/x.gif",
        "b/y.bmp",
        "readme.md",
        "c[1].jpg",
    ]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path


def test_iter_folders(tree: Path) -> None:
    got = list_image_paths([str(tree / "a")])
    rel = [p.relative_to(tree).as_posix() for p in got]
    assert rel == ["a/1.jpg", "a/2.PNG", "a/sub/3.webp", "a/sub/deeper/4.tiff"]
    flat = list_image_paths([str(tree / "a")], recursive=False)
    assert [p.name for p in flat] == ["1.jpg", "2.PNG"]


def test_iter_explicit_missing_and_dedup(tree: Path) -> None:
    inputs = [str(tree / "readme.md"), str(tree / "missing.jpg"), str(tree / "a"),
              str(tree / "a" / "1.jpg"), str(tree / "c[1].jpg")]
    got = list_image_paths(inputs)
    names = [p.name for p in got]
    assert names == ["readme.md", "missing.jpg", "1.jpg", "2.PNG", "3.webp", "4.tiff", "c[1].jpg"]


def test_iter_globs(tree: Path) -> None:
    got = list_image_paths([str(tree / "a" / "*")])
    assert [p.name for p in got] == ["1.jpg", "2.PNG", "3.webp", "4.tiff"]  # sub/ walked
    got = list_image_paths([str(tree / "**" / "*.jpg")])
    assert sorted(p.name for p in got) == ["1.jpg", "c[1].jpg"]
    got = list_image_paths([str(tree / "b" / "?.*")])
    assert [p.name for p in got] == ["x.gif", "y.bmp"]
    nothing = str(tree / "zzz*.jpg")
    assert list_image_paths([nothing]) == [Path(nothing)]


def test_iter_stdin(tree: Path) -> None:
    text = f"{tree / 'b' / 'x.gif'}\n\n   \n{tree / 'gone.png'}\r\n{tree / 'b'}\n"
    got = list_image_paths(["-"], stdin=io.StringIO(text))
    assert [p.name for p in got] == ["x.gif", "gone.png", "y.bmp"]


def test_extensions() -> None:
    expected = {"jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "gif", "ppm", "pgm"}
    assert {e.lstrip(".") for e in IMAGE_EXTENSIONS} == expected


# --- hostile inputs: special files, odd paths, NaN pixels ----------------------------------------


def _finishes(fn: Any, seconds: float = 10.0) -> list[Any]:
    """Run ``fn`` in a daemon thread; return [result or exception], or [] if it is still blocked."""
    import threading

    box: list[Any] = []

    def call() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    return box


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    box = _finishes(lambda: decode_rgb(fifo))
    assert box, "decode_rgb blocked on a FIFO"
    assert isinstance(box[0], ImageDecodeError)
    assert "pipe.jpg: not a regular file (a FIFO" in str(box[0])


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_device_is_refused() -> None:
    box = _finishes(lambda: load_image("/dev/zero"))
    assert box and isinstance(box[0], ImageDecodeError)
    assert "not a regular file (a device)" in str(box[0])


def test_symlink_loop_is_reported_as_such(tmp_path: Path) -> None:
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop.name)
    with pytest.raises(ImageDecodeError, match="loop.jpg: symlink loop"):
        decode_rgb(loop)
    # A folder scan keeps it (it has an image extension), so the scorer reports it.
    assert list_image_paths([tmp_path]) == [loop]


def test_name_too_long_does_not_stop_expansion(tmp_path: Path, astronaut: np.ndarray) -> None:
    good = _save(tmp_path, "good.png", Image.fromarray(astronaut[:64, :64]))
    long_name = str(tmp_path / ("x" * 400 + ".jpg"))
    paths = list_image_paths([long_name, str(good), str(tmp_path / ("y" * 400) / "*.jpg")])
    assert paths[1] == good and len(paths) == 3
    with pytest.raises(ImageDecodeError, match="file name too long"):
        decode_rgb(long_name)


def test_unreadable_subfolder_is_an_entry_not_skipped(
    tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Permissions do not bind root, so the refusal is simulated where the walk lists folders.
    locked = tmp_path / "locked"
    locked.mkdir()
    _save(locked, "hidden.png", Image.fromarray(astronaut[:64, :64]))
    good = _save(tmp_path, "good.png", Image.fromarray(astronaut[:64, :64]))
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert list_image_paths([tmp_path]) == [good, locked]
    with pytest.raises(ImageDecodeError, match="locked: folder cannot be read: Permission denied"):
        decode_rgb(locked)


def test_stdin_list_with_names_that_are_not_utf8(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg\n" + os.fsencode(tmp_path) + b"/\xe6\x97\xa5.png\n"
    stream = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")  # strict, as a UTF-8 locale
    paths = list_image_paths(["-"], stdin=stream)
    assert [os.fsencode(p) for p in paths] == raw.splitlines()


def test_nan_float_tiff_is_refused(tmp_path: Path) -> None:
    nan = np.full((40, 48), np.nan, np.float32)
    path = _save(tmp_path, "nan.tif", Image.fromarray(nan, mode="F"))
    with pytest.raises(ImageDecodeError, match="nan.tif: float image contains NaN or infinite"):
        decode_rgb(path)
    one_inf = np.full((40, 48), 0.5, np.float32)
    one_inf[3, 4] = np.inf
    path = _save(tmp_path, "inf.tif", Image.fromarray(one_inf, mode="F"))
    with pytest.raises(ImageDecodeError, match="NaN or infinite"):
        decode_rgb(path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00IHDR\x00\x00\x00\x00", "PNG image data"),
        (b"P6\n4x 48\n255\n", "malformed PPM image header"),
    ],
)
def test_malformed_headers_from_a_file_are_decode_errors(
    tmp_path: Path, data: bytes, match: str
) -> None:
    path = tmp_path / "bad.img"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError, match=match):
        load_image(path)


def test_rgb_copied_in_strips_is_exact(
    tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "_STRIP_PIXELS", 5000)  # strips of 9 rows at this width
    path = _save(tmp_path, "a.png", Image.fromarray(astronaut[:101, :555]))
    arr = decode_rgb(path)
    assert arr.flags.writeable and arr.flags.c_contiguous
    np.testing.assert_array_equal(arr, astronaut[:101, :555])


def test_list_files_expand_relative_to_their_folder(tmp_path: Path) -> None:
    """A .txt/.lst input is a list of paths: the same rule for scoring, Ray and training."""
    sub = tmp_path / "photos"
    sub.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 40)).save(sub / name)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# chosen photos\nphotos/a.png\n\n{sub / 'b.png'}\nphotos/missing.png\n")
    got = list_image_paths([str(listing)], list_files=True)
    assert list_image_paths([str(listing)]) == got  # the default
    assert list_image_paths([str(listing)], list_files=False) == [listing]
    assert got == [sub / "a.png", sub / "b.png", sub / "missing.png"]  # missing: an error row later
    from qualiclip.crops import find_images
    from qualiclip.ray_scoring import expand_inputs

    assert expand_inputs([str(listing)]) == [str(p) for p in got]
    assert find_images(listing) == sorted(got)


# --- float images: one rule for files and arrays (hostile input, round 3) ----------------------


@pytest.mark.parametrize("values", [(-0.25, 0.5), (0.0, 1.5), (0.0, 255.0)])
def test_float_tiff_outside_0_1_is_refused_as_arrays_are(tmp_path: Path, values) -> None:
    lo, hi = values
    ramp = np.tile(np.linspace(lo, hi, 80, dtype=np.float32), (40, 1))
    path = _save(tmp_path, "f.tif", Image.fromarray(ramp, "F"))
    with pytest.raises(ImageDecodeError, match=r"float values must be in \[0, 1\]") as info:
        decode_rgb(path)
    assert info.value.reason == "malformed"
    with pytest.raises(ValueError, match=r"float values must be in \[0, 1\]"):
        to_batch(np.repeat(ramp[..., None], 3, axis=2))


@pytest.mark.parametrize("layout", ["contig", "separate", "float16", "rgba"])
def test_rgb_float_tiff_decodes_with_the_same_rule(tmp_path: Path, layout: str) -> None:
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(3)
    rgb = rng.random((40, 50, 3), dtype=np.float32)
    path = tmp_path / "rgb.tif"
    if layout == "contig":
        tifffile.imwrite(path, rgb, photometric="rgb")
    elif layout == "separate":
        tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="rgb",
                         planarconfig="separate")
    elif layout == "float16":
        rgb = rgb.astype(np.float16).astype(np.float32)
        tifffile.imwrite(path, rgb.astype(np.float16), photometric="rgb")
    else:
        alpha = np.ones((40, 50, 1), np.float32)
        tifffile.imwrite(path, np.concatenate([rgb, alpha], -1), photometric="rgb",
                         extrasamples=["unassalpha"])
    arr = decode_rgb(path)
    assert arr.dtype == np.uint16 and arr.shape == (40, 50, 3)
    np.testing.assert_allclose(arr / 65535.0, rgb, atol=1 / 65535)
    x = load_image(path)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), rgb, atol=1 / 65535)
    tifffile.imwrite(path, rgb * 2, photometric="rgb")
    with pytest.raises(ImageDecodeError, match=r"float values must be in \[0, 1\]"):
        decode_rgb(path)


@pytest.mark.slow
def test_read_only_arrays_convert_without_a_warning() -> None:
    """np.asarray(PIL image) is read-only; PyTorch warns (once per process) when such an array
    is wrapped, so this runs in a fresh interpreter with warnings as errors."""
    import subprocess
    import sys

    code = """
import numpy as np, torch
from PIL import Image
import qualiclip
from qualiclip.images import pixels_to_tensor, to_batch

pil = np.asarray(Image.new("RGB", (64, 48), (10, 200, 30)))
assert not pil.flags.writeable
model = qualiclip.create_model("random-tiny", device="cpu")
qualiclip.score(model, pil)
wide = np.full((48, 64, 3), 40000, np.uint16); wide.setflags(write=False)
flt = np.full((48, 64, 3), 0.5, np.float32); flt.setflags(write=False)
for x in (pil, wide, flt):
    to_batch(x)
staged = torch.empty((1, 48, 64, 3), dtype=torch.uint8)
got = pixels_to_tensor([pil], "cpu", staging=staged)
assert torch.allclose(got[0, :, 0, 0], torch.tensor([10, 200, 30]) / 255.0)
"""
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
