"""Prediction with a trained model: the network's engine, and the orchestration around it.

:func:`load_model` reads a model file into a :class:`Model`;
:func:`predict_probabilities` turns any image :func:`~nucleiseg.io.read_image`
returns into ``(C, H, W)`` probabilities (accurate or fast mode, optional
8-fold test-time augmentation, overlapping tiles for large images, optional
resizing for nuclei far from the training size); :func:`segment` adds the
watershed post-processing and a measurement table. Every function takes its
options as one :class:`~nucleiseg.options.PredictOptions` (or as keywords).

What does not need the network lives in torch-free modules:
:mod:`nucleiseg.tiling` (where the tiles lie, how they blend),
:mod:`nucleiseg.scaling` (resizing for the nuclei's size) and
:mod:`nucleiseg.postprocess` (the watershed, band by band on tall images).
Besides the image (``3 x H x W`` float32) and the result (``C x H x W``
float32), memory holds only one batch of tiles.

Examples
--------
>>> from nucleiseg import segment                       # doctest: +SKIP
>>> result = segment(read_image("cells.png"))            # doctest: +SKIP
>>> result.labels.max(), result.table["area"].median()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .device import release_freed_memory, resolve_device, resolve_precision, reuse_freed_memory
from .errors import NucleisegError
from .io import as_2d_image
from .models import UNetPlusPlus, load_model_file, resolve_model_path
from .models.fuse import fuse_batchnorm
from .models.metadata import DEFAULT_CHANNELS, DEFAULT_FAST_PRUNE_LEVEL, ModelMetadata, resolve_prune_level  # noqa: F401
from .options import PredictOptions
from .postprocess import PostprocessParams, label_nuclei
from .preprocess import normalize, to_rgb_uint8
from .scaling import (
    AUTO_SCALE_LIMITS,
    AUTO_SCALE_TOLERANCE,
    DEFAULT_NUCLEUS_DIAMETER,
    MAX_ENLARGED_PIXELS,
    MIN_IMAGE_SIZE,
    auto_scale,
    check_scale,
    resize_channels,
    scale_for_diameter,
    scaled_size,
)
from .tiling import DEFAULT_OVERLAP, DEFAULT_TILE, check_tiling, iter_batches, tiles

__all__ = [
    "AUTO_SCALE_LIMITS",
    "MAX_ENLARGED_PIXELS",
    "AUTO_SCALE_TOLERANCE",
    "DEFAULT_NUCLEUS_DIAMETER",
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "MIN_IMAGE_SIZE",
    "Model",
    "PredictOptions",
    "Segmentation",
    "auto_scale",
    "available_memory",
    "check_memory",
    "check_scale",
    "check_tiling",
    "label_nuclei",
    "load_model",
    "predict_labels",
    "predict_probabilities",
    "prediction_memory",
    "scale_for_diameter",
    "segment",
]

log = logging.getLogger("nucleiseg.inference")


# Pixels per forward pass when batch_size is None: ~2 GB (fp32) of activations for the shipped model's widths
# (32-512), ~1.2 GB for widths 16-256.
_BATCH_PIXELS = 1 << 20

# The 8 symmetries of the square (dihedral group D4) as (transpose, flip rows, flip columns).
_D4 = tuple((t, fy, fx) for t in (False, True) for fy in (False, True) for fx in (False, True))

#: Called as ``progress(done, total)`` with the tiles predicted so far (all TTA views counted).
Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------- model
@dataclass(eq=False)
class Model:
    """A network ready for prediction, with what its file says about it.

    Attributes
    ----------
    network : UNetPlusPlus
        In eval mode, channels-last, on its device.
    channels : tuple of str
        Name of each output channel (``body``, ``contour``, ``touch``).
    postprocess : PostprocessParams
        Thresholds chosen on validation for this model.
    postprocess_by_kind : dict str -> PostprocessParams
        Thresholds for the image kinds (:func:`nucleiseg.data.kinds.image_kind`)
        whose validation images did better with their own; see :meth:`postprocess_for`.
    config : dict
        The network configuration stored in the file.
    metadata : ModelMetadata or dict
        All decoded metadata of the file (validated: :class:`nucleiseg.models.metadata.ModelMetadata`).
    path : Path or None
        The file it was read from.
    """

    network: UNetPlusPlus
    channels: tuple[str, ...]
    postprocess: PostprocessParams = field(default_factory=PostprocessParams)
    postprocess_by_kind: dict[str, PostprocessParams] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: ModelMetadata | dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def depth(self) -> int:
        return self.network.depth

    def postprocess_for(self, image: np.ndarray) -> PostprocessParams:
        """The thresholds for this image: its kind's own, if tuned, else the model's.

        The kind (fluorescence, tissue, brightfield) is read from the pixels as
        when the training data were split, so a kind gets the thresholds
        chosen on its own validation images.
        """
        if not self.postprocess_by_kind:
            return self.postprocess
        from .data.kinds import image_kind

        return self.postprocess_by_kind.get(image_kind(image), self.postprocess)

    @property
    def nucleus_diameter(self) -> float:
        """Typical nucleus diameter (pixels) of the training images (metadata ``nucleus_diameter``)."""
        return float(self.metadata.get("nucleus_diameter", DEFAULT_NUCLEUS_DIAMETER))

    @property
    def fast_prune_level(self) -> int:
        """The head fast mode uses: metadata ``fast_prune_level`` (default 2), within 1..depth."""
        return resolve_prune_level(self.depth, self.metadata, "fast")


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> Model:
    """Read a model file for prediction.

    Parameters
    ----------
    path : str, Path or None
        A ``.safetensors`` model file, a training run folder (its
        ``best.safetensors``), or None / ``"default"`` for the shipped model.
    device : str or torch.device
        Where to run the network (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``;
        :func:`nucleiseg.device.resolve_device`).

    Returns
    -------
    Model

    Raises
    ------
    NucleisegError
        The file is missing, not a nucleiseg model, or its metadata does not
        describe its weights (:class:`~nucleiseg.models.metadata.ModelMetadata`);
        the device is unknown or not available.

    Examples
    --------
    >>> model = load_model()                      # the shipped model  # doctest: +SKIP
    >>> model.channels                                                # doctest: +SKIP
    ('body', 'contour', 'touch')
    """
    device = resolve_device(device)
    resolved = resolve_model_path(path)
    network, metadata = load_model_file(resolved)  # metadata validated against the weights
    # Prediction only: fold each BatchNorm into its convolution (same outputs to ~1e-6, ~10% faster on a CPU).
    network = fuse_batchnorm(network, inplace=True)
    network = network.to(device=device, memory_format=torch.channels_last).eval()
    return Model(
        network=network,
        channels=metadata.channels,
        postprocess=PostprocessParams.from_dict(metadata.postprocess),
        postprocess_by_kind={kind: PostprocessParams.from_dict(values)
                             for kind, values in metadata.postprocess_by_kind.items()},
        config=metadata.config,
        metadata=metadata,
        path=resolved,
    )


_default: dict[tuple[Path, str], Model] = {}


def _as_model(model: Model | str | Path | None, device: str | torch.device = "cpu") -> Model:
    """``model`` itself, or the model file it names; the shipped model is loaded once and cached."""
    if isinstance(model, Model):
        return model
    if model is None or str(model) == "default":
        key = (resolve_model_path(None), str(torch.device(device)))
        if key not in _default:
            _default.clear()
            _default[key] = load_model(None, device)
        return _default[key]
    return load_model(model, device)


# ----------------------------------------------------------------------------- memory
#: Bytes per pixel that segmenting an image allocates beyond the image itself, at scale 1: the normalised
#: float32 image (3 x 4 B) and the float32 accumulator that becomes the probabilities (3 x 4 B) held together,
#: the 8-bit RGB copy, then the labels and the watershed's bands. Measured as the slope of the peak resident
#: set (VmHWM) over the image's size, from 2048² to 4096² random images, a tiny network (fast mode, so that
#: the tiles' activations, which do not grow with the image, stay small), 2-core VM, 2026-11-29: segment()
#: 30.6 B/px for 8-bit RGB; predict_probabilities alone 28.2 (8-bit RGB) and 28.6 (16-bit grey). The tiles'
#: activations come on top (about 1.2 GiB for the shipped network's 1024² tiles in fp32; docs/benchmarks.md),
#: so :func:`prediction_memory` is a floor: 8000² needs at least 1.8 GiB (3.6 GiB measured in all).
BYTES_PER_PIXEL = 31

#: Bytes per image pixel of the probabilities resized back to the image's size when predicting at a scale
#: other than 1 (3 float32 channels), on top of :data:`BYTES_PER_PIXEL` per network pixel (counted, not measured).
RESIZED_BYTES_PER_PIXEL = 12

#: The environment variable that turns :func:`check_memory` off (``0``, ``off``, ``no`` or ``false``).
MEMORY_CHECK_ENV = "NUCLEISEG_MEMORY_CHECK"


def prediction_memory(shape: tuple[int, ...], scale: float = 1.0) -> int:
    """Bytes that predicting an image of ``shape`` (``(H, W, ...)``) at ``scale`` needs beyond the image itself.

    :data:`BYTES_PER_PIXEL` per pixel of the image or of the network's input (the image resized by
    ``scale``), whichever has more, plus :data:`RESIZED_BYTES_PER_PIXEL` per image pixel when resized.
    A floor: the network's activations for one batch of tiles come on top.

    Examples
    --------
    >>> prediction_memory((8000, 8000)) / 1024**3  # doctest: +ELLIPSIS
    1.84...
    """
    pixels = int(shape[0]) * int(shape[1])
    network = pixels * float(scale) ** 2
    need = BYTES_PER_PIXEL * max(pixels, network)
    if scale != 1.0:
        need += RESIZED_BYTES_PER_PIXEL * pixels
    return int(need)


def available_memory() -> int | None:
    """Bytes of memory this process can still take: Linux's ``MemAvailable`` (free memory plus what the
    kernel can reclaim), within the cgroup's limit (containers); elsewhere the machine's physical memory;
    None when unknown."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: a container's limit, which MemAvailable (the host's) does not show
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
                found.append(max(0, int(limit) - int(f.read().strip())))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    return min(found)


