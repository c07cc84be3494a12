"""Writing output files safely: the one way qualiclip writes a file it produces.

Every output (``score -o``, ``--map`` files, ``eval -o``, ``degrade``, Ray parts, a training
run's checkpoints, history, validation and configuration, the exported model) goes through
:func:`open_output` or :func:`append_line`, which promise:

* **Never through a link.** The content goes to a new temporary file in the target's folder
  (created with ``O_EXCL | O_NOFOLLOW``, a hidden name that no folder scan picks up) and is then
  renamed over the target's name. A symlink sitting at the target's name is replaced, never
  followed, and a hard link's other names keep their content: writing can change what a name
  points at, never the contents of another file. (A target that is a device, FIFO or socket,
  such as ``/dev/null`` or ``/dev/stdout``, is written into as it is: replacing it would break
  it, and it cannot be an input's content.) A replaced file keeps its permission bits.
* **Never over an input.** Given the :class:`InputFiles` of a run, a target that is the same
  file as one of them (same device and inode, whatever the path says: a symlink, a hard link,
  ``..`` or a bind mount) is refused with :class:`SameFileError`, before anything is written
  and again just before the rename.
* **All or nothing.** A reader sees the old file or the complete new one, never half of one: a
  failure removes the temporary file and leaves the target as it was. With
  ``keep_on_interrupt`` (results written row by row), an interrupt that the writer turned into
  a complete file (the JSON array closed, the table aligned) still renames it into place.
* **One line when the disk says no.** A full disk, a read-only file system, a missing folder or
  a permission error is an :class:`OutputError` whose message names the target and the errno
  (``cannot write out.json: No space left on device (ENOSPC)``), whatever library was
  writing (``torch.save``, Pillow, NumPy, Arrow): their own words for a failed write ("unexpected
  pos", a short write) are replaced by the operating system's.

Example:
    >>> from qualiclip.output_files import open_output
    >>> with open_output("scores.csv", "w", encoding="utf-8") as f:  # doctest: +SKIP
    ...     f.write("path,score\\n")
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "InputFiles", "OutputError", "SameFileError", "append_line", "make_folder", "open_output",
]

StrPath = str | os.PathLike[str]

#: Longest file-name stem kept in a temporary name (names are limited to 255 bytes).
_TEMP_STEM = 120


class OutputError(Exception):
    """An output file could not be written (a full disk, a read-only file system, ...).

    Attributes:
        path: the target that was being written.
        errno: the operating system's error number, or None.
    """

    def __init__(self, path: StrPath, exc: OSError) -> None:
        code = exc.errno
        name = errno.errorcode.get(code, "") if code is not None else ""
        reason = exc.strerror or str(exc) or type(exc).__name__
        named = f" ({name})" if name else ""
        super().__init__(f"cannot write {os.fspath(path)}: {reason}{named}")
        self.path = os.fspath(path)
        self.errno = code


class SameFileError(ValueError):
    """An output would replace one of the run's inputs (the same file by device and inode)."""


@dataclass(frozen=True)
class InputFiles:
    """The files a run reads, by identity (device, inode), so no output can replace one.

    Paths are compared as files, not as strings: a symlink to an input, a hard link of it, a
    path through ``..`` or another mount of the same folder are all recognised.
    """

    ids: dict[tuple[int, int], str] = field(default_factory=dict)

    @classmethod
    def of(cls, paths: Iterable[StrPath]) -> InputFiles:
        """The identities of ``paths``; paths that cannot be looked at are left out (they are
        not read either: the scorer reports them)."""
        ids: dict[tuple[int, int], str] = {}
        for path in paths:
            try:
                st = os.stat(path)
            except (OSError, ValueError):
                continue
            ids.setdefault((st.st_dev, st.st_ino), os.fspath(path))
        return cls(ids)

    def input_at(self, path: StrPath) -> str | None:
        """The input that ``path`` is (followed through links, or the link itself), or None."""
        for look in (os.stat, os.lstat):
            try:
                st = look(path)
            except (OSError, ValueError):
                continue
            found = self.ids.get((st.st_dev, st.st_ino))
            if found is not None:
                return found
        return None

    def refuse(self, path: StrPath, what: str = "output") -> None:
        """Raise :class:`SameFileError` when ``path`` is one of the inputs."""
        found = self.input_at(path)
        if found is not None:
            same = "" if os.fspath(path) == found else f" (the same file as {found})"
            raise SameFileError(
                f"{what} {os.fspath(path)} is one of the inputs{same}; writing it would "
                "destroy it"
            )


def _write(fd: int, data: Any) -> int:
    """Every byte qualiclip writes to an output goes through here (tests fill the disk here)."""
    return os.write(fd, data)


class _RawOutput(io.FileIO):
    """The temporary file's descriptor; remembers the first failed write, so the OS's reason is
    reported even when the library that was writing words it differently."""

    failure: OutputError | None = None
    target: str = ""

    def write(self, data: Any) -> int:
        try:
            return _write(self.fileno(), data)
        except OSError as exc:
            if self.failure is None:
                self.failure = OutputError(self.target, exc)
            raise self.failure from None


