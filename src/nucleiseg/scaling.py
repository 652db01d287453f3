"""Resizing images for the network when their nuclei are far from the training size.

Pure NumPy and OpenCV: which factor a given nucleus diameter asks for
(:func:`scale_for_diameter`), which one ``scale="auto"`` picks from the nuclei
of a first pass (:func:`auto_scale`), the limits that keep a factor sane, and
the resizing itself (:func:`resize_channels`).

Examples
--------
>>> round(scale_for_diameter(36.0), 2)       # nuclei twice the training size
0.5
>>> auto_scale(36.0, 18.0, (512, 512))
0.5
"""

from __future__ import annotations

import numpy as np

from .errors import NucleisegError

__all__ = [
    "AUTO_SCALE_LIMITS",
    "AUTO_SCALE_TOLERANCE",
    "DEFAULT_NUCLEUS_DIAMETER",
    "MAX_ENLARGED_PIXELS",
    "MIN_IMAGE_SIZE",
    "auto_scale",
    "check_scale",
    "resize_channels",
    "scale_for_diameter",
    "scaled_size",
]

#: Smallest image side (pixels) the network is given.
MIN_IMAGE_SIZE = 16

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


def check_scale(scale: float) -> float:
    """``scale`` as a float, or ValueError unless it is a finite number > 0.

    Examples
    --------
    >>> check_scale("0.5")
    0.5
    """
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number > 0, got {scale!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"scale must be a number > 0, got {scale}")
    return value


def scale_for_diameter(diameter: float, model=None) -> float:
    """The ``scale`` that brings nuclei ``diameter`` pixels across to the model's training size.

    ``model`` is anything with a ``nucleus_diameter`` (a
    :class:`~nucleiseg.inference.Model`), a number (that diameter), or None for
    :data:`DEFAULT_NUCLEUS_DIAMETER`.

    Examples
    --------
    >>> round(scale_for_diameter(2 * DEFAULT_NUCLEUS_DIAMETER), 2), scale_for_diameter(10.0, 20.0)
    (0.5, 2.0)
    """
    try:
        value = float(diameter)
    except (TypeError, ValueError):
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"the nucleus diameter must be a number of pixels > 0, got {diameter}")
    if model is None:
        trained = DEFAULT_NUCLEUS_DIAMETER
    elif isinstance(model, (int, float)):
        trained = float(model)
    else:
        trained = model.nucleus_diameter
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


def scaled_size(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """The size of an image of ``shape`` resized by ``scale``, refused when too small or too large.

    Raises
    ------
    NucleisegError
        Under :data:`MIN_IMAGE_SIZE` pixels on a side, or enlarged past :data:`MAX_ENLARGED_PIXELS`.

    Examples
    --------
    >>> scaled_size((45, 61), 0.5)
    (22, 30)
    """
    height, width = (max(1, round(n * scale)) for n in shape)
    if min(height, width) < MIN_IMAGE_SIZE:
        raise NucleisegError(
            f"image is {shape[0]}x{shape[1]} pixels, {height}x{width} at scale {scale:g}: too small, the network "
            f"needs at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )
    # the exact product, not the rounded sizes': auto_scale's largest factor lands on the cap itself
    if scale > 1.0 and scale * scale * shape[0] * shape[1] > MAX_ENLARGED_PIXELS * (1 + 1e-9):
        raise NucleisegError(
            f"image is {shape[0]}x{shape[1]} pixels, {height:g}x{width:g} at scale {scale:g}: enlarging past "
            f"{MAX_ENLARGED_PIXELS / 1e6:g} Mpixel is refused (about 24 bytes a pixel of memory); "
            "use a smaller scale or a crop of the image"
        )
    return height, width


def resize_channels(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a ``(C, H, W)`` float32 array to ``shape`` (area averaging when shrinking, else bilinear).

    Examples
    --------
    >>> resize_channels(np.ones((3, 8, 8), np.float32), (4, 6)).shape
    (3, 4, 6)
    """
    import cv2

    shrinking = shape[0] * shape[1] < a.shape[1] * a.shape[2]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    planes = [cv2.resize(plane, (shape[1], shape[0]), interpolation=interpolation) for plane in a]
    return np.ascontiguousarray(np.stack(planes), dtype=np.float32)
