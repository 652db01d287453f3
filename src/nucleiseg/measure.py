"""One row of measurements per nucleus, from instance labels and the image.

:func:`measure_nuclei` gives scikit-image's ``regionprops`` properties under
plain column names, so the table reads the same in pandas, a spreadsheet or R;
it computes them for all nuclei at once, without a per-nucleus loop.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .io import dense_labels

__all__ = ["MEASUREMENT_COLUMNS", "grey_image", "measure_nuclei", "median_diameter", "typical_diameter"]

# The regionprops_table property each column is (its definition) -> the column's name
_PROPERTIES = {
    "label": "label",
    "area": "area",
    "centroid-0": "centroid_y",
    "centroid-1": "centroid_x",
    "bbox-0": "bbox_min_row",
    "bbox-1": "bbox_min_col",
    "bbox-2": "bbox_max_row",
    "bbox-3": "bbox_max_col",
    "equivalent_diameter_area": "equivalent_diameter",
    "eccentricity": "eccentricity",
    "intensity_mean": "mean_intensity",
}

#: Columns of :func:`measure_nuclei`, in order.
MEASUREMENT_COLUMNS: tuple[str, ...] = tuple(_PROPERTIES.values())

# Luminance weights of skimage.color.rgb2gray (ITU-R BT.709).
_GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)
_BAND_ROWS = 1024


def grey_image(image: np.ndarray) -> np.ndarray:
    """A single-channel version of a grey, grey+alpha, RGB or RGBA image.

    Grey images are returned as they are (raw intensities, any dtype); colour
    images become float32 luminance ``0.2125 R + 0.7154 G + 0.0721 B`` in the
    image's own units (alpha is ignored). Computed in bands of rows, so a huge
    image costs one float32 plane and no more.

    Examples
    --------
    >>> float(grey_image(np.full((2, 3, 3), 100, np.uint8))[0, 0])
    100.0
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (1, 2):
        return image[..., 0]
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected a 2-D grey, RGB or RGBA image, got shape {image.shape}")
    grey = np.empty(image.shape[:2], np.float32)
    weights = np.asarray(_GREY_WEIGHTS, np.float32)
    for r0 in range(0, image.shape[0], _BAND_ROWS):
        band, out = image[r0 : r0 + _BAND_ROWS], grey[r0 : r0 + _BAND_ROWS]
        # channel by channel: 6x faster than a float32 copy of the band and np.dot (0.16 against 0.96 ms, 256x256)
        np.multiply(band[..., 0], weights[0], out=out, dtype=np.float32)
        out += band[..., 1] * weights[1]
        out += band[..., 2] * weights[2]
    return grey


