"""Image kind from pixels, on the fixture images and synthetic ones."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from nucleiseg.data.kinds import image_kind, kind_features

from .conftest import DSB_TRAIN, KINDS


@pytest.mark.parametrize("image_id", sorted(KINDS))
def test_fixture_images(image_id):
    image = iio.imread(DSB_TRAIN / image_id / "images" / f"{image_id}.png")
    assert image_kind(image) == KINDS[image_id]


def _blobs(background, foreground, shape=(64, 64), channels=None):
    image = np.full(shape + ((channels,) if channels else ()), background, np.float64)
    for y in range(8, 64, 16):
        for x in range(8, 64, 16):
            image[y - 3 : y + 3, x - 3 : x + 3] = foreground
    return image


def test_synthetic_kinds_and_bit_depths():
    fluo16 = (_blobs(300, 3000)).astype(np.uint16)  # 12-bit camera data in a 16-bit file
    assert image_kind(fluo16) == "fluorescence"
    assert image_kind(_blobs(0.05, 0.9).astype(np.float32)) == "fluorescence"
    assert image_kind(_blobs(220, 70).astype(np.uint8)) == "brightfield"
    tissue = _blobs((235, 225, 235), (110, 60, 150), channels=3).astype(np.uint8)
    assert image_kind(tissue) == "tissue"
    rgba = np.dstack([tissue, np.full(tissue.shape[:2], 255, np.uint8)])
    assert image_kind(rgba) == "tissue"
    # a coloured fluorescence image (nuclei in the blue channel) stays fluorescence
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = _blobs(5, 200).astype(np.uint8)
    assert image_kind(blue) == "fluorescence"


def test_mid_grey_background_decided_by_object_contrast():
    assert image_kind(_blobs(100, 20).astype(np.uint8)) == "brightfield"
    assert image_kind(_blobs(100, 250).astype(np.uint8)) == "fluorescence"


def test_features_and_validation():
    features = kind_features(_blobs(10, 200).astype(np.uint8))
    assert set(features) == {"background", "lean", "chroma"}
    assert features["lean"] > 0 and features["chroma"] == 0
    with pytest.raises(ValueError):
        image_kind(np.zeros((2, 3, 4, 5)))
