"""Build a folder of openly licensed pristine photographs from Debian packages, reproducibly.

Purpose
    QualiCLIP's self-supervised training degrades crops of *pristine* photographs. The photos in
    ``../shared/data/pristine`` are partly research-only (LIVE); this script assembles a set whose
    licences allow redistribution of derived works, commercial use included, from packages of
    Debian 12 "bookworm" and Debian 13 "trixie". Only the manifest
    ``data/pristine-open-manifest.csv`` is committed; the photos are rebuilt from it and never
    committed (``/data/pristine-open/`` is in ``.gitignore``).

Usage
    Rebuild the folder (the default mode; needs HTTP access to a Debian mirror, or the .deb files
    already in the cache folder)::

        .venv/bin/python scripts/pristine_photos.py
        .venv/bin/python scripts/pristine_photos.py --kodak ../shared/data/pristine
        .venv/bin/python scripts/pristine_photos.py --out /tmp/photos --max-side 768

    Each manifest row names a package, its exact version and the Debian suite it came from. For
    each package version not yet in ``--debs`` (default ``~/.cache/qualiclip/debs``), the script
    reads the suite's ``Release`` file and its ``main/binary-all`` (else ``binary-amd64``) package
    index from ``--mirror`` (default ``http://deb.debian.org/debian``), checks the index against
    the ``Release`` SHA256, downloads the .deb from the pool and checks it against the index's
    SHA256. The listed files are read straight from the package's data archive (no dpkg, no apt),
    every ``source_sha256`` is checked, and each photo is written as an RGB PNG whose longer side
    is at most ``--max-side`` pixels (Pillow LANCZOS, never upscaled), named
    ``<package>--<stem>.png``. An output that already matches the manifest is left alone.

    The per-file ``source_sha256`` is the trust anchor (the ``Release`` signature is not checked).
    It also lets the build survive a stable point release: when the manifest's version has left
    the suite, the suite's current version of the package is fetched instead (a note says so) and
    accepted only if every listed file still has its recorded checksum. A vanished package or a
    differing checksum is an error (exit status 1, one line on stderr); the old .deb can then be
    put into the cache folder by hand, e.g. from snapshot.debian.org.

    The output ``sha256`` column was recorded with Pillow 13.0.0 (zlib 1.2.13); another Pillow,
    zlib or libjpeg can change the PNG bytes, which is reported as a warning (an error with
    ``--strict``).

    ``--kodak DIR`` adds the 24 Kodak PhotoCD images ``kodim01.png`` .. ``kodim24.png`` from DIR
    (listed in the manifest as package ``kodak``; skipped without the flag). The ``live-*.png``
    files next to them are never read: their licence is research-only.

    ``--curate`` re-creates the manifest from the keep-list ``KEEP`` below (this is how the
    manifest was made): it fetches the suite's current version of each package, reads each kept
    file's licence from the package's ``copyright`` file (plus, where the package keeps per-image
    credits, the wallpaper's ``metadata.json``, the puzzle's ``.desktop`` file or the wallpaper
    folder's ``License`` file), refuses licences outside the policy, and writes the outputs and
    the manifest. Versions move on, so a later ``--curate`` may record newer versions.

Licence policy
    A photo is kept only if the licence covering it allows redistribution of modified versions,
    commercial use included: CC0, public domain, CC-BY, CC-BY-SA, GPL, LGPL, MIT/Expat, BSD,
    Apache. NC or ND licences, GFDL-only images, files no stanza or credit names specifically when
    the package mixes artwork from several authors, and anything unclear are left out. The
    ``licence`` and ``copyright`` columns carry what attribution needs. Where the image's own
    credit and Debian's ``copyright`` file differ (Plasma: LGPL-3 or CC-BY-SA-4.0 in
    ``metadata.json``, GPL-2+ in Debian's file; LXQt: CC-BY-SA-3.0 in ``wallpapers/License``,
    LGPL-2.1+ in Debian's file; Palapeli: public domain in the puzzle's ``.desktop`` file, GPL-2+
    in Debian's file), both allow this use and the column records both, the image's own first.
    Two packages have free-form ``copyright`` files (krank, scribus-template); there the phrases
    in ``FIXED_LICENCE`` must be present.

Curation (done by eye on contact sheets of the 1024-pixel outputs with 1:1 crops, see KEEP):
natural camera photographs only, shorter side at least 512 px in the source, one copy of each
photo across packages and versions (one file per Plasma wallpaper: the largest), no
illustrations, renders, abstract art, gradients, tiled or close-up textures, text or logos,
screenshots, black-and-white conversions, heavy grading (HDR, teal-and-orange, "vintage"),
oversaturation, motion blur, defocus-dominated frames (a sharp subject on a naturally blurred
background is fine), lens flare, very dark or noisy shots, visible compression artefacts, space
imagery, or photos whose credit is unclear.

Looked at and left out entirely: gnome-backgrounds (3.38 to 51: illustrations; the 3.38 photos
are not named in its copyright file), sway-backgrounds, ukui-wallpapers, debian-edu-artwork-*,
desktop-base, xfdesktop4-data, mypaint-data-extras, budgie-control-center-data,
gnome-control-center-data (avatar photos, licence not per file), gnome-recipes-data,
mate-screensaver-common (space imagery), psychopy and psychtoolbox-3-common (demo photos of
unclear origin), fotoxx-common (screenshots), budgie-backgrounds 4.2 (sid only, JPEG XL),
python3-skimage. Partly kept: see the comments in KEEP.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.client
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageCms, ImageOps

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "pristine-open"
DEFAULT_MANIFEST = REPO_ROOT / "data" / "pristine-open-manifest.csv"
DEFAULT_DEBS = Path.home() / ".cache" / "qualiclip" / "debs"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Every kept package is Architecture: all, in main. Such packages are listed in binary-all and
# again in each architecture's index; the second is a fallback for a mirror whose binary-all
# index lags behind its Release file.
INDEXES = ("main/binary-all/Packages.xz", "main/binary-amd64/Packages.xz")
HTTP_TIMEOUT_S = 60
MANIFEST_MAX_SIDE = 1024  # the --max-side the manifest's width/height/sha256 were recorded with
MIN_SHORT_SIDE = 512
COLUMNS = (
    "file", "package", "version", "suite", "source_path", "source_sha256",
    "licence", "copyright", "width", "height", "sha256",
)  # fmt: skip

KODAK_PACKAGE = "kodak"
KODAK_LICENCE = "Kodak: released for unrestricted usage"
KODAK_COPYRIGHT = "Eastman Kodak Company (source: Kodak Lossless True Color Image Suite)"
KODAK_NAMES = tuple(f"kodim{i:02d}.png" for i in range(1, 25))

# Licences that allow redistribution of derived works, commercial use included.
ALLOWED_LICENCE = re.compile(
    r"^(CC0(-1\.0)?|public-domain|CC-BY(-SA)?-[1-4]\.0|L?GPL-[1-3](\.[01])?\+?|Expat|MIT"
    r"|BSD-[234]-[Cc]lause(-Google)?|Apache-2\.0)$"
)

# Path inside each package -> path the package's machine-readable debian/copyright stanzas use.
UPSTREAM_PREFIX = {
    "budgie-backgrounds": ("usr/share/backgrounds/budgie/", ""),
    "forensics-samples-files": ("usr/share/forensics-samples/", ""),
    "libjxl-testdata": ("usr/share/libjxl-testdata/", ""),
    "liblemonldap-ng-portal-perl": (
        "usr/share/lemonldap-ng/portal/htdocs/",
        "lemonldap-ng-portal/site/htdocs/",
    ),
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds/", "16.04/"),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds/", "20.04/"),
    "lxqt-themes": ("usr/share/lxqt/", ""),
    "mate-backgrounds": ("usr/share/backgrounds/mate/", ""),
    "palapeli-data": ("usr/share/palapeli/", ""),
    "plasma-workspace-wallpapers": ("usr/share/wallpapers/", ""),
    "sddm-theme-maldives": ("usr/share/sddm/themes/", "data/themes/"),
    "tuxpaint-data": ("usr/share/tuxpaint/", ""),
}

# Packages whose copyright file is free-form text: (package, path prefix) -> (phrases that must
# all be in the file, licence, copyright holder).
FIXED_LICENCE: dict[tuple[str, str], tuple[tuple[str, ...], str, str]] = {
    ("krank", "usr/share/games/krank/levels/unera-backgrounds/"): (
        ("Author of new images: Slava Anishenko", "License: Public Domain"),
        "public-domain",
        "Slava Anishenko",
    ),
    ("scribus-template", "usr/share/scribus/templates/br2/"): (
        (
            "Simple brochure with a nightly theme (br2)",
            "have been placed into public domain by their author",
        ),
        "public-domain",
        "Riku Leino",
    ),
}

# LXQt credits its photos in usr/share/lxqt/wallpapers/License under these names.
LXQT_LICENSE_FILE = "usr/share/lxqt/wallpapers/License"
LXQT_CREDIT_NAME = {"appleflower": "appleflowers", "this-is-not-windows": "not-windows"}

# The curated keep-list: (suite, package, path inside the package). The suite's current version
# of each package is used by --curate. Every other image of 512 px or more in these packages,
# in the other versions of these packages in bullseye, bookworm, trixie and sid, and in the
# packages named in the module docstring was looked at and left out.
_BOOKWORM, _TRIXIE = "bookworm", "trixie"
_BUDGIE = "usr/share/backgrounds/budgie/"
_FORENSICS = "usr/share/forensics-samples/original-files/"
_JXL = "usr/share/libjxl-testdata/jxl/"
_KRANK = "usr/share/games/krank/levels/unera-backgrounds/"
_LEMON = "usr/share/lemonldap-ng/portal/htdocs/static/common/backgrounds/"
_LOMIRI = "usr/share/backgrounds/"
_LXQT = "usr/share/lxqt/wallpapers/"
_MATE = "usr/share/backgrounds/mate/nature/"
_PALAPELI = "usr/share/palapeli/collection/"
_PLASMA = "usr/share/wallpapers/"
_PLASMA_2560 = "/contents/images/2560x1600.jpg"
_TUX = "usr/share/tuxpaint/templates/"
_KRANK_LEVELS = (
    1, 2, 3, 4, 5, 7, 8, 9, 10, 12, 14, 15, 16, 18, 20, 21, 22, 23, 25, 26, 27, 28, 29, 30,
)  # fmt: skip
_TUX_TEMPLATES = (
    "cliff", "clouds_from_airplane", "corn_maze", "lighthouse", "lough_leane", "mossy_log",
    "ocean_splash", "ocean_waves", "redwoods_above", "rocks", "sun_behind_leaves",
    "wool_mill_machine",
)  # fmt: skip
KEEP: tuple[tuple[str, str, str], ...] = (
    # budgie-backgrounds 3.0: casa-mila, colosseum, tea-gardens, high-trestle-trail (heavy
    # grading), piazza-gae-aulenti and abstract-spiral (near black-and-white), saturnian-profile
    # (space), ocean-waves, valley-midnight, waves-midnight (illustrations) left out.
    (_TRIXIE, "budgie-backgrounds", _BUDGIE + "beacon-street-sunset.jpg"),
    (_TRIXIE, "budgie-backgrounds", _BUDGIE + "blue-periwinkle.jpg"),
    (_TRIXIE, "budgie-backgrounds", _BUDGIE + "canyon-wren.jpg"),
    (_TRIXIE, "budgie-backgrounds", _BUDGIE + "extreme-desert-hike.jpg"),
    (_TRIXIE, "budgie-backgrounds", _BUDGIE + "lake-sherburne.jpg"),
    (_TRIXIE, "budgie-backgrounds", _BUDGIE + "oakland-zoo-otters.jpg"),
    (_TRIXIE, "budgie-backgrounds", _BUDGIE + "perched-osprey.jpg"),
    (_TRIXIE, "budgie-backgrounds", _BUDGIE + "singaporean-cityscape.jpg"),
    # forensics-samples-files: the other phone photos are soft, cluttered indoor shots or
    # WhatsApp-recompressed.
    (_TRIXIE, "forensics-samples-files", _FORENSICS + "pic1/IMG_1054.JPG"),
    (_TRIXIE, "forensics-samples-files", _FORENSICS + "pic2/IMG_20200608_111614.jpg"),
    # krank: underwater photos; bonus-01/menu-scores1 (oversaturated), level-06, -11, -13, -17,
    # -19, -24, menu, menu-levels, menu-play/menu-sounds, menu-scores, -scores2, -scores3 (blur,
    # noise, haze) and menu-credits (same photo as level-18) left out.
    *((_TRIXIE, "krank", f"{_KRANK}level-{n:02d}.jpg") for n in _KRANK_LEVELS),
    (_TRIXIE, "krank", _KRANK + "menu-screen.jpg"),
    # libjxl-testdata: flower_cropped is a crop of flower.png.
    (_TRIXIE, "libjxl-testdata", _JXL + "flower/flower.png"),
    (_TRIXIE, "libjxl-testdata", _JXL + "jpeg_reconstruction/bicycles_restarts.jpg"),
    # liblemonldap-ng-portal-perl: the ForestWander waterfall is HDR-processed; the Aletsch
    # glacier photo is not named in the copyright file.
    (_TRIXIE, "liblemonldap-ng-portal-perl", _LEMON + "1280px-Anse_Source_d'Argent_2-La_Digue.jpg"),
    (_TRIXIE, "liblemonldap-ng-portal-perl", _LEMON + "1280px-BrockenSnowedTrees.jpg"),
    (
        _TRIXIE,
        "liblemonldap-ng-portal-perl",
        _LEMON + "1280px-Cedar_Breaks_National_Monument_partially.jpg",
    ),
    (_TRIXIE, "liblemonldap-ng-portal-perl", _LEMON + "1280px-Parry_Peak_from_Winter_Park.jpg"),
    (_BOOKWORM, "lomiri-wallpapers-16.04", _LOMIRI + "Bridge_by_Sander_Klootwijk.jpg"),
    (_BOOKWORM, "lomiri-wallpapers-16.04", _LOMIRI + "Dragonfly_by_Bolly.jpg"),
    (_BOOKWORM, "lomiri-wallpapers-16.04", _LOMIRI + "Picture_0B_by_freespace.jpg"),
    (_BOOKWORM, "lomiri-wallpapers-16.04", _LOMIRI + "aitzgorri_by_Aitzol_Berasategi.jpg"),
    (_BOOKWORM, "lomiri-wallpapers-16.04", _LOMIRI + "friends_by_Aitzol_Berasategi.jpg"),
    (_BOOKWORM, "lomiri-wallpapers-16.04", _LOMIRI + "life_by_Aitzol_Berasategi.jpg"),
    (_BOOKWORM, "lomiri-wallpapers-16.04", _LOMIRI + "picosdeeuropa_by_Aitzol_Berasategi.jpg"),
    (_BOOKWORM, "lomiri-wallpapers-16.04", _LOMIRI + "seeding_by_Clements_Engelhardt.jpg"),
    (_BOOKWORM, "lomiri-wallpapers-20.04", _LOMIRI + "Kleiber_by_Lukas_Baubkus.jpg"),
    # lxqt-themes 2.1: beam (near black-and-white), drop (defocus), after-the-rain (dark) left
    # out; Butterfly-Kenneth-Wimer, Valendas and cloud have no per-file credit.
    (_TRIXIE, "lxqt-themes", _LXQT + "appleflower.png"),
    (_TRIXIE, "lxqt-themes", _LXQT + "butterfly.png"),
    (_TRIXIE, "lxqt-themes", _LXQT + "flowers.png"),
    (_TRIXIE, "lxqt-themes", _LXQT + "fog.jpg"),
    (_TRIXIE, "lxqt-themes", _LXQT + "this-is-not-windows.jpg"),
    (_BOOKWORM, "mate-backgrounds", _MATE + "Garden.jpg"),
    (_BOOKWORM, "mate-backgrounds", _MATE + "GreenMeadow.jpg"),
    (_BOOKWORM, "mate-backgrounds", _MATE + "LadyBird.jpg"),
    (_BOOKWORM, "mate-backgrounds", _MATE + "RainDrops.jpg"),
    (_BOOKWORM, "mate-backgrounds", _MATE + "TwoWings.jpg"),
    (_BOOKWORM, "mate-backgrounds", _MATE + "YellowFlower.jpg"),
    # palapeli-data: castle-maintenon and panther-chameleon-female are GFDL only.
    (_TRIXIE, "palapeli-data", _PALAPELI + "cincinnati-bridge.jpg"),
    (_TRIXIE, "palapeli-data", _PALAPELI + "citrus-fruits.jpg"),
    (_TRIXIE, "palapeli-data", _PALAPELI + "european-honey-bee.jpg"),
    # plasma-workspace-wallpapers: the 6.x additions are illustrations except Mountain (heavy
    # teal grading, little detail).
    (_BOOKWORM, "plasma-workspace-wallpapers", _PLASMA + "Kite" + _PLASMA_2560),
    (_BOOKWORM, "plasma-workspace-wallpapers", _PLASMA + "OneStandsOut" + _PLASMA_2560),
    (_BOOKWORM, "plasma-workspace-wallpapers", _PLASMA + "Path" + _PLASMA_2560),
    (_BOOKWORM, "plasma-workspace-wallpapers", _PLASMA + "summer_1am" + _PLASMA_2560),
    # scribus-template br2: sunset (oversaturated, noisy), moon (black-and-white) and the eclipse
    # shots left out; cal2/moon is soft, menu2/pizza shows compression artefacts.
    (_TRIXIE, "scribus-template", "usr/share/scribus/templates/br2/nature.jpg"),
    (_TRIXIE, "sddm-theme-maldives", "usr/share/sddm/themes/maldives/background.jpg"),
    # tuxpaint-data templates: burnt_bark and mudstone (close-up textures), jellyfish (dark,
    # soft), sheep (smeared), spiders_web (defocus), sun_behind_clouds (blown, fringing) left
    # out; mossy_bark, trees_above, trees_at_dusk are under 512 px.
    *((_TRIXIE, "tuxpaint-data", f"{_TUX}{name}.jpg") for name in _TUX_TEMPLATES),
)


class BuildError(Exception):
    """A package, file or checksum problem that stops the build; printed as one line."""


@dataclass(frozen=True)
class Row:
    """One manifest row (all fields as text, as in the CSV)."""

    file: str
    package: str
    version: str
    suite: str
    source_path: str
    source_sha256: str
    licence: str
    copyright: str
    width: str
    height: str
    sha256: str


# ---------------------------------------------------------------------------------------------
# Small helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def output_name(package: str, source_path: str) -> str:
    """``<package>--<stem>.png``, ASCII-safe.

    Plasma names its files by resolution (``2560x1600.jpg``), so there the wallpaper's folder name
    is the stem.
    """
    parts = source_path.split("/")
    stem = Path(parts[-1]).stem
    if package == "plasma-workspace-wallpapers" and "contents" in parts:
        stem = parts[parts.index("contents") - 1]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return f"{package}--{safe}.png"


def render_png(data: bytes, max_side: int) -> tuple[bytes, int, int]:
    """Decode ``data``, convert to sRGB RGB, downscale (LANCZOS) to ``max_side``, encode as PNG."""
    with Image.open(io.BytesIO(data)) as opened:
        im = ImageOps.exif_transpose(opened)
    icc = im.info.get("icc_profile")
    if icc:  # convert anything that is not already sRGB; all kept photos are sRGB or untagged
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" not in ImageCms.getProfileDescription(src).lower().replace(" ", ""):
            source = im if im.mode in ("RGB", "CMYK") else im.convert("RGB")
            try:
                converted = ImageCms.profileToProfile(
                    source, src, ImageCms.createProfile("sRGB"), outputMode="RGB"
                )
            except ImageCms.PyCMSError as e:
                raise BuildError(f"cannot convert an embedded ICC profile to sRGB: {e}") from e
            if converted is not None:
                im = converted
    im = im.convert("RGB")
    w, h = im.size
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        im = im.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
        )
    clean = Image.frombytes("RGB", im.size, im.tobytes())  # no ICC/EXIF/text chunks carried over
    buf = io.BytesIO()
    clean.save(buf, format="PNG")
    return buf.getvalue(), clean.width, clean.height


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Debian packages: find them in a suite's index, download and verify them, read them without dpkg


@dataclass(frozen=True)
class PoolEntry:
    """One package version as a suite's ``Packages`` index lists it."""

    package: str
    version: str
    filename: str  # path below the mirror root, e.g. pool/main/k/krank/krank_0.7+dfsg2-5_all.deb
    size: int
    sha256: str


