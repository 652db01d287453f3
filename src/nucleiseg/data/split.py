"""Stratified, seeded, group-aware train/validation split.

Images that are tiles of one larger picture (a *mosaic group*) share
nuclei at their borders and look alike; putting some on each side of a split
makes validation scores optimistic. :func:`split_train_val` therefore moves
whole groups, and does so per image kind so that each kind is represented in
validation at about the requested fraction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import read_csv_rows

__all__ = ["GROUP_COLUMNS", "read_groups", "split_train_val"]

GROUP_COLUMNS = ("ImageId", "mosaic_group")
TRAIN, VAL = "train", "val"


def split_train_val(
    kinds: Sequence[str],
    groups: Sequence[str | None],
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    fixed: Sequence[str | None] | None = None,
) -> np.ndarray:
    """Assign each image to ``"train"`` or ``"val"``.

    Parameters
    ----------
    kinds : sequence of str
        Stratum of each image (e.g. its kind); each stratum gets about
        ``val_fraction`` of its images in validation.
    groups : sequence of str or None
        Group of each image; images of one group always land on the same
        side. ``None`` or ``""`` means the image stands alone.
    val_fraction : float, optional
        Target share of validation images per stratum, in [0, 1).
    seed : int, optional
        Seed of the random choice of groups; the same inputs and seed give
        the same split.
    fixed : sequence of str or None, optional
        Earlier assignments to keep (``"train"``, ``"val"``, or None/``""``
        for an image to assign). A new image whose group already has a side
        joins that side.

    Returns
    -------
    split : ndarray of str
        ``"train"`` or ``"val"`` per image.

    Notes
    -----
    A group is counted in the stratum most of its images belong to. Within a
    stratum, free groups are taken in a seeded random order and each goes to
    validation when that brings the validation count closer to the target.
    A stratum with at least two groups and ``val_fraction > 0`` always gets
    at least one validation group, and never loses its last training group.

    Examples
    --------
    >>> kinds = ["fluo"] * 6 + ["tissue"] * 2
    >>> groups = ["a", "a", "b", "b", None, None, None, None]
    >>> split = split_train_val(kinds, groups, val_fraction=0.25, seed=1)
    >>> bool(split[0] == split[1] and split[2] == split[3])
    True
    >>> int((split[6:] == "val").sum())  # two tissue images: one of them validates
    1
    """
    n = len(kinds)
    if len(groups) != n:
        raise ValueError(f"kinds and groups differ in length ({n} vs {len(groups)})")
    if fixed is not None and len(fixed) != n:
        raise ValueError(f"kinds and fixed differ in length ({n} vs {len(fixed)})")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    fixed = [None] * n if fixed is None else [f if f in (TRAIN, VAL) else None for f in fixed]

    # units: one per group, one per standalone image
    unit_of = [f"g:{g}" if g not in (None, "") and g == g else f"i:{i}" for i, g in enumerate(groups)]
    members: dict[str, list[int]] = {}
    for i, unit in enumerate(unit_of):
        members.setdefault(unit, []).append(i)

    split = np.array([TRAIN] * n, dtype=object)
    unit_side: dict[str, str | None] = {}
    unit_kind: dict[str, str] = {}
    for unit, idx in members.items():
        counts = Counter(kinds[i] for i in idx)
        unit_kind[unit] = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0]
        sides = Counter(fixed[i] for i in idx if fixed[i] is not None)
        unit_side[unit] = None if not sides else (VAL if sides[VAL] > sides[TRAIN] else TRAIN)

    rng = np.random.default_rng(seed)
    for kind in sorted(set(unit_kind.values()), key=str):
        units = sorted(u for u in members if unit_kind[u] == kind)
        total = sum(len(members[u]) for u in units)
        target = float(val_fraction) * total
        val_count = sum(len(members[u]) for u in units if unit_side[u] == VAL)
        train_units = sum(1 for u in units if unit_side[u] == TRAIN)
        free = [units[j] for j in rng.permutation(len(units)) if unit_side[units[j]] is None]
        for pos, unit in enumerate(free):
            size = len(members[unit])
            others_to_train = train_units + len(free) - pos - 1
            closer = abs(val_count + size - target) < abs(val_count - target)
            if closer and others_to_train > 0:
                unit_side[unit] = VAL
                val_count += size
            else:
                unit_side[unit] = TRAIN
                train_units += 1
        if val_fraction > 0 and val_count == 0 and len(units) >= 2:
            # nothing validates yet: move the free group closest to the target size, if train keeps one
            movable = [u for u in free if unit_side[u] == TRAIN]
            if movable and train_units >= 2:
                best = min(movable, key=lambda u: (abs(len(members[u]) - target), u))
                unit_side[best] = VAL

    for unit, idx in members.items():
        for i in idx:
            split[i] = fixed[i] if fixed[i] is not None else unit_side[unit]
    return split.astype(str)


def read_groups(path: str | Path) -> dict[str, str]:
    """Read a group CSV (``ImageId,mosaic_group``) into ``{image_id: group}``.

    Rows with an empty group (images standing alone) are left out.

    Parameters
    ----------
    path : str or Path
        CSV file with a header holding ``ImageId`` and ``mosaic_group``.

    Raises
    ------
    NucleisegError
        The file is missing, unreadable or lacks the columns.

    Examples
    --------
    >>> groups = read_groups("mosaic_groups.csv")  # doctest: +SKIP
    >>> groups["00071198d059..."]  # doctest: +SKIP
    'mosaic013'
    """
    out: dict[str, str] = {}
    for row in read_csv_rows(path, GROUP_COLUMNS, "group CSV"):
        if row["ImageId"] and row["mosaic_group"]:
            out[row["ImageId"]] = row["mosaic_group"]
    return out
