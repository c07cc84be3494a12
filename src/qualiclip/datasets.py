"""Readers for human-rated IQA datasets in the layouts their authors distribute.

Each reader takes the dataset's root folder and returns a :class:`Dataset`: ``(image_path, mos)``
items plus what the scores mean. Readers never check that images exist or decode: a missing or
broken image reaches the scorer, which reports it as a failed row, so it is counted and listed
rather than silently dropped.

Layouts (the files as downloaded; column names as in the files; sources in each reader):

- ``clive``: ``Data/AllImages_release.mat`` + ``Data/AllMOS_release.mat``; ``Images/``; MOS 0-100.
- ``koniq``: ``koniq10k_scores_and_distributions.csv``; ``1024x768/`` or ``512x384/``; MOS 1-5.
- ``spaq``: ``Annotations/MOS and Image attribute scores.xlsx``; ``TestImage/``; MOS 0-100.
- ``kadid``: ``dmos.csv`` (dist_img, ref_img, dmos, var); ``images/``; 1-5, higher is better.
- ``tid2013``: ``mos_with_names.txt`` ("score name" lines); ``distorted_images/``; MOS 0-9.
- ``biq2021``: ``mos.csv`` (Image Name, MOS); ``images/``; MOS 0-1.
- ``agiqa3k``: ``data.csv`` (name, mos_quality, ...); ``AGIQA-3K/`` or ``images/``; MOS 0-5.
- ``csv``: any CSV with a path and a score column; paths relative to the CSV or to ``root``.

Example:
    >>> ds = load_dataset("biq2021", "/data/biq2021-test")            # doctest: +SKIP
    >>> ds.info.higher_is_better, len(ds.items)                         # doctest: +SKIP
    (True, 2000)
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qualiclip.inputs import IMAGE_EXTENSIONS

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset's scores mean.

    Attributes:
        name: short name (as ``--dataset`` takes it).
        score_range: nominal range of the opinion scores.
        higher_is_better: False for DMOS-style labels.
        citation: where the dataset comes from.
    """

    name: str
    score_range: tuple[float, float]
    higher_is_better: bool
    citation: str = ""


@dataclass(frozen=True)
class Dataset:
    """A human-rated dataset: ``(image_path, mos)`` items and their :class:`DatasetInfo`."""

    info: DatasetInfo
    items: tuple[tuple[Path, float], ...]

    def head(self, n: int | None) -> Dataset:
        """The first ``n`` items in the metadata's order (all when ``n`` is None)."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"limit must be >= 1, got {n}")
        return replace(self, items=self.items[:n])


def _float(value: object, where: str) -> float:
    """A label: a finite number, or a ``ValueError`` naming the row (checked before scoring,
    so a bad label stops the run before its first image, not after its last)."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{where}: score {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: score {text!r} is not a finite number")
    return number


