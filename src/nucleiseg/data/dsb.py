"""The Kaggle / DSB2018 layout: one folder per image, one PNG per nucleus.

::

    stage1_train/<image_id>/images/<image_id>.png    the image (RGBA or RGB, 8 bit)
    stage1_train/<image_id>/masks/<mask_id>.png      one binary mask per nucleus

:func:`merge_masks` turns the per-nucleus masks into one instance label image
(label ``k`` for the ``k``-th mask, in file-name order); :func:`read_kaggle_labels`
does the same from the files, decoding each mask once and reporting bad masks
(unreadable, wrong size, empty, overlapping) instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ImageReadError
from ..io import IMAGE_SUFFIXES, read_image

__all__ = [
    "KAGGLE_SUBSETS",
    "find_kaggle_root",
    "list_kaggle_images",
    "merge_masks",
    "read_kaggle_labels",
    "read_mask",
]

#: sub-folders of a Kaggle download that hold annotated images, in the order they are looked for
KAGGLE_SUBSETS = ("stage1_train",)


def _is_kaggle_entry(folder: Path) -> bool:
    return folder.is_dir() and (folder / "images").is_dir()


def find_kaggle_root(data_dir: str | Path) -> Path | None:
    """The folder holding ``<image_id>/images/`` sub-folders, or None.

    Accepts the folder itself (``.../stage1_train``) or its parent (the
    folder a Kaggle download unpacks to, holding ``stage1_train/``).

    Examples
    --------
    >>> find_kaggle_root("/data/dsb2018")  # doctest: +SKIP
    PosixPath('/data/dsb2018/stage1_train')
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return None
    for subset in KAGGLE_SUBSETS:
        candidate = data_dir / subset
        if candidate.is_dir() and any(_is_kaggle_entry(p) for p in candidate.iterdir()):
            return candidate
    if (data_dir / "images").is_dir():  # a single image folder or the paired layout, not a Kaggle root
        return None
    if any(_is_kaggle_entry(p) for p in data_dir.iterdir()):
        return data_dir
    return None


