"""The H&E stain jitter: changes stained images only, reproducibly, and leaves the labels alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nucleiseg.data.augment import StainJitter, jitter_stains, train_transform
from nucleiseg.data.kinds import image_kind
from nucleiseg.io import read_image
from nucleiseg.preprocess import to_rgb_uint8

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dsb" / "stage1_train"


def _fixture(kind: str) -> np.ndarray:
    for path in sorted(FIXTURES.glob("*/images/*.png")):
        rgb = to_rgb_uint8(read_image(path))
        if image_kind(rgb) == kind:
            return rgb
    raise AssertionError(f"no {kind} fixture")


def test_stain_jitter_recolours_tissue_and_keeps_grey_images():
    tissue = _fixture("tissue")
    assert np.abs(jitter_stains(tissue, [1, 1, 1], [0, 0, 0]).astype(int) - tissue).max() <= 1
    more_haematoxylin = jitter_stains(tissue, [1.3, 1, 1], [0, 0, 0])
    assert more_haematoxylin.mean() < tissue.mean()  # more stain absorbs more light
    grey = _fixture("fluorescence")
    assert np.array_equal(StainJitter(p=1.0)(image=grey)["image"], grey)


def test_train_transform_with_stain_jitter_is_reproducible_and_labels_untouched():
    tissue = _fixture("tissue")
    labels = np.zeros(tissue.shape[:2], np.uint16)
    labels[10:30, 10:30] = 1
    runs = []
    for _ in range(2):
        t = train_transform(crop=64, strength=0.0, stain=1.0)
        t.set_random_seed(3)
        runs.append(t(image=tissue, mask=labels))
    assert np.array_equal(runs[0]["image"], runs[1]["image"])
    plain = train_transform(crop=64, strength=0.0)
    plain.set_random_seed(3)
    base = plain(image=tissue, mask=labels)
    assert np.array_equal(base["mask"], runs[0]["mask"])  # same crop and flips: the jitter is last and photometric
    assert not np.array_equal(base["image"], runs[0]["image"])
