"""Reading a scoring request's files: a raw image body, or multipart/form-data, within limits.

Bodies are streamed through python-multipart's parser into memory (nothing is written to disk)
and refused as soon as they pass ``max_bytes`` or ``max_files``. File names follow RFC 7578
(raw UTF-8 in ``filename``) and RFC 5987/2231 (``filename*=UTF-8''...``, which wins).
"""

from __future__ import annotations

import email.message
import email.utils
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.requests import Request

#: Content types accepted as a raw image body (besides every ``image/*``).
RAW_TYPES: frozenset[str] = frozenset({"application/octet-stream"})


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




def _multipart_module() -> Any:
    import importlib

    try:  # python-multipart >= 0.0.13; older releases use the import name "multipart"
        return importlib.import_module("python_multipart.multipart")
    except ImportError:
        return importlib.import_module("multipart.multipart")




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


def part_filename(disposition: bytes) -> str | None:
    """The file name of a multipart part's raw ``Content-Disposition`` header, or ``None``.

    RFC 7578 sends names as raw UTF-8 in ``filename="..."``; RFC 5987/2231's
    ``filename*=charset'lang'percent-encoded`` form, when present, wins (RFC 6266, 4.3). A plain
    name that is not valid UTF-8 is read as Latin-1 (never refused, never with replacement
    characters). The parameter syntax (quoting, escapes, continuations) is the standard
    library's ``email`` parser's.
    """
    msg = email.message.Message()
    msg["content-disposition"] = disposition.decode("latin-1")  # lossless: bytes as code points
    plain: str | None = None
    for key, value in (msg.get_params(header="content-disposition") or [])[1:]:
        if key.lower() != "filename":
            continue
        if isinstance(value, tuple):
            return email.utils.collapse_rfc2231_value(value, errors="replace",
                                                      fallback_charset="utf-8")
        if plain is None:
            plain = value
    if plain is None:
        return None
    raw = plain.encode("latin-1", errors="replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return plain


class _MultipartCollector:
    """python-multipart callbacks that keep file parts in memory (never on disk)."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.uploads: list[Upload] = []
        self.complete = False  # the closing boundary was seen
        self._headers: dict[str, bytes] = {}
        self._field = self._value = b""
        self._data: list[bytes] = []

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers, self._data = {}, []

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += bytes(data[start:end])

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += bytes(data[start:end])

    def _header_end(self) -> None:
        # Values stay bytes: file names are decoded by part_filename, which knows their rules.
        self._headers[self._field.decode("latin-1").lower()] = self._value
        self._field = self._value = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(bytes(data[start:end]))

    def _part_end(self) -> None:
        disposition = self._headers.get("content-disposition", b"")
        filename = part_filename(disposition) if disposition else None
        raw_type = self._headers.get("content-type")
        content_type = raw_type.decode("latin-1").strip() if raw_type is not None else None
        if filename is None and content_type is None:
            return  # a plain form field, not a file
        if len(self.uploads) >= self.max_files:
            raise RequestError(413, f"more than {self.max_files} files in one request")
        self.uploads.append(Upload(filename, content_type, b"".join(self._data)))
        self._data = []

    def _end(self) -> None:
        self.complete = True


async def read_uploads(request: Request, *, max_bytes: int, max_files: int) -> list[Upload]:
    """The files of a ``POST /score`` request (raw body or multipart), read within the limits.

    Raises:
        RequestError: 413 (too large, too many files), 415 (content type), 400 (malformed).
        starlette.requests.ClientDisconnect: the client went away before the body was read.
    """
    from starlette.requests import ClientDisconnect

    mp = _multipart_module()
    media, params = mp.parse_options_header(request.headers.get("content-type", ""))
    media = media.decode("latin-1").lower()
    if media == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise RequestError(400, "multipart/form-data without a boundary")
        collector = _MultipartCollector(max_files)
        parser = mp.MultipartParser(boundary, collector.callbacks())
        try:
            await _stream_body(request, max_bytes, parser.write)
            parser.finalize()
        except (RequestError, ClientDisconnect):
            raise
        except Exception as exc:  # python-multipart's parse errors
            raise RequestError(400, f"malformed multipart body: {exc}") from exc
        if not collector.complete:
            raise RequestError(
                400, "malformed multipart body: it ends before its closing boundary "
                f"('--{boundary.decode('latin-1')}--'); was the upload cut short?"
            )
        if not collector.uploads:
            raise RequestError(400, "no file in the multipart body (send files with a filename)")
        return collector.uploads
    if media.startswith("image/") or media in RAW_TYPES:
        chunks: list[bytes] = []
        await _stream_body(request, max_bytes, chunks.append)
        if not chunks:
            raise RequestError(400, "empty request body: send the image bytes")
        return [Upload(request.query_params.get("filename"), media, b"".join(chunks))]
    raise RequestError(
        415, f"unsupported content type {media or '(none)'!r}: send the image bytes with an "
        "image/* (or application/octet-stream) content type, or multipart/form-data files"
    )
