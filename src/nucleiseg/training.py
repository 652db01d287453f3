"""Training UNet++ on a prepared cache: one epoch loop, checkpoints, resume, DDP.

A run folder holds everything about one training::

    RUN_DIR/
      train_config.json    the settings (resume reads them back)
      last_state.pt        model + optimizer + scheduler + the epoch and step reached, after every epoch
                           (and where max_steps stopped the run, mid-epoch)
      last.safetensors     the latest weights as a model file (predict, --init)
      best.safetensors     the weights with the best validation score so far
      metrics.csv          one row per epoch (``steps``: the steps it holds; fewer in an epoch stopped midway)
      curves.png           training vs validation curves

Crops and augmentations are seeded by (seed, epoch, sample), so a run resumed
from ``last_state.pt`` continues exactly as if it had never stopped, from the
step it reached (an epoch that ``max_steps`` cut short is finished first).
Every setting, the data and the model to start from are checked before the run
folder is written: a run that cannot start leaves no run folder behind.
Under ``torchrun`` the same code trains with DistributedDataParallel; only
rank 0 validates and writes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data.dataset import (
    DEFAULT_KIND_WEIGHTS,
    CropDataset,
    EpochSampler,
    load_cached_image,
    sampling_weights,
)
from .data.kinds import KINDS
from .data.targets import CHANNELS, make_targets
from .device import bf16_supported, resolve_precision, reuse_freed_memory  # noqa: F401  (bf16_supported: kept importable from here)
from .options import PRECISIONS
from .errors import NucleisegError, OptionError
from .io import atomic_path
from .losses import DeepSupervisionLoss
from .measure import typical_diameter
from .metrics import PixelScoreAccumulator, instance_scores
from .models import UNetPlusPlus, load_model_file, resolve_model_path, save_model
from .models.metadata import MAX_DEPTH, ModelMetadata
from .postprocess import PostprocessParams, instances_from_probabilities
from .preprocess import normalize

log = logging.getLogger("nucleiseg.train")

METRIC_COLUMNS = [
    "epoch", "train_loss", "val_loss", "val_f1", "val_iou", "val_auc", "val_dsb", "val_ap50",
    "lr", "seconds", "images_per_s", "steps",
]


@dataclass
class TrainConfig:
    """Settings of one training run (stored as ``train_config.json``).

    Parameters
    ----------
    epochs : int
        Passes of ``samples_per_epoch`` crops each.
    batch_size : int
        Crops per optimisation step (per process under torchrun).
    micro_batch : int or None
        Crops per forward/backward pass; a step accumulates the gradients of
        ``batch_size / micro_batch`` passes. None picks 4 on a CPU, where the
        smaller activations stay in cache (+6% images/s in
        ``benchmarks/train_speed.py``, +6-9% in a real run; BatchNorm then
        normalises over 4 crops), and the whole batch on a GPU.
    crop : int
        Side of the square training crops: a multiple of ``2**depth`` (16 for 5 widths), at least twice
        that, so that the deepest level holds 2x2 pixels (BatchNorm needs more than one value per
        channel, whatever the batch); with ``init``, checked against that model's depth.
    samples_per_epoch : int or None
        Crops per epoch; None = the number of training images.
    widths : tuple of int
        UNet++ channel widths per level (depth = len - 1).
    lr : float
        Peak learning rate of Adam (AMSGrad).
    weight_decay : float
        Adam's L2 weight decay.
    schedule : {"cosine", "plateau"}
        Linear warm-up then cosine decay per step, or halve on a validation-loss plateau.
    warmup_epochs : float
        Length of the linear warm-up (cosine schedule).
    precision : {"auto", "fp32", "bf16"}
        bf16 autocast where the processor supports it ("auto") or always/never.
    workers : int or None
        Data-loading processes; None picks 0 on two cores or fewer (loading is
        ~3% of a step there) and 2 otherwise.
    seed : int
        Seeds weights, crop sampling and augmentation.
    augment_strength : float
        Scales the photometric augmentations' probabilities (0 = geometric only).
    stain_augment : float
        Probability (0 to 1) of the H&E stain jitter on a stained crop
        (:class:`~nucleiseg.data.augment.StainJitter`); 0 leaves it out.
    kind_weights : dict
        How much more often each image kind is drawn; kinds of the training split must not all weigh 0.
    channel_weights : dict
        Weight of each output channel (body, contour, touch) in the loss,
        e.g. a heavier ``touch`` to stress where nuclei meet. On DSB2018,
        touch or contour at 3 did not split more tissue nuclei and lowered
        the pixel IoU (docs/model-card.md); the default weighs all alike.
    init : str or None
        Model file to start from (fine-tuning); its widths replace ``widths`` (and are the ones
        ``train_config.json`` records).
    val_every : int
        Validate every this many epochs (and always after the last).
    threads : int or None
        torch intra-op threads; None = all cores of this process's share.
    cache : str or None
        The prepared cache trained on (recorded so ``--resume`` needs no data argument).
    """

    epochs: int = 40
    batch_size: int = 8
    micro_batch: int | None = None
    crop: int = 256
    samples_per_epoch: int | None = None
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    precision: str = "auto"
    workers: int | None = None
    seed: int = 0
    augment_strength: float = 1.0
    stain_augment: float = 0.0
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))
    channel_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 1.0))
    init: str | None = None
    val_every: int = 1
    threads: int | None = None
    cache: str | None = None

    def __post_init__(self) -> None:
        """Check every setting, so that a bad one costs one line here, not a traceback mid-run."""
        if not isinstance(self.widths, (list, tuple)) or not all(_is_int(w) for w in self.widths):
            raise TrainConfigError("widths", f"must be a list of integers, got {self.widths!r}")
        self.widths = tuple(int(w) for w in self.widths)
        if not 2 <= len(self.widths) <= MAX_DEPTH + 1 or not all(1 <= w <= 4096 for w in self.widths):
            raise TrainConfigError("widths", f"must be 2 to {MAX_DEPTH + 1} channel counts in 1..4096, one per level "
                                             f"(depth = count - 1), got {','.join(map(str, self.widths))}")
        _check_int(self, "epochs", 1)
        _check_int(self, "batch_size", 1)
        _check_int(self, "micro_batch", 1, optional=True)
        _check_int(self, "samples_per_epoch", 1, optional=True)
        _check_int(self, "workers", 0, optional=True)
        _check_int(self, "threads", 1, optional=True)
        _check_int(self, "val_every", 1)
        _check_int(self, "seed", 0)
        if self.seed >= 2**63:
            raise TrainConfigError("seed", f"must be below 2**63, got {self.seed}")
        _check_int(self, "crop", 16)
        if self.init is None:  # else the model started from decides the depth (checked by train)
            check_crop(self.crop, len(self.widths) - 1)
        if not (_is_number(self.lr) and 0 < self.lr < math.inf):
            raise TrainConfigError("lr", f"(learning rate) must be a number > 0, got {self.lr!r}")
        for name, top in (("weight_decay", math.inf), ("warmup_epochs", math.inf), ("augment_strength", 1.0),
                          ("stain_augment", 1.0)):
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value <= top and math.isfinite(value)):
                limit = ">= 0" if top == math.inf else f"in [0, {top:g}]"
                raise TrainConfigError(name, f"must be a number {limit}, got {value!r}")
        if self.schedule not in ("cosine", "plateau"):
            raise TrainConfigError("schedule", f"must be 'cosine' or 'plateau', got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise TrainConfigError("precision", f"must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        for name, known in (("kind_weights", KINDS), ("channel_weights", CHANNELS)):
            weights = getattr(self, name)
            what = name.removesuffix("_weights")
            if not isinstance(weights, dict) or set(weights) - set(known) or (
                    name == "channel_weights" and set(weights) != set(known)):
                raise TrainConfigError(name, f"must name {'' if name == 'kind_weights' else 'each of '}the {what}s "
                                             f"{', '.join(known)}, got {weights!r}")
            if not all(_is_number(w) and 0 <= w < math.inf for w in weights.values()) or not sum(weights.values()) > 0:
                raise TrainConfigError(name, f"must be finite numbers >= 0, not all 0, got {weights!r}")
        for name in ("init", "cache"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TrainConfigError(name, f"must be a path or None, got {getattr(self, name)!r}")

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        """The settings saved in a run's ``train_config.json``."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise NucleisegError(f"cannot be read as training settings ({str(exc).splitlines()[0]})", path) from None
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            unknown = sorted(set(values) - known) if isinstance(values, dict) else type(values).__name__
            raise NucleisegError(f"not training settings of this version (unknown: {unknown})", path)
        try:
            return cls(**values)
        except TrainConfigError as exc:
            raise NucleisegError(f"saved setting {exc}", path) from None


