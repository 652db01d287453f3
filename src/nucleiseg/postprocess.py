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
from skimage.segmentation import relabel_sequential, watershed


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
    labels = remove_small_labels(labels, min_size)
    return relabel_sequential(labels)[0].astype(np.int32)


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

    foreground = body > params.foreground_threshold
    seeds = (body * (1.0 - boundary) > params.seed_threshold) & foreground
    markers, _ = ndi.label(seeds)
    markers = remove_small_labels(markers, params.min_seed_size)
    # Foreground blobs left without any seed (small or low-confidence nuclei) keep one seed each,
    # so no detected nucleus is lost to the seed threshold.
    blobs, n_blobs = ndi.label(foreground)
    if n_blobs:
        seeded = np.zeros(n_blobs + 1, bool)
        seeded[np.unique(blobs[markers > 0])] = True
        orphan = ~seeded[blobs] & (blobs > 0)
        if orphan.any():
            offset = int(markers.max())
            markers = np.where(orphan, blobs + offset, markers)
    labels = watershed(-body, markers, mask=foreground)
    labels = remove_small_labels(labels, params.min_size)
    return relabel_sequential(labels)[0].astype(np.int32)
