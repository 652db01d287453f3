"""Decompression bombs: an image whose header claims more than the limit is refused before decoding."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from nucleiseg.errors import ImageReadError, NucleisegError
from nucleiseg.io import MAX_IMAGE_BYTES, max_image_bytes, read_image, read_labels

SIDE = 50_000  # 2.3 GiB as 8-bit grey: above the 2 GiB default


def _tiff(path, side=SIDE, pages=1, **kwargs):
    """A tiny TIFF whose tags claim ``pages`` x side x side pixels."""
    tifffile.imwrite(path, np.zeros((pages, 16, 16), np.uint8) if pages > 1 else np.zeros((16, 16), np.uint8),
                     metadata=None, **kwargs)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page in tif.pages:
            page.tags["ImageWidth"].overwrite(side)
            page.tags["ImageLength"].overwrite(side)
    return path


def _png(path, side=SIDE):
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _bmp(path, side=SIDE):
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[18:26] = struct.pack("<ii", side, side)
    path.write_bytes(bytes(data))
    return path


def _jpeg(path, side=SIDE):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    path.write_bytes(bytes(data))
    return path


BOMBS = {
    "tiff": lambda d: _tiff(d / "bomb.tif"),
    "tiff-zlib": lambda d: _tiff(d / "bomb-zlib.tif", compression="zlib"),
    "bigtiff": lambda d: _tiff(d / "bomb-big.tiff", bigtiff=True),
    "tiff-3-pages": lambda d: _tiff(d / "bomb-pages.tif", side=30_000, pages=3),
    "png": lambda d: _png(d / "bomb.png"),
    "bmp": lambda d: _bmp(d / "bomb.bmp"),
    "jpeg": lambda d: _jpeg(d / "bomb.jpg"),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_a_small_file_claiming_a_huge_image_is_one_line_before_decoding(kind, tmp_path, capfd):
    path = BOMBS[kind](tmp_path)
    assert path.stat().st_size < 2000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        for read in (read_image, read_labels):
            with pytest.raises(ImageReadError) as info:
                read(path)
            message = str(info.value)
            assert message.startswith(f"{path}: image claims ") and "GiB decoded" in message
            assert "NUCLEISEG_MAX_IMAGE_BYTES" in message and "\n" not in message
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # nothing of the claimed size was allocated
    assert time.perf_counter() - started < 2
    out, err = capfd.readouterr()
    assert out == err == ""  # no decoder chatter besides the one error


def test_the_limit_is_overridable(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(np.full((64, 48), 7, np.uint8)).save(path)  # 3072 bytes decoded
    assert read_image(path).shape == (64, 48)
    with pytest.raises(ImageReadError, match="image claims 64 x 48 pixels"):
        read_image(path, max_bytes=3000)
    assert read_image(path, max_bytes=3072).shape == (64, 48)
    monkeypatch.setenv("NUCLEISEG_MAX_IMAGE_BYTES", "2k")
    assert max_image_bytes() == 2048
    with pytest.raises(ImageReadError, match="above the 0.0 GiB limit"):
        read_image(path)
    assert read_image(path, max_bytes=0).shape == (64, 48)  # the keyword wins; 0 = no limit
    monkeypatch.setenv("NUCLEISEG_MAX_IMAGE_BYTES", "0")
    assert max_image_bytes() is None and read_image(path).shape == (64, 48)
    monkeypatch.setenv("NUCLEISEG_MAX_IMAGE_BYTES", "16G")
    assert max_image_bytes() == 16 * 2**30
    monkeypatch.setenv("NUCLEISEG_MAX_IMAGE_BYTES", "lots")
    with pytest.raises(NucleisegError, match="NUCLEISEG_MAX_IMAGE_BYTES='lots' is not a size"):
        read_image(path)
    monkeypatch.delenv("NUCLEISEG_MAX_IMAGE_BYTES")
    assert max_image_bytes() == MAX_IMAGE_BYTES == 2 * 2**30


def test_tiff_limit_counts_every_page_and_the_sample_size(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint16))
    with pytest.raises(ImageReadError, match=r"3 x 32 x 32 pixels"):
        read_image(path, max_bytes=3 * 32 * 32 * 2 - 1)
    # within the limit it is read, as before (three channels)
    assert read_image(path, max_bytes=3 * 32 * 32 * 2).shape == (32, 32, 3)


def test_images_within_our_limit_but_above_pillows_are_read(tmp_path, monkeypatch):
    # Pillow refuses images above 2 x Image.MAX_IMAGE_PIXELS itself; our limit decides instead
    path = tmp_path / "wide.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = read_image(path)
    assert image.shape == (64, 64) and int(image[-1, -1]) == 64 * 64 - 1
    assert Image.MAX_IMAGE_PIXELS == 1000  # and Pillow's setting is left as it was
