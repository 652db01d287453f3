"""The batch workflow of ``nucleiseg predict``: many image files in, a folder of outputs out.

:func:`predict_files` expands the inputs (files, folders, glob patterns), gives
each image a unique output name, segments them one by one and writes their
outputs, ``summary.csv`` and, with the ``rle`` format, a Kaggle
``submission.csv``; it returns the summary as a DataFrame. The command line
only parses its flags into a :class:`~nucleiseg.options.PredictOptions` and
calls it; a Dask worker or a napari thread calls :func:`predict_one` for one
image.

Nothing half-written survives
-----------------------------
An image's outputs are complete or absent. They are written into a staging
folder inside ``OUT_DIR/.nucleiseg/``, then moved into ``OUT_DIR`` under a
journal entry, and a record of the finished image (its files, nuclei, mean
area) is written last. An image is *done* when its record exists and all the
files it lists do; a run killed at any moment leaves an image either done or
not, and the next run redoes the ones that are not. ``--overwrite`` replaces
an image's whole output set, removing outputs of formats not asked for this
time. A record names its image (path, size, modification time): a re-run
keeps each image's output name, redoes images whose file changed or that lack
a format asked for now, and never removes or replaces a file that no record
lists. One run at a time writes into a folder: a second one is refused in one
line (an advisory lock, released by the system when a run dies).

Examples
--------
>>> import nucleiseg                                                   # doctest: +SKIP
>>> summary = nucleiseg.predict_files(["plate1/"], "results/", formats=["geojson"])  # doctest: +SKIP
>>> summary[["name", "nuclei", "status"]]                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import io as _io
from .errors import NucleisegError, OptionError
from .options import PredictOptions

__all__ = [
    "FORMATS",
    "ImageJob",
    "OutputFolder",
    "SUMMARY_COLUMNS",
    "display",
    "expand_inputs",
    "output_names",
    "plan_outputs",
    "predict_files",
    "predict_one",
]

log = logging.getLogger("nucleiseg.batch")

#: Extra output formats, beside labels, mask, overlay and the per-nucleus table.
FORMATS = ("rle", "imagej-roi", "geojson")

#: Columns of ``summary.csv`` and of the DataFrame :func:`predict_files` returns.
SUMMARY_COLUMNS = ["image", "name", "nuclei", "mean_area", "status", "message"]

#: Hidden folder in ``OUT_DIR`` for the run's bookkeeping: lock, journal, records, staging.
STATE_DIR = ".nucleiseg"

#: Every output kind an image may have, and its file name; ``plan_outputs`` picks those asked for.
_OUTPUT_NAMES = {
    "labels": "{}_labels.tif",
    "mask": "{}_mask.png",
    "overlay": "{}_overlay.png",
    "table": "{}_nuclei.csv",
    "probabilities": "{}_probabilities.tif",
    "rois": "{}_rois.zip",
    "geojson": "{}.geojson",
}

#: Called as ``say(kind, text)`` with kind "note", "warning" or "error", one line each.
Say = Callable[[str, str], None]


def display(path: str | Path) -> str:
    """A path as text that any file or terminal takes: bytes that are not UTF-8 shown as ``\\xNN``.

    Examples
    --------
    >>> display(os.fsdecode(b"cells-\\xff.png"))
    'cells-\\\\xff.png'
    """
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _log_say(kind: str, text: str) -> None:
    (log.info if kind == "note" else log.warning if kind == "warning" else log.error)(text)


# ----------------------------------------------------------------------------- inputs and names
def expand_inputs(specs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image paths for INPUT arguments (files, folders, glob patterns), in order, without repeats.

    Returns
    -------
    paths : list of Path
    problems : list of (input, problem)
        Inputs that gave no image: a missing file, an empty folder, a pattern matching nothing.
    """
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    for spec in specs:
        spec = str(spec)
        path = Path(spec)
        if path.is_dir():
            found = _io.list_images(path)
            broken = sorted(p for p in path.iterdir()
                            if p.suffix.lower() in _io.IMAGE_SUFFIXES and p.is_symlink() and not p.exists())
            problems.extend((str(p), "a link to a file that does not exist") for p in broken)
            if not found and not broken:
                problems.append((spec, f"folder holds no images ({', '.join(_io.IMAGE_SUFFIXES)}) directly inside"))
        elif path.exists() or path.is_symlink():
            found = [path]
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec)
                           if Path(p).is_file() and Path(p).suffix.lower() in _io.IMAGE_SUFFIXES)
            if not found:
                problems.append((spec, "no image file matches this pattern"))
        else:
            found = []
            problems.append((spec, "no such file or folder"))
        paths.extend(found)
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values()), problems


def output_names(paths: Sequence[Path], folder: OutputFolder | None = None) -> tuple[list[str], list[str]]:
    """A unique output name per input (its stem, or ``<stem>-2``, ``-3``, ...), and a note per renaming.

    Names are compared ignoring case: outputs may land on such a file system.
    With the output ``folder``, an image keeps the name its outputs were
    recorded under by an earlier run (:meth:`OutputFolder.recorded_name`),
    and a name whose outputs belong to another image is not given to it.

    Examples
    --------
    >>> output_names([Path("a/cells.png"), Path("b/Cells.tif")])[0]
    ['cells', 'Cells-2']
    """
    taken: dict[str, Path] = {}
    names, notes = [], []
    for path in paths:
        name = folder.recorded_name(path) if folder is not None else None
        if name is None or name.lower() in taken:
            name, k = path.stem, 2
            while name.lower() in taken or (folder is not None and not folder.free_for(name, path)):
                name, k = f"{path.stem}-{k}", k + 1
        if name != path.stem:
            other = taken.get(path.stem.lower())
            owner = f"same name as {display(other)}" if other is not None else (
                f"{display(path.stem)}_* in {display(folder.path)} belong to another image" if folder else "renamed")
            notes.append(f"{display(path)}: {owner}; its outputs are named {display(name)}_*")
        taken[name.lower()] = path
        names.append(name)
    return names, notes


