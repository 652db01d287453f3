"""Tests of nucleiseg.metrics: hand-worked cases with the arithmetic in comments."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from nucleiseg import metrics as M
from nucleiseg.metrics import (
    DSB_THRESHOLDS,
    PixelScoreAccumulator,
    confusion_counts,
    dice,
    dsb_score,
    f1_score,
    instance_scores,
    iou_matrix,
    iou_score,
    overlap_pairs,
    pixel_scores,
    precision,
    recall,
    roc_auc,
    summarize_instance_scores,
)


def square(shape, r0, c0, size_r, size_c, value=1, into=None):
    out = np.zeros(shape, np.int32) if into is None else into
    out[r0 : r0 + size_r, c0 : c0 + size_c] = value
    return out


# --------------------------------------------------------------------------- pixel scores


def test_pixel_scores_hand_mask():
    # truth: 6 foreground pixels (rows 0-1, cols 0-2); pred: 4 pixels, 3 inside truth.
    truth = np.zeros((4, 4), bool)
    truth[0:2, 0:3] = True
    pred = np.zeros((4, 4), bool)
    pred[1, 0:3] = True  # 3 pixels inside truth -> TP = 3
    pred[3, 3] = True  # 1 pixel outside -> FP = 1
    # FN = 6 - 3 = 3 ; TN = 16 - 3 - 1 - 3 = 9
    assert confusion_counts(truth, pred) == (3, 1, 3, 9)
    assert precision(truth, pred) == pytest.approx(3 / 4)  # 3 / (3 + 1)
    assert recall(truth, pred) == pytest.approx(3 / 6)  # 3 / (3 + 3)
    assert f1_score(truth, pred) == pytest.approx(6 / 10)  # 2*3 / (2*3 + 1 + 3)
    assert dice(truth, pred) == f1_score(truth, pred)
    assert iou_score(truth, pred) == pytest.approx(3 / 7)  # 3 / (3 + 1 + 3)
    s = pixel_scores(truth, pred)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (3, 1, 3, 9)
    assert s["f1"] == pytest.approx(0.6) and s["iou"] == pytest.approx(3 / 7)
    assert "auc" not in s


def test_pixel_masks_any_nonzero_is_foreground():
    truth = np.array([[0, 255], [255, 0]], np.uint8)  # 0/255 masks as in the cache
    pred = np.array([[0, 1.0], [0, 0]])
    assert confusion_counts(truth, pred) == (1, 0, 1, 2)


def test_pixel_empty_cases():
    z = np.zeros((3, 3), bool)
    one = z.copy()
    one[1, 1] = True
    # both empty: nothing to find, nothing found -> 1.0 everywhere
    assert pixel_scores(z, z) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "iou": 1.0,
                                  "tp": 0, "fp": 0, "fn": 0, "tn": 9}
    # exactly one empty -> 0.0
    for t, p in [(one, z), (z, one)]:
        s = pixel_scores(t, p)
        assert (s["precision"], s["recall"], s["f1"], s["iou"]) == (0.0, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- ROC AUC


@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_auc_hand_cases(method):
    truth = np.array([0, 0, 1, 1])
    # perfect ranking: every positive above every negative -> 4/4 pairs
    assert roc_auc(truth, [0.1, 0.2, 0.8, 0.9], method=method) == 1.0
    # reversed -> 0/4
    assert roc_auc(truth, [0.9, 0.8, 0.2, 0.1], method=method) == 0.0
    # all tied -> each pair counts 1/2 -> 0.5
    assert roc_auc(truth, [0.5, 0.5, 0.5, 0.5], method=method) == 0.5
    # pos {0.35, 0.8} vs neg {0.1, 0.4}: 0.35>0.1 yes, 0.35>0.4 no, 0.8>both -> 3/4
    assert roc_auc(truth, [0.1, 0.4, 0.35, 0.8], method=method) == 0.75
    # one tie: pos {0.35, 0.8} vs neg {0.1, 0.35}: 1 + 0.5 + 1 + 1 = 3.5 of 4
    assert roc_auc(truth, [0.1, 0.35, 0.35, 0.8], method=method) == 0.875


@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_auc_one_class_is_nan(method):
    assert np.isnan(roc_auc(np.ones(5), np.linspace(0, 1, 5), method=method))
    assert np.isnan(roc_auc(np.zeros(5), np.linspace(0, 1, 5), method=method))


def brute_force_auc(truth, prob):
    pos = prob[truth.astype(bool)]
    neg = prob[~truth.astype(bool)]
    diff = pos[:, None] - neg[None, :]
    return (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / (pos.size * neg.size)


def test_auc_matches_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    truth = rng.random(3000) < 0.3
    prob = np.clip(rng.normal(0.4 + 0.2 * truth, 0.2), 0, 1).astype(np.float32)
    ref = brute_force_auc(truth, prob.astype(np.float64))
    assert roc_auc(truth, prob, method="exact") == pytest.approx(ref, abs=1e-12)
    # histogram: only pairs rounded to the same 1e-5 level can differ
    assert roc_auc(truth, prob) == pytest.approx(ref, abs=1e-4)
    # 8-bit probabilities are spaced 1/255 > 1e-5 apart: histogram is exact
    prob8 = np.round(prob * 255) / 255
    assert roc_auc(truth, prob8) == pytest.approx(brute_force_auc(truth, prob8), abs=1e-12)


# --------------------------------------------------------------------------- accumulator


def test_accumulator_micro_and_per_image():
    acc = PixelScoreAccumulator()
    # image 1: truth 4 px, pred 2 px inside -> TP 2, FP 0, FN 2 ; F1 = 4/(4+0+2) = 2/3
    t1 = np.array([[1, 1], [1, 1]])
    p1 = np.array([[1, 1], [0, 0]])
    pr1 = np.array([[0.9, 0.8], [0.3, 0.1]])
    # image 2: truth 1 px, pred 3 px -> TP 1, FP 2, FN 0 ; F1 = 2/(2+2+0) = 1/2
    t2 = np.array([[1, 0], [0, 0]])
    p2 = np.array([[1, 1], [1, 0]])
    pr2 = np.array([[0.7, 0.6], [0.6, 0.2]])
    s1 = acc.update(t1, p1, pr1)
    acc.update(t2, p2, pr2)
    assert np.isnan(s1["auc"])  # image 1 is all foreground: AUC undefined
    micro = acc.scores()
    # summed: TP 3, FP 2, FN 2 -> P 3/5, R 3/5, F1 6/10, IoU 3/7
    assert (micro["tp"], micro["fp"], micro["fn"], micro["tn"]) == (3, 2, 2, 1)
    assert micro["f1"] == pytest.approx(0.6) and micro["iou"] == pytest.approx(3 / 7)
    # pooled AUC = AUC of all 8 pixels together
    t_all = np.concatenate([t1.ravel(), t2.ravel()])
    p_all = np.concatenate([pr1.ravel(), pr2.ravel()])
    assert micro["auc"] == pytest.approx(brute_force_auc(t_all, p_all), abs=1e-12)
    per_image = acc.scores("per_image")
    assert per_image["f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert per_image["auc"] == pytest.approx(1.0)  # nanmean skips image 1; image 2: 0.7 > all negs
    assert per_image["n_images"] == micro["n_images"] == 2


def test_accumulator_without_prob_has_no_auc():
    acc = PixelScoreAccumulator()
    acc.update([1, 0], [1, 0], prob=[0.9, 0.1])
    acc.update([1, 0], [1, 0])
    assert "auc" not in acc.scores() and "auc" not in acc.scores("per_image")
    with pytest.raises(ValueError, match="average"):
        acc.scores("macro")


# --------------------------------------------------------------------------- instance score

N_T = len(DSB_THRESHOLDS)  # 10 thresholds: 0.50, 0.55, ..., 0.95


def test_thresholds():
    assert DSB_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_perfect_match_is_one_even_with_other_label_values():
    truth = square((40, 40), 2, 2, 8, 8, 1)
    square((40, 40), 20, 20, 10, 5, 2, into=truth)
    pred = np.where(truth == 1, 50, np.where(truth == 2, 3, 0))
    s = instance_scores(truth, pred)
    assert s.score == 1.0 and s.ap50 == 1.0
    assert s.tp.tolist() == [2] * N_T and s.fp.tolist() == [0] * N_T and s.fn.tolist() == [0] * N_T
    assert (s.n_true, s.n_pred) == (2, 2)
    assert dsb_score(truth, pred) == 1.0


def test_shifted_square():
    # 10x10 square shifted 2 px: intersection 10*8 = 80, union 100 + 100 - 80 = 120,
    # IoU = 80/120 = 0.667 > t for t in 0.50, 0.55, 0.60, 0.65 (4 thresholds: TP 1 -> 1/1 = 1)
    # and <= t for 0.70 .. 0.95 (6 thresholds: TP 0, FP 1, FN 1 -> 0/2 = 0).
    # score = (4 * 1 + 6 * 0) / 10 = 0.4
    truth = square((30, 30), 10, 10, 10, 10)
    pred = square((30, 30), 10, 12, 10, 10)
    s = instance_scores(truth, pred)
    assert s.score == pytest.approx(0.4)
    assert s.ap50 == 1.0
    assert s.tp.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert s.fp.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert s.fn.tolist() == s.fp.tolist()
    assert s.precision_per_threshold.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    m, tid, pid = iou_matrix(truth, pred, dense=True)
    assert m.tolist() == [[80 / 120]]


def test_iou_equal_to_threshold_is_not_a_match():
    # truth 3x4 = 12 px, pred 3x3 = 9 px inside it: IoU = 9/12 = 0.75 exactly.
    # Matches at t = 0.50 .. 0.70 (5 thresholds, 1/1), not at 0.75 (strict >) .. 0.95 (0/2).
    # score = 5 / 10 = 0.5
    truth = square((10, 10), 0, 0, 3, 4)
    pred = square((10, 10), 0, 0, 3, 3)
    s = instance_scores(truth, pred)
    assert s.tp.tolist() == [1] * 5 + [0] * 5
    assert s.score == pytest.approx(0.5)


def test_split_nucleus():
    # one true 10x10 nucleus (100 px) predicted as two pieces: left 10x6 (60 px), right 10x4 (40 px)
    # IoU(left) = 60/100 = 0.6, IoU(right) = 40/100 = 0.4
    # t = 0.50, 0.55: left matches -> TP 1, FP 1 (right), FN 0 -> 1/2
    # t = 0.60 (0.6 is not > 0.6) .. 0.95: TP 0, FP 2, FN 1 -> 0/3 = 0
    # score = (0.5 + 0.5) / 10 = 0.1 ; AP50 = 0.5
    truth = square((20, 20), 0, 0, 10, 10)
    pred = square((20, 20), 0, 0, 10, 6, 1)
    square((20, 20), 0, 6, 10, 4, 2, into=pred)
    s = instance_scores(truth, pred)
    assert s.score == pytest.approx(0.1)
    assert s.ap50 == 0.5
    assert s.tp.tolist() == [1, 1] + [0] * 8
    assert s.fp.tolist() == [1, 1] + [2] * 8
    assert s.fn.tolist() == [0, 0] + [1] * 8
    assert s.precision_per_threshold.tolist() == [0.5, 0.5] + [0.0] * 8


def test_merged_nuclei():
    # true A 10x15 (150 px) and B 10x5 (50 px) side by side, predicted as one 10x20 object (200 px)
    # IoU(A, P) = 150/200 = 0.75, IoU(B, P) = 50/200 = 0.25
    # t = 0.50 .. 0.70 (5): TP 1, FP 0, FN 1 (B) -> 1/2
    # t = 0.75 .. 0.95 (5): TP 0, FP 1, FN 2 -> 0
    # score = 5 * 0.5 / 10 = 0.25 ; AP50 = 0.5
    truth = square((20, 30), 0, 0, 10, 15, 1)
    square((20, 30), 0, 15, 10, 5, 2, into=truth)
    pred = square((20, 30), 0, 0, 10, 20, 9)
    s = instance_scores(truth, pred)
    assert s.score == pytest.approx(0.25)
    assert s.ap50 == 0.5
    assert s.tp.tolist() == [1] * 5 + [0] * 5
    assert s.fp.tolist() == [0] * 5 + [1] * 5
    assert s.fn.tolist() == [1] * 5 + [2] * 5


def test_merged_equal_halves_never_match():
    # two 10x10 nuclei merged into one 10x20 object: each IoU = 100/200 = 0.5, not > 0.5
    # -> no match at any threshold: TP 0, FP 1, FN 2 -> score 0
    truth = square((20, 30), 0, 0, 10, 10, 1)
    square((20, 30), 0, 10, 10, 10, 2, into=truth)
    pred = square((20, 30), 0, 0, 10, 20, 1)
    s = instance_scores(truth, pred)
    assert s.score == 0.0 and s.ap50 == 0.0
    assert s.tp.sum() == 0 and s.fp.tolist() == [1] * N_T and s.fn.tolist() == [2] * N_T


def test_mixed_image():
    # truth: A perfect, B shifted (IoU 2/3 as above), C missed; pred: A, B', extra D.
    # t <= 0.65 (4 thresholds): TP 2 (A, B), FP 1 (D), FN 1 (C) -> 2/4 = 0.5
    # t >= 0.70 (6 thresholds): TP 1 (A), FP 2 (B', D), FN 2 (B, C) -> 1/5 = 0.2
    # score = (4 * 0.5 + 6 * 0.2) / 10 = 0.32 ; AP50 = 0.5
    shape = (60, 60)
    truth = square(shape, 2, 2, 8, 8, 1)
    square(shape, 20, 20, 10, 10, 2, into=truth)
    square(shape, 45, 45, 6, 6, 3, into=truth)
    pred = square(shape, 2, 2, 8, 8, 1)
    square(shape, 20, 22, 10, 10, 2, into=pred)
    square(shape, 2, 40, 5, 5, 3, into=pred)
    s = instance_scores(truth, pred)
    assert s.score == pytest.approx(0.32)
    assert s.ap50 == 0.5
    assert s.tp.tolist() == [2] * 4 + [1] * 6


def test_empty_prediction_scores_zero():
    truth = square((20, 20), 0, 0, 5, 5, 1)
    square((20, 20), 10, 10, 5, 5, 2, into=truth)
    s = instance_scores(truth, np.zeros_like(truth))
    # TP 0, FP 0, FN 2 -> 0/2 at every threshold
    assert s.score == 0.0 and s.ap50 == 0.0
    assert s.fn.tolist() == [2] * N_T and s.fp.tolist() == [0] * N_T
    assert (s.n_true, s.n_pred) == (2, 0)


def test_empty_truth_scores_zero():
    pred = square((20, 20), 0, 0, 5, 5, 4)
    s = instance_scores(np.zeros_like(pred), pred)
    # TP 0, FP 1, FN 0 -> 0/1
    assert s.score == 0.0 and s.ap50 == 0.0
    assert s.fp.tolist() == [1] * N_T and s.fn.tolist() == [0] * N_T


def test_both_empty_scores_one():
    z = np.zeros((8, 8), np.uint16)
    s = instance_scores(z, z)
    # TP + FP + FN = 0: nothing to find and nothing found -> 1.0 by definition
    assert s.score == 1.0 and s.ap50 == 1.0
    assert s.tp.sum() == s.fp.sum() == s.fn.sum() == 0
    assert (s.n_true, s.n_pred) == (0, 0)


def test_non_consecutive_labels_give_same_result():
    truth = square((60, 60), 2, 2, 8, 8, 1)
    square((60, 60), 20, 20, 10, 10, 2, into=truth)
    square((60, 60), 40, 40, 10, 10, 3, into=truth)
    pred = square((60, 60), 2, 3, 8, 8, 1)
    square((60, 60), 20, 22, 10, 10, 2, into=pred)
    square((60, 60), 40, 40, 10, 6, 3, into=pred)
    ref = instance_scores(truth, pred)
    # sparse values: lookup-table path ({0, 7, 300000}) and np.unique path (2**40)
    lut_t = {0: 0, 1: 7, 2: 300000, 3: 12}
    lut_p = {0: 0, 1: 2**40, 2: 5, 3: 2**33 + 1}
    truth2 = np.vectorize(lut_t.get)(truth).astype(np.int64)
    pred2 = np.vectorize(lut_p.get)(pred).astype(np.uint64)
    s = instance_scores(truth2, pred2)
    assert 0 < ref.score < 1
    assert s.score == ref.score and s.ap50 == ref.ap50
    assert s.tp.tolist() == ref.tp.tolist() and s.fp.tolist() == ref.fp.tolist()
    ov = overlap_pairs(truth2, pred2)
    assert ov.true_ids.tolist() == [7, 12, 300000]
    assert ov.pred_ids.tolist() == [5, 2**33 + 1, 2**40]
    m, tid, pid = iou_matrix(truth2, pred2)
    assert m.shape == (3, 3) and m.nnz == 3


def test_iou_matrix_sparse_equals_dense():
    truth = square((30, 30), 0, 0, 10, 10, 1)
    square((30, 30), 15, 15, 10, 10, 2, into=truth)
    pred = square((30, 30), 5, 5, 15, 15, 1)  # overlaps both true objects
    dense, tid, pid = iou_matrix(truth, pred, dense=True)
    sparse_m, _, _ = iou_matrix(truth, pred)
    np.testing.assert_array_equal(sparse_m.toarray(), dense)
    # inter(1, P) = 5*5 = 25, union = 100 + 225 - 25 = 300 ; inter(2, P) = 5*5 = 25 -> same
    np.testing.assert_allclose(dense, [[25 / 300], [25 / 300]])


def reference_score(truth, pred, thresholds=DSB_THRESHOLDS):
    """Slow pair-by-pair reference: the definition, written out."""
    t_ids = [i for i in np.unique(truth) if i]
    p_ids = [j for j in np.unique(pred) if j]
    iou = np.zeros((len(t_ids), len(p_ids)))
    for a, i in enumerate(t_ids):
        for b, j in enumerate(p_ids):
            inter = np.sum((truth == i) & (pred == j))
            iou[a, b] = inter / np.sum((truth == i) | (pred == j))
    scores = []
    for th in thresholds:
        tp = int(np.sum(iou > th))
        den = len(t_ids) + len(p_ids) - tp
        scores.append(1.0 if den == 0 else tp / den)
    return float(np.mean(scores))


def test_agrees_with_pairwise_reference_on_drawn_nuclei():
    from skimage.draw import disk, ellipse

    rng = np.random.default_rng(1)
    shape = (128, 128)
    truth = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    for k in range(1, 25):
        r, c = rng.integers(8, 120, size=2)
        rad = rng.integers(3, 8)
        truth[disk((r, c), rad, shape=shape)] = k
        # prediction: jittered ellipse, some missing, different label values
        if rng.random() < 0.85:
            pred[ellipse(r + rng.integers(-2, 3), c + rng.integers(-2, 3),
                         rad + rng.integers(-1, 2), rad + rng.integers(-1, 2), shape=shape)] = 100 + 3 * k
    s = instance_scores(truth, pred)
    assert s.score == pytest.approx(reference_score(truth, pred), abs=1e-12)
    assert 0 < s.score < 1


def _dsb_fixture_labels():
    root = Path(__file__).parent / "fixtures"
    for masks_dir in sorted(root.glob("**/masks")):
        pngs = sorted(masks_dir.glob("*.png"))
        if pngs:
            return pngs
    return None


def test_real_dsb_fixture_scores_one_against_itself():
    pngs = _dsb_fixture_labels()
    if pngs is None:
        pytest.skip("no DSB fixture with masks/*.png under tests/fixtures")
    from nucleiseg.io import read_image

    first = read_image(pngs[0])
    first = first[..., 0] if first.ndim == 3 else first
    labels = np.zeros(first.shape, np.int32)
    for k, png in enumerate(pngs, start=1):
        m = read_image(png)
        m = m[..., 0] if m.ndim == 3 else m
        labels[m > 0] = k
    s = instance_scores(labels, labels)
    assert s.score == 1.0
    # dropping one nucleus: at every threshold TP = n-1, FP 0, FN 1 -> (n-1)/n
    n = s.n_true
    dropped = np.where(labels == labels.max(), 0, labels)
    assert instance_scores(labels, dropped).score == pytest.approx((n - 1) / n)


def test_summarize_instance_scores():
    truth = square((30, 30), 10, 10, 10, 10)
    shifted = square((30, 30), 10, 12, 10, 10)
    results = [instance_scores(truth, truth), instance_scores(truth, shifted)]
    summary = summarize_instance_scores(results)
    # mean of image scores 1.0 and 0.4 -> 0.7 ; AP50 mean of 1 and 1
    assert summary["score"] == pytest.approx(0.7)
    assert summary["ap50"] == 1.0 and summary["n_images"] == 2
    assert summary["tp"].tolist() == [2] * 4 + [1] * 6
    assert np.isnan(summarize_instance_scores([])["score"])


def test_result_is_frozen_and_readonly():
    s = instance_scores(np.ones((3, 3), int), np.ones((3, 3), int))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.score = 0.0
    with pytest.raises(ValueError):
        s.tp[0] = 5


def test_many_labels_stay_sparse():
    # 200 x 200 image, 10,000 one-pixel nuclei per side: 1e8 pair combinations
    # would not fit a dense matrix; the sparse path handles them.
    truth = np.arange(1, 40001, dtype=np.int64).reshape(200, 200)
    pred = truth.copy()
    s = instance_scores(truth, pred)
    assert s.score == 1.0 and s.n_true == 40000
    m, _, _ = iou_matrix(truth, pred)
    assert m.nnz == 40000


# --------------------------------------------------------------------------- validation


def test_shape_mismatch_messages():
    a = np.zeros((4, 4), int)
    b = np.zeros((4, 5), int)
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4\).*\(4, 5\)"):
        instance_scores(a, b)
    with pytest.raises(ValueError, match="same shape"):
        pixel_scores(a, b)
    with pytest.raises(ValueError, match="same shape"):
        roc_auc(a, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="same shape"):
        PixelScoreAccumulator().update(a, a, prob=np.zeros((5, 4)))


def test_invalid_inputs():
    a = np.zeros((4, 4), int)
    with pytest.raises(ValueError, match="integer label image"):
        instance_scores(a.astype(float), a)
    with pytest.raises(ValueError, match="non-negative"):
        instance_scores(a - 1, a)
    with pytest.raises(ValueError, match=r"\[0.5, 1\)"):
        instance_scores(a, a, thresholds=[0.3, 0.5])
    with pytest.raises(ValueError, match="binary mask"):
        pixel_scores(a, np.full((4, 4), 0.7))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        roc_auc(a, np.full((4, 4), 1.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        roc_auc(a, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="floating-point"):
        roc_auc(a, np.full((4, 4), 200, np.uint8))
    with pytest.raises(ValueError, match="method"):
        roc_auc(a, np.zeros((4, 4)), method="trapz")
    with pytest.raises(ValueError, match="empty arrays"):
        pixel_scores(np.zeros(0), np.zeros(0))


def test_all_public_names_exist():
    for name in M.__all__:
        assert hasattr(M, name)
