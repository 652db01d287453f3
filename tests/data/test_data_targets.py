"""Training targets on the real fixture labels: the fast OpenCV paths agree with exact references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from nucleiseg.data.dsb import read_kaggle_labels
from nucleiseg.data.targets import inner_contour, make_targets, touching_area

from .conftest import DSB_TRAIN, KINDS, mask_files, read_masks


@pytest.fixture(scope="module", params=sorted(KINDS))
def labels(request) -> np.ndarray:
    shape = read_masks(DSB_TRAIN, request.param)[0].shape
    labels, _ = read_kaggle_labels(mask_files(DSB_TRAIN, request.param), shape)
    return labels


def test_inner_contour_matches_skimage(labels):
    expected = find_boundaries(labels, mode="inner") & (labels > 0)
    assert expected.any()
    np.testing.assert_array_equal(inner_contour(labels), expected)


def test_touching_area_uint16_path_matches_exact_filters(labels):
    # the exact reference: scipy's min/max filters in 64-bit, the path taken beyond 65534 labels
    big = np.iinfo(np.int32).max  # scipy's filters lose int64's top values
    wide = labels.astype(np.int64)
    highest = ndi.maximum_filter(wide, size=5)
    lowest = ndi.minimum_filter(np.where(wide > 0, wide, big), size=5)
    expected = (highest > 0) & (lowest < big) & (highest != lowest)
    np.testing.assert_array_equal(touching_area(labels), expected)
    shifted = np.where(wide > 0, wide + 70_000, 0)  # forces the 64-bit path
    np.testing.assert_array_equal(touching_area(shifted), expected)


def test_make_targets_channels_are_nested_in_body(labels):
    body, contour, _touch = make_targets(labels)
    np.testing.assert_array_equal(body, labels > 0)
    assert contour.sum() > 0 and np.all(contour <= body)
    # a contour pixel has a 4-neighbour outside its nucleus, so interiors hold none
    interior = ndi.binary_erosion(labels > 0)
    assert not np.any(contour.astype(bool) & interior & (ndi.grey_erosion(labels, size=3) == ndi.grey_dilation(labels, size=3)))
