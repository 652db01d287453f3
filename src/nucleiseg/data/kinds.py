"""Image kind from pixels: fluorescence, stained tissue, or grey brightfield.

Three kinds of microscopy image look very different to a network and are
kept in proportion when splitting data:

``fluorescence``
    Dark background, bright nuclei (about 81% of DSB2018 stage1_train).
``tissue``
    Stained tissue or colour brightfield: dark, coloured nuclei on a light
    background (about 16%).
``brightfield``
    Grey brightfield: dark nuclei on a light grey background (about 3%).

The rule looks first at the background level (the median grey value, since
most pixels are background): a dark background means fluorescence. A lighter
image is ``tissue`` when it carries colour. A grey one is ``brightfield`` when
its background is light; for a mid-grey background the intensity histogram
decides (bright objects on dark lift the mean above the median, dark objects
on light pull it below).

On DSB2018 stage1_train (592 images) it gives 484 fluorescence, 94 tissue and
14 brightfield images. The classes are far apart there: fluorescence
backgrounds reach at most 0.17, light backgrounds start at 0.54, and the
coloured images have a mean chroma of at least 0.047 against 0 for grey ones.
"""

from __future__ import annotations

import numpy as np

from ..preprocess import to_rgb_uint8

__all__ = ["KINDS", "image_kind", "kind_features"]

KINDS = ("fluorescence", "tissue", "brightfield")

#: median grey (0..1) below which the background is dark: fluorescence
DARK_BACKGROUND = 0.25
#: median grey (0..1) above which a grey image's background is light: brightfield
LIGHT_BACKGROUND = 0.5
#: mean chroma (max - min channel, 0..1) from which a not-dark image counts as coloured: tissue
COLOUR_CHROMA = 0.02
_SAMPLE_PIXELS = 65536


def kind_features(image: np.ndarray) -> dict[str, float]:
    """Measure the values :func:`image_kind` decides on.

    Parameters
    ----------
    image : (H, W) or (H, W, C) array
        Grey, RGB or RGBA image of any bit depth (converted with
        :func:`nucleiseg.preprocess.to_rgb_uint8`).

    Returns
    -------
    features : dict
        ``background``: median grey level in [0, 1];
        ``lean``: mean minus median grey level (positive: bright objects on
        dark); ``chroma``: mean over pixels of max minus min channel, in [0, 1].

    Examples
    --------
    >>> dark = np.zeros((32, 32), np.uint8); dark[8:16, 8:16] = 200
    >>> round(kind_features(dark)["background"], 2)
    0.0
    """
    rgb = to_rgb_uint8(image)
    # statistics of a strided sample of at most ~65k pixels: as good, and cheap for big images
    step = max(1, int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / _SAMPLE_PIXELS))))
    sample = rgb[::step, ::step]
    # channel by channel: NumPy's reductions over a last axis of 3 are slow (kind_features took 4.8 against
    # 1.05 ms per DSB image with them, the same features; benchmarks/finishing_speed.py)
    r, g, b = sample[..., 0], sample[..., 1], sample[..., 2]
    grey = (r.astype(np.uint16) + g + b).ravel()  # 0..765
    counts = np.cumsum(np.bincount(grey, minlength=766))
    median = float(np.searchsorted(counts, (grey.size + 1) / 2)) / 765.0
    chroma = np.maximum(np.maximum(r, g), b).astype(np.int16) - np.minimum(np.minimum(r, g), b)
    return {
        "background": median,
        "lean": float(grey.mean()) / 765.0 - median,
        "chroma": float(chroma.mean()) / 255.0,
    }


def image_kind(image: np.ndarray) -> str:
    """Classify a microscopy image as fluorescence, tissue or brightfield.

    Parameters
    ----------
    image : (H, W) or (H, W, C) array
        Grey, RGB or RGBA image of any bit depth.

    Returns
    -------
    kind : {'fluorescence', 'tissue', 'brightfield'}

    Examples
    --------
    >>> fluo = np.full((32, 32), 10, np.uint8); fluo[8:16, 8:16] = 200
    >>> image_kind(fluo)
    'fluorescence'
    >>> grey = np.full((32, 32), 220, np.uint8); grey[8:16, 8:16] = 60
    >>> image_kind(grey)
    'brightfield'
    >>> tissue = np.full((32, 32, 3), 230, np.uint8); tissue[8:16, 8:16] = (120, 60, 160)
    >>> image_kind(tissue)
    'tissue'
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"expected a 2-D grey or colour image, got shape {image.shape}")
    features = kind_features(image)
    background = features["background"]
    if background < DARK_BACKGROUND:
        return "fluorescence"
    if features["chroma"] >= COLOUR_CHROMA:
        return "tissue"
    if background > LIGHT_BACKGROUND:
        return "brightfield"
    # grey, mid-grey background: decide by whether the objects are brighter or darker than it
    return "brightfield" if features["lean"] < 0 else "fluorescence"
