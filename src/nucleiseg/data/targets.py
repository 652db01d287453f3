"""Training targets from an instance label image.

Three channels, the "body + contour + touch" recipe of the 2018 Data Science
Bowl winners: the network learns where nuclei are, where each one ends, and
the thin strip where two of them meet, which is what the watershed in
:mod:`nucleiseg.postprocess` needs to cut touching nuclei apart.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

from ..io import label_edges

CHANNELS = ("body", "contour", "touch")


def touching_area(labels: np.ndarray, size: int = 5) -> np.ndarray:
    """Pixels whose ``size``×``size`` neighbourhood holds two different nuclei.

    Covers the gap between nuclei that nearly touch as well as the shared
    boundary of nuclei that do.

    Examples
    --------
    >>> lab = np.zeros((5, 7), np.uint16); lab[:, :3] = 1; lab[:, 4:] = 2
    >>> touching_area(lab, size=3)[2].astype(int)  # the 1-px gap sees both nuclei
    array([0, 0, 0, 1, 0, 0, 0])
    >>> touching_area(lab, size=5)[2].astype(int)  # and so do the nuclei's facing edges
    array([0, 0, 1, 1, 1, 0, 0])
    """
    labels = np.asarray(labels)
    if labels.max(initial=0) < np.iinfo(np.uint16).max:
        # OpenCV morphology on uint16, with 65535 standing for "no nucleus" in the erosion
        kernel = np.ones((size, size), np.uint8)
        lab16 = labels.astype(np.uint16)
        highest = cv2.dilate(lab16, kernel)
        # The smallest non-zero label nearby: erode with background lifted to the top.
        lowest = cv2.erode(np.where(lab16 > 0, lab16, np.uint16(65535)), kernel)
        return (highest > 0) & (lowest != 65535) & (highest != lowest)
    # more labels than uint16 holds: slower, exact
    big = np.iinfo(np.int32).max  # scipy's filters lose int64's top values
    highest = ndi.maximum_filter(labels, size=size)
    lowest = ndi.minimum_filter(np.where(labels > 0, labels, big), size=size)
    return (highest > 0) & (lowest < big) & (highest != lowest)


def inner_contour(labels: np.ndarray) -> np.ndarray:
    """Nucleus pixels with a 4-connected neighbour of another label (or background).

    The same pixels as ``skimage.segmentation.find_boundaries(labels, mode="inner")``
    (:func:`nucleiseg.io.label_edges` inside nuclei).

    Examples
    --------
    >>> lab = np.zeros((5, 5), np.uint16); lab[1:4, 1:4] = 7
    >>> inner_contour(lab).astype(int)[2]
    array([0, 1, 0, 1, 0])
    """
    labels = np.asarray(labels)
    return label_edges(labels) & (labels > 0)


def make_targets(labels: np.ndarray, touch_size: int = 5) -> np.ndarray:
    """Stack body, contour and touch masks as ``(3, H, W)`` float32 in {0, 1}.

    Examples
    --------
    >>> lab = np.zeros((8, 8), np.uint16); lab[2:6, 2:6] = 3
    >>> t = make_targets(lab)
    >>> t.shape, int(t[0].sum()), int(t[1].sum()), int(t[2].sum())
    ((3, 8, 8), 16, 12, 0)
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    body = labels > 0
    contour = inner_contour(labels)
    touch = touching_area(labels, size=touch_size)
    return np.stack([body, contour, touch]).astype(np.float32)
