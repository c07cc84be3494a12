"""Fuzzing: mutated images of every format Pillow writes never escape as anything but a row.

The decoder must return pixels or raise ``ImageDecodeError``; ``qualiclip score`` on a folder of
mutants must give every file exactly one row and exit 0 or 1. Bounded to a few hundred files here;
``benchmarks/fuzz_decode.py`` runs the same fuzzer for as long as asked.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from fuzz_images import SEED_SIZE, Tally, decode_one, make_seeds, mutants, score_folder
from qualiclip.images import ImageDecodeError, decode_rgb

MAX_PIXELS = 4_000_000  # a mutated size field must not turn one try into a large allocation


@pytest.fixture(scope="module")
def seeds():
    return make_seeds()


def test_every_seed_is_a_valid_image_of_the_seed_size(seeds) -> None:
    formats = {s.name.split("-")[0] for s in seeds}
    # The formats every Pillow build writes; the others are a bonus of this build.
    assert {"png", "jpeg", "bmp", "gif", "tiff", "ppm", "pgm", "ico", "tga"} <= formats
    w, h = SEED_SIZE
    for seed in seeds:
        arr = decode_rgb(seed.data)
        assert arr.shape == (h, w, 3), seed.name
        assert arr.dtype in (np.uint8, np.uint16)


def test_mutants_are_deterministic_and_actually_mutated(seeds) -> None:
    first = [m.data for m in mutants(3, 60, seeds)]
    assert first == [m.data for m in mutants(3, 60, seeds)]
    originals = {s.name: s.data for s in seeds}
    changed = sum(m.data != originals[m.seed] for m in mutants(3, 60, seeds))
    assert changed >= 50


@pytest.mark.filterwarnings("ignore")  # Pillow warns about each damaged EXIF block it skips
def test_decoder_raises_only_its_own_error(seeds) -> None:
    tally = Tally()
    for mutant in mutants(11, 20 * len(seeds), seeds):
        decode_one(mutant, tally, MAX_PIXELS)
    assert tally.escaped == []
    assert tally.decoded + tally.refused == tally.files == 20 * len(seeds)
    # Both outcomes occur: the mutations reach the decoders without always destroying the file.
    assert tally.decoded > 0.05 * tally.files and tally.refused > 0.3 * tally.files


@pytest.mark.slow
def test_score_cli_gives_each_mutant_one_row(
    seeds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUALICLIP_MAX_PIXELS", str(MAX_PIXELS))
    tally = Tally()
    batch = list(mutants(5, 6 * len(seeds), seeds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_folder(batch, str(tmp_path / "mutants"), tally)
    assert tally.escaped == []
    assert tally.cli_bad_exit == 0 and tally.cli_row_mismatch == 0
    assert tally.cli_rows == len(batch) == tally.cli_ok + tally.cli_errors
    assert tally.cli_ok > 0 and tally.cli_errors > 0


def test_the_malformed_headers_seen_in_the_wild_are_decode_errors() -> None:
    # Each raised a bare ValueError from Pillow before, not ImageDecodeError.
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00IHDR\x00\x00\x00\x00"
    with pytest.raises(ImageDecodeError, match="PNG"):
        decode_rgb(png)
    with pytest.raises(ImageDecodeError, match="malformed PPM image header"):
        decode_rgb(b"P6\n4x 48\n255\n")
