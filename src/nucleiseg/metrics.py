"""Segmentation scores: pixel precision/recall/F1/IoU/ROC AUC and the DSB 2018 instance score.

Plain functions on NumPy arrays. Inputs are checked at the edge: arrays of
different shapes, label images that are not integers, probabilities outside
[0, 1] raise :class:`ValueError` saying what was expected.

Pixel scores
    :func:`confusion_counts`, :func:`precision`, :func:`recall`,
    :func:`f1_score` (= :func:`dice`), :func:`iou_score`, :func:`roc_auc`,
    :func:`pixel_scores`, and :class:`PixelScoreAccumulator` for a whole
    validation set.

Instance scores
    :func:`instance_scores` (the Kaggle Data Science Bowl 2018 score with its
    per-threshold counts), :func:`dsb_score`, :func:`summarize_instance_scores`
    (dataset level), :func:`overlap_pairs` and :func:`iou_matrix`.

Conventions
-----------
*Masks*: any array; non-zero is foreground. Floating-point masks must hold only
0 and 1 (a float array with other values is almost always probabilities that
were not thresholded).

*Zero denominators* in precision, recall, F1 and IoU: the score is 1.0 when
truth and prediction are both empty (nothing to find and nothing found) and 0.0
otherwise. The instance score uses the same rule, so an empty prediction on an
empty image is never penalised and a non-empty one always is.

*ROC AUC* is NaN when the truth holds a single class (all foreground or all
background): the AUC is undefined there, and NaN is skipped by ``np.nanmean``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "AUC_BINS",
    "DSB_THRESHOLDS",
    "InstanceScores",
    "Overlaps",
    "PixelScoreAccumulator",
    "confusion_counts",
    "dice",
    "dsb_score",
    "f1_score",
    "instance_scores",
    "iou_matrix",
    "iou_score",
    "overlap_pairs",
    "pixel_scores",
    "precision",
    "recall",
    "roc_auc",
    "summarize_instance_scores",
]

#: IoU thresholds of the Kaggle Data Science Bowl 2018 score: 0.50, 0.55, ..., 0.95.
#: Written as literals (not ``np.arange``) so that each is the double nearest the
#: decimal value: an IoU of exactly 3/4 then compares equal to 0.75 and is *not* > 0.75.
DSB_THRESHOLDS: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)

#: Default resolution of the histogram ROC AUC: probabilities are rounded to
#: multiples of ``1 / AUC_BINS``.
AUC_BINS: int = 100_000

# Pixels processed at once by the histogram AUC; bounds temporary memory (~100 MB).
_CHUNK = 1 << 22


# --------------------------------------------------------------------------- validation


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}"
        )
    if a.size == 0:
        raise ValueError(f"{name_a} and {name_b} are empty arrays (shape {a.shape}); expected pixels")


def _as_mask(mask, name: str) -> np.ndarray:
    """Boolean view of a mask; non-zero is foreground, floats must be 0/1."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask != 0
    if np.issubdtype(mask.dtype, np.floating):
        out = mask != 0
        if not np.all(mask[out] == 1):
            raise ValueError(
                f"{name} must be a binary mask (bool, integers, or floats equal to 0 or 1); "
                "got other floating-point values -- threshold probabilities first"
            )
        return out
    raise ValueError(f"{name} must be a binary mask (bool or numeric), got dtype {mask.dtype}")


def _as_prob(prob, name: str = "prob") -> np.ndarray:
    prob = np.asarray(prob)
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(
            f"{name} must be floating-point probabilities in [0, 1], got dtype {prob.dtype}"
        )
    if prob.size:
        lo, hi = np.min(prob), np.max(prob)  # NaN propagates into both
        if not (lo >= 0 and hi <= 1):
            raise ValueError(
                f"{name} must hold probabilities in [0, 1] without NaN, got values in [{lo}, {hi}]"
            )
    return prob


def _as_labels(labels, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer label image (0 = background), got dtype {labels.dtype}"
        )
    if labels.ndim < 1:
        raise ValueError(f"{name} must be an array of labels, got a scalar")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise ValueError(f"{name} must hold non-negative labels, found {labels.min()}")
    return labels


