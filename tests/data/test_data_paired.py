"""Paired layout (images/ + labels/): same cache as the Kaggle layout, relabelling, warnings."""

from __future__ import annotations

import logging

import imageio.v3 as iio
import numpy as np
import pytest

from nucleiseg.data import prepare_dataset, read_cache
from nucleiseg.data.paired import (
    list_paired_images,
    read_paired_labels,
    relabel_consecutive,
)
from nucleiseg.errors import ImageReadError

from .conftest import BRIGHTFIELD, FLUO_A, FLUO_B, KINDS, TISSUE, make_paired, read_tif


def test_relabel_consecutive():
    labels = np.array([[0, 70000], [5, 70000]], np.uint32)
    np.testing.assert_array_equal(relabel_consecutive(labels), [[0, 2], [1, 2]])
    assert relabel_consecutive(labels).dtype == np.uint16
    np.testing.assert_array_equal(relabel_consecutive(np.array([[3, 3]])), [[1, 1]])  # no background
    with pytest.raises(ValueError):
        relabel_consecutive(np.array([[-1, 0]]))


def test_same_cache_as_kaggle_layout(tmp_path, dsb_cache):
    paired = make_paired(tmp_path / "annotations")
    assert {p.suffix for p in (paired / "labels").iterdir()} == {".tif", ".tiff", ".png"}
    result = prepare_dataset(paired, tmp_path / "cache", workers=1, progress=False)
    assert sorted(result.processed) == sorted(KINDS)
    for image_id in KINDS:
        labels = read_tif(tmp_path / "cache" / "labels" / f"{image_id}.tif")
        assert labels.dtype == np.uint16
        np.testing.assert_array_equal(labels, read_tif(dsb_cache / "labels" / f"{image_id}.tif"))
        np.testing.assert_array_equal(
            iio.imread(tmp_path / "cache" / "images" / f"{image_id}.png"),
            iio.imread(dsb_cache / "images" / f"{image_id}.png"),
        )
    ours = read_cache(tmp_path / "cache").set_index("image_id")
    theirs = read_cache(dsb_cache).set_index("image_id")
    for column in ("height", "width", "kind", "n_nuclei"):
        assert ours[column].to_dict() == theirs[column].to_dict()
    assert set(ours["group"]) == {""}  # no group file beside this folder


def test_groups_file_for_any_data_set(tmp_path):
    paired = make_paired(tmp_path / "annotations")
    groups = tmp_path / "my_groups.csv"
    groups.write_text(f"ImageId,mosaic_group\n{FLUO_A},slideA\n{FLUO_B},slideA\n")
    result = prepare_dataset(paired, tmp_path / "cache", groups=groups, workers=1, progress=False)
    table = result.table.set_index("image_id")
    assert table.loc[FLUO_A, "group"] == table.loc[FLUO_B, "group"] == "slideA"
    assert table.loc[FLUO_A, "split"] == table.loc[FLUO_B, "split"]


def test_unpaired_and_bad_files_are_named(tmp_path, caplog):
    paired = make_paired(tmp_path / "annotations")
    (paired / "labels" / f"{FLUO_A}.tif").rename(paired / "labels" / "orphan.tif")
    wrong = iio.imread(paired / "labels" / f"{TISSUE}.png")[:50, :50]
    iio.imwrite(paired / "labels" / f"{TISSUE}.png", wrong)
    samples, problems = list_paired_images(paired)
    assert sorted(samples) == sorted([FLUO_B, TISSUE, BRIGHTFIELD])
    reasons = {name: reason for name, _, reason in problems}
    assert reasons == {
        FLUO_A: "image without a label file in labels/",
        "orphan": "label file without an image in images/",
    }
    with caplog.at_level(logging.WARNING, logger="nucleiseg"):
        result = prepare_dataset(paired, tmp_path / "cache", workers=1, progress=False)
    assert sorted(result.table["image_id"]) == sorted([FLUO_B, BRIGHTFIELD])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"skipped {FLUO_A}" in text and "skipped orphan" in text and "orphan.tif" in text
    assert f"skipped {TISSUE}" in text and "label image is 50x50 but the image is 256x320" in text


def test_read_paired_labels_rejects_colour_and_size(tmp_path):
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[1, 1] = (255, 0, 0)
    iio.imwrite(tmp_path / "c.png", colour)
    with pytest.raises(ImageReadError, match="single-channel"):
        read_paired_labels(tmp_path / "c.png", (8, 8))
    iio.imwrite(tmp_path / "g.png", colour[..., 0])
    assert read_paired_labels(tmp_path / "g.png", (8, 8)).max() == 1
    with pytest.raises(ImageReadError, match="8x8 but the image is 9x8"):
        read_paired_labels(tmp_path / "g.png", (9, 8))
