"""Intensity handling shared by training and prediction.

Images arrive as 8/16-bit or float, grey, RGB or RGBA. :func:`to_rgb_uint8`
brings any of them to one 8-bit RGB layout (what the cache stores and the
augmentations expect); :func:`normalize` turns that into the float tensor the
network sees, stretched per image so dim and bright acquisitions look alike.

CLAHE, the reference notebook's preprocessing, is a training augmentation here
(:mod:`nucleiseg.data.augment`), not a step of prediction: applied to the
validation images before the shipped model it lowers the DSB score from
0.638 to 0.606 (``benchmarks/clahe_at_prediction.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def to_rgb_uint8(image: np.ndarray, levels: tuple[float, float] | None = None) -> np.ndarray:
    """Convert a grey/RGB/RGBA image of any bit depth to ``(H, W, 3)`` uint8.

    8-bit data is kept as is; other depths are rescaled between their 0.1 and
    99.9 percentiles, so a 12-bit camera image in a 16-bit file is not crushed
    into the bottom of the range. Alpha is dropped; grey is repeated thrice.
    Float NaN (no data) becomes the image's lowest value and stays out of the
    percentiles. ``levels``: those two percentiles, given (see
    :func:`intensity_levels`; NaN then becomes the lower one).

    Examples
    --------
    >>> img = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    >>> to_rgb_uint8(img).shape
    (3, 4, 3)
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3:
        if image.shape[-1] == 4:
            image = image[..., :3]
        elif image.shape[-1] == 2:  # grey + alpha
            image = image[..., 0]
        elif image.shape[-1] != 3:
            raise ValueError(f"expected 1, 2, 3 or 4 channels, got shape {image.shape}")
    elif image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = _rescale_to_uint8(image, levels)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image)


def select_channel(image: np.ndarray, channel: int) -> np.ndarray:
    """Channel ``channel`` (1 = the first, as Fiji numbers them) of an image, as a grey image.

    For multi-channel fluorescence, whose nuclear stain (DAPI, Hoechst) is one
    channel among several: segmenting the others as colour would dilute it.

    Raises
    ------
    ValueError
        ``channel`` is not one of the image's channels (a grey image has one).

    Examples
    --------
    >>> rgb = np.zeros((4, 5, 3), np.uint16); rgb[..., 2] = 7
    >>> select_channel(rgb, 3).shape, int(select_channel(rgb, 3).max())
    ((4, 5), 7)
    """
    image = np.asarray(image)
    n_channels = image.shape[-1] if image.ndim == 3 else 1
    if not 1 <= channel <= n_channels:
        raise ValueError(f"has {n_channels} channel{'s' if n_channels > 1 else ''}, "
                         f"so there is no channel {channel} (channels count from 1)")
    return image if image.ndim == 2 else image[..., channel - 1]