def list_kaggle_images(
    root: str | Path, *, need_masks: bool = True
) -> tuple[dict[str, tuple[Path, list[Path]]], list[tuple[str, Path, str]]]:
    """Find the image and mask files of every sample under a Kaggle root.

    Parameters
    ----------
    root : str or Path
        Folder holding one ``<image_id>/`` folder per image (see
        :func:`find_kaggle_root`).
    need_masks : bool, optional
        When True (default) an image without a ``masks/`` folder or without
        mask files is reported as a problem instead of listed.

    Returns
    -------
    samples : dict
        ``{image_id: (image_path, [mask_path, ...])}``, sorted by id, masks
        sorted by file name.
    problems : list of (image_id, path, reason)
        Folders that could not be used, for the caller to report.

    Examples
    --------
    >>> samples, problems = list_kaggle_images("stage1_train")  # doctest: +SKIP
    >>> image, masks = samples["00071198d059..."]  # doctest: +SKIP
    """
    root = Path(root)
    samples: dict[str, tuple[Path, list[Path]]] = {}
    problems: list[tuple[str, Path, str]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        image_id = folder.name
        image_dir = folder / "images"
        if not image_dir.is_dir():
            problems.append((image_id, folder, "no images/ folder"))
            continue
        candidates = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        named = [p for p in candidates if p.stem == image_id]
        if len(named) == 1:
            image = named[0]
        elif len(candidates) == 1:
            image = candidates[0]
        elif not candidates:
            problems.append((image_id, image_dir, "no image file in images/"))
            continue
        else:
            problems.append((image_id, image_dir, f"{len(candidates)} image files in images/, expected one"))
            continue
        mask_dir = folder / "masks"
        masks = (
            sorted(p for p in mask_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if mask_dir.is_dir()
            else []
        )
        if need_masks and not mask_dir.is_dir():
            problems.append((image_id, folder, "no masks/ folder (image not annotated)"))
            continue
        if need_masks and not masks:
            problems.append((image_id, mask_dir, "no mask files in masks/"))
            continue
        samples[image_id] = (image, masks)
    return samples, problems


def read_mask(path: str | Path) -> np.ndarray:
    """Read one nucleus mask as a boolean array (non-zero pixels are the nucleus).

    Decoded with OpenCV when it can (fast for thousands of small PNGs), else
    with :func:`nucleiseg.io.read_image`, whose error names the file.

    Raises
    ------
    ImageReadError
        The file is missing, empty or not an image.

    Examples
    --------
    >>> read_mask("masks/0a7d30b252359a10fd298b638b90cb9ada3acced4e0c0e5a3692013f432ee4e9.png").dtype  # doctest: +SKIP
    dtype('bool')
    """
    import cv2

    path = Path(path)
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.suffix.lower() == ".png" else None
    if mask is None:  # not PNG, or cv2 could not decode it: the robust reader explains why
        mask = read_image(path)
    elif mask.ndim == 3:  # cv2 gives BGR(A); any colour channel set means "inside"
        mask = mask[..., :3] if mask.shape[-1] >= 3 else mask[..., :1]
    if mask.ndim == 3:
        if mask.shape[-1] in (2, 4):  # grey+alpha / RGBA: ignore alpha
            mask = mask[..., :-1]
        return np.any(mask != 0, axis=-1)
    return mask != 0


def merge_masks(
    masks: Sequence[np.ndarray], shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-object binary masks into one instance label image.

    Mask ``k`` (in the order given) gets label ``k``; where masks overlap the
    earlier mask keeps the pixel. A mask with no pixel of its own (empty, or
    entirely covered by earlier masks) gets no label, and later masks take the
    next label, so the labels are always ``1..n``.

    Parameters
    ----------
    masks : sequence of (H, W) arrays
        Non-zero pixels belong to the object.
    shape : tuple of int, optional
        ``(height, width)`` of the label image; defaults to the first mask's.

    Returns
    -------
    labels : (H, W) ndarray of uint16 (uint32 past 65535 objects)
    overlap : (len(masks),) ndarray of int
        Pixels of each mask already claimed by an earlier one; ``-1`` marks a
        mask that got no label (empty or fully covered).

    Examples
    --------
    >>> a = np.array([[1, 1, 0]]); b = np.array([[0, 1, 1]])
    >>> labels, overlap = merge_masks([a, b])
    >>> labels
    array([[1, 1, 2]], dtype=uint16)
    >>> overlap
    array([0, 1])
    """
    if shape is None:
        if not len(masks):
            raise ValueError("shape is required when there are no masks")
        shape = np.shape(masks[0])[:2]
    height, width = int(shape[0]), int(shape[1])
    dtype = np.uint16 if len(masks) <= np.iinfo(np.uint16).max else np.uint32
    flat = np.zeros(height * width, dtype=dtype)
    overlap = np.zeros(len(masks), dtype=np.int64)
    label = 0
    for k, mask in enumerate(masks):
        mask = np.asarray(mask)
        if mask.shape != (height, width):
            raise ValueError(f"mask {k} has shape {mask.shape}, expected {(height, width)}")
        index = np.flatnonzero(mask)
        free = index[flat[index] == 0]
        if len(free) == 0:
            overlap[k] = -1
            continue
        overlap[k] = len(index) - len(free)
        label += 1
        flat[free] = label
    return flat.reshape(height, width), overlap


def read_kaggle_labels(
    mask_paths: Sequence[str | Path], shape: tuple[int, int]
) -> tuple[np.ndarray, list[str]]:
    """Build the instance label image of one sample from its mask files.

    Each mask is decoded once. Unreadable, wrongly sized and empty masks are
    left out; overlapping pixels go to the earlier mask (file-name order).
    Every such case is reported, naming the file.

    Parameters
    ----------
    mask_paths : sequence of path
        The sample's mask files, in the order labels are given out.
    shape : tuple of int
        ``(height, width)`` of the image.

    Returns
    -------
    labels : (H, W) ndarray of uint16
        Label ``k`` for the ``k``-th usable mask, 0 for background.
    problems : list of str
        One message per mask that was left out or overlapped another.

    Examples
    --------
    >>> masks = sorted(Path("stage1_train/abc/masks").glob("*.png"))  # doctest: +SKIP
    >>> labels, problems = read_kaggle_labels(masks, (256, 256))  # doctest: +SKIP
    """
    height, width = int(shape[0]), int(shape[1])
    problems: list[str] = []
    dtype = np.uint16 if len(mask_paths) <= np.iinfo(np.uint16).max else np.uint32
    flat = np.zeros(height * width, dtype=dtype)
    label = 0
    for path in mask_paths:
        path = Path(path)
        try:
            mask = read_mask(path)
        except ImageReadError as exc:
            problems.append(f"{path}: unreadable mask, left out ({exc.message})")
            continue
        if mask.shape != (height, width):
            problems.append(
                f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but the image is {height}x{width}, left out"
            )
            continue
        index = np.flatnonzero(mask)
        if len(index) == 0:
            problems.append(f"{path}: empty mask (no nucleus pixel), left out")
            continue
        free = index[flat[index] == 0]
        if len(free) == 0:
            problems.append(f"{path}: mask lies entirely inside earlier masks, left out")
            continue
        if len(free) < len(index):
            problems.append(
                f"{path}: overlaps earlier masks on {len(index) - len(free)} pixels (kept the earlier masks there)"
            )
        label += 1
        flat[free] = label
    return flat.reshape(height, width), problems
