"""Prediction with a trained model: probabilities at native resolution, then nuclei.

:func:`load_model` reads a model file into a :class:`Model`;
:func:`predict_probabilities` turns any image :func:`~nucleiseg.io.read_image`
returns into ``(C, H, W)`` probabilities (accurate or fast mode, optional
8-fold test-time augmentation, overlapping tiles for large images, optional
resizing for nuclei far from the training size: ``scale``, :func:`scale_for_diameter`);
:func:`segment` adds the watershed post-processing and a measurement table.

Tiling
------
An image larger than ``tile`` pixels on a side is cut into overlapping tiles
whose origins are multiples of ``2**depth`` (so every tile pools on the same
grid as the whole image would), predicted ``batch_size`` tiles at a time and
blended into one float32 accumulator with a separable window: inside each
overlap a tile's weight is 0 over the outer 3/8 (the pixels that felt the
tile's zero padding most), rises as ``sin**2`` over the middle quarter and is 1
beyond; a tile side lying on the image border is not down-weighted. Weights
are normalised per axis, so the result is a proper weighted mean of the tiles.
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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .errors import NucleisegError
from .models import DEFAULT_CHANNELS, UNetPlusPlus, load_model_file, resolve_model_path
from .models.fuse import fuse_batchnorm
from .postprocess import PostprocessParams, instances_from_probabilities
from .preprocess import normalize, to_rgb_uint8

__all__ = [
    "AUTO_SCALE_LIMITS",
    "MAX_ENLARGED_PIXELS",
    "AUTO_SCALE_TOLERANCE",
    "DEFAULT_NUCLEUS_DIAMETER",
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "MIN_IMAGE_SIZE",
    "Model",
    "Segmentation",
    "auto_scale",
    "label_nuclei",
    "load_model",
    "predict_labels",
    "predict_probabilities",
    "scale_for_diameter",
    "segment",
]

log = logging.getLogger("nucleiseg.inference")

#: Tile side (pixels) above which images are predicted in tiles. 1024² tiles
#: keep the overlap overhead small while one tile of the default network needs
#: about 1.2 GB of activations (fp32).
DEFAULT_TILE = 1024

#: Overlap (pixels) between neighbouring tiles. The default network (depth 4)
#: has a 200-pixel receptive field (100 px each side: 13 3x3 convolutions and
#: 4 poolings on its deepest path), so a tile's zero padding changes its output
#: up to 100 px inside; measured on an early checkpoint, by ~5e-2 at 32 px,
#: ~1e-2 at 64 px, ~4e-4 at 80 px and nil from 96 px. The window ignores the
#: outer 3/8 of each overlap (72 px of 192) and blends over the next 48 px, so
#: every pixel comes from tiles whose edge is >= 72 px away. On a 2048² DSB
#: mosaic (docs/benchmarks.md, "Prediction") tiled and untiled probabilities
#: then agreed to 1.7e-4 (8e-4 with 512-px tiles), where an overlap of 128 gave
#: 7e-2 with the same (epoch-9) checkpoint. Cost: (1024 / 832)² = 1.51x the pixels.
DEFAULT_OVERLAP = 192

#: Smallest image side (pixels) :func:`predict_probabilities` accepts.
MIN_IMAGE_SIZE = 16

#: Prune level of fast mode when the model file does not name one (``fast_prune_level``).
DEFAULT_FAST_PRUNE_LEVEL = 2

#: Typical nucleus diameter (pixels) of a model's training images when its file does not record one
#: (training records ``"nucleus_diameter"``: :func:`nucleiseg.measure.typical_diameter` of its training
#: labels): that of DSB2018's training split, 17.9 px (10th-90th percentile of images: 10-47 px).
DEFAULT_NUCLEUS_DIAMETER = 18.0

#: With ``scale="auto"`` an image is predicted a second time, resized, only when the nuclei of the first
#: pass would be resized by more than this factor either way: on the validation images (docs/benchmarks.md)
#: resizing those within it gains nothing, and half of them are spared the second pass.
AUTO_SCALE_TOLERANCE = 1.4
#: ... and by at most these factors, so that a first pass that found specks cannot blow the image up ...
AUTO_SCALE_LIMITS = (0.25, 4.0)
#: No image is enlarged (``scale`` > 1, given or "auto") past this many pixels: an 8000 x 8000 image,
#: about 0.8 GB of network input and as much output.
MAX_ENLARGED_PIXELS = 64_000_000

# Pixels per forward pass when batch_size is None: ~2 GB (fp32) of activations for the shipped model's widths
# (32-512), ~1.2 GB for widths 16-256.
_BATCH_PIXELS = 1 << 20

# Rows per band of the post-processing, and the margin around a band for regions taller than one
# band (see label_nuclei): an 8000-pixel-wide band then needs well under 1 GB.
_POSTPROCESS_ROWS = 512
_POSTPROCESS_MARGIN = 256

# The 8 symmetries of the square (dihedral group D4) as (transpose, flip rows, flip columns).
_D4 = tuple((t, fy, fx) for t in (False, True) for fy in (False, True) for fx in (False, True))


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
    metadata : dict
        All decoded metadata of the file.
    path : Path or None
        The file it was read from.
    """

    network: UNetPlusPlus
    channels: tuple[str, ...]
    postprocess: PostprocessParams = field(default_factory=PostprocessParams)
    postprocess_by_kind: dict[str, PostprocessParams] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
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
        Where to run the network (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns
    -------
    Model

    Raises
    ------
    NucleisegError
        The file is missing or not a nucleiseg model; the device is not available.

    Examples
    --------
    >>> model = load_model()                      # the shipped model  # doctest: +SKIP
    >>> model.channels                                                # doctest: +SKIP
    ('body', 'contour', 'touch')
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NucleisegError(f"device {device} requested but CUDA is not available")
    resolved = resolve_model_path(path)
    network, metadata = load_model_file(resolved)
    # Prediction only: fold each BatchNorm into its convolution (same outputs to ~1e-6, ~10% faster on a CPU).
    network = fuse_batchnorm(network, inplace=True)
    network = network.to(device=device, memory_format=torch.channels_last).eval()
    out_channels = network.config.out_channels
    channels = tuple(metadata.get("channels") or DEFAULT_CHANNELS[:out_channels])
    if len(channels) != out_channels:
        raise NucleisegError(f"metadata names {len(channels)} channels, the network has {out_channels}", resolved)
    return Model(
        network=network,
        channels=channels,
        postprocess=PostprocessParams.from_dict(metadata.get("postprocess")),
        postprocess_by_kind={kind: PostprocessParams.from_dict(values)
                             for kind, values in (metadata.get("postprocess_by_kind") or {}).items()},
        config=dict(metadata.get("config", {})),
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


# ----------------------------------------------------------------------------- probabilities
def prepare_image(image: np.ndarray, levels=None) -> np.ndarray:
    """The network input for ``image``: ``(3, H, W)`` float32, normalised over the whole image.

    ``levels`` (:class:`~nucleiseg.preprocess.IntensityLevels`): normalise with
    those of a larger image that ``image`` is a block of instead.

    Raises
    ------
    NucleisegError
        The image is smaller than ``MIN_IMAGE_SIZE`` on a side.
    ValueError
        Not a 2-D grey, grey+alpha, RGB or RGBA array.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D grey, RGB or RGBA image, got shape {image.shape}")
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIZE:
        raise NucleisegError(
            f"image is {height}x{width} pixels, too small: the minimum is {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )
    if levels is None:
        return normalize(to_rgb_uint8(image))
    return normalize(to_rgb_uint8(image, levels.rescale), levels=levels.normalize)


def resolve_prune_level(depth: int, metadata: dict[str, Any], mode: str, prune_level: int | None = None) -> int | None:
    """The head to compute: ``prune_level`` if given, else the model's fast head in fast mode, else None (all).

    The fast head is the metadata's ``fast_prune_level`` (chosen by ``nucleiseg tune``;
    :data:`DEFAULT_FAST_PRUNE_LEVEL` when absent), kept within 1..depth.

    Examples
    --------
    >>> resolve_prune_level(4, {"fast_prune_level": 3}, "fast"), resolve_prune_level(4, {}, "accurate")
    (3, None)
    """
    if mode not in ("accurate", "fast"):
        raise ValueError(f"mode must be 'accurate' or 'fast', got {mode!r}")
    if prune_level is not None:
        level = int(prune_level)
        if not 1 <= level <= depth:
            raise ValueError(f"prune_level must be in 1..{depth}, got {prune_level}")
        return level
    if mode == "fast":
        return min(max(int(metadata.get("fast_prune_level", DEFAULT_FAST_PRUNE_LEVEL)), 1), depth)
    return None


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "fp32":
        return None
    from .training import resolve_precision  # one rule for training and prediction

    return resolve_precision(precision, device)


def check_tiling(tile: int | None, overlap: int, align: int = 16) -> tuple[int | None, int]:
    """Validate tile and overlap; returns the tile rounded down to a multiple of ``align``.

    Raises
    ------
    ValueError
        Overlap negative, tile smaller than ``2 * align`` or than twice the overlap.
    """
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if tile is None:
        return None, int(overlap)
    tile = int(tile) // align * align
    if tile < 2 * align:
        raise ValueError(f"tile must be at least {2 * align} pixels")
    if 2 * overlap > tile:
        raise ValueError(f"overlap ({overlap}) must be at most half the tile ({tile})")
    return tile, int(overlap)


def predict_probabilities(
    model: Model,
    image: np.ndarray,
    mode: Literal["accurate", "fast"] = "accurate",
    prune_level: int | None = None,
    tta: bool = False,
    tile: int | None = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int | None = None,
    precision: Literal["fp32", "bf16", "auto"] = "fp32",
    scale: float = 1.0,
    levels=None,
) -> np.ndarray:
    """Per-pixel probabilities of each model channel, at the image's own resolution.

    Parameters
    ----------
    model : Model
        From :func:`load_model`.
    image : ndarray, shape (H, W) or (H, W, C)
        Grey, grey+alpha, RGB or RGBA; 8-bit, 16-bit or float (as
        :func:`~nucleiseg.io.read_image` returns it). Normalised once as a
        whole, so all tiles see the same intensity scale.
    mode : {"accurate", "fast"}
        Accurate averages all heads; fast computes only the sub-network of head
        ``model.fast_prune_level`` (metadata ``fast_prune_level``, default 2).
    prune_level : int, optional
        Use head ``prune_level`` alone, whatever the mode.
    tta : bool
        Average the predictions of the 8 flips and quarter turns of the image
        (each undone on its output): the result is invariant to them, at 8x the time.
    tile : int or None
        Tile side in pixels (rounded down to a multiple of ``2**depth``); images
        no larger are predicted in one pass. None: never tile.
    overlap : int
        Overlap of neighbouring tiles, at most ``tile / 2``.
    batch_size : int, optional
        Tiles per forward pass; default: as many as fit in about 1 Mpixel
        (1 tile of 1024², 4 of 512²), about 2 GB (fp32) of activations for the
        shipped network.
    precision : {"fp32", "bf16", "auto"}
        bf16 autocast, or "auto": bf16 where the device runs it natively.
    scale : float
        Resize the image by this factor for the network, and its output back
        to the image's size: 0.5 for nuclei twice as wide as in the training
        data (a 2x stronger objective), 2 for nuclei half as wide. See
        :func:`scale_for_diameter`. Tiles and overlap are in network pixels.
    levels : IntensityLevels, optional
        Normalise with these (:func:`~nucleiseg.preprocess.intensity_levels` of
        a larger image that ``image`` is a block of) instead of the image's own.

    Returns
    -------
    probabilities : ndarray of float32, shape (C, H, W)
        In ``model.channels`` order, at the image's own size whatever ``scale``.

    Raises
    ------
    NucleisegError
        The image (resized by ``scale``) is smaller than ``MIN_IMAGE_SIZE`` pixels on a side.

    Examples
    --------
    >>> probs = predict_probabilities(load_model(), image, mode="fast")  # doctest: +SKIP
    >>> probs.shape == (3,) + image.shape[:2]                           # doctest: +SKIP
    True
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a nucleiseg Model (see load_model), got {type(model).__name__}")
    level = resolve_prune_level(model.depth, model.metadata, mode, prune_level)
    align = 2**model.depth
    tile, overlap = check_tiling(tile, overlap, align)
    autocast = _autocast_dtype(precision, model.device)
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scale = check_scale(scale)
    x = prepare_image(image, levels)  # normalised at the image's own size: the same intensities at every scale
    native = x.shape[1:]
    if scale != 1.0:
        x = _resize_channels(x, _scaled_size(native, scale))
    if batch_size is None:
        batch_size = max(1, _BATCH_PIXELS // (tile * tile)) if tile else 1
    acc = np.zeros((model.network.config.out_channels,) + x.shape[1:], np.float32)
    views = _D4 if tta else _D4[:1]
    for view in views:
        # Views of x and acc under the same symmetry: predicting the transformed image into the
        # transformed accumulator undoes the transform on the output, with no copy of either.
        _predict_tiled(
            model, _view(x, view), _view(acc, view), level, tile, overlap, align,
            int(batch_size), autocast, 1.0 / len(views),
        )
    if scale != 1.0:
        acc = np.clip(_resize_channels(acc, native), 0.0, 1.0)
    return acc


def check_scale(scale: float) -> float:
    """``scale`` as a float, or ValueError unless it is a finite number > 0."""
    value = float(scale)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"scale must be a number > 0, got {scale}")
    return value


def scale_for_diameter(diameter: float, model: Model | None = None) -> float:
    """The ``scale`` that brings nuclei ``diameter`` pixels across to the model's training size.

    The model file's ``"nucleus_diameter"`` (the median equivalent diameter of
    its training nuclei) over ``diameter``; :data:`DEFAULT_NUCLEUS_DIAMETER`
    when the file does not say.

    Examples
    --------
    >>> round(scale_for_diameter(2 * DEFAULT_NUCLEUS_DIAMETER), 2)
    0.5
    """
    value = float(diameter)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"the nucleus diameter must be a number of pixels > 0, got {diameter}")
    trained = DEFAULT_NUCLEUS_DIAMETER if model is None else model.nucleus_diameter
    return trained / value


