"""Kaggle run-length encoding: hand-worked examples, round trips, the CSV, the kaggle-rle layout."""

from __future__ import annotations

import numpy as np
import pytest

from nucleiseg.data.cache import prepare_dataset
from nucleiseg.data.dsb import merge_masks
from nucleiseg.data.rle import (
    labels_to_rle,
    read_rle_csv,
    rle_decode,
    rle_encode,
    rle_to_labels,
    write_rle_csv,
)
from nucleiseg.errors import NucleisegError

from .conftest import DSB_TRAIN, KINDS, read_masks, read_tif


def test_hand_worked_example():
    # 3 x 4 image; column-major positions (1-indexed):
    #   1 4 7 10
    #   2 5 8 11
    #   3 6 9 12
    mask = np.array(
        [
            [0, 1, 0, 0],
            [1, 1, 0, 1],
            [1, 0, 0, 1],
        ]
    )
    # set pixels: 2, 3 (col 0) | 4, 5 (col 1) | 11, 12 (col 3) -> runs 2-5 and 11-12
    assert rle_encode(mask) == "2 4 11 2"
    np.testing.assert_array_equal(rle_decode("2 4 11 2", (3, 4)), mask.astype(bool))


def test_edges_and_empty():
    full = np.ones((2, 3), bool)
    assert rle_encode(full) == "1 6"
    assert rle_encode(np.zeros((2, 3))) == ""
    assert not rle_decode("", (2, 3)).any()
    last = np.zeros((2, 3), bool)
    last[-1, -1] = True
    assert rle_encode(last) == "6 1"


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 40, size=2))
    mask = rng.random(shape) < rng.random()
    np.testing.assert_array_equal(rle_decode(rle_encode(mask), shape), mask)


def test_labels_round_trip():
    rng = np.random.default_rng(3)
    labels = np.zeros((30, 40), np.uint16)
    for k in range(1, 12):  # overlapping squares: the later one wins in `labels`
        y, x = rng.integers(0, 25, size=2)
        labels[y : y + 6, x : x + 6] = k
    labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.uint16)
    rles = labels_to_rle(labels)
    assert len(rles) == labels.max()
    back, problems = rle_to_labels(rles, labels.shape)
    assert problems == []
    np.testing.assert_array_equal(back, labels)


def test_rle_to_labels_reports_bad_rows():
    labels, problems = rle_to_labels(["1 2", "2 2", "", "9 9", "1 1"], (2, 2))
    np.testing.assert_array_equal(labels, [[1, 2], [1, 0]])
    assert any("object 2" in p and "overlaps" in p for p in problems)
    assert any("object 3" in p and "empty" in p for p in problems)
    assert any("object 4" in p and "past the end" in p for p in problems)
    assert any("object 5" in p and "entirely inside" in p for p in problems)


@pytest.mark.parametrize("bad", ["1", "a b", "0 3", "2 0"])
def test_decode_rejects_malformed(bad):
    with pytest.raises(ValueError):
        rle_decode(bad, (4, 4))


def test_csv_round_trip(tmp_path):
    a = np.array([[0, 1], [2, 2]])
    b = np.zeros((3, 3), int)
    path = tmp_path / "labels.csv"
    write_rle_csv(path, {"a": a, "b": b})
    assert path.read_text().splitlines() == ["ImageId,EncodedPixels", "a,3 1", "a,2 1 4 1", "b,"]
    rles = read_rle_csv(path)
    assert rles == {"a": ["3 1", "2 1 4 1"], "b": []}
    np.testing.assert_array_equal(rle_to_labels(rles["a"], a.shape)[0], a)


def test_csv_errors(tmp_path):
    with pytest.raises(NucleisegError, match="not found"):
        read_rle_csv(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,rle\nx,1 1\n")
    with pytest.raises(NucleisegError, match="EncodedPixels"):
        read_rle_csv(bad)


def _fixture_csv(tmp_path):
    labels = {i: merge_masks(read_masks(DSB_TRAIN, i))[0] for i in KINDS}
    csv_path = tmp_path / "train_labels.csv"
    write_rle_csv(csv_path, labels)
    return csv_path, labels


def test_prepare_from_rle_csv_on_kaggle_folders(tmp_path, dsb_cache):
    csv_path, labels = _fixture_csv(tmp_path)
    result = prepare_dataset(DSB_TRAIN, tmp_path / "cache", rle_csv=csv_path, workers=1, progress=False)
    assert sorted(result.processed) == sorted(KINDS)
    for image_id, expected in labels.items():
        np.testing.assert_array_equal(read_tif(tmp_path / "cache" / "labels" / f"{image_id}.tif"), expected)
        np.testing.assert_array_equal(expected, read_tif(dsb_cache / "labels" / f"{image_id}.tif"))


def test_prepare_from_rle_csv_on_image_folder(tmp_path, caplog):
    import shutil

    csv_path, labels = _fixture_csv(tmp_path)
    folder = tmp_path / "flat"
    folder.mkdir()
    for image_id in labels:
        shutil.copy(DSB_TRAIN / image_id / "images" / f"{image_id}.png", folder)
    (folder / "unlisted.png").write_bytes((folder / f"{next(iter(labels))}.png").read_bytes())
    with caplog.at_level("WARNING", logger="nucleiseg"):
        result = prepare_dataset(
            folder, tmp_path / "cache", layout="kaggle-rle", rle_csv=csv_path, workers=1, progress=False
        )
    assert sorted(result.table["image_id"]) == sorted(labels)
    assert result.table.set_index("image_id")["n_nuclei"].to_dict() == {i: int(v.max()) for i, v in labels.items()}
    assert any("unlisted" in r.getMessage() and "no rows" in r.getMessage() for r in caplog.records)
