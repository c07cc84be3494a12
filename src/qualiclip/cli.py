"""The ``qualiclip`` command line: score, models, degrade, train, tune, eval, serve and export.

Each subcommand has an ``_add_<name>`` function that declares its arguments and a ``_run_<name>``
function that does the work and returns the exit status: 0 success, 1 when some input failed,
2 for usage errors. Subcommands only parse flags, call library functions and turn their errors
into exit codes; the file is long because it declares every flag of every subcommand, kept in one
place so ``--help`` texts, defaults and exit codes stay consistent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qualiclip import stopping
from qualiclip.output_files import InputFiles, OutputError, SameFileError
from qualiclip.precision import PRECISION_CHOICES, TRAIN_PRECISIONS
from qualiclip.train_choices import BN_MODES, DEGRADE_IN

if TYPE_CHECKING:  # imported when used: `qualiclip --help` does not pay for torch
    from qualiclip.model import QualiCLIP, Scorer
    from qualiclip.onnx_scorer import OnnxScorer

if TYPE_CHECKING:  # imported where used: the command starts without loading every module
    from qualiclip.report import ReportRows
    from qualiclip.train import RunPlan

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: ``--precision``'s help, shared by score, eval and serve.
PRECISION_HELP = (
    "fp32 (default), bf16 (fast only with AMX or AVX512-BF16), fp16 (CUDA), int8 (CPU; the "
    "tower quantised once per model, needs the 'onnx' extra), or auto: the fastest this device "
    "runs natively whose fidelity holds (printed once)"
)


class UsageError(Exception):
    """A command-line mistake: reported on stderr with exit status 2."""


# --- score -------------------------------------------------------------------------------------


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that loads a scorer."""
    p.add_argument(
        "--model", default="qualiclip",
        help="weight name (see 'qualiclip models') or checkpoint file (default: qualiclip)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--cache-dir", default=None, help="download cache (default: $QUALICLIP_HOME)")
    p.add_argument(
        "--pooling", choices=("none", "original", "interpolate"), default="none",
        help="positional embedding in attention pooling (default: none, as QualiCLIP)",
    )
    p.add_argument(
        "--formula", choices=("official", "pyiqa"), default=None,
        help="score formula: the authors' (scale 100) or pyiqa's (default: official; pyiqa's "
        "with --prompts, the one they were learned with)",
    )
    p.add_argument(
        "--prompts", default=None, metavar="FILE|NAME",
        help="learned prompts (QualiCLIP+) on the --model base: a prompt file in pyiqa's format "
        "(as 'qualiclip tune' writes) or a name such as qualiclip+ (see 'qualiclip models')",
    )
    p.add_argument(
        "--trust-torchscript", action="store_true",
        help="allow loading a TorchScript archive given as --model FILE",
    )


def load_model_from_args(
    args: argparse.Namespace, name: str | None = None
) -> QualiCLIP | OnnxScorer:
    """Build the scorer that the common options describe; a bad name, or a ``--precision`` the
    device or model cannot run, is a usage error. ``args.precision`` (where the subcommand has
    one) is resolved: ``auto`` becomes the precision it picks, announced once."""
    from qualiclip.engine import resolve_precision
    from qualiclip.model import create_model

    try:
        model = create_model(
            name or args.model,
            device=args.device,
            pooling=args.pooling,
            formula=args.formula,
            prompts=args.prompts,
            cache_dir=args.cache_dir,
            trust_torchscript=args.trust_torchscript,
        )
        # A precision the device or model cannot run is refused before any input is read.
        args.precision = resolve_precision(model, getattr(args, "precision", "fp32"),
                                           compile=getattr(args, "compile", False))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return model


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score images (files, folders, globs, '-' for stdin)",
        description="Score images with QualiCLIP: one row per input, with its score or error. "
        "Exit status: 0 all scored, 1 some input failed, 2 usage error.",
    )
    p.add_argument("inputs", nargs="+", metavar="PATH",
                   help="files, folders, globs, .txt/.lst lists of paths (one a line, relative "
                   "to the list's folder), or '-' (paths on stdin)")
    _add_model_options(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward (same size)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32", help=PRECISION_HELP)
    p.add_argument("--decode", choices=("auto", "cpu", "gpu"), default="auto",
                   help="JPEG decoding: auto (on the GPU with CUDA and torchvision's nvJPEG, "
                   "else CPU threads; default), cpu, gpu (an error where unavailable)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the image tower (once per image size; for long runs)")
    p.add_argument(
        "--format", choices=("table", "csv", "json", "jsonl", "parquet"), default=None,
        help="local: table, csv, json, jsonl (default: from the -o file's extension, else "
        "table); --engine ray: parquet (default) or csv",
    )
    p.add_argument(
        "--output", "-o", default=None,
        help="write results here (default: stdout); with --engine ray a folder of part files",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--report", metavar="HTML", default=None,
                   help="also write one self-contained HTML page: thumbnails sorted by score, "
                   "a histogram, filters, the failed files (with --map, each map on hover)")
    m = p.add_argument_group(
        "quality maps",
        "Where quality is lost: per scored input, DIR/<its path>.map.png (the path below the "
        "inputs' common folder, so every input gets its own) shows the image beside "
        "its map, coloured over the image in grey (the legend gives the values of the darkest "
        "and brightest colour, and says when the map is too flat to mean anything).",
    )
    m.add_argument("--map", metavar="DIR", default=None,
                   help="write each scored input's quality map into DIR (created if missing); "
                   "each file is decoded once (a dense map's pass gives its score too)")
    m.add_argument("--map-kind", choices=("dense", "windows"), default="dense",
                   help="dense: one pass, 1/32 resolution (default); windows: the scores of "
                   "overlapping crops (slower; each cell is a real score)")
    m.add_argument("--map-npy", action="store_true",
                   help="also write the raw map values as DIR/<its path>.map.npy")
    m.add_argument("--map-window", type=int, default=224, metavar="PX",
                   help="windows: crop side (default 224)")
    m.add_argument("--map-stride", type=int, default=112, metavar="PX",
                   help="windows: step between crops (default 112)")
    _add_ray_options(p)
    p.set_defaults(func=_run_score)


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    """``score --engine ray`` options (Ray Data; needs the 'ray' extra)."""
    g = p.add_argument_group(
        "distributed scoring (--engine ray)",
        "Score on a Ray cluster; --output is a folder of part files, and running again with "
        "the same folder scores only the paths not in it yet.",
    )
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default) or ray (needs: pip install 'qualiclip[ray]')")
    g.add_argument("--ray-address", default=None,
                   help="cluster to join: auto, ray://HOST:10001, HOST:6379 (default: start a "
                   "local Ray, or $RAY_ADDRESS)")
    g.add_argument("--concurrency", type=int, default=1, help="scoring actors (default 1)")
    g.add_argument("--num-cpus-per-actor", type=float, default=1.0, help="default 1")
    g.add_argument("--num-gpus-per-actor", type=float, default=0.0,
                   help="GPUs per actor, fractions share a GPU (default 0: CPU actors)")
    g.add_argument("--rows-per-part", type=int, default=1000,
                   help="results per part file (default 1000)")
    g.add_argument("--verbose", action="store_true",
                   help="show Ray's own log output (default: errors only)")


