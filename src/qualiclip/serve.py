"""An HTTP scoring service: FastAPI app factory, fair micro-batching, and a uvicorn runner.

Endpoints:

* ``POST /score``: the image bytes as the body (``Content-Type: image/*`` or
  ``application/octet-stream``), or ``multipart/form-data`` with one or many files. The answer is
  ``{"model", "weights_sha256", "precision", "results": [{"filename", "score", "error", "width",
  "height"}]}``, one result per file, in order (``precision``: the one the scores were computed
  in, ``auto`` resolved). File names may be any Unicode: raw UTF-8 in ``filename="..."``
  (RFC 7578) or the ``filename*=UTF-8''...`` form (RFC 5987/6266, preferred when both are sent).
* ``POST /map?kind=dense|windows``: as ``/score``, each result also carrying its quality map
  (``map``: values and grid, see :class:`qualiclip.maps.QualityMap`) and the map drawn over the
  image (``overlay``: a PNG data URL); same limits, errors and status codes. Without ``kind``,
  the model's preferred kind (:func:`qualiclip.maps.map_kinds`: dense where the model has a
  feature map, else windows). A kind the model cannot draw still gives each score, with
  ``map: null`` and ``map_error`` saying why. Overlays that would take the response past
  ``max_response_bytes`` are left out (``overlay: null``, ``overlay_error`` saying so).
* ``GET /``: a web page that scores dropped or picked images with these endpoints and draws their
  maps (plain HTML/CSS/JS from the package, nothing fetched from elsewhere).
* ``GET /models``: the model being served. ``GET /limits``: the upload limits and map kinds.
  ``GET /healthz``: liveness, with batching counters and what waits in each lane.
* ``GET /openapi.json`` and ``GET /docs``: the schema, from FastAPI; the Swagger UI page's
  scripts are served from the package fastapi-offline, so it works without the internet.

Status codes. A request-level problem answers with ``{"detail": "..."}``:

* 413: body larger than ``max_bytes`` (from ``Content-Length``, and counted while reading, so a
  chunked body cannot slip past), or more than ``max_files`` files;
* 415: a content type that is neither an image type, ``application/octet-stream`` nor
  ``multipart/form-data``;
* 400: empty body, malformed multipart body, one that ends before its closing boundary, or no
  file in it; a ``Host`` header that is not one of ``allowed_hosts``.

Each file is then judged on its own: 415 when its content is not an image at all (no decoder
recognises it) or its part declares a non-image type, 413 when it has more pixels than
``max_pixels`` (read from the header, before decoding), 400 when it is an image but truncated or
corrupt (whatever the decoder raises for it), or smaller than the model's minimum side. The
response is 200 when at least one file was scored, the failed ones carrying their ``error``; when
every file failed it has the first failure's status, with the same body plus ``detail``. So a
single bad image gets its 400/413/415, and a batch upload never loses the good images' scores to
one bad file.

Nothing from a request touches the disk: bodies are read by us in chunks (bounded by
``max_bytes``) and multipart bodies are parsed in memory with python-multipart's streaming parser.
(Starlette's own form parser spools files larger than 1 MB to temporary files.)

Fairness and memory. A small PNG can decode to ``max_pixels`` x 3 bytes, so what is bounded is
decoded pixels. Scoring has two lanes, each a single thread, which take work from the waiting
requests in turn (round-robin), not first come first served:

* the batch lane: images small enough to share a forward pass (at most half of
  ``max_batch_pixels``) are gathered for up to ``max_wait_ms`` (up to ``batch_size`` images and
  ``max_batch_pixels`` pixels) and images of equal size share one forward pass;
* the large lane: larger images, one per forward pass, never batched with others.

Quality maps take their turns in the same lanes (a map runs alone, in the lane of its image's
size). An image is decoded only once its pixel count (read from its header) fits its request's
budget (``max_request_pixels_in_flight``, default ``max_pixels``: a request holds one maximal
image at a time) and then its lane's: a slot (``max_inflight`` images per lane) and the lane's
pixels (``max_pixels_in_flight`` for the large lane, default twice ``max_pixels``;
``max_batch_pixels_in_flight`` for the batch lane, default twice ``max_batch_pixels``), held until
it is scored. So a request of small images is answered while requests of huge ones are in
progress, instead of queueing behind them at a budget or for a forward pass (on a CPU the two
lanes share its cores).

Clients that go away. A client that hangs up after sending its request has its work dropped:
files not yet decoded never are, queued images leave their lane, and a map stops at its next
forward pass (:class:`qualiclip.batcher.MicroBatcher`); one INFO line says so.

Slow clients: :func:`run` closes a connection whose request (headers and body) has not arrived in
full within ``request_timeout`` seconds of its first byte (or of the connection, when nothing
comes), and one whose response is not read within ``send_timeout`` seconds once the socket's
buffers are full (the response is dropped with it); a client that hangs up mid-body is logged as
one INFO line.

Hosts and headers. Requests must name an allowed host in ``Host`` (``allowed_hosts``; by default
the localhost names when listening on loopback), so that a web page elsewhere cannot reach a
local service through DNS rebinding. Every response carries ``X-Content-Type-Options: nosniff``
and ``X-Frame-Options: DENY``; the web page also a Content-Security-Policy allowing only this
server. No response names a path of the server's machine: a model loaded from a file is called
by the file's name.

FastAPI, uvicorn and python-multipart are the optional 'serve' extra:
``pip install 'qualiclip[serve]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import ipaddress
import json
import logging
import re
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

try:
    # At module level because FastAPI resolves the endpoints' (string) annotations here.
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
except ImportError:  # the 'serve' extra is missing: create_app() and run() say so
    FastAPI = Request = JSONResponse = HTMLResponse = Response = None  # type: ignore[assignment,misc]

from qualiclip.batcher import Admission, BatchStats, MicroBatcher, PixelBudget
from qualiclip.engine import DEFAULT_MAX_BATCH_PIXELS
from qualiclip.precision import PRECISION_CHOICES
from qualiclip.uploads import RAW_TYPES, RequestError, Upload, _multipart_module, read_uploads

if TYPE_CHECKING:
    import uvicorn

    from qualiclip.images import DecodeFailure
    from qualiclip.model import Scorer

T = TypeVar("T")

SERVE_INSTALL_HINT = "the HTTP service needs the 'serve' extra: pip install 'qualiclip[serve]'"


# uvicorn's own logger for server events: its handler and format are set up by uvicorn.run.
_log = logging.getLogger("uvicorn.error")


#: What an allowed host may be: ``*``, a name or ``*.`` and a name, an IPv4 or IPv6 address.
_HOST_PATTERN = re.compile(r"\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|[0-9a-f:.]*:[0-9a-f:.]*")

#: Host names a service listening on loopback answers to by default (``Host`` header).
LOCAL_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of the service.

    Args:
        max_bytes: largest request body (bytes); more gives 413.
        max_pixels: largest image (width x height); more gives 413.
        max_files: most files in one multipart request; more gives 413.
        batch_size: most images in one forward pass.
        max_batch_pixels: most pixels in one forward pass; an image over half of it is never
            batched (it runs alone, in the large-image lane).
        max_inflight: most images decoded or being scored at once in each lane, over all
            requests.
        max_wait_ms: how long the batcher waits for more images after the first.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA), ``"int8"`` (CPU) or ``"auto"``
            (resolved at start-up; responses name the precision used).
        max_pixels_in_flight: most decoded pixels of large images (the large lane) held at once
            over all requests; ``None``: twice ``max_pixels``. At least ``max_pixels``.
        max_request_pixels_in_flight: most decoded pixels held at once by one request;
            ``None``: ``max_pixels`` (one maximal image at a time). At least ``max_pixels``.
        max_batch_pixels_in_flight: most decoded pixels of batched images (the batch lane) held
            at once over all requests; ``None``: twice ``max_batch_pixels`` (a pass being
            scored, the next one gathering). At least the largest batched image.
        max_response_bytes: most bytes the maps and overlays of one ``/map`` response take;
            overlays past it are left out (the scores and maps stay).
        allowed_hosts: host names requests may carry in ``Host`` (``"*"``: any;
            ``"*.example.org"``: its subdomains); ``None``: :data:`LOCAL_HOSTS`, or for
            :func:`run`, those when it listens on loopback and any host otherwise.
    """

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 24_000_000
    max_files: int = 64
    batch_size: int = 8
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS
    max_inflight: int = 16
    max_wait_ms: float = 5.0
    precision: str = "fp32"
    max_pixels_in_flight: int | None = None
    max_request_pixels_in_flight: int | None = None
    max_batch_pixels_in_flight: int | None = None
    max_response_bytes: int = 16 * 1024 * 1024
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        names = ("max_bytes", "max_pixels", "max_files", "batch_size", "max_batch_pixels",
                 "max_inflight", "max_response_bytes")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(
                f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
        for name in ("max_pixels_in_flight", "max_request_pixels_in_flight"):
            value = getattr(self, name)
            if value is not None and value < self.max_pixels:
                raise ValueError(
                    f"{name} ({value}) must be at least max_pixels ({self.max_pixels}): "
                    "one image of the largest allowed size must fit"
                )
        largest_batched = min(self.max_pixels, self.max_batch_pixels // 2)
        value = self.max_batch_pixels_in_flight
        if value is not None and value < largest_batched:
            raise ValueError(
                f"max_batch_pixels_in_flight ({value}) must be at least {largest_batched}: "
                "the largest image that is batched must fit"
            )
        if self.allowed_hosts is not None:
            if isinstance(self.allowed_hosts, str) or not all(self.allowed_hosts):
                raise ValueError(f"allowed_hosts must be a tuple of host names, got "
                                 f"{self.allowed_hosts!r}")
            hosts = tuple(h.strip().lower().strip("[]") for h in self.allowed_hosts)
            for h in hosts:
                # A name, a wildcard, or an IP address; a port or a URL would never match.
                if not _HOST_PATTERN.fullmatch(h):
                    raise ValueError(f"allowed host {h!r} is not a host name (no scheme, port or "
                                     "path: e.g. 'scores.example.org', '*.example.org', '::1')")
            object.__setattr__(self, "allowed_hosts", hosts)

    @property
    def pixels_in_flight(self) -> int:
        """The large lane's budget of decoded pixels (resolved default)."""
        return self.max_pixels_in_flight or 2 * self.max_pixels

    @property
    def batch_pixels_in_flight(self) -> int:
        """The batch lane's budget of decoded pixels (resolved default)."""
        return self.max_batch_pixels_in_flight or 2 * self.max_batch_pixels

    @property
    def request_pixels_in_flight(self) -> int:
        """One request's budget of decoded pixels (resolved default)."""
        return self.max_request_pixels_in_flight or self.max_pixels


def allowed_hosts_for(bind: str, given: Sequence[str] | None) -> tuple[str, ...]:
    """The ``Host`` names a service listening on ``bind`` answers to: ``given`` when there is
    a list, else :data:`LOCAL_HOSTS` on a loopback address (what a DNS-rebinding page would
    reach) and any host elsewhere (its names are not known here: list them to restrict it)."""
    if given:
        return tuple(given)
    name = bind.strip("[]").lower()
    if name == "localhost":
        return LOCAL_HOSTS
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: only "localhost" is known to be loopback
        loopback = False
    return LOCAL_HOSTS if loopback else ("*",)


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``) names one of
    ``allowed`` (``"*"`` matches any, ``"*.example.org"`` the subdomains of example.org)."""
    if "*" in allowed:
        return True
    value = host.strip().lower()
    if value.startswith("["):
        name, closed, rest = value[1:].partition("]")
        if not closed or rest[:1] not in ("", ":"):
            return False
        port = rest[1:]
    elif value.count(":") == 1:
        name, port = value.split(":", 1)
    else:
        name, port = value, ""
    if not name or not (port == "" or port.isdigit()):  # "localhost:80@evil" is no host:port
        return False
    return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


def public_name(name: str) -> str:
    """What responses call a model: a file's name without its folder (no response shows a path
    of the server's machine); a named model as it is."""
    return re.split(r"[\\/]", name)[-1]


# An absolute path of two components or more, not inside a URL (``https://host/a/b``).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:/[^\s/'\"]+)+/(?P<name>[^\s/'\"]+)")


def without_paths(text: str) -> str:
    """``text`` with each absolute path replaced by its last component (for error messages that
    come from libraries, which may name files of the server's machine)."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group("name"), text)


def require_serve() -> None:
    """Raise an ``ImportError`` naming the extra when FastAPI, uvicorn, python-multipart or
    fastapi-offline (the /docs page's scripts) is missing."""
    try:
        import fastapi  # noqa: F401
        import fastapi_offline  # noqa: F401
        import uvicorn  # noqa: F401

        _multipart_module()
    except ImportError as exc:
        raise ImportError(f"{SERVE_INSTALL_HINT} ({exc})") from exc


# --- scoring one upload ------------------------------------------------------------------------


def decode_status(reason: DecodeFailure) -> int:
    """HTTP status for an image that failed to decode: 415 not an image, 413 too many pixels
    (or too large to decode in memory), 400 unreadable, malformed or too small."""
    if reason == "not_an_image":
        return 415
    if reason in ("too_large", "out_of_memory"):
        return 413
    return 400


def header_pixels(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from an encoded image's header (nothing decoded), or ``None`` when
    the header cannot be read (decoding will then say why)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                return int(width), int(height)
    except Exception:  # noqa: BLE001 - any failure is reported by the decoder itself
        return None


@dataclass
class _Budgets:
    """What one file's decoding waits for: its request's pixels, then its lane's slot and pixels
    (so a request waiting for its own budget holds nothing shared, and an image never waits for
    pixels held by the other lane's images)."""

    request: PixelBudget
    batch: Admission
    large: Admission
    is_large: Callable[[int], bool]

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        lane = self.large if self.is_large(pixels) else self.batch
        async with self.request.hold(pixels), lane.hold(pixels):
            yield


async def _in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a thread. When cancelled meanwhile, this returns (re-raising the
    cancel) only once the thread is done, so a budget held around it is released when the
    pixels it allocated are really gone, not while the thread still fills them."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # its outcome is nobody's now: retrieved, so never reported
        raise


Mapper = Callable[[Any, object], Awaitable[dict[str, Any]]]


async def score_upload(
    upload: Upload, model: Scorer, batcher: MicroBatcher, config: ServeConfig,
    budgets: _Budgets, owner: object = None, mapper: Mapper | None = None,
) -> tuple[dict[str, Any], int]:
    """``(result row, status)`` for one file; every failure becomes the row's ``error``.

    With ``mapper`` the decoded pixels go to it instead of the batcher, and the row is updated
    with what it returns (the score and the quality map).

    Decoding and scoring happen while ``budgets`` hold the image's pixels (from its header);
    whatever the decoder raises for this file is this file's 400/413/415. Cancelled (the client
    hung up), it returns only once nothing holds the file's pixels any more.
    """
    from qualiclip.images import as_decode_error, decode_rgb

    row: dict[str, Any] = {
        "filename": upload.filename, "score": None, "error": None, "width": None, "height": None
    }
    name = upload.filename or f"<{len(upload.data)} bytes>"
    ctype = (upload.content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype in RAW_TYPES):
        row["error"] = f"content type {ctype!r} is not an image type"
        return row, 415
    if not upload.data:
        row["error"] = "empty file"
        return row, 400
    size = await asyncio.to_thread(header_pixels, upload.data)
    if size is not None and size[0] * size[1] > config.max_pixels:
        width, height = size
        row["error"] = (
            f"{name}: too large: {width}x{height} = {width * height} pixels, more than the "
            f"limit of {config.max_pixels} pixels (the server's --max-pixels)"
        )
        return row, 413
    # An unreadable header is budgeted as the largest image allowed (the decoder will refuse it).
    needed = size[0] * size[1] if size is not None else config.max_pixels
    source: Any = upload.data
    if upload.filename:
        source = io.BytesIO(upload.data)
        source.name = upload.filename  # error messages name the file (still read from memory)
    async with budgets.hold(needed):
        try:
            pixels = await _in_thread(
                decode_rgb, source, max_pixels=config.max_pixels, min_size=model.min_size
            )
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises is this file's
            failure = as_decode_error(name, exc)
            row["error"] = str(failure)
            if failure.reason == "too_large":  # name the server's option
                row["error"] = (f"{name}: too large (limit: {config.max_pixels} pixels, the "
                                "server's --max-pixels)")
            return row, decode_status(failure.reason)
        row["height"], row["width"] = int(pixels.shape[0]), int(pixels.shape[1])
        try:
            if mapper is not None:
                row.update(await mapper(pixels, owner))
            else:
                row["score"] = await batcher.score(pixels, owner)
        except Exception as exc:  # noqa: BLE001 - a failed forward is this file's error
            row["error"] = without_paths(f"{type(exc).__name__}: {exc}")
            return row, 500
        finally:
            del pixels  # before the budget is released
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
        precision: str = Field(description="the precision the scores were computed in")
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


@dataclass
class _Running:
    """What a started service holds: the scorer, what it is called and runs in, the batcher,
    the two lanes' admissions, and how many files it dropped for clients that hung up."""

    model: Scorer
    name: str
    precision: str
    batcher: MicroBatcher
    batch: Admission
    large: Admission
    dropped: int = 0

    def lanes(self) -> dict[str, Admission]:
        """The lanes by name, as ``/healthz`` reports them."""
        return {"batch": self.batch, "large": self.large}


class _Service:
    """The state of one application: empty until its lifespan starts it (the model loaded and
    warmed up), then :attr:`running`."""

    def __init__(self) -> None:
        self._running: _Running | None = None

    def start(self, running: _Running) -> None:
        self._running = running

    @property
    def running(self) -> _Running:
        if self._running is None:  # a request before start-up (an app run without its lifespan)
            raise RuntimeError("the service has not started: run the app with its lifespan")
        return self._running


def create_app(
    model: Scorer | Callable[[], Scorer], config: ServeConfig | None = None
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
    from torch import nn

    from qualiclip import __version__

    cfg = config or ServeConfig()
    service = _Service()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A module is the scorer (QualiCLIP, or an ONNX graph's); anything else builds one.
        # (Both are callable, so only the runtime check tells them apart.)
        if isinstance(model, nn.Module):
            scorer = cast("Scorer", model.eval())
        else:
            scorer = await asyncio.to_thread(cast("Callable[[], Scorer]", model))
            if isinstance(scorer, nn.Module):
                scorer.eval()
        precision = await asyncio.to_thread(_warm_up, scorer, cfg.precision)
        batcher = MicroBatcher(
            scorer, batch_size=cfg.batch_size, max_wait_s=cfg.max_wait_ms / 1000,
            precision=cfg.precision, max_batch_pixels=cfg.max_batch_pixels,
        )
        batcher.start()
        service.start(_Running(
            model=scorer, name=public_name(scorer.name), precision=precision, batcher=batcher,
            batch=Admission(cfg.max_inflight, cfg.batch_pixels_in_flight),
            large=Admission(cfg.max_inflight, cfg.pixels_in_flight),
        ))
        _log.info("answering requests for the hosts %s (Host header; --allowed-host)",
                  ", ".join(cfg.allowed_hosts or LOCAL_HOSTS))
        try:
            yield
        finally:
            await batcher.close()

    # FastAPI's own /docs loads Swagger UI from a CDN (a blank page offline); fastapi-offline
    # serves the same page with the scripts it ships, from /docs-assets.
    from fastapi_offline import FastAPIOffline

    app: FastAPI = FastAPIOffline(
        title="qualiclip",
        version=__version__,
        description="No-reference image quality scores with QualiCLIP (higher is better).",
        lifespan=lifespan,
        redoc_url=None,
        static_url="/docs-assets",
    )
    app.add_middleware(_Guard, allowed_hosts=cfg.allowed_hosts or LOCAL_HOSTS)
    _, score_response = _response_models()

    @app.post(
        "/score",
        response_model=score_response,
        openapi_extra={"requestBody": _REQUEST_BODY},
        responses={400: _ERROR, 413: _ERROR, 415: _ERROR},
        summary="Score one image (raw body) or many (multipart/form-data)",
    )
    async def score(request: Request) -> Response:
        return await _answer(request, service.running, cfg, None)

    @app.post(
        "/map",
        openapi_extra={"requestBody": _REQUEST_BODY},
        responses={400: _ERROR, 413: _ERROR, 415: _ERROR},
        summary="Score images and draw their quality maps (kind: dense or windows; default: "
                "the model's preferred kind)",
    )
    async def quality_map(request: Request, kind: str | None = None) -> Response:
        from qualiclip.maps import MAP_KINDS, map_kinds

        if kind is not None and kind not in MAP_KINDS:
            return JSONResponse({"detail": f"kind must be one of {', '.join(MAP_KINDS)}, "
                                           f"got {kind!r}"}, 400)
        running = service.running
        kind = kind or map_kinds(running.model)[0]
        return await _answer(request, running, cfg, _Mapper(running, cfg, kind))

    @app.get("/models", summary="The model being served")
    async def models() -> dict[str, Any]:
        running = service.running
        scorer = running.model
        return {"models": [{
            "name": running.name, "weights_sha256": scorer.weights_sha256,
            "min_size": scorer.min_size, "device": str(scorer.device),
            "precision": running.precision,
        }]}

    @app.get("/limits", summary="What the service accepts")
    async def limits() -> dict[str, Any]:
        from qualiclip.maps import map_kinds

        return {"max_bytes": cfg.max_bytes, "max_pixels": cfg.max_pixels,
                "max_files": cfg.max_files, "min_size": service.running.model.min_size,
                "map_kinds": list(map_kinds(service.running.model))}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> Response:
        return Response(_web_asset("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/web/{name}", include_in_schema=False)
    async def web_asset(name: str) -> Response:
        media = _WEB_FILES.get(name)
        if media is None:
            return JSONResponse({"detail": "not found"}, 404)
        return Response(_web_asset(name), media_type=media)

    @app.get("/healthz", summary="Liveness, batching counters, what waits in each lane, files "
             "dropped for clients that hung up")
    async def healthz() -> dict[str, Any]:
        running = service.running
        stats: BatchStats = running.batcher.stats
        lanes = {name: {"waiting": lane.waiting, "pixels_held": lane.pixels_held,
                        "pixels_budget": lane.pixels.capacity}
                 for name, lane in running.lanes().items()}
        return {"status": "ok", "model": running.name, "images": stats.images,
                "forwards": stats.forwards, "largest_batch": stats.largest, "maps": stats.calls,
                "dropped": running.dropped, "lanes": lanes}

    return app


async def _answer(
    request: Request, state: _Running, cfg: ServeConfig, mapper: _Mapper | None
) -> Response:
    """Read a request's files, score (or map) each, and answer; drop the work when the client
    hangs up before the answer is ready."""
    from starlette.requests import ClientDisconnect

    scorer = state.model
    client = request.client
    where = f"{client.host}:{client.port}" if client else "a client"
    try:
        uploads = await read_uploads(request, max_bytes=cfg.max_bytes, max_files=cfg.max_files)
    except RequestError as exc:
        # The body may be partly unread: the connection cannot be reused.
        return JSONResponse({"detail": exc.message}, exc.status, headers={"Connection": "close"})
    except ClientDisconnect:
        # An ordinary event on a network service: one line, not an error with a traceback.
        _log.info("%s - POST %s: client disconnected before its request body was complete",
                  where, request.url.path)
        return JSONResponse({"detail": "client disconnected"}, 400)
    budgets = _Budgets(PixelBudget(cfg.request_pixels_in_flight), state.batch, state.large,
                       state.batcher.is_large)
    owner = object()  # this request's turn in the batcher's round-robin
    files = [asyncio.ensure_future(score_upload(u, scorer, state.batcher, cfg, budgets, owner,
                                                mapper)) for u in uploads]
    work = asyncio.gather(*files)
    gone = asyncio.ensure_future(_disconnected(request))
    either: set[asyncio.Future[Any]] = {work, gone}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        hung_up = not work.done()  # (or the server is stopping: this task was cancelled)
        if hung_up:
            dropped = sum(not f.done() for f in files)
            work.cancel()  # cancels each file's task
            # gather's own future ends at the first file cancelled; each file's task ends only
            # once every lane and budget has let go of it, so wait for them all.
            await asyncio.wait(files)
            with contextlib.suppress(asyncio.CancelledError):
                await work  # (its outcome retrieved, so never reported)
            state.dropped += dropped
            _log.info("%s - POST %s: client disconnected; dropped the work of %d of its %d "
                      "file(s)", where, request.url.path, dropped, len(uploads))
    if hung_up:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    outcomes = work.result()
    body: dict[str, Any] = {
        "model": state.name, "weights_sha256": scorer.weights_sha256,
        "precision": state.precision, "results": [row for row, _ in outcomes],
    }
    statuses = [status for _, status in outcomes]
    if 200 in statuses:
        return JSONResponse(body)
    body["detail"] = outcomes[0][0]["error"]
    return JSONResponse(body, statuses[0])


async def _disconnected(request: Request) -> None:
    """Return once the client of ``request`` (whose body has been read) hangs up."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - cannot watch this connection: its work runs to the end
        _log.debug("cannot watch the client for a hang-up", exc_info=True)
        await asyncio.Event().wait()  # (until cancelled, once the work is done)


class _Mapper:
    """The ``/map`` work of one request: each image's map in its lane, overlays within the
    response's byte budget, and the score alone where the model cannot draw the kind asked."""

    def __init__(self, state: _Running, cfg: ServeConfig, kind: str) -> None:
        from qualiclip.maps import NO_DENSE_MAP, map_kinds

        self.state, self.cfg, self.kind = state, cfg, kind
        self.room = cfg.max_response_bytes  # bytes left for this response's maps and overlays
        self.unavailable = None if kind in map_kinds(state.model) else (
            f"{NO_DENSE_MAP}: ask for kind=windows")

    async def __call__(self, pixels: Any, owner: object) -> dict[str, Any]:
        batcher = self.state.batcher
        if self.unavailable is not None:
            score = await batcher.score(pixels, owner)
            return {"score": score, "map": None, "overlay": None, "map_error": self.unavailable}
        model, kind, precision = self.state.model, self.kind, self.state.precision
        draw = self.room > 0  # no overlay is drawn once none can be sent

        def work(check: Callable[[], None]) -> dict[str, Any]:
            return _map_row(model, pixels, kind, precision, check, draw)

        found = await batcher.run(int(pixels.shape[0] * pixels.shape[1]), work, owner)
        if found["score"] is None:  # window maps do not score the whole image
            found["score"] = await batcher.score(pixels, owner)
        self.room -= len(json.dumps(found["map"], separators=(",", ":")))
        overlay = found["overlay"]
        if overlay is not None and len(overlay) <= self.room:
            self.room -= len(overlay)
        else:
            found["overlay"] = None
            found["overlay_error"] = (
                f"overlay left out: the response would pass {self.cfg.max_response_bytes} "
                "bytes (the server's --max-response-bytes); send fewer files per request")
        return found


class _Guard:
    """ASGI middleware: refuses a request whose ``Host`` is not allowed (400) and adds the
    security headers to every response (the Content-Security-Policy to the web page's)."""

    def __init__(self, app: Any, allowed_hosts: tuple[str, ...]) -> None:
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if not host_allowed(host, self.allowed_hosts):
            response = JSONResponse(
                {"detail": f"Host {host!r} is not served here: this server answers for "
                           f"{', '.join(self.allowed_hosts)} (its --allowed-host)"},
                400, headers={"Connection": "close", **_SECURITY_HEADERS})
            await response(scope, receive, send)
            return
        page = scope["path"] == "/" or scope["path"].startswith("/web/")
        extra = [(k.lower().encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]
        if page:
            extra.append((b"content-security-policy", _PAGE_POLICY.encode()))

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                     "Referrer-Policy": "no-referrer"}
#: The web page loads its script, style and pictures from this server only (overlays are data:
#: URLs), talks to this server only, and may not be framed.
_PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                "frame-ancestors 'none'")

#: The web page's files (assets/web in the package) and their media types.
_WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}
#: Longest side of an overlay picture sent by /map.
OVERLAY_SIDE = 768


def _web_asset(name: str) -> bytes:
    from importlib.resources import files

    return files("qualiclip").joinpath("assets", "web", name).read_bytes()


def _map_row(
    model: Scorer, pixels: Any, kind: str, precision: str, check: Callable[[], None], draw: bool
) -> dict[str, Any]:
    """``score`` (``None`` for window maps), ``map`` and ``overlay`` (PNG data URL, or ``None``
    without ``draw``) of one image. ``check`` is called between passes and raises to stop."""
    import base64

    from qualiclip.maps import overlay_png, quality_map

    qmap = quality_map(model, pixels, kind, precision=precision,
                       on_pass=lambda done, total: check())
    found: dict[str, Any] = {"score": qmap.score, "map": qmap.to_dict(), "overlay": None}
    if draw:
        check()
        display = pixels if pixels.dtype.name == "uint8" else (pixels // 257).astype("uint8")
        png = overlay_png(display, qmap, max_side=OVERLAY_SIDE)
        found["overlay"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return found


def _warm_up(model: Scorer, precision: str) -> str:
    """One forward pass, so the first request does not pay for building the inference copy;
    returns the precision it ran in (``auto`` resolved)."""
    import torch

    from qualiclip.engine import prepare, score_tensors

    side = max(model.min_size, 64)
    score_tensors(model, torch.rand(1, 3, side, side), precision)
    return prepare(model, precision).precision


def timed_protocol(request_timeout: float, send_timeout: float = 60.0) -> type:
    """uvicorn's h11 HTTP protocol with deadlines on receiving each request and on sending.

    uvicorn times out idle keep-alive connections, but not a client that trickles its headers or
    body a byte at a time (or stops): each would hold a connection, and a request's buffers, for
    ever. Here a request (headers and body) must arrive within ``request_timeout`` seconds of its
    first byte, or of the connection when nothing comes; else the connection is closed, with one
    INFO line. The scoring time is not limited.

    Nor does uvicorn time out a client that does not read its response: the response stays in
    the connection's buffer (tens of MB for a ``/map`` of many files) as long as the connection
    lives. Here, once the buffers are full (the transport pauses writing), what remains must be
    read within ``send_timeout`` seconds; else the connection is aborted, which frees the
    response, with one INFO line.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    for name, value in (("request_timeout", request_timeout), ("send_timeout", send_timeout)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")

    class TimedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _send_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                # Part of a request is here: its clock runs from now (on a kept-alive
                # connection) or from the connection, whichever started it.
                if self._deadline is None:
                    self._arm()
            else:
                self._disarm()  # received in full (or the connection is over)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._stop_send_clock()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_deadline is None:
                self._send_deadline = self.loop.call_later(send_timeout, self._send_expired)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._stop_send_clock()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _stop_send_clock(self) -> None:
            if self._send_deadline is not None:
                self._send_deadline.cancel()
                self._send_deadline = None

        def _where(self) -> str:
            return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

        def _expire(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            part = "body" if self.conn.their_state is h11.SEND_BODY else "headers"
            _log.info("%s - request %s not received within %g s: connection closed",
                      self._where(), part, request_timeout)
            self.transport.close()

        def _send_expired(self) -> None:
            self._send_deadline = None
            # Even a closing transport keeps its buffer until it is read: abort drops it.
            _log.info("%s - response not read within %g s: connection closed, %d bytes unsent",
                      self._where(), send_timeout, self.transport.get_write_buffer_size())
            self.transport.abort()

    return TimedH11Protocol


def server_config(
    model: Scorer | Callable[[], Scorer],
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    request_timeout: float = 60.0,
    send_timeout: float = 60.0,
    keep_alive_timeout: int = 5,
    **uvicorn_options: Any,
) -> uvicorn.Config:
    """The uvicorn configuration :func:`run` serves: the app, its protocol and its hosts.

    Args:
        model, config: as for :func:`create_app`; ``config.allowed_hosts`` left ``None`` is
            resolved from ``host`` (:func:`allowed_hosts_for`).
        host, port: where to listen.
        request_timeout: seconds for a request (headers and body) to arrive in full; a slower
            client is disconnected (see :func:`timed_protocol`).
        send_timeout: seconds for a client to read the rest of a response once the socket's
            buffers are full; a client that does not is disconnected and its response dropped.
        keep_alive_timeout: seconds an idle kept-alive connection stays open (uvicorn's).
        uvicorn_options: more of ``uvicorn.Config``'s keywords (``log_level``, ``access_log``).
    """
    require_serve()
    import uvicorn

    cfg = config or ServeConfig()
    if cfg.allowed_hosts is None:
        cfg = dataclasses.replace(cfg, allowed_hosts=allowed_hosts_for(host, None))
    return uvicorn.Config(
        create_app(model, cfg), host=host, port=port,
        http=timed_protocol(request_timeout, send_timeout), timeout_keep_alive=keep_alive_timeout,
        **uvicorn_options,
    )


def run(
    model: Scorer | Callable[[], Scorer],
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = True,
    request_timeout: float = 60.0,
    send_timeout: float = 60.0,
    keep_alive_timeout: int = 5,
) -> None:
    """Serve ``model`` with uvicorn until interrupted (Ctrl-C or SIGTERM shut down cleanly).

    Args:
        model, config: as for :func:`create_app` (hosts: see :func:`server_config`).
        host, port: where to listen.
        log_level, access_log: uvicorn's logging.
        request_timeout, send_timeout, keep_alive_timeout: see :func:`server_config`.
    """
    import uvicorn

    server = uvicorn.Server(server_config(
        model, config, host=host, port=port, request_timeout=request_timeout,
        send_timeout=send_timeout, keep_alive_timeout=keep_alive_timeout, log_level=log_level,
        access_log=access_log,
    ))
    server.run()
    if not server.started:  # e.g. the port is taken; uvicorn has logged why (uvicorn.run's code)
        sys.exit(3)
