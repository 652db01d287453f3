"""Users' own annotations: a folder of images beside a folder of label images.

::

    DATA_DIR/images/<name>.<ext>    the image (PNG, TIFF, JPEG, BMP; grey or colour; any bit depth)
    DATA_DIR/labels/<name>.<ext>    instance labels, TIFF or PNG, 8/16/32-bit, 0 = background

This is what napari, Fiji (Labkit, the ROI manager's "labels" export),
StarDist and Cellpose write. Files pair up by name without the extension;
the label values need not be consecutive and are renumbered ``1..n``.

A binary mask (0/255, or 0/1: every nucleus the same value) is not instance
labels: read as such, the whole image would be one "nucleus".
:func:`check_binary_mask` recognises one (a single value covering several
separate blobs) and refuses it, or numbers each blob as its own nucleus, as
the caller chooses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageReadError, NucleisegError
from ..io import list_images, read_labels

__all__ = [
    "BINARY_MASK_CHOICES",
    "BinaryMaskError",
    "check_binary_mask",
    "is_paired_layout",
    "list_paired_images",
    "read_paired_labels",
    "relabel_consecutive",
]

#: What :func:`check_binary_mask` does with a binary mask: stop, or number its blobs.
BINARY_MASK_CHOICES = ("refuse", "split")


class BinaryMaskError(NucleisegError):
    """A label file that is a binary mask, refused (``binary_masks="refuse"``)."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message, path)

    def __reduce__(self):  # keeps message and path across a process pool
        return (type(self), (self.message, self.path))


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


def check_binary_mask(labels: np.ndarray, path: str | Path, binary_masks: str = "refuse") -> tuple[np.ndarray, str | None]:
    """Refuse or split a label image that is a binary mask rather than instance labels.

    A binary mask is recognised as a single non-zero value covering two or
    more separate blobs (8-connected): what a 0/255 or 0/1 mask of several
    nuclei is. Instance labels, or a mask of one blob, pass unchanged.

    Parameters
    ----------
    labels : (H, W) integer array
        As read (any values; 0 = background).
    path : str or Path
        The label file, named in the error or warning.
    binary_masks : {"refuse", "split"}
        ``"refuse"``: raise :class:`BinaryMaskError`. ``"split"``: number each
        blob ``1..n`` as its own nucleus (touching nuclei stay one) and return
        a warning.

    Returns
    -------
    labels : ndarray
        ``labels`` itself, or the numbered blobs (uint16, uint32 past 65535).
    warning : str or None
        What was done to a binary mask.

    Raises
    ------
    BinaryMaskError
        A binary mask, with ``binary_masks="refuse"``.

    Examples
    --------
    >>> mask = np.zeros((4, 7), np.uint8); mask[1:3, 1:3] = 255; mask[1:3, 4:6] = 255
    >>> labels, warning = check_binary_mask(mask, "labels/a.png", "split")
    >>> int(labels.max()), warning
    (2, 'labels/a.png: a binary mask (one value over 2 separate blobs), not instance labels: each blob numbered as one nucleus; touching nuclei stay merged')
    >>> check_binary_mask(mask, "labels/a.png")
    Traceback (most recent call last):
    ...
    nucleiseg.data.paired.BinaryMaskError: labels/a.png: a binary mask (one value over 2 separate blobs), not instance labels: each nucleus needs its own value; to number each blob as one nucleus, choose to split binary masks
    """
    from scipy import ndimage as ndi

    if binary_masks not in BINARY_MASK_CHOICES:
        raise ValueError(f"binary_masks must be one of {BINARY_MASK_CHOICES}, got {binary_masks!r}")
    labels = np.asarray(labels)
    top = labels.max(initial=0)
    if top == 0 or labels.min() not in (0, top) or np.any((labels != 0) & (labels != top)):
        return labels, None  # empty, or more than one value: instance labels
    blobs, n = ndi.label(labels != 0, structure=np.ones((3, 3), bool))
    if n < 2:
        return labels, None
    what = f"a binary mask (one value over {n} separate blobs), not instance labels"
    if binary_masks == "refuse":
        raise BinaryMaskError(f"{what}: each nucleus needs its own value; to number each blob as one nucleus, "
                              "choose to split binary masks", path)
    dtype = np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32
    return blobs.astype(dtype), f"{path}: {what}: each blob numbered as one nucleus; touching nuclei stay merged"