def measure_nuclei(labels: np.ndarray, image: np.ndarray) -> pd.DataFrame:
    """Measure every nucleus of an instance label image.

    Parameters
    ----------
    labels : ndarray, shape (H, W), integer
        Instance labels, 0 for background.
    image : ndarray, shape (H, W) or (H, W, C)
        The image the labels were found in; intensities are measured on its
        grey version (:func:`grey_image`), in the image's own units.

    Returns
    -------
    table : pandas.DataFrame
        One row per nucleus, in label order, with the columns
        :data:`MEASUREMENT_COLUMNS`: ``label``; ``area`` (pixels);
        ``centroid_y``, ``centroid_x``; the bounding box ``bbox_min_row``,
        ``bbox_min_col``, ``bbox_max_row``, ``bbox_max_col`` (max exclusive);
        ``equivalent_diameter`` (of the disc with the same area);
        ``eccentricity`` (0 for a circle, towards 1 for elongated nuclei);
        ``mean_intensity`` (the mean over the nucleus' pixels of finite
        intensity: NaN and infinite pixels, "no data" in a float image, are left
        out; NaN when none is finite). No rows (same columns) when there is no
        nucleus.

    Notes
    -----
    The definitions are scikit-image's ``regionprops`` (eccentricity from the
    eigenvalues of the inertia tensor of the nucleus' pixels), computed for all
    nuclei at once from sums over the labelled pixels (``np.bincount``) in
    bands of rows, each nucleus in coordinates relative to its bounding box so
    that the sums stay exact. The figures equal ``regionprops_table``'s to 1e-9,
    except ``mean_intensity``, which is summed in float64 here (scikit-image
    averages in float32: differences up to about 2e-7 of the value on DSB images)
    over the finite pixels only (scikit-image's is NaN for a nucleus with a NaN pixel).

    Examples
    --------
    >>> labels = np.zeros((10, 10), np.int32); labels[2:6, 3:7] = 1
    >>> table = measure_nuclei(labels, np.full((10, 10), 50, np.uint8))
    >>> table[["label", "area", "centroid_y", "mean_intensity"]].values.tolist()
    [[1.0, 16.0, 3.5, 50.0]]
    >>> image = np.full((10, 10), 50, np.float32); image[3, 4] = np.nan  # a pixel without data
    >>> measure_nuclei(labels, image)[["area", "mean_intensity"]].values.tolist()
    [[16.0, 50.0]]
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    grey = grey_image(image)
    if grey.shape != labels.shape:
        raise ValueError(f"image of shape {np.shape(image)} does not match labels of shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    labels, ids = dense_labels(labels)  # sparse label values (e.g. global ids): numbered 1..n first
    top = int(labels.max(initial=0))
    if ids is None:
        ids = np.arange(top + 1, dtype=np.int64)
    boxes = ndi.find_objects(labels) if top else []
    present = np.array([k + 1 for k, box in enumerate(boxes) if box is not None], np.int64)
    if not present.size:
        return pd.DataFrame({name: np.zeros(0, np.int64 if name in ("label", "area") else float)
                             for name in MEASUREMENT_COLUMNS})
    r0 = np.zeros(top + 1, np.int64)
    c0 = np.zeros(top + 1, np.int64)
    r1 = np.zeros(top + 1, np.int64)
    c1 = np.zeros(top + 1, np.int64)
    for k in present:
        rows, cols = boxes[k - 1]
        r0[k], r1[k], c0[k], c1[k] = rows.start, rows.stop, cols.start, cols.stop
    # Sums per label over its pixels: count, r, c, r^2, c^2, r*c (r, c relative to its box), intensity, and the
    # count of pixels of finite intensity (float images: NaN or inf pixels are left out of the intensity's mean).
    floating = np.issubdtype(grey.dtype, np.floating)
    sums = np.zeros((8, top + 1))
    width = labels.shape[1]
    for b0 in range(0, labels.shape[0], _BAND_ROWS):
        band = labels[b0 : b0 + _BAND_ROWS]
        flat = np.flatnonzero(band)
        if not flat.size:
            continue
        lab = band.ravel()[flat]
        r = flat // width + (b0 - r0[lab])
        c = flat % width - c0[lab]
        r, c = r.astype(np.float64), c.astype(np.float64)
        intensity = grey[b0 : b0 + _BAND_ROWS].ravel()[flat].astype(np.float64)
        finite = None
        if floating:
            finite = np.isfinite(intensity)
            if finite.all():
                finite = None
            else:
                intensity[~finite] = 0.0
        counts = np.bincount(lab, minlength=top + 1)
        sums[0] += counts
        for row, weights in enumerate((r, c, r * r, c * c, r * c, intensity), start=1):
            sums[row] += np.bincount(lab, weights, minlength=top + 1)
        sums[7] += counts if finite is None else np.bincount(lab, finite, minlength=top + 1)
    n, sr, sc, srr, scc, src, si, n_finite = sums[:, present]
    mr, mc = sr / n, sc / n
    # central second moments / area: the inertia tensor [[var_c, -cov], [-cov, var_r]] (scikit-image's)
    var_r, var_c, cov = srr / n - mr * mr, scc / n - mc * mc, src / n - mr * mc
    half_sum, root = (var_r + var_c) / 2, np.sqrt(((var_r - var_c) / 2) ** 2 + cov**2)
    large, small = half_sum + root, np.clip(half_sum - root, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(large > 0, np.sqrt(np.clip(1 - small / large, 0, 1)), 0.0)
    table = pd.DataFrame({
        "label": ids[present].astype(np.int64),
        "area": n.astype(np.int64),
        "centroid_y": mr + r0[present],
        "centroid_x": mc + c0[present],
        "bbox_min_row": r0[present],
        "bbox_min_col": c0[present],
        "bbox_max_row": r1[present],
        "bbox_max_col": c1[present],
        "equivalent_diameter": np.sqrt(4 * n / np.pi),
        "eccentricity": eccentricity,
        "mean_intensity": np.divide(si, n_finite, out=np.full(n.shape, np.nan), where=n_finite > 0),
    })
    return table


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent diameter (pixels) of the labelled objects, or None when there are none.

    The equivalent diameter is that of the disc with the object's area.

    Examples
    --------
    >>> labels = np.zeros((20, 20), int); labels[2:6, 2:6] = 1; labels[10:18, 10:18] = 2
    >>> round(median_diameter(labels), 2)  # discs of 16 and 64 pixels: 4.51 and 9.03 px across
    6.77
    """
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    areas = areas[areas > 0]
    if areas.size == 0:
        return None
    return float(np.median(np.sqrt(4.0 * areas / np.pi)))


def typical_diameter(label_images) -> float | None:
    """The median over images of each image's :func:`median_diameter` (images without nuclei left out).

    Each image counts once, however many nuclei it holds: a model's training data
    is described by its typical image, not by its most crowded ones.

    Examples
    --------
    >>> small = np.zeros((9, 9), int); small[1:3, 1:3] = 1
    >>> large = np.zeros((9, 9), int); large[:8, :8] = 1
    >>> round(typical_diameter([small, small, large, np.zeros((9, 9), int)]), 2)
    2.26
    """
    diameters = [d for d in map(median_diameter, label_images) if d is not None]
    return float(np.median(diameters)) if diameters else None