def http_get(url: str) -> bytes:
    """The body of ``url``; BuildError on any network or HTTP failure."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            data: bytes = response.read()
            return data
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise BuildError(f"cannot download {url}: {e}") from e


def release_sha256(release_text: str, name: str) -> str | None:
    """The SHA256 a suite's ``Release`` file records for ``name`` (e.g. ``main/binary-all/...``)."""
    section = re.search(r"^SHA256:\n((?:[ \t].*\n?)*)", release_text, re.MULTILINE)
    if section is None:
        return None
    for line in section.group(1).splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == name:
            return fields[0]
    return None


def parse_packages(text: str) -> dict[str, list[PoolEntry]]:
    """Package name -> its entries in a ``Packages`` index (usually one per name)."""
    entries: dict[str, list[PoolEntry]] = {}
    for para in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+): ?(.*)$", para, re.MULTILINE))
        if {"Package", "Version", "Filename", "Size", "SHA256"} <= fields.keys():
            entry = PoolEntry(
                fields["Package"], fields["Version"], fields["Filename"],
                int(fields["Size"]), fields["SHA256"],
            )  # fmt: skip
            entries.setdefault(entry.package, []).append(entry)
    return entries


class Archive:
    """A Debian mirror: each suite's index is downloaded and verified once per run."""

    def __init__(self, mirror: str) -> None:
        self.mirror = mirror.rstrip("/")
        self._indexes: dict[str, dict[str, list[PoolEntry]]] = {}

    def index(self, suite: str) -> dict[str, list[PoolEntry]]:
        """The suite's package index, checked against the SHA256 in its ``Release`` file.

        Like apt, each index is first asked for by hash (``by-hash/SHA256/...``), which stays
        consistent while a mirror updates, then by name.
        """
        if suite not in self._indexes:
            base = f"{self.mirror}/dists/{suite}"
            release = http_get(f"{base}/Release").decode("utf-8", errors="replace")
            for name in INDEXES:
                expected = release_sha256(release, name)
                if expected is None:
                    continue
                by_hash = f"{name.rsplit('/', 1)[0]}/by-hash/SHA256/{expected}"
                for path in (by_hash, name):
                    try:
                        blob = http_get(f"{base}/{path}")
                    except BuildError:
                        continue
                    if sha256_bytes(blob) == expected:
                        text = lzma.decompress(blob).decode("utf-8", errors="replace")
                        self._indexes[suite] = parse_packages(text)
                        return self._indexes[suite]
            raise BuildError(f"{base}: no package index matches the SHA256 in its Release file")
        return self._indexes[suite]

    def lookup(self, suite: str, package: str, version: str | None) -> PoolEntry | None:
        """The entry of ``package=version`` in ``suite``; with ``version=None``, its newest."""
        found = self.index(suite).get(package, [])
        if version is None:
            return max(found, key=lambda e: debian_version_key(e.version), default=None)
        return next((e for e in found if e.version == version), None)

    def download(self, entry: PoolEntry, debs: Path) -> Path:
        """Download ``entry`` into ``debs`` (apt's file name), checking size and SHA256."""
        data = http_get(f"{self.mirror}/{entry.filename}")
        if len(data) != entry.size or sha256_bytes(data) != entry.sha256:
            raise BuildError(f"{entry.filename}: size or SHA256 differs from the index")
        arch = entry.filename.rsplit("_", 1)[-1]  # e.g. "all.deb"
        path = debs / (deb_filename_prefix(entry.package, entry.version) + arch)
        write_atomic(path, data)
        return path


