"""The ``nucleiseg`` command line.

Each subcommand has an ``_add_<name>_parser`` that documents every option and a
``_run_<name>`` that does the work by calling the library. User mistakes raise
:class:`~nucleiseg.errors.NucleisegError` and are printed as one line on stderr
with a non-zero exit status; logging goes to stderr, results to files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import NucleisegError, OptionError

log = logging.getLogger("nucleiseg")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the description's line breaks.

    A default of None says nothing ("default: None"), and a help text that states its default already
    keeps it in its own words.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


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
            "Running it again only redoes images whose files changed or whose cache files were damaged\n"
            "(a damaged index.csv is rebuilt); the split is kept (a damaged split.csv is drawn again, with a warning).\n\n"
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
    p.add_argument(
        "--binary-masks",
        choices=("refuse", "split"),
        default="refuse",
        help="a label file that is a binary mask (one value, e.g. 255, over several separate blobs) rather than "
        "instance labels: refuse stops with an error naming it; split numbers each blob as one nucleus, with a "
        "warning (touching nuclei stay merged)",
    )
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .data.cache import prepare_dataset
    from .data.paired import BinaryMaskError

    try:
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
            binary_masks=args.binary_masks,
        )
    except BinaryMaskError as exc:  # the library's words for the choice -> this option
        raise NucleisegError(str(exc).replace("choose to split binary masks", "use --binary-masks split")) from None
    if not args.quiet:
        print(
            f"{result.cache_dir}: {len(result.table)} images "
            f"({len(result.processed)} processed, {len(result.reused)} up to date, {len(result.skipped)} skipped)",
            file=sys.stderr,
        )
    return 0


# ----------------------------------------------------------------------- train
class _TrainDefault:
    """A default of :class:`~nucleiseg.training.TrainConfig`, read (importing PyTorch) only when shown or used.

    So that building the parser, ``--help`` and ``--version`` import nothing heavy.
    """

    def __init__(self, name: str, render: Callable[[object], object] | None = None):
        self.name, self.render = name, render

    def resolve(self) -> object:
        from .training import TrainConfig

        value = getattr(TrainConfig(), self.name)
        return self.render(value) if self.render else value

    def __str__(self) -> str:
        return str(self.resolve())

    __repr__ = __str__


class _TrainDefaults:
    def __getattr__(self, name: str) -> _TrainDefault:
        return _TrainDefault(name)


def _weights_text(weights: object) -> str:
    return ",".join(f"{k}={v:g}" for k, v in weights.items())  # type: ignore[attr-defined]


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    d = _TrainDefaults()
    p = sub.add_parser(
        "train",
        help="train or fine-tune a UNet++ on annotated images",
        description=(
            "Train a UNet++ (deep supervision, BCE + Dice loss, Adam with AMSGrad) on a prepared cache,\n"
            "or on a raw data folder, which is prepared into DATA/../<name>-cache first.\n"
            "After every epoch the run folder gets metrics.csv, curves.png, last.safetensors,\n"
            "best.safetensors (best validation DSB score) and last_state.pt (for --resume).\n"
            "--resume continues a run with its own settings (its train_config.json) from the step it\n"
            "reached; only --epochs (the run's new length), --max-steps and DATA go with it.\n\n"
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
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from the step it reached (within an epoch after --max-steps), "
                   "with the settings in its train_config.json; only --epochs, --max-steps and DATA go with it")
    p.add_argument("--init", metavar="PATH|default",
                   help="start from a trained model file (fine-tuning); the network keeps that model's widths")
    p.add_argument("--epochs", type=int, default=d.epochs, help="number of epochs (with --resume: change the run's length to this many)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="crops per step (per process)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="crops per forward/backward pass, gradients accumulated over the batch (default: 4 on a CPU, the whole batch on a GPU)")
    p.add_argument("--crop", type=int, default=d.crop,
                   help="side of the square training crops, in pixels: a multiple of 2**depth, at least twice 2**depth "
                   "(the default widths: a multiple of 16, at least 32)")
    p.add_argument("--samples-per-epoch", type=int, default=None, help="crops per epoch (default: number of training images)")
    p.add_argument("--widths", default=_TrainDefault("widths", lambda w: ",".join(map(str, w))), help="channels per level, comma-separated; depth = count - 1 (with --init: those of the model, "
                   "which fine-tuning keeps)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="Adam weight decay")
    p.add_argument("--schedule", choices=["cosine", "plateau"], default=d.schedule,
                   help="warm-up then cosine decay, or halve the rate on a validation-loss plateau")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up length (cosine)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=d.precision,
                   help="auto = bf16 where the processor runs it natively")
    p.add_argument("--augment", type=float, default=d.augment_strength, dest="augment_strength",
                   help="photometric augmentation strength, 0 = flips/rotations/crops only")
    p.add_argument("--stain-augment", type=float, default=d.stain_augment, metavar="P",
                   help="probability (0 to 1) of an H&E stain jitter (colour deconvolution) on stained-tissue crops")
    p.add_argument("--kind-weights", metavar="KIND=W,...", default=_TrainDefault("kind_weights", _weights_text),
                   help="how often each image kind is drawn relative to the others (not 0 for all the kinds trained on)")
    p.add_argument("--channel-weights", metavar="CHANNEL=W,...",
                   default=_TrainDefault("channel_weights", _weights_text),
                   help="weight of each output channel in the loss, e.g. touch=3 to stress where nuclei meet")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default: 0 on <= 2 cores, else 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for weights, sampling and augmentation")
    p.add_argument("--val-every", type=int, default=d.val_every, help="validate every N epochs")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimisation steps, counted from the run's start (quick checks); "
                   "the state is saved there, and --resume continues from that step")
    # each option's name on the command line, to say which ones do not go with --resume
    p.set_defaults(func=_run_train, train_options={a.dest: a.option_strings[0] if a.option_strings else a.dest.upper()
                                                   for a in p._actions if a.dest != "help"})


#: library arguments whose flag is not "--" + the name with dashes
_LIBRARY_FLAGS = {"out_dir": "--out", "inputs": "INPUT"}

# TrainConfig fields whose option is not "--" + the field with dashes
_TRAIN_OPTIONS = {"augment_strength": "--augment", "lr": "--lr"}
#: what may go with --resume: the run's new length, a stop, the data (by default the run's own cache)
_RESUME_OPTIONS = ("resume", "epochs", "max_steps", "data")


def _run_train(args: argparse.Namespace) -> int:
    from .training import TrainConfigError

    try:
        return _train(args)
    except TrainConfigError as exc:  # the library names its field; say the option instead
        raise NucleisegError(exc.reworded(_TRAIN_OPTIONS.get(exc.field, "--" + exc.field.replace("_", "-")))) from None


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .training import TrainConfig, check_max_steps, init_widths, train

    # an option left out holds None or its _TrainDefault: given ones are told apart before the defaults are filled in
    given = [name for name in args.train_options
             if getattr(args, name) is not None and not isinstance(getattr(args, name), _TrainDefault)]
    for name, value in vars(args).items():
        if isinstance(value, _TrainDefault):
            setattr(args, name, value.resolve())
    check_max_steps(args.max_steps)  # before a raw data folder is prepared
    if args.resume:
        run_dir = Path(args.resume)
        refused = [args.train_options[name] for name in given if name not in _RESUME_OPTIONS]
        if refused:
            raise NucleisegError(f"{', '.join(refused)} cannot be combined with --resume: the run keeps its own settings "
                                 f"(in {run_dir / 'train_config.json'}); --resume takes only --epochs, --max-steps "
                                 "and DATA")
        saved = run_dir / "train_config.json"
        if not saved.is_file():
            raise NucleisegError("not a training run folder (no train_config.json)", run_dir)
        data = args.data or _cache_of_run(run_dir)
        config = TrainConfig(epochs=args.epochs) if "epochs" in given else None
        best = train(data, run_dir, config, resume=True, max_steps=args.max_steps, progress=not args.quiet)
    else:
        if not args.data or not args.out:
            raise NucleisegError("train needs DATA and --out RUN_DIR (or --resume RUN_DIR)")
        try:
            widths = tuple(int(w) for w in str(args.widths).split(","))
        except ValueError:
            raise NucleisegError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
        if args.init and "widths" in given and widths != init_widths(args.init):
            raise NucleisegError(f"--widths {args.widths} cannot be combined with --init {args.init}, whose widths are "
                                 f"{','.join(map(str, init_widths(args.init)))}: a fine-tuned network keeps the widths "
                                 "of the model it starts from; leave --widths out")
        out = Path(args.out)
        if (out / "last_state.pt").exists():
            raise NucleisegError("already holds a training run; use --resume to continue it or choose another --out", out)
        d = TrainConfig()
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, micro_batch=args.micro_batch, crop=args.crop,
            samples_per_epoch=args.samples_per_epoch,
            kind_weights=_parse_weights(args.kind_weights, "--kind-weights", d.kind_weights, "kind")
            if args.kind_weights else dict(d.kind_weights),
            channel_weights=_parse_weights(args.channel_weights, "--channel-weights", d.channel_weights, "channel")
            if args.channel_weights else dict(d.channel_weights),
            widths=widths, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
            warmup_epochs=args.warmup_epochs, precision=args.precision, workers=args.workers, seed=args.seed,
            augment_strength=args.augment_strength, stain_augment=args.stain_augment, init=args.init, val_every=args.val_every, threads=args.threads,
        )
        best = train(_as_cache(Path(args.data)), out, config, max_steps=args.max_steps, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        log.info("best model: %s", best)
    return 0


def _parse_weights(text: str, option: str, defaults: dict[str, float], what: str) -> dict[str, float]:
    """``"tissue=3,brightfield=6"`` -> ``defaults`` with those two replaced (``what``: "kind", "channel")."""
    weights = dict(defaults)
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise NucleisegError(f"{option}: unknown {what} {name!r}; the {what}s are {', '.join(defaults)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise NucleisegError(f"{option}: {item!r} is not {what.upper()}=NUMBER") from None
        if not weights[name] >= 0 or weights[name] == float("inf"):  # also refuses nan
            raise NucleisegError(f"{option}: {name}'s weight must be a finite number >= 0, got {value}")
    if not any(weights.values()):
        raise NucleisegError(f"{option}: at least one {what} needs a weight above 0")
    return weights


def _as_cache(data: Path) -> Path:
    """A prepared cache as is; a raw data folder is prepared next to itself first."""
    from .data.cache import Cache, cache_beside, prepare_dataset

    if not data.exists():
        raise NucleisegError("no such folder", data)
    if Cache.is_cache(data):
        return data
    cache = cache_beside(data)
    log.info("preparing %s into %s", data, cache)
    prepare_dataset(data, cache)
    return cache


def _cache_of_run(run_dir: Path) -> Path:
    from pathlib import Path

    from .training import TrainConfig

    cache = TrainConfig.from_json(run_dir / "train_config.json").cache
    if not cache:
        raise NucleisegError("give the data folder: the run does not record its cache", run_dir)
    return Path(cache)


# --------------------------------------------------------------------- predict
def _formats(text: str) -> tuple[str, ...]:
    """Parse --formats: a comma-separated subset of the batch module's formats ('' or 'none' for none)."""
    from .batch import check_formats

    try:
        return check_formats(text)
    except NucleisegError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    from .batch import FORMATS
    from .options import MODES, PRECISIONS, PredictOptions

    p = sub.add_parser(
        "predict",
        help="find and outline the nuclei in images",
        formatter_class=_Formatter,
        description=(
            "Segment every nucleus in each image and write, per image <name> (the file name without\n"
            "its extension), into OUT_DIR:\n"
            "  <name>_labels.tif         instance labels (16-bit; 32-bit past 65,535 nuclei), 0 = background\n"
            "  <name>_mask.png           nuclei in white (255) on black\n"
            "  <name>_overlay.png        the image with each nucleus outlined in its own colour\n"
            "  <name>_nuclei.csv         one row per nucleus: label, area, centroid, bounding box,\n"
            "                            equivalent diameter, eccentricity, mean intensity (grey image)\n"
            "  <name>_probabilities.tif  with --save-probabilities: float32 body/contour/touch maps\n"
            "  <name>_rois.zip           with --formats imagej-roi: ImageJ/Fiji ROI Manager polygons\n"
            "  <name>.geojson            with --formats geojson: QuPath detections (File > Import objects)\n"
            "and for the run: summary.csv (image, nuclei, mean area, status, message) and, with\n"
            "--formats rle, submission.csv (Kaggle DSB ImageId,EncodedPixels).\n\n"
            "INPUT: image files (PNG, JPEG, TIFF, BMP; 8/16-bit; grey, RGB or RGBA), folders (the\n"
            "images directly inside) or glob patterns ('plates/*.tif', expanded here when the shell\n"
            "did not). Two inputs with the same name get unique ones (<name>-2, ...), reported.\n\n"
            "A bad image (missing, empty, truncated, not an image, smaller than 16x16 pixels) gets one\n"
            "error line and the others are still segmented; the exit status is then 1. An image\n"
            "without nuclei (e.g. all black) is valid: a warning, and its outputs are written.\n"
            "An image's outputs are complete or absent: they are written aside and moved into OUT_DIR\n"
            "as a unit (bookkeeping in OUT_DIR/.nucleiseg/). An image already done is skipped with a\n"
            "message (not an error) unless --overwrite is given, which replaces its whole output set;\n"
            "an image that a killed run left unfinished is redone. summary.csv and submission.csv are\n"
            "rewritten by every run and cover all its inputs. OUT_DIR is checked to be writable before\n"
            "any work; one run at a time writes into it (a second is refused). An OUT_DIR where an\n"
            "output would replace an input image is refused. An image that fails leaves none of its\n"
            "new outputs behind.\n\n"
            "Examples:\n"
            "  nucleiseg predict images/ -o results/\n"
            "  nucleiseg predict 'plate1/*.tif' --mode fast --formats imagej-roi,geojson -o results/\n"
            "  nucleiseg predict stained/ --channel 3 -o results/      (DAPI in the third channel)\n"
            "  nucleiseg predict big_slide.tif --model runs/my-model --tile 1024 -o results/"
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("-o", "--out", metavar="OUT_DIR", required=True, default=argparse.SUPPRESS,
                   help="folder for the outputs (created if needed; required)")
    p.add_argument("--model", metavar="PATH|default", default="default",
                   help="model file (.safetensors) or training run folder; 'default' is the shipped model")
    p.add_argument("--mode", choices=MODES, default=PredictOptions.mode,
                   help="accurate: all UNet++ heads averaged; fast: only the pruned sub-network "
                   "stored with the model (several times faster)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over the 8 flips/rotations (8x slower)")
    d = PredictOptions()
    p.add_argument("--channel", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="segment only channel N (1 = first, as in Fiji) of multi-channel images, e.g. the "
                   "DAPI/Hoechst channel of a fluorescence TIFF; the overlay and the intensities in "
                   "<name>_nuclei.csv use that channel too (default: all channels, as colour; a 2-channel image "
                   "is read as grey + alpha, so only its first channel counts)")
    p.add_argument("--tile", type=int, default=d.tile, metavar="PX",
                   help="predict images larger than this in overlapping tiles of this side, a multiple of the "
                   "network's pooling grid (16 for the shipped model); 0: never tile")
    p.add_argument("--overlap", type=int, default=d.overlap, metavar="PX",
                   help="overlap of neighbouring tiles, at most half the tile")
    _add_scale_options(p)
    p.add_argument("--min-size", type=int, default=argparse.SUPPRESS, metavar="PX",
                   help="drop nuclei smaller than this many pixels (default: the model's setting)")
    p.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="tiles per forward pass (default: about 1 Mpixel of tiles, ~2 GB for the shipped model in fp32)")
    p.add_argument("--precision", choices=PRECISIONS, default=PredictOptions.precision,
                   help="network arithmetic; auto: bf16 where the processor or GPU runs it natively")
    p.add_argument("--device", default=PredictOptions.device,
                   help="cpu, cuda, cuda:1, ...; auto: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="CPU threads for the network (default: PyTorch's choice)")
    p.add_argument("--workers", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="worker processes for batches of 16 images or more: on a CPU each segments whole images "
                   "with its share of the cores (each first loads PyTorch and the model); with --device cuda "
                   "they label, measure and write while the network runs. Default: on a CPU, two images at a "
                   "time in threads of this process, each with half of the network's threads (images up to "
                   "about a megapixel; larger ones one at a time afterwards); on a GPU one image at a time. "
                   "0: one image at a time. Same outputs either way")
    p.add_argument("--formats", type=_formats, default="none", metavar="LIST",
                   help=f"extra outputs, comma-separated: {', '.join(FORMATS)}")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write <name>_probabilities.tif (float32, channels x height x width)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo images already done, replacing their whole output set, instead of skipping them")
    p.add_argument("--cluster", default=None, metavar="local:N|ADDRESS",
                   help="run on a Dask cluster (pip install 'nucleiseg[cluster]'): local:N starts N worker "
                   "processes here, each with its share of the cores; ADDRESS (tcp://host:8786) uses a running "
                   "scheduler, e.g. one started by dask-jobqueue on SLURM (workers must see the same files). "
                   "Same outputs as without it. Images over 64 Mpixel (8000x8000) and .zarr folders (OME-Zarr) "
                   "are cut into overlapping blocks spread over the workers, and write <name>_labels.ome.zarr "
                   "(NGFF labels) and <name>_nuclei.csv (and <name>.geojson with --formats geojson) instead; "
                   "a re-run resumes from their finished blocks")
    p.add_argument("--block-size", type=int, default=None, metavar="PX",
                   help="with --cluster: core side of the blocks of large images, a multiple of 16 (default "
                   "2048; a worker then peaks at about 1.5 GiB with the shipped model). Larger blocks need more "
                   "memory per worker and read less overlap")
    p.set_defaults(func=_run_predict)


def _predict_options(args: argparse.Namespace):
    """The PredictOptions the flags of predict / evaluate ask for (checked)."""
    from .options import PredictOptions

    values = {
        "mode": args.mode, "tta": args.tta, "tile": getattr(args, "tile", None),
        "overlap": getattr(args, "overlap", None), "batch_size": getattr(args, "batch_size", None),
        "precision": getattr(args, "precision", None), "device": getattr(args, "device", None),
        "scale": getattr(args, "scale", None), "diameter": getattr(args, "diameter", None),
        "channel": getattr(args, "channel", None), "min_size": getattr(args, "min_size", None),
    }
    return PredictOptions.from_any(None, **values)  # None: the option's default; tile 0: never tile


def _run_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    def say(kind: str, message: str) -> None:
        if kind == "note" and args.quiet:  # -q: warnings and errors only
            return
        tqdm.write(f"nucleiseg predict: {kind}: {message}", file=sys.stderr)

    options = _predict_options(args)
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise NucleisegError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    try:
        summary = _predict_files(args, options, say)
    except NucleisegError as exc:
        from .models import DEFAULT_MODEL_PATH

        if args.model == "default" and exc.path == DEFAULT_MODEL_PATH:
            raise NucleisegError(f"{exc}; pass --model MODEL_FILE (a .safetensors file or a training run folder)") from None
        raise
    if not args.quiet:
        counts = summary["status"].value_counts()
        print(f"{args.out}: {counts.get('ok', 0)} images segmented, {counts.get('skipped', 0)} skipped, "
              f"{counts.get('failed', 0)} failed (see {Path(args.out) / 'summary.csv'})", file=sys.stderr)
    return 1 if (summary["status"] == "failed").any() else 0


def _predict_files(args: argparse.Namespace, options, say):
    from .batch import predict_files

    return predict_files(args.inputs, args.out, model=args.model, options=options, formats=args.formats,
                         save_probabilities=args.save_probabilities, overwrite=args.overwrite,
                         progress=False if args.quiet else None, say=say, cluster=args.cluster,
                         block_size=args.block_size,
                         workers=getattr(args, "workers", None))


# -------------------------------------------------------------------- evaluate
def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a model or predicted labels against annotations",
        formatter_class=_Formatter,
        description=(
            "Score a model (or a folder of predicted label images) against annotated images and write\n"
            "OUT_DIR/per_image.csv, OUT_DIR/summary.json and OUT_DIR/report.png (3 best and 3 worst\n"
            "images with outlines, and the histogram of per-image scores); a short table goes to stdout.\n\n"
            "Scores: DSB 2018 instance score and AP@0.5 (means over images); pixel F1, IoU and ROC AUC\n"
            "(pixels of all images pooled); with a model also the connected-components baseline DSB,\n"
            "so the watershed's gain is visible. Overall and per image kind.\n\n"
            "DATA is a prepared cache (nucleiseg prepare) or a data folder 'prepare' reads; such a folder\n"
            "is prepared into DATA-cache beside it first, as 'train' does.\n\n"
            "Examples:\n"
            "  nucleiseg evaluate cache/dsb2018 --model runs/dsb --out eval/dsb\n"
            "  nucleiseg evaluate cache/dsb2018 --labels results/ --split all --out eval/other-tool"
        ),
    )
    p.add_argument("data", metavar="DATA", help="prepared cache, or a folder in a layout 'prepare' reads")
    p.add_argument("--out", "-o", metavar="OUT_DIR", required=True, default=argparse.SUPPRESS,
                   help="folder for per_image.csv, summary.json and report.png (required)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH|default", default=None,
                        help="model file or training run folder to score (default: the shipped model)")
    source.add_argument("--labels", metavar="PRED_DIR", default=None,
                        help="score predicted label images instead: PRED_DIR/<image_id>.tif|.png or "
                        "<image_id>_labels.tif (as 'predict' writes); a missing one is warned about and scores 0")
    p.add_argument("--split", choices=("val", "train", "all"), default=None,
                   help="images to score (default: val for a cache, all for a data folder prepared now)")
    p.add_argument("--mode", choices=("accurate", "fast"), default="accurate",
                   help="accurate: all UNet++ heads averaged; fast: the pruned network stored with the model")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations (8x slower)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="arithmetic of the network (default: the inference default)")
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="predict large images in tiles of this side (default: the inference default)")
    p.add_argument("--overlap", type=int, default=None, metavar="PX",
                   help="overlap of neighbouring tiles (default: the inference default)")
    p.add_argument("--honest", action=argparse.BooleanOptionalAction, default=None,
                   help="also estimate the score of thresholds chosen without the scored image (tune's choice "
                        "cross-validated by mosaic group and kind) and print it first; default: when the "
                        "model's thresholds were tuned on the split scored, the estimate tune stored (free), else "
                        "computed (costs tune's grid search)")
    _add_scale_options(p)
    p.set_defaults(func=_run_evaluate)