class TrainConfigError(OptionError):
    """A training setting out of range; ``field`` (= ``option``) names the :class:`TrainConfig` field, which a
    front end rewords as its own option (:meth:`~nucleiseg.errors.OptionError.reworded`)."""

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field = field
        self.problem = problem

    def __reduce__(self):  # picklable across processes, like its parent
        return (type(self), (self.field, self.problem))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(config: TrainConfig, name: str, low: int, optional: bool = False) -> None:
    value = getattr(config, name)
    if optional and value is None:
        return
    if not (_is_int(value) and value >= low):
        raise TrainConfigError(name, f"must be an integer >= {low}, got {value!r}")


def check_crop(crop: int, depth: int) -> None:
    """Training crops pool ``depth`` times: their side must be a multiple of ``2**depth``, at least twice it.

    At ``2**depth`` itself the deepest level holds one pixel, and its BatchNorm fails on a
    micro-batch of one crop (a batch of 1, or the rest of a batch split into micro-batches).

    Examples
    --------
    >>> check_crop(256, 4)
    >>> check_crop(17, 4)
    Traceback (most recent call last):
    ...
    nucleiseg.training.TrainConfigError: crop must be a multiple of 16 (2**depth for a network of depth 4), got 17; e.g. 32 or 48
    >>> check_crop(16, 4)
    Traceback (most recent call last):
    ...
    nucleiseg.training.TrainConfigError: crop must be at least 32 for a network of depth 4 (its deepest level, 1/16 of the crop, needs 2x2 pixels), got 16
    """
    multiple = 2**depth
    if crop % multiple:
        below = max(2 * multiple, crop // multiple * multiple)
        raise TrainConfigError("crop", f"must be a multiple of {multiple} (2**depth for a network of depth {depth}), "
                                       f"got {crop}; e.g. {below} or {below + multiple}")
    if crop < 2 * multiple:
        raise TrainConfigError("crop", f"must be at least {2 * multiple} for a network of depth {depth} "
                                       f"(its deepest level, 1/{multiple} of the crop, needs 2x2 pixels), got {crop}")


def check_max_steps(max_steps: int | None) -> None:
    """:func:`train`'s ``max_steps``: None (no limit) or an integer >= 1.

    Examples
    --------
    >>> check_max_steps(0)
    Traceback (most recent call last):
    ...
    nucleiseg.errors.OptionError: max_steps must be an integer >= 1, got 0
    """
    if max_steps is not None and not (_is_int(max_steps) and max_steps >= 1):
        raise OptionError("max_steps", f"must be an integer >= 1, got {max_steps!r}")


def init_widths(init: str | Path) -> tuple[int, ...]:
    """The widths of the model ``init`` (a file, a run folder or ``"default"``) that fine-tuning keeps.

    Read from the file's header alone (no tensor loaded); raises :class:`~nucleiseg.errors.NucleisegError`
    for a missing or unusable model file.
    """
    return tuple(ModelMetadata.read(resolve_model_path(init)).config["widths"])


# ----------------------------------------------------------------------------- environment
@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return _Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ----------------------------------------------------------------------------- data
@dataclass
class _Split:
    ids: list[str]
    kinds: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray]


