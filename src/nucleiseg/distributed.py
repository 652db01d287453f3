"""Prediction on a Dask cluster: images too large for one machine, and folders of many images.

Needs the ``cluster`` extra (``dask[distributed]``, ``zarr``, ``ome-zarr``), imported on first use.

One huge image: :func:`segment_large`
-------------------------------------
The image is read lazily -- a (Big)TIFF or OME-TIFF, tiled or pyramidal (level 0), through
tifffile's zarr store; an OME-Zarr or Zarr array; or any array in memory -- and cut into
overlapping blocks (:func:`nucleiseg.blocks.cover`) that run on the workers. Each block is
predicted and post-processed on its outer region, then :func:`nucleiseg.blocks.settle` keeps what
it should: every nucleus is kept by the one block that sees it whole (StarDist's design; see
:mod:`nucleiseg.blocks` for the comparison with Cellpose's label linking and why), with a
global label ``1 + row * width + col`` of its first pixel, so no nucleus is cut in two or counted
twice at a border, and no block waits for another. Every block writes, by itself:

- its core of the labels, ``<name>_labels.ome.zarr`` (NGFF labels; levels 0, 1, ... downsampled
  2x by nearest neighbour; chunks never shared by two blocks);
- the measurements (:func:`nucleiseg.measure.measure_nuclei`) and QuPath outlines
  (:func:`nucleiseg.io.nucleus_features`) of the nuclei it owns, into ``.<name>.blocks/``;
- last, a completion record ``.<name>.blocks/<row>_<col>.json``: a re-run after a crash skips
  the blocks that have one.

When all blocks are done the client streams the per-block parts into ``<name>.geojson`` and
``<name>_nuclei.csv`` (last: its presence marks a finished image) and removes ``.<name>.blocks``.
Neither the workers nor the client ever hold the whole label image.

The intensity scale is the whole image's: the percentiles that a single-machine run takes from
a strided sample of the image (:func:`nucleiseg.preprocess.intensity_levels`) are computed once,
from the same sample, and every block is normalised with them.

The overlap covers the network's reach (:data:`NETWORK_REACH`, the receptive field) plus the
largest foreground region (:data:`LARGEST_REGION`); a region larger than that is still segmented,
but may differ from the single-machine result where it crosses a border: such nuclei are counted
and reported.

Examples
--------
>>> from nucleiseg.distributed import segment_large                          # doctest: +SKIP
>>> segment_large("slide.ome.tif", "results/", cluster="local:2")             # doctest: +SKIP
{'image': 'slide.ome.tif', 'name': 'slide', 'nuclei': 1204311, ...}
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .blocks import Block, check_block, cover, label_dtype, settle
from .errors import ImageReadError, NucleisegError, OptionError

__all__ = [
    "DEFAULT_BLOCK",
    "LARGEST_REGION",
    "LARGE_IMAGE_PIXELS",
    "NETWORK_REACH",
    "ImageSource",
    "NetworkPredictor",
    "connect",
    "open_image",
    "predict_on_cluster",
    "segment_large",
]

log = logging.getLogger("nucleiseg.distributed")

#: Pixels (network pixels) a cut changes the probabilities over: the default network's receptive
#: field is 200 px, 100 px each side (see nucleiseg.inference.DEFAULT_OVERLAP: differences of
#: ~4e-4 at 80 px, nil from 96 px).
NETWORK_REACH = 100

#: Largest foreground region (8-connected nuclei, touching ones together) the default overlap
#: keeps exact: on DSB2018 stage1_train the largest region of the annotations spans 202 px (99th
#: percentile over images 165 px, median 50 px).
LARGEST_REGION = 220

#: Images of more pixels than this go the block path (:func:`segment_large`) when predicted on a
#: cluster: 8000 x 8000, where one process needs 3.6 GiB with the shipped model (docs/benchmarks.md).
LARGE_IMAGE_PIXELS = 64_000_000

#: Core side of a block (pixels). With the default 320 px overlap an interior block reads 2688² px (1.72x
#: its core; 2048 keeps the overhead there while a worker stays small): a worker peaked at 1.51 GiB on
#: 2368² outer regions (4096² mosaic, accurate, bf16; docs/benchmarks.md, "Prediction on a Dask cluster").
DEFAULT_BLOCK = 2048

_OUTPUT_COLUMNS = ["image", "name", "nuclei", "mean_area", "status", "message"]


# ----------------------------------------------------------------------------- cluster
def _local_workers(spec: str) -> int | None:
    """N of ``local:N`` (``local``: one per core), or None when ``spec`` is a scheduler address."""
    if spec == "local":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if spec.startswith("local:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise NucleisegError(f"--cluster {spec}: expected local:N with N >= 1 worker processes")
        return n
    return None


@contextlib.contextmanager
def connect(cluster: Any = "local") -> Iterator[Any]:
    """A Dask client for ``cluster``, closed on exit when opened here.

    Parameters
    ----------
    cluster : str, Client or Cluster
        ``"local:N"``: a ``LocalCluster`` of N worker processes on this machine, one thread
        each (a worker's PyTorch uses its share of the cores, see :func:`_torch_threads`);
        ``"local"``: one worker per core; an address (``tcp://host:8786``): an existing
        scheduler, e.g. one started by ``dask-jobqueue``; or a ``distributed.Client`` /
        cluster object, used as it is.

    Raises
    ------
    NucleisegError
        Dask is not installed, or no scheduler answers at the address.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise NucleisegError("--cluster needs Dask: pip install 'nucleiseg[cluster]'") from None
    if isinstance(cluster, Client):
        yield cluster
        return
    if not log.isEnabledFor(logging.DEBUG):  # Dask's own INFO lines (workers joining, closing) are noise here
        logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger("distributed").level))
    opened: list = []
    try:
        if isinstance(cluster, str):
            n = _local_workers(cluster)
            if n is not None:
                import importlib.util

                dashboard = ":0" if importlib.util.find_spec("bokeh") else None
                local = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                     dashboard_address=dashboard, silence_logs=logging.ERROR)
                opened.append(local)
                client = Client(local)
            else:
                try:
                    client = Client(cluster, timeout="20s")
                except (OSError, TimeoutError, ValueError) as exc:
                    raise NucleisegError(f"--cluster {cluster}: no Dask scheduler answers there ({exc})") from None
        else:
            client = Client(cluster)
        opened.insert(0, client)
        workers = client.scheduler_info().get("workers", {})
        log.info("Dask cluster: %d workers; dashboard %s", len(workers),
                    client.dashboard_link if client.dashboard_link else "(pip install bokeh to serve one)")
        yield client
    finally:
        for thing in opened:
            with contextlib.suppress(Exception):
                thing.close()