def _fields(row: list[str], needed: int, where: str) -> list[str]:
    """``row`` when it has at least ``needed`` fields; else a ``ValueError`` naming the row."""
    if len(row) < needed:
        have = "field" if len(row) == 1 else "fields"
        raise ValueError(f"{where}: {len(row)} {have}, the header names {needed} columns "
                         f"needed here ({row!r})")
    return row


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    return path


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, str, str]]:
    """``(row number, first, second)`` of two named columns of a CSV with a header (headers
    matched case-insensitively); a row too short for them is refused, naming it."""
    with open(_require(path), newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        want = [c.lower() for c in columns]
        missing = [c for c in want if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        i, j = (header.index(c) for c in want)
        rows = []
        for row in reader:
            if row and any(c.strip() for c in row):
                row = _fields(row, max(i, j) + 1, f"{path} row {reader.line_num}")
                rows.append((reader.line_num, row[i].strip(), row[j]))
        return rows


def _first_dir(root: Path, names: Sequence[str]) -> Path:
    """The first of ``root/name`` that exists, else the first candidate (failures then report)."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root / names[0]


def _resolve(folder: Path, name: str) -> Path:
    """``folder/name``, or a file whose name differs only by case or image extension."""
    path = folder / name
    if path.exists() or not folder.is_dir():
        return path
    stem = Path(name).stem.lower()
    for cand in folder.iterdir():
        if cand.name.lower() == name.lower():
            return cand
        if cand.stem.lower() == stem and cand.suffix.lower() in IMAGE_EXTENSIONS:
            return cand
    return path


def _items(folder: Path, rows: Sequence[tuple[int, str, str]], where: Path) -> tuple:
    return tuple(
        (folder / name, _float(score, f"{where} row {line}")) for line, name, score in rows
    )


def read_clive(root: PathLike) -> Dataset:
    """LIVE In the Wild Image Quality Challenge (D. Ghadiyaram, A. C. Bovik, IEEE TIP 2016).

    ``Data/AllImages_release.mat`` (variable ``AllImages_release``, a cell array of file names) and
    ``Data/AllMOS_release.mat`` (``AllMOS_release``, 1 x 1169); images in ``Images/``. The first
    7 entries (``t1.bmp`` .. ``t7.bmp``) are the raters' training images and are dropped, as in
    the database's own readme and pyiqa's meta-info (1162 images remain).
    """
    from scipy import io as sio

    root = Path(root)
    names_mat = sio.loadmat(str(_require(root / "Data" / "AllImages_release.mat")))
    mos_mat = sio.loadmat(str(_require(root / "Data" / "AllMOS_release.mat")))
    names = [str(n.ravel()[0]) for n in names_mat["AllImages_release"].ravel()]
    mos = [_float(v, f"AllMOS_release.mat entry {k + 1}")
           for k, v in enumerate(mos_mat["AllMOS_release"].ravel())]
    if len(names) != len(mos):
        raise ValueError(f"CLIVE: {len(names)} names but {len(mos)} scores")
    items = tuple((root / "Images" / n, m) for n, m in zip(names[7:], mos[7:], strict=True))
    info = DatasetInfo("clive", (0.0, 100.0), True, "Ghadiyaram & Bovik, IEEE TIP 25(1), 2016")
    return Dataset(info, items)


def read_koniq(root: PathLike) -> Dataset:
    """KonIQ-10k (V. Hosu, H. Lin, T. Sziranyi, D. Saupe, IEEE TIP 2020).

    ``koniq10k_scores_and_distributions.csv`` (columns ``image_name``, ``c1``..``c5``,
    ``c_total``, ``MOS`` on 1-5, ``SD``, ``MOS_zscore``); images in ``1024x768/`` (full size, as
    released) or ``512x384/`` (the half-size release), whichever is present.
    """
    root = Path(root)
    meta = root / "koniq10k_scores_and_distributions.csv"
    rows = _read_csv(meta, ("image_name", "MOS"))
    folder = _first_dir(root, ("1024x768", "512x384"))
    info = DatasetInfo("koniq", (1.0, 5.0), True, "Hosu et al., IEEE TIP 29, 2020")
    return Dataset(info, _items(folder, rows, meta))


def read_spaq(root: PathLike) -> Dataset:
    """SPAQ, smartphone photography (Y. Fang, H. Zhu, Y. Zeng, K. Ma, Z. Wang, CVPR 2020).

    ``Annotations/MOS and Image attribute scores.xlsx`` (first sheet; columns ``Image name``,
    ``MOS`` on 0-100, then the five attribute scores); images ``TestImage/00001.jpg`` ..
    ``11125.jpg`` at full camera resolution. Names are matched ignoring case and extension.
    Needs ``openpyxl`` (the ``eval`` extra).
    """
    root = Path(root)
    meta = _require(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    try:
        import openpyxl
    except ImportError:
        raise ImportError(
            "reading SPAQ's .xlsx needs openpyxl: pip install 'qualiclip[eval]'"
        ) from None
    wb = openpyxl.load_workbook(meta, read_only=True, data_only=True)
    try:
        rows = list(wb.worksheets[0].iter_rows(values_only=True))
    finally:
        wb.close()
    if not rows:
        raise ValueError(f"{meta}: the first sheet is empty")
    header = [str(c).strip().lower() if c is not None else "" for c in rows[0]]
    if "image name" not in header or "mos" not in header:
        raise ValueError(f"{meta}: expected columns 'Image name' and 'MOS', found {header}")
    i, j = header.index("image name"), header.index("mos")
    folder = root / "TestImage"
    items = tuple(
        (_resolve(folder, str(r[i]).strip()), _float(r[j], f"{meta} row {k + 2}"))
        for k, r in enumerate(rows[1:])
        if r and r[i] is not None
    )
    info = DatasetInfo("spaq", (0.0, 100.0), True, "Fang et al., CVPR 2020")
    return Dataset(info, items)


def read_kadid(root: PathLike) -> Dataset:
    """KADID-10k (H. Lin, V. Hosu, D. Saupe, QoMEX 2019).

    ``dmos.csv`` (``dist_img,ref_img,dmos,var``); images in ``images/``. Despite its name the
    ``dmos`` column is **higher-is-better**: raters compared each distorted image with its
    reference on a 5-point scale from "imperceptible" (5) to "very annoying" (1), so it behaves
    as a MOS in 1-5 (pyiqa's ``dataset_info`` lists KADID as ``mos_type: "mos"``, range 1-5).
    """
    root = Path(root)
    meta = root / "dmos.csv"
    rows = _read_csv(meta, ("dist_img", "dmos"))
    info = DatasetInfo("kadid", (1.0, 5.0), True, "Lin, Hosu & Saupe, QoMEX 2019")
    return Dataset(info, _items(root / "images", rows, meta))


def read_tid2013(root: PathLike) -> Dataset:
    """TID2013 (N. Ponomarenko et al., Signal Processing: Image Communication 30, 2015).

    ``mos_with_names.txt``: one ``score name`` pair per line (MOS in 0-9, higher is better);
    images in ``distorted_images/``. Names are matched ignoring case, since the release mixes
    ``i25_...`` in the list with ``I25_...`` file names on some copies.
    """
    root = Path(root)
    meta = _require(root / "mos_with_names.txt")
    folder = root / "distorted_images"
    items = []
    for k, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines()):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{meta} line {k + 1}: expected 'score name', got {line!r}")
        items.append((_resolve(folder, parts[1]), _float(parts[0], f"{meta} line {k + 1}")))
    info = DatasetInfo("tid2013", (0.0, 9.0), True, "Ponomarenko et al., SP:IC 30, 2015")
    return Dataset(info, tuple(items))


def read_biq2021(root: PathLike) -> Dataset:
    """BIQ2021 (N. Ahmed, H. M. S. Asif, J. Electronic Imaging 31(5) 053010, 2022).

    ``mos.csv`` (``Image Name,MOS``; MOS in [0, 1]); images in ``images/``. File names contain
    spaces and parentheses (``ss03 (7805).jpg``) and are used verbatim.
    """
    root = Path(root)
    meta = root / "mos.csv"
    rows = _read_csv(meta, ("Image Name", "MOS"))
    info = DatasetInfo("biq2021", (0.0, 1.0), True, "Ahmed & Asif, J. Electron. Imaging 2022")
    return Dataset(info, _items(root / "images", rows, meta))


def read_agiqa3k(root: PathLike) -> Dataset:
    """AGIQA-3K, AI-generated images (C. Li et al., IEEE TCSVT 2023).

    ``data.csv`` (``name, prompt, adj1, adj2, style, mos_quality, std_quality, mos_align,
    std_align``); the perceptual-quality score is ``mos_quality`` (0-5). Images sit in
    ``AGIQA-3K/`` (the archive's folder), ``images/``, or beside ``data.csv``.
    """
    root = Path(root)
    meta = root / "data.csv"
    rows = _read_csv(meta, ("name", "mos_quality"))
    folder = _first_dir(root, ("AGIQA-3K", "images", "."))
    info = DatasetInfo("agiqa3k", (0.0, 5.0), True, "Li et al., IEEE TCSVT 2023")
    return Dataset(info, _items(folder, rows, meta))


_PATH_COLUMNS = ("path", "image", "image_path", "image_name", "name", "filename", "file")
_SCORE_COLUMNS = ("score", "mos", "dmos", "quality", "label")


def read_csv(
    csv_path: PathLike, root: PathLike | None = None, *, higher_is_better: bool = True
) -> Dataset:
    """A generic ``path,score`` CSV.

    With a header, the path column is the first of ``path, image, image_path, image_name, name,
    filename, file`` and the score column the first of ``score, mos, dmos, quality, label``
    (case-insensitive); without one (the first row's second field is a number), the first two
    columns. Relative paths are taken from ``root`` when given, else from the CSV's folder.

    Args:
        csv_path: the CSV file.
        root: base folder of relative image paths.
        higher_is_better: False when the scores are DMOS-like.
    """
    csv_path = _require(Path(csv_path))
    base = Path(root) if root is not None else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)  # line_num: the row number a person sees in the file
        numbered = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    if not numbered:
        raise ValueError(f"{csv_path}: no rows")
    rows = [r for _, r in numbered]
    try:
        float(rows[0][1])
        i, j, body = 0, 1, numbered
    except (ValueError, IndexError):
        header = [h.strip().lower() for h in rows[0]]
        i = next((header.index(c) for c in _PATH_COLUMNS if c in header), -1)
        j = next((header.index(c) for c in _SCORE_COLUMNS if c in header), -1)
        if i < 0 or j < 0:
            raise ValueError(
                f"{csv_path}: need a path column ({', '.join(_PATH_COLUMNS)}) and a score "
                f"column ({', '.join(_SCORE_COLUMNS)}); header is {header}"
            ) from None
        body = numbered[1:]
    items = []
    for line, r in body:
        where = f"{csv_path} row {line}"
        r = _fields(r, max(i, j) + 1, where)
        items.append((base / r[i].strip(), _float(r[j], where)))
    info = DatasetInfo(csv_path.stem, (float("nan"), float("nan")), higher_is_better, str(csv_path))
    return Dataset(info, tuple(items))


READERS: dict[str, Callable[[PathLike], Dataset]] = {
    "clive": read_clive,
    "koniq": read_koniq,
    "spaq": read_spaq,
    "kadid": read_kadid,
    "tid2013": read_tid2013,
    "biq2021": read_biq2021,
    "agiqa3k": read_agiqa3k,
}
ALIASES = {"livec": "clive", "koniq10k": "koniq", "kadid10k": "kadid", "tid": "tid2013",
           "agiqa-3k": "agiqa3k", "agiqa": "agiqa3k"}


def load_dataset(
    name: str, root: PathLike | None = None, *, higher_is_better: bool = True
) -> Dataset:
    """Read a dataset by name (see :data:`READERS`), or a generic CSV.

    Args:
        name: a name of :data:`READERS` (or an alias such as ``livec``, ``koniq10k``); ``"csv"``
            with ``root`` the CSV file; or the path of a ``.csv`` file, with ``root`` (optional)
            the base of its relative image paths.
        root: the dataset folder.
        higher_is_better: for a generic CSV, False when its scores are DMOS-like (the named
            datasets know their own direction).

    Raises:
        ValueError: for an unknown name, listing the valid ones.
        FileNotFoundError: when the metadata file is missing.
    """
    dataset = _load(name, root, higher_is_better)
    _warn_duplicates(dataset)
    return dataset


def _warn_duplicates(dataset: Dataset) -> None:
    """Say when an image is listed more than once: each listing is scored and counted."""
    counts = Counter(os.path.normcase(os.path.abspath(p)) for p, _ in dataset.items)
    twice = [p for p, n in counts.items() if n > 1]
    if twice:
        shown = ", ".join(os.path.basename(p) for p in twice[:5])
        more = f" and {len(twice) - 5} more" if len(twice) > 5 else ""
        noun = "image" if len(twice) == 1 else "images"
        warnings.warn(
            f"{dataset.info.name}: {len(twice)} {noun} listed more than once ({shown}{more}); "
            "each listing is scored and counted in the correlations", UserWarning, stacklevel=3,
        )


def _load(name: str, root: PathLike | None, higher_is_better: bool) -> Dataset:
    if name.lower().endswith(".csv"):
        return read_csv(name, root, higher_is_better=higher_is_better)
    key = ALIASES.get(name.lower(), name.lower())
    if key == "csv":
        if root is None:
            raise ValueError("--dataset csv needs --root pointing at the CSV file")
        return read_csv(root, higher_is_better=higher_is_better)
    if key not in READERS:
        raise ValueError(
            f"unknown dataset {name!r}; choose from {', '.join(READERS)}, 'csv', a .csv file, "
            "or 'synthetic'"
        )
    if root is None:
        raise ValueError(f"dataset {name!r} needs --root (the folder holding its files)")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    return READERS[key](root)