def debian_version_key(version: str) -> tuple[int | str, ...]:
    """A sort key good enough to pick the newest of a suite's few versions of one package."""
    parts = re.split(r"(\d+)", version.replace("~", "!"))  # text, digits, text, ...
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def deb_filename_prefix(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}_"


def find_deb(debs: Path, package: str, version: str) -> Path | None:
    for path in sorted(debs.glob(deb_filename_prefix(package, version) + "*.deb")):
        control = deb_control(path)
        if control.get("Package") == package and control.get("Version") == version:
            return path
    return None


def fetch_deb(
    debs: Path, archive: Archive, suite: str, package: str, version: str | None
) -> tuple[Path, str]:
    """(cached .deb, its version) of ``package=version`` from ``suite``, downloading if needed.

    ``version=None`` asks for the suite's current version. When ``version`` has left the suite
    (a point release replaced it), the current version is returned instead: the caller accepts
    it only if every file it needs still has its recorded checksum.
    """
    if version is not None and (found := find_deb(debs, package, version)) is not None:
        return found, version
    entry = archive.lookup(suite, package, version)
    if entry is None and version is not None:
        entry = archive.lookup(suite, package, None)
        if entry is not None:
            print(
                f"  note: {package}={version} is no longer in {suite}; using {entry.version} "
                "(accepted only if every file's checksum matches)"
            )
    if entry is None:
        raise BuildError(
            f"cannot fetch {package}={version or '(current)'}: not in {suite} on "
            f"{archive.mirror}; put the .deb, e.g. from snapshot.debian.org, into {debs}"
        )
    found = find_deb(debs, package, entry.version)
    if found is None:
        debs.mkdir(parents=True, exist_ok=True)
        found = archive.download(entry, debs)
    return found, entry.version