def load_split(cache_dir: Path, split: str) -> _Split:
    """All images and labels of one split of a prepared cache, in memory."""
    from .data.cache import read_cache

    table = read_cache(cache_dir)
    table = table[table["split"] == split]
    ids = table["image_id"].astype(str).tolist()
    pairs = [load_cached_image(cache_dir, i) for i in ids]
    return _Split(ids, table["kind"].astype(str).tolist(), [p[0] for p in pairs], [p[1] for p in pairs])


# ----------------------------------------------------------------------------- schedule
def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=3)
    total = max(1, config.epochs * steps_per_epoch)
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(
    model: UNetPlusPlus,
    split: _Split,
    loss_fn: DeepSupervisionLoss,
    autocast_dtype: torch.dtype | None,
    params: PostprocessParams | None = None,
) -> dict[str, float]:
    """Loss, pixel F1/IoU/AUC of the body channel and DSB score, at native resolution."""
    from .models.unetplusplus import heads_to_probabilities, pad_to_multiple

    model.eval()
    device = next(model.parameters()).device
    pixels = PixelScoreAccumulator()
    losses, dsb, ap50 = [], [], []
    for image, labels in zip(split.images, split.labels):
        x = torch.from_numpy(normalize(image))[None].to(device)
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, 2**model.depth).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            heads = [t[..., :h, :w].float() for t in model(x)]
        target = torch.from_numpy(make_targets(labels))[None].to(device)
        losses.append(float(loss_fn(heads, target)))
        probs = heads_to_probabilities(heads, pruned=False)[0].cpu().numpy()
        pixels.update(labels > 0, probs[0] > 0.5, prob=probs[0])
        pred = instances_from_probabilities(probs, CHANNELS[: probs.shape[0]], params)
        scores = instance_scores(labels, pred)
        dsb.append(scores.score)
        ap50.append(scores.ap50)
    summary = pixels.scores()
    return {
        "val_loss": float(np.mean(losses)),
        "val_f1": summary["f1"],
        "val_iou": summary["iou"],
        "val_auc": summary.get("auc", float("nan")),
        "val_dsb": float(np.mean(dsb)),
        "val_ap50": float(np.mean(ap50)),
    }