def _ratio(num: float, den: float, both_empty: bool) -> float:
    """num / den, with the module's zero-denominator rule."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


# --------------------------------------------------------------------------- pixel scores


def confusion_counts(truth_mask, pred_mask) -> tuple[int, int, int, int]:
    """Pixel counts of true/false positives and negatives.

    Parameters
    ----------
    truth_mask, pred_mask : array_like
        Binary masks of the same shape; non-zero is foreground.

    Returns
    -------
    tp, fp, fn, tn : int

    Examples
    --------
    >>> confusion_counts([1, 1, 0, 0], [1, 0, 1, 0])
    (1, 1, 1, 1)
    """
    t = _as_mask(truth_mask, "truth_mask")
    p = _as_mask(pred_mask, "pred_mask")
    _check_same_shape(t, p, "truth_mask", "pred_mask")
    n_t = int(np.count_nonzero(t))
    n_p = int(np.count_nonzero(p))
    tp = int(np.count_nonzero(t & p))
    fp, fn = n_p - tp, n_t - tp
    return tp, fp, fn, int(t.size) - tp - fp - fn


def _scores_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    both_empty = tp + fp + fn == 0
    return {
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
    }


def precision(truth_mask, pred_mask) -> float:
    """Pixel precision TP / (TP + FP).

    With no predicted foreground the result is 1.0 if the truth is empty too,
    else 0.0 (see the module notes).

    Examples
    --------
    >>> precision([1, 1, 0, 0], [1, 1, 1, 0])
    0.6666666666666666
    """
    return _scores_from_counts(*confusion_counts(truth_mask, pred_mask)[:3])["precision"]


def recall(truth_mask, pred_mask) -> float:
    """Pixel recall (sensitivity) TP / (TP + FN); 1.0 if both masks are empty.

    Examples
    --------
    >>> recall([1, 1, 0, 0], [1, 0, 0, 0])
    0.5
    """
    return _scores_from_counts(*confusion_counts(truth_mask, pred_mask)[:3])["recall"]


def f1_score(truth_mask, pred_mask) -> float:
    """Pixel F1 score, identical to the Dice coefficient: 2 TP / (2 TP + FP + FN).

    1.0 if both masks are empty, 0.0 if exactly one is.

    Examples
    --------
    >>> f1_score([1, 1, 0, 0], [1, 0, 1, 0])
    0.5
    """
    return _scores_from_counts(*confusion_counts(truth_mask, pred_mask)[:3])["f1"]


dice = f1_score


def iou_score(truth_mask, pred_mask) -> float:
    """Pixel intersection over union (Jaccard index) TP / (TP + FP + FN).

    1.0 if both masks are empty, 0.0 if exactly one is.

    Examples
    --------
    >>> iou_score([1, 1, 0, 0], [1, 0, 1, 0])
    0.3333333333333333
    """
    return _scores_from_counts(*confusion_counts(truth_mask, pred_mask)[:3])["iou"]


def _auc_histograms(truth: np.ndarray, prob: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of negative and positive pixels per quantised probability level 0..bins."""
    t = truth.ravel()
    p = prob.ravel()
    levels = bins + 1
    hist = np.zeros(2 * levels, dtype=np.int64)
    for start in range(0, p.size, _CHUNK):
        q = np.rint(p[start : start + _CHUNK].astype(np.float64) * bins).astype(np.int64)
        code = 2 * q + t[start : start + _CHUNK]
        hist += np.bincount(code, minlength=2 * levels)
    return hist[0::2], hist[1::2]


