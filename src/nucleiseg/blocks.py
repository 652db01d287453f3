"""Cutting a huge image into overlapping blocks, and deciding which block keeps which nucleus.

An image too large for one machine's memory is segmented block by block
(:mod:`nucleiseg.distributed` runs the blocks on a Dask cluster). Each block
has a *core*, the pixels it writes (the cores tile the image without overlap),
and an *outer* region, the core grown by ``overlap`` pixels on every side
(clipped to the image), which it reads and segments. Torch-free, pure NumPy.

Stitching: each nucleus is kept by the one block that sees it whole
------------------------------------------------------------------------
Two designs are in use. Cellpose's distributed segmentation keeps each block's
labels inside its core, then links the labels that touch across block *faces*
(a graph of touching labels, merged by connected components) and relabels the
whole image in a second pass; a nucleus cut by a face is glued back from two
halves segmented apart. StarDist's ``predict_instances_big`` instead keeps an
object only in the one block that sees it whole, with an overlap wider than
the largest object, so no object is ever cut and nothing is merged. This
module follows StarDist, for three reasons: the post-processing
(:func:`nucleiseg.postprocess.instances_from_probabilities`) treats each
connected foreground region on its own, so a block that sees a region whole,
with exact probabilities around it, labels it exactly as the whole image
would -- the result is the single-machine result, not an approximation of it;
no second pass rewrites the label image (a block's core is written once); and
every nucleus is whole in one block, so its measurements and outline are
computed there and streamed out, never needing the whole label image.

The rules, for a block whose outer region is cut (not at the image border) on
some sides:

- *trusted zone*: the outer region less ``reach`` pixels along each cut side
  (at least 1), where the probabilities equal the whole image's (``reach`` is
  the network's receptive field: what a cut changes);
- a foreground region is *whole* when it lies in the trusted zone;
- a nucleus is given a global label from the position of its first pixel in
  raster order (row by row): ``1 + row * width + col``. Any block that sees the
  nucleus whole computes the same label, with no communication; labels are
  unique but not consecutive;
- a block *owns* (measures, outlines) the nuclei whose first pixel is in its
  core, and *paints* into its core the pixels of every nucleus there.

With ``overlap >= reach + L``, where ``L`` is the largest region's extent, every
region that reaches into a core is whole in that block, so every nucleus is
painted and owned exactly once, and whole. Larger regions are still painted
and owned by the same rules, from a view that may differ at a cut: they are
counted (``Settled.uncertain``) so that the caller can warn.

Examples
--------
>>> blocks = cover((5000, 3000), block=2048, overlap=320)
>>> len(blocks), blocks[-1].core, blocks[-1].outer
(6, (slice(4096, 5000, None), slice(2048, 3000, None)), (slice(3776, 5000, None), slice(1728, 3000, None)))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Block", "Settled", "check_block", "cover", "label_dtype", "raster_ids", "settle"]


@dataclass(frozen=True)
class Block:
    """One block of an image: the core it writes and the outer region it reads.

    Attributes
    ----------
    index : (int, int)
        Row and column in the grid of blocks.
    core, outer : (slice, slice)
        Rows and columns in image pixels; ``outer`` holds ``core``.
    shape : (int, int)
        The image's height and width.
    """

    index: tuple[int, int]
    core: tuple[slice, slice]
    outer: tuple[slice, slice]
    shape: tuple[int, int]

    @property
    def name(self) -> str:
        """``"<row>_<col>"``, for file names."""
        return f"{self.index[0]}_{self.index[1]}"

    @property
    def origin(self) -> tuple[int, int]:
        """Image coordinates of the outer region's first pixel."""
        return self.outer[0].start, self.outer[1].start

    @property
    def inner(self) -> tuple[slice, slice]:
        """The core, in the outer region's coordinates."""
        return tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(self.core, self.outer))

    @property
    def outer_shape(self) -> tuple[int, int]:
        return tuple(o.stop - o.start for o in self.outer)

    def trusted(self, reach: int) -> tuple[slice, slice]:
        """The trusted zone in the outer region's coordinates: ``max(reach, 1)`` pixels less along each cut side."""
        margin = max(int(reach), 1)
        zone = []
        for o, n in zip(self.outer, self.shape):
            start = margin if o.start > 0 else 0
            stop = (o.stop - o.start) - (margin if o.stop < n else 0)
            zone.append(slice(start, stop))
        return tuple(zone)