def _run_score(args: argparse.Namespace) -> int:
    from qualiclip import engine
    from qualiclip.inputs import list_image_paths
    from qualiclip.output import format_from_name, write_results

    if args.batch_size < 1 or args.workers < 1:
        raise UsageError("--batch-size and --workers must be at least 1")
    if args.map is not None:
        if args.engine == "ray":
            raise UsageError("--map works with the local engine only")
        if os.path.exists(args.map) and not os.path.isdir(args.map):
            raise UsageError(f"--map {args.map} exists and is not a folder")
        if args.map_window < 32 or args.map_stride < 1:
            raise UsageError("--map-window must be at least 32 and --map-stride at least 1")
    if args.report is not None:
        _check_report_target(args)
    if args.engine == "ray":
        return _run_score_ray(args)
    if args.format == "parquet":
        raise UsageError("--format parquet needs --engine ray (locally: csv, json, jsonl, table)")
    args.format = args.format or format_from_name(args.output) or "table"
    if args.output and os.path.isdir(args.output):
        raise UsageError(f"-o {args.output} is a folder; give a file name for the results")
    if args.output and not os.path.isdir(os.path.dirname(args.output) or "."):
        raise UsageError(f"-o {args.output}: no folder {os.path.dirname(args.output)}")
    paths = list_image_paths(args.inputs, stdin=sys.stdin)
    inputs = InputFiles.of(paths)
    if args.output:
        _refuse_output_over_input(args.output, args.inputs, inputs)
    if args.report is not None:
        try:
            inputs.refuse(args.report, "--report")
        except SameFileError as exc:
            raise UsageError(str(exc)) from None
    root = None
    if args.map is not None:
        from qualiclip.maps import map_root

        root = map_root(paths)
        _refuse_maps_over_inputs(args, paths, root, inputs)
    if not paths:
        print("qualiclip score: no images found in the given inputs", file=sys.stderr)
        return EXIT_FAILED
    model = load_model_from_args(args)
    if args.map is not None and args.map_kind == "dense":
        from qualiclip.maps import dense_maps_unavailable

        why = dense_maps_unavailable(model)
        if why is not None:
            raise UsageError(f"--map-kind dense: {why}; use --map-kind windows")
    collected = None
    if args.report is not None:
        from qualiclip.report import ReportRows

        collected = ReportRows()
    try:
        if args.map is not None:
            from qualiclip.maps import score_paths_with_maps

            # Each file decoded once; its score comes from its map's pass.
            results = score_paths_with_maps(
                model, paths, args.map, kind=args.map_kind, npy=args.map_npy,
                window=args.map_window, stride=args.map_stride, precision=args.precision,
                workers=args.workers, decode=args.decode, progress=not args.no_progress,
                root=root, inputs=inputs,
                on_map=collected.add_map if collected is not None else None,
            )
        else:
            results = engine.score_paths(
                model,
                paths,
                batch_size=args.batch_size,
                workers=args.workers,
                precision=args.precision,
                progress=not args.no_progress,
                decode=args.decode,
                compile=args.compile,
            )
    except ValueError as exc:  # --decode gpu where there is no GPU decoding
        raise UsageError(str(exc)) from None
    if collected is not None:
        results = collected.collect(results)
    failed = write_results(results, args.format, args.output, model_name=model.name,
                           inputs=inputs, precision=args.precision)
    if collected is not None:
        _write_report(args, model, collected, inputs)
    if failed:
        print(f"qualiclip score: {failed} of {len(paths)} inputs failed", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _check_report_target(args: argparse.Namespace) -> None:
    """A ``--report`` that cannot be written is refused before anything is scored."""
    target = args.report
    if args.engine == "ray":
        raise UsageError("--report works with the local engine only")
    if Path(target).suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--report {target}: the file name must end in .html")
    if os.path.isdir(target):
        raise UsageError(f"--report {target} is a folder; give a file name")
    if not os.path.isdir(os.path.dirname(target) or "."):
        raise UsageError(f"--report {target}: no folder {os.path.dirname(target)}")
    if args.output and os.path.realpath(args.output) == os.path.realpath(target):
        raise UsageError(f"--report {target} is also the -o file")


def _write_report(
    args: argparse.Namespace, model: Scorer, collected: ReportRows, inputs: InputFiles
) -> None:
    """The HTML report of the rows ``collected`` while they streamed to the other outputs."""
    from qualiclip.report import ReportInfo, describe, write_report

    info = ReportInfo(model=model.name, weights_sha256=model.weights_sha256,
                      precision=args.precision,
                      map_kind=args.map_kind if args.map is not None else None)
    stats = write_report(collected.results, args.report, info, maps=collected.maps,
                         workers=args.workers, inputs=inputs)
    print(f"qualiclip score: {describe(stats)}", file=sys.stderr)


def _refuse_output_over_input(output: str, given: Sequence[str], inputs: InputFiles) -> None:
    """Refuse an ``-o`` that is one of the inputs, or that a scan of the inputs would pick up.

    Checked before anything is written: the same file by device and inode (a link to an input
    counts), and any file a folder or glob among the inputs would list next time.
    """
    from qualiclip.inputs import scanned_by

    try:
        inputs.refuse(output, "-o")
    except SameFileError as exc:
        raise UsageError(str(exc)) from None
    source = scanned_by(output, given)
    if source is not None:
        raise UsageError(
            f"-o {output} would be read as an input by {source} next time (an image name in "
            "what it scans); write the results elsewhere"
        )


def _refuse_maps_over_inputs(
    args: argparse.Namespace, paths: Sequence[Path], root: Path | None, inputs: InputFiles
) -> None:
    """Refuse a ``--map`` folder where a map file would be an input, or be scanned as one."""
    from qualiclip.inputs import scanned_by
    from qualiclip.maps import map_files

    for target in map_files(paths, args.map, root, npy=args.map_npy):
        try:
            inputs.refuse(target, "--map: the map file")
        except SameFileError as exc:
            raise UsageError(str(exc)) from None
        source = scanned_by(target, args.inputs)
        if source is not None:
            raise UsageError(
                f"--map {args.map}: its map {target} would be read as an input by {source} "
                "next time; write the maps elsewhere"
            )


def _ray_output_format(args: argparse.Namespace) -> str:
    """--format if given (parquet or csv), else the output folder's suffix, else parquet."""
    if args.format is not None:
        if args.format not in ("parquet", "csv"):
            raise UsageError(f"--engine ray writes parquet or csv, not {args.format}")
        return str(args.format)
    return "csv" if str(args.output).rstrip("/\\").lower().endswith(".csv") else "parquet"


def _run_score_ray(args: argparse.Namespace) -> int:
    from qualiclip import ray_scoring

    if not args.output:
        raise UsageError("--engine ray needs --output FOLDER (results are written as part files)")
    if args.concurrency < 1 or args.rows_per_part < 1:
        raise UsageError("--concurrency and --rows-per-part must be at least 1")
    if args.num_cpus_per_actor < 0 or args.num_gpus_per_actor < 0:
        raise UsageError("--num-cpus-per-actor and --num-gpus-per-actor must be >= 0")
    if args.num_gpus_per_actor == 0:
        from qualiclip.precision import PrecisionError, check_precision

        try:
            check_precision("cpu", args.precision)
        except PrecisionError as exc:
            raise UsageError(f"{exc} (actors without --num-gpus-per-actor run on CPUs)") from None
    elif args.precision == "int8":
        raise UsageError("int8 runs on CPUs only: drop --num-gpus-per-actor, or use fp16, bf16 "
                         "or fp32 on GPU actors")
    if args.precision == "auto":
        print("qualiclip score: precision auto: each actor picks for its own device; the "
              "precision column of the output says which", file=sys.stderr)
    try:
        config = ray_scoring.RayScoreConfig(
            model=args.model, device=args.device, pooling=args.pooling, formula=args.formula,
            prompts=args.prompts, cache_dir=args.cache_dir,
            trust_torchscript=args.trust_torchscript,
            precision=args.precision, batch_size=args.batch_size, decode_threads=args.workers,
            concurrency=args.concurrency, num_cpus_per_actor=args.num_cpus_per_actor,
            num_gpus_per_actor=args.num_gpus_per_actor, rows_per_part=args.rows_per_part,
            output_format=_ray_output_format(args),  # type: ignore[arg-type]
            progress=not args.no_progress,
        )
        summary = ray_scoring.score_to_folder(
            args.inputs, args.output, config, address=args.ray_address, verbose=args.verbose
        )
    except (ImportError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(
        f"qualiclip score: {summary.describe()} in {args.output}; "
        f"{len(summary.parts)} new part files in {summary.seconds:.1f} s",
        file=sys.stderr,
    )
    if summary.inputs == 0:
        print("qualiclip score: no images found in the given inputs", file=sys.stderr)
    # Exit 1 whenever the output holds an error row for an input, written now or before.
    return EXIT_OK if summary.ok else EXIT_FAILED


# --- models ------------------------------------------------------------------------------------


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named weights and what is cached")
    p.add_argument("--cache-dir", default=None, help="download cache (default: $QUALICLIP_HOME)")
    p.add_argument(
        "--add", nargs=2, metavar=("NAME", "FILE"),
        help="verify a hand-downloaded FILE against NAME's checksum and copy it into the cache "
        "(NAME: a weight name, or a cache file name such as RN50.pt or "
        "bpe_simple_vocab_16e6.txt.gz)",
    )
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from qualiclip import pretrained

    if args.add:
        name, path = args.add
        try:
            print(pretrained.add_to_cache(path, name, args.cache_dir))
        except ValueError as exc:  # an unknown name: the message lists the valid ones
            raise UsageError(str(exc)) from None
        return EXIT_OK

    rows = [("name", "cached", "size", "licence", "sha256", "description")]
    for name, entry in pretrained.PRETRAINED.items():
        cached = pretrained.is_cached(name, args.cache_dir)
        size = f"{entry.file.size / 1e6:.1f} MB" if entry.file.size else "?"
        where = "packaged" if entry.file.packaged else "yes" if cached else "no"
        rows.append(
            (name, where, size, entry.licence, entry.file.sha256[:12],
             entry.description)
        )
    for name, plus in pretrained.PRETRAINED_PROMPTS.items():
        cached = pretrained.is_cached(name, args.cache_dir)
        size = f"{plus.file.size / 1e6:.1f} MB" if plus.file.size else "?"
        rows.append(
            (name, "yes" if cached else "no", size, plus.licence, plus.file.sha256[:12],
             plus.description)
        )
    for name in pretrained.RANDOM_MODELS:
        rows.append((name, "-", "-", "-", "-", "random weights, for tests and benchmarks"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1])
    print(f"cache: {pretrained.cache_dir(args.cache_dir)}")
    return EXIT_OK


# --- degrade -----------------------------------------------------------------------------------


def _add_degrade(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "degrade",
        help="apply synthetic distortions; draw a contact sheet",
        description="Draw a contact sheet of all 24 distortion types at levels 1..5 (--sheet), "
        "or write one distorted image at full size (--type, --level, -o).",
    )
    p.add_argument("image", metavar="IMAGE", help="input image file")
    p.add_argument("--sheet", metavar="PNG", help="write a contact sheet (24 rows x 6 columns)")
    p.add_argument("--size", type=int, default=256, help="tile side of the sheet in px (256)")
    p.add_argument("--type", dest="dist_type", metavar="TYPE", help="distortion type to apply")
    p.add_argument("--level", type=int, default=3, help="level 1 (mildest) .. 5 (3)")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write the distorted image")
    p.add_argument("--seed", type=int, default=0, help="seed of the random parameters (0)")
    p.set_defaults(func=_run_degrade)


def _run_degrade(args: argparse.Namespace) -> int:
    import torch

    from qualiclip.degradations import DISTORTION_TYPES, apply_distortion
    from qualiclip.images import ImageDecodeError, load_image
    from qualiclip.output_files import open_output
    from qualiclip.sheet import contact_sheet, to_pil

    if bool(args.sheet) == bool(args.dist_type or args.output):
        raise UsageError("give either --sheet PNG, or --type TYPE -o FILE")
    if args.dist_type is not None and args.dist_type not in DISTORTION_TYPES:
        raise UsageError(f"unknown type {args.dist_type!r}; valid: {', '.join(DISTORTION_TYPES)}")
    if not args.sheet and not (args.dist_type and args.output):
        raise UsageError("--type and -o/--output go together")
    if not 1 <= args.level <= 5 or args.size < 16:
        raise UsageError("--level must be in 1..5 and --size at least 16")
    written = args.sheet or args.output
    inputs = InputFiles.of([args.image])
    try:
        inputs.refuse(written)
    except SameFileError as exc:
        raise UsageError(str(exc)) from None
    fmt = _image_format(written)
    try:
        image = load_image(args.image)
    except ImageDecodeError as exc:  # every decoder failure, with its reason
        print(f"qualiclip degrade: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.sheet:
        result = contact_sheet(image, size=args.size, seed=args.seed)
    else:
        g = torch.Generator().manual_seed(args.seed)
        out = apply_distortion(image[None], args.dist_type, args.level, g)
        result = to_pil(out[0])
    try:
        with open_output(written, inputs=inputs) as stream:
            result.save(stream, format=fmt)
    except ValueError as exc:  # an option the format refuses
        print(f"qualiclip degrade: cannot write {written}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(written)
    return EXIT_OK


def _image_format(path: str) -> str:
    """Pillow's format for the file name's extension; an unknown one is a usage error."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(f"{path}: no image format to write for the extension {ext or '(none)'!r}"
                         " (use .png, .jpg, .tif, .webp, ...)")
    return fmt


# --- train -------------------------------------------------------------------------------------


#: CLI flag -> (config section, key) for ``qualiclip train``; unset flags leave the config alone.
_TRAIN_FLAGS: dict[str, tuple[str, ...]] = {
    "pristine": ("data", "pristine"),
    "val_dir": ("data", "val_dir"),
    "crop_size": ("data", "crop_size"),
    "batch_size": ("data", "batch_size"),
    "workers": ("data", "workers"),
    "degrade_in": ("data", "degrade_in"),
    "init": ("model", "init"),
    "bn": ("model", "bn"),
    "lr": ("optim", "lr"),
    "precision": ("optim", "precision"),
    "max_steps": ("schedule", "max_steps"),
    "epochs": ("schedule", "epochs"),
    "out": ("log", "out"),
    "checkpoint_every": ("log", "checkpoint_every"),
    "val_every": ("validation", "every"),
    "rated_csv": ("validation", "rated_csv"),
    "seed": ("seed",),
    "device": ("device",),
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="self-supervised QualiCLIP training from pristine images",
        description="Fine-tune a CLIP image tower with QualiCLIP's ranking losses. Settings: "
        "preset, then --config TOML, then flags. Every pristine file is checked before step 0; "
        "unusable ones (unreadable, truncated, not an image, under 32 px) are named and "
        "skipped, or refused with --strict. Exit status: 0 trained on every image, 1 a "
        "failure, or trained with unusable files skipped, 2 a usage error. Multi-GPU: "
        "torchrun --nproc-per-node N -m qualiclip.cli train ...",
    )
    p.add_argument("--pristine", help="folder or .txt list of pristine images")
    p.add_argument("--out", required=True, help="output folder (checkpoints, logs, model.pth)")
    p.add_argument("--preset", help="paper (RN50 from clip-rn50, default), tiny, or open "
                   "(qualiclip-open: a small model from random weights)")
    p.add_argument("--config", help="TOML file with [model] [data] [optim] [loss] ... tables")
    p.add_argument("--init", help="start point: clip-rn50, random-tiny, or a checkpoint file")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue from CKPT (default: the latest ckpt-*.pt in --out); only "
                   "length, intervals, device and workers may differ from the checkpoint's run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run --out holds (its checkpoints, model.pth, history, "
                   "config.json and validation.json; other files stay)")
    p.add_argument("--strict", action="store_true",
                   help="refuse to start when any pristine file is unusable (default: skip it)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume even though the pristine files differ from the checkpoint's: "
                   "train on the files found now, keep the held-out set as recorded")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="allow an --init that is a TorchScript archive of unknown checksum "
                   "(loading one runs code stored in the file)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides epochs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="pristine images per step and process")
    p.add_argument("--crop-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--degrade-in", choices=DEGRADE_IN,
                   help="degrade crops in the training step (default) or in the DataLoader "
                   "workers, off the step's critical path")
    p.add_argument("--val-dir", help="held-out pristine images (default: every k-th image)")
    p.add_argument("--val-every", type=int, help="steps between validations")
    p.add_argument("--rated-csv", help="path,score CSV of human-rated images to validate on")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--bn", choices=BN_MODES, help="batch-norm statistics")
    p.add_argument("--precision", choices=TRAIN_PRECISIONS)
    p.add_argument("--device", help="auto, cpu, cuda, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="log progress details; on a failure, print the traceback")
    p.set_defaults(func=_run_train)


def _train_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    for flag, keys in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            node = overrides
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = value
    if args.no_progress:
        overrides.setdefault("log", {})["progress"] = False
    if args.strict:
        overrides.setdefault("data", {})["strict"] = True
    return overrides


def _train_setup(args: argparse.Namespace) -> RunPlan:
    """Configuration, checkpoint and output folder, all checked: any problem is a usage error."""
    from qualiclip import train

    try:
        return train.plan_run(
            config=args.config, preset=args.preset, overrides=_train_overrides(args),
            out=args.out, resume=args.resume, overwrite=args.overwrite,
            allow_data_change=args.allow_data_change, trust_torchscript=args.trust_torchscript,
        )
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(str(exc)) from None


def _one_line(exc: BaseException) -> str:
    """A failure in one line: a DataLoader worker's error ends with the original message."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if "Original Traceback" in str(exc) and lines:
        return lines[-1]  # "TypeName: message", as the worker raised it
    if isinstance(exc, ValueError | OSError | OutputError) and lines:
        return lines[0]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _presets_without_download() -> str:
    """One line naming the training presets that start from random weights (no download)."""
    from qualiclip.pretrained import RANDOM_MODELS
    from qualiclip.train_config import PRESETS

    names = [n for n, cfg in PRESETS.items() if cfg.model.init in RANDOM_MODELS]
    flags = ", ".join(f"--preset {n}" for n in names)
    return f"Presets that need no download: {flags} (random initial weights)."


def _run_train(args: argparse.Namespace) -> int:
    import logging

    from qualiclip import checkpoints, train
    from qualiclip.pretrained import ChecksumError, OfflineError

    plan = _train_setup(args)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = train.fit(plan)
    except train.DataChangedError as exc:  # refused unless asked for: a usage error
        raise UsageError(str(exc)) from None
    except (OfflineError, ChecksumError) as exc:
        # The start point's weights cannot be had: the message says which file, its checksum and
        # where to put it (as for 'score'); the presets that start from random weights need none.
        print(f"qualiclip train: error: {exc}\n{_presets_without_download()}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - inside the run: a failure (1), not a usage error
        if args.verbose:
            import traceback

            traceback.print_exc()
        # A ValueError of ours says all there is; others may need their traceback.
        plain = isinstance(exc, ValueError | OutputError)
        hint = "" if args.verbose or plain else " (--verbose for details)"
        print(f"qualiclip train: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_FAILED
    if not result["main"]:  # under torchrun, rank 0 closes the run for all processes
        return EXIT_FAILED if result["skipped"] else EXIT_OK
    val = result["validation"]
    if val:
        first, last = val[0], val[-1]
        print(f"level-ordering accuracy {first['level_accuracy']:.3f} (step {first['step']}) -> "
              f"{last['level_accuracy']:.3f} (step {last['step']})", file=sys.stderr)
    skipped = result["skipped"]
    summary = f"trained {result['step']} steps on {result['images']} images"
    if result["held_out"]:
        summary += f"; {result['held_out']} more held out for validation"
    if result["small"]:
        summary += f"; {len(result['small'])} smaller than the crop left out"
    if skipped:
        listed = checkpoints.names([name for name, _ in skipped])
        summary += f"; skipped {len(skipped)} unusable pristine files: {listed}"
    print(summary, file=sys.stderr)
    print(result["model_path"])
    return EXIT_FAILED if skipped else EXIT_OK


# --- eval --------------------------------------------------------------------------------------


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="correlate scores with human opinion (SRCC/PLCC/KRCC)",
        description="Score a human-rated dataset with one or more models and report SRCC, PLCC "
        "(raw and after a 4-parameter logistic fit) and KRCC with bootstrap 95% intervals. "
        "'--dataset synthetic' instead degrades pristine images at 24 types x 5 levels and "
        "reports per-type SRCC of quality against level. Exit status 1 when any image failed "
        "(the table still covers the images that were scored).",
        conflict_handler="resolve",
    )
    _add_model_options(p)
    p.add_argument("--dataset", required=True,
                   help="clive, koniq, spaq, kadid, tid2013, biq2021, agiqa3k, csv (with --root "
                   "FILE.csv), a .csv file, or synthetic")
    p.add_argument("--root", default=None, help="dataset folder (synthetic: pristine images)")
    p.add_argument("--model", action="append", default=None,
                   help="model name, checkpoint file, or 'niqe'; repeat to compare side by side "
                   "(default: qualiclip)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("-o", "--output", default=None, help="write per-image scores to this CSV")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals (0: none; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of bootstrap and distortions")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                   help="precision of the QualiCLIP models: " + PRECISION_HELP)
    p.add_argument("--workers", type=int, default=2,
                   help="NIQE processes / image decoding threads (default 2)")
    p.add_argument("--dmos", action="store_true",
                   help="a generic CSV's scores are lower-is-better (DMOS)")
    p.add_argument("--crop", type=int, default=512,
                   help="synthetic: centre crop side in pixels, 0 for whole images (default 512)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_run_eval)


def _eval_scorers(args: argparse.Namespace) -> list:
    """One scorer per --model, NIQE included; bad names are usage errors."""
    from qualiclip.evaluate import create_scorer

    names = args.model or ["qualiclip"]
    if len(set(names)) != len(names):
        raise UsageError(f"--model given twice: {names}")
    try:
        return [
            create_scorer(
                name, device=args.device, batch_size=args.batch_size, workers=args.workers,
                precision=args.precision, pooling=args.pooling, formula=args.formula,
                cache_dir=args.cache_dir, trust_torchscript=args.trust_torchscript,
                **({"prompts": args.prompts} if args.prompts and name.lower() != "niqe" else {}),
            )
            for name in names
        ]
    except (ValueError, FileNotFoundError) as exc:
        if isinstance(exc, FileNotFoundError) and "NIQE" not in str(exc):
            raise  # weights that cannot be had: main() reports them (exit 1)
        raise UsageError(str(exc)) from None


def _report_failures(failures: Sequence[tuple[str, str]], label: str) -> None:
    for path, error in failures[:10]:
        # A decoder's message starts with the file's name: it is said once, here.
        reason = error.removeprefix(f"{path}: ")
        print(f"{label}: failed: {path}: {reason}", file=sys.stderr)
    if len(failures) > 10:
        print(f"{label}: ... and {len(failures) - 10} more failures", file=sys.stderr)


def _run_eval_synthetic(args: argparse.Namespace, scorers: list) -> int:
    from qualiclip import evaluate
    from qualiclip.inputs import list_image_paths

    if args.root is None:
        raise UsageError("--dataset synthetic needs --root PRISTINE_DIR")
    try:
        paths = list_image_paths([args.root])
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    paths = paths[: args.limit] if args.limit else paths
    if not paths:
        raise UsageError(f"no images under {args.root}")
    results = evaluate.evaluate_synthetic(
        paths, scorers, crop=args.crop or None, seed=args.seed, progress=not args.no_progress
    )
    print(f"synthetic: {len(paths)} pristine images x 24 types x 5 levels; mean per-image SRCC "
          "of quality against level (+1: quality falls at every level)")
    print(evaluate.format_synthetic(results))
    for r in results:
        _report_failures(r.failures, r.name)
    return EXIT_FAILED if any(r.failures for r in results) else EXIT_OK


def _run_eval(args: argparse.Namespace) -> int:
    from qualiclip import datasets, evaluate

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.bootstrap < 0 or args.batch_size < 1 or args.workers < 0:
        raise UsageError("--bootstrap must be >= 0, --batch-size >= 1, --workers >= 0")
    if args.dataset.lower() == "synthetic":
        return _run_eval_synthetic(args, _eval_scorers(args))
    try:
        ds = datasets.load_dataset(args.dataset, args.root, higher_is_better=not args.dmos)
        ds = ds.head(args.limit)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    inputs = InputFiles.of(p for p, _ in ds.items)
    if args.output:
        try:
            inputs.refuse(args.output, "-o")
        except SameFileError as exc:
            raise UsageError(str(exc)) from None
    scorers = _eval_scorers(args)
    report = evaluate.evaluate_items(
        [(str(p), m) for p, m in ds.items], scorers, dataset=ds.info.name,
        mos_higher_is_better=ds.info.higher_is_better, bootstrap=args.bootstrap,
        seed=args.seed, progress=not args.no_progress,
    )
    direction = "higher" if ds.info.higher_is_better else "lower"
    print(f"dataset: {ds.info.name} ({len(ds.items)} images; labels: {direction} is better; "
          "correlations signed so that positive = agrees with people)")
    print(evaluate.format_table(report))
    if args.output:
        evaluate.write_scores_csv(report, args.output, inputs=inputs)
        print(f"per-image scores written to {args.output}", file=sys.stderr)
    for r in report.models:
        _report_failures(r.failures, r.name)
    return EXIT_FAILED if report.n_failed else EXIT_OK


# --- serve -------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP scoring service (needs the 'serve' extra)",
        description="Serve POST /score (image bytes, or multipart files), GET /models, "
        "GET /healthz and the OpenAPI schema (/docs) with FastAPI and uvicorn. The model is "
        "loaded once; requests are batched. Needs: pip install 'qualiclip[serve]'.",
    )
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--max-bytes", type=int, default=32 * 1024 * 1024,
                   help="largest request body in bytes; larger gets 413 (default 32 MiB)")
    p.add_argument("--max-pixels", type=int, default=24_000_000,
                   help="largest image, width x height; larger gets 413 (default 24e6)")
    p.add_argument("--max-files", type=int, default=64, help="files per request (default 64)")
    p.add_argument("--max-pixels-in-flight", type=int, default=None,
                   help="most decoded pixels held at once over all requests; more images wait "
                   "(default: twice --max-pixels)")
    p.add_argument("--max-request-pixels-in-flight", type=int, default=None,
                   help="the same, per request, so one request cannot take the whole budget "
                   "(default: --max-pixels, one maximal image at a time)")
    p.add_argument("--max-batch-pixels-in-flight", type=int, default=None,
                   help="most decoded pixels of small (batched) images held at once; they never "
                   "wait for large ones (default: two forward passes' worth)")
    p.add_argument("--max-response-bytes", type=int, default=16 * 1024 * 1024,
                   help="most bytes of maps and overlays in one /map response; overlays past it "
                   "are left out (default 16 MiB)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="HOST",
                   help="a host name requests may carry in their Host header (repeat for more; "
                   "'*' any, '*.example.org' its subdomains; default: localhost names when "
                   "listening on loopback, any host otherwise)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds for a request's headers and body to arrive in full; a slower "
                   "client is disconnected (default 60)")
    p.add_argument("--send-timeout", type=float, default=60.0,
                   help="seconds for a client to read the rest of a response once the socket's "
                   "buffers are full; a client that does not is disconnected (default 60)")
    p.add_argument("--keep-alive-timeout", type=int, default=5,
                   help="seconds an idle kept-alive connection stays open (default 5)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long to wait for more images to batch (default 5 ms)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32", help=PRECISION_HELP)
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from qualiclip import serve

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    try:
        serve.require_serve()
        config = serve.ServeConfig(
            max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_files=args.max_files,
            batch_size=args.batch_size, max_wait_ms=args.max_wait_ms, precision=args.precision,
            max_pixels_in_flight=args.max_pixels_in_flight,
            max_request_pixels_in_flight=args.max_request_pixels_in_flight,
            max_batch_pixels_in_flight=args.max_batch_pixels_in_flight,
            max_response_bytes=args.max_response_bytes,
            allowed_hosts=tuple(args.allowed_host) if args.allowed_host else None,
        )
        for flag in ("request_timeout", "send_timeout"):
            if not getattr(args, flag) > 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be positive, got "
                                 f"{getattr(args, flag)}")
        if args.keep_alive_timeout < 1:
            raise ValueError(f"--keep-alive-timeout must be at least 1, got "
                             f"{args.keep_alive_timeout}")
    except (ImportError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    # Loaded here rather than in the app's start-up so a bad name is a one-line usage error.
    model = load_model_from_args(args)
    serve.run(model, config, host=args.host, port=args.port, log_level=args.log_level,
              access_log=not args.no_access_log, request_timeout=args.request_timeout,
              send_timeout=args.send_timeout, keep_alive_timeout=args.keep_alive_timeout)
    return EXIT_OK


# --- export ------------------------------------------------------------------------------------


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the scorer as an ONNX graph (needs the 'onnx' extra)",
        description="Export the whole scorer (normalisation, image tower, prompt features, score "
        "formula) as one ONNX graph from RGB [B, 3, H, W] (uint8 0..255 by default, never "
        "resized) to scores [B], with dynamic batch, height and width. The graph is checked "
        "against PyTorch with ONNX Runtime. Score with it: qualiclip score --model FILE.onnx. "
        "Needs: pip install 'qualiclip[onnx]'.",
    )
    _add_model_options(p)
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--input", choices=("uint8", "float32"), default="uint8",
                   help="input pixels: uint8 0..255 (default) or float32 0..1")
    p.add_argument("--fp16", action="store_true",
                   help="image tower in half precision (for GPU runtimes; head stays fp32)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 13..20 (default 17)")
    p.add_argument("--no-check", action="store_true",
                   help="skip scoring a test batch with ONNX Runtime against PyTorch")
    p.set_defaults(func=_run_export, device="cpu", precision="fp32")  # traced in fp32


def _run_export(args: argparse.Namespace) -> int:
    try:
        from qualiclip import onnx_export
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    target = Path(args.onnx)
    if target.suffix.lower() != ".onnx":
        raise UsageError(f"--onnx {args.onnx}: the file name must end in .onnx")
    if not target.parent.is_dir():
        raise UsageError(f"--onnx {args.onnx}: no folder {target.parent}")
    if str(args.model).lower().endswith(".onnx"):
        raise UsageError(f"--model {args.model} is already an ONNX graph")
    opset = onnx_export.DEFAULT_OPSET if args.opset is None else args.opset
    if opset not in onnx_export.OPSETS:
        raise UsageError(f"--opset must be in {onnx_export.OPSETS[0]}..{onnx_export.OPSETS[-1]}, "
                         f"got {opset}")
    from qualiclip.model import QualiCLIP

    model = load_model_from_args(args)
    if not isinstance(model, QualiCLIP):  # an ONNX graph (its name was refused above already)
        raise UsageError(f"--model {args.model} is already an ONNX graph")
    try:
        result = onnx_export.export_onnx(
            model, target, input_kind=args.input, fp16=args.fp16, opset=opset,
            formula=args.formula, check=not args.no_check,
        )
    except (ImportError, ValueError, TypeError) as exc:  # missing package, unsupported model
        raise UsageError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a failed export is reported in one line
        print(f"qualiclip export: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    checked = ("not checked" if result.max_abs_diff is None
               else f"ONNX Runtime matches PyTorch to {result.max_abs_diff:.1e}")
    print(f"qualiclip export: {model.name} -> {result.path} ({result.size_bytes / 1e6:.1f} MB, "
          f"opset {result.opset}, {args.input} input, {'fp16' if args.fp16 else 'fp32'}; "
          f"{checked})", file=sys.stderr)
    print(result.path)
    return EXIT_OK


# --- entry point -------------------------------------------------------------------------------


# --- tune --------------------------------------------------------------------------------------


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="learn prompt context on opinion scores (QualiCLIP+)",
        description="Learn 16 context vectors per prompt on a rated dataset, the image and text "
        "towers frozen (pyiqa's QualiCLIP+ recipe by default), on a random training split; "
        "report SRCC/PLCC on the held-out split before and after. Writes DIR/prompts.pth "
        "(pyiqa's format: qualiclip score --model BASE --prompts DIR/prompts.pth), "
        "split.json, history.jsonl, evaluation.json and tune-state.pt (--resume). Exit "
        "status: 0 done, 1 a failure or unreadable images, 2 a usage error.",
    )
    p.add_argument("--model", default="qualiclip",
                   help="base weights with a text tower (default: qualiclip)")
    p.add_argument("--dataset", required=True,
                   help="a dataset name (koniq, clive, spaq, biq2021, ...; with --root) or a "
                   "path,score CSV")
    p.add_argument("--root", default=None, help="the dataset's folder")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--epochs", type=int, default=50, help="default 50 (pyiqa's)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N steps (the schedule still spans --epochs; --resume goes on)")
    p.add_argument("--batch-size", type=int, default=8, help="default 8")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam, cosine per epoch (default 2e-3)")
    p.add_argument("--n-ctx", type=int, default=16, help="context vectors per prompt (default 16)")
    p.add_argument("--crop", type=int, default=384, help="random crop side (default 384)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of images held out (default 0.2)")
    p.add_argument("--seed", type=int, default=123, help="split, init, batches (default 123)")
    p.add_argument("--limit", type=int, default=None, help="use the first N images only")
    p.add_argument("--dmos", action="store_true", help="a CSV's scores are lower-is-better")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes (default 2)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="resamples of the final 95%% intervals (default 1000)")
    p.add_argument("--cache-dir", default=None, help="download cache (default: $QUALICLIP_HOME)")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="allow a TorchScript archive as --model FILE")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from qualiclip import tune

    try:
        cfg = tune.TuneConfig(
            model=args.model, dataset=args.dataset, root=args.root, out=args.out,
            n_ctx=args.n_ctx, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            crop=args.crop, flip=not args.no_flip, val_fraction=args.val_fraction,
            seed=args.seed, limit=args.limit, max_steps=args.max_steps, dmos=args.dmos,
            device=args.device, workers=args.workers, bootstrap=args.bootstrap,
            progress=not args.no_progress, cache_dir=args.cache_dir,
            trust_torchscript=args.trust_torchscript,
        )
        result = tune.tune(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        # Checked before the first step: the dataset, the split, the base, the folder.
        raise UsageError(_one_line(exc)) from None
    except (RuntimeError, OSError) as exc:
        from qualiclip.pretrained import ChecksumError, OfflineError

        if isinstance(exc, (OfflineError, ChecksumError)):
            raise
        print(f"qualiclip tune: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    ev = result.evaluation
    print(f"held-out split: {ev['images']} images; SRCC [95% interval] without learned prompts "
          f"{_with_ci(ev['before'], 'srcc')}, with them {_with_ci(ev['after'], 'srcc')}; PLCC "
          f"{_with_ci(ev['before'], 'plcc')} -> {_with_ci(ev['after'], 'plcc')}",
          file=sys.stderr)
    for failure in result.failures[:10]:
        print(f"qualiclip tune: skipped: {failure}", file=sys.stderr)
    print(result.prompts)
    return EXIT_FAILED if result.failures else EXIT_OK


def _with_ci(m: dict, key: str) -> str:
    ci = m.get(f"{key}_ci")
    return f"{m[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qualiclip",
        description="QualiCLIP no-reference image quality assessment.",
    )
    from qualiclip import __version__

    parser.add_argument("--version", action="version", version=f"qualiclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_score, _add_models, _add_degrade, _add_train, _add_tune, _add_eval,
                _add_serve, _add_export):
        add(sub)
    return parser


#: Commands that run many forward passes on a CPU: freed feature maps are kept for the next one
#: (:func:`qualiclip.heap.reuse_freed_memory`).
_FORWARD_PASS_COMMANDS = frozenset({"score", "eval", "train", "tune", "serve"})


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object) -> str:
    return f"qualiclip: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of raising ``SystemExit``.

    Warnings are printed as one line while it runs (``qualiclip: warning: ...``); Python's own
    format is back when it returns, so a program calling ``main`` keeps its own.
    """
    import warnings

    before = warnings.formatwarning
    # A warning is one line for the person at the terminal, not a source line for a developer.
    warnings.formatwarning = _one_line_warning  # type: ignore[assignment]
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = before


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports usage errors (2) and --help (0) this way
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command in _FORWARD_PASS_COMMANDS:
        from qualiclip.heap import reuse_freed_memory

        # A program's choice, made here for the whole process (the library never makes it).
        reuse_freed_memory()
    try:
        with stopping.terminate_as_interrupt():
            return int(args.func(args))
    except UsageError as exc:
        print(f"qualiclip {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutputError as exc:  # a full disk, a read-only folder: the path and the errno
        print(f"qualiclip {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (RuntimeError, FileNotFoundError) as exc:
        from qualiclip.pretrained import ChecksumError, OfflineError

        if not isinstance(exc, (OfflineError, ChecksumError, FileNotFoundError)):
            raise
        # Weights that cannot be had: the message says which file and where to put it.
        print(f"qualiclip {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (143): outputs are complete
        stopped = "terminated" if isinstance(exc, stopping.Terminated) else "interrupted"
        print(f"qualiclip {args.command}: {stopped}", file=sys.stderr)
        return stopping.exit_status(exc)
    except BrokenPipeError:
        # The reader went away (``| head``): what it wanted is written; stop quietly. stdout is
        # pointed at /dev/null so that flushing it at exit does not fail again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
