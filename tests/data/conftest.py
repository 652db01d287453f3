"""Shared fixtures of the data tests: the small DSB2018 sample and layouts made from it.

``tests/fixtures/dsb/stage1_train`` holds four DSB2018 stage1_train images (CC0)
with their masks: two fluorescence tiles of one mosaic group (mosaic062), one
stained-tissue image, and a 256x256 crop of a grey brightfield image (its masks
cropped alike, masks left empty by the crop removed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DSB = FIXTURES / "dsb"
DSB_TRAIN = DSB / "stage1_train"

FLUO_A = "0b2e702f90aee4fff2bc6e4326308d50cf04701082e718d4f831c8959fbcda93"
FLUO_B = "1e61ecf354cb93a62a9561db87a53985fb54e001444f98112ed0fc623fad793e"
TISSUE = "af576e8ec3a8d0b57eb6a311299e9e4fd2047970d3dd9d6f52e54ea6a91109da"
BRIGHTFIELD = "1a11552569160f0b_crop256"
KINDS = {FLUO_A: "fluorescence", FLUO_B: "fluorescence", TISSUE: "tissue", BRIGHTFIELD: "brightfield"}


def mask_files(root: Path, image_id: str) -> list[Path]:
    return sorted((root / image_id / "masks").glob("*.png"))


def read_masks(root: Path, image_id: str) -> list[np.ndarray]:
    import imageio.v3 as iio

    return [np.asarray(iio.imread(p)) > 0 for p in mask_files(root, image_id)]


def read_tif(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


@pytest.fixture
def dsb_copy(tmp_path: Path) -> Path:
    """A writable copy of the DSB fixture (parent folder holding stage1_train/ and mosaic_groups.csv)."""
    dest = tmp_path / "dsb"
    shutil.copytree(DSB, dest)
    return dest


@pytest.fixture(scope="session")
def dsb_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DSB fixture prepared once (read-only for the tests using it)."""
    from nucleiseg.data.cache import prepare_dataset

    out = tmp_path_factory.mktemp("cache") / "dsb"
    prepare_dataset(DSB, out, workers=1, progress=False)
    return out


def make_paired(dest: Path, root: Path = DSB_TRAIN) -> Path:
    """Write the DSB fixture as images/ + labels/ in the formats annotation tools write.

    Label values are not consecutive (object k gets 7 * k + 100); the files are a
    32-bit TIFF, a 16-bit TIFF, a 16-bit PNG and an 8-bit PNG (values wrapped
    into 8 bits but still distinct), and the images change format too.
    """
    import imageio.v3 as iio
    import tifffile

    from nucleiseg.data.dsb import merge_masks

    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir(parents=True)
    writers = {
        FLUO_A: ("png", lambda p, lab: tifffile.imwrite(p.with_suffix(".tif"), lab.astype(np.uint32))),
        FLUO_B: ("tif", lambda p, lab: tifffile.imwrite(p.with_suffix(".tiff"), lab.astype(np.uint16))),
        TISSUE: ("png", lambda p, lab: iio.imwrite(p.with_suffix(".png"), lab.astype(np.uint16))),
        BRIGHTFIELD: ("png", lambda p, lab: iio.imwrite(p.with_suffix(".png"), (lab % 251).astype(np.uint8))),
    }
    for image_id, (image_ext, write_labels) in writers.items():
        image = iio.imread(root / image_id / "images" / f"{image_id}.png")
        if image_ext == "tif":
            tifffile.imwrite(dest / "images" / f"{image_id}.tif", image)
        else:
            iio.imwrite(dest / "images" / f"{image_id}.png", image)
        labels, _ = merge_masks(read_masks(root, image_id))
        values = np.where(labels > 0, 7 * labels.astype(np.int64) + 100, 0)
        write_labels(dest / "labels" / image_id, values)
    return dest
