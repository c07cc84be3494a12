"""The ``qualiclip`` command line: ``score``, ``models``, ``degrade``, ``train``, ``eval``, ``serve``.

Each subcommand has an ``_add_<name>`` function that declares its arguments and a ``_run_<name>``
function that does the work and returns the exit status: 0 success, 1 when some input failed,
2 for usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command-line mistake: reported on stderr with exit status 2."""


# --- score -------------------------------------------------------------------------------------


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score images (files, folders, globs, '-' for stdin)")
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    raise UsageError("score: not available yet")


# --- models ------------------------------------------------------------------------------------


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named weights and what is cached")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    raise UsageError("models: not available yet")


# --- degrade -----------------------------------------------------------------------------------


def _add_degrade(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("degrade", help="apply synthetic distortions; draw a contact sheet")
    p.set_defaults(func=_run_degrade)


def _run_degrade(args: argparse.Namespace) -> int:
    raise UsageError("degrade: not available yet")


# --- train -------------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="self-supervised QualiCLIP training from pristine images")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    raise UsageError("train: not available yet")


# --- eval --------------------------------------------------------------------------------------


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="correlate scores with human opinion (SRCC/PLCC/KRCC)")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    raise UsageError("eval: not available yet")


# --- serve -------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP scoring service (needs the 'serve' extra)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    raise UsageError("serve: not available yet")


# --- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qualiclip",
        description="QualiCLIP no-reference image quality assessment.",
    )
    from qualiclip import __version__

    parser.add_argument("--version", action="version", version=f"qualiclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_score, _add_models, _add_degrade, _add_train, _add_eval, _add_serve):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of raising ``SystemExit``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports usage errors (2) and --help (0) this way
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"qualiclip {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