def _auc_from_histograms(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney AUC from per-level counts; ties within a level count one half."""
    n_neg = int(neg.sum())
    n_pos = int(pos.sum())
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives at strictly lower levels
    # float64 sums: exact while the products stay below 2**53 (~9e15 pixel pairs).
    wins = np.dot(pos.astype(np.float64), neg_below + 0.5 * neg)
    return float(wins / (float(n_pos) * float(n_neg)))


def _auc_exact(truth: np.ndarray, prob: np.ndarray) -> float:
    t = truth.ravel()
    n_pos = int(np.count_nonzero(t))
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mid-ranks of tied values: rank = (number below) + (ties + 1) / 2, 1-based.
    _, inverse, counts = np.unique(prob.ravel(), return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts
    midrank = below + (counts + 1) / 2.0
    rank_sum = float(np.sum(midrank[inverse.ravel()][t]))
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (float(n_pos) * float(n_neg))


def roc_auc(
    truth_mask, prob, *, method: Literal["histogram", "exact"] = "histogram", bins: int = AUC_BINS
) -> float:
    """Area under the pixel ROC curve of probabilities against a binary truth.

    The AUC is the Mann-Whitney statistic: the probability that a random
    foreground pixel gets a higher probability than a random background pixel,
    ties counting one half.

    Parameters
    ----------
    truth_mask : array_like
        Binary truth; non-zero is foreground.
    prob : array_like of float
        Foreground probabilities in [0, 1], same shape.
    method : {"histogram", "exact"}
        ``"histogram"`` (default): probabilities are rounded to multiples of
        ``1 / bins`` and counted with one ``np.bincount`` per chunk -- O(n),
        no sort, ~0.15 s for 1e7 pixels, and the same histograms sum over
        images (:class:`PixelScoreAccumulator`). It is *exact* whenever distinct
        probabilities differ by more than ``1 / bins`` (e.g. any 8-bit or
        ``k/255`` probabilities); otherwise pixel pairs rounded to the same level
        count as ties, so the error is at most half the fraction of
        (foreground, background) pairs sharing a level -- in practice < 1e-5.
        ``"exact"``: rank-based Mann-Whitney U with mid-ranks for ties
        (``np.unique``, O(n log n)).
    bins : int
        Number of quantisation steps of the histogram method (default 1e5, a
        resolution of 1e-5).

    Returns
    -------
    float
        AUC in [0, 1]; NaN when the truth holds only one class (all foreground
        or all background), where the ROC curve is undefined.

    Examples
    --------
    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
    nan
    """
    t = _as_mask(truth_mask, "truth_mask")
    p = _as_prob(prob)
    _check_same_shape(t, p, "truth_mask", "prob")
    if method == "exact":
        return _auc_exact(t, p)
    if method != "histogram":
        raise ValueError(f"method must be 'histogram' or 'exact', got {method!r}")
    if int(bins) < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    return _auc_from_histograms(*_auc_histograms(t, p, int(bins)))


def pixel_scores(truth_mask, pred_mask, prob=None, *, bins: int = AUC_BINS) -> dict[str, float]:
    """Precision, recall, F1 (Dice), IoU and, given probabilities, ROC AUC of one image.

    Parameters
    ----------
    truth_mask, pred_mask : array_like
        Binary masks of the same shape; non-zero is foreground.
    prob : array_like of float, optional
        Foreground probabilities in [0, 1]; adds ``"auc"`` (histogram method,
        see :func:`roc_auc`).
    bins : int
        AUC quantisation steps.

    Returns
    -------
    dict
        ``precision, recall, f1, iou`` (and ``auc``) as floats, plus the
        integer counts ``tp, fp, fn, tn``.

    Examples
    --------
    >>> s = pixel_scores([1, 1, 0, 0], [1, 0, 1, 0], prob=[0.9, 0.4, 0.6, 0.1])
    >>> s["f1"], s["iou"], s["auc"]
    (0.5, 0.3333333333333333, 0.75)
    """
    tp, fp, fn, tn = confusion_counts(truth_mask, pred_mask)
    out: dict[str, float] = dict(_scores_from_counts(tp, fp, fn))
    if prob is not None:
        out["auc"] = roc_auc(truth_mask, prob, bins=bins)
    out.update(tp=tp, fp=fp, fn=fn, tn=tn)
    return out


class PixelScoreAccumulator:
    """Pixel scores over a whole validation set, image by image.

    Two averages are available from :meth:`scores`:

    - ``"micro"`` (default): TP/FP/FN are summed over all pixels of all images
      and the scores computed once from the sums; the AUC is computed from the
      summed probability histograms, i.e. it equals the AUC of all pixels
      pooled. Large images weigh more; an image with no nuclei only adds its
      false positives.
    - ``"per_image"``: the mean of each image's own scores (``np.nanmean`` for
      AUC, which skips one-class images). Every image weighs the same.

    Parameters
    ----------
    bins : int
        AUC quantisation steps (see :func:`roc_auc`).

    Examples
    --------
    >>> acc = PixelScoreAccumulator()
    >>> _ = acc.update([1, 1, 0, 0], [1, 0, 0, 0], prob=[0.9, 0.4, 0.3, 0.1])
    >>> _ = acc.update([0, 0, 0, 0], [1, 0, 0, 0])
    >>> acc.scores()["f1"]  # 2*1 / (2*1 + 1 + 1)
    0.5
    >>> acc.scores("per_image")["f1"]  # mean of 2/3 and 0
    0.3333333333333333
    """

    def __init__(self, bins: int = AUC_BINS):
        if int(bins) < 1:
            raise ValueError(f"bins must be a positive integer, got {bins}")
        self.bins = int(bins)
        self.tp = self.fp = self.fn = self.tn = 0
        self.hist_neg = np.zeros(self.bins + 1, dtype=np.int64)
        self.hist_pos = np.zeros(self.bins + 1, dtype=np.int64)
        self.n_auc_images = 0
        self.per_image: list[dict[str, float]] = []

    @property
    def n_images(self) -> int:
        return len(self.per_image)

    def update(self, truth_mask, pred_mask, prob=None) -> dict[str, float]:
        """Add one image; returns its own :func:`pixel_scores`."""
        tp, fp, fn, tn = confusion_counts(truth_mask, pred_mask)
        scores: dict[str, float] = dict(_scores_from_counts(tp, fp, fn))
        if prob is not None:
            t = _as_mask(truth_mask, "truth_mask")
            p = _as_prob(prob)
            _check_same_shape(t, p, "truth_mask", "prob")
            neg, pos = _auc_histograms(t, p, self.bins)
            self.hist_neg += neg
            self.hist_pos += pos
            self.n_auc_images += 1
            scores["auc"] = _auc_from_histograms(neg, pos)
        scores.update(tp=tp, fp=fp, fn=fn, tn=tn)
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += tn
        self.per_image.append(scores)
        return scores

    def scores(self, average: Literal["micro", "per_image"] = "micro") -> dict[str, float]:
        """Dataset-level precision, recall, f1, iou (and auc if probabilities were given).

        ``auc`` is present only when every image was given probabilities.
        With no image added, ``"micro"`` gives the both-empty scores (1.0) and
        ``"per_image"`` gives NaN.
        """
        with_auc = self.n_images > 0 and self.n_auc_images == self.n_images
        if average == "micro":
            out: dict[str, float] = dict(_scores_from_counts(self.tp, self.fp, self.fn))
            if with_auc:
                out["auc"] = _auc_from_histograms(self.hist_neg, self.hist_pos)
            out.update(tp=self.tp, fp=self.fp, fn=self.fn, tn=self.tn, n_images=self.n_images)
            return out
        if average == "per_image":
            keys = ["precision", "recall", "f1", "iou"] + (["auc"] if with_auc else [])
            out = {}
            for key in keys:
                values = np.array([s[key] for s in self.per_image], dtype=np.float64)
                if values.size == 0 or np.all(np.isnan(values)):
                    out[key] = float("nan")
                else:
                    out[key] = float(np.nanmean(values))
            out["n_images"] = self.n_images
            return out
        raise ValueError(f"average must be 'micro' or 'per_image', got {average!r}")


# --------------------------------------------------------------------------- instance overlaps

# Above this many (truth, pred) label combinations, unique pair codes are found by
# sorting the overlapping pixels instead of a dense bincount over all combinations.
_DENSE_PAIRS_LIMIT = 1 << 24


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map label values to 1..n (0 stays 0).

    Returns ``(flat consecutive labels as intp, original ids (n,), areas (n,))``.
    Uses a lookup table when the largest label is small, else ``np.unique``.
    """
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top == 0:
        return np.zeros(flat.size, dtype=np.intp), np.zeros(0, dtype=labels.dtype), np.zeros(0, np.int64)
    if top <= max(4 * flat.size, 1 << 20):
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, dtype=np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat], ids.astype(labels.dtype), counts[ids].astype(np.int64)
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    inverse = inverse.ravel().astype(np.intp)
    if ids[0] == 0:
        return inverse, ids[1:], counts[1:].astype(np.int64)
    return inverse + 1, ids, counts.astype(np.int64)


