"""prepare: a binary 0/255 mask given as instance labels is refused, or split into blobs on request."""

from __future__ import annotations

import logging

import imageio.v3 as iio
import numpy as np
import pytest
from scipy import ndimage as ndi

from nucleiseg.cli import main
from nucleiseg.data import prepare_dataset
from nucleiseg.data.paired import BinaryMaskError, check_binary_mask

from .conftest import FLUO_A, FLUO_B, make_paired, read_tif


def _binarise(paired, image_id, value=255):
    """Overwrite one label file of the paired layout with a 0/value mask of the same nuclei."""
    (path,) = (paired / "labels").glob(f"{image_id}.*")
    labels = iio.imread(path) if path.suffix == ".png" else read_tif(path)
    path.unlink()
    out = paired / "labels" / f"{image_id}.png"
    iio.imwrite(out, np.where(labels > 0, value, 0).astype(np.uint8))
    return out, labels


def test_instance_labels_and_single_blobs_pass_unchanged():
    labels = np.zeros((8, 8), np.uint16)
    labels[1:3, 1:3], labels[5:7, 5:7] = 1, 2
    assert check_binary_mask(labels, "a.tif")[0] is labels
    one = np.zeros((8, 8), np.uint8)
    one[2:5, 2:5] = 255
    assert check_binary_mask(one, "a.png") == (one, None)  # one nucleus: nothing to tell apart
    assert check_binary_mask(np.zeros((4, 4), np.uint8), "a.png")[1] is None
    diagonal = np.eye(4, dtype=np.uint8)  # 8-connected: one blob
    assert check_binary_mask(diagonal, "a.png")[1] is None


def test_a_binary_mask_is_refused_by_default_in_one_line(tmp_path, capsys):
    paired = make_paired(tmp_path / "annotations")
    mask_path, truth = _binarise(paired, FLUO_B)
    n_blobs = ndi.label(truth > 0, structure=np.ones((3, 3)))[1]
    with pytest.raises(BinaryMaskError) as info:
        prepare_dataset(paired, tmp_path / "cache", workers=1, progress=False)
    assert str(info.value) == (f"{mask_path}: a binary mask (one value over {n_blobs} separate blobs), not instance "
                               "labels: each nucleus needs its own value; to number each blob as one nucleus, "
                               "choose to split binary masks")
    # through a process pool, and from the command line in its own words
    assert main(["prepare", str(paired), "--out", str(tmp_path / "cache2"), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"nucleiseg prepare: error: {mask_path}: a binary mask")
    assert err[-1].endswith("use --binary-masks split")
    assert not any("Traceback" in line for line in err)


def test_split_numbers_each_blob_with_a_warning(tmp_path, caplog):
    paired = make_paired(tmp_path / "annotations")
    mask_path, truth = _binarise(paired, FLUO_A, value=1)  # 0/1 masks too
    caplog.set_level(logging.WARNING, logger="nucleiseg")
    result = prepare_dataset(paired, tmp_path / "cache", workers=1, progress=False, binary_masks="split")
    assert FLUO_A in result.processed
    labels = read_tif(tmp_path / "cache" / "labels" / f"{FLUO_A}.tif")
    blobs, n = ndi.label(truth > 0, structure=np.ones((3, 3)))
    assert labels.max() == n > 1 and n <= len(np.unique(truth)) - 1  # touching nuclei stay merged
    np.testing.assert_array_equal(labels > 0, truth > 0)
    # every blob is one label, and every label one blob
    for k in range(1, n + 1):
        assert len(np.unique(labels[blobs == k])) == 1
    assert f"{mask_path}: a binary mask (one value over {n} separate blobs)" in caplog.text
    assert "each blob numbered as one nucleus; touching nuclei stay merged" in caplog.text
    row = result.table.set_index("image_id").loc[FLUO_A]
    assert row["n_nuclei"] == n


def test_unknown_choice_is_refused(tmp_path):
    from nucleiseg.errors import NucleisegError

    with pytest.raises(NucleisegError, match="binary_masks must be one of refuse, split"):
        prepare_dataset(tmp_path, tmp_path / "cache", binary_masks="merge")
