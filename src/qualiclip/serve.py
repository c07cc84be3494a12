"""An HTTP scoring service: FastAPI app factory, micro-batching, and a uvicorn runner.

Endpoints:

* ``POST /score``: the image bytes as the body (``Content-Type: image/*`` or
  ``application/octet-stream``), or ``multipart/form-data`` with one or many files. The answer is
  ``{"model", "weights_sha256", "results": [{"filename", "score", "error", "width", "height"}]}``,
  one result per file, in order.
* ``GET /models``: the model being served. ``GET /healthz``: liveness, with batching counters.
* ``GET /openapi.json`` and ``GET /docs``: the schema, from FastAPI.

Status codes. A request-level problem answers with ``{"detail": "..."}``:

* 413: body larger than ``max_bytes`` (from ``Content-Length``, and counted while reading, so a
  chunked body cannot slip past), or more than ``max_files`` files;
* 415: a content type that is neither an image type, ``application/octet-stream`` nor
  ``multipart/form-data``;
* 400: empty body, malformed multipart body, or no file in it.

Each file is then judged on its own: 415 when its content is not an image at all (no decoder
recognises it) or its part declares a non-image type, 413 when it has more pixels than
``max_pixels`` (read from the header, before decoding), 400 when it is an image but truncated or
corrupt, or smaller than the model's minimum side. The response is 200 when at least one file was
scored, the failed ones carrying their ``error``; when every file failed it has the first failure's
status, with the same body plus ``detail``. So a single bad image gets its 400/413/415, and a
batch upload never loses the good images' scores to one bad file.

Nothing from a request touches the disk: bodies are read by us in chunks (bounded by
``max_bytes``) and multipart bodies are parsed in memory with python-multipart's streaming parser.
(Starlette's own form parser spools files larger than 1 MB to temporary files.)

Batching: requests are decoded in threads, then queued; a micro-batcher takes what arrives within
``max_wait_ms`` (up to ``batch_size`` images), groups images of equal size, and runs each group's
forward pass in one worker thread, so the event loop stays free for other requests.

FastAPI, uvicorn and python-multipart are the optional 'serve' extra:
``pip install 'qualiclip[serve]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    # At module level because FastAPI resolves the endpoints' (string) annotations here.
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
except ImportError:  # the 'serve' extra is missing: create_app() and run() say so
    FastAPI = Request = JSONResponse = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from qualiclip.model import QualiCLIP

SERVE_INSTALL_HINT = "the HTTP service needs the 'serve' extra: pip install 'qualiclip[serve]'"

#: Content types accepted as a raw image body (besides every ``image/*``).
RAW_TYPES: frozenset[str] = frozenset({"application/octet-stream"})


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of the service.

    Args:
        max_bytes: largest request body (bytes); more gives 413.
        max_pixels: largest image (width x height); more gives 413.
        max_files: most files in one multipart request; more gives 413.
        batch_size: most images in one forward pass.
        max_batch_pixels: most pixels in one forward pass (a larger image goes alone).
        max_inflight: most images decoded or being scored at once, over all requests; bounds
            memory (a small PNG can decode to ``max_pixels`` x 3 bytes).
        max_wait_ms: how long the batcher waits for more images after the first.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA).
    """

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 24_000_000
    max_files: int = 64
    batch_size: int = 8
    max_batch_pixels: int = 8 * 1024 * 768
    max_inflight: int = 16
    max_wait_ms: float = 5.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        names = ("max_bytes", "max_pixels", "max_files", "batch_size", "max_batch_pixels",
                 "max_inflight")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


class RequestError(Exception):
    """A request-level failure: answered with ``status`` and ``{"detail": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """One file of a request, held in memory."""

    filename: str | None
    content_type: str | None
    data: bytes


def require_serve() -> None:
    """Raise an ``ImportError`` naming the extra when FastAPI, uvicorn or python-multipart is
    missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        _multipart_module()
    except ImportError as exc:
        raise ImportError(f"{SERVE_INSTALL_HINT} ({exc})") from exc


def _multipart_module() -> Any:
    import importlib

    try:  # python-multipart >= 0.0.13; older releases use the import name "multipart"
        return importlib.import_module("python_multipart.multipart")
    except ImportError:
        return importlib.import_module("multipart.multipart")