def _ar_members(path: Path) -> dict[str, tuple[int, int]]:
    """Name -> (offset, size) of each member of the ar archive a .deb is."""
    members: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise BuildError(f"{path} is not a Debian package (no ar header)")
        while header := f.read(60):
            if len(header) < 60 or header[58:60] != b"`\n":
                raise BuildError(f"{path}: corrupt ar header")
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            members[name] = (f.tell(), size)
            f.seek(size + (size & 1), os.SEEK_CUR)
    return members


def _open_tar(path: Path, prefix: str) -> tarfile.TarFile:
    """Open the ``control.tar.*`` or ``data.tar.*`` member of a .deb as a streaming tar."""
    members = _ar_members(path)
    name = next((m for m in members if m.startswith(prefix + ".tar")), None)
    if name is None:
        raise BuildError(f"{path}: no {prefix}.tar member")
    offset, size = members[name]
    if name.endswith(".zst"):  # not in the standard library: let dpkg-deb decompress
        flag = "--ctrl-tarfile" if prefix == "control" else "--fsys-tarfile"
        raw = subprocess.run(["dpkg-deb", flag, str(path)], capture_output=True, check=True).stdout
        return tarfile.open(fileobj=io.BytesIO(raw), mode="r|")
    with open(path, "rb") as f:
        f.seek(offset)
        blob = f.read(size)
    return tarfile.open(fileobj=io.BytesIO(blob), mode="r|*")  # xz, gz, bz2 or plain