def auto_scale(diameter: float, trained_diameter: float, shape: tuple[int, int]) -> float:
    """The factor ``scale="auto"`` resizes an image by, given the median diameter of its nuclei.

    ``trained_diameter / diameter``, or 1.0 when that lies within
    :data:`AUTO_SCALE_TOLERANCE`; kept within :data:`AUTO_SCALE_LIMITS`, above
    what would leave the image under ``MIN_IMAGE_SIZE`` pixels, and below what
    would grow it past :data:`MAX_ENLARGED_PIXELS` (huge images are not enlarged).

    Examples
    --------
    >>> auto_scale(36.0, 18.0, (512, 512)), auto_scale(20.0, 18.0, (512, 512))
    (0.5, 1.0)
    >>> auto_scale(6.0, 18.0, (512, 512)), auto_scale(6.0, 18.0, (8000, 8000))
    (3.0, 1.0)
    """
    factor = trained_diameter / diameter
    smallest = (MIN_IMAGE_SIZE + 0.5) / min(shape)
    largest = max(1.0, (MAX_ENLARGED_PIXELS / (shape[0] * shape[1])) ** 0.5)
    factor = float(np.clip(factor, max(AUTO_SCALE_LIMITS[0], smallest), min(AUTO_SCALE_LIMITS[1], largest)))
    if 1.0 / AUTO_SCALE_TOLERANCE <= factor <= AUTO_SCALE_TOLERANCE:
        return 1.0
    return factor