def check_memory(shape: tuple[int, ...], scale: float = 1.0, *, image_bytes: int = 0) -> None:
    """Refuse, in one line, an image whose prediction needs more memory than is available.

    Parameters
    ----------
    shape : tuple of int
        The image's ``(H, W, ...)``.
    scale : float
        The factor it is resized by for the network.
    image_bytes : int
        Bytes of the decoded image when it is not in memory yet (a check from a file's header,
        before reading it); 0 when it is (already counted as used).

    Raises
    ------
    NucleisegError
        :func:`prediction_memory` plus ``image_bytes`` exceeds :func:`available_memory`: names the
        image's size, the estimate, what is available and what to do. Off when the environment
        variable ``NUCLEISEG_MEMORY_CHECK`` is ``0`` (or ``off``, ``no``, ``false``).

    Examples
    --------
    >>> check_memory((512, 512))
    >>> check_memory((400_000, 400_000))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nucleiseg.errors.NucleisegError: image of 400,000 x 400,000 pixels: predicting it needs about ... GiB of memory ...
    """
    if os.environ.get(MEMORY_CHECK_ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return
    need = prediction_memory(shape, scale) + int(image_bytes)
    available = available_memory()
    if available is None or need <= available:
        return
    at = "" if scale == 1.0 else f" at scale {scale:g}"
    raise NucleisegError(
        f"image of {int(shape[0]):,} x {int(shape[1]):,} pixels: predicting it{at} needs about {need / 1024**3:.3g} GiB "
        f"of memory ({BYTES_PER_PIXEL} bytes a pixel, the network's tiles besides), and {available / 1024**3:.3g} GiB "
        "is available; segment it block by block instead: as a TIFF with predict --cluster local:2, or "
        "nucleiseg.distributed.segment_large (README, 'Prediction on a Dask cluster'), or a crop, or a smaller "
        f"scale; {MEMORY_CHECK_ENV}=0 tries anyway")


# ----------------------------------------------------------------------------- probabilities
def _checked_image(image) -> np.ndarray:
    """``image`` as :func:`~nucleiseg.io.as_2d_image` converts it, refused under ``MIN_IMAGE_SIZE`` on a side."""
    image = as_2d_image(image)
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIZE:
        raise NucleisegError(
            f"image is {height}x{width} pixels, too small: the minimum is {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )
    return image


def prepare_image(image: np.ndarray, levels=None) -> np.ndarray:
    """The network input for ``image``: ``(3, H, W)`` float32, normalised over the whole image.

    ``levels`` (:class:`~nucleiseg.preprocess.IntensityLevels`): normalise with
    those of a larger image that ``image`` is a block of instead.

    ``image`` may be in any layout :func:`~nucleiseg.io.read_image` accepts in a file
    (:func:`~nucleiseg.io.as_2d_image`: ``(C, H, W)``, singleton axes, booleans).

    Raises
    ------
    NucleisegError
        The image is smaller than ``MIN_IMAGE_SIZE`` on a side, or not a 2-D grey,
        grey+alpha, RGB or RGBA image in one of those layouts.
    """
    image = _checked_image(image)
    if levels is None:
        return normalize(to_rgb_uint8(image))
    return normalize(to_rgb_uint8(image, levels.rescale), levels=levels.normalize)


def predict_probabilities(
    model: Model,
    image: np.ndarray,
    options: PredictOptions | Mapping[str, Any] | None = None,
    *,
    progress: Progress | None = None,
    levels=None,
    **overrides: Any,
) -> np.ndarray:
    """Per-pixel probabilities of each model channel, at the image's own resolution.

    Parameters
    ----------
    model : Model
        From :func:`load_model`.
    image : ndarray, shape (H, W) or (H, W, C)
        Grey, grey+alpha, RGB or RGBA; 8-bit, 16-bit, float or boolean (as
        :func:`~nucleiseg.io.read_image` returns it, or in a layout it accepts
        in a file: ``(C, H, W)``, singleton axes; see
        :func:`~nucleiseg.io.as_2d_image`). Normalised once as a whole, so all
        tiles see the same intensity scale.
    options : PredictOptions or mapping, optional
        What is used here: ``mode`` (accurate averages all heads; fast computes
        only the sub-network of head ``model.fast_prune_level``), ``prune_level``,
        ``tta`` (average the 8 flips and quarter turns, each undone on its
        output), ``tile`` / ``overlap`` (tile side and overlap in network
        pixels; see :mod:`nucleiseg.tiling`), ``batch_size`` (tiles per forward
        pass; default: as many as fit in about 1 Mpixel, about 2 GB (fp32) of
        activations for the shipped network), ``precision`` and ``scale`` (a
        number: resize the image by this factor for the network and its output
        back; 0.5 for nuclei twice as wide as in the training data).
    progress : callable, optional
        ``progress(done, total)`` after each batch of tiles.
    levels : IntensityLevels, optional
        Normalise with these (:func:`~nucleiseg.preprocess.intensity_levels` of
        a larger image that ``image`` is a block of) instead of the image's own.
    **overrides
        Any option of :class:`~nucleiseg.options.PredictOptions` as a keyword.

    Returns
    -------
    probabilities : ndarray of float32, shape (C, H, W)
        In ``model.channels`` order, at the image's own size whatever ``scale``.

    Raises
    ------
    NucleisegError
        The image (resized by ``scale``) is smaller than ``MIN_IMAGE_SIZE`` pixels on a side,
        is not an image (:func:`~nucleiseg.io.as_2d_image`), or needs more memory than is
        available (:func:`check_memory`).
    ValueError
        An option out of range (:class:`~nucleiseg.errors.OptionError` is both).

    Examples
    --------
    >>> probs = predict_probabilities(load_model(), image, mode="fast")  # doctest: +SKIP
    >>> probs.shape == (3,) + image.shape[:2]                           # doctest: +SKIP
    True
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a nucleiseg Model (see load_model), got {type(model).__name__}")
    opts = PredictOptions.from_any(options, **overrides).resolved(model.depth, model.nucleus_diameter)
    if opts.scale == "auto":
        raise ValueError("scale='auto' needs the nuclei of a first pass: use predict_labels or segment")
    level = resolve_prune_level(model.depth, model.metadata, opts.mode, opts.prune_level)
    autocast = resolve_precision(opts.precision, model.device)  # one rule for training and prediction
    scale = opts.scale
    image = _checked_image(image)
    if scale != 1.0:
        scaled_size(image.shape[:2], scale)  # too small or too large a resizing refused first, in its own words
    check_memory(image.shape, scale)
    if model.device.type == "cpu":
        reuse_freed_memory()  # large tiles' activations otherwise cost a page fault per 4 kB, every pass
    x = prepare_image(image, levels)  # normalised at the image's own size: the same intensities at every scale
    native = x.shape[1:]
    if scale != 1.0:
        x = resize_channels(x, scaled_size(native, scale))
    tile = opts.tile
    batch_size = opts.batch_size or (max(1, _BATCH_PIXELS // (tile * tile)) if tile else 1)
    acc = np.zeros((model.network.config.out_channels,) + x.shape[1:], np.float32)
    views = _D4 if opts.tta else _D4[:1]
    counter = _TileCounter(progress, len(views) * len(tiles(x.shape[1:], tile, opts.overlap, 2**model.depth)))
    for view in views:
        # Views of x and acc under the same symmetry: predicting the transformed image into the
        # transformed accumulator undoes the transform on the output, with no copy of either.
        _predict_tiled(
            model, _view(x, view), _view(acc, view), level, tile, opts.overlap, 2**model.depth,
            int(batch_size), autocast, 1.0 / len(views), counter,
        )
    if scale != 1.0:
        acc = np.clip(resize_channels(acc, native), 0.0, 1.0)
    if x.shape[1] * x.shape[2] > _BATCH_PIXELS:  # more than one pass: hand the activations' heap back
        release_freed_memory()
    return acc


class _TileCounter:
    """Counts predicted tiles for a ``progress(done, total)`` callback."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def _view(a: np.ndarray, view: tuple[bool, bool, bool]) -> np.ndarray:
    """A numpy view of ``(..., H, W)`` under one symmetry of the square."""
    transpose, flip_rows, flip_cols = view
    if transpose:
        a = a.swapaxes(-1, -2)
    if flip_rows:
        a = a[..., ::-1, :]
    if flip_cols:
        a = a[..., ::-1]
    return a


def _predict_tiled(
    model: Model,
    x: np.ndarray,
    acc: np.ndarray,
    level: int | None,
    tile: int | None,
    overlap: int,
    align: int,
    batch_size: int,
    autocast: torch.dtype | None,
    scale: float,
    counter: _TileCounter,
) -> None:
    """Add ``scale`` x the blended tile predictions of ``x`` (3, H, W) into ``acc`` (C, H, W)."""
    layout = tiles(x.shape[1:], tile, overlap, align)
    log.debug("%dx%d image: %d tiles, %d per batch", x.shape[1], x.shape[2], len(layout), batch_size)
    device = model.device
    for batch in iter_batches(layout, batch_size):
        inputs = np.stack([x[(slice(None),) + t.slices] for t in batch])
        tensor = torch.from_numpy(inputs).to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            probs = model.network.predict_proba(tensor, prune_level=level)
        probs = probs.float().cpu().numpy()
        for k, t in enumerate(batch):
            p = probs[k]
            if len(layout) > 1:  # a lone tile's weight is 1 everywhere
                weight = t.weight()
                if scale != 1.0:
                    weight *= scale
                p *= weight
            elif scale != 1.0:
                p *= scale
            acc[(slice(None),) + t.slices] += p
        counter.add(len(batch))


# ----------------------------------------------------------------------------- nuclei
@dataclass
class Segmentation:
    """The result of :func:`segment`.

    Attributes
    ----------
    labels : ndarray of int32, shape (H, W)
        0 for background, 1..N for nuclei.
    probabilities : ndarray of float32, shape (C, H, W)
        The network's output, channels named by ``channels``.
    table : pandas.DataFrame
        One row per nucleus (:func:`nucleiseg.measure.measure_nuclei`).
    channels : tuple of str
    scale : float
        The factor the image was resized by for the network (1.0: not resized).
    """

    labels: np.ndarray
    probabilities: np.ndarray
    table: Any
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    scale: float = 1.0

    @property
    def n_nuclei(self) -> int:
        return len(self.table)


def segment(
    image: np.ndarray,
    model: Model | str | Path | None = None,
    options: PredictOptions | Mapping[str, Any] | None = None,
    *,
    postprocess: PostprocessParams | Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> Segmentation:
    """Find and measure every nucleus in an image.

    Parameters
    ----------
    image : ndarray, shape (H, W) or (H, W, C)
        Grey, RGB or RGBA, any bit depth, or boolean; or in another layout
        :func:`~nucleiseg.io.read_image` accepts in a file (``(C, H, W)`` with
        C up to 4, singleton axes such as ``(1, H, W)``): it goes through the
        same conversion (:func:`~nucleiseg.io.as_2d_image`), so an array gives
        the result of the same pixels read from a file. With
        ``options.channel``, that channel alone of a multi-channel image (the
        table's intensities too).
    model : Model, str, Path or None
        A loaded model, a model file / run folder, or None for the shipped
        model (loaded once, then reused).
    options : PredictOptions or mapping, optional
        How to predict (mode, TTA, tiles, precision, scale or nucleus
        diameter, channel, minimum size); the defaults are the command line's.
        ``scale="auto"`` chooses the scale from the nuclei of a first pass (see
        :func:`predict_labels`); the factor used is ``result.scale``.
    postprocess : PostprocessParams or mapping, optional
        Watershed thresholds (default: the model's for this image's kind, chosen
        on validation, with ``options.postprocess`` applied on top; see
        :meth:`Model.postprocess_for`).
    progress : callable, optional
        ``progress(done, total)`` with the tiles predicted so far.
    **overrides
        Any option of :class:`~nucleiseg.options.PredictOptions` as a keyword
        (``mode="fast"``, ``tta=True``, ``min_size=30``, ...).

    Returns
    -------
    Segmentation

    Examples
    --------
    >>> result = segment(read_image("cells.png"), mode="fast")  # doctest: +SKIP
    >>> result.n_nuclei, result.labels.dtype                    # doctest: +SKIP
    (42, dtype('int32'))
    """
    from .measure import measure_nuclei
    from .preprocess import select_channel

    image = as_2d_image(image)  # the layouts and types read_image accepts in a file, converted as it does
    opts = PredictOptions.from_any(options, **overrides)
    model = _as_model(model, resolve_device(opts.device))
    opts = opts.resolved(model.depth, model.nucleus_diameter)
    if opts.channel is not None:
        try:
            image = select_channel(image, opts.channel)
        except ValueError as exc:
            raise NucleisegError(f"channel {opts.channel}: the image {exc}") from None
    params = postprocess_params(model, image, opts, postprocess)
    probs, labels, scale = predict_labels(model, image, params, opts, progress=progress)
    return Segmentation(labels, probs, measure_nuclei(labels, image), tuple(model.channels), scale)


def postprocess_params(model: Model, image: np.ndarray, options: PredictOptions,
                       postprocess: PostprocessParams | Mapping[str, Any] | None = None) -> PostprocessParams:
    """The watershed thresholds :func:`segment` uses for ``image`` (network pixels; see :meth:`Model.postprocess_for`)."""
    if postprocess is None:
        params = model.postprocess_for(image)
    elif isinstance(postprocess, PostprocessParams):
        params = postprocess
    else:
        params = PostprocessParams.from_dict(postprocess)
    if options.postprocess:
        params = replace(params, **options.postprocess)
    return params


def label_params(params: PostprocessParams, scale: float, options: PredictOptions) -> PostprocessParams:
    """The thresholds for labelling an image predicted at ``scale``: sizes in image pixels, ``min_size`` as asked."""
    scaled = params.at_scale(scale)
    if options.min_size is not None:
        scaled = replace(scaled, min_size=int(options.min_size))
    return scaled


def predict_labels(
    model: Model,
    image: np.ndarray,
    params: PostprocessParams,
    options: PredictOptions | Mapping[str, Any] | None = None,
    *,
    progress: Progress | None = None,
    **overrides: Any,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities and instance labels of an image, at a given scale or one chosen from its nuclei.

    Parameters
    ----------
    model : Model
    image : ndarray
    params : PostprocessParams
        Thresholds, their sizes in network pixels (scaled here with the image).
    options : PredictOptions or mapping, optional
        As in :func:`predict_probabilities`, where ``scale`` may also be
        ``"auto"``: predict the image as it is, measure the median diameter of
        the nuclei found (:func:`~nucleiseg.measure.median_diameter`) and, if
        bringing them to ``model.nucleus_diameter`` would resize the image by
        more than :data:`AUTO_SCALE_TOLERANCE`, predict it again at that scale
        (see :func:`auto_scale` for its limits). ``min_size`` (image pixels)
        replaces ``params.min_size``.
    progress : callable, optional
        As in :func:`predict_probabilities`.

    Returns
    -------
    probabilities, labels, scale
        The last two as :func:`label_nuclei` returns them, at the image's size;
        ``scale`` is the factor used.
    """
    from .measure import median_diameter

    image = as_2d_image(image)
    opts = PredictOptions.from_any(options, **overrides).resolved(model.depth, model.nucleus_diameter)
    auto = opts.scale == "auto"
    first = 1.0 if auto else opts.scale

    def run(factor: float) -> tuple[np.ndarray, np.ndarray]:
        probs = predict_probabilities(model, image, opts.replace(scale=factor), progress=progress)
        return probs, label_nuclei(probs, model.channels, label_params(params, factor, opts))

    probs, labels = run(first)
    if not auto:
        return probs, labels, first
    diameter = median_diameter(labels)
    factor = 1.0 if diameter is None else auto_scale(diameter, model.nucleus_diameter, np.shape(image)[:2])
    if factor == 1.0:
        return probs, labels, 1.0
    log.info("nuclei about %.0f px across: predicting again resized by %.3g", diameter, factor)
    probs, labels = run(factor)
    return probs, labels, factor