def deb_control(path: Path) -> dict[str, str]:
    """The fields of a .deb's ``control`` file (first line of each field)."""
    with _open_tar(path, "control") as tar:
        for member in tar:
            if member.name.removeprefix("./") == "control" and member.isfile():
                fobj = tar.extractfile(member)
                text = fobj.read().decode("utf-8") if fobj else ""
                return {
                    k: v.strip()
                    for k, v in re.findall(r"^([A-Za-z0-9-]+):(.*)$", text, flags=re.MULTILINE)
                }
    raise BuildError(f"{path}: no control file")


def deb_read(path: Path, wanted: Iterable[str]) -> dict[str, bytes]:
    """Read regular files (paths without a leading ``./``) from a .deb's data archive."""
    want = set(wanted)
    found: dict[str, bytes] = {}
    with _open_tar(path, "data") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name not in want:
                continue
            if not member.isfile():
                raise BuildError(f"{path.name}: {name} is not a regular file (a link?)")
            fobj = tar.extractfile(member)
            found[name] = fobj.read() if fobj else b""
    missing = sorted(want - found.keys())
    if missing:
        raise BuildError(
            f"{path.name}: missing {missing[0]}" + (" ..." if len(missing) > 1 else "")
        )
    return found


# ---------------------------------------------------------------------------------------------
# Licences (curate mode)