# ----------------------------------------------------------------------------- files
@dataclass
class _EpochProgress:
    """How far an epoch got: its steps, and the crops, loss and seconds they took (what its metrics row sums)."""

    steps: int = 0
    crops: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0


def _save_state(path: Path, model: torch.nn.Module, optimizer, scheduler, epoch: int, best: float,
                progress: _EpochProgress | None = None) -> None:
    """``last_state.pt``: everything a resume needs, ``epoch`` being the epoch reached.

    ``progress``: how far that epoch got (``progress.steps`` of its steps done); None: all of it.
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best_score": best,
        "torch_rng": torch.get_rng_state(),
    }
    if progress is not None:
        state.update(epoch_steps=progress.steps, epoch_crops=progress.crops, epoch_loss_sum=progress.loss_sum,
                     epoch_seconds=progress.seconds)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, device: torch.device) -> dict[str, Any]:
    """``last_state.pt``, or one line saying it is damaged (a run killed while the disk was full, a bad copy)."""
    import pickle
    import warnings
    import zipfile

    try:
        with warnings.catch_warnings():  # torch's remarks on pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # never unpickled beyond tensors and plain containers
        raise NucleisegError("training state holds objects other than tensors and numbers; not loaded "
                             "(not written by nucleiseg?); last.safetensors holds the weights saved last", path) from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise NucleisegError(f"training state cannot be read, truncated or damaged ({_first_line(exc)}); "
                             "last.safetensors holds the weights saved last", path) from None
    if not isinstance(state, dict):
        raise NucleisegError("training state is not a nucleiseg checkpoint", path)
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    rows = _read_metrics(path)
    rows = [r for r in rows if int(r["epoch"]) < int(row["epoch"])] + [row]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in METRIC_COLUMNS})


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(metrics_csv: Path, out_png: Path) -> None:
    """Training vs validation loss, and the validation metrics, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_metrics(metrics_csv)
    if not rows:
        return

    def column(name: str) -> np.ndarray:
        return np.array([float(r[name]) if r.get(name) not in ("", None) else np.nan for r in rows])

    epochs = column("epoch")
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, column("train_loss"), label="training")
    val_loss = column("val_loss")
    ax_loss.plot(epochs[~np.isnan(val_loss)], val_loss[~np.isnan(val_loss)], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="BCE + Dice loss", title="Loss")
    ax_loss.legend()
    for name, label in [("val_f1", "F1"), ("val_iou", "IoU"), ("val_auc", "AUC"), ("val_dsb", "DSB score"), ("val_ap50", "AP@0.5")]:
        values = column(name)
        known = ~np.isnan(values)  # validated epochs only, joined by lines
        ax_metric.plot(epochs[known], values[known], "o-", label=label)
    ax_metric.set(xlabel="epoch", ylim=(0, 1), title="Validation")
    ax_metric.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- main loop