def check_formats(formats: str | Iterable[str] | None) -> tuple[str, ...]:
    """The extra formats asked for, checked: a subset of :data:`FORMATS` (a comma-separated string works too).

    Examples
    --------
    >>> check_formats("geojson, rle"), check_formats("none"), check_formats(None)
    (('geojson', 'rle'), (), ())
    """
    if formats is None:
        return ()
    names = [n.strip().lower() for n in (formats.split(",") if isinstance(formats, str) else formats)]
    names = [n for n in names if n]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise OptionError("formats", f"has unknown format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(names))


def plan_outputs(out_dir: Path, name: str, formats: Sequence[str] = (), save_probabilities: bool = False) -> dict[str, Path]:
    """The output files of one image, keyed by kind (``labels``, ``mask``, ``overlay``, ``table``, ...).

    Examples
    --------
    >>> sorted(plan_outputs(Path("out"), "cells", ["geojson"]))
    ['geojson', 'labels', 'mask', 'overlay', 'table']
    """
    kinds = ["labels", "mask", "overlay", "table"]
    if save_probabilities:
        kinds.append("probabilities")
    if "imagej-roi" in formats:
        kinds.append("rois")
    if "geojson" in formats:
        kinds.append("geojson")
    return {kind: Path(out_dir) / _OUTPUT_NAMES[kind].format(name) for kind in kinds}


@dataclass(frozen=True)
class ImageJob:
    """One image of a batch: where it is read, the name of its outputs, and their paths."""

    path: Path
    name: str
    outputs: dict[str, Path]


# ----------------------------------------------------------------------------- the output folder
class OutputFolder:
    """An output folder with its bookkeeping: lock, journal, per-image records and staging.

    ``OUT_DIR/.nucleiseg/`` holds ``lock`` (held by the run writing here),
    ``done/<name>.json`` (an image whose outputs are complete),
    ``journal/<name>.json`` (an image whose outputs are being moved in) and
    ``staging/<name>/`` (outputs being written).

    Parameters
    ----------
    path : str or Path
        The output folder; created (with its parents) by :meth:`open`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state = self.path / STATE_DIR
        self._lock_file: Any = None
        self._scanned: dict[str, tuple[dict | None, dict | None]] | None = None  # _scan's, read once
        self._by_key: dict[Any, str] | None = None  # recorded images' keys -> their names (recorded_name)

    # -- opening and locking
    def open(self, lock: bool = True) -> OutputFolder:
        """Create the folder and check that it can be written, before any work; take the lock.

        Raises
        ------
        NucleisegError
            The path is a file or lies under one, cannot be created or written,
            or another run holds the lock.
        """
        if self.path.exists() and not self.path.is_dir():
            raise NucleisegError("is a file; expected an output folder", self.path)
        try:
            for sub in ("done", "journal", "staging"):
                (self.state / sub).mkdir(parents=True, exist_ok=True)
            probe = self.state / f"probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if isinstance(exc, (NotADirectoryError, FileExistsError)):
                reason = "a part of the path is a file, not a folder"
            raise NucleisegError(f"cannot write the output folder here ({reason})", self.path) from None
        if lock:
            self._lock()
            self._tidy()
        return self

    def _tidy(self) -> None:
        """Remove the temporary files of writes that a killed run left (atomic_path's ``.<name>.*.tmp*``)."""
        leftovers = [p for name in ("summary.csv", "submission.csv") for p in self.path.glob(f".{name}.*.tmp*")]
        leftovers += [p for sub in ("done", "journal") for p in (self.state / sub).glob(".*.tmp*")]
        for path in leftovers:
            path.unlink(missing_ok=True)

    def _lock(self) -> None:
        path = self.state / "lock"
        handle = open(path, "a+")
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: lock the first byte instead
            import msvcrt

            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            except OSError:
                handle.close()
                raise NucleisegError("another nucleiseg run is writing into this folder; wait for it to "
                                     "finish or choose another output folder", self.path) from None
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise NucleisegError(
                f"another nucleiseg run{f' (process {holder})' if holder.isdigit() else ''} is writing into this "
                "folder; wait for it to finish or choose another output folder", self.path) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def close(self) -> None:
        """Release the lock."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> OutputFolder:
        return self.open() if self._lock_file is None else self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- records
    def _entry(self, where: str, name: str) -> Path:
        return self.state / where / f"{name}.json"

    def _read_entry(self, where: str, name: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(self._entry(where, name).read_text())
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def record(self, name: str) -> dict[str, Any] | None:
        """The record of a done image (its files all present), or None."""
        record = self._read_entry("done", name)
        try:
            files = [self.path / f for f in record["files"].values()]  # type: ignore[index]
        except (KeyError, AttributeError, TypeError):
            return None
        return record if all(f.is_file() for f in files) else None

    def _entries(self, where: str) -> list[str]:
        """The names with an entry in ``done`` or ``journal`` (not a killed write's temporary file)."""
        # io.atomic_path's temporary files are ".<name>.<random>.tmp<suffix>" (a killed write's, until _tidy)
        return sorted(e.stem for e in (self.state / where).glob("*.json")
                      if not (e.name.startswith(".") and ".tmp" in e.name))

    def _scan(self) -> dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]]:
        """Every name's done record and journal entry, read once: what names a run's images before it starts
        (:meth:`owned_paths`, :meth:`recorded_name`); the run itself reads them afresh."""
        if self._scanned is None:
            names = sorted(set(self._entries("done")) | set(self._entries("journal")))
            self._scanned = {n: (self._read_entry("done", n), self._read_entry("journal", n)) for n in names}
        return self._scanned

    def recorded_files(self, name: str) -> set[str]:
        """The file names that this folder's bookkeeping says ``name``'s outputs are (done record and journal)."""
        return _listed_files(self._read_entry("done", name), self._read_entry("journal", name))

    def owned_paths(self) -> set[Path]:
        """Every output file this folder's records list, resolved: never an input of a run into this folder."""
        return {(self.path / f).resolve() for entries in self._scan().values() for f in _listed_files(*entries)}

    def recorded_name(self, path: Path) -> str | None:
        """The name under which an earlier run recorded ``path``'s outputs here (see :func:`_same_image`), or None."""
        if self._by_key is None:
            self._by_key = {}
            for name, (record, _) in reversed(self._scan().items()):  # the first name in order wins
                source = (record or {}).get("source")
                if isinstance(source, dict):  # records of older runs name no image
                    self._by_key.update((key, name) for key in _image_keys(source) if key is not None)
        return next((self._by_key[key] for key in _image_keys(_source(path)) if key in self._by_key), None)

    def free_for(self, name: str, path: Path) -> bool:
        """Whether ``name`` may name ``path``'s outputs: unrecorded, or recorded for this very image (or
        recorded before records named their image)."""
        record = self._read_entry("done", name)
        return record is None or _same_image(record, path) != "other"

    def status(self, job: ImageJob) -> tuple[str, dict[str, Any] | None]:
        """Where ``job``'s outputs stand, and its record when done:

        ``("done", record)``; ``("changed", record)`` (done, but the image file changed since);
        ``("incomplete", record)`` (done, without outputs asked for now); ``("earlier", None)``
        (complete outputs of a version without records); ``("partial", None)`` (outputs of an unfinished
        run, to redo); ``("foreign", None)`` (files at the outputs' names that no run here wrote);
        ``("absent", None)``."""
        record = self.record(job.name)
        if record is not None:  # a run killed just after recording it may have left its journal and staging
            self._entry("journal", job.name).unlink(missing_ok=True)
            self.discard(job.name)
            if _same_image(record, job.path) == "changed":
                return "changed", record
            if any(kind not in record["files"] for kind in job.outputs):
                return "incomplete", record
            return "done", record
        if self._entry("journal", job.name).exists() or self._entry("done", job.name).exists():
            return "partial", None
        present = [f for f in job.outputs.values() if f.exists()]
        if not present:
            return "absent", None
        # Before records existed, the labels were written last: they mark a finished image.
        if job.outputs["labels"].is_file() and job.outputs["table"].is_file():
            return "earlier", None
        return "foreign", None

    def staging(self, name: str) -> Path:
        """A fresh, empty staging folder for the outputs of ``name``."""
        folder = self.state / "staging" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def discard(self, name: str) -> None:
        """Remove the staging folder of ``name`` (after a failure)."""
        shutil.rmtree(self.state / "staging" / name, ignore_errors=True)

    def commit(self, job: ImageJob, staged: Mapping[str, Path], about: Mapping[str, Any]) -> None:
        """Move the staged outputs of ``job`` into the folder as a unit, and record the image as done.

        The outputs an earlier run recorded for the name and this run did not
        write (formats not asked for this time) are removed, so the folder holds
        exactly this run's set; files that no run here wrote are left alone.
        The record names the image (its resolved path, size and modification
        time), so that a later run knows whose outputs these are.
        """
        final = {kind: job.outputs[kind] for kind in staged}
        stale = [self.path / f for f in sorted(self.recorded_files(job.name) - {p.name for p in final.values()})]
        journal = self._entry("journal", job.name)
        _write_json(journal, {"files": {k: p.name for k, p in final.items()}, "stale": [p.name for p in stale]})
        self._entry("done", job.name).unlink(missing_ok=True)
        for kind, source in staged.items():
            os.replace(source, final[kind])
        for path in stale:
            path.unlink(missing_ok=True)
        _write_json(self._entry("done", job.name),
                    {**about, "image": display(job.path), "source": _source(job.path),
                     "files": {k: p.name for k, p in final.items()}})
        journal.unlink()
        self.discard(job.name)

    def forget(self, job: ImageJob) -> None:
        """Remove what an unfinished run left of ``job`` (the outputs its record and journal list, both, and
        its staging)."""
        for name in self.recorded_files(job.name):
            (self.path / name).unlink(missing_ok=True)
        self._entry("journal", job.name).unlink(missing_ok=True)
        self._entry("done", job.name).unlink(missing_ok=True)
        self.discard(job.name)


def _source(path: Path) -> dict[str, Any]:
    """What identifies an image file in a record: its resolved path, size and modification time."""
    try:
        stat = path.stat()
    except OSError:
        return {"path": str(path.resolve())}
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _image_keys(source: Mapping[str, Any]) -> tuple[str, tuple | None]:
    """What a :func:`_source` is matched by: its path, and its file name with size and modification time
    (None without them), so that a file moved with its folder is still found."""
    path = str(source.get("path"))
    stamp = (Path(path).name, source["size"], source.get("mtime_ns")) if "size" in source else None
    return path, stamp


def _same_image(record: Mapping[str, Any], path: Path) -> str:
    """Whether a done record is of the image file ``path``: ``"same"``, ``"changed"`` (the same path, the file
    rewritten since), or ``"other"``. A record without ``source`` (written before records named their
    image) counts as the same. A file moved with its folder (same name, size and time) is the same."""
    source = record.get("source")
    if not isinstance(source, dict):
        return "same"
    (was, was_stamp), (now, now_stamp) = _image_keys(source), _image_keys(_source(path))
    if was == now:
        return "same" if was_stamp == now_stamp else "changed"
    return "same" if was_stamp is not None and was_stamp == now_stamp else "other"


def _listed_files(*entries: Mapping[str, Any] | None) -> set[str]:
    """The output file names a done record and a journal entry list (``files``, and the journal's ``stale``)."""
    files: set[str] = set()
    for entry in entries:
        entry = entry or {}
        listed, stale = entry.get("files"), entry.get("stale")
        files.update(str(f) for f in (listed.values() if isinstance(listed, dict) else ()))
        files.update(str(f) for f in (stale if isinstance(stale, list) else ()))
    return {f for f in files if f and Path(f).name == f}  # plain names in this folder, nothing else


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with _io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


# ----------------------------------------------------------------------------- one image
# An image goes through three stages: _read (the file), _infer (the network; in the process holding the
# model) and _finish (labels, measurements, outputs written and committed; any process or thread).
# predict_one runs them one after the other; predict_files overlaps them across images.


@dataclass
class _Predicted:
    """What the network stage hands to :func:`_finish`: picklable, no model."""

    job: ImageJob
    image: np.ndarray  # as read, the channel asked for selected: the overlay's and the table's image
    probabilities: np.ndarray
    labels: np.ndarray | None  # None: label_nuclei(probabilities, channels, params) in _finish
    params: Any  # PostprocessParams, at the image's scale
    channels: tuple[str, ...]
    scale: float
    auto_scale: bool
    notes: list[tuple[str, str]]


def _read(job: ImageJob, options: PredictOptions) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The image of ``job`` as stored (only its channel ``options.channel``: picked while reading, since a
    hyperstack's channel axis may hold any number of channels), and notes about it."""
    image = _io.read_image(job.path, channel=options.channel)
    notes = []
    if (options.channel is None and image.ndim == 3 and image.shape[-1] == 2
            and job.path.suffix.lower() in _io.TIFF_SUFFIXES):
        # A 2-channel PNG is grey + alpha; a 2-channel TIFF is usually two stains.
        notes.append(("note", f"{display(job.path)}: 2 channels, read as grey + alpha: only channel 1 is segmented "
                              "(channel 2 can be chosen instead)"))
    return image, notes


def _infer(job: ImageJob, image: np.ndarray, notes: list[tuple[str, str]], model: Any, options: PredictOptions,
           progress: Callable[[int, int], None] | None) -> _Predicted:
    """The network's part of :func:`nucleiseg.segment` (with ``scale="auto"``, its labelling too)."""
    from .inference import label_params, postprocess_params, predict_labels, predict_probabilities

    options = options.replace(channel=None)  # _read picked it
    params = postprocess_params(model, image, options)
    labels = None
    if options.scale == "auto":
        probabilities, labels, scale = predict_labels(model, image, params, options, progress=progress)
    else:
        scale = float(options.scale)
        probabilities = predict_probabilities(model, image, options, progress=progress)
        params = label_params(params, scale, options)
    return _Predicted(job, image, probabilities, labels, params, tuple(model.channels), scale,
                      options.scale == "auto", notes)


def _finish(predicted: _Predicted, folder: OutputFolder | Path,
            overlay_thread: bool = True) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Label (unless done), measure, write and commit one image: its summary row and the lines to say.

    ``overlay_thread``: encode the overlay's PNG in a second thread meanwhile (else in this one).
    Never raises for a problem of this image: the row says ``failed``.
    """
    from .measure import measure_nuclei
    from .pipeline import Background
    from .postprocess import label_nuclei
    from .preprocess import to_rgb_uint8

    job = predicted.job
    folder = folder if isinstance(folder, OutputFolder) else OutputFolder(folder)
    said = list(predicted.notes)
    row = _row(job)
    try:
        labels = predicted.labels
        if labels is None:
            labels = label_nuclei(predicted.probabilities, predicted.channels, predicted.params)
        stage = folder.staging(job.name)
        staged = {kind: stage / path.name for kind, path in job.outputs.items()}
        pixel_size = _io.read_pixel_size(job.path)  # the input's calibration, kept for Fiji, napari, QuPath
        if "probabilities" in staged:
            _io.write_probabilities_tiff(staged["probabilities"], predicted.probabilities, predicted.channels,
                                         pixel_size=pixel_size)
        predicted.probabilities = None  # free the largest array before the writers' temporaries
        # The overlay's PNG is encoded in a second thread (zlib releases the GIL) while this one writes the
        # mask, measures and writes the rest: the finishing stage then uses two cores. The thread gets little
        # NumPy work of its own: with the drawing and the mask there too, it waited for the GIL behind this
        # thread's long C calls and became the stage's critical path (twelfth session, profiled). Images side by
        # side encode it in their own thread in fast mode (OVERLAY_THREAD_SIDE_BY_SIDE).
        overlay = _io.draw_overlay(to_rgb_uint8(predicted.image), labels)
        if overlay_thread:
            pngs = Background(_io.write_png, staged["overlay"], overlay)
        else:
            _io.write_png(staged["overlay"], overlay)
            pngs = None
        try:
            _io.write_png(staged["mask"], (labels > 0).astype(np.uint8) * np.uint8(255))
            table = measure_nuclei(labels, predicted.image)
            if "rois" in staged:
                _io.write_imagej_rois(staged["rois"], labels)
            if "geojson" in staged:
                _io.write_geojson(staged["geojson"], labels)
            with _io.atomic_path(staged["table"]) as tmp:
                table.to_csv(tmp, index=False)
            _io.write_labels_tiff(staged["labels"], labels, pixel_size=pixel_size)
        except BaseException:
            if pngs is not None:
                pngs.thread.join()  # done with the staging folder before it is discarded; this error is reported
            raise
        if pngs is not None:
            pngs.result()  # the PNG's own error, if any
        n = len(table)
        row.update(nuclei=n, mean_area=round(float(table["area"].mean()), 2) if n else 0.0)
        if predicted.auto_scale and predicted.scale != 1.0:
            row["message"] = f"resized by {predicted.scale:.3g} for the network (diameter auto)"
        if not n:
            row["message"] = "no nuclei found"
            said.append(("warning", f"{display(job.path)}: no nuclei found (outputs written)"))
        folder.commit(job, staged, {"nuclei": row["nuclei"], "mean_area": row["mean_area"], "message": row["message"]})
    except Exception as exc:  # one image's failure, even a bug, must not cost the others
        return _failed(job, exc, folder, said)
    return row, said


def _row(job: ImageJob) -> dict[str, Any]:
    return {"image": display(job.path), "name": display(job.name), "nuclei": None, "mean_area": None,
            "status": "ok", "message": ""}


def _failed(job: ImageJob, exc: BaseException | str, folder: OutputFolder,
            said: list[tuple[str, str]] = ()) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The row and lines of an image that failed (``exc`` or a message), its staging removed."""
    folder.discard(job.name)
    row = _row(job)
    row.update(status="failed", message=exc if isinstance(exc, str) else _failure(exc, job.path))
    return row, [*said, ("error", f"{display(job.path)}: {row['message']}")]


def predict_one(
    job: ImageJob,
    model: Any,
    options: PredictOptions,
    folder: OutputFolder,
    *,
    say: Say = _log_say,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Segment one image and commit its outputs; its summary row (status ``ok`` or ``failed``).

    Never raises for a problem of this image (unreadable, too small, a
    writer's failure, even a bug): the row says ``failed`` with a one-line
    message, and nothing of its new outputs is left behind.

    Parameters
    ----------
    job : ImageJob
    model : Model
        A loaded :class:`~nucleiseg.inference.Model`.
    options : PredictOptions
        Resolved for the model (:meth:`PredictOptions.resolved`).
    folder : OutputFolder
        Opened.
    say : callable
        ``say(kind, text)`` for notes and warnings about this image.
    progress : callable, optional
        ``progress(done, total)`` with the tiles predicted so far.
    """
    return _predict_read(job, None, model, options, folder, say, progress)


def _predict_read(job: ImageJob, read: Any, model: Any, options: PredictOptions, folder: OutputFolder, say: Say,
                  progress: Callable[[int, int], None] | None, overlay_thread: bool = True) -> dict[str, Any]:
    """:func:`predict_one` with the image already read: ``read`` is :func:`_read`'s result, its
    :class:`~nucleiseg.pipeline.Failed`, or None (read it here); ``overlay_thread`` as :func:`_finish`'s."""
    from .pipeline import Failed

    try:
        if isinstance(read, Failed):
            raise read.error
        image, notes = _read(job, options) if read is None else read
        del read
        predicted = _infer(job, image, notes, model, options, progress)
    except Exception as exc:  # one image's failure, even a bug, must not cost the others
        row, said = _failed(job, exc, folder)
    else:
        del image
        row, said = _finish(predicted, folder, overlay_thread)
    for kind, text in said:
        say(kind, text)
    return row


def _failure(exc: BaseException, path: Path) -> str:
    """One line for the failure of one image."""
    if isinstance(exc, NucleisegError):
        return display(exc.message if exc.path is not None else str(exc))
    if isinstance(exc, MemoryError):
        return ("out of memory: the whole image's buffers did not fit; segment it in blocks (--cluster local:2, "
                "see the README) or a crop of it, or free memory")
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({display(exc.filename)})" if exc.filename else ""
        return f"cannot write its outputs: {exc.strerror}{where}"
    log.debug("traceback of the failure on %s", display(path), exc_info=True)
    return f"unexpected error ({type(exc).__name__}: {display(exc)}); run with -v for the traceback"


# ----------------------------------------------------------------------------- many images
def predict_files(
    inputs: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    *,
    model: Any = "default",
    options: PredictOptions | Mapping[str, Any] | None = None,
    formats: str | Iterable[str] | None = (),
    save_probabilities: bool = False,
    overwrite: bool = False,
    progress: bool | Callable[[int, int], None] | None = None,
    say: Say | None = None,
    workers: int | None = None,
    cluster: Any = None,
    block_size: int | None = None,
) -> Any:
    """Segment image files and write their outputs, ``summary.csv`` and (format ``rle``) ``submission.csv``.

    This is ``nucleiseg predict``. Per image ``<name>`` (the file name without
    its extension; ``<name>-2``... when two inputs share one) ``out_dir`` gets
    ``<name>_labels.tif``, ``_mask.png``, ``_overlay.png``, ``_nuclei.csv``, and
    as asked ``_probabilities.tif``, ``_rois.zip``, ``.geojson``.

    Parameters
    ----------
    inputs : path, glob pattern, folder, or an iterable of them
        Image files (PNG, JPEG, TIFF, BMP), folders (the images directly
        inside) and glob patterns.
    out_dir : str or Path
        Created if needed; checked to be writable before any work.
    model : Model, str or Path
        A loaded model, a model file or run folder, or ``"default"``.
    options : PredictOptions or mapping, optional
        How to predict; the defaults are ``nucleiseg predict``'s.
    formats : iterable of str or str
        Extra outputs: some of :data:`FORMATS` (``rle``, ``imagej-roi``, ``geojson``).
    save_probabilities : bool
        Also write the network's probabilities (float32 TIFF).
    overwrite : bool
        Replace the outputs of images already done (their whole set) instead of skipping them.
    progress : bool or callable, optional
        True: progress bars on stderr (images, and tiles of large images); None:
        the same when stderr is a terminal; a callable: ``progress(done, total)``
        after each image.
    say : callable, optional
        ``say(kind, text)`` receives one line per note, warning or error
        (default: the ``nucleiseg.batch`` logger).
    workers : int, optional
        Worker processes for a batch of :data:`~nucleiseg.pipeline.PROCESS_MIN_IMAGES`
        images or more. On a CPU each worker segments whole images with its
        share of the cores (images that decode to more than
        :data:`IMAGE_WORKER_MAX_BYTES` run afterwards in this process); with
        the network on a GPU they label, measure and write images while the
        network predicts the next ones here. Shorter batches: worker threads.
        Default (None): on a CPU, :data:`SIDE_BY_SIDE` images at a time in
        threads of this process, each reading, segmenting and writing whole
        images with its share of PyTorch's threads (images up to
        :data:`SIDE_BY_SIDE_MAX_BYTES`; larger ones afterwards, as with 0);
        on a GPU, as with 0. 0: each image predicted and written in turn in
        this thread (:func:`predict_one`), the next one read meanwhile in a
        second thread (up to :data:`READ_AHEAD_MAX_BYTES`). The outputs are
        the same either way, byte for byte. On the 2-core development
        machine 2 workers were not consistently faster than one image at a
        time (-6% to +23%, docs/benchmarks.md).
    cluster : str, distributed.Client or None
        Run the images on a Dask cluster (:func:`nucleiseg.distributed.predict_on_cluster`):
        ``"local:N"`` (N worker processes here) or a scheduler's address. Same outputs; images over
        :data:`~nucleiseg.distributed.LARGE_IMAGE_PIXELS` and Zarr folders are segmented in blocks
        (:func:`~nucleiseg.distributed.segment_large`). None: this machine, as always.
    block_size : int, optional
        With ``cluster``: the core side in pixels of the blocks that large images are cut into
        (default :data:`~nucleiseg.distributed.DEFAULT_BLOCK`, 2048), a multiple of the network's
        grid (``2**depth``: 16 for the shipped model). A worker holds one block at a time (about
        1.5 GiB at 2048 with the shipped model in bf16): larger blocks need more memory per worker
        and read less overlap; smaller ones, the reverse.

    Returns
    -------
    pandas.DataFrame
        One row per input (and per input that gave no image): ``image``,
        ``name``, ``nuclei``, ``mean_area``, ``status`` (``ok``, ``skipped`` or
        ``failed``), ``message``; as written to ``summary.csv``.

    Raises
    ------
    NucleisegError
        Before any work: the output folder cannot be written or another run
        holds it, an output would replace an input, the model cannot be read,
        an option is out of range (:class:`~nucleiseg.errors.OptionError`).
        Problems of single images never raise: their rows say ``failed``.
    """
    import pandas as pd

    from .inference import _as_model, resolve_device

    say = say or _log_say
    opts = PredictOptions.from_any(options)
    formats = check_formats(formats)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise OptionError("workers", f"must be a whole number >= 0, got {workers!r}")
    for name, flag in (("overwrite", overwrite), ("save_probabilities", save_probabilities)):
        if not isinstance(flag, (bool, np.bool_)):
            raise OptionError(name, f"must be True or False, got {flag!r}")
    if str(out_dir) == "":
        raise OptionError("out_dir", "is empty; name the output folder ('.' for this one)")
    out_dir = Path(out_dir)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs) if isinstance(inputs, Iterable) and not isinstance(inputs, (bytes, np.ndarray)) else [inputs]
    wrong = [x for x in inputs if not isinstance(x, (str, os.PathLike))]
    if wrong:
        raise OptionError("inputs", f"must be file names, folders or glob patterns (str or Path), got "
                                    f"{type(wrong[0]).__name__}; an image array is segmented with nucleiseg.segment")
    paths, problems = expand_inputs(inputs)
    existing = OutputFolder(out_dir)  # read before the lock is taken: a second run is refused there anyway
    owned = existing.owned_paths()
    paths = [p for p in paths if p.resolve() not in owned]  # an earlier run's outputs in its own input folder
    names, notes = output_names(paths, existing)
    jobs = [ImageJob(p, n, plan_outputs(out_dir, n, formats, save_probabilities)) for p, n in zip(paths, names)]
    _refuse_overwriting_inputs(jobs, out_dir, formats)

    model = _as_model(model, resolve_device(opts.device))
    opts = opts.resolved(model.depth, model.nucleus_diameter)
    block_size = _check_block_size(block_size, cluster, 2**model.depth)
    if isinstance(opts.scale, float) and opts.scale != 1.0:
        log.info("images resized by %.3g for the network", opts.scale)

    with OutputFolder(out_dir) as folder:
        for spec, problem in problems:
            say("error", f"{display(spec)}: {problem}")
        for note in notes:
            say("note", note)
        with _progress_bars(progress, len(jobs)) as (bar, tiles):
            if cluster is not None:
                from .distributed import predict_on_cluster

                rows = predict_on_cluster(cluster, jobs, model, opts, folder, overwrite, say, bar, formats,
                                          block=block_size)
            else:
                rows = _run_all(jobs, model, opts, folder, overwrite, say, tiles, bar, workers)
        if "rle" in formats:
            _write_submission(out_dir / "submission.csv", rows, jobs, say)
        summary = pd.DataFrame(
            rows + [{"image": display(spec), "name": "", "status": "failed", "message": problem}
                    for spec, problem in problems],
            columns=SUMMARY_COLUMNS,
        ).astype({"nuclei": "Int64"})
        with _io.atomic_path(out_dir / "summary.csv") as tmp:
            summary.to_csv(tmp, index=False)
    return summary


def _check_block_size(block_size: Any, cluster: Any, grid: int) -> int | None:
    """``block_size`` checked against the network's ``grid``; None stands for the default."""
    from .blocks import check_block

    if block_size is None:
        return None
    if cluster is None:
        raise OptionError("block_size", "applies to large images on a cluster only (without one, every image "
                                        "is segmented whole)")
    try:
        return check_block(block_size, grid)
    except ValueError as exc:
        raise OptionError("block_size", str(exc).split(" ", 1)[1]) from None


def _run_all(jobs: Sequence[ImageJob], model: Any, opts: PredictOptions, folder: OutputFolder, overwrite: bool,
             say: Say, tiles: Callable[[int, int], None] | None, bar: Callable[[int, int], None],
             workers: int | None) -> list[dict[str, Any]]:
    """The rows of predict_files, in the order of ``jobs``: skipped, or predicted one by one or overlapped."""
    from . import pipeline

    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    done = 0

    def put(k: int, row: dict[str, Any], said: Sequence[tuple[str, str]] = ()) -> None:
        nonlocal done
        for kind, text in said:
            say(kind, text)
        rows[k] = row
        done += 1
        bar(done, len(jobs))

    todo = []
    for k, job in enumerate(jobs):
        row = skipped_row(job, folder, overwrite, say)
        if row is not None:
            put(k, row)
        else:
            todo.append(k)
    #: No processes unless asked: on 2 idle cores, 256² images in accurate mode ran at 6.46 / 5.77 (160 images)
    #: and 6.25 / 6.32 (320) images/s one at a time against 7.25 / 6.49 and 5.86 / 6.70 with 2 image workers;
    #: fast mode 14.0 / 19.9 against 17.5 / 16.8; after the twelfth session's cheaper finishing, fast mode on 192
    #: images 60% / 66% of the network alone against 66% / 67% (benchmarks/predict_speed.py): within the drift,
    #: and each process first imports PyTorch and loads the model. Threads of this process, side by side, cost
    #: no start-up (see SIDE_BY_SIDE).
    lanes = _side_by_side_lanes(model, len(todo)) if workers is None else 1
    workers = 0 if workers is None else workers
    if workers == 0 or not todo:
        sizes: dict[int, int | None] = {}  # decoded bytes, from the headers, read once
        if lanes > 1:
            sizes = {k: _io.header_bytes(jobs[k].path) for k in todo}
            todo = _run_side_by_side(jobs, todo, sizes, model, opts, folder, put, lanes)
        # The next image is read (decoding releases the GIL) while this one is segmented; one of more than
        # READ_AHEAD_MAX_BYTES is read in its turn instead, so that no two large images are held at once.
        def read_small(k: int) -> Any:
            size = sizes[k] if k in sizes else _io.header_bytes(jobs[k].path)
            return None if size is None or size > READ_AHEAD_MAX_BYTES else _read(jobs[k], opts)

        for k, read in pipeline.read_ahead(read_small, todo, depth=1):
            put(k, _predict_read(jobs[k], read, model, opts, folder, say, tiles))
            del read
        return rows  # type: ignore[return-value]

    processes = pipeline.use_processes(workers, len(todo))
    if processes and model.device.type in IMAGE_WORKER_DEVICES:
        _run_image_workers(jobs, todo, model, opts, folder, say, tiles, put, workers)
        return rows  # type: ignore[return-value]
    log.debug("%d images: %d worker %s", len(todo), workers, "processes" if processes else "threads")
    target = folder.path if processes else folder  # a worker process opens the folder by its path
    pending: dict[Any, tuple[int, _Predicted]] = {}
    pool = pipeline.worker_pool(workers, processes)

    def collect(block: bool) -> None:
        """Rows of the finished images; with ``block``, wait for one at least."""
        nonlocal pool
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        finished, _ = wait(list(pending), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        broken = []
        for future in finished:
            k, predicted = pending.pop(future)
            try:
                put(k, *future.result())
            except BrokenProcessPool:
                broken.append((k, predicted))
        if broken or (pending and getattr(pool, "_broken", False)):
            # A worker process died (killed for memory, a crash): every image pending in the pool lost it.
            # Redo them one at a time in fresh pools, so that only the image that kills a worker fails.
            broken += [pending.pop(f) for f in list(pending)]
            pool.shutdown(wait=False, cancel_futures=True)
            for k, predicted in sorted(broken, key=lambda item: item[0]):
                pool = pipeline.worker_pool(1, True)
                try:
                    put(k, *pool.submit(_finish, predicted, target).result())
                except BrokenProcessPool:
                    put(k, *_failed(predicted.job, "the process finishing it died (out of memory?)", folder))
                finally:
                    pool.shutdown(wait=True)
            pool = pipeline.worker_pool(workers, processes)

    warm = not processes
    try:
        for k, read in pipeline.read_ahead(lambda k: _read(jobs[k], opts), todo):
            try:
                if isinstance(read, pipeline.Failed):
                    raise read.error
                predicted = _infer(jobs[k], *read, model, opts, tiles)
            except Exception as exc:  # one image's failure, even a bug, must not cost the others
                put(k, *_failed(jobs[k], exc, folder))
                continue
            del read
            if warm:
                # The first image is finished in this thread, so that the CPU stages' first imports
                # (scikit-image's lazily loaded submodules, imageio's plugins) happen in one thread only.
                put(k, *_finish(predicted, target))
                warm = False
                continue
            pending[pool.submit(_finish, predicted, target)] = (k, predicted)
            del predicted
            collect(block=len(pending) >= 2 * workers)
        while pending:
            collect(block=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return rows  # type: ignore[return-value]


#: Images that decode to more than this are not read ahead of their turn by :func:`predict_files` one image at
#: a time (a 2048 x 2048 RGB image is 12 MiB).
READ_AHEAD_MAX_BYTES = 64 * 1024**2

#: Images segmented side by side by default on a CPU, each in its own thread with its share of PyTorch's
#: threads: each thread's labelling, measurements and writing (which hold the GIL or one core) overlap the
#: other's network, and a network on fewer threads wastes fewer cycles waiting at each operator's end (256²,
#: batch 1, 2-core VM, best of 2 rounds: two single-thread networks side by side ran 36.95 and 28.33 images/s
#: together in fast mode, one on both threads 30.72 and 22.40; accurate 7.80 against 6.55). ``predict`` of 64
#: crops: +40% and +50% (fast), +33% (accurate) against one image at a time, byte-identical outputs
#: (``benchmarks/predict_speed.py``, docs/benchmarks.md). Not measured beyond 2 cores: more threads would
#: contend for the GIL, and on many cores each network keeps several threads anyway.
SIDE_BY_SIDE = 2

#: Images that decode to more than this (about a megapixel: 1024 x 1024 RGBA is 4 MiB) are segmented after
#: the others, one at a time with all of PyTorch's threads: side by side, two networks' activations of up
#: to a megapixel of tiles each would be held at once, and a large image's tiles are many-image batches
#: that use the threads well.
SIDE_BY_SIDE_MAX_BYTES = 4 * 1024**2

#: Modes in which images side by side encode their overlay's PNG in a thread of its own, as one image at a time
#: does; in the others, in the image's own thread. Side by side both cores are busy. 64 crops, 2-core VM, two
#: runs of interleaved rounds (``benchmarks/predict_speed.py --variants default-overlay-inline
#: default-overlay-thread``, docs/benchmarks.md), best images/s, in its own thread against a thread of its own:
#: fast 23.86 against 20.49 and 25.00 against 21.20 (ahead in every round); accurate 9.04 against 9.35 and 8.54
#: against 9.44 (behind in every round).
OVERLAY_THREAD_SIDE_BY_SIDE = ("accurate",)

#: Images that decode to more than this are segmented in the calling process with all its threads, after
#: the others, rather than by an image worker: two at once would double the memory of the largest (an 8000²
#: RGB image needed 3.6 GiB in one process), and a worker's share of the cores would leave it waiting alone.
IMAGE_WORKER_MAX_BYTES = 64 * 1024**2

#: Devices whose batches of many images go to image workers (:func:`_run_image_workers`); on the others (a GPU)
#: the network stays in the calling process and worker processes label, measure and write.
IMAGE_WORKER_DEVICES = ("cpu",)

_IMAGE_WORKER: dict[str, Any] = {}


def _side_by_side_lanes(model: Any, images: int) -> int:
    """How many images :func:`predict_files` segments side by side by default: :data:`SIDE_BY_SIDE` on a CPU
    (at most one per PyTorch thread), else 1."""
    if images < 3 or model.device.type not in IMAGE_WORKER_DEVICES:
        return 1
    import torch

    return max(1, min(SIDE_BY_SIDE, torch.get_num_threads()))


def _run_side_by_side(jobs: Sequence[ImageJob], todo: Sequence[int], sizes: Mapping[int, int | None], model: Any,
                      opts: PredictOptions, folder: OutputFolder, put: Callable[..., None], lanes: int) -> list[int]:
    """Segment the images of ``todo`` up to :data:`SIDE_BY_SIDE_MAX_BYTES` (``sizes``: decoded bytes, None when
    the header cannot be read) in ``lanes`` threads, each
    reading, segmenting and writing whole images (:func:`predict_one`) with its share of PyTorch's threads
    (the first of them alone, in this thread); the larger images, left to run one at a time.

    Rows and lines are handed to ``put`` in this thread as images finish. On an interruption, the images
    in hand are finished (their outputs complete) and no other is started.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from .device import share_threads

    small = [k for k in todo if sizes[k] is None or sizes[k] <= SIDE_BY_SIDE_MAX_BYTES]  # None: fails at once
    if len(small) < 3:
        return list(todo)

    def one(k: int, alone: bool = False) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        said: list[tuple[str, str]] = []
        row = _predict_read(jobs[k], None, model, opts, folder, lambda kind, text: said.append((kind, text)), None,
                            alone or opts.mode in OVERLAY_THREAD_SIDE_BY_SIDE)
        return row, said

    log.debug("%d images: %d side by side", len(small), lanes)
    # The first image alone in this thread, so that the first imports of the stages (scikit-image's lazily
    # loaded submodules, imageio's plugins) happen in one thread only.
    put(small[0], *one(small[0], alone=True))
    rest = iter(small[1:])
    with share_threads(lanes):
        pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="nucleiseg-image")
        pending: dict[Any, int] = {}

        def submit_next() -> None:
            k = next(rest, None)
            if k is not None:
                pending[pool.submit(one, k)] = k

        try:
            for _ in range(2 * lanes):  # a few queued, not the whole batch: a long batch holds no more
                submit_next()
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    put(pending.pop(future), *future.result())
                    submit_next()
        finally:
            _close_finishing(pool)
    done = set(small)
    return [k for k in todo if k not in done]


def _close_finishing(pool: Any) -> None:
    """Shut a thread pool down once the images in its hands are finished, whatever Ctrl-C comes meanwhile.

    A second Ctrl-C while they finish (a terminal's impatient user; ``timeout`` signals twice) would otherwise
    leave threads running PyTorch as the interpreter exits, which aborts the process ("terminate called
    without an active exception", exit 134) instead of exit 130. It is taken as the first one was, once they
    are done.
    """
    interrupted = False
    while True:
        try:
            pool.shutdown(wait=True, cancel_futures=True)  # again after an interruption: joins what is left
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _start_image_worker(model: Any, device: str, threads: int, out_dir: str) -> None:
    """In an image worker process, once: its share of the cores for PyTorch, the model, the output folder."""
    import torch

    from .inference import _as_model

    torch.set_num_threads(threads)
    _IMAGE_WORKER.update(model=_as_model(model, device), folder=OutputFolder(out_dir).open(lock=False))


def _image_in_worker(job: ImageJob, options: PredictOptions) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """In an image worker: :func:`predict_again` of one image; its row and the lines to say."""
    said: list[tuple[str, str]] = []
    row = predict_again(job, _IMAGE_WORKER["model"], options, _IMAGE_WORKER["folder"],
                        say=lambda kind, text: said.append((kind, text)))
    return row, said


def predict_again(job: ImageJob, model: Any, options: PredictOptions, folder: OutputFolder,
                  say: Say = _log_say) -> dict[str, Any]:
    """:func:`predict_one` for an image that another process may have been segmenting when it died.

    Its row from the record when that process committed it (the image is written once), else the image
    segmented anew, after what it left half-done is removed.
    """
    state, record = folder.status(job)
    if state == "done":
        return {"image": display(job.path), "name": display(job.name), "nuclei": record.get("nuclei"),
                "mean_area": record.get("mean_area"), "status": "ok", "message": record.get("message", "")}
    if state == "partial":
        folder.forget(job)
    return predict_one(job, model, options, folder, say=say)


def _run_image_workers(jobs: Sequence[ImageJob], todo: Sequence[int], model: Any, opts: PredictOptions,
                       folder: OutputFolder, say: Say, tiles: Callable[[int, int], None] | None,
                       put: Callable[..., None], workers: int) -> None:
    """Whole images in ``workers`` processes, each running the network on its share of the cores.

    Each process's labelling, measurements and writing overlap the others' networks with no core
    oversubscribed, and the network runs on fewer threads per image, which scale better on many cores
    (on 2 cores not consistently faster than one image at a time, docs/benchmarks.md). Images over
    :data:`IMAGE_WORKER_MAX_BYTES` run afterwards in this process (all its threads).
    """
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    from . import pipeline

    sizes = {k: _io.header_bytes(jobs[k].path) or 0 for k in todo}
    small = [k for k in todo if sizes[k] <= IMAGE_WORKER_MAX_BYTES]
    large = [k for k in todo if sizes[k] > IMAGE_WORKER_MAX_BYTES]
    import torch

    threads = max(1, torch.get_num_threads() // workers)  # the process's threads (--threads) shared out
    init = (model.path if model.path is not None else model, str(model.device), threads, str(folder.path))
    log.debug("%d images: %d image worker processes of %d threads; %d large ones here", len(small), workers,
              threads, len(large))

    def run(ks: list[int], n: int) -> list[int]:
        """Segment images ``ks`` in a fresh pool of ``n`` workers; those lost to a worker that died."""
        lost = []
        pool = pipeline.worker_pool(min(n, len(ks)), True, _start_image_worker, init)
        try:
            futures = {pool.submit(_image_in_worker, jobs[k], opts): k for k in ks}
            for future in as_completed(futures):
                try:
                    put(futures[future], *future.result())
                except BrokenProcessPool:
                    lost.append(futures[future])
                except Exception as exc:  # one image's failure, even a bug, must not cost the others
                    put(futures[future], *_failed(jobs[futures[future]], exc, folder))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return sorted(lost)

    # A worker that died (killed for memory, a crash) cost the images every worker had in hand: they are
    # redone in a fresh pool; what is lost again, one at a time, so that only an image that kills its worker
    # fails.
    lost = run(small, workers) if small else []
    if lost:
        lost = run(lost, workers)
    for k in lost:
        if run([k], 1):
            put(k, *_failed(jobs[k], "the process segmenting it died (out of memory?)", folder))
    for k in large:
        put(k, predict_one(jobs[k], model, opts, folder, say=say, progress=tiles))


def skipped_row(job: ImageJob, folder: OutputFolder, overwrite: bool, say: Say) -> dict[str, Any] | None:
    """The row of an image done earlier (unless overwrite), else None, with what an unfinished run left removed."""
    state, record = folder.status(job)
    if state == "foreign" and not overwrite:
        present = [display(f.name) for f in job.outputs.values() if f.exists()]
        row, lines = _failed(job, f"{', '.join(present)} already in {display(folder.path)}, not written by "
                                  "nucleiseg: overwrite replaces them; or choose another output folder", folder)
        for kind, text in lines:
            say(kind, text)
        return row
    if state in ("done", "earlier") and not overwrite:
        row = {"image": display(job.path), "name": display(job.name), "nuclei": None, "mean_area": None,
               "status": "skipped", "message": "done earlier (overwrite redoes it)"}
        say("note", f"{display(job.path)}: skipped, its outputs in {display(folder.path)} are complete "
                    "(overwrite replaces them)")
        if record is not None and record.get("nuclei") is not None:
            row.update(nuclei=record["nuclei"], mean_area=record.get("mean_area"))
        else:
            _fill_from_table(row, job.outputs["table"])
        return row
    if state == "partial":
        say("note", f"{display(job.path)}: an earlier run left its outputs unfinished: redoing it")
        folder.forget(job)
    elif state == "changed" and not overwrite:
        say("note", f"{display(job.path)}: changed since its outputs were written: segmenting it again")
    elif state == "incomplete" and not overwrite:
        missing = [kind for kind in job.outputs if kind not in record["files"]]  # type: ignore[index]
        say("note", f"{display(job.path)}: its outputs lack {', '.join(missing)}: segmenting it again")
    return None


@contextlib.contextmanager
def _progress_bars(progress: bool | Callable[[int, int], None] | None, total: int) -> Iterator[tuple]:
    """``(images(done, total), tiles(done, total) or None)`` callbacks for predict_files."""
    if callable(progress):
        yield progress, None
        return
    if progress is False:
        yield (lambda done, total: None), None
        return
    from tqdm import tqdm

    disable = None if progress is None else False
    images = tqdm(total=total, desc="predict", unit="image", file=sys.stderr, disable=disable)
    tile_bar: list[Any] = []

    def tiles(done: int, of: int) -> None:
        # a second bar for images of many tiles: large images take minutes
        if of < 8:
            return
        if not tile_bar:
            tile_bar.append(tqdm(total=of, desc="  tiles", unit="tile", file=sys.stderr, leave=False, disable=disable))
        tile_bar[0].update(done - tile_bar[0].n)
        if done >= of:
            tile_bar.pop().close()

    try:
        yield (lambda done, of: images.update(done - images.n)), tiles
    finally:
        for bar in tile_bar:
            bar.close()
        images.close()


def _refuse_overwriting_inputs(jobs: Sequence[ImageJob], out_dir: Path, formats: Sequence[str]) -> None:
    """Refuse, before any work, an output folder where an output would replace an input image."""
    inputs = {job.path.resolve(): job.path for job in jobs}
    run_files = [out_dir / "summary.csv"] + ([out_dir / "submission.csv"] if "rle" in formats else [])
    for target in [f for job in jobs for f in job.outputs.values()] + run_files:
        if target.resolve() in inputs:
            raise NucleisegError(f"output {display(target)} would overwrite the input image "
                                 f"{display(inputs[target.resolve()])}; choose another output folder")


def _fill_from_table(row: dict, table_path: Path) -> None:
    """Nucleus count and mean area of a skipped image, from its existing table, when readable."""
    import pandas as pd

    try:
        areas = pd.read_csv(table_path)["area"]
    except Exception:  # missing or foreign file: the summary leaves the numbers empty
        return
    row.update(nuclei=len(areas), mean_area=round(float(areas.mean()), 2) if len(areas) else 0.0)


def _write_submission(path: Path, rows: Sequence[dict], jobs: Sequence[ImageJob], say: Say) -> None:
    """The Kaggle submission CSV from the label files of all done images, one image in memory at a time."""
    from .data.rle import write_rle_csv

    def items():
        for row, job in zip(rows, jobs):
            if row["status"] == "failed":
                continue
            try:
                yield display(job.name), _io.read_labels(job.outputs["labels"])
            except NucleisegError as exc:
                say("error", f"{row['image']}: not in submission.csv: {display(exc)}")

    write_rle_csv(path, items())
