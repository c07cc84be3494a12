"""Named weights, their verified download, and the one name-to-weights resolver.

This is the only module of qualiclip that touches the network, and it does so through one private
function, :func:`_urlopen`. Every file in the table carries its full sha256 and size; a download is
streamed to a temporary file beside its destination, hashed on the way, and moved into place
atomically only when both match. Nothing unverified is ever loaded.

Cache folder, first match wins: the ``cache_dir`` argument (``--cache-dir``), ``$QUALICLIP_HOME``,
``$XDG_CACHE_HOME/qualiclip``, ``~/.cache/qualiclip``. With ``QUALICLIP_OFFLINE=1`` nothing is
fetched: a missing file raises :class:`OfflineError` whose message says what to download and
exactly where to put it.

Weight files are read by :mod:`qualiclip.weight_files`; :func:`resolve_weights` is the
one place that turns a name or path into weights, with one rule for trusting TorchScript.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qualiclip.clip import CLIP, RN50, TINY_RN, CLIPConfig, Pooling
from qualiclip.prompts import CLIP_IQA_PAIRS, CLIP_MEAN, CLIP_STD, PROMPT_PAIRS, PromptPair
from qualiclip.weight_files import is_torchscript_archive, load_checkpoint

__all__ = [
    "BPE_VOCAB",
    "PRETRAINED",
    "PRETRAINED_PROMPTS",
    "ChecksumError",
    "OfflineError",
    "PretrainedPrompts",
    "PretrainedWeights",
    "PromptSource",
    "RANDOM_MODELS",
    "RemoteFile",
    "Weights",
    "add_to_cache",
    "cache_dir",
    "cached_path",
    "packaged_path",
    "download",
    "is_cached",
    "is_torchscript_archive",
    "load_checkpoint",
    "prompted_identity",
    "resolve_prompts",
    "resolve_weights",
    "sha256_file",
    "split_prompted",
    "weights_identity",
]

_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar
_TIMEOUT_S = 30.0  # per socket operation, not for the whole download
_OFFLINE_VALUES = frozenset({"1", "true", "yes", "on"})


class ChecksumError(RuntimeError):
    """A file's size or sha256 differs from the table: it was not used (and a download removed)."""


class OfflineError(RuntimeError):
    """A needed file is not cached and cannot be downloaded (offline mode, or no network)."""


@dataclass(frozen=True)
class RemoteFile:
    """A downloadable file, identified by its content.

    Attributes:
        name: short label for messages (``"QualiCLIP weights"``).
        urls: mirrors, tried in order; the first whose bytes match the checksum wins.
        sha256: full lowercase hex digest of the file: the file's identity.
        size: size in bytes, or None when unknown (then only the digest is checked).
        filename: name of the file in the cache folder.
        licence: licence of the file's content.
        description: one line for listings.
        packaged: the file ships inside qualiclip (``qualiclip/assets/<filename>``): it is
            never downloaded nor cached, and is verified against ``sha256`` at every load.
    """

    name: str
    urls: tuple[str, ...]
    sha256: str
    size: int | None
    filename: str
    licence: str
    description: str = ""
    packaged: bool = False

    def __post_init__(self) -> None:
        digest = self.sha256.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{self.name}: sha256 must be 64 hex digits, got {self.sha256!r}")
        if not self.urls and not self.packaged:
            raise ValueError(f"{self.name}: at least one URL is needed")
        if Path(self.filename).name != self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"{self.name}: filename must be a bare file name: {self.filename!r}")
        object.__setattr__(self, "sha256", digest)


