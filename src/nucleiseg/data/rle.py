"""Kaggle run-length encoding of nucleus masks.

The 2018 Data Science Bowl stores each nucleus as a string of
``start length`` pairs over the image flattened **column by column** (top to
bottom, then left to right) with **1-indexed** starts. A label CSV has the
columns ``ImageId,EncodedPixels`` and one row per nucleus; an image without
nuclei may appear once with an empty ``EncodedPixels``.

The CSV does not store the image size: decoding needs the ``(height, width)``
of the matching image.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_path, read_csv_rows

__all__ = [
    "labels_to_rle",
    "read_rle_csv",
    "rle_decode",
    "rle_encode",
    "rle_to_labels",
    "write_rle_csv",
]

RLE_COLUMNS = ("ImageId", "EncodedPixels")


def rle_encode(mask: np.ndarray) -> str:
    """Encode a binary mask as a Kaggle run-length string.

    Parameters
    ----------
    mask : (H, W) array
        Non-zero pixels belong to the object.

    Returns
    -------
    rle : str
        Space-separated ``start length`` pairs; starts are 1-indexed positions
        in the column-major (Fortran-order) flattened image. ``""`` for an
        empty mask.

    Examples
    --------
    >>> mask = np.array([[0, 1],
    ...                  [1, 1]])
    >>> rle_encode(mask)  # column-major: 0 1 | 1 1  -> pixels 2, 3, 4
    '2 3'
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return _encode_flat(np.ravel(mask, order="F") != 0)