def _temp_path(target: Path) -> Path:
    stem = target.name[:_TEMP_STEM]
    return target.with_name(f".{stem}.{secrets.token_hex(4)}.tmp")


def _create_temp(target: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = _temp_path(target)
        try:
            return os.open(tmp, flags, 0o666), tmp  # the umask applies, as for any new file
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(target, exc) from None
    raise OutputError(target, FileExistsError(errno.EEXIST, "no free temporary name"))


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def open_output(
    path: StrPath,
    mode: str = "wb",
    *,
    inputs: InputFiles | None = None,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    durable: bool = False,
    keep_on_interrupt: bool = False,
) -> Iterator[IO[Any]]:
    """A stream whose content replaces ``path`` atomically when the block ends without error.

    Args:
        path: the file to write; its folder must exist.
        mode: ``"wb"`` (bytes) or ``"w"`` (text, with ``encoding``, ``errors``, ``newline`` as
            for :func:`open`).
        inputs: files the output must never be (checked before writing and before renaming).
        durable: ``fsync`` the file and its folder, so a crash right after leaves the new
            content (training checkpoints).
        keep_on_interrupt: on ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM under the CLI), still
            rename the file into place: for writers that complete their file before the
            interrupt reaches here (the results of ``score``).

    Raises:
        OutputError: the file could not be created, written or renamed (the message names the
            target and the errno); the target is unchanged.
        SameFileError: ``path`` is one of ``inputs``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    if inputs is not None:
        inputs.refuse(target)
    existing = _stat(target)
    if existing is not None and _is_special(existing.st_mode):
        # /dev/null, /dev/stdout, a named pipe: written in place; replacing one would break it
        with _special_output(target, mode, encoding, errors, newline) as special:
            yield special
        return
    fd, tmp = _create_temp(target)
    raw = _RawOutput(fd, "wb", closefd=True)
    raw.target = os.fspath(target)
    if existing is not None and stat.S_ISREG(existing.st_mode):
        with contextlib.suppress(OSError, AttributeError):  # keep the replaced file's mode
            os.fchmod(fd, stat.S_IMODE(existing.st_mode))
    buffered = io.BufferedWriter(raw, buffer_size=1 << 16)
    stream: IO[Any] = (
        io.TextIOWrapper(buffered, encoding=encoding or "utf-8", errors=errors, newline=newline)
        if mode == "w" else buffered
    )
    committed = False
    try:
        try:
            yield stream
        except KeyboardInterrupt:
            if keep_on_interrupt and raw.failure is None:
                _commit(stream, raw, tmp, target, inputs, durable)
                committed = True
            raise
        except BaseException:
            if raw.failure is not None:  # the disk failed; a library's words may not say so
                raise raw.failure from None
            raise
        _commit(stream, raw, tmp, target, inputs, durable)
        committed = True
    finally:
        if not committed:
            with contextlib.suppress(Exception):
                stream.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _is_special(mode: int) -> bool:
    """A device, FIFO or socket: something to write into, not a file to replace."""
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@contextlib.contextmanager
def _special_output(target: Path, mode: str, encoding: str | None, errors: str | None,
                    newline: str | None) -> Iterator[IO[Any]]:
    flags = os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        raise OutputError(target, exc) from None
    raw = _RawOutput(fd, "wb", closefd=True)
    raw.target = os.fspath(target)
    buffered = io.BufferedWriter(raw)
    stream: IO[Any] = (
        io.TextIOWrapper(buffered, encoding=encoding or "utf-8", errors=errors, newline=newline)
        if mode == "w" else buffered
    )
    try:
        yield stream
    except BaseException:
        if raw.failure is not None:
            raise raw.failure from None
        raise
    finally:
        try:
            stream.close()
        except OSError as exc:
            raise (raw.failure or OutputError(target, exc)) from None


def _commit(stream: IO[Any], raw: _RawOutput, tmp: Path, target: Path,
            inputs: InputFiles | None, durable: bool) -> None:
    try:
        stream.flush()
        if durable:
            os.fsync(raw.fileno())
        stream.close()
    except OSError as exc:
        raise (raw.failure or OutputError(target, exc)) from None
    if inputs is not None:
        inputs.refuse(target)  # again: the name may have become an input's link meanwhile
    try:
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(target, exc) from None
    if durable:
        _fsync_folder(target.parent)


def append_line(path: StrPath, line: str) -> None:
    """Append ``line`` (a newline is added) to a text file, whole or not at all.

    The file is opened without following a symlink at its name; a write that fails part-way
    (a full disk) is cut back, so the file never ends in half a line that the next append
    would run on from.

    Raises:
        OutputError: the line could not be written; the file is as it was.
    """
    data = (line + "\n").encode("utf-8")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        raise OutputError(path, exc) from None
    try:
        size = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[_write(fd, view):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise OutputError(path, exc) from None
    finally:
        os.close(fd)


def make_folder(path: StrPath) -> None:
    """Create ``path`` and its parents if missing.

    Raises:
        OutputError: it cannot be created (read-only, full, a file in the way).
    """
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OutputError(path, exc) from None
