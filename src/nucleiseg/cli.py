"""The ``nucleiseg`` command line.

Each subcommand has an ``_add_<name>_parser`` that documents every option and a
``_run_<name>`` that does the work by calling the library. User mistakes raise
:class:`~nucleiseg.errors.NucleisegError` and are printed as one line on stderr
with a non-zero exit status; logging goes to stderr, results to files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from . import __version__
from .errors import NucleisegError

log = logging.getLogger("nucleiseg")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the description's line breaks."""


# --------------------------------------------------------------------- prepare
def _add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="(not yet available)", formatter_class=_Formatter)
    p.set_defaults(func=_not_yet)


# ----------------------------------------------------------------------- train
def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="(not yet available)", formatter_class=_Formatter)
    p.set_defaults(func=_not_yet)


# --------------------------------------------------------------------- predict
def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="(not yet available)", formatter_class=_Formatter)
    p.set_defaults(func=_not_yet)


# -------------------------------------------------------------------- evaluate
def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="(not yet available)", formatter_class=_Formatter)
    p.set_defaults(func=_not_yet)


# ---------------------------------------------------------------------- export
def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="(not yet available)", formatter_class=_Formatter)
    p.set_defaults(func=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    raise NucleisegError(f"the '{args.command}' command is not available in this version")


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_prepare_parser,
    _add_train_parser,
    _add_predict_parser,
    _add_evaluate_parser,
    _add_export_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucleiseg",
        description=(
            "Find and outline every cell nucleus in microscopy images with a UNet++ network.\n\n"
            "Typical use:\n"
            "  nucleiseg predict images/*.png -o results/      segment with the shipped model\n"
            "  nucleiseg prepare stage1_train --out cache/      ingest annotated data once\n"
            "  nucleiseg train cache/ --out runs/my-model       train or fine-tune\n"
            "  nucleiseg evaluate --model runs/my-model/best.safetensors cache/   score a model\n\n"
            "Run 'nucleiseg COMMAND --help' for the options of each command."
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"nucleiseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail to stderr")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except NucleisegError as exc:
        print(f"nucleiseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nucleiseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
