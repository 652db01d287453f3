"""The prepared cache: annotated images ingested once, in one layout.

``prepare_dataset(DATA_DIR, CACHE)`` reads any supported layout (Kaggle
folders, Kaggle run-length CSV, or paired images/labels folders) and writes::

    CACHE/
      manifest.json          format version, source, layout, per-source fingerprints, the cache files'
                             sizes and times, skipped files
      index.csv              image_id, height, width, kind, n_nuclei, group, source
      split.csv              image_id, split (train | val), reused on later runs
      images/<image_id>.png  8-bit RGB (preprocess.to_rgb_uint8)
      masks/<image_id>.png   uint8 semantic mask, 0 / 255
      labels/<image_id>.tif  uint16 instance labels, 0 = background

A source (an image with its masks or label file) is processed again only when
its fingerprint (sizes and modification times of its files) changed, or when
one of its cache files is missing or no longer has the size and modification
time it had when written (a damaged or replaced file; a cache file damaged in
place with both kept is not noticed: ``force`` redoes everything), so a
re-run on an unchanged folder does no work and touches no file. A damaged
index.csv is rebuilt (its images processed again); a damaged split.csv is
replaced by a new split, with a warning. :func:`read_cache` gives the index
with the split as one table, and refuses a damaged one in one line.
"""

from __future__ import annotations

import hashlib
import io as _stdio
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..errors import ImageReadError, NucleisegError, OptionError
from ..io import atomic_path, list_images, read_image, write_labels_tiff, write_png
from ..preprocess import to_rgb_uint8
from .dsb import find_kaggle_root, list_kaggle_images, read_kaggle_labels
from .kinds import KINDS, image_kind
from .paired import BINARY_MASK_CHOICES, check_binary_mask, is_paired_layout, list_paired_images, read_paired_labels
from .rle import read_rle_csv, rle_to_labels
from .split import read_groups, split_train_val

__all__ = ["FORMAT_VERSION", "LAYOUTS", "Cache", "PrepareResult", "cache_beside", "detect_layout", "prepare_dataset",
           "read_cache"]

log = logging.getLogger(__name__)

FORMAT = "nucleiseg-cache"
FORMAT_VERSION = 1
LAYOUTS = ("kaggle", "paired", "kaggle-rle")
INDEX_COLUMNS = ("image_id", "height", "width", "kind", "n_nuclei", "group", "source")
SPLIT_COLUMNS = ("image_id", "split")
GROUPS_FILENAME = "mosaic_groups.csv"
_LAYOUT_HELP = {
    "kaggle": "kaggle (<id>/images/<id>.png with <id>/masks/*.png, or a folder holding stage1_train/)",
    "paired": "paired (images/ and labels/ folders)",
    "kaggle-rle": "kaggle-rle (Kaggle image folders or a folder of images, with --rle-csv)",
}


