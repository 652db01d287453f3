"""Property-based tests (hypothesis): run-length encoding round trips and the instance metric's invariants.

Each property is checked on ``max_examples`` generated label images (shrunk to a minimal example on failure);
docs/reliability.md lists the figures.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nucleiseg.data.rle import labels_to_rle, read_rle_csv, rle_decode, rle_encode, rle_to_labels, write_rle_csv
from nucleiseg.metrics import instance_scores, pixel_scores

#: Cases per test; NUCLEISEG_FUZZ_EXAMPLES raises it for a longer campaign (docs/reliability.md).
EXAMPLES = int(os.environ.get("NUCLEISEG_FUZZ_EXAMPLES", "200"))
FAST = settings(max_examples=EXAMPLES, deadline=None)

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


@st.composite
def label_images(draw, max_labels: int = 8) -> np.ndarray:
    """Instance label images: blocky (runs of equal labels) or speckled, any label values."""
    shape = draw(shapes)
    n = draw(st.integers(0, max_labels))
    values = draw(st.lists(st.integers(1, 2**31 - 1), min_size=n, max_size=n, unique=True))
    palette = np.array([0, *values], np.int64)
    index = draw(arrays(np.int64, shape, elements=st.integers(0, n)))
    if draw(st.booleans()):  # blocky: coarse cells scaled up, like real nuclei
        cell = draw(st.integers(2, 6))
        index = np.kron(index[: -(-shape[0] // cell), : -(-shape[1] // cell)], np.ones((cell, cell), np.int64))
        index = index[: shape[0], : shape[1]]
    return palette[index]


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in increasing order of value (0 stays 0)."""
    values, inverse = np.unique(labels, return_inverse=True)
    ranks = np.arange(len(values)) + (0 if values[0] == 0 else 1)
    return ranks[inverse.reshape(labels.shape)]


@FAST
@given(arrays(np.bool_, shapes))
def test_rle_mask_round_trip(mask):
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask)
    if mask.any():  # runs are 1-indexed, ascending, separated, and never empty
        pairs = np.array(rle.split(), np.int64).reshape(-1, 2)
        assert pairs[0, 0] >= 1 and np.all(pairs[:, 1] >= 1)
        assert np.all(pairs[1:, 0] > pairs[:-1, 0] + pairs[:-1, 1])
    else:
        assert rle == ""


@FAST
@given(label_images())
def test_rle_labels_round_trip(labels):
    rles = labels_to_rle(labels)
    assert len(rles) == len(np.unique(labels[labels != 0]))
    decoded, problems = rle_to_labels(rles, labels.shape)
    assert problems == []
    np.testing.assert_array_equal(decoded, _consecutive(labels))


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None)  # each case writes and reads a file
@given(st.lists(st.tuples(st.text("abc0123_-", min_size=1, max_size=8), label_images(max_labels=4)),
                min_size=1, max_size=4, unique_by=lambda item: item[0]))
def test_rle_csv_round_trip(images):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.csv"
        write_rle_csv(path, images)
        back = read_rle_csv(path)
    assert list(back) == [name for name, _ in images]
    for name, labels in images:
        decoded, problems = rle_to_labels(back[name], labels.shape)
        assert problems == []
        np.testing.assert_array_equal(decoded, _consecutive(labels))


@FAST
@given(st.text(alphabet="0123456789 -.x\n", max_size=40), shapes)
@example("9223372036854775808", (1, 1))  # past int64: raised OverflowError (found by a 3,000-case run)
@example("9223372036854775807 9223372036854775807", (1, 1))  # start + length wrapped around int64
def test_rle_decoding_any_string_gives_a_mask_or_a_value_error(text, shape):
    try:
        mask = rle_decode(text, shape)
    except ValueError:
        pass
    else:
        assert mask.shape == shape and mask.dtype == bool
    labels, problems = rle_to_labels([text, text], shape)  # never raises: problems are reported
    assert labels.shape == shape and len(problems) >= 1


@st.composite
def relabelled(draw):
    """A label image and the same objects under other, arbitrary label values."""
    labels = draw(label_images())
    values = np.unique(labels[labels != 0])
    new = draw(st.lists(st.integers(1, 2**40), min_size=len(values), max_size=len(values), unique=True))
    mapping = dict(zip(values.tolist(), new))
    return labels, np.vectorize(lambda v: mapping.get(v, 0), otypes=[np.int64])(labels) if len(values) else labels


@FAST
@given(relabelled(), label_images())
def test_instance_score_invariants(truth_pair, other):
    truth, permuted = truth_pair
    # a perfect prediction scores 1, whatever its label values
    for pred in (truth, permuted):
        perfect = instance_scores(truth, pred)
        assert perfect.score == perfect.ap50 == 1.0
        assert perfect.fp.sum() == perfect.fn.sum() == 0
    if other.shape != truth.shape:
        other = np.resize(other, truth.shape)
    s = instance_scores(truth, other)
    # in [0, 1], counts consistent, unchanged by renumbering either image, symmetric in its arguments
    assert 0.0 <= s.score <= 1.0 and 0.0 <= s.ap50 <= 1.0
    assert np.all(s.tp + s.fn == s.n_true) and np.all(s.tp + s.fp == s.n_pred)
    assert np.all(np.diff(s.tp) <= 0)  # a stricter threshold never matches more
    assert instance_scores(permuted, other).score == s.score
    assert instance_scores(other, truth).score == s.score
    assert instance_scores(_consecutive(truth), _consecutive(other)).score == s.score


@FAST
@given(arrays(np.bool_, shapes), arrays(np.bool_, shapes))
def test_pixel_scores_invariants(truth, pred):
    if pred.shape != truth.shape:
        pred = np.resize(pred, truth.shape)
    scores = pixel_scores(truth, pred)
    for name in ("precision", "recall", "f1", "iou"):
        assert 0.0 <= scores[name] <= 1.0, name
    assert pixel_scores(truth, truth)["f1"] == pixel_scores(truth, truth)["iou"] == 1.0
    swapped = pixel_scores(pred, truth)
    assert swapped["f1"] == scores["f1"] and swapped["iou"] == scores["iou"]
    assert swapped["precision"] == scores["recall"]
    assert scores["iou"] <= scores["f1"]


@FAST
@given(arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3))),
       st.lists(st.floats(0, 100), min_size=1, max_size=3))
@example(np.zeros((1, 1, 3), np.uint8), [0.0, 100.0])
@example(np.full((7, 5, 3), 255, np.uint8), [1.0, 99.8])
def test_byte_percentiles_and_normalize_are_numpys(rgb, q):
    """The histogram percentiles equal np.percentile to the last bit, and normalize the float formula."""
    from nucleiseg.preprocess import byte_percentiles, normalize

    values = rgb.astype(np.float32) / 255.0
    assert byte_percentiles(rgb, tuple(q)) == tuple(float(v) for v in np.percentile(values, q))
    lo, hi = (float(v) for v in np.percentile(values, (1.0, 99.8)))
    expected = np.clip((values - lo) * (1.0 / max(hi - lo, 1e-2)), -0.5, 1.5).transpose(2, 0, 1)
    got = normalize(rgb)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