def _dep5_regex(pattern: str) -> re.Pattern[str]:
    """DEP-5 ``Files:`` glob: ``*`` and ``?`` match any character, ``/`` included."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    )


def dep5_lookup(copyright_text: str, upstream_path: str) -> tuple[str, str]:
    """(licence, copyright) of the last ``Files:`` stanza matching ``upstream_path``."""
    result: tuple[str, str] | None = None
    for para in re.split(r"\n[ \t]*\n", copyright_text):
        fields: dict[str, list[str]] = {}
        key = None
        for line in para.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m:
                key = m.group(1).lower()
                fields[key] = [m.group(2)]
            elif key and line.startswith((" ", "\t")):
                fields[key].append(line.strip())
        if "files" not in fields:
            continue
        patterns = " ".join(fields["files"]).split()
        if any(_dep5_regex(p).fullmatch(upstream_path) for p in patterns):
            licence = fields.get("license", [""])[0].strip()
            holders = [h for h in fields.get("copyright", []) if h.strip()]
            result = (licence, clean_holders(holders))
    if result is None:
        raise BuildError(f"no debian/copyright stanza covers {upstream_path}")
    return result


def clean_holders(holders: list[str]) -> str:
    """Join copyright lines; drop e-mail addresses and stray marks."""
    out = []
    for h in holders:
        h = re.sub(r"\s*<[^>]*>", "", h).strip().strip("´`").strip()
        if h:
            out.append(h)
    return "; ".join(out)


def plasma_metadata(files: dict[str, bytes], wallpaper_dir: str) -> tuple[str, str]:
    """(licence, author) from a Plasma wallpaper's ``metadata.json`` or ``metadata.desktop``."""
    raw = files.get(wallpaper_dir + "metadata.json")
    if raw is not None:
        plugin = json.loads(raw)["KPlugin"]
        licence = plugin.get("License", "")
        author = ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
    else:
        text = files[wallpaper_dir + "metadata.desktop"].decode("utf-8")
        keys = dict(re.findall(r"^X-KDE-PluginInfo-(License|Author)=(.*)$", text, re.MULTILINE))
        licence, author = keys.get("License", ""), keys.get("Author", "")
    licence = {"LGPLv3": "LGPL-3", "LGPLv2+": "LGPL-2+", "GPLv2+": "GPL-2+"}.get(licence, licence)
    return licence.strip(), author.strip()


def licence_allowed(licence: str) -> bool:
    """True if the licence (or, for ``A or B``, one of the alternatives) is in the policy."""
    return any(ALLOWED_LICENCE.match(alt.strip()) for alt in licence.split(" or "))


def lxqt_credit(files: dict[str, bytes], source_path: str) -> tuple[str, str]:
    """(licence, author) for an LXQt wallpaper named in ``wallpapers/License``'s credits."""
    text = files[LXQT_LICENSE_FILE].decode("utf-8", errors="replace")
    stem = Path(source_path).stem
    name = LXQT_CREDIT_NAME.get(stem, stem)
    for m in re.finditer(r"^(\S+) \([^)]*\)\n(.+);$", text, re.MULTILINE):
        if name in (n.strip() for n in m.group(2).split(",")):
            if "creativecommons.org/licenses/by-sa/3.0" not in text:
                raise BuildError(f"{LXQT_LICENSE_FILE}: no CC-BY-SA-3.0 statement")
            return "CC-BY-SA-3.0", m.group(1)
    raise BuildError(f"lxqt-themes: {source_path} is not credited in {LXQT_LICENSE_FILE}")