@dataclass(frozen=True)
class PretrainedWeights:
    """A named set of weights with everything needed to score with it.

    Weights carry their preprocessing (STYLE.md): the score never depends on a caller remembering
    the right normalisation or prompts.

    Attributes:
        name: the name :func:`qualiclip.create_model` takes.
        file: the checkpoint to download (any format :func:`load_checkpoint` reads).
        prompt_pairs: ``(positive, negative)`` prompts the score averages over.
        logit_scale: softmax scale of the authors' formula.
        mean, std: RGB input normalisation.
        pooling: attention-pooling mode of the image tower (``"none"``: no positional embedding).
        description: one line for listings.
        licence: licence of the weights.
    """

    name: str
    file: RemoteFile
    prompt_pairs: tuple[PromptPair, ...] = PROMPT_PAIRS
    logit_scale: float = 100.0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pooling: Pooling = "none"
    description: str = ""
    licence: str = field(default="")

    def __post_init__(self) -> None:
        if not self.licence:
            object.__setattr__(self, "licence", self.file.licence)


_HF = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"

QUALICLIP_FILE = RemoteFile(
    name="QualiCLIP weights",
    urls=(
        f"{_HF}/QualiCLIP.pth",
        "https://github.com/miccunifi/QualiCLIP/releases/download/weights/qualiclip.pth",
    ),
    sha256="5818e085ac4b3d297cdd183fd2b1d8a4ddb2242e5bb7fd24b2cd66d7d132bc7e",
    size=408_494_502,
    filename="QualiCLIP.pth",
    licence="CC BY-NC 4.0",
    description="QualiCLIP fine-tuned CLIP RN50 (Agnolucci et al., arXiv 2403.11176)",
)