def train(cache_dir: str | Path, run_dir: str | Path, config: TrainConfig | None = None, resume: bool = False,
          max_steps: int | None = None, progress: bool = True,
          on_step: Callable[[int, float], Any] | None = None) -> Path:
    """Train (or resume training) a UNet++ on a prepared cache.

    Parameters
    ----------
    cache_dir : str or Path
        A cache written by ``nucleiseg prepare``.
    run_dir : str or Path
        Where checkpoints, metrics and curves go.
    config : TrainConfig, optional
        Settings for a new run; on resume only its ``epochs`` is used, to lengthen or
        shorten the run (the learning-rate schedule follows).
    resume : bool
        Continue from ``run_dir/last_state.pt``: from the step it reached, in the
        middle of an epoch when ``max_steps`` or ``on_step`` stopped the run there.
    max_steps : int, optional
        Stop after this many optimisation steps (>= 1), counted from the run's start
        (a resumed run's earlier steps included); the state is saved where it stops,
        and the epoch it cut short gets a metrics row (``steps`` says how many of its
        steps were trained), replaced when a resume finishes that epoch.
    progress : bool
        Show a progress bar per epoch on stderr (on a terminal every half second, else
        at most twice a minute); False: none.
    on_step : callable, optional
        Called after every optimisation step with the number of steps done and
        the step's mean loss per crop (a progress display, e.g. napari's
        fine-tuning); a true return value ends the training there, as
        ``max_steps`` does, and an exception it raises aborts it.

    Raises
    ------
    NucleisegError
        Unusable cache (a missing or damaged file named), settings (:class:`TrainConfigError`;
        ``max_steps``: :class:`~nucleiseg.errors.OptionError`), model to start from, or a
        damaged ``last_state.pt`` to resume from; all before ``run_dir`` is written.

    Returns
    -------
    Path
        The best model file (``best.safetensors``).
    """
    cache_dir, run_dir = Path(cache_dir), Path(run_dir)
    check_max_steps(max_steps)
    ddp = _init_distributed()
    state_path = run_dir / "last_state.pt"
    if resume:
        if not state_path.exists():
            raise NucleisegError("nothing to resume: no last_state.pt in this folder", run_dir)
        saved = TrainConfig.from_json(run_dir / "train_config.json")
        if config is not None:
            # a new length re-shapes the rest of the cosine schedule to end at the new last epoch
            saved.epochs = config.epochs
        config = saved
    config = config or TrainConfig()
    config.cache = str(cache_dir.resolve())

    # Everything that can fail on the user's data or settings comes before the run folder is written.
    device = torch.device(f"cuda:{ddp.local_rank}" if torch.cuda.is_available() else "cpu")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    autocast_dtype = resolve_precision(config.precision, device)
    if device.type == "cpu":
        reuse_freed_memory()  # +2% to +19% images/s on the 2-core CPU (v6's widths; benchmarks/allocator_speed.py)

    train_split = load_split(cache_dir, "train")
    val_split = load_split(cache_dir, "val")
    if not train_split.ids:
        raise NucleisegError("the cache has no training images", cache_dir)
    if config.schedule == "plateau" and not val_split.ids:
        raise NucleisegError("the cache has no validation images, and the plateau schedule lowers the learning rate "
                             "on the validation loss: use the cosine schedule, or prepare with a validation fraction",
                             cache_dir)
    log.info("%d training and %d validation images; %s on %s", len(train_split.ids), len(val_split.ids),
             "bf16" if autocast_dtype else "fp32", device)

    # Model: fresh, or fine-tuned from a model file.
    postprocess_meta: dict = {}
    inherited: dict = {}  # a fine-tuned model keeps its parent's per-kind thresholds until it is tuned again
    if config.init:
        init_model, meta = load_model_file(resolve_model_path(config.init))
        model = init_model.train()
        if tuple(init_model.config.widths) != config.widths:
            log.info("fine-tuning %s: its widths %s replace %s", config.init,
                     ",".join(map(str, init_model.config.widths)), ",".join(map(str, config.widths)))
        config.widths = tuple(init_model.config.widths)  # recorded in train_config.json as trained
        check_crop(config.crop, len(config.widths) - 1)  # the parent's depth decides
        postprocess_meta = meta.get("postprocess", {})
        if meta.get("postprocess_by_kind"):
            inherited["postprocess_by_kind"] = meta["postprocess_by_kind"]
    else:
        model = UNetPlusPlus(3, len(CHANNELS), config.widths)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, amsgrad=True)
    loss_fn = DeepSupervisionLoss(channel_weights=[config.channel_weights[name] for name in CHANNELS])

    samples = config.samples_per_epoch or len(train_split.ids)
    weights = sampling_weights(train_split.kinds, [im.shape[:2] for im in train_split.images], config.kind_weights, config.crop)
    if not weights.sum() > 0:
        raise TrainConfigError("kind_weights", "gives weight 0 to every image of the training split (its kinds: "
                                               f"{', '.join(sorted(set(train_split.kinds)))})")
    sampler = EpochSampler(weights, samples, seed=config.seed, rank=ddp.rank, world_size=ddp.world_size)
    workers = config.workers if config.workers is not None else (0 if (os.cpu_count() or 1) <= 2 else 2)
    # without loader processes, the batch's crops are still prepared side by side, between network steps
    crop_threads = min(4, torch.get_num_threads()) if workers == 0 else 1
    dataset = CropDataset(train_split.images, train_split.labels, config.crop, config.augment_strength, threads=crop_threads,
                          stain=config.stain_augment)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
                        drop_last=len(sampler) >= config.batch_size, persistent_workers=workers > 0)
    steps_per_epoch = max(1, len(loader))
    micro_batch = config.micro_batch or (config.batch_size if device.type == "cuda" else min(4, config.batch_size))
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)

    # Where to start: epoch 1, or where the saved state stopped (within an epoch after max_steps).
    start_epoch, best_score, carried = 1, -math.inf, _EpochProgress()
    if resume:
        state = _load_state(state_path, device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            start_epoch, best_score = int(state["epoch"]), float(state["best_score"])
            # states written before runs stopped mid-epoch hold complete epochs only
            carried = _EpochProgress(int(state.get("epoch_steps", steps_per_epoch)), int(state.get("epoch_crops", 0)),
                                     float(state.get("epoch_loss_sum", 0.0)), float(state.get("epoch_seconds", 0.0)))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise NucleisegError(f"training state does not fit this run ({_first_line(exc)}); "
                                 "last.safetensors holds the weights saved last", state_path) from None
        if carried.steps >= steps_per_epoch:  # that epoch is complete: the next one starts afresh
            start_epoch, carried = start_epoch + 1, _EpochProgress()
        if start_epoch > config.epochs:
            raise NucleisegError(f"already trained {start_epoch - 1} epochs of {config.epochs}; "
                                 "ask for more epochs to continue", run_dir)
        log.info("resuming %s at epoch %d%s", run_dir, start_epoch,
                 f", step {carried.steps + 1} of {steps_per_epoch}" if carried.steps else "")
    steps_done = (start_epoch - 1) * steps_per_epoch + carried.steps
    if max_steps is not None and steps_done >= max_steps:
        raise OptionError("max_steps", f"counts the run's steps from its start, and {steps_done} are done already; "
                                       f"give more than {steps_done} to continue")

    if ddp.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "train_config.json") as tmp:
            tmp.write_text(json.dumps(asdict(config), indent=2))

    net = model
    if ddp.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # validation scores instances with the thresholds the model will be used with (a fine-tuned model's inherited ones)
    val_params = PostprocessParams.from_dict(postprocess_meta)
    meta = {"postprocess": postprocess_meta or PostprocessParams().to_dict(), "preprocess": {"normalize": "percentile 1-99.8"},
            "training": {"cache": str(cache_dir), "widths": list(config.widths)}, **inherited}
    diameter = typical_diameter(train_split.labels)  # what --diameter compares a user's nuclei with
    if diameter is not None:
        meta["nucleus_diameter"] = round(diameter, 2)
    stop = False  # set by on_step
    for epoch in range(start_epoch, config.epochs + 1):
        done = carried if epoch == start_epoch else _EpochProgress()  # this epoch's steps trained before a resume
        # skip the batches trained before: the rest of the epoch gets the crops it would have had
        sampler.set_epoch(epoch, start=done.steps * config.batch_size)
        net.train()
        started = time.perf_counter()
        running, seen = done.loss_sum, done.crops
        # redirected to a log file, the bar updates twice a minute instead of flooding it
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not (ddp.is_main and progress), leave=False,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0, initial=done.steps,
                   total=steps_per_epoch)
        epoch_steps = done.steps
        for x, y in bar:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = accumulate_gradients(net, loss_fn, x, y, micro_batch, autocast_dtype)
            optimizer.step()
            if config.schedule == "cosine":
                scheduler.step()
            running += loss_sum
            seen += len(x)
            steps_done += 1
            epoch_steps += 1
            # refresh=False: the bar redraws at its own pace (mininterval), not at every step
            bar.set_postfix(loss=f"{running / seen:.4f}", img_s=f"{seen * ddp.world_size / (time.perf_counter() - started + done.seconds):.2f}",
                            refresh=False)
            stop = on_step is not None and bool(on_step(steps_done, loss_sum / len(x)))
            if stop or (max_steps is not None and steps_done >= max_steps):
                break
        if ddp.world_size > 1:
            _average_buffers(model, ddp)
        elapsed = done.seconds + time.perf_counter() - started
        ending = stop or (max_steps is not None and steps_done >= max_steps)
        complete = epoch_steps >= steps_per_epoch or not ending
        row: dict[str, Any] = {"epoch": epoch, "train_loss": running / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
                               "seconds": round(elapsed, 1), "images_per_s": round(seen * ddp.world_size / elapsed, 2),
                               "steps": epoch_steps}
        last_epoch = epoch == config.epochs or ending
        if ddp.is_main and val_split.ids and (epoch % config.val_every == 0 or last_epoch):
            row.update(validate(model, val_split, loss_fn, autocast_dtype, val_params))
            if config.schedule == "plateau" and complete:  # a part of an epoch is validated, but not a plateau step
                scheduler.step(row["val_loss"])
        if ddp.world_size > 1 and config.schedule == "plateau":
            # keep every replica's learning rate in step with rank 0's decision
            lr = torch.tensor([optimizer.param_groups[0]["lr"]], device=device)
            dist.broadcast(lr, 0)
            for group in optimizer.param_groups:
                group["lr"] = float(lr)
        if ddp.is_main:
            # best = highest validation DSB score; without validation, lowest training loss
            score = row["val_dsb"] if "val_dsb" in row else -row["train_loss"]
            _append_metrics(run_dir / "metrics.csv", row)
            save_model(run_dir / "last.safetensors", model, {**meta, "epoch": epoch})
            if score > best_score:
                best_score = score
                save_model(run_dir / "best.safetensors", model, {**meta, "epoch": epoch})
            _save_state(state_path, model, optimizer, scheduler, epoch, best_score,
                        _EpochProgress(epoch_steps, seen, running, elapsed))
            plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
            log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            if not complete:
                log.info("stopped after step %d of %d of epoch %d; --resume continues from there",
                         epoch_steps, steps_per_epoch, epoch)
        if ddp.world_size > 1:
            dist.barrier()
        if ending:
            break
    if ddp.world_size > 1:
        _check_replicas_identical(model, ddp)
        dist.barrier()  # leave together: a gloo peer closing early can abort the other at exit
        dist.destroy_process_group()
    return run_dir / "best.safetensors"


