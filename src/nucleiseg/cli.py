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
    import os

    p = sub.add_parser(
        "prepare",
        help="ingest annotated images once into a training cache",
        formatter_class=_Formatter,
        description=(
            "Read annotated images and write a prepared cache for training and evaluation:\n"
            "8-bit RGB images, 0/255 masks, 16-bit instance labels, index.csv, split.csv, manifest.json.\n\n"
            "Layouts of DATA_DIR (detected unless --layout is given):\n"
            "  kaggle      <id>/images/<id>.png + <id>/masks/*.png (one PNG per nucleus),\n"
            "              or the folder holding stage1_train/\n"
            "  paired      images/<name>.<ext> + labels/<name>.<ext> (instance label images,\n"
            "              TIFF or PNG, 8/16/32-bit, as napari, Fiji or StarDist write them)\n"
            "  kaggle-rle  Kaggle image folders (or a folder of images) + --rle-csv\n\n"
            "Running it again only redoes images whose files changed; the split is kept.\n\n"
            "Example:\n"
            "  nucleiseg prepare ../shared/data/dsb2018 --out cache/dsb2018"
        ),
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder with the annotated images")
    p.add_argument(
        "--out",
        "-o",
        metavar="CACHE_DIR",
        required=True,
        default=argparse.SUPPRESS,
        help="cache folder to create or update (required; an existing folder must be empty or a cache)",
    )
    p.add_argument(
        "--layout",
        choices=("auto", "kaggle", "paired", "kaggle-rle"),
        default="auto",
        help="layout of DATA_DIR; auto detects it (kaggle-rle when --rle-csv is given)",
    )
    p.add_argument(
        "--rle-csv",
        metavar="FILE",
        default=None,
        help="Kaggle label CSV (ImageId,EncodedPixels; one row per nucleus) giving the masks",
    )
    p.add_argument(
        "--groups",
        metavar="FILE",
        default="auto",
        help="CSV ImageId,mosaic_group: images of one group stay on one side of the split; "
        "auto uses mosaic_groups.csv in or beside DATA_DIR when present",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of validation images per image kind (fluorescence, tissue, brightfield), 0 <= F < 1",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        metavar="N",
        help="processes reading images in parallel; the default is min(2, CPU count)",
    )
    p.add_argument(
        "--force", action="store_true", help="process every image again, even when up to date (keeps the split)"
    )
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .data.cache import prepare_dataset

    result = prepare_dataset(
        args.data_dir,
        args.out,
        layout=args.layout,
        rle_csv=args.rle_csv,
        groups=None if args.groups == "auto" else args.groups,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        force=args.force,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(
            f"{result.cache_dir}: {len(result.table)} images "
            f"({len(result.processed)} processed, {len(result.reused)} up to date, {len(result.skipped)} skipped)",
            file=sys.stderr,
        )
    return 0


# ----------------------------------------------------------------------- train
def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from .training import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train or fine-tune a UNet++ on annotated images",
        description=(
            "Train a UNet++ (deep supervision, BCE + Dice loss, Adam with AMSGrad) on a prepared cache,\n"
            "or on a raw data folder, which is prepared into DATA/../<name>-cache first.\n"
            "After every epoch the run folder gets metrics.csv, curves.png, last.safetensors,\n"
            "best.safetensors (best validation DSB score) and last_state.pt (for --resume).\n\n"
            "Examples:\n"
            "  nucleiseg train cache/dsb2018 --out runs/dsb --epochs 60\n"
            "  nucleiseg train --resume runs/dsb                 continue an interrupted run\n"
            "  nucleiseg train my_annotations/ --out runs/mine --init default --epochs 15 --lr 3e-4\n"
            "  torchrun --nproc_per_node=2 -m nucleiseg.cli train cache/dsb2018 --out runs/ddp"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("data", nargs="?", help="prepared cache, or a folder in a layout 'prepare' reads")
    p.add_argument("--out", help="run folder for checkpoints and metrics (required unless --resume)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--init", metavar="PATH|default", help="start from a trained model file (fine-tuning)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="number of epochs (with --resume: extend to this many)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="crops per step (per process)")
    p.add_argument("--crop", type=int, default=d.crop, help="side of the square training crops, in pixels")
    p.add_argument("--samples-per-epoch", type=int, default=None, help="crops per epoch (default: number of training images)")
    p.add_argument("--widths", default=",".join(map(str, d.widths)), help="channels per level, comma-separated; depth = count - 1")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="Adam weight decay")
    p.add_argument("--schedule", choices=["cosine", "plateau"], default=d.schedule,
                   help="warm-up then cosine decay, or halve the rate on a validation-loss plateau")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up length (cosine)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=d.precision,
                   help="auto = bf16 where the processor runs it natively")
    p.add_argument("--augment", type=float, default=d.augment_strength, dest="augment_strength",
                   help="photometric augmentation strength, 0 = flips/rotations/crops only")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default: 0 on <= 2 cores, else 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for weights, sampling and augmentation")
    p.add_argument("--val-every", type=int, default=d.val_every, help="validate every N epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (quick checks)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .training import TrainConfig, train

    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "train_config.json"
        if not saved.is_file():
            raise NucleisegError("not a training run folder (no train_config.json)", run_dir)
        data = args.data or _cache_of_run(run_dir)
        config = TrainConfig(epochs=args.epochs) if args.epochs != TrainConfig().epochs else None
        best = train(data, run_dir, config, resume=True, max_steps=args.max_steps)
    else:
        if not args.data or not args.out:
            raise NucleisegError("train needs DATA and --out RUN_DIR (or --resume RUN_DIR)")
        try:
            widths = tuple(int(w) for w in str(args.widths).split(","))
        except ValueError:
            raise NucleisegError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
        out = Path(args.out)
        if (out / "last_state.pt").exists():
            raise NucleisegError("already holds a training run; use --resume to continue it or choose another --out", out)
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, crop=args.crop, samples_per_epoch=args.samples_per_epoch,
            widths=widths, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
            warmup_epochs=args.warmup_epochs, precision=args.precision, workers=args.workers, seed=args.seed,
            augment_strength=args.augment_strength, init=args.init, val_every=args.val_every, threads=args.threads,
        )
        best = train(_as_cache(Path(args.data)), out, config, max_steps=args.max_steps)
    log.info("best model: %s", best)
    return 0


def _as_cache(data: "Path") -> "Path":
    """A prepared cache as is; a raw data folder is prepared next to itself first."""
    from .data.cache import prepare_dataset

    if not data.exists():
        raise NucleisegError("no such folder", data)
    if (data / "manifest.json").is_file() and (data / "index.csv").is_file():
        return data
    cache = data.parent / f"{data.name}-cache"
    log.info("preparing %s into %s", data, cache)
    prepare_dataset(data, cache)
    return cache


def _cache_of_run(run_dir: "Path") -> "Path":
    import json
    from pathlib import Path

    config = json.loads((run_dir / "train_config.json").read_text())
    cache = config.get("cache")
    if not cache:
        raise NucleisegError("give the data folder: the run does not record its cache", run_dir)
    return Path(cache)


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