def _scaled_size(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    height, width = (max(1, round(n * scale)) for n in shape)
    if min(height, width) < MIN_IMAGE_SIZE:
        raise NucleisegError(
            f"image is {shape[0]}x{shape[1]} pixels, {height}x{width} at scale {scale:g}: too small, the network "
            f"needs at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )
    # the exact product, not the rounded sizes': auto_scale's largest factor lands on the cap itself
    if scale > 1.0 and scale * scale * shape[0] * shape[1] > MAX_ENLARGED_PIXELS * (1 + 1e-9):
        raise NucleisegError(
            f"image is {shape[0]}x{shape[1]} pixels, {height}x{width} at scale {scale:g}: enlarging past "
            f"{MAX_ENLARGED_PIXELS / 1e6:g} Mpixel is refused (about 24 bytes a pixel of memory); "
            "use a smaller scale or a crop of the image"
        )
    return height, width


def _resize_channels(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a ``(C, H, W)`` float32 array to ``shape`` (area averaging when shrinking, else bilinear)."""
    import cv2

    shrinking = shape[0] * shape[1] < a.shape[1] * a.shape[2]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    planes = [cv2.resize(plane, (shape[1], shape[0]), interpolation=interpolation) for plane in a]
    return np.ascontiguousarray(np.stack(planes), dtype=np.float32)


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


def _tile_spans(n: int, tile: int | None, overlap: int, align: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the tiles along an axis of ``n`` pixels.

    Starts are multiples of ``align``; neighbours overlap by at least
    ``overlap``; the last tile ends at ``n`` (and may be up to ``align - 1``
    pixels longer than ``tile``, so it starts on the grid).
    """
    if tile is None or n <= tile:
        return [(0, n)]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, n - tile, stride))
    last = (n - tile) // align * align
    if starts[-1] == last:
        starts.pop()
    return [(s, s + tile) for s in starts] + [(last, n)]


def _ramp(overlap: int) -> np.ndarray:
    """Weights rising over an overlap: 0 over the outer 3/8, sin² over the middle quarter, 1 after.

    The dead margin drops the pixels nearest a tile's edge, which its zero
    padding disturbed most (see ``DEFAULT_OVERLAP``); a short ramp beats a long
    one because that disturbance falls off steeply with the distance.
    ``ramp[t] + ramp[overlap - 1 - t] == 1``, so two tiles meeting at exactly
    ``overlap`` already sum to one.
    """
    margin = 3 * overlap // 8
    t = (np.arange(overlap) + 0.5 - margin) / max(overlap - 2 * margin, 1)
    return np.sin(np.pi / 2 * np.clip(t, 0.0, 1.0)) ** 2


def _span_weights(n: int, spans: Sequence[tuple[int, int]], overlap: int) -> list[np.ndarray]:
    """1-D blending weight of each span, normalised so that they sum to 1 at every pixel."""
    ramp = _ramp(overlap)
    weights = []
    total = np.zeros(n, np.float64)
    for start, stop in spans:
        w = np.ones(stop - start)
        if start > 0 and overlap:
            w[:overlap] = ramp
        if stop < n and overlap:
            w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
        weights.append(w)
        total[start:stop] += w
    assert total.min() > 0, "tile layout leaves pixels without weight"
    return [(w / total[start:stop]).astype(np.float32) for w, (start, stop) in zip(weights, spans)]


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
) -> None:
    """Add ``scale`` x the blended tile predictions of ``x`` (3, H, W) into ``acc`` (C, H, W)."""
    _, height, width = x.shape
    rows, cols = _tile_spans(height, tile, overlap, align), _tile_spans(width, tile, overlap, align)
    row_w, col_w = _span_weights(height, rows, overlap), _span_weights(width, cols, overlap)
    log.debug("%dx%d image: %d x %d tiles, %d per batch", height, width, len(rows), len(cols), batch_size)
    tiles = [(r, c) for r in range(len(rows)) for c in range(len(cols))]
    # Equal shapes batch together: at most four shapes (interior, last row, last column, corner).
    tiles.sort(key=lambda rc: (rows[rc[0]][1] - rows[rc[0]][0], cols[rc[1]][1] - cols[rc[1]][0]))
    device = model.device
    batch: list[tuple[int, int]] = []

    def shape(rc: tuple[int, int]) -> tuple[int, int]:
        (y0, y1), (x0, x1) = rows[rc[0]], cols[rc[1]]
        return y1 - y0, x1 - x0

    def flush() -> None:
        inputs = np.stack([x[:, slice(*rows[r]), slice(*cols[c])] for r, c in batch])
        tensor = torch.from_numpy(inputs).to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            probs = model.network.predict_proba(tensor, prune_level=level)
        probs = probs.float().cpu().numpy()
        for k, (r, c) in enumerate(batch):
            weight = np.outer(row_w[r], col_w[c])
            if scale != 1.0:
                weight *= scale
            p = probs[k]
            p *= weight
            acc[:, slice(*rows[r]), slice(*cols[c])] += p
        batch.clear()

    for rc in tiles:
        if batch and (len(batch) == batch_size or shape(batch[0]) != shape(rc)):
            flush()
        batch.append(rc)
    flush()


