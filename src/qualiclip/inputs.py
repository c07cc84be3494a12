"""Expand what a user names (files, folders, globs, list files, ``-`` for stdin) into image paths.

The one expansion of inputs: the CLI's ``score``, Ray scoring and training's
:func:`qualiclip.crops.find_images` all call :func:`list_image_paths`, so a folder, a glob or a
list file means the same set of images everywhere. Nothing here opens an image: a path that
cannot be read is kept, and the scorer reports it as an error row
(:func:`qualiclip.images.decode_rgb` says why).

Example:
    >>> from qualiclip.inputs import list_image_paths
    >>> list_image_paths(["photos/", "extra/*.png"])  # doctest: +SKIP
    [PosixPath('photos/a.jpg'), PosixPath('photos/sub/b.jpg'), PosixPath('extra/c.png')]
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

__all__ = ["IMAGE_EXTENSIONS", "LIST_SUFFIXES", "list_image_paths", "scanned_by"]

#: File extensions picked up when walking folders or expanding globs (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)

#: A file with one of these suffixes, given as an input, is a list of paths (one per line).
LIST_SUFFIXES: frozenset[str] = frozenset({".txt", ".lst"})

_GLOB_CHARS = frozenset("*?[")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _walk_folder(folder: Path, recursive: bool) -> list[Path]:
    """Image files under ``folder``, sorted; hidden entries (".*", e.g. macOS "._x.jpg") skipped.

    A sub-folder that cannot be listed is kept as an entry of its own, so the scorer reports it
    ("folder cannot be read") instead of its images silently missing from the results.
    """
    found: list[Path] = []

    def unreadable(exc: OSError) -> None:
        if exc.filename is not None:
            found.append(Path(os.fsdecode(exc.filename)))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = [] if not recursive else [d for d in dirs if not d.startswith(".")]
        root_path = Path(root)
        found.extend(
            root_path / f for f in files if not f.startswith(".") and _is_image_name(Path(f))
        )
    return sorted(found)


def _is_dir(path: Path) -> bool | None:
    """``path.is_dir()``, or None when the path cannot even be looked at (the scorer says why)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long, an embedded NUL, ...
        return None


def _expand_glob(pattern: str, recursive: bool) -> list[Path]:
    """Glob matches: image files, and image files inside matched folders; sorted."""
    out: list[Path] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if _is_dir(path):
            out.extend(_walk_folder(path, recursive))
        elif _is_image_name(path):
            out.append(path)
    return out


def _expand_one(item: str, recursive: bool) -> Iterator[Path]:
    path = Path(item)
    is_dir = _is_dir(path)
    if is_dir:
        yield from _walk_folder(path, recursive)
    elif is_dir is None or os.path.lexists(path) or not (_GLOB_CHARS & set(item)):
        # An explicit file is kept whatever its extension (a non-image named on purpose gets an
        # error row later), and so is a missing or unreachable one (a symlink loop, a name too
        # long): the scorer reports it rather than us failing before anything is scored.
        yield path
    else:
        try:
            matches = _expand_glob(item, recursive)
        except (OSError, ValueError):
            matches = []
        # A pattern that matches nothing is kept as given, so the user sees it reported (as a
        # shell without nullglob would pass it on).
        yield from matches if matches else [path]


def _stdin_lines(stream: TextIO) -> Iterator[str]:
    """Lines of ``stream`` as file names: raw bytes decoded as the OS decodes names.

    Reading the bytes (not the locale's text) means a name that is not valid UTF-8, or not valid
    in a strict locale, still names the same file (``os.fsdecode``'s surrogate escapes).
    """
    raw = getattr(stream, "buffer", None)
    if raw is not None:
        for line in raw:
            yield os.fsdecode(line.rstrip(b"\r\n"))
    else:
        for text in stream:
            yield text.rstrip("\r\n")