def _parse_runs(rle: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based run starts and lengths of an RLE string, validated against ``size`` pixels."""
    text = "" if rle is None else str(rle).strip()
    if not text or text.lower() == "nan":
        return np.empty(0, np.int64), np.empty(0, np.int64)
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError:
        raise ValueError(f"run-length string holds non-integer values: {text[:40]!r}") from None
    except OverflowError:  # found by tests/test_properties.py: a number past int64 is no pixel position either
        raise ValueError(f"run-length string holds a number too large for any image: {text[:40]!r}") from None
    if len(values) % 2:
        raise ValueError("run-length string has an odd number of values (expected start/length pairs)")
    starts, lengths = values[0::2] - 1, values[1::2]
    if len(starts) and (starts.min() < 0 or lengths.min() < 1):
        raise ValueError("run-length starts must be >= 1 and lengths >= 1")
    # each bounded first, so that start + length cannot overflow int64 into a small number
    if len(starts) and (int(starts.max()) >= size or int(lengths.max()) > size or int((starts + lengths).max()) > size):
        raise ValueError(f"run-length runs past the end of the image ({size} pixels)")
    return starts, lengths


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a Kaggle run-length string into a boolean mask.

    Parameters
    ----------
    rle : str
        Space-separated 1-indexed ``start length`` pairs, column-major.
        An empty string gives an empty mask.
    shape : tuple of int
        ``(height, width)`` of the image.

    Returns
    -------
    mask : (H, W) bool ndarray

    Raises
    ------
    ValueError
        Malformed string, or runs outside the image.

    Examples
    --------
    >>> rle_decode("2 3", (2, 2)).astype(int)
    array([[0, 1],
           [1, 1]])
    """
    height, width = _check_shape(shape)
    starts, lengths = _parse_runs(rle, height * width)
    flat = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(flat, starts, 1)
    np.add.at(flat, starts + lengths, -1)
    flat = np.cumsum(flat[:-1]) > 0
    return flat.reshape((height, width), order="F")


def labels_to_rle(labels: np.ndarray) -> list[str]:
    """Encode every object of an instance label image, in increasing label order.

    Parameters
    ----------
    labels : (H, W) integer array
        0 is background; each other value is one object.

    Returns
    -------
    rles : list of str
        One run-length string per distinct non-zero label.

    Examples
    --------
    >>> labels_to_rle(np.array([[1, 0], [2, 2]]))
    ['1 1', '2 1 4 1']
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    flat = np.ravel(labels, order="F")
    order = np.argsort(flat, kind="stable")  # positions of each label, column-major ascending
    values = flat[order]
    bounds = np.flatnonzero(np.diff(values)) + 1
    out = []
    for positions, value in zip(np.split(order, bounds), values[np.r_[0, bounds]] if len(values) else []):
        if value != 0:
            out.append(_encode_positions(positions))
    return out


def _encode_flat(flat: np.ndarray) -> str:
    """RLE string of a 1-D boolean array."""
    return _encode_positions(np.flatnonzero(flat))


def _encode_positions(positions: np.ndarray) -> str:
    """RLE string of ascending 0-based pixel positions."""
    if len(positions) == 0:
        return ""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.r_[0, breaks]]
    ends = positions[np.r_[breaks - 1, len(positions) - 1]] + 1
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def rle_to_labels(
    rles: Sequence[str], shape: tuple[int, int]
) -> tuple[np.ndarray, list[str]]:
    """Build an instance label image from one run-length string per object.

    Object ``k`` (1-based, in the order given) gets label ``k``. Where two
    objects claim a pixel, the earlier one keeps it. Empty strings, and
    objects left with no pixel of their own, get no label, so the labels stay
    consecutive.

    Parameters
    ----------
    rles : sequence of str
        Run-length strings (see :func:`rle_decode`).
    shape : tuple of int
        ``(height, width)`` of the image.

    Returns
    -------
    labels : (H, W) ndarray of uint16 (uint32 past 65535 objects)
    problems : list of str
        One message per string that was malformed, empty or overlapped an
        earlier one, naming its position (``object 3``).

    Examples
    --------
    >>> labels, problems = rle_to_labels(["1 2", "3 1"], (2, 2))
    >>> labels
    array([[1, 2],
           [1, 0]], dtype=uint16)
    >>> problems
    []
    """
    height, width = _check_shape(shape)
    dtype = np.uint16 if len(rles) <= np.iinfo(np.uint16).max else np.uint32
    flat = np.zeros(height * width, dtype=dtype)
    problems: list[str] = []
    next_label = 1
    for k, rle in enumerate(rles, start=1):
        try:
            starts, lengths = _parse_runs(rle, height * width)
        except ValueError as exc:
            problems.append(f"object {k}: {exc}; skipped")
            continue
        if len(starts) == 0:
            problems.append(f"object {k}: empty run-length string; skipped")
            continue
        index = np.concatenate([np.arange(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist())])
        taken = flat[index] != 0
        n_taken = int(taken.sum())
        if n_taken == len(index):
            problems.append(f"object {k}: lies entirely inside earlier objects; skipped")
            continue
        if n_taken:
            problems.append(f"object {k}: overlaps earlier objects on {n_taken} pixels (kept the earlier ones)")
        flat[index[~taken]] = next_label
        next_label += 1
    return flat.reshape((height, width), order="F"), problems


def read_rle_csv(path: str | Path) -> dict[str, list[str]]:
    """Read a Kaggle label CSV (``ImageId,EncodedPixels``) into strings per image.

    Parameters
    ----------
    path : str or Path
        CSV file with a header row holding ``ImageId`` and ``EncodedPixels``
        (other columns are ignored).

    Returns
    -------
    rles : dict
        ``{image_id: [rle, ...]}`` in file order; an image listed only with an
        empty ``EncodedPixels`` maps to an empty list.

    Raises
    ------
    NucleisegError
        The file is missing, unreadable or lacks the two columns.

    Examples
    --------
    >>> rles = read_rle_csv("stage1_train_labels.csv")  # doctest: +SKIP
    >>> rles["00071198d059..."][:1]  # doctest: +SKIP
    ['6908 1 7161 8 ...']
    """
    out: dict[str, list[str]] = {}
    for row in read_csv_rows(path, RLE_COLUMNS, "run-length CSV"):
        if not row["ImageId"]:
            continue
        rles = out.setdefault(row["ImageId"], [])
        if row["EncodedPixels"]:
            rles.append(row["EncodedPixels"])
    return out


def write_rle_csv(path: str | Path, labels: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]) -> None:
    """Write instance label images as a Kaggle label CSV, atomically.

    Parameters
    ----------
    path : str or Path
        Output CSV (``ImageId,EncodedPixels``, one row per object, in label
        order; an image without objects gets one row with an empty encoding).
    labels : mapping or iterable of (image_id, labels)
        Instance label images keyed by image id.

    Examples
    --------
    >>> write_rle_csv("labels.csv", {"img1": np.array([[1, 0], [2, 2]])})  # doctest: +SKIP
    """
    items = labels.items() if isinstance(labels, Mapping) else labels
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(RLE_COLUMNS)
            for image_id, image_labels in items:
                rles = labels_to_rle(np.asarray(image_labels))
                if not rles:
                    writer.writerow((image_id, ""))
                for rle in rles:
                    writer.writerow((image_id, rle))


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"shape must be (height, width), got {shape}")
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    return height, width
