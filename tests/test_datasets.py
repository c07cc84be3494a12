"""Each reader on a tiny fixture in its dataset's real layout, built here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import io as sio

from qualiclip import datasets as D


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    return path


def _check(ds: D.Dataset, expected: list[tuple[Path, float]]) -> None:
    assert [(Path(p), m) for p, m in ds.items] == expected
    assert all(Path(p).is_file() for p, _ in ds.items)


def test_clive_drops_the_seven_training_images(tmp_path: Path) -> None:
    names = [f"t{i}.bmp" for i in range(1, 8)] + ["10.JPG", "1000.JPG"]
    mos = [50.0] * 7 + [63.9, 12.5]
    cell = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        cell[i, 0] = np.array([n])
    (tmp_path / "Data").mkdir()
    sio.savemat(tmp_path / "Data" / "AllImages_release.mat", {"AllImages_release": cell})
    sio.savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos])})
    for n in names:
        _png(tmp_path / "Images" / n)
    ds = D.load_dataset("clive", tmp_path)
    _check(ds, [(tmp_path / "Images" / "10.JPG", 63.9), (tmp_path / "Images" / "1000.JPG", 12.5)])
    assert ds.info.higher_is_better


def test_koniq_prefers_full_size_folder(tmp_path: Path) -> None:
    (tmp_path / "koniq10k_scores_and_distributions.csv").write_text(
        '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"\n'
        '"10004473376.jpg",0,0,25,73,7,105,3.828571,0.527,77.383\n'
        '"10007357496.jpg",0,3,45,47,6,101,3.553,0.63,69.18\n'
    )
    for n in ("10004473376.jpg", "10007357496.jpg"):
        _png(tmp_path / "512x384" / n)
    ds = D.load_dataset("koniq10k", tmp_path)
    _check(ds, [(tmp_path / "512x384" / "10004473376.jpg", 3.828571),
                (tmp_path / "512x384" / "10007357496.jpg", 3.553)])
    _png(tmp_path / "1024x768" / "x.png")
    assert D.load_dataset("koniq", tmp_path).items[0][0].parent.name == "1024x768"


def test_spaq_xlsx(tmp_path: Path) -> None:
    openpyxl = pytest.importorskip("openpyxl", reason="SPAQ's .xlsx needs the 'eval' extra")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness",
               "Sharpness"])
    ws.append(["00001.png", 42.5, 40, 38, 41, 50, 44])  # listed as .png, stored as .jpg
    ws.append(["00002.jpg", 71.0, 70, 69, 72, 66, 73])
    (tmp_path / "Annotations").mkdir()
    wb.save(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx")
    _png(tmp_path / "TestImage" / "00001.jpg")
    _png(tmp_path / "TestImage" / "00002.jpg")
    ds = D.load_dataset("spaq", tmp_path)
    _check(ds, [(tmp_path / "TestImage" / "00001.jpg", 42.5),
                (tmp_path / "TestImage" / "00002.jpg", 71.0)])


def test_kadid_dmos_column_is_higher_better(tmp_path: Path) -> None:
    (tmp_path / "dmos.csv").write_text(
        "dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.496\n"
        "I01_01_05.png,I01.png,2.1,0.59\n"
    )
    for n in ("I01_01_01.png", "I01_01_05.png"):
        _png(tmp_path / "images" / n)
    ds = D.load_dataset("kadid", tmp_path)
    _check(ds, [(tmp_path / "images" / "I01_01_01.png", 4.57),
                (tmp_path / "images" / "I01_01_05.png", 2.1)])
    assert ds.info.higher_is_better and ds.info.score_range == (1.0, 5.0)


def test_tid2013_matches_names_ignoring_case(tmp_path: Path) -> None:
    (tmp_path / "mos_with_names.txt").write_text("5.51429 i01_01_1.bmp\n3.21 i25_24_5.bmp\n\n")
    _png(tmp_path / "distorted_images" / "i01_01_1.bmp")
    _png(tmp_path / "distorted_images" / "I25_24_5.BMP")
    ds = D.load_dataset("tid2013", tmp_path)
    _check(ds, [(tmp_path / "distorted_images" / "i01_01_1.bmp", 5.51429),
                (tmp_path / "distorted_images" / "I25_24_5.BMP", 3.21)])


def test_biq2021_names_with_spaces_and_parentheses(tmp_path: Path) -> None:
    (tmp_path / "mos.csv").write_text("Image Name,MOS\nss03 (7805).jpg,0.7321\nss01 (1).jpg,0.1\n")
    for n in ("ss03 (7805).jpg", "ss01 (1).jpg"):
        _png(tmp_path / "images" / n)
    ds = D.load_dataset("biq2021", tmp_path)
    _check(ds, [(tmp_path / "images" / "ss03 (7805).jpg", 0.7321),
                (tmp_path / "images" / "ss01 (1).jpg", 0.1)])
    assert len(ds.head(1).items) == 1


def test_agiqa3k(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(
        "name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align\n"
        'AttnGAN_normal_000.jpg,"a cat, sitting",,,normal,1.2352,0.5,1.8,0.6\n'
    )
    _png(tmp_path / "AGIQA-3K" / "AttnGAN_normal_000.jpg")
    ds = D.load_dataset("agiqa3k", tmp_path)
    _check(ds, [(tmp_path / "AGIQA-3K" / "AttnGAN_normal_000.jpg", 1.2352)])


def test_generic_csv_header_or_not_and_root(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b c.png")
    (tmp_path / "h.csv").write_text("image,mos\na.png,3\nsub/b c.png,4.5\n")
    (tmp_path / "n.csv").write_text("a.png,3\nsub/b c.png,4.5\n")
    expected = [(tmp_path / "a.png", 3.0), (tmp_path / "sub" / "b c.png", 4.5)]
    _check(D.load_dataset(str(tmp_path / "h.csv")), expected)
    _check(D.load_dataset("csv", tmp_path / "n.csv"), expected)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x.csv").write_text("path,score\na.png,1\nsub/b c.png,2\n")
    ds = D.read_csv(other / "x.csv", tmp_path, higher_is_better=False)
    assert ds.items[0][0] == tmp_path / "a.png" and not ds.info.higher_is_better


def test_missing_images_are_kept_for_the_scorer_to_report(tmp_path: Path) -> None:
    (tmp_path / "mos.csv").write_text("Image Name,MOS\ngone.jpg,0.5\n")
    (ds_item,) = D.load_dataset("biq2021", tmp_path).items
    assert not os.path.exists(ds_item[0])


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'flive'.*koniq"):
        D.load_dataset("flive", tmp_path)
    with pytest.raises(FileNotFoundError, match="mos.csv"):
        D.load_dataset("biq2021", tmp_path)
    (tmp_path / "mos.csv").write_text("Image Name,MOS\na.jpg,good\n")
    with pytest.raises(ValueError, match="row 2: score 'good'"):
        D.load_dataset("biq2021", tmp_path)
    (tmp_path / "dmos.csv").write_text("dist,ref\n")
    with pytest.raises(ValueError, match="missing column"):
        D.load_dataset("kadid", tmp_path)


# --- labels checked before anything is scored (hostile input, round 3) ---------------------------


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_scores_are_refused_naming_the_row(tmp_path: Path, bad: str) -> None:
    csv_path = tmp_path / "rated.csv"
    csv_path.write_text(f"path,score\na.png,3.5\nb.png,{bad}\nc.png,1\n")
    with pytest.raises(ValueError, match=rf"rated.csv row 3: score '{bad}' is not a finite number"):
        D.load_dataset(str(csv_path))
    (tmp_path / "mos.csv").write_text(f"Image Name,MOS\na.png,0.5\nb.png,{bad}\n")
    with pytest.raises(ValueError, match=r"mos.csv row 3: .* not a finite number"):
        D.load_dataset("biq2021", tmp_path)


def test_short_rows_are_refused_naming_the_row(tmp_path: Path) -> None:
    (tmp_path / "mos.csv").write_text("Image Name,MOS\na.png,0.5\nb.png\n")
    with pytest.raises(ValueError, match=r"mos.csv row 3: 1 field"):
        D.load_dataset("biq2021", tmp_path)
    csv_path = tmp_path / "rated.csv"
    csv_path.write_text("score,path\n0.5,a.png\n0.7\n")
    with pytest.raises(ValueError, match=r"rated.csv row 3: 1 field"):
        D.read_csv(csv_path)


def test_duplicate_paths_are_warned_about(tmp_path: Path) -> None:
    csv_path = tmp_path / "rated.csv"
    csv_path.write_text("path,score\na.png,1\nb.png,2\na.png,3\nc.png,4\n")
    with pytest.warns(UserWarning, match=r"1 image listed more than once .*a\.png"):
        ds = D.load_dataset(str(csv_path))
    assert len(ds.items) == 4  # kept, as listed: the warning says how they count
