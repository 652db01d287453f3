"""Kaggle layout: finding the root, merging masks, reporting bad masks by file."""

from __future__ import annotations

import shutil

import imageio.v3 as iio
import numpy as np
import pytest

from nucleiseg.data.dsb import (
    find_kaggle_root,
    list_kaggle_images,
    merge_masks,
    read_kaggle_labels,
    read_mask,
)

from .conftest import DSB, DSB_TRAIN, FLUO_A, KINDS, mask_files, read_masks


def test_find_root_from_folder_or_parent(tmp_path):
    assert find_kaggle_root(DSB) == DSB_TRAIN
    assert find_kaggle_root(DSB_TRAIN) == DSB_TRAIN
    assert find_kaggle_root(tmp_path) is None
    assert find_kaggle_root(tmp_path / "missing") is None


def test_list_images_and_problems(dsb_copy):
    root = dsb_copy / "stage1_train"
    (root / "no_masks" / "images").mkdir(parents=True)
    shutil.copy(root / FLUO_A / "images" / f"{FLUO_A}.png", root / "no_masks" / "images" / "no_masks.png")
    (root / "no_images").mkdir()
    samples, problems = list_kaggle_images(root)
    assert sorted(samples) == sorted(KINDS)
    image, masks = samples[FLUO_A]
    assert image.name == f"{FLUO_A}.png" and masks == mask_files(root, FLUO_A)
    assert {p[0] for p in problems} == {"no_masks", "no_images"}


def test_merge_masks_assigns_label_k_to_mask_k():
    masks = read_masks(DSB_TRAIN, FLUO_A)
    labels, overlap = merge_masks(masks)
    assert labels.dtype == np.uint16 and labels.max() == len(masks)
    for k, mask in enumerate(masks, start=1):
        np.testing.assert_array_equal(labels == k, mask)
    assert (overlap == 0).all()


def test_merge_masks_overlap_keeps_first():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True
    labels, overlap = merge_masks([a, np.zeros((4, 4)), b, a])
    assert labels[1, 1] == 1 and labels[2, 2] == 2 and labels.max() == 2
    np.testing.assert_array_equal(overlap, [0, -1, 1, -1])


@pytest.mark.parametrize("image_id", sorted(KINDS))
def test_read_labels_equal_masks(image_id):
    masks = read_masks(DSB_TRAIN, image_id)
    labels, problems = read_kaggle_labels(mask_files(DSB_TRAIN, image_id), masks[0].shape)
    assert problems == []
    assert labels.max() == len(masks)
    for k, mask in enumerate(masks, start=1):
        np.testing.assert_array_equal(labels == k, mask)


def test_bad_masks_are_reported_by_file(tmp_path):
    masks = mask_files(DSB_TRAIN, FLUO_A)
    good = [np.asarray(iio.imread(p)) for p in masks]
    shape = good[0].shape
    folder = tmp_path / "masks"
    folder.mkdir()
    paths = []
    for k, mask in enumerate(good):
        paths.append(folder / f"m{k}.png")
        iio.imwrite(paths[-1], mask)
    overlap = folder / "x_overlap.png"
    iio.imwrite(overlap, np.roll(good[0], 2, axis=1))  # shifted copy of mask 0: overlaps it
    wrong = folder / "x_wrong_size.png"
    iio.imwrite(wrong, good[1][:100, :100])
    empty = folder / "x_empty.png"
    iio.imwrite(empty, np.zeros(shape, np.uint8))
    corrupt = folder / "x_corrupt.png"
    corrupt.write_bytes(paths[2].read_bytes()[:40])
    zero = folder / "x_zero_bytes.png"
    zero.write_bytes(b"")
    labels, problems = read_kaggle_labels(paths + [overlap, wrong, empty, corrupt, zero], shape)
    assert labels.max() == len(good) + 1  # the overlapping mask keeps its own pixels
    assert not (labels[np.roll(good[0], 2, axis=1) > 0] == 0).any()
    text = "\n".join(problems)
    assert len(problems) == 5
    assert f"{overlap}: overlaps earlier masks" in text
    assert f"{wrong}: mask is 100x100 but the image is 256x256" in text
    assert f"{empty}: empty mask" in text
    assert f"{corrupt}: unreadable mask" in text
    assert f"{zero}: unreadable mask" in text and "empty file" in text


def test_read_mask_variants(tmp_path):
    rgb = np.zeros((5, 5, 3), np.uint8)
    rgb[1, 1, 0] = 255
    iio.imwrite(tmp_path / "rgb.png", rgb)
    assert read_mask(tmp_path / "rgb.png").sum() == 1
    import tifffile

    tifffile.imwrite(tmp_path / "m.tif", (rgb[..., 0] > 0).astype(np.uint16) * 1000)
    assert read_mask(tmp_path / "m.tif").sum() == 1