@dataclass(frozen=True)
class _Sample:
    """One source: an image and where its annotation comes from."""

    image_id: str
    image: Path
    masks: tuple[Path, ...] | None = None  # kaggle
    labels: Path | None = None  # paired
    rles: tuple[str, ...] | None = None  # kaggle-rle
    rle_csv: Path | None = None

    def files(self) -> list[Path]:
        return [self.image, *(self.masks or ()), *([self.labels] if self.labels else [])]


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` did.

    Attributes
    ----------
    cache_dir : Path
        The cache folder.
    table : pandas.DataFrame
        The prepared index with its ``split`` column (as :func:`read_cache`).
    processed, reused : list of str
        Image ids written in this run, and ids found up to date.
    skipped : list of dict
        ``{"image_id", "source", "reason"}`` for every source left out.
    dropped : list of str
        Ids removed from the cache because their source is gone.
    """

    cache_dir: Path
    table: pd.DataFrame
    processed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- discovery
def cache_beside(data_dir: str | Path) -> Path:
    """The cache that ``train`` and ``evaluate`` prepare a raw data folder into: ``<folder>-cache`` beside it.

    The folder is resolved first, so that ``.`` or ``..`` name the folder itself.

    Examples
    --------
    >>> cache_beside("/data/stage1_train").as_posix()
    '/data/stage1_train-cache'
    """
    folder = Path(data_dir).resolve()
    return folder.parent / f"{folder.name}-cache"


def detect_layout(
    data_dir: str | Path, layout: str = "auto", rle_csv: str | Path | None = None
) -> tuple[str, Path]:
    """Find which supported layout ``data_dir`` is in.

    Parameters
    ----------
    data_dir : str or Path
        The data folder given by the user.
    layout : {'auto', 'kaggle', 'paired', 'kaggle-rle'}, optional
        Force a layout instead of detecting it.
    rle_csv : str or Path, optional
        Kaggle label CSV; given with ``layout='auto'`` it selects ``kaggle-rle``.

    Returns
    -------
    layout : str
        One of :data:`LAYOUTS`.
    root : Path
        The folder the layout is rooted at (``stage1_train/`` for Kaggle data,
        the image folder for ``kaggle-rle`` on a plain folder of images).

    Raises
    ------
    NucleisegError
        ``data_dir`` is missing, or in none of the layouts (the message lists
        what was looked for).

    Examples
    --------
    >>> detect_layout("/work/shared/data/dsb2018")  # doctest: +SKIP
    ('kaggle', PosixPath('/work/shared/data/dsb2018/stage1_train'))
    """
    data_dir = Path(data_dir)
    if layout not in ("auto", *LAYOUTS):
        raise NucleisegError(f"unknown layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
    if not data_dir.exists():
        raise NucleisegError("data folder not found", data_dir)
    if not data_dir.is_dir():
        raise NucleisegError("is a file; expected the data folder", data_dir)
    if rle_csv is not None and layout not in ("auto", "kaggle-rle"):
        raise OptionError("rle_csv", f"goes with the layout kaggle-rle, not {layout}")
    if layout == "auto":
        layout = "kaggle-rle" if rle_csv is not None else "paired" if is_paired_layout(data_dir) else "kaggle"
        strict = False
    else:
        strict = True
    root: Path | None
    if layout == "paired":
        root = data_dir if is_paired_layout(data_dir) else None
    elif layout == "kaggle":
        root = find_kaggle_root(data_dir)
    else:
        if rle_csv is None:
            raise OptionError("rle_csv", "is missing: the layout kaggle-rle reads the nuclei from a run-length CSV "
                              "(ImageId,EncodedPixels, one row per nucleus)")
        root = find_kaggle_root(data_dir)
        if root is None:
            for folder in (data_dir, data_dir / "images"):
                if folder.is_dir() and list_images(folder):
                    root = folder
                    break
    if root is None:
        looked_for = _LAYOUT_HELP[layout] if strict else ", ".join(_LAYOUT_HELP.values())
        raise NucleisegError(f"not in a known data layout; looked for {looked_for}", data_dir)
    return layout, root


def _list_samples(layout: str, root: Path, rle_csv: Path | None) -> tuple[list[_Sample], list[tuple[str, Path, str]]]:
    if layout == "kaggle":
        found, problems = list_kaggle_images(root)
        return [_Sample(i, image, masks=tuple(masks)) for i, (image, masks) in found.items()], problems
    if layout == "paired":
        pairs, problems = list_paired_images(root)
        return [_Sample(i, image, labels=labels) for i, (image, labels) in pairs.items()], problems
    # kaggle-rle
    assert rle_csv is not None
    table = read_rle_csv(rle_csv)
    if root.name == "images" or find_kaggle_root(root) is None:
        images: dict[str, Path] = {}
        problems = []
        for path in list_images(root):
            if path.stem in images:
                problems.append((path.stem, path, f"another image is named {path.stem}.*; left out"))
            else:
                images[path.stem] = path
    else:
        found, problems = list_kaggle_images(root, need_masks=False)
        images = {i: image for i, (image, _) in found.items()}
    samples = []
    for image_id, path in sorted(images.items()):
        if image_id not in table:
            problems.append((image_id, path, f"image has no rows in {rle_csv.name}"))
            continue
        samples.append(_Sample(image_id, path, rles=tuple(table[image_id]), rle_csv=rle_csv))
    for image_id in sorted(set(table) - set(images)):
        problems.append((image_id, rle_csv, f"rows in {rle_csv.name} for an image not found under {root}"))
    return samples, problems


def _fingerprint(sample: _Sample, root: Path, layout: str) -> str | None:
    """Hash of the layout, each file's path, size and mtime (and the RLE rows); None if a file vanished."""
    digest = hashlib.sha1(f"{FORMAT_VERSION}|{layout}".encode())
    try:
        for path in sample.files():
            stat = path.stat()
            try:
                name = path.relative_to(root).as_posix()
            except ValueError:
                name = path.name
            digest.update(f"|{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    except OSError:
        return None
    if sample.rles is not None:
        digest.update(("|rle:" + "\n".join(sample.rles)).encode())
    return digest.hexdigest()


def _find_groups_file(data_dir: Path, root: Path) -> Path | None:
    for folder in dict.fromkeys((data_dir, root, root.parent, data_dir.parent)):
        candidate = folder / GROUPS_FILENAME
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------- processing
def _init_pool_worker() -> None:
    """Pool processes (:func:`nucleiseg.pipeline.worker_pool`'s: dying with prepare) leave Ctrl-C to the main
    process, which stops the pool and saves what is done."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker()


def _init_worker() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # pragma: no cover - cv2 is a dependency; threads are only a speed matter
        pass


def _process_sample(sample: _Sample, out_dir: Path, source: str, binary_masks: str = "refuse") -> dict:
    """Read one source, write its three cache files; return its index row or why it was skipped."""
    result: dict = {"image_id": sample.image_id, "source": source, "warnings": []}
    try:
        rgb = to_rgb_uint8(read_image(sample.image))
    except (ImageReadError, ValueError) as exc:
        result["skip"] = f"unreadable image ({getattr(exc, 'message', exc)})"
        return result
    height, width = rgb.shape[:2]
    warnings: list[str] = result["warnings"]
    if sample.masks is not None:
        labels, problems = read_kaggle_labels(sample.masks, (height, width))
        warnings.extend(problems)
        if labels.max() == 0:
            result["skip"] = f"none of its {len(sample.masks)} masks is usable"
            return result
    elif sample.labels is not None:
        try:
            labels = read_paired_labels(sample.labels, (height, width))
        except ImageReadError as exc:
            result["skip"] = f"unusable label file {sample.labels} ({exc.message})"
            return result
        labels, note = check_binary_mask(labels, sample.labels, binary_masks)  # refusing stops the run
        if note:
            warnings.append(note)
    else:
        assert sample.rles is not None
        labels, problems = rle_to_labels(sample.rles, (height, width))
        warnings.extend(f"{sample.rle_csv} ({sample.image_id}): {p}" for p in problems)
    n_nuclei = int(labels.max())
    if n_nuclei == 0:
        warnings.append(f"{sample.image}: no nucleus annotated (kept as an empty example)")
    write_png(out_dir / "images" / f"{sample.image_id}.png", rgb)
    write_png(out_dir / "masks" / f"{sample.image_id}.png", np.where(labels > 0, 255, 0).astype(np.uint8))
    write_labels_tiff(out_dir / "labels" / f"{sample.image_id}.tif", labels)
    result.update(height=height, width=width, kind=image_kind(rgb), n_nuclei=n_nuclei)
    return result


def _run_all(tasks: list[tuple[_Sample, str]], out_dir: Path, workers: int, progress: bool, binary_masks: str = "refuse"):
    """Yield results of :func:`_process_sample`, in a process pool (:func:`~nucleiseg.pipeline.worker_pool`)
    when workers > 1."""
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (a log file would fill with bar updates)
    disable = None if progress and tasks else True
    bar = tqdm(total=len(tasks), desc="prepare", unit="image", file=sys.stderr, disable=disable)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for sample, source in tasks:
                yield _process_sample(sample, out_dir, source, binary_masks)
                bar.update()
            return
        from concurrent.futures import as_completed

        from ..pipeline import worker_pool

        # Spawned, not forked: a process that has run torch (train on a raw folder, a test session) has OpenMP and
        # other threads, and a child forked from it can deadlock (seen: prepare hanging after a session's torch
        # tests). And the workers die with this process, even SIGKILLed (they would go on writing the cache).
        with worker_pool(workers, processes=True, init=_init_pool_worker) as pool:
            futures = [pool.submit(_process_sample, sample, out_dir, source, binary_masks) for sample, source in tasks]
            try:
                for future in as_completed(futures):
                    yield future.result()
                    bar.update()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()


# ----------------------------------------------------------------- the cache
def _read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable manifest (%s); rebuilding the cache", path, exc)
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        log.warning("%s: not a nucleiseg cache manifest; rebuilding the cache", path)
        return None
    if manifest.get("format_version") != FORMAT_VERSION:
        log.info("cache format %s differs from %s; rebuilding", manifest.get("format_version"), FORMAT_VERSION)
        return None
    images, skipped = manifest.get("images", {}), manifest.get("skipped", [])
    if not (isinstance(images, dict) and all(isinstance(e, dict) for e in images.values())
            and isinstance(skipped, list)):
        log.warning("%s: its image records are garbled; rebuilding the cache", path)
        return None
    return manifest


def _load_csv(path: Path) -> pd.DataFrame:
    """One of the cache's tables, text columns kept as strings ('' stays '', never NaN)."""
    return pd.read_csv(
        path,
        dtype={c: str for c in ("image_id", "kind", "group", "source", "split")},
        keep_default_na=False,
        na_values=[],
        encoding="utf-8",
    )


#: Whole-number columns of index.csv and their smallest value.
_COUNT_COLUMNS = {"height": 1, "width": 1, "n_nuclei": 0}


def _table_problem(table: pd.DataFrame, columns: Sequence[str]) -> str | None:
    """What makes one of the cache's tables unusable (a garbled file, a wrong edit), in a few words; None if sound.

    Split values other than train and val are allowed (an image set aside by hand is in neither).
    """
    missing = [c for c in columns if c not in table.columns]
    if missing:
        return f"lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)}"
    ids = table["image_id"]
    if (ids == "").any():
        return f"row {int((ids == '').to_numpy().argmax()) + 2} has no image_id"
    if ids.duplicated().any():
        return f"lists image {ids[ids.duplicated()].iloc[0]} twice"
    for column, low in _COUNT_COLUMNS.items():
        if column in columns:
            values = pd.to_numeric(table[column], errors="coerce")
            bad = ~(values >= low) | (values != values.round())  # also NaN: not a number
            if bad.any():
                return (f"has {column} {str(table[column][bad].iloc[0])!r} for image {ids[bad].iloc[0]}, "
                        f"not a whole number >= {low}")
    if "kind" in columns and not table["kind"].isin(KINDS).all():
        bad = ~table["kind"].isin(KINDS)
        return f"has kind {table['kind'][bad].iloc[0]!r} for image {ids[bad].iloc[0]}, not one of {', '.join(KINDS)}"
    return None


def _csv_error(exc: BaseException) -> str:
    """Why a cache table could not be read, in one line."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text: a byte 0x{exc.object[exc.start]:02x}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _open_table(path: Path, columns: Sequence[str]) -> tuple[pd.DataFrame | None, str | None]:
    """One of the cache's tables with its integer columns as int64, or None and why it is unusable."""
    try:
        table = _load_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:  # UnicodeDecodeError, EmptyDataError: ValueErrors
        return None, f"cannot be read ({_csv_error(exc)})"
    problem = _table_problem(table, columns)
    if problem is not None:
        return None, problem
    for column in _COUNT_COLUMNS:
        if column in columns:
            table[column] = pd.to_numeric(table[column]).astype(np.int64)
    return table, None


def _read_table(path: Path, columns: Sequence[str], then: str = "rebuilding it") -> pd.DataFrame | None:
    """A table of an earlier run; None (warned about, saying what happens ``then``) when missing or unusable."""
    if not path.is_file():
        return None
    table, problem = _open_table(path, columns)
    if table is None:
        log.warning("%s: %s; %s", path, problem, then)
    return table


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds it; True when written."""
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:  # bytes: a file that is not UTF-8 (damaged) is simply replaced
            return False
    except OSError:
        pass
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def _csv_text(table: pd.DataFrame) -> str:
    buffer = _stdio.StringIO()
    table.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue()


def _only_cache_files(folder: Path) -> bool:
    """True when ``folder`` holds nothing but what a (possibly interrupted) prepare writes."""
    names = {"images", "masks", "labels", "index.csv", "split.csv", "manifest.json"}
    return all(p.name in names or p.name.startswith(".") for p in folder.iterdir())


def _outputs(out_dir: Path, image_id: str) -> list[Path]:
    return [
        out_dir / "images" / f"{image_id}.png",
        out_dir / "masks" / f"{image_id}.png",
        out_dir / "labels" / f"{image_id}.tif",
    ]


#: Slack on a cache file's modification time against the one recorded (copies to file systems of coarser
#: timestamps, FAT's 2 s the coarsest, keep a cache up to date).
_MTIME_SLACK_NS = 2_000_000_000


def _output_stats(out_dir: Path, image_id: str) -> list[list[int]] | None:
    """``[size, mtime_ns]`` of an image's three cache files, as recorded in the manifest; None if one is missing."""
    try:
        return [[stat.st_size, stat.st_mtime_ns] for stat in (p.stat() for p in _outputs(out_dir, image_id))]
    except OSError:
        return None


def _outputs_intact(entry: dict, stats: list[list[int]] | None) -> bool:
    """Whether an image's cache files are those prepare wrote: present, and of the recorded sizes and times.

    A manifest entry without a record (written by an earlier version) only needs the files present.
    """
    recorded = entry.get("outputs")
    if stats is None:
        return False
    if recorded is None:
        return True
    try:
        return len(recorded) == len(stats) and all(
            int(size) == now_size and abs(int(mtime) - now_mtime) <= _MTIME_SLACK_NS
            for (size, mtime), (now_size, now_mtime) in zip(recorded, stats))
    except (TypeError, ValueError):  # a garbled record: redo the image
        return False


def prepare_dataset(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    layout: str = "auto",
    rle_csv: str | Path | None = None,
    groups: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    binary_masks: str = "refuse",
) -> PrepareResult:
    """Ingest an annotated data set into a prepared cache, doing only what changed.

    Parameters
    ----------
    data_dir : str or Path
        Data folder in the Kaggle layout (``<id>/images/``, ``<id>/masks/``,
        or its parent holding ``stage1_train/``), the paired layout
        (``images/`` + ``labels/``), or images for a run-length CSV.
    out_dir : str or Path
        Cache folder; created if needed. An existing folder must be empty or
        a cache.
    layout : {'auto', 'kaggle', 'paired', 'kaggle-rle'}, optional
        Data layout; detected by default.
    rle_csv : str or Path, optional
        Kaggle label CSV (``ImageId,EncodedPixels``) for ``kaggle-rle``.
    groups : str or Path, optional
        CSV ``ImageId,mosaic_group`` of images that must share a side of the
        split. Default: ``mosaic_groups.csv`` in or beside ``data_dir``.
    val_fraction : float, optional
        Share of validation images per image kind, in [0, 1).
    seed : int, optional
        Seed of the split.
    workers : int, optional
        Processes; default ``min(2, os.cpu_count())``.
    force : bool, optional
        Process every image again even when up to date (the split is kept).
    progress : bool, optional
        Show a progress bar on stderr.
    binary_masks : {"refuse", "split"}, optional
        A paired-layout label file that is a binary mask (one value over
        several separate blobs, e.g. 0/255) stops the run with
        :class:`~nucleiseg.data.paired.BinaryMaskError` (``"refuse"``), or has each
        blob numbered as one nucleus, with a warning (``"split"``; see
        :func:`~nucleiseg.data.paired.check_binary_mask`).

    Returns
    -------
    result : PrepareResult
        The prepared table and what was processed, reused, skipped, dropped.

    Raises
    ------
    NucleisegError
        Missing data folder, unknown layout, unusable options, a refused
        binary mask, or no usable image at all.

    Examples
    --------
    >>> result = prepare_dataset("/work/shared/data/dsb2018", "cache/dsb2018")  # doctest: +SKIP
    >>> len(result.processed), len(result.reused)  # doctest: +SKIP
    (592, 0)
    >>> prepare_dataset("/work/shared/data/dsb2018", "cache/dsb2018").reused[:1]  # doctest: +SKIP
    ['00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552']
    """
    started = time.perf_counter()
    data_dir, out_dir, rle_path, workers = _check_arguments(data_dir, out_dir, rle_csv, val_fraction, workers,
                                                            binary_masks)
    layout, root = detect_layout(data_dir, layout, rle_path)
    _check_out_dir(out_dir, data_dir, root)
    group_file = Path(groups).expanduser().resolve() if groups is not None else _find_groups_file(data_dir, root)
    group_of = read_groups(group_file) if group_file is not None else {}
    if groups is None and group_file is not None:
        log.info("mosaic groups from %s (%d grouped images)", group_file, len(group_of))

    samples, problems = _list_samples(layout, root, rle_path)
    log.info("%s layout at %s: %d images found", layout, root, len(samples))
    old = _previous_cache(out_dir, force)
    plan = _plan(samples, problems, old, data_dir, root, layout, out_dir)
    processed, n_warned, interrupted = _process(plan, out_dir, workers, progress, binary_masks)
    pending = [sample.image_id for sample, _ in plan.todo if sample.image_id not in set(plan.rows)
               | {s["image_id"] for s in plan.skipped}]

    for entry in plan.skipped:
        log.warning("skipped %s (%s): %s", entry["image_id"], entry["source"], entry["reason"])
    if not plan.rows:
        if interrupted:
            raise KeyboardInterrupt
        raise NucleisegError(f"no usable image found ({len(plan.skipped)} skipped, see the warnings above)", data_dir)
    dropped = _drop_gone(old, plan, out_dir, pending)
    index = _index_table(plan.rows, group_of)
    split_settings, split_table = _split(index, old, out_dir, val_fraction, seed, interrupted)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nucleiseg_version": (old.manifest or {}).get("nucleiseg_version", __version__),
        "complete": not interrupted,
        "source": str(data_dir),
        "root": str(root),
        "layout": layout,
        "rle_csv": None if rle_path is None else str(rle_path),
        "groups_file": None if group_file is None else str(group_file),
        "split": split_settings,
        "n_images": len(index),
        "images": {i: plan.entries[i] for i in sorted(plan.entries)},
        "skipped": sorted(plan.skipped, key=lambda s: (s["image_id"], s["source"])),
    }
    _write_cache_files(out_dir, index, split_table, manifest, old.manifest, bool(processed or dropped))
    if interrupted:
        log.warning(
            "interrupted: %d images saved to %s, %d still to do; run the same command again to finish",
            len(index), out_dir, len(pending),
        )
        raise KeyboardInterrupt
    table = index.assign(split=split_table["split"].to_numpy())
    _report(out_dir, table, processed, plan, dropped, n_warned, time.perf_counter() - started)
    return PrepareResult(out_dir, table, processed, plan.reused, plan.skipped, dropped)


# ----------------------------------------------------------------------------- prepare_dataset's steps
def _check_arguments(data_dir, out_dir, rle_csv, val_fraction, workers, binary_masks):
    """The paths resolved and the settings checked, in the library's words."""
    if not 0.0 <= float(val_fraction) < 1.0:
        raise OptionError("val_fraction", f"must be at least 0 and below 1, got {val_fraction}")
    if binary_masks not in BINARY_MASK_CHOICES:
        raise OptionError("binary_masks", f"must be one of {', '.join(BINARY_MASK_CHOICES)}, got {binary_masks!r}")
    workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise OptionError("workers", f"must be at least 1, got {workers}")
    rle_path = None if rle_csv is None else Path(rle_csv).expanduser().resolve()
    return Path(data_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve(), rle_path, workers


def _check_out_dir(out_dir: Path, data_dir: Path, root: Path) -> None:
    """Refuse a cache folder inside the data, a file, or a folder holding something else."""
    if out_dir == data_dir or out_dir == root or root in out_dir.parents:
        raise NucleisegError("the cache cannot be written into the data folder itself; choose another cache folder",
                             out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NucleisegError("exists and is not a folder", out_dir)
    if out_dir.is_dir() and not (out_dir / "manifest.json").is_file() and not _only_cache_files(out_dir):
        raise NucleisegError(
            "folder is not empty and holds no nucleiseg cache (manifest.json); choose another cache folder", out_dir
        )


@dataclass
class _Previous:
    """What an earlier run left in the cache folder."""

    manifest: dict | None
    rows: dict[str, dict]
    images: dict  # image_id -> manifest entry of the images counted as up to date (none with force)
    skipped: dict[str, dict]


def _previous_cache(out_dir: Path, force: bool) -> _Previous:
    manifest = _read_manifest(out_dir)
    index = _read_table(out_dir / "index.csv", INDEX_COLUMNS) if manifest is not None else None
    rows = {} if index is None else {r["image_id"]: r for r in index.to_dict("records")}
    # with force, nothing counts as up to date (old rows are still known, to drop what is gone)
    images: dict = {} if force or manifest is None else manifest.get("images", {})
    skipped = {
        s["image_id"]: s
        for s in ([] if force or manifest is None else manifest.get("skipped", []))
        if isinstance(s, dict) and s.get("fingerprint")
    }
    return _Previous(manifest, rows, images, skipped)


@dataclass
class _Plan:
    """Per source: up to date (its row reused), skipped as before, or to do."""

    rows: dict[str, dict] = field(default_factory=dict)
    entries: dict[str, dict] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    todo: list[tuple[_Sample, str]] = field(default_factory=list)
    fingerprints: dict[str, str | None] = field(default_factory=dict)


def _plan(samples, problems, old: _Previous, data_dir: Path, root: Path, layout: str, out_dir: Path) -> _Plan:
    plan = _Plan(skipped=[{"image_id": i, "source": _relative(p, data_dir), "reason": reason}
                          for i, p, reason in problems])
    for sample in samples:
        fingerprint = _fingerprint(sample, root, layout)
        plan.fingerprints[sample.image_id] = fingerprint
        source = _relative(sample.image, data_dir)
        before = old.images.get(sample.image_id)
        up_to_date = (fingerprint is not None and before is not None and before.get("fingerprint") == fingerprint
                      and sample.image_id in old.rows)
        stats = _output_stats(out_dir, sample.image_id) if up_to_date else None
        if up_to_date and _outputs_intact(before, stats):
            plan.rows[sample.image_id] = {c: old.rows[sample.image_id][c] for c in INDEX_COLUMNS if c != "group"}
            plan.rows[sample.image_id]["source"] = source
            plan.entries[sample.image_id] = before if "outputs" in before else dict(before, outputs=stats)
            plan.reused.append(sample.image_id)
        elif fingerprint is not None and old.skipped.get(sample.image_id, {}).get("fingerprint") == fingerprint:
            plan.skipped.append(dict(old.skipped[sample.image_id], source=source))
        else:
            if up_to_date and stats is not None:
                log.warning("%s: its cache files changed since prepare wrote them; processing it again",
                            sample.image_id)
            plan.todo.append((sample, source))
    # biggest sources first, so no large image is left alone at the end of the pool
    plan.todo.sort(key=lambda t: -sum(_size(p) for p in t[0].files()))
    return plan


def _process(plan: _Plan, out_dir: Path, workers: int, progress: bool, binary_masks: str) -> tuple[list[str], int, bool]:
    """Process the sources to do, adding their rows to the plan: (processed ids, images warned about, interrupted)."""
    processed: list[str] = []
    n_warned = 0
    interrupted = False
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _redirect_logging(progress):
            for result in _run_all(plan.todo, out_dir, workers, progress, binary_masks):
                image_id = result["image_id"]
                for message in result["warnings"]:
                    log.warning("%s", message)
                n_warned += bool(result["warnings"])
                if "skip" in result:
                    plan.skipped.append({"image_id": image_id, "source": result["source"], "reason": result["skip"],
                                         "fingerprint": plan.fingerprints[image_id]})
                    continue
                plan.rows[image_id] = {c: result[c] for c in INDEX_COLUMNS if c != "group"}
                plan.entries[image_id] = {"fingerprint": plan.fingerprints[image_id],
                                          "outputs": _output_stats(out_dir, image_id)}
                if result["warnings"]:
                    plan.entries[image_id]["warnings"] = result["warnings"]
                processed.append(image_id)
    except KeyboardInterrupt:
        # save what is done, so that the next run only does the rest
        interrupted = True
    return sorted(processed), n_warned, interrupted


def _drop_gone(old: _Previous, plan: _Plan, out_dir: Path, pending: list[str]) -> list[str]:
    """Remove the files of images whose source is gone, became unusable, or (interrupted) are not redone yet."""
    dropped = sorted(set(old.rows) - set(plan.rows))
    for image_id in dropped:
        for path in _outputs(out_dir, image_id):
            path.unlink(missing_ok=True)
    return sorted(set(dropped) - set(pending))


def _index_table(rows: dict[str, dict], group_of: dict[str, str]) -> pd.DataFrame:
    index = pd.DataFrame([rows[i] for i in sorted(rows)], columns=[c for c in INDEX_COLUMNS if c != "group"])
    index.insert(INDEX_COLUMNS.index("group"), "group", [group_of.get(i, "") for i in index["image_id"]])
    return index[list(INDEX_COLUMNS)]


def _split(index: pd.DataFrame, old: _Previous, out_dir: Path, val_fraction: float, seed: int,
           interrupted: bool) -> tuple[dict, pd.DataFrame | None]:
    """The split's settings and table: the earlier split kept where its settings did not change."""
    split_settings = {"seed": int(seed), "val_fraction": float(val_fraction)}
    previous = old.manifest.get("split") if old.manifest else None
    old_split = _read_table(out_dir / "split.csv", SPLIT_COLUMNS,
                            f"drawing a new split (seed {seed}, validation fraction {val_fraction}): a model trained "
                            "on the old one may have seen some of the new validation images") if old.manifest else None
    if interrupted:
        # the split is drawn once all images are in: leave split.csv (and its settings) as they were
        return previous or split_settings, old_split
    kept: dict[str, str] = {}
    if old_split is not None and previous == split_settings:
        kept = dict(zip(old_split["image_id"], old_split["split"]))
    elif old_split is not None:
        log.info("split settings changed (%s -> %s): drawing a new split", previous, split_settings)
    split = split_train_val(
        list(index["kind"]),
        list(index["group"]),
        val_fraction=val_fraction,
        seed=seed,
        fixed=[kept.get(i) for i in index["image_id"]] if kept else None,
    )
    _warn_straddling(index["group"], split)
    return split_settings, pd.DataFrame({"image_id": index["image_id"], "split": split})


def _write_cache_files(out_dir: Path, index: pd.DataFrame, split_table: pd.DataFrame | None, manifest: dict,
                       old_manifest: dict | None, work_done: bool) -> None:
    """index.csv, split.csv and manifest.json, each only when it changed (an up-to-date cache is not touched)."""
    changed = _write_if_changed(out_dir / "index.csv", _csv_text(index))
    if split_table is not None:
        changed |= _write_if_changed(out_dir / "split.csv", _csv_text(split_table))
    comparable = {k: v for k, v in (old_manifest or {}).items() if k not in ("updated", "nucleiseg_version")}
    if changed or work_done or comparable != {k: v for k, v in manifest.items() if k != "nucleiseg_version"}:
        manifest["nucleiseg_version"] = __version__
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_if_changed(out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def _report(out_dir: Path, table: pd.DataFrame, processed: list[str], plan: _Plan, dropped: list[str],
            n_warned: int, elapsed: float) -> None:
    log.info(
        "cache %s: %d images (%d processed, %d reused as up to date, %d skipped, %d dropped as gone) in %.1f s",
        out_dir, len(table), len(processed), len(plan.reused), len(plan.skipped), len(dropped), elapsed,
    )
    n_old_warned = sum(1 for i in plan.reused if plan.entries[i].get("warnings"))
    if n_warned or n_old_warned:
        log.info(
            "%d images had warnings (%d of them in earlier runs); all are listed in %s",
            n_warned + n_old_warned, n_old_warned, out_dir / "manifest.json",
        )
    for kind in KINDS:
        part = table[table["kind"] == kind]
        if len(part):
            log.info(
                "  %-12s %4d images: %d train, %d val",
                kind, len(part), int((part["split"] == "train").sum()), int((part["split"] == "val").sum()),
            )


def _warn_straddling(groups: pd.Series, split: np.ndarray) -> None:
    sides: dict[str, set] = {}
    for group, side in zip(groups, split):
        if group:
            sides.setdefault(group, set()).add(side)
    both = sorted(g for g, s in sides.items() if len(s) > 1)
    if both:
        log.warning(
            "groups %s have images in both train and val (kept from the earlier split); "
            "rerun with another --seed to draw a new split",
            ", ".join(both[:10]) + (" ..." if len(both) > 10 else ""),
        )


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _redirect_logging:
    """Route log records through tqdm while a progress bar is shown."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._context = None

    def __enter__(self):
        if self.enabled:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._context = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._context.__enter__()
        return self

    def __exit__(self, *exc):
        if self._context is not None:
            return self._context.__exit__(*exc)
        return False


def read_cache(cache_dir: str | Path) -> pd.DataFrame:
    """Read a prepared cache's index with its train/validation split.

    Parameters
    ----------
    cache_dir : str or Path
        Folder written by :func:`prepare_dataset` (``nucleiseg prepare``).

    Returns
    -------
    table : pandas.DataFrame
        Columns ``image_id, height, width, kind, n_nuclei, group, source,
        split``; ``group`` is ``""`` for an image standing alone. The image,
        mask and label files are ``images/<image_id>.png``,
        ``masks/<image_id>.png`` and ``labels/<image_id>.tif``.

    Raises
    ------
    NucleisegError
        The folder is missing or not a prepared cache.

    Examples
    --------
    >>> table = read_cache("cache/dsb2018")  # doctest: +SKIP
    >>> table.groupby(["kind", "split"]).size()  # doctest: +SKIP
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise NucleisegError("cache folder not found (run 'nucleiseg prepare DATA_DIR --out CACHE' first)", cache_dir)
    hint = "; run 'nucleiseg prepare DATA_DIR --out CACHE' to make one"
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise NucleisegError("not a prepared cache (no readable manifest.json)" + hint, cache_dir) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NucleisegError("not a prepared cache (manifest.json is not a nucleiseg cache manifest)" + hint, cache_dir)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise NucleisegError(
            f"cache format {manifest.get('format_version')} is not the supported {FORMAT_VERSION}; "
            "run 'nucleiseg prepare' again",
            cache_dir,
        )
    if manifest.get("complete") is False:
        raise NucleisegError(
            "the prepare that wrote this cache was interrupted; run the same 'nucleiseg prepare' again to finish it",
            cache_dir,
        )
    source = shlex.quote(str(manifest["source"])) if manifest.get("source") else "DATA_DIR"
    again = f"; run 'nucleiseg prepare {source} --out {shlex.quote(str(cache_dir))}' again to rebuild it"
    index = _read_cache_table(cache_dir / "index.csv", INDEX_COLUMNS, again)
    split = _read_cache_table(cache_dir / "split.csv", SPLIT_COLUMNS, again)
    table = index.merge(split[list(SPLIT_COLUMNS)], on="image_id", how="left", validate="one_to_one")
    if table["split"].isna().any():
        missing = table.loc[table["split"].isna(), "image_id"].iloc[0]
        raise NucleisegError(f"split.csv has no row for image {missing}; run 'nucleiseg prepare' again", cache_dir)
    return table


def _read_cache_table(path: Path, columns: Sequence[str], again: str) -> pd.DataFrame:
    if not path.is_file():
        raise NucleisegError(f"{path.name} is missing" + again, path.parent)
    table, problem = _open_table(path, columns)
    if table is None:
        raise NucleisegError(f"{problem}" + again, path)
    return table[list(columns)]


@dataclass(frozen=True)
class Cache:
    """A prepared cache: the one owner of its layout (where each image's files lie, what makes a cache).

    Examples
    --------
    >>> cache = Cache.open("cache/dsb2018")                      # doctest: +SKIP
    >>> table = cache.table("val")                               # doctest: +SKIP
    >>> image, labels = cache.image(table.image_id[0]), cache.labels(table.image_id[0])  # doctest: +SKIP
    >>> Cache.is_cache("examples/images")
    False
    """

    path: Path

    @staticmethod
    def is_cache(path: str | Path) -> bool:
        """Whether ``path`` holds a cache (its ``manifest.json``); :meth:`open` checks it is a sound one."""
        return (Path(path) / "manifest.json").is_file()

    @classmethod
    def open(cls, path: str | Path) -> Cache:
        """The cache at ``path``, checked (:func:`read_cache`'s errors)."""
        read_cache(path)
        return cls(Path(path))

    def table(self, split: str | None = None) -> pd.DataFrame:
        """:func:`read_cache`'s table; only the rows of ``split`` (``train``, ``val``) unless None or ``all``."""
        table = read_cache(self.path)
        if split not in (None, "all"):
            table = table[table["split"] == split].reset_index(drop=True)
        return table

    def image_path(self, image_id: str) -> Path:
        return self.path / "images" / f"{image_id}.png"

    def mask_path(self, image_id: str) -> Path:
        return self.path / "masks" / f"{image_id}.png"

    def labels_path(self, image_id: str) -> Path:
        return self.path / "labels" / f"{image_id}.tif"

    def image(self, image_id: str) -> np.ndarray:
        """The 8-bit RGB image."""
        return read_image(self.image_path(image_id))

    def labels(self, image_id: str) -> np.ndarray:
        """The instance labels (uint16, 0 = background)."""
        from ..io import read_labels

        return read_labels(self.labels_path(image_id))