# --- micro-batching ----------------------------------------------------------------------------


@dataclass
class _Job:
    pixels: np.ndarray
    future: asyncio.Future[float]


@dataclass
class BatchStats:
    """Counters of the batcher (shown by ``/healthz``)."""

    images: int = 0
    forwards: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


class MicroBatcher:
    """Collects images for up to ``max_wait_s`` (or ``batch_size`` images) and scores them together.

    Images of equal size and dtype share one forward pass; forward passes run one at a time in a
    dedicated thread (torch parallelises inside each), so the event loop never blocks on them.
    """

    def __init__(
        self, model: QualiCLIP, *, batch_size: int, max_wait_s: float, precision: str,
        max_batch_pixels: int = 8 * 1024 * 768,
    ) -> None:
        self.model, self.precision = model, precision
        self.max_batch_pixels = max_batch_pixels
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qualiclip-forward")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=True)

    async def score(self, pixels: np.ndarray) -> float:
        """The score of one decoded ``H x W x 3`` uint8/uint16 image."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(pixels, future))
        return await future

    async def _collect(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(jobs) < self.batch_size:
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), timeout))
            except asyncio.TimeoutError:
                break
        return jobs

    async def _serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            jobs = [job for job in jobs if not job.future.done()]  # skip abandoned requests
            if not jobs:
                continue
            outcomes = await loop.run_in_executor(self._thread, self._forward, jobs)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _forward(self, jobs: list[_Job]) -> list[float | BaseException]:
        """Score ``jobs`` grouped by size (runs in the forward thread)."""
        from qualiclip.engine import score_tensors
        from qualiclip.images import to_batch

        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(*job.pixels.shape, job.pixels.dtype.str)].append(i)
        outcomes: list[float | BaseException] = [0.0] * len(jobs)
        chunks: list[list[int]] = []
        for key, members in groups.items():
            cap = max(1, min(self.batch_size, self.max_batch_pixels // (key[0] * key[1])))
            chunks.extend(members[i : i + cap] for i in range(0, len(members), cap))
        for indices in chunks:
            try:
                batch = to_batch(np.stack([jobs[i].pixels for i in indices]))
                scores = score_tensors(self.model, batch, self.precision).tolist()
                for i, s in zip(indices, scores, strict=True):
                    outcomes[i] = float(s)
            except Exception as exc:  # noqa: BLE001 - reported to each request of the group
                for i in indices:
                    outcomes[i] = exc
            self.stats.forwards += 1
            self.stats.images += len(indices)
            self.stats.largest = max(self.stats.largest, len(indices))
            self.stats.sizes[len(indices)] = self.stats.sizes.get(len(indices), 0) + 1
        return outcomes


# --- reading requests --------------------------------------------------------------------------


async def _stream_body(request: Request, max_bytes: int, sink: Callable[[bytes], None]) -> int:
    """Feed the body to ``sink`` chunk by chunk; 413 as soon as it exceeds ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > max_bytes:
            raise RequestError(
                413, f"request body of {int(declared)} bytes is larger than the limit of "
                f"{max_bytes} bytes"
            )
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:  # a chunked body, or one longer than it declared
            raise RequestError(413, f"request body is larger than the limit of {max_bytes} bytes")
        if chunk:
            sink(chunk)
    return total


