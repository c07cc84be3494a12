"""Reading image files for the engine: decoding in threads ahead of the model, JPEGs on the GPU.

:func:`decoded_in_order` turns a stream of paths into :class:`Decoded` records, in input order,
each holding a file's integer pixels or the reason it has none. CPU decoding goes through
:func:`qualiclip.images.decode_rgb` (the one safe decoder) in daemon threads, which PIL's
decoders let run beside the model (they release the GIL). Where the model is on CUDA and
torchvision's nvJPEG is installed (the ``gpu`` extra), plain JPEGs are decoded on the GPU
instead (:func:`gpu_jpeg_decoder`); every other file, and any failure there, takes the CPU path.

The engine (:func:`qualiclip.engine.score_paths`) groups the records by size and scores them.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

from qualiclip import images
from qualiclip.images import ImageDecodeError, decode_rgb

__all__ = [
    "DECODE_MODES", "Decode", "Decoded", "JpegDecoder", "decode_file", "decode_jpeg_on_device",
    "decoded_in_order", "gpu_jpeg_decoder", "resolve_decoder",
]

#: Where image files are decoded: ``auto`` (JPEGs on the GPU when the model is on CUDA and
#: torchvision's nvJPEG is there, the rest on the CPU), ``cpu`` (threads), ``gpu`` (as auto, but
#: an error when GPU decoding is unavailable).
Decode = Literal["auto", "cpu", "gpu"]
DECODE_MODES: tuple[str, ...] = get_args(Decode)



@dataclass
class Decoded:
    """One input file after reading: its pixels, or the error that stands in for its score.

    ``index`` is the file's position in the input, so results can be put back in order.
    """

    index: int
    path: str
    pixels: np.ndarray | torch.Tensor | None  # H x W x 3 uint8/uint16, or 3 x H x W uint8 (GPU)
    error: str | None

    @property
    def key(self) -> tuple[int, int, str]:
        """What images must share to run in one pass: height, width, and the kind of pixels
        (decoded on the device, uint8 or uint16 arrays: each kind crosses as it is)."""
        assert self.pixels is not None  # noqa: S101 - internal invariant, not input validation
        if isinstance(self.pixels, torch.Tensor):
            return (self.pixels.shape[1], self.pixels.shape[2], "device")
        return (self.pixels.shape[0], self.pixels.shape[1], str(self.pixels.dtype))


def decode_file(index: int, path: str, min_size: int) -> Decoded:
    """``path`` decoded on the CPU; any failure becomes the record's error text, never raised."""
    try:
        return Decoded(index, path, decode_rgb(path, min_size=min_size), None)
    except ImageDecodeError as exc:  # its message names the file and says what is wrong
        return Decoded(index, path, None, str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure becomes this input's error row
        return Decoded(index, path, None, f"{type(exc).__name__}: {exc}")


JpegDecoder = Callable[[torch.Tensor], torch.Tensor]


def gpu_jpeg_decoder(device: torch.device | str) -> JpegDecoder | None:
    """A JPEG decoder on ``device`` (nvJPEG through torchvision), or None where there is none.

    torchvision is imported here only, and any failure to import it (missing, or built for
    another torch) means no GPU decoding: qualiclip itself never needs it.

    Returns:
        ``decode(data)``: encoded bytes (a uint8 CPU tensor) to RGB uint8 ``[3, H, W]`` on
        ``device``. Calls are serialised (one nvJPEG decoder state).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # the optional "gpu" extra
    except Exception:  # noqa: BLE001 - absent or incompatible: CPU decoding it is
        return None
    lock = threading.Lock()

    def decode(data: torch.Tensor) -> torch.Tensor:
        with lock:
            out: torch.Tensor = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return out

    return decode


def resolve_decoder(decode: str, device: torch.device) -> JpegDecoder | None:
    """The GPU JPEG decoder ``decode`` asks for on ``device``, or None for CPU decoding.

    Raises:
        ValueError: ``decode`` is not one of :data:`DECODE_MODES`, or it is ``"gpu"`` and there
            is no GPU decoding here (the message says why).
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "cpu":
        return None
    decoder = gpu_jpeg_decoder(device)
    if decoder is None and decode == "gpu":
        why = (
            f"the model runs on {device.type}" if device.type != "cuda"
            else "torchvision's decode_jpeg could not be imported (pip install 'qualiclip[gpu]')"
        )
        raise ValueError(f"GPU decoding needs a CUDA model and torchvision's nvJPEG: {why}")
    return decoder


def decode_jpeg_on_device(
    index: int, path: str, min_size: int, decoder: JpegDecoder
) -> Decoded:
    """``path`` decoded on the GPU when it is a plain JPEG; on the CPU otherwise.

    Only files that :func:`qualiclip.images.decode_rgb` would turn into the same picture go to
    the GPU: regular files, baseline RGB or greyscale JPEGs, no EXIF rotation, within the size
    limits. Anything else, and any failure on the GPU, is decoded (or refused, with its reason)
    by the CPU path.
    """
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            with Image.open(path) as im:
                width, height = im.size
                plain = (
                    im.format == "JPEG" and im.mode in ("RGB", "L")
                    and min(width, height) >= min_size
                    and width * height <= images.max_pixels_from_env()
                    and im.getexif().get(images.EXIF_ORIENTATION, 1) == 1
                )
            if plain:
                data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
                pixels = decoder(data)
                if tuple(pixels.shape) == (3, height, width) and pixels.dtype == torch.uint8:
                    return Decoded(index, path, pixels, None)
    except Exception:  # noqa: BLE001, S110 - the CPU decoder gives the verdict on this file
        pass
    return decode_file(index, path, min_size)


def decoded_in_order(
    paths: Iterable[str],
    min_size: int,
    workers: int,
    prefetch: int,
    decoder: JpegDecoder | None = None,
) -> Iterator[Decoded]:
    """Decode ``paths`` in ``workers`` threads, at most ``prefetch`` ahead, yielding in order.

    PIL's decoders release the GIL, so threads decode while the model computes. The threads are
    daemons told to stop as soon as the consumer stops (Ctrl-C, an error, a closed generator): a
    decode still running then neither delays the exit nor keeps the process alive, as a thread
    pool's workers would (the interpreter joins those at exit). With a ``decoder``, plain JPEGs
    are decoded on the GPU (see :func:`decode_jpeg_on_device`).
    """
    jobs: SimpleQueue[tuple[Future[Decoded], int, str] | None] = SimpleQueue()
    stop = threading.Event()

    def decode_one(index: int, path: str) -> Decoded:
        if decoder is not None:
            return decode_jpeg_on_device(index, path, min_size, decoder)
        return decode_file(index, path, min_size)

    def work() -> None:
        while (job := jobs.get()) is not None and not stop.is_set():
            future, index, path = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(decode_one(index, path))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, never lost
                future.set_exception(exc)

    threads = [
        threading.Thread(target=work, name=f"qualiclip-decode-{i}", daemon=True)
        for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    pending: deque[Future[Decoded]] = deque()
    try:
        for index, path in enumerate(paths):
            future: Future[Decoded] = Future()
            jobs.put((future, index, path))
            pending.append(future)
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        stop.set()
        for future in pending:
            future.cancel()
        for _ in threads:
            jobs.put(None)


