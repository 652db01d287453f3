"""One row of measurements per nucleus, from instance labels and the image.

:func:`measure_nuclei` wraps :func:`skimage.measure.regionprops_table` with
plain column names, so the table reads the same in pandas, a spreadsheet or R.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["MEASUREMENT_COLUMNS", "grey_image", "measure_nuclei", "median_diameter", "typical_diameter"]

# regionprops_table property -> column name in the table
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
    for r0 in range(0, image.shape[0], _BAND_ROWS):
        band = image[r0 : r0 + _BAND_ROWS, :, :3].astype(np.float32)
        np.dot(band, np.asarray(_GREY_WEIGHTS, np.float32), out=grey[r0 : r0 + _BAND_ROWS])
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
        ``mean_intensity``. No rows (same columns) when there is no nucleus.

    Examples
    --------
    >>> labels = np.zeros((10, 10), np.int32); labels[2:6, 3:7] = 1
    >>> table = measure_nuclei(labels, np.full((10, 10), 50, np.uint8))
    >>> table[["label", "area", "centroid_y", "mean_intensity"]].values.tolist()
    [[1.0, 16.0, 3.5, 50.0]]
    """
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    grey = grey_image(image)
    if grey.shape != labels.shape:
        raise ValueError(f"image of shape {np.shape(image)} does not match labels of shape {labels.shape}")
    columns = regionprops_table(
        labels,
        intensity_image=grey,
        properties=("label", "area", "centroid", "bbox", "equivalent_diameter_area", "eccentricity", "intensity_mean"),
    )
    table = pd.DataFrame({name: columns[key] for key, name in _PROPERTIES.items()})
    return table.astype({"label": np.int64, "area": np.int64})


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