def check_block(block: int, align: int = 16) -> int:
    """Validate a block's core side for a network whose pooling grid is ``align`` pixels.

    Raises
    ------
    ValueError
        In words that name ``block`` and say what would do.

    Examples
    --------
    >>> check_block(2048)
    2048
    >>> check_block(2050)
    Traceback (most recent call last):
    ...
    ValueError: block must be a multiple of 16 pixels (the network's grid), at least 32, got 2050: 2048 or 2064 would do
    """
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 2 * align or block % align:
        near = ""
        if isinstance(block, (int, np.integer)) and not isinstance(block, bool) and block >= 2 * align:
            low = block // align * align
            near = f": {low} or {low + align} would do"
        raise ValueError(f"block must be a multiple of {align} pixels (the network's grid), at least {2 * align}, "
                         f"got {block!r}{near}")
    return int(block)


def cover(shape: tuple[int, int], block: int, overlap: int, align: int = 1) -> list[Block]:
    """The blocks of an image, in raster order of their cores.

    Parameters
    ----------
    shape : (int, int)
        Image height and width.
    block : int
        Core side in pixels (the last row and column of blocks may be smaller).
    overlap : int
        Pixels the outer region adds on each side of the core.
    align : int
        ``block`` and ``overlap`` must be multiples of it, so that every outer
        region starts on the same grid of ``align`` pixels as the image (a
        network that pools ``2**depth`` times then sees the same grid).

    Raises
    ------
    ValueError
        A size that is not positive, or not a multiple of ``align``.

    Examples
    --------
    >>> [b.outer for b in cover((10, 4), block=6, overlap=2)]
    [(slice(0, 8, None), slice(0, 4, None)), (slice(4, 10, None), slice(0, 4, None))]
    """
    height, width = (int(n) for n in shape)
    block, overlap, align = int(block), int(overlap), int(align)
    if height < 1 or width < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    if block < 1 or overlap < 0 or align < 1:
        raise ValueError(f"block must be >= 1 and overlap >= 0, got {block} and {overlap}")
    if block % align or overlap % align:
        raise ValueError(f"block ({block}) and overlap ({overlap}) must be multiples of {align}")
    blocks = []
    for i, r0 in enumerate(range(0, height, block)):
        for j, c0 in enumerate(range(0, width, block)):
            core = (slice(r0, min(height, r0 + block)), slice(c0, min(width, c0 + block)))
            outer = tuple(slice(max(0, s.start - overlap), min(n, s.stop + overlap)) for s, n in zip(core, (height, width)))
            blocks.append(Block((i, j), core, outer, (height, width)))
    return blocks


def label_dtype(shape: tuple[int, int]) -> np.dtype:
    """The smallest unsigned dtype holding every :func:`raster_ids` label of an image: uint32, else uint64.

    Examples
    --------
    >>> label_dtype((4096, 4096)), label_dtype((100_000, 100_000))
    (dtype('uint32'), dtype('uint64'))
    """
    return np.dtype(np.uint32 if int(shape[0]) * int(shape[1]) < np.iinfo(np.uint32).max else np.uint64)