CLIP_RN50_FILE = RemoteFile(
    name="OpenAI CLIP RN50",
    urls=(
        "https://openaipublic.azureedge.net/clip/models/"
        "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    ),
    # Written out in full, never parsed from the URL: the table is the source of truth.
    sha256="afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    size=None,
    filename="RN50.pt",
    licence="MIT",
    description="OpenAI CLIP ResNet-50 (TorchScript archive, fp16)",
)

#: CLIP's byte-pair vocabulary; the tokenizer uses the package copy first, then $QUALICLIP_VOCAB.
BPE_VOCAB = RemoteFile(
    name="CLIP BPE vocabulary",
    urls=("https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz",),
    sha256="924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
    size=None,
    filename="bpe_simple_vocab_16e6.txt.gz",
    licence="MIT",
    description="OpenAI CLIP byte-pair-encoding vocabulary",
)

#: qualiclip's own model, trained from random weights by ``qualiclip train --preset open`` on
#: openly licensed photos, then 300 steps on 224 px crops; shipped in the package
#: (docs/models/qualiclip-open.md).
QUALICLIP_OPEN_FILE = RemoteFile(
    name="qualiclip-open weights",
    urls=(),
    sha256="3fe86e9edff3153de0085a484d9a85be8f8a096a7edbac7e9f13d1b5ea7cdcb4",
    size=10621161,
    filename="qualiclip-open.pth",
    licence="CC BY-SA 4.0",
    description="qualiclip-open: a small QualiCLIP trained by qualiclip on open photos",
    packaged=True,
)

#: Random-weight models: CLIP shapes initialised from a seed, for tests and speed benchmarks
#: (speed does not depend on weights), and as training start points.
RANDOM_MODELS: dict[str, CLIPConfig] = {
    "random-tiny": TINY_RN,
    "random-micro": dataclasses.replace(TINY_RN, vision_width=8, embed_dim=32),
    # qualiclip-open's shape: the tiny model's text tower, an image tower twice as wide.
    "random-small": dataclasses.replace(TINY_RN, vision_width=32),
    "random-rn50": RN50,
}

#: Named weights for :func:`qualiclip.create_model`.
PRETRAINED: dict[str, PretrainedWeights] = {
    "qualiclip-open": PretrainedWeights(
        name="qualiclip-open",
        file=QUALICLIP_OPEN_FILE,
        prompt_pairs=PROMPT_PAIRS,
        # Chosen on the held-out open photos (docs/models/qualiclip-open.md): at the authors'
        # 100 this model's pair probabilities saturate near 1 and JPEG ordering falls to chance.
        logit_scale=10.0,
        description="qualiclip's own QualiCLIP (small ResNet, open photos; offline, "
        "commercial use allowed)",
    ),
    "qualiclip": PretrainedWeights(
        name="qualiclip",
        file=QUALICLIP_FILE,
        prompt_pairs=PROMPT_PAIRS,
        description="QualiCLIP, the authors' release (opinion-unaware, 7 prompt pairs)",
    ),
    "clip-rn50": PretrainedWeights(
        name="clip-rn50",
        file=CLIP_RN50_FILE,
        prompt_pairs=PROMPT_PAIRS,
        description="OpenAI CLIP RN50 with QualiCLIP's 7 prompt pairs (training start point)",
    ),
    "clip-iqa": PretrainedWeights(
        name="clip-iqa",
        file=CLIP_RN50_FILE,
        prompt_pairs=CLIP_IQA_PAIRS,
        description="CLIP-IQA baseline: OpenAI CLIP RN50, 'Good photo.'/'Bad photo.' (zero-shot)",
    ),
}


@dataclass(frozen=True)
class PretrainedPrompts:
    """Learned prompts (pyiqa's QualiCLIP+ heads) and the weights they were learned on.

    Attributes:
        name: the name ``create_model`` and ``--prompts`` take (``create_model(name)`` alone
            means the prompts on their base).
        file: the prompt file (:mod:`qualiclip.prompt_learning` reads it).
        base: the table name of the weights the prompts belong to.
        description: one line for listings.
    """

    name: str
    file: RemoteFile
    base: str = "qualiclip"
    description: str = ""

    @property
    def licence(self) -> str:
        return self.file.licence


def _plus_file(dataset: str, filename: str, sha256: str) -> RemoteFile:
    return RemoteFile(
        name=f"QualiCLIP+ prompts ({dataset})",
        urls=(f"{_HF}/{filename}",),
        sha256=sha256,
        size=2_209_627,
        filename=filename,
        licence="CC BY-NC-SA 4.0",  # pyiqa's weight mirror
        description=f"pyiqa's QualiCLIP+ prompt context learned on {dataset} opinion scores",
    )


#: QualiCLIP+ (pyiqa): 16 context vectors per prompt learned on human opinion scores of one
#: dataset, on top of the authors' QualiCLIP weights.
PRETRAINED_PROMPTS: dict[str, PretrainedPrompts] = {
    name: PretrainedPrompts(
        name=name,
        file=_plus_file(dataset, filename, digest),
        description=f"QualiCLIP+ (pyiqa): qualiclip with prompts learned on {dataset}",
    )
    for name, dataset, filename, digest in (
        ("qualiclip+", "KonIQ-10k", "QualiCLIP+_koniq.pth",
         "450292893e96f38dca09d51ca2e0e1cd7cb1c2c55d444cfe2ac8ea2ab5d1d894"),
        ("qualiclip+-clive", "CLIVE", "QualiCLIP+_clive.pth",
         "5a2c75e4586abbaf1bc55e945691be14c70d68ede7dbabd86caebaf838ec50a3"),
        ("qualiclip+-flive", "FLIVE", "QualiCLIP+_flive.pth",
         "ac20494683fb8c26abae04c6df671c389bf42f08461b2eac8497d91d53d558cc"),
        ("qualiclip+-spaq", "SPAQ", "QualiCLIP+_spaq.pth",
         "2d9c2ef6b746d0f42573c24a118a6f0bf1f919d60163b5dbd6de0b6fc7e1a0e9"),
    )
}


# --- cache --------------------------------------------------------------------------------------


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The download cache folder (not created here).

    Args:
        override: explicit folder (``--cache-dir``); wins over the environment.

    Returns:
        ``override``, else ``$QUALICLIP_HOME``, else ``$XDG_CACHE_HOME/qualiclip``, else
        ``~/.cache/qualiclip``.
    """
    if override is not None and os.fspath(override) != "":
        return Path(override).expanduser()
    home = os.environ.get("QUALICLIP_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qualiclip"


def _resolve_file(
    file_or_name: RemoteFile | PretrainedWeights | PretrainedPrompts | str,
) -> RemoteFile:
    if isinstance(file_or_name, RemoteFile):
        return file_or_name
    if isinstance(file_or_name, (PretrainedWeights, PretrainedPrompts)):
        return file_or_name.file
    if isinstance(file_or_name, str):
        if file_or_name in PRETRAINED:
            return PRETRAINED[file_or_name].file
        if file_or_name in PRETRAINED_PROMPTS:
            return PRETRAINED_PROMPTS[file_or_name].file
        for known in _known_files():
            if file_or_name == known.filename:
                return known
        raise ValueError(
            f"unknown weights {file_or_name!r}; known names: "
            f"{', '.join([*PRETRAINED, *PRETRAINED_PROMPTS])} "
            f"(or a cache file name: {', '.join(f.filename for f in _known_files())})"
        )
    raise TypeError(f"expected a RemoteFile, PretrainedWeights or name, got {type(file_or_name)}")


def cached_path(
    name: str | RemoteFile | PretrainedWeights, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the file of ``name`` lives (or will live) in the cache; it may not exist yet.

    A packaged file lives in the package, whatever the cache.
    """
    file = _resolve_file(name)
    return packaged_path(file) if file.packaged else _cache_root(cache_dir) / file.filename


def packaged_path(file: RemoteFile) -> Path:
    """Where a packaged file (``RemoteFile.packaged``) sits in this install."""
    return Path(__file__).parent / "assets" / file.filename


def _verified_package_file(file: RemoteFile) -> Path:
    """The packaged file, hashed now (no sidecar: the package folder is not ours to write).

    Raises:
        ChecksumError: the file is missing from this install or differs from the table.
    """
    path = packaged_path(file)
    if not path.is_file():
        raise ChecksumError(
            f"{file.filename} ({file.name}) is missing from this qualiclip install ({path}); "
            "reinstall qualiclip"
        )
    actual = sha256_file(path)
    if actual != file.sha256 or (file.size is not None and path.stat().st_size != file.size):
        raise ChecksumError(
            f"{path} ({file.name}): sha256 mismatch: expected {file.sha256}, got {actual}; "
            "the packaged weights were changed: reinstall qualiclip"
        )
    return path


def is_cached(
    name: str | RemoteFile | PretrainedWeights, cache_dir: str | os.PathLike[str] | None = None
) -> bool:
    """Whether the file of ``name`` is in the cache with the right size (not re-hashed here)."""
    file = _resolve_file(name)
    path = cached_path(file, cache_dir)
    return path.is_file() and (file.size is None or path.stat().st_size == file.size)


def _cache_root(override: str | os.PathLike[str] | None) -> Path:
    # The module-level function is shadowed by the parameter name in public signatures.
    return cache_dir(override)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Full sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path, file: RemoteFile) -> bool:
    """Whether ``path`` holds ``file``: size first (free), then the digest.

    Hashing a 400 MB file takes about a second, so a verified digest is remembered in a
    ``<file>.sha256`` sidecar keyed by size and modification time; any change to the file
    invalidates it and the file is hashed again.
    """
    stat = path.stat()
    if file.size is not None and stat.st_size != file.size:
        return False
    key = {"sha256": file.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(_sidecar(path).read_text()) == key:
            return True
    if sha256_file(path) != file.sha256:
        return False
    with contextlib.suppress(OSError):  # a read-only cache still works, only slower
        _sidecar(path).write_text(json.dumps(key))
    return True


def _remove(path: Path) -> None:
    for p in (path, _sidecar(path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _offline_text(file: RemoteFile, target: Path, reason: str, details: str = "") -> str:
    size = f"{file.size} bytes ({file.size / 2**20:.1f} MiB)" if file.size else "unknown"
    urls = "\n".join(f"    {u}" for u in file.urls)
    return (
        f"cannot download {file.filename} ({file.name}): {reason}\n{details}"
        f"  sha256: {file.sha256}\n"
        f"  size:   {size}\n"
        f"  from:\n{urls}\n"
        f"Download it on a machine with internet access, check its sha256, and place it at:\n"
        f"    {target}\n"
        f"or let qualiclip verify it and copy it there:\n"
        f"    qualiclip models --add {_add_name(file)} PATH\n"
        f"(QUALICLIP_HOME or --cache-dir choose another cache folder)"
        f"{_offline_alternative(file)}"
    )


def _offline_alternative(file: RemoteFile) -> str:
    """A model that needs no download, offered where a download of QualiCLIP's weights fails."""
    if file != QUALICLIP_FILE:
        return ""
    return (
        "\nTo score without downloading anything: --model qualiclip-open, qualiclip's own "
        "model, shipped with it (docs/models/qualiclip-open.md)"
    )


def _add_name(file: RemoteFile) -> str:
    """The name ``qualiclip models --add`` takes for ``file``: its weight name, else file name."""
    files = {name: w.file for name, w in PRETRAINED.items()}
    files.update({name: p.file for name, p in PRETRAINED_PROMPTS.items()})
    return next((name for name, f in files.items() if f == file), file.filename)


def _is_offline() -> bool:
    return os.environ.get("QUALICLIP_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def _known_files() -> list[RemoteFile]:
    files = [w.file for w in PRETRAINED.values()]
    files += [p.file for p in PRETRAINED_PROMPTS.values()] + [BPE_VOCAB]
    return list(dict.fromkeys(files))  # unique, in table order


# --- download -----------------------------------------------------------------------------------


def _urlopen(url: str, timeout: float) -> Any:
    """Open ``url`` for reading: the one network call of qualiclip (tests patch it).

    Returns:
        a response with ``read(n)`` and ``close()`` (``urllib``'s, following redirects).
    """
    # Only the https URLs of the weight table (its mirrors) reach here, never a file: URL.
    request = urllib.request.Request(url, headers={"User-Agent": "qualiclip"})  # noqa: S310
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310


def _stream_to(response: Any, out: BinaryIO, file: RemoteFile, progress: bool) -> str:
    """Copy ``response`` into ``out`` while hashing; return the hex digest.

    Raises:
        ChecksumError: the server sends more bytes than the table's size (stopped right away,
            so a wrong or endless response cannot fill the disk).
    """
    from tqdm import tqdm

    digest = hashlib.sha256()
    total = file.size
    if total is None:
        headers = getattr(response, "headers", None)
        length = headers.get("Content-Length") if headers is not None else None
        total = int(length) if length and str(length).isdigit() else None
    written = 0
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=file.filename,
        file=sys.stderr, disable=not progress, leave=False,
    ) as bar:
        for chunk in iter(lambda: response.read(_CHUNK), b""):
            written += len(chunk)
            if file.size is not None and written > file.size:
                raise ChecksumError(
                    f"{file.filename}: the server sent more than the expected {file.size} bytes"
                )
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _fetch_one(url: str, file: RemoteFile, target: Path, progress: bool) -> None:
    """Download ``url`` to a temporary file beside ``target``, verify, then rename into place.

    Raises:
        ChecksumError: size or digest mismatch (the temporary file is removed).
        OSError, urllib.error.URLError, http.client.HTTPException: network or disk failure.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file.filename}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            response = _urlopen(url, _TIMEOUT_S)
            try:
                actual = _stream_to(response, out, file, progress)
            finally:
                with contextlib.suppress(Exception):
                    response.close()
        size = tmp.stat().st_size
        if file.size is not None and size != file.size:
            raise ChecksumError(
                f"{file.filename} from {url}: expected {file.size} bytes, got {size}"
            )
        if actual != file.sha256:
            raise ChecksumError(
                f"{file.filename} from {url}: sha256 mismatch: expected {file.sha256}, "
                f"got {actual}; the download was discarded"
            )
        os.replace(tmp, target)  # atomic: readers see the old state or the verified file
        with contextlib.suppress(OSError):
            stat = target.stat()
            key = {"sha256": file.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            _sidecar(target).write_text(json.dumps(key))
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # after a failure, or an interrupt: never leave partial files


def download(
    file_or_name: RemoteFile | PretrainedWeights | str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Return the verified local copy of a file, downloading it once if needed.

    Args:
        file_or_name: a :class:`RemoteFile`, a :class:`PretrainedWeights`, or a name from
            :data:`PRETRAINED`.
        cache_dir: cache folder (see :func:`cache_dir` for the default).
        progress: show a progress bar on stderr while downloading.

    Returns:
        The path of the cached file; its size and sha256 match the table.

    Raises:
        OfflineError: not cached, and ``QUALICLIP_OFFLINE=1`` is set or no URL could be reached;
            the message names the file, its sha256 and size, the URLs and the path to place it at.
        ChecksumError: every URL that answered sent different bytes than the table says.
        ValueError: unknown name.
    """
    file = _resolve_file(file_or_name)
    if file.packaged:
        return _verified_package_file(file)
    target = _cache_root(cache_dir) / file.filename
    stale = ""
    if target.is_file():
        if _verified(target, file):
            return target
        _remove(target)  # a corrupt or partial copy must never be used
        stale = " (a cached copy with the wrong checksum was removed)"
    if _is_offline():
        raise OfflineError(_offline_text(file, target, f"QUALICLIP_OFFLINE is set{stale}"))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OfflineError(
            _offline_text(file, target, f"cannot create the cache folder: {exc}")
        ) from exc
    failures: list[str] = []
    mismatches: list[str] = []
    for url in file.urls:
        try:
            _fetch_one(url, file, target, progress)
            return target
        except ChecksumError as exc:
            mismatches.append(str(exc))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            failures.append(f"{url}: {reason}")
    if mismatches:
        raise ChecksumError("; ".join(mismatches + failures))
    details = "".join(f"  failed: {line}\n" for line in failures)
    raise OfflineError(_offline_text(file, target, "no URL could be reached", details))


def add_to_cache(
    path: str | os.PathLike[str],
    name_or_file: RemoteFile | PretrainedWeights | str,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Verify a copy fetched by hand and put it in the cache, where :func:`download` finds it.

    Args:
        path: the local file.
        name_or_file: which table entry it should be: a name from :data:`PRETRAINED`, a cache
            file name (e.g. ``"RN50.pt"``), or a :class:`RemoteFile`.
        cache_dir: cache folder (see :func:`cache_dir`).

    Returns:
        The path in the cache.

    Raises:
        ChecksumError: the file's size or sha256 differs from the table (nothing is copied).
        FileNotFoundError: ``path`` does not exist.
    """
    file = _resolve_file(name_or_file)
    if file.packaged:
        raise ValueError(f"{file.filename} ships with qualiclip: there is nothing to add")
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    size = source.stat().st_size
    if file.size is not None and size != file.size:
        raise ChecksumError(f"{source}: expected {file.size} bytes for {file.filename}, got {size}")
    actual = sha256_file(source)
    if actual != file.sha256:
        raise ChecksumError(
            f"{source}: sha256 mismatch for {file.filename}: expected {file.sha256}, got {actual}"
        )
    target = _cache_root(cache_dir) / file.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.resolve() == target.resolve():
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file.filename}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp_name)
        os.replace(tmp_name, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    if not _verified(target, file):  # re-hash the copy once (this also writes the sidecar)
        _remove(target)
        raise ChecksumError(f"{target}: the copy of {source} does not match; removed")
    return target


def _matching_entry(path: Path) -> RemoteFile | None:
    """The table file whose size and sha256 ``path`` has, if any (size first: no hashing)."""
    size = path.stat().st_size
    candidates = [f for f in _known_files() if f.size in (None, size)]
    if not candidates:
        return None
    digest = sha256_file(path)
    return next((f for f in candidates if f.sha256 == digest), None)


@dataclass(frozen=True)
class Weights:
    """Weights found from a name or a path: the one answer every front end uses.

    Attributes:
        name: what was asked for (a table name, a random model's name, or the path).
        state: OpenAI-keyed float32 tensors (a random model's hold the text tower too).
        prompt_features: stored prompt features ``[2P, D]`` (positive first), or None.
        sha256: the weight file's checksum (None for random models).
        entry: the table entry of named weights (their prompts, normalisation, pooling, scale).
    """

    name: str
    state: dict[str, torch.Tensor]
    prompt_features: torch.Tensor | None
    sha256: str | None
    entry: PretrainedWeights | None = None


def weights_identity(
    name_or_path: str | os.PathLike[str],
    prompts: str | os.PathLike[str] | None = None,
) -> tuple[str, str | None]:
    """``(name, sha256)`` of what :func:`resolve_weights` would load, without loading it.

    With learned ``prompts`` (or a :data:`PRETRAINED_PROMPTS` name), the identity of the
    combination (:func:`prompted_identity`): the name and sha256 a scorer built from them
    carries into outputs.

    Raises:
        ValueError: neither a known name nor an existing file.
    """
    base, prompts = split_prompted(name_or_path, prompts)
    if prompts is not None:
        prompt_name, prompt_sha = _prompt_identity(prompts)
        return prompted_identity(*weights_identity(base), prompt_name, prompt_sha)
    key = os.fspath(name_or_path)
    if key in RANDOM_MODELS:
        return key, None
    if key in PRETRAINED:
        return key, PRETRAINED[key].file.sha256
    path = Path(key)
    if not path.is_file():
        raise ValueError(f"unknown weights {key!r}: not an existing file, nor one of "
                         f"{', '.join([*PRETRAINED, *RANDOM_MODELS])}")
    return key, sha256_file(path)


def _random_weights(name: str, seed: int) -> Weights:
    config = RANDOM_MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = CLIP(config).state_dict()
        # Random prompt features (not the random text tower's, which are nearly parallel):
        # scores then differ from image to image, which tests and benchmarks rely on.
        features = torch.randn(2 * len(PROMPT_PAIRS), config.embed_dim)
    return Weights(name, {k: v.detach() for k, v in state.items()}, features, None)


def resolve_weights(
    name_or_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    trust_torchscript: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> Weights:
    """Load weights by table name (downloading once), random model name, or checkpoint path.

    The one place that turns a name into tensors: scoring, training, Ray actors and the service
    all come through here, with one TorchScript rule: a TorchScript archive runs code when
    loaded, so it is loaded only when its checksum is in the table (named weights, or a
    hand-downloaded copy such as ``RN50.pt``) or the caller trusts it explicitly.

    Args:
        name_or_path: a name from :data:`PRETRAINED` or :data:`RANDOM_MODELS`, or a file.
        cache_dir: cache folder for named weights.
        trust_torchscript: allow a TorchScript archive given by path whose checksum is unknown.
        progress: progress bar while downloading.
        seed: the seed of a random model's weights.

    Raises:
        ValueError: neither a known name nor an existing file, or an unusable checkpoint.
        OfflineError, ChecksumError: see :func:`download`.
    """
    key = os.fspath(name_or_path)
    if key in RANDOM_MODELS:
        return _random_weights(key, seed)
    if key in PRETRAINED:
        entry = PRETRAINED[key]
        local = download(entry.file, cache_dir, progress=progress)
        state, features = load_checkpoint(local, trust_torchscript=True)
        return Weights(key, state, features, entry.file.sha256, entry)
    path = Path(key)
    if not path.is_file():
        raise ValueError(
            f"unknown weights {key!r}: not an existing file, nor one of "
            f"{', '.join([*PRETRAINED, *RANDOM_MODELS])}"
        )
    trusted = trust_torchscript or (
        is_torchscript_archive(path) and _matching_entry(path) is not None
    )
    state, features = load_checkpoint(path, trust_torchscript=trusted)
    return Weights(key, state, features, sha256_file(path))


# --- learned prompts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSource:
    """A prompt file found from a name or a path.

    Attributes:
        name: the table name, or the path as given.
        path: the local (verified, for table names) file.
        sha256: the file's checksum.
        entry: the table entry of named prompts.
    """

    name: str
    path: Path
    sha256: str
    entry: PretrainedPrompts | None = None


def split_prompted(
    name_or_path: str | os.PathLike[str], prompts: str | os.PathLike[str] | None
) -> tuple[str, str | None]:
    """``(base weights, prompts)`` meant by a model name and an optional ``prompts``.

    A :data:`PRETRAINED_PROMPTS` name given as the model (``create_model("qualiclip+")``) means
    its prompts on its base.

    Raises:
        ValueError: such a name together with other ``prompts``.
    """
    key = os.fspath(name_or_path)
    if key in PRETRAINED_PROMPTS:
        entry = PRETRAINED_PROMPTS[key]
        if prompts is not None and os.fspath(prompts) != key:
            raise ValueError(
                f"{key} is {entry.base} with learned prompts already; to use other prompts, give "
                f"its base: --model {entry.base} --prompts {os.fspath(prompts)}"
            )
        return entry.base, key
    return key, None if prompts is None else os.fspath(prompts)


def _prompt_identity(prompts: str) -> tuple[str, str]:
    if prompts in PRETRAINED_PROMPTS:
        return prompts, PRETRAINED_PROMPTS[prompts].file.sha256
    if not Path(prompts).is_file():
        raise ValueError(_unknown_prompts(prompts))
    return prompts, sha256_file(prompts)


def _unknown_prompts(key: str) -> str:
    return (f"unknown prompts {key!r}: not an existing file, nor one of "
            f"{', '.join(PRETRAINED_PROMPTS)}")


def prompted_identity(
    base_name: str, base_sha256: str | None, prompts_name: str, prompts_sha256: str
) -> tuple[str, str]:
    """Name and sha256 of a scorer made of base weights and learned prompts.

    The name is the prompts' table name when they are on their own base (``qualiclip+``), else
    ``BASE+PROMPTS``. The sha256 is that of the ASCII text ``<base sha256>+<prompts sha256>``
    (the base's name stands in for a random model's missing checksum), so the outputs of one
    base with and without prompts, or with two prompt files, never pass for each other's.
    """
    entry = PRETRAINED_PROMPTS.get(prompts_name)
    name = prompts_name if entry is not None and entry.base == base_name \
        else f"{base_name}+{prompts_name}"
    text = f"{base_sha256 or base_name}+{prompts_sha256}"
    return name, hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_prompts(
    name_or_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
) -> PromptSource:
    """The local prompt file of a :data:`PRETRAINED_PROMPTS` name (downloaded once, verified,
    like weights) or of a path.

    Raises:
        ValueError: neither a known name nor an existing file.
        OfflineError, ChecksumError: see :func:`download`.
    """
    key = os.fspath(name_or_path)
    if key in PRETRAINED_PROMPTS:
        entry = PRETRAINED_PROMPTS[key]
        local = download(entry.file, cache_dir, progress=progress)
        return PromptSource(key, local, entry.file.sha256, entry)
    if not Path(key).is_file():
        raise ValueError(_unknown_prompts(key))
    return PromptSource(key, Path(key), sha256_file(key))