# ----------------------------------------------------------------------------- nuclei
def label_nuclei(
    probabilities: np.ndarray,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    params: PostprocessParams | None = None,
    band_rows: int = _POSTPROCESS_ROWS,
    margin: int = _POSTPROCESS_MARGIN,
) -> np.ndarray:
    """Instance labels from probabilities, band by band on tall images.

    :func:`~nucleiseg.postprocess.instances_from_probabilities` on a band of
    rows at a time, so that its temporaries (about 90 bytes a pixel) never
    cover the whole image. It treats each connected foreground region
    (``body > foreground_threshold``) on its own, hence:

    - a region at most ``band_rows`` tall is handed whole to the band holding
      its top row (that band's rows extended down to the region's bottom):
      its nuclei are exactly those of the whole-image post-processing;
    - a taller region (a large clump of touching nuclei) is cut: each band
      also looks ``margin`` rows above and below and keeps the region's nuclei
      that start in the band and touch neither cut. A nucleus taller than
      ``margin`` rows in such a clump is dropped, and the borders of nuclei
      near a cut may differ slightly from the whole-image result.

    Images at most 1.5 bands tall are done at once. Labels are numbered
    differently from the whole-image result. (Where the watershed meets
    pixels of exactly equal probability its flooding order, and so the border
    between two touching nuclei, may differ by a pixel; network outputs
    rarely tie.)

    Parameters
    ----------
    probabilities : ndarray, shape (C, H, W)
    channels : sequence of str
        Name of each channel; must include ``"body"``.
    params : PostprocessParams, optional
    band_rows : int
        Rows per band.
    margin : int
        Rows looked at above and below a band that a tall region crosses.

    Returns
    -------
    labels : ndarray of int32, shape (H, W)
        0 for background, 1..N for nuclei.

    Examples
    --------
    >>> probs = np.zeros((3, 40, 10), np.float32)
    >>> probs[0, 5:15, 2:8] = probs[0, 18:35, 2:8] = 1.0
    >>> int(label_nuclei(probs, band_rows=10).max())
    2
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential

    params = params or PostprocessParams()
    channels = list(channels)
    if "body" not in channels:
        raise ValueError(f"channels must include 'body', got {channels}")
    if band_rows < 1 or margin < 0:
        raise ValueError(f"band_rows must be >= 1 and margin >= 0, got {band_rows} and {margin}")
    height = probabilities.shape[1]
    if height <= band_rows + band_rows // 2:
        return instances_from_probabilities(probabilities, channels, params)
    # 8-connected regions: each holds whole 4-connected ones, whatever connectivity the
    # post-processing uses.
    body = probabilities[channels.index("body")]
    regions, n_regions = ndi.label(body > params.foreground_threshold, structure=np.ones((3, 3), bool))
    labels = np.zeros(probabilities.shape[1:], np.int32)
    if not n_regions:
        return labels
    boxes = ndi.find_objects(regions)
    top = np.array([-1] + [box[0].start for box in boxes])  # index 0 (background) is in no band
    bottom = np.array([-1] + [box[0].stop for box in boxes])
    tall = bottom - top > band_rows
    offset = 0
    for r0 in range(0, height, band_rows):
        r1 = min(height, r0 + band_rows)
        own = ~tall & (top >= r0) & (top < r1)  # regions handed whole to this band
        crossing = tall & (top < r1) & (bottom > r0)  # tall regions cut around this band
        if not own.any() and not crossing.any():
            continue
        s0 = max(0, r0 - margin) if crossing.any() else r0
        s1 = min(height, max(r1 + margin if crossing.any() else r1, int(bottom[own].max(initial=0))))
        band = instances_from_probabilities(probabilities[:, s0:s1], channels, params)
        where = regions[s0:s1]
        keep = own[where]
        if crossing.any():
            # nuclei of the tall regions that start in this band and touch neither cut
            spans = ndi.find_objects(band)
            first = np.array([-1] + [b[0].start + s0 if b else -1 for b in spans])
            last = np.array([-1] + [b[0].stop + s0 if b else -1 for b in spans])
            whole = (first >= r0) & (first < r1) & ((first > s0) | (s0 == 0)) & ((last < s1) | (s1 == height))
            keep |= whole[band] & crossing[where]
        band[~keep] = 0
        band = relabel_sequential(band)[0].astype(np.int32)
        count = int(band.max())
        band[band > 0] += offset
        labels[s0:s1][keep] = band[keep]
        offset += count
    return labels


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
    mode: Literal["accurate", "fast"] = "accurate",
    tta: bool = False,
    tile: int | None = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    min_size: int | None = None,
    postprocess: PostprocessParams | dict | None = None,
    *,
    prune_level: int | None = None,
    batch_size: int | None = None,
    precision: Literal["fp32", "bf16", "auto"] = "fp32",
    scale: float | Literal["auto"] = 1.0,
) -> Segmentation:
    """Find and measure every nucleus in an image.

    Parameters
    ----------
    image : ndarray, shape (H, W) or (H, W, C)
        Grey, RGB or RGBA, any bit depth.
    model : Model, str, Path or None
        A loaded model, a model file / run folder, or None for the shipped
        model (loaded once, then reused).
    mode, tta, tile, overlap, prune_level, batch_size, precision
        See :func:`predict_probabilities`.
    scale : float or "auto"
        Resize the image by this factor for the network (see
        :func:`predict_probabilities`), or choose it from the nuclei of a first
        pass (see :func:`predict_labels`). The factor used is ``result.scale``.
    min_size : int, optional
        Drop nuclei smaller than this many pixels of the image (default: the
        model's, which counts network pixels and so grows by ``1 / scale**2``).
    postprocess : PostprocessParams or dict, optional
        Watershed thresholds (default: the model's for this image's kind, chosen
        on validation; see :meth:`Model.postprocess_for`).

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

    model = _as_model(model)
    if postprocess is None:
        params = model.postprocess_for(image)
    elif isinstance(postprocess, PostprocessParams):
        params = postprocess
    else:
        params = PostprocessParams.from_dict(postprocess)
    probs, labels, scale = predict_labels(
        model, image, params, scale, min_size=min_size, mode=mode, prune_level=prune_level, tta=tta, tile=tile,
        overlap=overlap, batch_size=batch_size, precision=precision,
    )
    return Segmentation(labels, probs, measure_nuclei(labels, image), tuple(model.channels), scale)


def predict_labels(
    model: Model,
    image: np.ndarray,
    params: PostprocessParams,
    scale: float | Literal["auto"] = 1.0,
    min_size: int | None = None,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities and instance labels of an image, at a given scale or one chosen from its nuclei.

    Parameters
    ----------
    model : Model
    image : ndarray
    params : PostprocessParams
        Thresholds, their sizes in network pixels (scaled here with the image).
    scale : float or "auto"
        As in :func:`predict_probabilities`; ``"auto"`` predicts the image as
        it is, measures the median diameter of the nuclei found
        (:func:`~nucleiseg.measure.median_diameter`) and, if bringing them to
        ``model.nucleus_diameter`` would resize the image by more than
        :data:`AUTO_SCALE_TOLERANCE`, predicts it again at that scale (see
        :func:`auto_scale` for its limits).
    min_size : int, optional
        Smallest nucleus in image pixels, replacing ``params.min_size``.
    **options
        More keywords for :func:`predict_probabilities`.

    Returns
    -------
    probabilities, labels, scale
        The last two as :func:`label_nuclei` returns them, at the image's size;
        ``scale`` is the factor used.
    """
    from .measure import median_diameter

    auto = isinstance(scale, str)
    if auto and scale != "auto":
        raise ValueError(f"scale must be a number > 0 or 'auto', got {scale!r}")
    first = 1.0 if auto else check_scale(scale)

    def run(factor: float) -> tuple[np.ndarray, np.ndarray]:
        scaled = params.at_scale(factor)
        if min_size is not None:
            scaled = replace(scaled, min_size=int(min_size))
        probs = predict_probabilities(model, image, scale=factor, **options)
        return probs, label_nuclei(probs, model.channels, scaled)

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

