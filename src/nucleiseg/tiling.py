"""Tiling geometry: where the tiles of a large image lie and how their predictions blend.

Pure NumPy, no deep-learning framework: a user of the exported ONNX model can
cut an image into the same tiles and blend their outputs with the same weights
as :func:`nucleiseg.inference.predict_probabilities` does.

An image larger than ``tile`` pixels on a side is cut into overlapping tiles
whose origins are multiples of ``align`` (``2**depth`` of the network, so every
tile pools on the same grid as the whole image would). Their outputs are
blended with a separable window: inside each overlap a tile's weight is 0 over
the outer 3/8 (the pixels that felt the tile's zero padding most), rises as
``sin**2`` over the middle quarter and is 1 beyond; a tile side lying on the
image border is not down-weighted. Weights are normalised per axis, so the
result is a proper weighted mean of the tiles.

Examples
--------
>>> spans = tile_spans(2000, 1024, 192, 16)
>>> spans
[(0, 800), (592, 1392), (1200, 2000)]
>>> weights = span_weights(2000, spans, 192)
>>> total = np.zeros(2000)
>>> for (start, stop), w in zip(spans, weights):
...     total[start:stop] += w
>>> bool(np.allclose(total, 1))
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TILE", "Tile", "check_tiling", "ramp", "span_weights", "tile_spans", "tiles"]

#: Tile side (pixels) above which images are predicted in tiles. 1024² tiles
#: keep the overlap overhead small while one tile of the default network needs
#: about 1.2 GB of activations (fp32).
DEFAULT_TILE = 1024

#: Overlap (pixels) between neighbouring tiles. The default network (depth 4)
#: has a 200-pixel receptive field (100 px each side: 13 3x3 convolutions and
#: 4 poolings on its deepest path), so a tile's zero padding changes its output
#: up to 100 px inside; measured on an early checkpoint, by ~5e-2 at 32 px,
#: ~1e-2 at 64 px, ~4e-4 at 80 px and nil from 96 px. The window ignores the
#: outer 3/8 of each overlap (72 px of 192) and blends over the next 48 px, so
#: every pixel comes from tiles whose edge is >= 72 px away. On a 2048² DSB
#: mosaic (docs/benchmarks.md, "Prediction") tiled and untiled probabilities
#: then agreed to 1.7e-4 (8e-4 with 512-px tiles), where an overlap of 128 gave
#: 7e-2 with the same (epoch-9) checkpoint. Cost: about (1024 / 832)² = 1.51x the pixels at most, as
#: :func:`tile_spans` shortens the tiles to what an axis needs (8000²: 1.49x; 2048²: 1.43x, where full
#: 1024-pixel tiles predicted 2.25x). With those shorter tiles the shipped model's probabilities on a 2048²
#: DSB mosaic (3 x 3 tiles of 816) agreed with the untiled image's to 3.9e-4, and the labels scored DSB
#: 1.0000 against the untiled ones (fp32; ``benchmarks/tiling_memory.py seams --tile 1024 --overlap 192``).
DEFAULT_OVERLAP = 192


def check_tiling(tile: int | None, overlap: int, align: int = 16) -> tuple[int | None, int]:
    """Validate a tile side and overlap for a network whose pooling grid is ``align`` pixels.

    Parameters
    ----------
    tile : int or None
        Tile side in pixels, a multiple of ``align``; None: never tile.
    overlap : int
        Overlap of neighbouring tiles, ``0 <= overlap <= tile / 2``.
    align : int
        The network's pooling grid, ``2**depth``.

    Returns
    -------
    tile, overlap : int or None, int

    Raises
    ------
    ValueError
        In words that name ``tile`` or ``overlap`` and say what would do.

    Examples
    --------
    >>> check_tiling(512, 128)
    (512, 128)
    >>> check_tiling(100, 32)
    Traceback (most recent call last):
    ...
    ValueError: tile must be a multiple of 16 pixels (the network's pooling grid), got 100: 96 or 112 would do
    """
    overlap = int(overlap)
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0 pixels, got {overlap}")
    if tile is None:
        return None, overlap
    tile = int(tile)
    if tile < 2 * align:
        raise ValueError(f"tile must be at least {2 * align} pixels, got {tile}")
    if tile % align:
        below = tile // align * align
        raise ValueError(f"tile must be a multiple of {align} pixels (the network's pooling grid), got {tile}: "
                         f"{below} or {below + align} would do")
    if 2 * overlap > tile:
        raise ValueError(f"overlap must be at most half the tile ({tile // 2} pixels), got {overlap}")
    return tile, overlap


def tile_spans(n: int, tile: int | None, overlap: int, align: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the tiles along an axis of ``n`` pixels.

    As few tiles as ``tile``-pixel tiles overlapping by ``overlap`` need, each
    then made as short as covering the axis allows and spread evenly: starts
    are multiples of ``align``, neighbours overlap by at least ``overlap``,
    and the last tile ends at ``n`` (up to ``align - 1`` pixels longer than
    the others, so it starts on the grid). Fixed ``tile``-pixel tiles would
    predict far more pixels than the image holds where the axis is just
    longer than a whole number of strides: a 2048-pixel axis as 3 tiles of
    1024 (1.5x its pixels) instead of 3 of 816 (1.2x).

    Examples
    --------
    >>> tile_spans(300, 128, 32, 16)
    [(0, 128), (80, 208), (160, 300)]
    >>> tile_spans(2048, 1024, 192, 16)
    [(0, 816), (608, 1424), (1232, 2048)]
    >>> tile_spans(100, 128, 32, 16), tile_spans(100, None, 0, 16)
    ([(0, 100)], [(0, 100)])
    """
    if tile is None or n <= tile:
        return [(0, n)]
    stride = max(align, (tile - overlap) // align * align)
    # tiles of the full side at the full stride reach the end (the last may be up to align - 1 longer)
    count = -(-max(0, n - tile - align + 1) // stride) + 1
    if count == 1:
        return [(0, n)]
    shortest = -(-(n + (count - 1) * overlap) // (count * align)) * align
    for side in range(shortest, tile + 1, align):
        last = (n - side) // align * align
        starts = [k * last // (count - 1) // align * align for k in range(count - 1)] + [last]
        spans = [(start, start + side) for start in starts[:-1]] + [(last, n)]
        if all(s0 < s1 and e0 - s1 >= overlap for (s0, e0), (s1, _) in zip(spans, spans[1:])):
            return spans
    starts = list(range(0, n - tile, stride))  # not reached for sensible sizes: full tiles at the full stride
    last = (n - tile) // align * align
    if starts[-1] == last:
        starts.pop()
    return [(s, s + tile) for s in starts] + [(last, n)]


def ramp(overlap: int) -> np.ndarray:
    """Weights rising over an overlap: 0 over the outer 3/8, sin² over the middle quarter, 1 after.

    The dead margin drops the pixels nearest a tile's edge, which its zero
    padding disturbed most (see :data:`DEFAULT_OVERLAP`); a short ramp beats a
    long one because that disturbance falls off steeply with the distance.
    ``ramp[t] + ramp[overlap - 1 - t] == 1``, so two tiles meeting at exactly
    ``overlap`` already sum to one.

    Examples
    --------
    >>> r = ramp(16)
    >>> float(r[0]), float(r[-1]), bool(np.allclose(r + r[::-1], 1))
    (0.0, 1.0, True)
    """
    margin = 3 * overlap // 8
    t = (np.arange(overlap) + 0.5 - margin) / max(overlap - 2 * margin, 1)
    return np.sin(np.pi / 2 * np.clip(t, 0.0, 1.0)) ** 2


def span_weights(n: int, spans: Sequence[tuple[int, int]], overlap: int) -> list[np.ndarray]:
    """1-D blending weight of each span (float32), normalised so that they sum to 1 at every pixel."""
    rising = ramp(overlap)
    weights = []
    total = np.zeros(n, np.float64)
    for start, stop in spans:
        w = np.ones(stop - start)
        if start > 0 and overlap:
            w[:overlap] = rising
        if stop < n and overlap:
            w[-overlap:] = np.minimum(w[-overlap:], rising[::-1])
        weights.append(w)
        total[start:stop] += w
    if total.min() <= 0:
        raise ValueError("tile layout leaves pixels without weight")
    return [(w / total[start:stop]).astype(np.float32) for w, (start, stop) in zip(weights, spans)]


@dataclass(frozen=True)
class Tile:
    """One tile of an image: its rows and columns, and its blending weight ``(rows, cols)`` float32."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    row_weight: np.ndarray
    col_weight: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(*self.rows), slice(*self.cols)

    def weight(self) -> np.ndarray:
        """The 2-D blending weight of this tile (the outer product of its row and column weights)."""
        return np.outer(self.row_weight, self.col_weight)


def tiles(shape: tuple[int, int], tile: int | None, overlap: int, align: int) -> list[Tile]:
    """The tiles covering an image of ``shape``, sorted so that tiles of equal shape are neighbours.

    Sorting by shape lets a caller batch equal tiles together: there are at
    most four shapes (interior, last row, last column, corner).

    Examples
    --------
    >>> layout = tiles((300, 200), 128, 32, 16)
    >>> len(layout), sorted({t.shape for t in layout})
    (6, [(128, 128), (128, 136), (140, 128), (140, 136)])
    >>> total = np.zeros((300, 200), np.float32)
    >>> for t in layout:
    ...     total[t.slices] += t.weight()
    >>> bool(np.allclose(total, 1))
    True
    """
    height, width = shape
    rows, cols = tile_spans(height, tile, overlap, align), tile_spans(width, tile, overlap, align)
    row_w, col_w = span_weights(height, rows, overlap), span_weights(width, cols, overlap)
    out = [Tile(rows[r], cols[c], row_w[r], col_w[c]) for r in range(len(rows)) for c in range(len(cols))]
    out.sort(key=lambda t: t.shape)
    return out


def iter_batches(layout: Sequence[Tile], batch_size: int) -> Iterator[list[Tile]]:
    """Consecutive tiles of equal shape, at most ``batch_size`` at a time.

    Examples
    --------
    >>> [len(b) for b in iter_batches(tiles((300, 200), 128, 32, 16), 2)]
    [2, 2, 1, 1]
    """
    batch: list[Tile] = []
    for t in layout:
        if batch and (len(batch) == batch_size or batch[0].shape != t.shape):
            yield batch
            batch = []
        batch.append(t)
    if batch:
        yield batch
