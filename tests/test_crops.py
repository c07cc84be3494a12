"""Tests for qualiclip.crops: crop geometry, determinism, small images, sampler splits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qualiclip.crops import (
    EpochSampler,
    PristineCropPairs,
    crop_iou,
    find_images,
    sample_crop_pair,
    scan_images,
    split_every_kth,
)
from qualiclip.images import ImageDecodeError


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for n, (h, w) in enumerate([(120, 160), (100, 100), (90, 200), (40, 60)]):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"img{n}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_crop_iou_hand_cases() -> None:
    assert crop_iou((0, 0), (0, 0), 10) == 1.0
    assert crop_iou((0, 0), (0, 10), 10) == 0.0
    # Shift by 5 on one axis: I = 50, U = 150.
    assert crop_iou((0, 0), (5, 0), 10) == pytest.approx(50 / 150)


@pytest.mark.parametrize("min_overlap", [0.0, 0.3, 0.5, 0.8])
def test_crop_pairs_respect_bounds_and_overlap(min_overlap: float) -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = int(rng.integers(64, 200)), int(rng.integers(64, 200))
        a, b = sample_crop_pair(h, w, 64, min_overlap, rng)
        for top, left in (a, b):
            assert 0 <= top <= h - 64 and 0 <= left <= w - 64
        assert crop_iou(a, b, 64) >= min_overlap


def test_crops_are_not_always_identical() -> None:
    rng = np.random.default_rng(2)
    pairs = [sample_crop_pair(300, 300, 64, 0.5, rng) for _ in range(50)]
    assert any(a != b for a, b in pairs)


def test_find_images_and_split(folder: Path) -> None:
    paths = find_images(folder)
    assert [p.name for p in paths] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    train, val = split_every_kth(paths, 2)
    assert [p.name for p in val] == ["img1.png", "img3.png"]
    assert [p.name for p in train] == ["img0.png", "img2.png"]
    listing = folder / "list.txt"
    listing.write_text("img2.png\n# comment\nimg0.png\n")
    assert [p.name for p in find_images(listing)] == ["img0.png", "img2.png"]
    with pytest.raises(ValueError):
        find_images(folder / "missing")


def test_samples_depend_only_on_seed_epoch_index(folder: Path) -> None:
    paths = find_images(folder)
    a = PristineCropPairs(paths, 32, seed=7)
    b = PristineCropPairs(paths, 32, seed=7)
    x = a[(2, 3)]["crops"]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, b[(2, 3)]["crops"])
    # Other epoch or seed: other crops (the image is noise, so equal crops mean equal positions).
    assert not torch.equal(x, a[(2, 4)]["crops"])
    assert not torch.equal(x, PristineCropPairs(paths, 32, seed=8)[(2, 3)]["crops"])


def test_crops_come_from_the_image(folder: Path) -> None:
    paths = find_images(folder)
    ds = PristineCropPairs(paths, 32, seed=0, min_overlap=0.5)
    arr = torch.from_numpy(np.array(Image.open(paths[0]).convert("RGB"))).permute(2, 0, 1)
    crops = ds[(0, 0)]["crops"]
    windows = arr.unfold(1, 32, 1).unfold(2, 32, 1)  # [3, H-31, W-31, 32, 32]
    for crop in crops:
        hits = (windows == crop[:, None, None]).flatten(3).all(-1).all(0)
        assert hits.sum() == 1


def test_small_images_upscaled_or_skipped(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = find_images(folder)
    up = PristineCropPairs(paths, 64, small_images="upscale")
    assert up[(3, 0)]["crops"].shape == (2, 3, 64, 64)  # 40x60 image, upscaled
    with caplog.at_level("WARNING"):
        skip = PristineCropPairs(paths, 64, small_images="skip")
    assert len(skip) == 3
    assert "img3.png" in caplog.text and "smaller than the 64 px crop" in caplog.text
    with pytest.raises(ValueError):
        PristineCropPairs(paths, 64, small_images="crop")


def test_sampler_is_a_partition_and_resumes() -> None:
    full = list(EpochSampler(10, seed=3, epoch=1))
    assert sorted(i for i, _ in full) == list(range(10))
    assert all(e == 1 for _, e in full)
    assert list(EpochSampler(10, seed=3, epoch=1, start=4)) == full[4:]
    assert list(EpochSampler(10, seed=3, epoch=2)) != full
    ranks = [list(EpochSampler(10, seed=3, epoch=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)  # padded to 12
    assert {i for r in ranks for i, _ in r} == set(range(10))
    dropped = [
        list(EpochSampler(10, seed=3, rank=r, world_size=3, drop_last=True)) for r in range(3)
    ]
    assert all(len(r) == 3 for r in dropped)


def test_resumable_sampler_continues_across_epochs() -> None:
    import itertools

    from qualiclip.crops import ResumableSampler

    full = list(itertools.islice(ResumableSampler(7, seed=5), 20))
    assert full[:7] == list(EpochSampler(7, seed=5, epoch=0))
    assert full[7:14] == list(EpochSampler(7, seed=5, epoch=1))
    assert list(itertools.islice(ResumableSampler(7, seed=5, start=9), 11)) == full[9:]
    two = [
        list(itertools.islice(ResumableSampler(7, seed=5, rank=r, world_size=2), 3))
        for r in range(2)
    ]
    assert not set(two[0]) & set(two[1])


# --- unusable files ----------------------------------------------------------------------------


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """Three good images and four unusable files of the kinds found in real photo folders."""
    rng = np.random.default_rng(3)
    for n in range(3):
        arr = rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"good{n}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "notes.jpg").write_text("a text file with an image's name")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((12, 200, 3), np.uint8)).save(tmp_path / "sliver.png")
    return tmp_path


def test_scan_names_every_unusable_file(mixed: Path) -> None:
    paths = find_images(mixed)
    full = scan_images(paths, crop_size=64, mode="decode", threads=2)
    assert [p.name for p in full.usable] == ["good0.png", "good1.png", "good2.png"]
    reasons = {p.name: why for p, why in full.bad}
    assert set(reasons) == {"truncated.jpg", "notes.jpg", "empty.png", "sliver.png"}
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    assert "too small" in reasons["sliver.png"]
    assert str(mixed) not in reasons["notes.jpg"]  # the caller names the file
    # A header scan is fast but lets truncated data through (the dataset handles it later).
    quick = scan_images(paths, crop_size=64, mode="header")
    assert {p.name for p, _ in quick.bad} == {"notes.jpg", "empty.png", "sliver.png"}
    assert "truncated.jpg" in {p.name for p in quick.usable}
    # Smaller than the crop under the "skip" policy: left out, but not bad data.
    skip = scan_images(paths, crop_size=90, small_images="skip")
    assert [p.name for p in skip.small] == ["good0.png", "good1.png", "good2.png"]
    with pytest.raises(ValueError, match="scan mode"):
        scan_images(paths, crop_size=64, mode="guess")


def test_a_file_that_fails_in_the_dataset_is_replaced_deterministically(mixed: Path) -> None:
    paths = [mixed / "good0.png", mixed / "truncated.jpg", mixed / "notes.jpg", mixed / "good1.png"]
    ds = PristineCropPairs(paths, 32, seed=4)
    good = ds[(0, 0)]
    assert good["skipped"] == "" and int(good["index"]) == 0
    sample = ds[(1, 5)]
    assert int(sample["index"]) == 3  # the next image that decodes
    failed = sample["skipped"].splitlines()
    assert [line.split(": ")[0] for line in failed] == [str(paths[1]), str(paths[2])]
    assert "truncated" in failed[0]
    again = PristineCropPairs(paths, 32, seed=4)[(1, 5)]  # fresh process state, same sample
    assert torch.equal(again["crops"], sample["crops"]) and again["skipped"] == sample["skipped"]
    assert not torch.equal(sample["crops"], ds[(3, 5)]["crops"])  # the key still sets the crops
    # A policy that reads headers does not trip over a file that is not an image.
    assert len(PristineCropPairs(paths, 32, small_images="skip")) == 4
    with pytest.raises(ImageDecodeError, match="none of the 2 pristine images"):
        PristineCropPairs(paths[1:3], 32)[(0, 0)]


def test_16_bit_pristine_images_keep_their_brightness(tmp_path: Path) -> None:
    grey = np.full((48, 48), 32896, dtype=np.uint16)  # 128.5 / 255 of full scale
    Image.fromarray(grey).save(tmp_path / "deep.png")
    crops = PristineCropPairs([tmp_path / "deep.png"], 32)[(0, 0)]["crops"]
    assert crops.dtype == torch.uint8 and bool((crops == 128).all())