@dataclass(frozen=True, eq=False)
class Overlaps:
    """Objects of two label images and every (truth, prediction) pair that overlaps.

    Objects are numbered by their position in ``true_ids`` / ``pred_ids`` (the
    sorted original label values). Only overlapping pairs are stored, so the
    size is bounded by the number of overlapping pixels, never
    ``n_true * n_pred``.

    Attributes
    ----------
    true_ids, pred_ids : ndarray
        Original label values, sorted, without 0.
    true_area, pred_area : ndarray of int64
        Pixel count of each object.
    pair_true, pair_pred : ndarray of intp
        Indices into ``true_ids`` / ``pred_ids`` of each overlapping pair.
    pair_intersection : ndarray of int64
        Overlapping pixels of each pair.
    pair_iou : ndarray of float64
        Intersection over union of each pair (> 0).
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    pair_intersection: np.ndarray
    pair_iou: np.ndarray

    @property
    def n_true(self) -> int:
        return int(self.true_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)


def overlap_pairs(truth_labels, pred_labels) -> Overlaps:
    """Intersections and IoUs of all overlapping (true, predicted) object pairs.

    One contingency count over the pixels, no loop over pairs: label values are
    made consecutive, each pixel where *both* images are foreground gets the
    pair code ``t * (n_pred + 1) + p``, and the codes are counted (``np.bincount``
    when ``n_true * n_pred`` is small, else ``np.unique`` over those pixels
    only). Object areas come from separate per-image counts. Memory is
    O(pixels + objects + overlapping pairs).

    Parameters
    ----------
    truth_labels, pred_labels : array_like of int
        Instance label images of the same shape (any number of dimensions);
        0 is background, other values need not be consecutive.

    Returns
    -------
    Overlaps

    Examples
    --------
    >>> truth = np.array([[1, 1, 0, 0],
    ...                   [1, 1, 0, 9]])
    >>> pred = np.array([[5, 5, 5, 0],
    ...                  [5, 5, 0, 0]])
    >>> ov = overlap_pairs(truth, pred)
    >>> ov.true_ids.tolist(), ov.pred_ids.tolist(), ov.pair_iou.tolist()
    ([1, 9], [5], [0.8])
    """
    truth = _as_labels(truth_labels, "truth_labels")
    pred = _as_labels(pred_labels, "pred_labels")
    _check_same_shape(truth, pred, "truth_labels", "pred_labels")
    t, true_ids, true_area = _relabel(truth)
    p, pred_ids, pred_area = _relabel(pred)
    n_true, n_pred = true_ids.size, pred_ids.size

    both = (t > 0) & (p > 0)
    stride = n_pred + 1
    codes = t[both].astype(np.int64) * stride + p[both]
    if codes.size == 0:
        pair_codes = np.zeros(0, np.int64)
        inter = np.zeros(0, np.int64)
    elif (n_true + 1) * stride <= _DENSE_PAIRS_LIMIT:
        counts = np.bincount(codes, minlength=(n_true + 1) * stride)
        pair_codes = np.flatnonzero(counts)
        inter = counts[pair_codes].astype(np.int64)
    else:
        pair_codes, inter = np.unique(codes, return_counts=True)
        inter = inter.astype(np.int64)
    pair_true = (pair_codes // stride - 1).astype(np.intp)
    pair_pred = (pair_codes % stride - 1).astype(np.intp)
    union = true_area[pair_true] + pred_area[pair_pred] - inter
    iou = inter / union.astype(np.float64)
    return Overlaps(true_ids, pred_ids, true_area, pred_area, pair_true, pair_pred, inter, iou)


def iou_matrix(truth_labels, pred_labels, *, dense: bool = False):
    """IoU of every true object (rows) with every predicted object (columns).

    Parameters
    ----------
    truth_labels, pred_labels : array_like of int
        Instance label images of the same shape; 0 is background.
    dense : bool
        False (default): a ``scipy.sparse.csr_matrix`` holding only the
        overlapping pairs -- safe for images with many thousands of objects.
        True: a dense ``(n_true, n_pred)`` float64 array (``n_true * n_pred * 8``
        bytes; use for small images or tests).

    Returns
    -------
    matrix : scipy.sparse.csr_matrix or ndarray, shape (n_true, n_pred)
    true_ids, pred_ids : ndarray
        Label value of each row / column (sorted).

    See Also
    --------
    overlap_pairs : the same information as flat arrays of pairs.

    Examples
    --------
    >>> truth = np.array([[1, 1, 0], [1, 1, 0]])
    >>> pred = np.array([[0, 4, 4], [0, 4, 4]])
    >>> m, tid, pid = iou_matrix(truth, pred, dense=True)
    >>> m.round(3).tolist(), tid.tolist(), pid.tolist()
    ([[0.333]], [1], [4])
    """
    ov = overlap_pairs(truth_labels, pred_labels)
    shape = (ov.n_true, ov.n_pred)
    if dense:
        m = np.zeros(shape, dtype=np.float64)
        m[ov.pair_true, ov.pair_pred] = ov.pair_iou
        return m, ov.true_ids, ov.pred_ids
    from scipy import sparse

    m = sparse.csr_matrix((ov.pair_iou, (ov.pair_true, ov.pair_pred)), shape=shape)
    return m, ov.true_ids, ov.pred_ids


# --------------------------------------------------------------------------- instance scores


def _readonly(a) -> np.ndarray:
    a = np.array(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class InstanceScores:
    """Result of :func:`instance_scores` for one image.

    Attributes
    ----------
    score : float
        Mean over thresholds of ``precision_per_threshold``: the DSB 2018 image score.
    ap50 : float
        The term at IoU threshold 0.5: TP / (TP + FP + FN) with matches at IoU > 0.5.
    thresholds : ndarray of float64
    tp, fp, fn : ndarray of int64
        Counts per threshold.
    precision_per_threshold : ndarray of float64
        TP / (TP + FP + FN) per threshold (Kaggle calls it "precision"; it is
        not the classical TP / (TP + FP)).
    n_true, n_pred : int
        Objects in the truth and the prediction.
    """

    score: float
    ap50: float
    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision_per_threshold: np.ndarray
    n_true: int
    n_pred: int


def _check_thresholds(thresholds) -> np.ndarray:
    th = np.asarray(thresholds, dtype=np.float64).ravel()
    if th.size == 0:
        raise ValueError("thresholds must hold at least one IoU threshold")
    if np.any(~np.isfinite(th)) or np.any(th < 0.5) or np.any(th >= 1):
        raise ValueError(
            f"IoU thresholds must lie in [0.5, 1), got {th.tolist()}; below 0.5 one object "
            "can match several, which would need an assignment solver"
        )
    return th


def instance_scores(truth_labels, pred_labels, thresholds: Sequence[float] = DSB_THRESHOLDS) -> InstanceScores:
    """The Kaggle Data Science Bowl 2018 instance score of one image, with its counts.

    For each IoU threshold ``t`` a predicted object matches a true object when
    their IoU is *strictly* greater than ``t``; matched pairs are true
    positives, unmatched predictions false positives, unmatched true objects
    false negatives, and the image score is the mean over thresholds of
    ``TP(t) / (TP(t) + FP(t) + FN(t))``. The dataset score is the mean of the
    image scores (:func:`summarize_instance_scores`).

    Parameters
    ----------
    truth_labels, pred_labels : array_like of int
        Instance label images of the same shape; 0 is background. Label values
        need not be consecutive (``{0, 7, 300000}`` is fine) and the two images
        need not use the same values; they are renumbered internally.
    thresholds : sequence of float
        IoU thresholds, each in [0.5, 1). Default: 0.50, 0.55, ..., 0.95.

    Returns
    -------
    InstanceScores

    Notes
    -----
    Edge cases, following the rule TP + FP + FN = 0 -> 1:

    - both images empty: score 1.0 (nothing to find and nothing found, a
      perfect answer); this keeps empty tiles from dragging a perfect model's
      mean down. The DSB 2018 evaluation text does not define this case
      (TP + FP + FN = 0) -- its test images all contain nuclei -- and some
      re-implementations return 0 or NaN for it, so compare with care.
    - empty prediction, non-empty truth: TP = FP = 0, so the score is 0.
    - empty truth, non-empty prediction: TP = FN = 0, so the score is 0.

    The IoU of each overlapping pair comes from a single contingency count
    (:func:`overlap_pairs`): ~20 ms for a 1000 x 1000 image with 1,000 nuclei
    (see ``benchmarks/metrics_speed.py``).

    Examples
    --------
    A 10 x 10 nucleus predicted 2 px to the right: IoU = 80 / 120 = 0.667, a
    match at 0.50, 0.55, 0.60, 0.65 and a miss (1 FP + 1 FN) at 0.70 ... 0.95:

    >>> truth = np.zeros((20, 30), int); truth[5:15, 5:15] = 1
    >>> pred = np.zeros((20, 30), int); pred[5:15, 7:17] = 3
    >>> s = instance_scores(truth, pred)
    >>> s.score, s.ap50, s.tp.tolist()
    (0.4, 1.0, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    """
    th = _check_thresholds(thresholds)
    ov = overlap_pairs(truth_labels, pred_labels)
    # Matching needs no assignment solver at t >= 0.5: IoU(T, P) > 0.5 implies
    # |T & P| > |T | P| / 2 >= |T| / 2, and two predictions cannot each cover more
    # than half of the same T because labels do not overlap (same for P). So
    # every object has at most one partner with IoU > 0.5 and TP(t) is simply the
    # number of pairs with IoU > t.
    iou = np.sort(ov.pair_iou)
    tp = (iou.size - np.searchsorted(iou, th, side="right")).astype(np.int64)  # count of iou > t
    fp = ov.n_pred - tp
    fn = ov.n_true - tp
    den = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        per_t = np.where(den > 0, tp / np.maximum(den, 1), 1.0)
    tp50 = int(np.count_nonzero(iou > 0.5))
    ap50 = _ratio(tp50, ov.n_true + ov.n_pred - tp50, ov.n_true + ov.n_pred == 0)
    return InstanceScores(
        score=float(np.mean(per_t)),
        ap50=float(ap50),
        thresholds=_readonly(th),
        tp=_readonly(tp),
        fp=_readonly(fp),
        fn=_readonly(fn),
        precision_per_threshold=_readonly(per_t.astype(np.float64)),
        n_true=ov.n_true,
        n_pred=ov.n_pred,
    )


def dsb_score(truth_labels, pred_labels) -> float:
    """The DSB 2018 score of one image: :func:`instance_scores` ``.score``.

    Examples
    --------
    >>> labels = np.array([[0, 2, 2], [0, 2, 2]])
    >>> dsb_score(labels, labels * 7)
    1.0
    """
    return instance_scores(truth_labels, pred_labels).score


def summarize_instance_scores(results: Iterable[InstanceScores]) -> dict:
    """Dataset-level instance scores from per-image :class:`InstanceScores`.

    ``score`` and ``ap50`` are the *means over images* (the Kaggle dataset
    score, every image weighing the same); ``tp``, ``fp``, ``fn`` are summed
    over images per threshold, and ``precision_per_threshold`` is computed from
    those sums (a pooled, object-weighted view).

    Returns
    -------
    dict
        ``score, ap50`` (float, NaN with no image), ``n_images``,
        ``thresholds, tp, fp, fn, precision_per_threshold`` (ndarrays),
        ``n_true, n_pred`` (int).

    Examples
    --------
    >>> a = np.zeros((4, 4), int); a[:2, :2] = 1
    >>> r = [instance_scores(a, a), instance_scores(a, np.zeros_like(a))]
    >>> summarize_instance_scores(r)["score"]
    0.5
    """
    results = list(results)
    if not results:
        th = np.asarray(DSB_THRESHOLDS)
        zeros = np.zeros(th.size, np.int64)
        return dict(score=float("nan"), ap50=float("nan"), n_images=0, thresholds=th, tp=zeros,
                    fp=zeros, fn=zeros, precision_per_threshold=np.full(th.size, np.nan), n_true=0, n_pred=0)
    th = results[0].thresholds
    for r in results[1:]:
        if not np.array_equal(r.thresholds, th):
            raise ValueError("all results must use the same IoU thresholds")
    tp = np.sum([r.tp for r in results], axis=0)
    fp = np.sum([r.fp for r in results], axis=0)
    fn = np.sum([r.fn for r in results], axis=0)
    den = tp + fp + fn
    per_t = np.where(den > 0, tp / np.maximum(den, 1), 1.0)
    return dict(
        score=float(np.mean([r.score for r in results])),
        ap50=float(np.mean([r.ap50 for r in results])),
        n_images=len(results),
        thresholds=np.array(th),
        tp=tp,
        fp=fp,
        fn=fn,
        precision_per_threshold=per_t,
        n_true=int(sum(r.n_true for r in results)),
        n_pred=int(sum(r.n_pred for r in results)),
    )
