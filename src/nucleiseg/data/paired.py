"""Users' own annotations: a folder of images beside a folder of label images.

::

    DATA_DIR/images/<name>.<ext>    the image (PNG, TIFF, JPEG, BMP; grey or colour; any bit depth)
    DATA_DIR/labels/<name>.<ext>    instance labels, TIFF or PNG, 8/16/32-bit, 0 = background

This is what napari, Fiji (Labkit, the ROI manager's "labels" export),
StarDist and Cellpose write. Files pair up by name without the extension;
the label values need not be consecutive and are renumbered ``1..n``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageReadError
from ..io import list_images, read_labels

__all__ = ["is_paired_layout", "list_paired_images", "read_paired_labels", "relabel_consecutive"]


def is_paired_layout(data_dir: str | Path) -> bool:
    """True when ``data_dir`` holds both an ``images/`` and a ``labels/`` folder."""
    data_dir = Path(data_dir)
    return (data_dir / "images").is_dir() and (data_dir / "labels").is_dir()


def _by_stem(files: list[Path]) -> tuple[dict[str, Path], list[tuple[str, Path, str]]]:
    found: dict[str, list[Path]] = {}
    for path in files:
        found.setdefault(path.stem, []).append(path)
    unique = {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}
    clashes = [
        (stem, paths[0].parent, f"several files named {stem}.*: {', '.join(p.name for p in paths)}")
        for stem, paths in found.items()
        if len(paths) > 1
    ]
    return unique, clashes


def list_paired_images(
    data_dir: str | Path,
) -> tuple[dict[str, tuple[Path, Path]], list[tuple[str, Path, str]]]:
    """Pair ``images/<name>.*`` with ``labels/<name>.*``.

    Parameters
    ----------
    data_dir : str or Path
        Folder holding ``images/`` and ``labels/``.

    Returns
    -------
    samples : dict
        ``{name: (image_path, label_path)}``, sorted by name.
    problems : list of (name, path, reason)
        Images without a label file, label files without an image, and names
        used by two files in one folder (``a.png`` and ``a.tif``).

    Examples
    --------
    >>> samples, problems = list_paired_images("my_annotations")  # doctest: +SKIP
    >>> samples["slide01"]  # doctest: +SKIP
    (PosixPath('my_annotations/images/slide01.tif'), PosixPath('my_annotations/labels/slide01.tif'))
    """
    data_dir = Path(data_dir)
    images, image_clashes = _by_stem(list_images(data_dir / "images"))
    labels, label_clashes = _by_stem(list_images(data_dir / "labels"))
    problems = image_clashes + label_clashes
    clashed = {name for name, _, _ in problems}
    samples = {}
    for name in sorted(set(images) | set(labels)):
        if name in clashed:
            continue
        if name not in labels:
            problems.append((name, images[name], "image without a label file in labels/"))
        elif name not in images:
            problems.append((name, labels[name], "label file without an image in images/"))
        else:
            samples[name] = (images[name], labels[name])
    return samples, problems


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Renumber the objects of a label image ``1..n``, keeping their order.

    Parameters
    ----------
    labels : (H, W) integer array
        0 is background; any other values, not necessarily consecutive.

    Returns
    -------
    relabelled : (H, W) ndarray of uint16 (uint32 past 65535 objects)

    Raises
    ------
    ValueError
        Negative or non-integer labels.

    Examples
    --------
    >>> relabel_consecutive(np.array([[0, 7], [300, 7]]))
    array([[0, 1],
           [2, 1]], dtype=uint16)
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    values, inverse = np.unique(labels, return_inverse=True)
    has_background = len(values) and values[0] == 0
    n = len(values) - int(has_background)
    dtype = np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32
    lut = np.arange(len(values), dtype=dtype) + (0 if has_background else 1)
    return lut[inverse].reshape(labels.shape)


def read_paired_labels(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a label image and renumber it ``1..n`` after checking its size.

    Parameters
    ----------
    path : str or Path
        TIFF or PNG label image (8, 16 or 32-bit integers, 0 = background).
    shape : tuple of int
        ``(height, width)`` of the image it annotates.

    Returns
    -------
    labels : (H, W) ndarray of uint16

    Raises
    ------
    ImageReadError
        Unreadable file, colour or non-integer labels, negative values, or a
        size different from the image.

    Examples
    --------
    >>> read_paired_labels("labels/slide01.tif", (512, 512)).max()  # doctest: +SKIP
    87
    """
    path = Path(path)
    labels = read_labels(path)
    if labels.shape != tuple(shape[:2]):
        raise ImageReadError(
            f"label image is {labels.shape[0]}x{labels.shape[1]} but the image is {shape[0]}x{shape[1]}", path
        )
    try:
        return relabel_consecutive(labels)
    except ValueError as exc:
        raise ImageReadError(str(exc), path) from None
