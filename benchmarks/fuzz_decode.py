"""Fuzz qualiclip's decoder and ``qualiclip score`` with mutated images, for as long as asked.

Every mutant (bit flips, truncations, header integer and text edits, splices of small valid images
in every format Pillow writes; see ``tests/fuzz_images.py``) goes to ``decode_rgb``, which must
return pixels or raise ``ImageDecodeError``; then the same mutants are scored by ``qualiclip
score`` (in-process, ``--model random-tiny``) in folders of ``--chunk`` files, where every file
must get exactly one row and the exit status must be 0 or 1. Anything else is printed with its
traceback.

Usage:
    python benchmarks/fuzz_decode.py --files 10000
    python benchmarks/fuzz_decode.py --seconds 600 --seed 7 --no-cli
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_images import Mutant, Tally, decode_one, make_seeds, mutants, score_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=None, help="mutants to try (default 10000)")
    parser.add_argument("--seconds", type=float, default=None, help="or: run this long")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--chunk", type=int, default=500, help="files per CLI run (default 500)")
    parser.add_argument("--no-cli", action="store_true", help="decoder only")
    parser.add_argument("--max-pixels", type=int, default=4_000_000,
                        help="decompression limit while fuzzing (default 4 MP: a mutated size "
                        "field would otherwise make each try a large allocation)")
    args = parser.parse_args()
    files = 10_000 if args.files is None and args.seconds is None else args.files
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    os.environ["QUALICLIP_MAX_PIXELS"] = str(args.max_pixels)
    warnings.simplefilter("ignore")  # Pillow warns about every damaged EXIF block it skips

    seeds = make_seeds()
    print(f"seeds: {len(seeds)} images: {', '.join(s.name for s in seeds)}")
    tally = Tally()
    start = time.monotonic()
    batch: list[Mutant] = []
    with tempfile.TemporaryDirectory(prefix="qualiclip-fuzz-") as tmp:
        for mutant in mutants(args.seed, files, seeds):
            if deadline is not None and time.monotonic() > deadline:
                break
            decode_one(mutant, tally, args.max_pixels)
            batch.append(mutant)
            if len(batch) == args.chunk and not args.no_cli:
                score_folder(batch, os.path.join(tmp, "mutants"), tally)
                batch = []
        if batch and not args.no_cli:
            score_folder(batch, os.path.join(tmp, "mutants"), tally)
    seconds = time.monotonic() - start
    assert tally.escaped is not None
    for text in tally.escaped:
        print("ESCAPED:", text, file=sys.stderr)
    print(f"seed {args.seed}: {tally.files} mutated files in {seconds:.0f} s")
    print(f"decode_rgb: {tally.decoded} decoded, {tally.refused} refused with ImageDecodeError")
    if not args.no_cli:
        print(f"qualiclip score: {tally.cli_runs} runs over {tally.cli_files} files, "
              f"{tally.cli_rows} rows ({tally.cli_ok} scored, {tally.cli_errors} errors), "
              f"files without exactly one row: {tally.cli_row_mismatch}, "
              f"exit status not 0/1: {tally.cli_bad_exit}")
    print(f"exceptions escaping (tracebacks): {len(tally.escaped)}")
    return 1 if tally.escaped or tally.cli_row_mismatch or tally.cli_bad_exit else 0


if __name__ == "__main__":
    sys.exit(main())