def raster_ids(labels: np.ndarray, origin: tuple[int, int] = (0, 0), width: int | None = None) -> np.ndarray:
    """A lookup table from each label to ``1 + row * width + col`` of its first pixel in raster order.

    Parameters
    ----------
    labels : ndarray, shape (H, W), non-negative integers
        Instance labels of an image or of a region of it.
    origin : (int, int)
        Image coordinates of ``labels[0, 0]``.
    width : int, optional
        The image's width (default: that of ``labels``).

    Returns
    -------
    lut : ndarray of uint64, shape (labels.max() + 1,)
        ``lut[labels]`` relabels the image; 0 stays 0, absent labels map to 0.
        Applied to a whole image it gives the labels a blockwise run writes.

    Examples
    --------
    >>> labels = np.array([[0, 2, 2], [1, 1, 0]])
    >>> raster_ids(labels)[labels].tolist()
    [[0, 2, 2], [4, 4, 0]]
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    width = labels.shape[1] if width is None else int(width)
    flat = labels.ravel()
    lut = np.zeros(int(flat.max(initial=0)) + 1, np.uint64)
    where = np.flatnonzero(flat)
    if where.size:
        values, first = np.unique(flat[where], return_index=True)  # first occurrence = first pixel in raster order
        rows, cols = np.divmod(where[first], labels.shape[1])
        lut[values] = (rows + origin[0]).astype(np.uint64) * np.uint64(width) + (cols + origin[1]).astype(np.uint64) + 1
    return lut


@dataclass
class Settled:
    """What one block keeps of its segmentation (see :func:`settle`).

    Attributes
    ----------
    core : ndarray, shape of the block's core
        Global labels (:func:`raster_ids`) of every nucleus pixel in the core,
        in :func:`label_dtype` of the image: what the block writes.
    owned : ndarray of int
        The local labels (of the block's segmentation) of the nuclei it owns.
    ids : ndarray of uint64
        Their global labels, in the same order.
    uncertain : int
        Nuclei painted or owned here whose foreground region is not whole in
        the block's trusted zone: larger than the overlap allows, they may
        differ from the whole-image result at a block border.
    """

    core: np.ndarray
    owned: np.ndarray
    ids: np.ndarray
    uncertain: int


def settle(labels: np.ndarray, block: Block, reach: int = 0, foreground: np.ndarray | None = None) -> Settled:
    """Global labels for a block's core and the nuclei the block owns.

    Parameters
    ----------
    labels : ndarray, shape ``block.outer_shape``, non-negative integers
        The instance labels found in the block's outer region.
    block : Block
    reach : int
        Pixels along a cut side of the outer region whose labels cannot be
        trusted (the network's receptive field; 0 for exact inputs).
    foreground : ndarray of bool, optional
        The mask the labels were split from (``p_body > threshold``): the units
        the post-processing treats independently. Default: ``labels > 0``.

    Returns
    -------
    Settled

    Examples
    --------
    A nucleus across the border of two blocks of a 1 x 8 image is owned by the
    block holding its first pixel, and painted by both:

    >>> image = np.array([[0, 0, 1, 1, 1, 1, 0, 0]])
    >>> left, right = cover(image.shape, block=4, overlap=4)
    >>> a, b = settle(image[left.outer], left), settle(image[right.outer], right)
    >>> a.core.tolist(), b.core.tolist(), a.ids.tolist(), b.ids.tolist()
    ([[0, 0, 3, 3]], [[3, 3, 0, 0]], [3], [])
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.shape != block.outer_shape:
        raise ValueError(f"labels of shape {labels.shape} for a block whose outer region is {block.outer_shape}")
    lut = raster_ids(labels, block.origin, block.shape[1])
    present = np.flatnonzero(lut)
    if foreground is None:
        foreground = labels > 0
    regions, _ = ndi.label(foreground, structure=np.ones((3, 3), bool))
    zone = block.trusted(reach)

    def inside(boxes: list, zone: tuple[slice, slice]) -> np.ndarray:
        ok = np.zeros(len(boxes) + 1, bool)
        for k, box in enumerate(boxes, start=1):
            ok[k] = box is not None and all(b.start >= z.start and b.stop <= z.stop for b, z in zip(box, zone))
        return ok

    region_whole = inside(ndi.find_objects(regions), zone)
    # first pixel of each label, in the outer region's coordinates (from its global label)
    first = lut[present] - np.uint64(1)
    rows = (first // np.uint64(block.shape[1])).astype(np.int64) - block.origin[0]
    cols = (first % np.uint64(block.shape[1])).astype(np.int64) - block.origin[1]
    whole = region_whole[regions[rows, cols]]
    inner = block.inner
    in_core = (rows >= inner[0].start) & (rows < inner[0].stop) & (cols >= inner[1].start) & (cols < inner[1].stop)
    core_labels = labels[inner]
    painted = np.zeros(lut.size, bool)
    painted[np.unique(core_labels)] = True
    painted[0] = False
    uncertain = int(np.count_nonzero((painted[present] | in_core) & ~whole))
    dtype = label_dtype(block.shape)
    return Settled(
        core=lut.astype(dtype)[core_labels],
        owned=present[in_core],
        ids=lut[present[in_core]],
        uncertain=uncertain,
    )