def palapeli_credit(files: dict[str, bytes], source_path: str) -> tuple[str, str]:
    """(licence, author) from a Palapeli puzzle's ``.desktop`` file."""
    text = files[str(Path(source_path).with_suffix(".desktop"))].decode("utf-8")
    keys = dict(re.findall(r"^X-KDE-PluginInfo-(License|Author|Website)=(.*)$", text, re.M))
    licence = {"Public Domain": "public-domain"}.get(keys.get("License", ""), keys.get("License"))
    author = keys.get("Author", "") + (f" ({keys['Website']})" if keys.get("Website") else "")
    return licence or "", author


def credit_files(package: str, source_path: str) -> list[str]:
    """Files besides the photo and ``copyright`` that ``licence_of`` reads for ``source_path``."""
    if package == "plasma-workspace-wallpapers":
        return [source_path[: source_path.index("contents/")] + "metadata.json"]
    if package == "lxqt-themes":
        return [LXQT_LICENSE_FILE]
    if package == "palapeli-data":
        return [str(Path(source_path).with_suffix(".desktop"))]
    return []


def licence_of(package: str, source_path: str, files: dict[str, bytes]) -> tuple[str, str]:
    """(licence, copyright) for a kept file, checked against the licence policy."""
    text = files[f"usr/share/doc/{package}/copyright"].decode("utf-8", errors="replace")
    fixed = next(
        (v for (p, prefix), v in FIXED_LICENCE.items()
         if p == package and source_path.startswith(prefix)),
        None,
    )  # fmt: skip
    if fixed is not None:
        phrases, licence, holders = fixed
        missing = [ph for ph in phrases if ph not in " ".join(text.split())]
        if missing:
            raise BuildError(f"{package}: copyright file lacks {missing[0]!r}")
        return licence, holders
    prefix, upstream = UPSTREAM_PREFIX[package]
    if not source_path.startswith(prefix):
        raise BuildError(f"{package}: {source_path} is outside {prefix}")
    licence, holders = dep5_lookup(text, upstream + source_path[len(prefix) :])
    primary = licence
    credit = {
        "plasma-workspace-wallpapers": lambda: plasma_metadata(
            files, source_path[: source_path.index("contents/")]
        ),
        "lxqt-themes": lambda: lxqt_credit(files, source_path),
        "palapeli-data": lambda: palapeli_credit(files, source_path),
    }.get(package)
    if credit is not None:
        primary, author = credit()
        where = {"lxqt-themes": "wallpapers/License"}.get(
            package, Path(credit_files(package, source_path)[0]).name
        )
        licence = f"{primary} [{where}; debian/copyright: {licence}]"
        holders = f"{author}; {holders}"
    if not licence_allowed(primary):
        raise BuildError(f"{package}: {source_path}: licence {primary!r} is outside the policy")
    return licence, holders


# ---------------------------------------------------------------------------------------------
# Manifest