def _torch_threads(client) -> dict[str, int]:
    """Torch threads for a task on each worker: its host's cores over the task slots of that host."""
    workers = client.scheduler_info().get("workers", {})
    cores = client.run(lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    slots: dict[str, int] = {}
    for address, info in workers.items():
        slots[info.get("host", address)] = slots.get(info.get("host", address), 0) + int(info.get("nthreads", 1))
    return {address: max(1, int(cores.get(address, 1)) // slots[info.get("host", address)])
            for address, info in workers.items()}


def _set_threads(threads: dict[str, int]) -> None:
    """On a worker: give PyTorch this worker's share of the cores."""
    with contextlib.suppress(Exception):
        from distributed import get_worker

        n = threads.get(get_worker().address)
        if n:
            import torch

            if torch.get_num_threads() != n:
                torch.set_num_threads(n)


_MODELS: dict[tuple[str, str, float], Any] = {}


def worker_model(model: Any, device: str = "cpu"):
    """The model, loaded once per process (a Dask worker's tasks share it), keyed by file and device.

    ``model``: a model file, a training run folder, ``"default"``, or a loaded Model (returned as it is).
    """
    from .inference import Model, load_model
    from .models import resolve_model_path

    if isinstance(model, Model):
        return model
    path = resolve_model_path(None if model in (None, "default") else model)
    key = (str(path.resolve()), str(device), path.stat().st_mtime)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(path, device)
    return _MODELS[key]


# ----------------------------------------------------------------------------- lazy images
_OPEN: dict[tuple, Any] = {}


@dataclass
class ImageSource:
    """A 2-D image that blocks are read from (:func:`open_image`); small and picklable.

    Attributes
    ----------
    kind : {"zarr", "tiff", "array"}
    path : str or None
    component : str or None
        The array inside a Zarr group.
    axes : tuple
        For each stored axis: ``"y"``, ``"x"``, ``"c"`` (channels), or 0 (a single-plane axis).
    shape : tuple
        ``(H, W)`` or ``(H, W, C)``.
    dtype : str
    array : ndarray or None
        The pixels, for an image held in memory.
    """

    kind: str
    path: str | None
    component: str | None
    axes: tuple
    shape: tuple
    dtype: str
    array: Any = field(default=None, repr=False)

    def _stored(self):
        if self.kind == "array":
            return self.array
        key = (self.kind, self.path, self.component)
        if key not in _OPEN:
            _OPEN[key] = _open_store(self.kind, self.path, self.component)
        return _OPEN[key]

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """The pixels ``[rows, cols]``, as ``(h, w)`` or ``(h, w, C)``."""
        index = tuple(rows if a == "y" else cols if a == "x" else slice(None) if a == "c" else 0 for a in self.axes)
        out = np.asarray(self._stored()[index])
        kept = [a for a in self.axes if a != 0]
        if "c" in kept and kept.index("c") != len(kept) - 1:
            out = np.moveaxis(out, kept.index("c"), -1)
        if out.ndim == 2:
            return out
        if kept.index("y") > kept.index("x"):
            out = out.swapaxes(0, 1)
        return out

    @property
    def pixels(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])


def _open_store(kind: str, path: str, component: str | None):
    import zarr

    if kind == "tiff":
        import tifffile

        return zarr.open(tifffile.imread(path, aszarr=True, level=0), mode="r")
    node = zarr.open(path, mode="r")
    return node[component] if component else node


def _axes_from_shape(shape: tuple, path) -> tuple:
    """Axes of an array with no metadata: single planes dropped, channels first or last (<= 4)."""
    axes: list = [0 if n == 1 else None for n in shape]
    rest = [i for i, a in enumerate(axes) if a is None]
    if len(rest) == 2:
        axes[rest[0]], axes[rest[1]] = "y", "x"
    elif len(rest) == 3 and shape[rest[2]] <= 4:
        axes[rest[0]], axes[rest[1]], axes[rest[2]] = "y", "x", "c"
    elif len(rest) == 3 and shape[rest[0]] <= 4:
        axes[rest[0]], axes[rest[1]], axes[rest[2]] = "c", "y", "x"
    else:
        raise ImageReadError(f"expected a 2-D grey, RGB or RGBA image, got an array of shape {tuple(shape)}", path)
    return tuple(axes)


def _axes_from_names(names: list[str], shape: tuple, path) -> tuple:
    """Axes from named axes (NGFF ``t c z y x``, TIFF ``TCZYXS``): other axes must be single planes."""
    axes: list = []
    for name, n in zip(names, shape):
        name = name.lower()
        if name in ("y", "x"):
            axes.append(name)
        elif name in ("c", "s") and n > 1:
            axes.append("c")
        elif n == 1:
            axes.append(0)
        else:
            raise ImageReadError(
                f"has {n} planes along axis {name!r}: a z-stack, time series or multi-position file? "
                "Segment one 2-D plane, saved as its own image", path)
    if axes.count("c") > 1 or "y" not in axes or "x" not in axes:
        raise ImageReadError(f"cannot find the image's y and x axes among {names}", path)
    return tuple(axes)


def open_image(source: str | Path | np.ndarray, name: str | None = None) -> tuple[ImageSource, str]:
    """A lazily read 2-D image, and its name (for the outputs).

    Parameters
    ----------
    source : path or ndarray
        A TIFF / BigTIFF / OME-TIFF (level 0 of a pyramid, through tifffile's zarr store); a
        Zarr array or OME-Zarr image (``.zarr`` folder; level 0); another image file
        (PNG, JPEG, BMP: read into memory); or an array ``(H, W)`` / ``(H, W, C)``.
    name : str, optional
        Output name; default: the file name without its extension(s) (``"image"`` for an array).

    Raises
    ------
    ImageReadError
        Missing, unreadable, or not a 2-D grey / RGB / RGBA image.

    Examples
    --------
    >>> source, name = open_image(np.zeros((300, 200, 3), np.uint8))
    >>> source.shape, source.read(slice(0, 10), slice(5, 9)).shape, name
    ((300, 200, 3), (10, 4, 3), 'image')
    """
    from .io import IMAGE_SUFFIXES, TIFF_SUFFIXES, as_2d_image, read_image

    if isinstance(source, np.ndarray) or hasattr(source, "__array__") and not isinstance(source, (str, Path)):
        array = as_2d_image(np.asarray(source), Path("<array>"))
        return ImageSource("array", None, None, ("y", "x", "c")[: array.ndim], array.shape, str(array.dtype),
                           array), name or "image"
    path = Path(source)
    stem = path.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = path.stem
    name = name or stem
    if not path.exists():
        raise ImageReadError("no such file", path)
    suffix = path.suffix.lower()
    component = None
    try:
        if path.is_dir() or suffix == ".zarr":
            import zarr

            node = zarr.open(path, mode="r")
            names = None
            if isinstance(node, zarr.Group):
                attrs = dict(node.attrs)
                multiscales = attrs.get("ome", attrs).get("multiscales")
                if not multiscales:
                    arrays = sorted(k for k, _ in node.arrays())
                    if not arrays:
                        raise ImageReadError("is a Zarr group without an image (no multiscales, no array)", path)
                    component = arrays[0]
                else:
                    component = multiscales[0]["datasets"][0]["path"]
                    names = [a["name"] if isinstance(a, dict) else a for a in multiscales[0].get("axes", [])] or None
                array = node[component]
            else:
                array = node
            axes = _axes_from_names(names, array.shape, path) if names else _axes_from_shape(array.shape, path)
            kind = "zarr"
        elif suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, names, dtype = series.levels[0].shape, list(series.levels[0].axes), series.dtype
            array = None
            axes = _axes_from_names(names, shape, path)
            kind = "tiff"
        elif suffix in IMAGE_SUFFIXES:
            return open_image(read_image(path), name)
        else:
            raise ImageReadError(f"cannot be read as an image: {suffix or 'no extension'} is not a format "
                                 "nucleiseg reads blockwise (TIFF, OME-TIFF, Zarr, OME-Zarr)", path)
    except NucleisegError:
        raise
    except Exception as exc:  # decoders raise many types; all mean "not a readable image"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(f"cannot be read as an image ({reason})", path) from None
    if array is not None:
        shape, dtype = array.shape, array.dtype
    kept = {a: n for a, n in zip(axes, shape) if a != 0}
    full = (kept["y"], kept["x"]) + ((kept["c"],) if "c" in kept else ())
    if "c" in kept and kept["c"] > 4:
        raise ImageReadError(f"has {kept['c']} channels; nucleiseg reads grey, RGB or RGBA (pick one channel "
                             "with --channel after converting, or save the nuclear stain as its own image)", path)
    return ImageSource(kind, str(path), component, axes, full, str(np.dtype(dtype))), name


def _sample(client, source: ImageSource, step: int, local_pixels: int = LARGE_IMAGE_PIXELS,
            piece_side: int = 4096) -> np.ndarray:
    """``image[::step, ::step]`` (what the intensity percentiles are taken from); read in pieces on the
    workers when the image has more than ``local_pixels`` pixels."""
    height, width = source.shape[:2]
    if source.kind == "array" or client is None or source.pixels <= local_pixels:
        return source.read(slice(0, height, step), slice(0, width, step)) if source.kind != "array" \
            else source.array[::step, ::step]
    side = step * max(1, piece_side // step)  # pieces start on the sample's grid

    def piece(r0: int, c0: int) -> np.ndarray:
        return source.read(slice(r0, min(height, r0 + side)), slice(c0, min(width, c0 + side)))[::step, ::step]

    rows, cols = range(0, height, side), range(0, width, side)
    futures = [[client.submit(piece, r0, c0, pure=False) for c0 in cols] for r0 in rows]
    return np.concatenate([np.concatenate(client.gather(row), axis=1) for row in futures], axis=0)


# ----------------------------------------------------------------------------- predictors
@dataclass
class NetworkPredictor:
    """Probabilities of a block from a nucleiseg model (loaded once per worker process).

    Calling it with a block returns ``(probabilities (C, h, w), channel names)``; any picklable
    callable with that signature and a ``reach`` attribute (pixels a cut disturbs) may replace
    it in :func:`segment_large` (probabilities computed elsewhere, or exact synthetic ones).
    """

    model: Any
    device: str = "auto"
    options: Any = None
    levels: Any = None
    reach: int = NETWORK_REACH

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
        from .inference import predict_probabilities, resolve_device

        model = worker_model(self.model, str(resolve_device(self.device)))
        return predict_probabilities(model, image, self.options, levels=self.levels), tuple(model.channels)


# ----------------------------------------------------------------------------- blocks
@dataclass
class _Job:
    """What every block task of one image needs (sent to each worker once)."""

    source: ImageSource
    labels: str
    parts: str
    n_levels: int
    predictor: Callable
    channel: int | None
    params: Any
    geojson: bool
    threads: dict


def _segment_block(job: _Job, block: Block) -> dict:
    """Segment one block on a worker and write its part of every output; returns its record."""
    import resource

    import zarr

    from .io import atomic_path, nucleus_features
    from .measure import measure_nuclei
    from .postprocess import label_nuclei
    from .preprocess import select_channel

    _set_threads(job.threads)
    start = time.perf_counter()
    image = job.source.read(*block.outer)
    if job.channel is not None:
        image = select_channel(image, job.channel)
    probabilities, channels = job.predictor(image)
    labels = label_nuclei(probabilities, channels, job.params)
    foreground = probabilities[list(channels).index("body")] > job.params.foreground_threshold
    del probabilities
    kept = settle(labels, block, getattr(job.predictor, "reach", 0), foreground)
    root = zarr.open_group(job.labels, mode="r+")
    for k in range(job.n_levels):
        f = 2**k
        rows = slice(block.core[0].start // f, -(-block.core[0].stop // f))
        cols = slice(block.core[1].start // f, -(-block.core[1].stop // f))
        root[str(k)][rows, cols] = kept.core[::f, ::f]
    ids = np.zeros(int(labels.max(initial=0)) + 1, np.uint64)
    ids[kept.owned] = kept.ids
    mine = np.where(ids[labels] > 0, labels, 0)
    table = measure_nuclei(mine, image)
    table["label"] = ids[table["label"].to_numpy()].astype(np.int64)
    for column, offset in (("centroid_y", 0), ("bbox_min_row", 0), ("bbox_max_row", 0),
                           ("centroid_x", 1), ("bbox_min_col", 1), ("bbox_max_col", 1)):
        table[column] += block.origin[offset]
    table = table.sort_values("label")
    parts = Path(job.parts)
    with atomic_path(parts / f"{block.name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    if job.geojson:
        with atomic_path(parts / f"{block.name}.geojsonl") as tmp, open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(feature) + "\n" for feature in nucleus_features(mine, block.origin, ids))
    record = {
        "block": block.name, "nuclei": len(table), "area": int(table["area"].sum()), "uncertain": kept.uncertain,
        "seconds": round(time.perf_counter() - start, 3),
        "pixels": int(np.prod(block.outer_shape)),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    with atomic_path(parts / f"{block.name}.json") as tmp:
        tmp.write_text(json.dumps(record))
    return record


def _pyramid(shape: tuple[int, int], block: int) -> tuple[int, list[int]]:
    """Number of label levels, and the chunk side of each: every chunk lies in one block's core."""
    chunks = []
    for k in range(6):
        side = block >> k
        if k and (block % (2**k) or side < 128 or max(shape) >> k < 256):
            break
        chunk = side
        while chunk > 1024 and chunk % 2 == 0:
            chunk //= 2
        chunks.append(chunk)
    return len(chunks), chunks


def _create_labels(path: Path, shape: tuple[int, int], block: int, name: str) -> int:
    """An empty NGFF label image (levels of :func:`_pyramid`); returns the number of levels."""
    import zarr
    from ome_zarr.format import CurrentFormat
    from ome_zarr.writer import add_metadata, write_multiscales_metadata

    n_levels, chunks = _pyramid(shape, block)
    dtype = label_dtype(shape)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    datasets = []
    for k, chunk in enumerate(chunks):
        f = 2**k
        root.create_array(str(k), shape=(-(-shape[0] // f), -(-shape[1] // f)), chunks=(chunk, chunk),
                          dtype=dtype, fill_value=0)
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [float(f), float(f)]}]})
    write_multiscales_metadata(root, datasets, axes=[{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                               name=name)
    add_metadata(root, {"image-label": {"version": CurrentFormat().version}})
    return n_levels


def _lines(path: Path, skip: int = 0) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for k, line in enumerate(handle):
            if k >= skip and line.strip():
                yield line.rstrip("\n")


def _assemble(parts: Path, blocks: list[Block], table: Path, geojson: Path | None) -> None:
    """Stream the blocks' parts into the image's GeoJSON and table (last: it marks the image done)."""
    from .io import atomic_path, write_feature_collection

    if geojson is not None:
        write_feature_collection(geojson, (line for b in blocks for line in _lines(parts / f"{b.name}.geojsonl")))
    with atomic_path(table) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for k, b in enumerate(blocks):
            out.writelines(line + "\n" for line in _lines(parts / f"{b.name}.csv", skip=0 if k == 0 else 1))


def segment_large(
    source: str | Path | np.ndarray,
    out_dir: str | Path,
    *,
    model: str | Path | None = "default",
    options: Any = None,
    cluster: Any = "local",
    block: int = DEFAULT_BLOCK,
    overlap: int | None = None,
    name: str | None = None,
    geojson: bool = True,
    overwrite: bool = False,
    predictor: Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Segment an image of any size on a Dask cluster, block by block, resuming where a run stopped.

    Parameters
    ----------
    source : path or ndarray
        See :func:`open_image`.
    out_dir : path
        Receives ``<name>_labels.ome.zarr``, ``<name>_nuclei.csv`` and (``geojson``)
        ``<name>.geojson``; see the module's description.
    model : path or "default"
        Model file or training run folder, loaded once by each worker.
    options : PredictOptions or dict, optional
        ``mode``, ``tta``, ``tile``, ``overlap`` (the network's tiles inside a block), ``batch_size``,
        ``precision``, ``device``, ``scale`` (a number: ``"auto"`` needs the whole image),
        ``channel``, ``min_size``, ``postprocess`` as for ``nucleiseg predict``.
    cluster : str, Client or Cluster
        See :func:`connect`; default a local cluster of one worker per core.
    block : int
        Core side of a block in pixels (a multiple of the network's ``2**depth``).
    overlap : int, optional
        Pixels each block reads around its core; default ``NETWORK_REACH / scale +
        LARGEST_REGION``, rounded up to a multiple of ``2**depth``.
    name : str, optional
        Output name (default: the file name without extension).
    geojson : bool
        Also write the QuPath GeoJSON.
    overwrite : bool
        Start again even when outputs or finished blocks of an earlier run exist.
    predictor : callable, optional
        Replaces the network (see :class:`NetworkPredictor`).
    progress : callable, optional
        Called as ``progress(blocks_done, blocks_total)``.

    Returns
    -------
    dict
        The image's row of ``summary.csv``: image, name, nuclei, mean_area, status (ok | skipped),
        message; and ``blocks``: each block's record (nuclei, area, uncertain, seconds, outer
        pixels, peak_rss_mib: the worker process's peak resident memory so far).

    Raises
    ------
    NucleisegError
        Unreadable image, bad options, or blocks that failed (those done are kept: run again).
    """
    import dataclasses

    from .io import atomic_path
    from .options import PredictOptions
    from .postprocess import PostprocessParams

    image, name = open_image(source, name)
    out_dir = Path(out_dir)
    label_path = out_dir / f"{name}_labels.ome.zarr"
    table_path = out_dir / f"{name}_nuclei.csv"
    geojson_path = out_dir / f"{name}.geojson" if geojson else None
    parts = out_dir / f".{name}.blocks"
    row = {"image": str(source) if not isinstance(source, np.ndarray) else name, "name": name,
           "nuclei": None, "mean_area": None, "status": "ok", "message": ""}
    if table_path.exists() and not parts.exists() and not overwrite:
        areas = _areas(table_path)
        row.update(status="skipped", message="done earlier (overwrite redoes it)")
        if areas is not None:
            row.update(nuclei=len(areas), mean_area=round(float(areas.mean()), 2) if len(areas) else 0.0)
        return row

    opts = PredictOptions.from_any(options)
    where = row["image"] if not isinstance(source, np.ndarray) else None
    depth_align = 16
    if predictor is None:
        from .inference import resolve_device

        device = str(resolve_device(opts.device))
        net = worker_model(model, device)
        depth_align = 2**net.depth
        opts = opts.resolved(net.depth, net.nucleus_diameter)
        reach = NETWORK_REACH
    else:
        reach = int(getattr(predictor, "reach", 0))
    if opts.scale == "auto":
        raise NucleisegError("diameter / scale 'auto' needs the whole image at once; give the nuclei's diameter "
                             "in pixels or a scale for an image segmented in blocks", where)
    scale = float(opts.scale)
    reach = math.ceil(reach / scale)
    if overlap is None:
        overlap = reach + LARGEST_REGION
    overlap = -(-int(overlap) // depth_align) * depth_align
    try:
        block = check_block(block, depth_align)
    except ValueError as exc:
        raise OptionError("block", str(exc).split(" ", 1)[1]) from None
    blocks = cover(image.shape[:2], block, overlap, depth_align)

    with connect(cluster) as client:
        if predictor is None:
            from .preprocess import intensity_levels, sample_step, select_channel

            sample = _sample(client, image, sample_step(image.shape))
            if opts.channel is not None:
                try:
                    sample = select_channel(sample, opts.channel)
                except ValueError as exc:
                    raise NucleisegError(f"channel {opts.channel}: the image {exc}", where) from None
            levels = intensity_levels(sample)
            params = net.postprocess_for(sample)  # the image's kind, from the same pixels as in memory
            predictor = NetworkPredictor(net.path if net.path is not None else net, opts.device, opts, levels, reach)
            del sample
        else:
            params = PostprocessParams()
        if opts.postprocess:
            params = replace(params, **opts.postprocess)
        params = params.at_scale(scale)
        if opts.min_size is not None:
            params = replace(params, min_size=int(opts.min_size))
        fingerprint = {  # what a resumed run must share with the one it resumes
            "shape": list(image.shape), "block": int(block), "overlap": overlap, "reach": reach,
            "params": dataclasses.asdict(params), "geojson": bool(geojson), "predictor": "custom",
        }
        if isinstance(predictor, NetworkPredictor):
            fingerprint["predictor"] = repr((str(predictor.model) if isinstance(predictor.model, (str, Path))
                                             else "model in memory", predictor.options, predictor.levels))
        run_file = parts / "run.json"
        if overwrite:
            shutil.rmtree(parts, ignore_errors=True)
            shutil.rmtree(label_path, ignore_errors=True)
        if parts.exists() and run_file.exists():
            if json.loads(run_file.read_text()) != fingerprint:
                raise NucleisegError(f"an unfinished run with other settings left {parts.name} here; run with the "
                                     "same settings to resume it, or --overwrite to start again", out_dir)
        else:
            shutil.rmtree(parts, ignore_errors=True)
            parts.mkdir(parents=True)
            _create_labels(label_path, image.shape[:2], int(block), name)
            with atomic_path(run_file) as tmp:
                tmp.write_text(json.dumps(fingerprint))
        if image.kind == "array":  # workers read it from the output folder: no copy dies with a worker
            image = _stored_copy(image, parts / "image.zarr", int(block))
        n_levels, _ = _pyramid(image.shape[:2], int(block))
        todo = [b for b in blocks if not (parts / f"{b.name}.json").exists()]
        done = len(blocks) - len(todo)
        if done:
            log.info("%s: resuming, %d of %d blocks already done", name, done, len(blocks))
        job = _Job(image, str(label_path), str(parts), n_levels, predictor, opts.channel, params, geojson,
                   _torch_threads(client))
        futures = client.map(_segment_block, [job] * len(todo), todo, pure=False, retries=1)
        from distributed import as_completed

        failures = []
        if progress:
            progress(done, len(blocks))
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as exc:  # a block's failure must not lose the others' work
                failures.append(exc)
                log.debug("a block of %s failed", name, exc_info=(type(exc), exc, exc.__traceback__))
            done += 1
            if progress:
                progress(done, len(blocks))
    if failures:
        first = failures[0]
        message = first.message if isinstance(first, NucleisegError) else f"{type(first).__name__}: {first}"
        raise NucleisegError(f"{len(failures)} of {len(blocks)} blocks failed ({message}); the finished ones are "
                             "kept: run again to resume", row["image"])
    records = [json.loads((parts / f"{b.name}.json").read_text()) for b in blocks]
    _assemble(parts, blocks, table_path, geojson_path)
    shutil.rmtree(parts, ignore_errors=True)
    nuclei = sum(r["nuclei"] for r in records)
    uncertain = sum(r["uncertain"] for r in records)
    row["blocks"] = records
    row.update(nuclei=nuclei, mean_area=round(sum(r["area"] for r in records) / nuclei, 2) if nuclei else 0.0)
    if uncertain:
        row["message"] = (f"{uncertain} nuclei lie in regions wider than the block overlap allows ({overlap} px): "
                          "they may differ from a whole-image run at block borders; raise the overlap")
        log.warning("%s: %s", name, row["message"])
    elif not nuclei:
        row["message"] = "no nuclei found"
    return row


def _stored_copy(image: ImageSource, path: Path, block: int) -> ImageSource:
    """An image held in memory, written once as a Zarr array that every worker reads."""
    import zarr

    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        array = zarr.open_array(tmp, mode="w", shape=image.array.shape, dtype=image.array.dtype,
                                chunks=(block, block) + image.array.shape[2:])
        array[...] = image.array
        os.replace(tmp, path)
    return ImageSource("zarr", str(path), None, image.axes, image.shape, image.dtype)


def _areas(table: Path):
    import pandas as pd

    try:
        return pd.read_csv(table)["area"]
    except Exception:  # missing or foreign file: the summary leaves the numbers empty
        return None


# ----------------------------------------------------------------------------- many images
def is_large(path: Path) -> bool:
    """Whether an input goes the block path on a cluster: a Zarr folder, or a TIFF over
    :data:`LARGE_IMAGE_PIXELS` (read from its header; other formats are read whole anyway)."""
    path = Path(path)
    if path.is_dir():
        return path.suffix.lower() == ".zarr"
    from .io import TIFF_SUFFIXES

    if path.suffix.lower() not in TIFF_SUFFIXES:
        return False
    try:
        source, _ = open_image(path)
    except NucleisegError:
        return False  # predict_one reports the problem
    return source.pixels > LARGE_IMAGE_PIXELS


def _predict_image(job, model: Any, options, out_dir: str, threads: dict[str, int]) -> dict:
    """On a worker: one image of a batch, through the batch module's staging and commit."""
    from .batch import OutputFolder, predict_again
    from .inference import resolve_device

    _set_threads(threads)
    folder = OutputFolder(out_dir).open(lock=False)  # the client holds the run's lock
    # a retry of a task whose first worker died gets the committed image's row, or redoes it
    return predict_again(job, worker_model(model, str(resolve_device(options.device))), options, folder)


def predict_on_cluster(cluster, jobs, model, options, folder, overwrite: bool, say, progress, formats=(),
                       block: int | None = None) -> list[dict]:
    """The images of :func:`nucleiseg.batch.predict_files` on a Dask cluster; their summary rows, in order.

    Images done earlier are skipped here (unless ``overwrite``); the others fan out over the workers,
    each through :func:`nucleiseg.batch.predict_one` (staged, committed as a unit, so that an image
    retried after its worker died is written once). A failing image fails alone. Large images
    (:func:`is_large`) then run one after the other, each spread over the cluster in blocks
    (:func:`segment_large`), in blocks of ``block`` pixels (default :data:`DEFAULT_BLOCK`).
    ``progress(done, total)`` counts images.
    """
    from distributed import as_completed

    from .batch import _failure, display, skipped_row

    rows: list[dict | None] = [None] * len(jobs)
    large, pending = [], []
    for i, job in enumerate(jobs):
        if is_large(job.path):
            large.append(i)
            continue
        rows[i] = skipped_row(job, folder, overwrite, say)
        if rows[i] is None:
            pending.append(i)
    done = len(jobs) - len(large) - len(pending)
    progress(done, len(jobs))
    reference = model.path if getattr(model, "path", None) is not None else model
    with connect(cluster) as client:
        threads = _torch_threads(client)
        futures = {client.submit(_predict_image, jobs[i], reference, options, str(folder.path), threads,
                                 pure=False, retries=1): i for i in pending}
        for future in as_completed(futures):
            i = futures[future]
            try:
                rows[i] = future.result()
            except Exception as exc:  # a worker died too often on it (KilledWorker), or the cluster failed
                rows[i] = {"image": display(jobs[i].path), "name": display(jobs[i].name), "nuclei": None,
                           "mean_area": None, "status": "failed", "message": _failure(exc, jobs[i].path)}
            row = rows[i]
            if row["status"] == "failed":
                say("error", f"{row['image']}: {row['message']}")
            elif row["message"] == "no nuclei found":
                say("warning", f"{row['image']}: no nuclei found (outputs written)")
            done += 1
            progress(done, len(jobs))
        for i in large:
            job = jobs[i]
            try:
                rows[i] = segment_large(job.path, folder.path, model=reference, options=options, cluster=client,
                                        name=job.name, geojson="geojson" in formats, overwrite=overwrite,
                                        block=block or DEFAULT_BLOCK)
                if rows[i]["status"] == "ok":
                    say("note", f"{display(job.path)}: segmented in blocks (outputs {display(job.name)}_labels.ome.zarr"
                                f", _nuclei.csv{', .geojson' if 'geojson' in formats else ''})")
            except Exception as exc:  # this image fails alone
                rows[i] = {"image": display(job.path), "name": display(job.name), "nuclei": None,
                           "mean_area": None, "status": "failed", "message": _failure(exc, job.path)}
                say("error", f"{rows[i]['image']}: {rows[i]['message']}")
            done += 1
            progress(done, len(jobs))
    return rows