def accumulate_gradients(net: torch.nn.Module, loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                         micro_batch: int, autocast_dtype: torch.dtype | None) -> float:
    """Backpropagate the batch ``(x, y)`` in chunks of ``micro_batch`` crops.

    Each chunk's loss is weighted by its share of the batch, so the summed
    gradients are those of the batch's mean loss (BatchNorm statistics and the
    batch-wide Dice term are then taken per chunk). Under DDP only the last
    chunk synchronises gradients. Returns the chunks' losses summed over crops.
    """
    chunks = list(zip(torch.split(x, micro_batch), torch.split(y, micro_batch)))
    total = 0.0
    for index, (xs, ys) in enumerate(chunks):
        last = index == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                heads = net(xs)
            loss = loss_fn(heads, ys)
            (loss * (len(xs) / len(x))).backward()
        total += loss.item() * len(xs)
    return total


def _average_buffers(model: torch.nn.Module, ddp: _Distributed) -> None:
    """Average BatchNorm running statistics over replicas.

    DDP keeps parameters in step, but each replica updates its running
    statistics from its own batches; averaging them at every epoch's end
    makes the replicas identical again and uses every process's data.
    """
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer /= ddp.world_size


def _check_replicas_identical(model: torch.nn.Module, ddp: _Distributed) -> None:
    """Gather every replica's weights and fail loudly if any differ from rank 0's."""
    flat = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(ddp.world_size)]
    dist.all_gather(gathered, flat)
    differing = [r for r, t in enumerate(gathered) if not torch.equal(t, gathered[0])]
    if differing:
        raise RuntimeError(f"replicas {differing} hold weights different from rank 0's")
    if ddp.is_main:
        log.info("all %d replicas hold identical weights", ddp.world_size)
