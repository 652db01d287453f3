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

import numpy as np


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a grey/RGB/RGBA image of any bit depth to ``(H, W, 3)`` uint8.

    8-bit data is kept as is; other depths are rescaled between their 0.1 and
    99.9 percentiles, so a 12-bit camera image in a 16-bit file is not crushed
    into the bottom of the range. Alpha is dropped; grey is repeated thrice.
    Float NaN (no data) becomes the image's lowest value and stays out of the
    percentiles.

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
        image = _rescale_to_uint8(image)
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


def _rescale_to_uint8(image: np.ndarray) -> np.ndarray:
    values = image.astype(np.float32)
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


def _subsample(values: np.ndarray, max_pixels: int = 1_000_000) -> np.ndarray:
    """A strided view of at most ~max_pixels pixels: percentiles of huge images stay cheap."""
    step = max(1, int(np.sqrt(values.shape[0] * values.shape[1] / max_pixels)))
    return values[::step, ::step]


def normalize(rgb: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Stretch an 8-bit RGB image to float32 ``(3, H, W)`` for the network.

    The ``low`` and ``high`` percentiles of all channels map to 0 and 1 (values
    outside are clipped to [-0.5, 1.5]): a dim fluorescence image and a bright
    brightfield image then span the same range.

    Examples
    --------
    >>> x = normalize(np.full((8, 8, 3), 7, np.uint8))
    >>> x.shape, x.dtype
    ((3, 8, 8), dtype('float32'))
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3), got shape {rgb.shape}")
    values = rgb.astype(np.float32) / 255.0
    lo, hi = (float(v) for v in np.percentile(_subsample(values), (low, high)))
    scale = 1.0 / max(hi - lo, 1e-2)  # a flat image stays flat instead of blowing up noise
    out = np.clip((values - lo) * scale, -0.5, 1.5)
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)