def _add_scale_options(p: argparse.ArgumentParser) -> None:
    """--scale / --diameter, for nuclei much larger or smaller than the training data's."""
    size = p.add_mutually_exclusive_group()
    size.add_argument("--diameter", type=_diameter, default=argparse.SUPPRESS, metavar="PX|auto",
                      help="typical nucleus diameter in your images, in pixels: the images are resized so it matches "
                      "the training nuclei's (the default model: 18 px, most images 10-47 px); give it when your "
                      "nuclei lie well outside that range, e.g. --diameter 36 for nuclei twice as wide. 'auto' "
                      "measures the nuclei of a first pass and predicts again, resized, the images whose nuclei "
                      "are more than 1.4x off (default: no resizing)")
    size.add_argument("--scale", type=float, default=argparse.SUPPRESS, metavar="FACTOR",
                      help="resize the images by FACTOR for the network (outputs keep the image's size): "
                      "0.5 for nuclei twice as wide as the training nuclei, 2 for half as wide; an image is never "
                      "enlarged past 64 Mpixel (default: 1)")


def _diameter(text: str) -> float | str:
    """--diameter's value: a number of pixels or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or 'auto', got {text!r}") from None


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_dataset, format_summary

    if args.labels is not None and (args.tta or args.mode != "accurate" or args.precision or args.tile or args.overlap
                                    or hasattr(args, "scale") or hasattr(args, "diameter") or args.honest):
        raise NucleisegError("--mode, --tta, --precision, --tile, --overlap, --scale, --diameter and --honest go "
                             "with --model, not --labels")
    _, summary, paths = evaluate_dataset(
        args.data,
        args.out,
        model=args.model,
        labels_dir=args.labels,
        split=args.split,
        options=None if args.labels is not None else _predict_options(args),
        progress=not args.quiet,
        honest=args.honest,
    )
    print(format_summary(summary))
    log.info("wrote %s, %s and %s", paths["per_image"], paths["summary"], paths["report"])
    return 0


# ------------------------------------------------------------------------ tune
def _add_tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="choose a model's post-processing thresholds on validation images",
        formatter_class=_Formatter,
        description=(
            "Predict the validation images of a prepared cache once, grid-search the watershed's\n"
            "thresholds (foreground, seed, minimum seed size, minimum object size) for the best mean\n"
            "DSB score, and pick the fast mode's prune level (the smallest within 0.03 DSB of the\n"
            "accurate mode). An image kind (fluorescence, tissue, brightfield: read from the pixels)\n"
            "with 5 or more images whose own best thresholds score 0.01 DSB higher, and still gain on\n"
            "held-out mosaics (cross-validated by mosaic group), keeps them, and\n"
            "prediction uses them for images of that kind. All are stored in the model file's\n"
            "metadata ('postprocess', 'postprocess_by_kind', 'fast_prune_level'); the weights are\n"
            "not changed (--float16 only rounds them). Prints first the honest estimate (the same choice\n"
            "cross-validated by mosaic group and kind: thresholds chosen on other images than those\n"
            "scored), then the validation DSB before and after, per kind.\n\n"
            "Example:\n"
            "  nucleiseg tune cache/dsb2018 --model runs/dsb/best.safetensors"
        ),
    )
    p.add_argument("cache", metavar="CACHE", help="prepared cache (nucleiseg prepare)")
    p.add_argument("--model", metavar="PATH", required=True, default=argparse.SUPPRESS,
                   help="model file or training run folder to tune (required)")
    p.add_argument("--out", "-o", metavar="MODEL_OUT", default=None,
                   help="write the tuned model here instead of updating --model in place")
    p.add_argument("--split", choices=("val", "train", "all"), default="val", help="images to tune on")
    p.add_argument("--float16", action="store_true",
                   help="store the weights as 16-bit floats: half the file size; they are computed in float32 "
                        "as before, only rounded")
    p.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from .honest import format_estimate
    from .tuning import tune_model

    if args.out is None and str(args.model) == "default":
        raise NucleisegError("the shipped default model is never changed in place: give --out FILE")
    result = tune_model(args.cache, args.model, args.out, split=args.split, progress=not args.quiet,
                        float16=args.float16)
    p = result.params
    if result.honest:
        print(format_estimate(result.honest, "honest estimate of the tuned thresholds, accurate mode"))
    print(f"validation DSB ({result.n_images} images, accurate mode; thresholds chosen on these images): "
          f"{result.dsb_before:.4f} before, {result.dsb_after:.4f} after tuning")
    print(f"postprocess: foreground_threshold={p.foreground_threshold} seed_threshold={p.seed_threshold} "
          f"min_seed_size={p.min_seed_size} min_size={p.min_size}")
    for kind, entry in result.kinds.items():
        own = entry.get("dsb_own_thresholds")
        line = f"  {kind} ({entry['n_images']} images): DSB {entry['dsb_shared_thresholds']:.4f} with these"
        if own is None:
            line += " (too few images for thresholds of its own)"
        else:
            line += f", {own:.4f} with its own best" + (" -> kept: " + " ".join(
                f"{k}={v}" for k, v in result.by_kind[kind].to_dict().items()) if kind in result.by_kind else
                " (not kept: no gain on held-out mosaics)" if entry.get("confirmed_by_cross_validation") is False
                else " (not kept)")
        print(line)
    levels = ", ".join(f"{k}: {v:.4f}" for k, v in result.fast_dsb.items())
    print(f"fast mode: prune level {result.fast_prune_level} (DSB per level {levels})")
    print(f"wrote {result.path}")
    return 0


# ---------------------------------------------------------------------- export
def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as ONNX, or as a bioimage.io model package, for other runtimes",
        formatter_class=_Formatter,
        description=(
            "Write a model file as an ONNX graph from the normalised image to the probabilities, with\n"
            "its BatchNorms folded, for ONNX Runtime, OpenVINO, TensorRT or DeepImageJ:\n"
            "  input  'image'          float32 N x 3 x H x W; N, H and W dynamic, H and W multiples of\n"
            "                          2**depth (16 for the default network): pad by reflection, crop after.\n"
            "                          Values as nucleiseg.preprocess.normalize gives them (1st/99.8th\n"
            "                          percentiles of the 8-bit RGB image to 0/1, clipped to [-0.5, 1.5]).\n"
            "  output 'probabilities'  float32 N x C x H x W in [0, 1] (C = 3: body, contour, touch).\n"
            "The model's metadata (channels, postprocess thresholds, preprocess, config) and the export's\n"
            "settings (mode, prune_level, input_multiple) are stored as JSON in the ONNX metadata_props.\n\n"
            "Needs the optional packages onnx and onnxscript: pip install 'nucleiseg[onnx]'.\n\n"
            "--format bioimageio writes a bioimage.io model package (spec 0.5 zip) for deepImageJ, ilastik,\n"
            "QuPath, BiaPy or bioimageio.core: the same probabilities, with the percentile pre-processing,\n"
            "test tensors, the model card, and weights as pytorch_state_dict, torchscript and onnx.\n"
            "`bioimageio test nucleiseg.zip` checks it. Needs bioimageio.spec: pip install 'nucleiseg[bioimageio]'.\n\n"
            "Examples:\n"
            "  nucleiseg export --format onnx default -o nuclei.onnx\n"
            "  nucleiseg export --format onnx runs/my-model --mode fast -o nuclei-fast.onnx\n"
            "  nucleiseg export --format bioimageio -o nucleiseg.zip"
        ),
    )
    p.add_argument("model", metavar="MODEL_IN", nargs="?", default="default",
                   help="model file, training run folder (its best.safetensors) or 'default' (the shipped model)")
    p.add_argument("--out", "-o", metavar="OUT", required=True, default=argparse.SUPPRESS,
                   help="file to write, e.g. nuclei.onnx or nucleiseg.zip (required); an existing file is replaced "
                   "only when it is an earlier export of the same format (an ONNX model, a bioimage.io package)")
    p.add_argument("--format", choices=("onnx", "bioimageio"), default="onnx",
                   help="onnx: an ONNX graph; bioimageio: a bioimage.io model package (.zip)")
    p.add_argument("--mode", choices=("accurate", "fast"), default="accurate",
                   help="accurate: mean of all UNet++ heads; fast: only the pruned network stored with the model")
    p.add_argument("--prune-level", type=int, default=None, metavar="K",
                   help="export head K alone (1..depth), whatever --mode says; None: as --mode says")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset of the graph (with --format bioimageio: of its onnx weights), written as asked or "
                   "refused: torch's dynamo exporter writes 18 and above, its TorchScript exporter 9 to 17 (the "
                   "newest depends on the torch installed; an opset it cannot write is refused, naming those it "
                   "can); None: the exporter's default")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_bioimageio, export_onnx, read_onnx_metadata

    if args.format == "bioimageio":
        path = export_bioimageio(args.model, args.out, mode=args.mode, prune_level=args.prune_level, opset=args.opset)
        onnx = "onnx" if args.opset is None else f"onnx (opset {args.opset})"
        print(f"wrote {path}: bioimage.io model package (spec 0.5), weights pytorch_state_dict, torchscript, {onnx}; "
              f"check it with: bioimageio test {path}")
        return 0

    path = export_onnx(args.model, args.out, mode=args.mode, prune_level=args.prune_level, opset=args.opset)
    meta = read_onnx_metadata(path)
    level = meta.get("prune_level")
    how = "accurate mode (all heads)" if level is None else f"fast mode (head {level})"
    how += "" if args.opset is None else f", opset {args.opset}"
    print(f"wrote {path}: {how}; input 'image' N x 3 x H x W with H, W multiples of {meta.get('input_multiple')}, "
          f"output 'probabilities' ({', '.join(meta.get('channels', []))})")
    return 0


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_prepare_parser,
    _add_train_parser,
    _add_predict_parser,
    _add_evaluate_parser,
    _add_tune_parser,
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
            "  nucleiseg evaluate cache/ --model runs/my-model --out report/   score a model\n\n"
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
    except OptionError as exc:  # the library's name for an option, as its flag here
        flag = _LIBRARY_FLAGS.get(exc.option, "--" + exc.option.replace("_", "-"))
        print(f"nucleiseg {args.command}: error: {exc.reworded(flag)}", file=sys.stderr)
        return 2
    except NucleisegError as exc:
        print(f"nucleiseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nucleiseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