class _MultipartCollector:
    """python-multipart callbacks that keep file parts in memory (never on disk)."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.uploads: list[Upload] = []
        self._headers: dict[str, str] = {}
        self._field = self._value = b""
        self._data: list[bytes] = []

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._data = {}, []

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += bytes(data[start:end])

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += bytes(data[start:end])

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").lower()
        self._headers[name] = self._value.decode("utf-8", errors="replace")
        self._field = self._value = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(bytes(data[start:end]))

    def _part_end(self) -> None:
        mp = _multipart_module()
        _, options = mp.parse_options_header(self._headers.get("content-disposition", ""))
        raw_name = options.get(b"filename")
        content_type = self._headers.get("content-type")
        if raw_name is None and content_type is None:
            return  # a plain form field, not a file
        if len(self.uploads) >= self.max_files:
            raise RequestError(413, f"more than {self.max_files} files in one request")
        filename = raw_name.decode("utf-8", errors="replace") if raw_name is not None else None
        self.uploads.append(Upload(filename, content_type, b"".join(self._data)))
        self._data = []


async def read_uploads(request: Request, config: ServeConfig) -> list[Upload]:
    """The files of a ``POST /score`` request (raw body or multipart), read within the limits.

    Raises:
        RequestError: 413 (too large, too many files), 415 (content type), 400 (malformed).
    """
    mp = _multipart_module()
    media, params = mp.parse_options_header(request.headers.get("content-type", ""))
    media = media.decode("latin-1").lower()
    if media == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise RequestError(400, "multipart/form-data without a boundary")
        collector = _MultipartCollector(config.max_files)
        parser = mp.MultipartParser(boundary, collector.callbacks())
        try:
            await _stream_body(request, config.max_bytes, parser.write)
            parser.finalize()
        except RequestError:
            raise
        except Exception as exc:  # python-multipart's parse errors
            raise RequestError(400, f"malformed multipart body: {exc}") from exc
        if not collector.uploads:
            raise RequestError(400, "no file in the multipart body (send files with a filename)")
        return collector.uploads
    if media.startswith("image/") or media in RAW_TYPES:
        chunks: list[bytes] = []
        await _stream_body(request, config.max_bytes, chunks.append)
        if not chunks:
            raise RequestError(400, "empty request body: send the image bytes")
        return [Upload(request.query_params.get("filename"), media, b"".join(chunks))]
    raise RequestError(
        415, f"unsupported content type {media or '(none)'!r}: send the image bytes with an "
        "image/* (or application/octet-stream) content type, or multipart/form-data files"
    )


# --- scoring one upload ------------------------------------------------------------------------


def decode_status(exc: Exception) -> int:
    """HTTP status for an image that failed to decode: 415 not an image, 413 too many pixels,
    400 truncated, corrupt or too small."""
    from PIL import Image, UnidentifiedImageError

    cause = exc.__cause__
    if isinstance(cause, UnidentifiedImageError):
        return 415
    if isinstance(cause, Image.DecompressionBombError) or ": too large" in str(exc):
        return 413
    return 400


async def score_upload(
    upload: Upload, model: QualiCLIP, batcher: MicroBatcher, config: ServeConfig,
    gate: asyncio.Semaphore,
) -> tuple[dict[str, Any], int]:
    """``(result row, status)`` for one file; every failure becomes the row's ``error``.

    Decoding and scoring happen under ``gate``, which bounds the decoded images held at once.
    """
    from qualiclip.images import ImageDecodeError, decode_rgb

    row: dict[str, Any] = {
        "filename": upload.filename, "score": None, "error": None, "width": None, "height": None
    }
    ctype = (upload.content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype in RAW_TYPES):
        row["error"] = f"content type {ctype!r} is not an image type"
        return row, 415
    if not upload.data:
        row["error"] = "empty file"
        return row, 400
    source: Any = upload.data
    if upload.filename:
        source = io.BytesIO(upload.data)
        source.name = upload.filename  # error messages name the file (still read from memory)
    async with gate:
        try:
            pixels = await asyncio.to_thread(
                decode_rgb, source, max_pixels=config.max_pixels, min_size=model.min_size
            )
        except ImageDecodeError as exc:
            row["error"] = str(exc)
            return row, decode_status(exc)
        row["height"], row["width"] = int(pixels.shape[0]), int(pixels.shape[1])
        try:
            row["score"] = await batcher.score(pixels)
        except Exception as exc:  # noqa: BLE001 - a failed forward is this file's error
            row["error"] = f"{type(exc).__name__}: {exc}"
            return row, 500
    return row, 200


# --- the app -----------------------------------------------------------------------------------


def _response_models() -> tuple[type, type]:
    """Pydantic models of the ``/score`` response, for the OpenAPI schema (imported lazily)."""
    from pydantic import BaseModel, Field

    class ScoreRow(BaseModel):
        filename: str | None = Field(None, description="multipart file name, or ?filename=")
        score: float | None = Field(None, description="quality in [0, 1], higher is better")
        error: str | None = Field(None, description="why there is no score")
        width: int | None = None
        height: int | None = None

    class ScoreResponse(BaseModel):
        model: str
        weights_sha256: str | None = None
        results: list[ScoreRow]
        detail: str | None = Field(None, description="the first error, when every file failed")

    return ScoreRow, ScoreResponse


_REQUEST_BODY = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                },
            }
        },
    },
}
_ERROR = {
    "content": {"application/json": {"schema": {
        "type": "object", "properties": {"detail": {"type": "string"}},
    }}}
}


def create_app(
    model: QualiCLIP | Callable[[], QualiCLIP], config: ServeConfig | None = None
) -> FastAPI:
    """The FastAPI application serving ``model``.

    Args:
        model: the scorer, or a function that builds it; either way it is set up once, when the
            app starts (lifespan), and warmed up with one forward pass.
        config: limits and batching (default: :class:`ServeConfig`'s).

    Returns:
        an ASGI app; run it with :func:`run`, ``uvicorn``, or ``starlette.testclient``.
    """
    require_serve()
    from qualiclip import __version__
    from qualiclip.model import QualiCLIP

    cfg = config or ServeConfig()
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scorer = model if isinstance(model, QualiCLIP) else await asyncio.to_thread(model)
        scorer.eval()
        await asyncio.to_thread(_warm_up, scorer, cfg.precision)
        batcher = MicroBatcher(
            scorer, batch_size=cfg.batch_size, max_wait_s=cfg.max_wait_ms / 1000,
            precision=cfg.precision, max_batch_pixels=cfg.max_batch_pixels,
        )
        batcher.start()
        state.update(model=scorer, batcher=batcher, gate=asyncio.Semaphore(cfg.max_inflight))
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(
        title="qualiclip",
        version=__version__,
        description="No-reference image quality scores with QualiCLIP (higher is better).",
        lifespan=lifespan,
    )
    _, score_response = _response_models()

    @app.post(
        "/score",
        response_model=score_response,
        openapi_extra={"requestBody": _REQUEST_BODY},
        responses={400: _ERROR, 413: _ERROR, 415: _ERROR},
        summary="Score one image (raw body) or many (multipart/form-data)",
    )
    async def score(request: Request) -> JSONResponse:
        scorer: QualiCLIP = state["model"]
        try:
            uploads = await read_uploads(request, cfg)
        except RequestError as exc:
            # The body may be partly unread: the connection cannot be reused.
            return JSONResponse({"detail": exc.message}, exc.status,
                                headers={"Connection": "close"})
        outcomes = await asyncio.gather(
            *(score_upload(u, scorer, state["batcher"], cfg, state["gate"]) for u in uploads)
        )
        body: dict[str, Any] = {
            "model": scorer.name, "weights_sha256": scorer.weights_sha256,
            "results": [row for row, _ in outcomes],
        }
        statuses = [status for _, status in outcomes]
        if 200 in statuses:
            return JSONResponse(body)
        body["detail"] = outcomes[0][0]["error"]
        return JSONResponse(body, statuses[0])

    @app.get("/models", summary="The model being served")
    async def models() -> dict[str, Any]:
        scorer: QualiCLIP = state["model"]
        return {"models": [{
            "name": scorer.name, "weights_sha256": scorer.weights_sha256,
            "min_size": scorer.min_size, "device": str(scorer.device),
            "precision": cfg.precision,
        }]}

    @app.get("/healthz", summary="Liveness and batching counters")
    async def healthz() -> dict[str, Any]:
        stats: BatchStats = state["batcher"].stats
        return {"status": "ok", "model": state["model"].name, "images": stats.images,
                "forwards": stats.forwards, "largest_batch": stats.largest}

    return app


def _warm_up(model: QualiCLIP, precision: str) -> None:
    """One forward pass, so the first request does not pay for building the inference copy."""
    import torch

    from qualiclip.engine import score_tensors

    side = max(model.min_size, 64)
    score_tensors(model, torch.rand(1, 3, side, side), precision)


def run(
    model: QualiCLIP | Callable[[], QualiCLIP],
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Serve ``model`` with uvicorn until interrupted (Ctrl-C or SIGTERM shut down cleanly)."""
    require_serve()
    import uvicorn

    uvicorn.run(
        create_app(model, config), host=host, port=port, log_level=log_level,
        access_log=access_log,
    )