def read_manifest(path: Path) -> list[Row]:
    if not path.is_file():
        raise BuildError(f"manifest not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise BuildError(f"{path}: columns are {reader.fieldnames}, expected {list(COLUMNS)}")
        rows = [Row(**r) for r in reader]
    names = [r.file for r in rows]
    if len(set(names)) != len(names):
        raise BuildError(f"{path}: duplicate file names")
    for r in rows:
        if Path(r.source_path).name.startswith("live-"):
            raise BuildError(f"{path}: {r.source_path}: LIVE images are research-only")
    return rows


def write_manifest(path: Path, rows: list[Row]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in sorted(rows, key=lambda r: r.file):
        writer.writerow([getattr(r, c) for c in COLUMNS])
    write_atomic(path, buf.getvalue().encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# The two modes


def read_sources(
    todo: list[Row], debs: Path, archive: Archive, kodak: Path | None
) -> dict[str, bytes]:
    """Output file name -> source bytes for ``todo``, one pass over each package."""
    sources: dict[str, bytes] = {}
    by_package: dict[tuple[str, str, str], list[Row]] = {}
    for r in todo:
        by_package.setdefault((r.suite, r.package, r.version), []).append(r)
    for (suite, package, version), group in sorted(by_package.items()):
        if package == KODAK_PACKAGE:
            assert kodak is not None
            for r in group:
                src = kodak / r.source_path
                if not src.is_file():
                    raise BuildError(f"Kodak image not found: {src}")
                sources[r.file] = src.read_bytes()
            continue
        if not suite:
            raise BuildError(f"{package}={version}: the manifest names no suite")
        deb, _ = fetch_deb(debs, archive, suite, package, version)
        print(f"  {deb.name} ({suite}): reading {len(group)} file(s)")
        files = deb_read(deb, (r.source_path for r in group))
        for r in group:
            sources[r.file] = files[r.source_path]
    return sources


def rebuild(
    manifest: Path,
    out: Path,
    debs: Path,
    archive: Archive,
    max_side: int,
    kodak: Path | None,
    strict: bool,
) -> int:
    all_rows = read_manifest(manifest)
    rows = [r for r in all_rows if kodak is not None or r.package != KODAK_PACKAGE]
    compare = max_side == MANIFEST_MAX_SIDE
    todo = [
        r
        for r in rows
        if not (compare and (out / r.file).is_file() and sha256_file(out / r.file) == r.sha256)
    ]
    print(f"{len(rows)} photos in the manifest, {len(rows) - len(todo)} already up to date")
    sources = read_sources(todo, debs, archive, kodak)
    for r in todo:  # verify every source before writing anything
        got = sha256_bytes(sources[r.file])
        if got != r.source_sha256:
            raise BuildError(
                f"checksum differs for {r.package}={r.version} ({r.suite}):{r.source_path} "
                f"(got {got[:16]}..., manifest {r.source_sha256[:16]}...)"
            )
    mismatched: list[str] = []
    for r in todo:
        png, w, h = render_png(sources.pop(r.file), max_side)
        write_atomic(out / r.file, png)
        if compare and (str(w), str(h), sha256_bytes(png)) != (r.width, r.height, r.sha256):
            mismatched.append(r.file)

    extra = sorted(p.name for p in out.glob("*.png") if p.name not in {r.file for r in all_rows})
    if extra:
        print(f"note: {len(extra)} file(s) in {out} not in the manifest, e.g. {extra[0]}")
    if mismatched:
        msg = (
            f"{len(mismatched)} output(s) differ from the manifest's sha256/size (e.g. "
            f"{mismatched[0]}): a different Pillow/zlib/libjpeg encodes differently"
        )
        if strict:
            raise BuildError(msg)
        print(f"warning: {msg}", file=sys.stderr)
    print(f"wrote {len(todo)} photo(s); {out} holds the manifest's {len(rows)} photos")
    return 0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def curate(manifest: Path, out: Path, debs: Path, archive: Archive, kodak: Path | None) -> int:
    """Make the manifest from ``KEEP`` with each suite's current packages (and Kodak if given)."""
    rows: list[Row] = []
    for suite, package in sorted({(s, p) for s, p, _ in KEEP}):
        deb, version = fetch_deb(debs, archive, suite, package, None)
        paths = [path for s, p, path in KEEP if (s, p) == (suite, package)]
        extra = {f"usr/share/doc/{package}/copyright"}
        for path in paths:
            extra.update(credit_files(package, path))
        files = deb_read(deb, [*paths, *sorted(extra)])
        print(f"  {deb.name} ({suite}): {len(paths)} photo(s)")
        for source_path in paths:
            data = files[source_path]
            with Image.open(io.BytesIO(data)) as im:
                if min(im.size) < MIN_SHORT_SIDE:
                    raise BuildError(f"{package}: {source_path} is smaller than {MIN_SHORT_SIDE}px")
            licence, holders = licence_of(package, source_path, files)
            rows.append(make_row(package, version, suite, source_path, data, licence, holders, out))
    if kodak is not None:
        for name in KODAK_NAMES:
            data = (kodak / name).read_bytes()
            rows.append(
                make_row(KODAK_PACKAGE, "", "", name, data, KODAK_LICENCE, KODAK_COPYRIGHT, out)
            )
    names = [r.file for r in rows]
    if len(set(names)) != len(names):
        raise BuildError("two kept photos map to the same output name")
    write_manifest(manifest, rows)
    print(f"wrote {manifest} ({len(rows)} rows) and the photos in {out}")
    return 0


def make_row(
    package: str,
    version: str,
    suite: str,
    source_path: str,
    data: bytes,
    licence: str,
    holders: str,
    out: Path,
) -> Row:
    name = (
        f"{KODAK_PACKAGE}--{Path(source_path).stem}.png"
        if package == KODAK_PACKAGE
        else output_name(package, source_path)
    )
    png, w, h = render_png(data, MANIFEST_MAX_SIDE)
    write_atomic(out / name, png)
    return Row(
        file=name, package=package, version=version, suite=suite, source_path=source_path,
        source_sha256=sha256_bytes(data), licence=licence, copyright=holders,
        width=str(w), height=str(h), sha256=sha256_bytes(png),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build data/pristine-open/ (openly licensed pristine photos) from Debian "
        "packages, as listed in data/pristine-open-manifest.csv.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--rebuild", action="store_true", help="rebuild the folder from the manifest (default)"
    )
    mode.add_argument(
        "--curate", action="store_true", help="re-create the manifest from the KEEP list"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="manifest CSV")
    parser.add_argument("--debs", type=Path, default=DEFAULT_DEBS, help=".deb cache folder")
    parser.add_argument(
        "--mirror", default=DEFAULT_MIRROR, help=f"Debian mirror URL (default {DEFAULT_MIRROR})"
    )
    parser.add_argument(
        "--max-side", type=int, default=MANIFEST_MAX_SIDE, help="longest output side in pixels"
    )
    parser.add_argument(
        "--kodak", type=Path, default=None, help="folder with kodim01.png..kodim24.png to add"
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail when an output's sha256 differs"
    )
    args = parser.parse_args(argv)
    if args.max_side < 1:
        parser.error("--max-side must be positive")
    if args.curate and args.max_side != MANIFEST_MAX_SIDE:
        parser.error(f"--curate records outputs at --max-side {MANIFEST_MAX_SIDE}")
    archive = Archive(args.mirror)
    start = time.perf_counter()
    try:
        if args.curate:
            status = curate(args.manifest, args.out, args.debs, archive, args.kodak)
        else:
            status = rebuild(
                args.manifest, args.out, args.debs, archive, args.max_side, args.kodak,
                args.strict,
            )  # fmt: skip
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