def list_image_paths(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    stdin: TextIO | None = None,
    recursive: bool = True,
    list_files: bool = True,
) -> list[Path]:
    """Expand command-line inputs into the list of image paths to score.

    * a file is kept whatever its extension; a path that does not exist or cannot be looked at
      (a symlink loop, a name too long) is kept too (the scorer reports it as an error row), so
      nothing here raises for bad inputs;
    * a folder is walked (recursively unless ``recursive=False``) for files with an extension in
      :data:`IMAGE_EXTENSIONS`, case-insensitively, in sorted order; hidden files and folders
      (names starting with ".") are skipped; a sub-folder that cannot be listed is kept as an
      entry (the scorer reports it);
    * a pattern containing ``*``, ``?`` or ``[`` that is not an existing path is expanded as a glob
      (``**`` matches any depth); matched folders are walked, matched files kept if they have an
      image extension; a pattern with no match is kept as given;
    * a file ending in ``.txt`` or ``.lst`` is a list: one path per line (relative to the
      list's folder; blank lines and ``#`` comments skipped), each taken as a literal path. One
      rule for local and Ray scoring, evaluation and training data; ``list_files=False`` takes
      such a file as an image path instead;
    * ``-`` reads one path per line from ``stdin`` (default ``sys.stdin``), as bytes decoded like
      the OS decodes file names; blank lines are skipped and each line is taken literally (a
      folder is walked, no glob expansion).

    Duplicates (the same absolute path) are dropped, keeping the first occurrence.

    Args:
        inputs: paths, folders, globs and ``-`` as typed on the command line.
        stdin: where ``-`` reads from.
        recursive: walk sub-folders.
        list_files: read ``.txt``/``.lst`` inputs as lists of paths (default).

    Returns:
        Paths in input order (sorted within each folder or glob).
    """
    seen: set[str] = set()
    out: list[Path] = []
    for raw in inputs:
        item = os.fspath(raw)
        if item == "-":
            stream = sys.stdin if stdin is None else stdin
            lines = _stdin_lines(stream)
            paths = [p for line in lines if line.strip() for p in _expand_literal(line, recursive)]
        elif list_files and Path(item).suffix.lower() in LIST_SUFFIXES and _is_regular(Path(item)):
            paths = [p for line in _list_file_lines(Path(item))
                     for p in _expand_literal(line, recursive)]
        else:
            paths = list(_expand_one(item, recursive))
        for path in paths:
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out



def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _list_file_lines(path: Path) -> list[str]:
    """The paths a list file names: one per line, relative ones taken from the file's folder;
    blank lines and ``#`` comments skipped. Lines are decoded as the OS decodes file names."""
    base = path.parent
    lines = [os.fsdecode(b.strip()) for b in path.read_bytes().splitlines()]
    return [str(base / ln) if not os.path.isabs(ln) else ln
            for ln in lines if ln and not ln.startswith("#")]


def _expand_literal(item: str, recursive: bool) -> list[Path]:
    path = Path(item)
    return _walk_folder(path, recursive) if _is_dir(path) else [path]


# --- would an output be read back as an input? -------------------------------------------------


def scanned_by(path: str | os.PathLike[str], inputs: Sequence[str]) -> str | None:
    """The input (a folder or a glob, as given) whose expansion would list a file at ``path``.

    An output written there (results named ``*.png``, quality-map overlays) would be scored as
    an input by the next run with the same inputs, and refused as one the run after (it is then
    both an input and the output). Asking before the first write makes the rule the same every
    time. Folders are walked as :func:`list_image_paths` walks them (recursively; hidden names
    skipped); a glob matches as :mod:`glob` does (``*`` never matches a leading ``.``, ``**`` any
    depth), and a folder it matches is walked. Only image file names can be listed.

    Args:
        path: a file that may not exist yet.
        inputs: the inputs as given on the command line.

    Returns:
        The first input that would list it, or None.
    """
    name = os.path.basename(os.fspath(path))
    if not _is_image_name(Path(name)) or name.startswith("."):
        return None
    target = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), name)
    for item in inputs:
        if item == "-":
            continue
        if _is_dir(Path(item)):
            parts = _parts_under(os.path.realpath(item), target)
            if parts is not None and not any(p.startswith(".") for p in parts):
                return item
        elif _GLOB_CHARS & set(item) and not os.path.lexists(item) and _glob_reaches(item, target):
            return item
    return None


def _parts_under(folder: str, target: str) -> list[str] | None:
    """The components of ``target`` below ``folder``, or None when it is not below it."""
    try:
        if os.path.commonpath([folder, target]) != folder:
            return None
    except ValueError:  # different drives
        return None
    rel = os.path.relpath(target, folder)
    return [] if rel == os.curdir else rel.split(os.sep)


def _glob_reaches(pattern: str, target: str) -> bool:
    """Whether expanding ``pattern`` (recursive globs, matched folders walked) lists ``target``."""
    parts = os.path.abspath(pattern).split(os.sep)
    fixed = next((i for i, p in enumerate(parts) if _GLOB_CHARS & set(p)), len(parts))
    base = os.path.realpath(os.sep.join(parts[:fixed]) or os.sep)
    below = _parts_under(base, target)
    return below is not None and _components_match(below, parts[fixed:])


def _components_match(names: list[str], patterns: list[str]) -> bool:
    if not patterns:  # what matched so far is a folder (it holds more): it is walked
        return bool(names) and not any(n.startswith(".") for n in names)
    head = patterns[0]
    if head == "**":
        return _components_match(names, patterns[1:]) or (
            bool(names) and not names[0].startswith(".")
            and _components_match(names[1:], patterns)
        )
    if not names or (names[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatch(names[0], head) and (
        len(names) == 1 and len(patterns) == 1 or _components_match(names[1:], patterns[1:])
    )
