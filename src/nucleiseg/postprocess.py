"""From network probabilities to one label per nucleus.

Marker-controlled watershed, as the 2018 Data Science Bowl winners did: seeds
where the nucleus body is likely and its contour / the touching strip are not
(``p_body * (1 - p_boundary)`` above a threshold), flooded over ``-p_body``
inside the foreground. Touching nuclei then keep separate seeds and are cut
apart along the low-body valley between them. The thresholds are chosen on the
validation split and stored with each model file (``"postprocess"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed


@dataclass
class PostprocessParams:
    """Thresholds for :func:`instances_from_probabilities`.

    Parameters
    ----------
    foreground_threshold : float
        ``p_body`` above which a pixel belongs to some nucleus.
    seed_threshold : float
        ``p_body * (1 - p_boundary)`` above which a pixel seeds a nucleus.
    min_seed_size : int
        Seeds smaller than this many pixels are dropped (noise, not nuclei).
    min_size : int
        Final objects smaller than this many pixels are removed.
    """

    foreground_threshold: float = 0.5
    seed_threshold: float = 0.5
    min_seed_size: int = 10
    min_size: int = 15

    @classmethod
    def from_dict(cls, values: dict | None) -> PostprocessParams:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def at_scale(self, scale: float) -> PostprocessParams:
        """The same thresholds for an image predicted at ``scale`` (sizes are in network pixels).

        A nucleus of ``n`` pixels to the network covers ``n / scale**2`` of the image.

        Examples
        --------
        >>> PostprocessParams(min_seed_size=20, min_size=30).at_scale(0.5).min_size
        120
        """
        if scale == 1.0:
            return self
        return replace(self, min_seed_size=max(1, round(self.min_seed_size / scale**2)),
                       min_size=max(1, round(self.min_size / scale**2)))


def remove_small_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set objects of fewer than ``min_size`` pixels to 0 (in a copy).

    Examples
    --------
    >>> remove_small_labels(np.array([[1, 1, 0, 2]]), 2)
    array([[1, 1, 0, 0]])
    """
    if min_size <= 1 or labels.max(initial=0) == 0:
        return labels
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def relabel(labels: np.ndarray, min_size: int = 1) -> np.ndarray:
    """Labels renumbered 1..N in the order of their values (0 stays 0), as int32.

    What ``skimage.segmentation.relabel_sequential`` gives, from a lookup table
    over ``np.bincount`` instead of sorting the label values: 0.18 s against
    1.0 s on a 4096² image of 40,000 labels (equal outputs). Objects of fewer
    than ``min_size`` pixels become 0 in the same pass (what
    :func:`remove_small_labels` first would give).

    Examples
    --------
    >>> relabel(np.array([[0, 7, 7, 3], [9, 0, 3, 0]]))
    array([[0, 2, 2, 1],
           [3, 0, 1, 0]], dtype=int32)
    >>> relabel(np.array([[0, 7, 7, 3], [9, 0, 3, 0]]), min_size=2)
    array([[0, 2, 2, 1],
           [0, 0, 1, 0]], dtype=int32)
    """
    labels = np.asarray(labels)
    if not labels.size:
        return labels.astype(np.int32)
    present = np.bincount(labels.ravel()) >= max(1, min_size)
    present[0] = False
    lut = np.zeros(len(present), np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return lut[labels]


def boundary_probability(probs: np.ndarray, channels: Sequence[str]) -> np.ndarray | None:
    """The larger of the contour and touch probabilities, or None if neither is predicted."""
    parts = [probs[channels.index(name)] for name in ("contour", "touch") if name in channels]
    if not parts:
        return None
    return np.maximum.reduce(parts) if len(parts) > 1 else parts[0]


def connected_components(body: np.ndarray, threshold: float = 0.5, min_size: int = 15) -> np.ndarray:
    """Baseline instances: each 4-connected blob of ``body > threshold``.

    Touching nuclei stay merged; use :func:`instances_from_probabilities` to
    split them. Returns int32 labels 1..N.
    """
    mask = body > threshold
    labels, _ = ndi.label(mask)
    return relabel(labels, min_size)


# ----------------------------------------------------------------------------- the watershed's steps
# instances_from_probabilities runs them in this order; the threshold search (nucleiseg.tuning) runs the same
# functions, sharing the early steps between the combinations it tries.


def seed_map(body: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """``p_body * (1 - p_boundary)``: high inside a nucleus, low on its contour and where nuclei touch."""
    return body * (1.0 - boundary)


def foreground_regions(body: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The foreground ``body > threshold`` and its 4-connected regions: ``(foreground, regions, count)``."""
    foreground = body > threshold
    regions, count = ndi.label(foreground)
    return foreground, regions, int(count)


def seed_markers(seeds: np.ndarray, foreground: np.ndarray, threshold: float, min_seed_size: int) -> np.ndarray:
    """Markers: 4-connected blobs of ``seeds > threshold`` inside the foreground, of ``min_seed_size`` pixels or more."""
    markers, _ = ndi.label((seeds > threshold) & foreground)
    return remove_small_labels(markers, min_seed_size)


def seed_orphans(markers: np.ndarray, regions: np.ndarray, n_regions: int) -> np.ndarray:
    """Markers plus one seed for each foreground region left without any (small or low-confidence nuclei).

    So that no detected nucleus is lost to the seed threshold. ``regions`` and
    ``n_regions`` are :func:`foreground_regions`'.

    Examples
    --------
    >>> regions = np.array([[1, 1, 0, 2, 2]]); markers = np.array([[0, 1, 0, 0, 0]])
    >>> seed_orphans(markers, regions, 2)
    array([[0, 1, 0, 3, 3]])
    """
    if not n_regions:
        return markers
    seeded = np.zeros(n_regions + 1, bool)
    seeded[regions[markers > 0]] = True
    orphan = ~seeded[regions] & (regions > 0)
    if orphan.any():
        markers = np.where(orphan, regions + int(markers.max()), markers)
    return markers


def flood(body: np.ndarray, markers: np.ndarray, foreground: np.ndarray,
          regions: np.ndarray | None = None, n_regions: int | None = None) -> np.ndarray:
    """The watershed: markers flooded over ``-p_body`` within the foreground (labels not yet filtered by size).

    With the foreground's 4-connected ``regions`` (:func:`foreground_regions`'), only the regions holding
    two markers or more are flooded: the flood fills a region holding one marker with that marker, so the
    others take it whole, and the result is the same (tested; 2.1 against 3.1 ms on 256x256 DSB crops,
    ``benchmarks/finishing_speed.py``). Every marker must lie inside one region, as :func:`seed_markers`' do.

    Examples
    --------
    >>> body = np.array([[0.9, 0.8, 0.0, 0.7, 0.6, 0.7]], np.float32)
    >>> markers = np.array([[1, 0, 0, 2, 0, 3]])
    >>> foreground, regions, n = foreground_regions(body, 0.5)
    >>> flood(body, markers, foreground, regions, n)
    array([[1, 1, 0, 2, 2, 3]])
    """
    if regions is None:
        return watershed(-body, markers, mask=foreground)
    n_regions = int(regions.max(initial=0)) if n_regions is None else n_regions
    seeded = markers > 0
    region_of = np.zeros(int(markers.max(initial=0)) + 1, np.int64)
    region_of[markers[seeded]] = regions[seeded]  # a marker's pixels all lie in one region
    ids = np.flatnonzero(region_of)  # the markers present
    owner = region_of[ids]
    per_region = np.bincount(owner, minlength=n_regions + 1)
    lone = per_region[owner] == 1
    alone = np.zeros(n_regions + 1, markers.dtype)  # a region's only marker, else 0
    alone[owner[lone]] = ids[lone]
    out = alone[regions]
    several = per_region >= 2
    several[0] = False
    if several.any():
        shared = several[regions]
        out[shared] = watershed(-body, markers, mask=shared)[shared]
    return out


def instances_from_probabilities(
    probs: np.ndarray,
    channels: Sequence[str] = ("body", "contour", "touch"),
    params: PostprocessParams | None = None,
) -> np.ndarray:
    """Instance labels from ``(C, H, W)`` probabilities by marker-controlled watershed.

    Parameters
    ----------
    probs : ndarray, shape (C, H, W)
        Per-channel probabilities in [0, 1].
    channels : sequence of str
        Name of each channel; must include ``"body"``. Without ``"contour"`` or
        ``"touch"`` this falls back to :func:`connected_components`.
    params : PostprocessParams, optional
        Thresholds; defaults when omitted.

    Returns
    -------
    labels : ndarray of int32, shape (H, W)
        0 for background, 1..N for nuclei.

    Examples
    --------
    >>> probs = np.zeros((3, 20, 30), np.float32)
    >>> probs[0, 5:15, 3:27] = 1.0          # one blob of body ...
    >>> probs[2, 5:15, 14:16] = 1.0         # ... with a touching strip across it
    >>> int(instances_from_probabilities(probs).max())
    2
    """
    params = params or PostprocessParams()
    channels = list(channels)
    if probs.ndim != 3 or probs.shape[0] != len(channels):
        raise ValueError(f"probs must be (C, H, W) with C = {len(channels)}, got shape {probs.shape}")
    if "body" not in channels:
        raise ValueError(f"channels must include 'body', got {channels}")
    body = probs[channels.index("body")].astype(np.float32)
    boundary = boundary_probability(probs, channels)
    if boundary is None:
        return connected_components(body, params.foreground_threshold, params.min_size)

    foreground, blobs, n_blobs = foreground_regions(body, params.foreground_threshold)
    markers = seed_markers(seed_map(body, boundary), foreground, params.seed_threshold, params.min_seed_size)
    markers = seed_orphans(markers, blobs, n_blobs)
    return relabel(flood(body, markers, foreground, blobs, n_blobs), params.min_size)

# ----------------------------------------------------------------------------- large images
#: Rows per band of :func:`label_nuclei`, and the margin around a band for regions taller than one band:
#: the watershed's temporaries are about 90 bytes a pixel, so an 8000-pixel-wide band needs well under 1 GB.
BAND_ROWS = 512
BAND_MARGIN = 256


def label_nuclei(
    probabilities: np.ndarray,
    channels: Sequence[str] = ("body", "contour", "touch"),
    params: PostprocessParams | None = None,
    band_rows: int = BAND_ROWS,
    margin: int = BAND_MARGIN,
) -> np.ndarray:
    """Instance labels from probabilities, band by band on tall images.

    :func:`~nucleiseg.postprocess.instances_from_probabilities` on a band of
    rows at a time, so that its temporaries (about 90 bytes a pixel) never
    cover the whole image. It treats each connected foreground region
    (``body > foreground_threshold``) on its own, hence:

    - a region at most ``band_rows`` tall is handed whole to the band holding
      its top row (that band's rows extended down to the region's bottom):
      its nuclei are exactly those of the whole-image post-processing;
    - a taller region (a large clump of touching nuclei) is cut: each band
      also looks ``margin`` rows above and below and keeps the region's nuclei
      that start in the band and touch neither cut. A nucleus taller than
      ``margin`` rows in such a clump is dropped, and the borders of nuclei
      near a cut may differ slightly from the whole-image result.

    Images at most 1.5 bands tall are done at once. Labels are numbered
    differently from the whole-image result. (Where the watershed meets
    pixels of exactly equal probability its flooding order, and so the border
    between two touching nuclei, may differ by a pixel; network outputs
    rarely tie.)

    Parameters
    ----------
    probabilities : ndarray, shape (C, H, W)
    channels : sequence of str
        Name of each channel; must include ``"body"``.
    params : PostprocessParams, optional
    band_rows : int
        Rows per band.
    margin : int
        Rows looked at above and below a band that a tall region crosses.

    Returns
    -------
    labels : ndarray of int32, shape (H, W)
        0 for background, 1..N for nuclei.

    Examples
    --------
    >>> probs = np.zeros((3, 40, 10), np.float32)
    >>> probs[0, 5:15, 2:8] = probs[0, 18:35, 2:8] = 1.0
    >>> int(label_nuclei(probs, band_rows=10).max())
    2
    """
    params = params or PostprocessParams()
    channels = list(channels)
    if "body" not in channels:
        raise ValueError(f"channels must include 'body', got {channels}")
    if band_rows < 1 or margin < 0:
        raise ValueError(f"band_rows must be >= 1 and margin >= 0, got {band_rows} and {margin}")
    height = probabilities.shape[1]
    if height <= band_rows + band_rows // 2:
        return instances_from_probabilities(probabilities, channels, params)
    # 8-connected regions: each holds whole 4-connected ones, whatever connectivity the
    # post-processing uses.
    body = probabilities[channels.index("body")]
    regions, n_regions = ndi.label(body > params.foreground_threshold, structure=np.ones((3, 3), bool))
    labels = np.zeros(probabilities.shape[1:], np.int32)
    if not n_regions:
        return labels
    boxes = ndi.find_objects(regions)
    top = np.array([-1] + [box[0].start for box in boxes])  # index 0 (background) is in no band
    bottom = np.array([-1] + [box[0].stop for box in boxes])
    tall = bottom - top > band_rows
    offset = 0
    for r0 in range(0, height, band_rows):
        r1 = min(height, r0 + band_rows)
        own = ~tall & (top >= r0) & (top < r1)  # regions handed whole to this band
        crossing = tall & (top < r1) & (bottom > r0)  # tall regions cut around this band
        if not own.any() and not crossing.any():
            continue
        s0 = max(0, r0 - margin) if crossing.any() else r0
        s1 = min(height, max(r1 + margin if crossing.any() else r1, int(bottom[own].max(initial=0))))
        band = instances_from_probabilities(probabilities[:, s0:s1], channels, params)
        where = regions[s0:s1]
        keep = own[where]
        if crossing.any():
            # nuclei of the tall regions that start in this band and touch neither cut
            spans = ndi.find_objects(band)
            first = np.array([-1] + [b[0].start + s0 if b else -1 for b in spans])
            last = np.array([-1] + [b[0].stop + s0 if b else -1 for b in spans])
            whole = (first >= r0) & (first < r1) & ((first > s0) | (s0 == 0)) & ((last < s1) | (s1 == height))
            keep |= whole[band] & crossing[where]
        band[~keep] = 0
        band = relabel(band)
        count = int(band.max())
        band[band > 0] += offset
        labels[s0:s1][keep] = band[keep]
        offset += count
    return labels