def _rescale_to_uint8(image: np.ndarray, levels: tuple[float, float] | None = None) -> np.ndarray:
    values = image.astype(np.float32)
    if levels is not None:
        lo, hi = (np.float64(v) for v in levels)  # float64 scalars, as np.percentile's: the same rounding
        values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
        return np.clip((values - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    sample = _subsample(values)
    finite = np.isfinite(values) if np.issubdtype(image.dtype, np.floating) else None  # integers are all finite
    if finite is not None and not finite.all():
        # NaN marks "no data" in float images (masked, stitched): it becomes the lowest value and stays out of
        # the percentiles (-inf too; +inf the highest), instead of turning the whole image into noise.
        if not finite.any():
            return np.zeros(values.shape, np.uint8)
        lowest, highest = float(values[finite].min()), float(values[finite].max())
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            sample = np.array([lowest, highest], np.float32)
        values = np.nan_to_num(values, nan=lowest, posinf=highest, neginf=lowest)
    lo, hi = np.percentile(sample, (0.1, 99.9))
    if hi <= lo:
        hi = lo + 1.0
    scaled = (values - lo) / (hi - lo) * 255.0
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def sample_step(shape: tuple[int, ...], max_pixels: int = 1_000_000) -> int:
    """The stride of the pixels the intensity percentiles are taken from: at most ~max_pixels of them.

    Examples
    --------
    >>> sample_step((512, 512)), sample_step((20_000, 20_000))
    (1, 20)
    """
    return max(1, int(np.sqrt(shape[0] * shape[1] / max_pixels)))


def _subsample(values: np.ndarray, max_pixels: int = 1_000_000) -> np.ndarray:
    """A strided view of at most ~max_pixels pixels: percentiles of huge images stay cheap."""
    step = sample_step(values.shape, max_pixels)
    return values[::step, ::step]


class IntensityLevels(NamedTuple):
    """The intensity levels preparing an image for the network uses (see :func:`intensity_levels`)."""

    #: 0.1 and 99.9 percentiles that :func:`to_rgb_uint8` maps to 0 and 255 (None: 8-bit, kept as is)
    rescale: tuple[float, float] | None
    #: 1 and 99.8 percentiles (0..1) of the 8-bit image that :func:`normalize` maps to 0 and 1
    normalize: tuple[float, float]


def intensity_levels(sample: np.ndarray) -> IntensityLevels:
    """The levels ``normalize(to_rgb_uint8(image))`` takes from a whole image, from its sample alone.

    Parameters
    ----------
    sample : ndarray
        ``image[::step, ::step]`` with ``step = sample_step(image.shape)``: the
        pixels those percentiles are computed from. An image read block by
        block (:mod:`nucleiseg.distributed`) then gets exactly the intensity
        scale of the whole image held in memory.

    Examples
    --------
    >>> image = np.arange(40_000, dtype=np.uint16).reshape(200, 200)
    >>> levels = intensity_levels(image[::sample_step(image.shape), ::sample_step(image.shape)])
    >>> block = image[50:80, 100:140]
    >>> bool(np.array_equal(normalize(to_rgb_uint8(block, levels.rescale), levels=levels.normalize),
    ...                     normalize(to_rgb_uint8(image))[:, 50:80, 100:140]))
    True
    """
    sample = np.asarray(sample)
    rgb = to_rgb_uint8(sample)  # the sample is within max_pixels: its own subsample is itself
    rescale = None
    if sample.dtype != np.uint8:
        values = sample.astype(np.float32)
        values = values[np.isfinite(values)] if np.issubdtype(sample.dtype, np.floating) else values
        if values.size:
            lo, hi = np.percentile(values, (0.1, 99.9))
            rescale = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
        else:
            rescale = (0.0, 1.0)
    lo, hi = byte_percentiles(rgb, (1.0, 99.8))
    return IntensityLevels(rescale, (lo, hi))


def byte_percentiles(values: np.ndarray, q: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(values.astype(np.float32) / 255.0, q)`` of 8-bit ``values``, from a histogram.

    The same figures to the last bit (NumPy's *linear* method: the two order
    statistics around each percentile, interpolated the way ``np.percentile``
    does), without sorting a float copy of the image: 0.6 against 2.1 ms for a
    256x256 RGB image (``benchmarks/finishing_speed.py``).

    Examples
    --------
    >>> rgb = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    >>> byte_percentiles(rgb, (1.0, 99.8)) == tuple(np.percentile(rgb.astype(np.float32) / 255.0, (1.0, 99.8)))
    True
    """
    values = np.asarray(values)
    if values.dtype != np.uint8 or not values.size:
        raise ValueError(f"expected a non-empty uint8 array, got {values.dtype} of shape {values.shape}")
    if not all(0 <= v <= 100 for v in q):
        raise ValueError(f"percentiles must be in [0, 100], got {tuple(q)}")
    last = values.size - 1
    ends = np.cumsum(np.bincount(values.ravel(), minlength=256))  # ends[v]: how many values are <= v
    virtual = last * (np.asarray(q, np.float64) / 100)  # the linear method's fractional rank
    below = np.floor(virtual)
    gamma = virtual - below
    first = np.minimum(below, last).astype(np.int64)
    second = np.minimum(below + 1, last).astype(np.int64)
    a = np.searchsorted(ends, first, side="right").astype(np.float32) / np.float32(255)
    b = np.searchsorted(ends, second, side="right").astype(np.float32) / np.float32(255)
    diff = b - a  # np.percentile's interpolation, in the same types and order
    out = a + diff * gamma
    upper = gamma >= 0.5
    out[upper] = (b - diff * (1 - gamma))[upper]
    return tuple(float(v) for v in out)


def normalize(rgb: np.ndarray, low: float = 1.0, high: float = 99.8,
              levels: tuple[float, float] | None = None) -> np.ndarray:
    """Stretch an 8-bit RGB image to float32 ``(3, H, W)`` for the network.

    The ``low`` and ``high`` percentiles of all channels map to 0 and 1 (values
    outside are clipped to [-0.5, 1.5]): a dim fluorescence image and a bright
    brightfield image then span the same range. ``levels``: those percentiles
    (in 0..1), given instead (a block of a larger image, see :func:`intensity_levels`).

    Examples
    --------
    >>> x = normalize(np.full((8, 8, 3), 7, np.uint8))
    >>> x.shape, x.dtype
    ((3, 8, 8), dtype('float32'))
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 (see to_rgb_uint8), got {rgb.dtype} of shape {rgb.shape}")
    if levels is None:
        lo, hi = byte_percentiles(_subsample(rgb), (low, high))
    else:
        lo, hi = levels
    scale = 1.0 / max(hi - lo, 1e-2)  # a flat image stays flat instead of blowing up noise
    # (rgb / 255 - lo) * scale in float32, in place, channel by channel: the same bits as whole-image
    # temporaries, 51 against 59 ms on a 2048x2048 image (benchmarks/finishing_speed.py)
    out = np.empty((3,) + rgb.shape[:2], np.float32)
    for channel, plane in enumerate(out):
        plane[...] = rgb[..., channel]
        plane /= 255.0
        plane -= lo
        plane *= scale
        np.clip(plane, -0.5, 1.5, out=plane)
    return out
