"""Reading images and writing the output formats (overlay, ImageJ ROIs, GeoJSON, TIFFs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nucleiseg.errors import ImageReadError
from nucleiseg.io import (
    OVERLAY_COLOURS,
    encode_png,
    nucleus_outlines,
    read_image,
    read_labels,
    write_geojson,
    write_imagej_rois,
    write_labels_tiff,
    write_overlay,
    write_png,
    write_probabilities_tiff,
)


def _labels() -> np.ndarray:
    """Three nuclei: a rectangle, a disc with a hole, and one touching the image border."""
    from skimage.draw import disk

    labels = np.zeros((60, 80), np.int32)
    labels[5:15, 10:30] = 1
    rr, cc = disk((38, 40), 12, shape=labels.shape)
    labels[rr, cc] = 2
    labels[36:40, 38:42] = 0  # a hole: the outline is still the outer boundary
    labels[50:60, 70:80] = 5  # touches the bottom-right corner; label values need not be consecutive
    return labels


def _bbox(labels: np.ndarray, k: int) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(labels == k)
    return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


# ----------------------------------------------------------------------------- reading
def test_read_image_reports_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = tmp_path / "good.png"
    write_png(good, np.full((20, 20), 7, np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    for path, words in [(empty, "empty"), (text, "cannot be read"), (truncated, "cannot be read"),
                        (tmp_path / "missing.png", "no such file")]:
        with pytest.raises(ImageReadError, match=words) as info:
            read_image(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 3), (1, 20), (20, 1, 4)])
def test_read_image_keeps_thin_images_2d(tmp_path: Path, shape: tuple) -> None:
    write_png(tmp_path / "thin.png", np.full(shape, 9, np.uint8))
    assert read_image(tmp_path / "thin.png").shape == shape


def test_read_image_16bit_grey_tiff(tmp_path: Path) -> None:
    import tifffile

    image = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)
    tifffile.imwrite(tmp_path / "a.tif", image)
    out = read_image(tmp_path / "a.tif")
    assert out.dtype == np.uint16 and np.array_equal(out, image)


# ----------------------------------------------------------------------------- TIFFs
def test_labels_tiff_round_trip_16_and_32_bit(tmp_path: Path) -> None:
    labels = _labels()
    write_labels_tiff(tmp_path / "l16.tif", labels)
    back = read_labels(tmp_path / "l16.tif")
    assert back.dtype == np.uint16 and np.array_equal(back, labels)
    big = labels.astype(np.int64) * 20_000  # labels past 65,535
    write_labels_tiff(tmp_path / "l32.tif", big)
    back = read_labels(tmp_path / "l32.tif")
    assert back.dtype == np.uint32 and np.array_equal(back, big)


def test_label_stacks_are_refused_in_words_that_fit(tmp_path: Path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "two.tif", np.zeros((2, 20, 30), np.uint16))
    with pytest.raises(ImageReadError, match=r"two.tif: expected a single-channel label image, got 2 channels or "
                                             r"pages of 20x30: save the labels as one plane"):
        read_labels(tmp_path / "two.tif")
    grey_rgb = np.repeat(_labels()[..., None].astype(np.uint8), 3, axis=2)  # a grey RGB PNG: its first channel
    write_png(tmp_path / "rgb.png", grey_rgb)
    assert np.array_equal(read_labels(tmp_path / "rgb.png"), grey_rgb[..., 0])


def test_probabilities_tiff(tmp_path: Path) -> None:
    import tifffile

    probs = np.random.default_rng(0).random((3, 17, 23), dtype=np.float32)
    write_probabilities_tiff(tmp_path / "p.tif", probs, ["body", "contour", "touch"])
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.series[0].axes == "CYX"
        assert tif.imagej_metadata["Labels"] == ["body", "contour", "touch"]
        back = tif.asarray()
    assert back.dtype == np.float32 and np.array_equal(back, probs)
    with pytest.raises(ValueError, match="channel names"):
        write_probabilities_tiff(tmp_path / "q.tif", probs, ["body"])


# ----------------------------------------------------------------------------- overlay
@pytest.mark.parametrize("background", [0, 255])
def test_overlay_outlines_each_nucleus_in_its_colour(tmp_path: Path, background: int) -> None:
    import imageio.v3 as iio
    from skimage.segmentation import find_boundaries

    labels = _labels()
    rgb = np.full(labels.shape + (3,), background, np.uint8)
    write_overlay(tmp_path / "o.png", rgb, labels)
    out = iio.imread(tmp_path / "o.png")
    assert out.shape == rgb.shape and out.dtype == np.uint8
    inner = find_boundaries(labels, mode="inner")
    for k in (1, 2, 5):
        colour = OVERLAY_COLOURS[(k - 1) % len(OVERLAY_COLOURS)]
        assert (out[inner & (labels == k)] == colour).all()
    # Nucleus interiors and far background are untouched; the halo is dark on a white image.
    assert (out[8:12, 14:26] == background).all() and (out[25, 60] == background).all()
    halo = find_boundaries(labels, mode="outer") & (labels == 0)
    assert (out[halo] == background // 3).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]  # atomic: no temporary left


def test_overlay_bands_match_whole_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imageio.v3 as iio

    from nucleiseg import io

    labels = _labels()
    rgb = np.random.default_rng(1).integers(0, 255, labels.shape + (3,), dtype=np.uint8)
    write_overlay(tmp_path / "whole.png", rgb, labels)
    monkeypatch.setattr(io, "_BAND_ROWS", 7)
    write_overlay(tmp_path / "bands.png", rgb, labels)
    assert np.array_equal(iio.imread(tmp_path / "whole.png"), iio.imread(tmp_path / "bands.png"))


def test_overlay_rejects_mismatched_image(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rgb must be uint8"):
        write_overlay(tmp_path / "o.png", np.zeros((10, 10, 3), np.uint8), np.zeros((10, 11), np.int32))


# ----------------------------------------------------------------------------- polygons
def test_outlines_bbox_equals_nucleus_bbox() -> None:
    labels = _labels()
    seen = []
    for k, xy in nucleus_outlines(labels):
        seen.append(k)
        assert np.array_equal(xy[0], xy[-1])  # closed ring
        r0, c0, r1, c1 = _bbox(labels, k)
        assert xy[:, 0].min() == c0 and xy[:, 0].max() == c1  # x is the column
        assert xy[:, 1].min() == r0 and xy[:, 1].max() == r1
    assert seen == [1, 2, 5]
    assert list(nucleus_outlines(np.zeros((5, 5), np.int32))) == []


def test_imagej_rois_read_back(tmp_path: Path) -> None:
    import roifile

    labels = _labels()
    write_imagej_rois(tmp_path / "rois.zip", labels)
    rois = roifile.roiread(tmp_path / "rois.zip")
    assert [r.name for r in rois] == ["1", "2", "5"]
    for roi in rois:
        # the disc with a hole is a composite ROI (tests/test_io_polygons.py); coordinates() is its outer ring
        assert roi.roitype == (roifile.ROI_TYPE.RECT if roi.name == "2" else roifile.ROI_TYPE.POLYGON)
        assert roi.composite == (roi.name == "2")
        xy = roi.coordinates()
        r0, c0, r1, c1 = _bbox(labels, int(roi.name))
        assert (xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()) == (c0, r0, c1, r1)
    write_imagej_rois(tmp_path / "none.zip", np.zeros((9, 9), np.uint16))
    assert roifile.roiread(tmp_path / "none.zip") == []


def test_geojson_read_back(tmp_path: Path) -> None:
    labels = _labels()
    write_geojson(tmp_path / "n.geojson", labels)
    data = json.loads((tmp_path / "n.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    assert [f["properties"]["label"] for f in data["features"]] == [1, 2, 5]
    for feature in data["features"]:
        assert feature["type"] == "Feature"
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"] == {"name": "Nucleus"}
        assert feature["geometry"]["type"] == "Polygon"
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert len(ring) >= 4 and np.array_equal(ring[0], ring[-1])
        r0, c0, r1, c1 = _bbox(labels, props["label"])
        assert (ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()) == (c0, r0, c1, r1)
    write_geojson(tmp_path / "e.geojson", np.zeros((4, 4), np.int32))
    assert json.loads((tmp_path / "e.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


def test_writers_reject_bad_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="integers"):
        write_geojson(tmp_path / "x.geojson", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        write_imagej_rois(tmp_path / "x.zip", np.zeros((2, 4, 4), np.int32))


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    # mkstemp's 0600 must not leak into outputs, also from writers that replace the temporary
    # file they are handed (safetensors does), so a model file can be shared with a group.
    from nucleiseg.io import _UMASK
    from nucleiseg.models import UNetPlusPlus, save_model

    save_model(tmp_path / "m.safetensors", UNetPlusPlus(widths=(4, 8)))
    write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    for name in ("m.safetensors", "a.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~_UMASK, name


def test_label_edges_are_find_boundaries() -> None:
    """label_edges, masked, gives scikit-image's inner and outer boundaries exactly (overlays keep their bytes)."""
    from skimage.segmentation import find_boundaries

    from nucleiseg.io import label_edges

    rng = np.random.default_rng(3)
    for _ in range(200):
        labels = rng.integers(0, 4, (rng.integers(1, 16), rng.integers(1, 16)))
        edges = label_edges(labels)
        assert np.array_equal(edges & (labels != 0), find_boundaries(labels, mode="inner"))
        assert np.array_equal(edges & (labels == 0), find_boundaries(labels, mode="outer") & (labels == 0))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (37, 301), (29, 17, 1), (29, 17, 2), (40, 33, 3), (40, 33, 4)])
def test_png_decodes_to_the_same_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype, shape) -> None:
    """encode_png's files read back bit for bit by libpng (OpenCV), in one band or in bands of a few rows."""
    import cv2

    import nucleiseg.io as nio

    image = np.random.default_rng(len(shape) + shape[0]).integers(0, np.iinfo(dtype).max, shape, dtype=dtype,
                                                                   endpoint=True)
    want = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    for band_bytes in (nio.PNG_BAND_BYTES, 97):  # 97 bytes: a band per row or two, many IDAT chunks
        monkeypatch.setattr(nio, "PNG_BAND_BYTES", band_bytes)
        write_png(tmp_path / "a.png", image)
        got = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED)
        if want.ndim == 3:  # OpenCV gives BGR(A), and grey + alpha as BGRA
            got = got[..., [0, 3]] if want.shape[2] == 2 else got[..., [2, 1, 0, 3][: want.shape[2]]]
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    read = read_image(tmp_path / "a.png")  # at the file's own depth: 16-bit colour too (Pillow alone gives 8 bits)
    assert read.dtype == dtype
    np.testing.assert_array_equal(read, want)
    if dtype == np.uint16:  # big-endian input, as a file of that byte order reads, gives the same file
        write_png(tmp_path / "b.png", image.astype(">u2"))
        assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()


def test_png_rejects_what_it_cannot_write(tmp_path: Path) -> None:
    for bad in (np.zeros((4, 4), np.float32), np.zeros((0, 4), np.uint8), np.zeros((4, 4, 5), np.uint8),
                np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="PNG needs"):
            write_png(tmp_path / "bad.png", bad)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    assert b"".join(encode_png(np.zeros((2, 2), np.uint8), level=0))[:8] == b"\x89PNG\r\n\x1a\n"



def test_16bit_colour_png_keeps_its_depth(tmp_path: Path) -> None:
    """A 12-bit camera's RGB saved as 16-bit PNG is not crushed to 8 bits (Pillow's >> 8 would leave 16 levels)."""
    image = np.random.default_rng(5).integers(0, 4096, (40, 30, 3), dtype=np.uint16)
    write_png(tmp_path / "rgb16.png", image)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.png"), image)
    data = (tmp_path / "rgb16.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png: cannot be read as an image"):
        read_image(tmp_path / "cut.png")


# ----------------------------------------------------------------------------- what a file holds, as a viewer shows it
def _dsb_rgb() -> np.ndarray:
    """A real DSB image (stained tissue), 8-bit RGB."""
    train = Path(__file__).resolve().parent / "fixtures" / "dsb" / "stage1_train"
    image_id = "af576e8ec3a8d0b57eb6a311299e9e4fd2047970d3dd9d6f52e54ea6a91109da"
    return read_image(train / image_id / "images" / f"{image_id}.png")[:96, :128, :3]


def test_cmyk_jpeg_reads_as_rgb(tmp_path: Path) -> None:
    """A CMYK JPEG (what print workflows save) is its RGB, not 4 channels taken for RGBA."""
    from PIL import Image

    rgb = _dsb_rgb()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"  # the file really is CMYK
    out = read_image(tmp_path / "cmyk.jpg")
    assert out.shape == rgb.shape and out.dtype == np.uint8
    same = read_image(tmp_path / "rgb.jpg").astype(int)
    assert np.abs(out.astype(int) - same).mean() < 3  # JPEG's losses apart, the same colours


def test_cmyk_tiff_reads_as_rgb(tmp_path: Path) -> None:
    """A CMYK (separated) TIFF is converted as Pillow converts CMYK: (255 - C)(255 - K) / 255."""
    import tifffile
    from PIL import Image

    cmyk = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "cmyk.tif", cmyk, photometric="separated")
    expected = np.asarray(Image.fromarray(cmyk, mode="CMYK").convert("RGB"))
    out = read_image(tmp_path / "cmyk.tif")
    assert out.shape == (20, 30, 3)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("dtype, bits", [(np.uint8, None), (np.uint16, None), (np.uint16, 12), (np.float32, None)])
def test_min_is_white_tiff_reads_like_min_is_black(tmp_path: Path, dtype, bits) -> None:
    """A grey TIFF marked min-is-white (0 = white) reads as the same image stored min-is-black."""
    import tifffile

    grey = _dsb_rgb()[..., 1].astype(np.float64) / 255
    top = {np.uint8: 255, np.uint16: (1 << bits) - 1 if bits else 65535, np.float32: 1.0}[dtype]
    black = (grey * top).astype(dtype)
    white = (top - black).astype(dtype) if dtype != np.float32 else -black
    kwargs = {"bitspersample": bits} if bits else {}
    tifffile.imwrite(tmp_path / "black.tif", black, photometric="minisblack", **kwargs)
    tifffile.imwrite(tmp_path / "white.tif", white, photometric="miniswhite", **kwargs)
    np.testing.assert_array_equal(read_image(tmp_path / "white.tif"), read_image(tmp_path / "black.tif"))


def test_bilevel_tiff_keeps_its_bits(tmp_path: Path) -> None:
    """A boolean mask saved by tifffile (which marks every bilevel image min-is-white) reads as it was saved."""
    import tifffile

    mask = _dsb_rgb()[..., 1] > 100
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
        assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.MINISWHITE
    np.testing.assert_array_equal(read_image(tmp_path / "mask.tif"), mask.astype(np.uint8))


def test_format_is_read_from_the_content_not_the_name(tmp_path: Path) -> None:
    """A PNG named .tif and a TIFF named .png read as what they are, the same as under their own names."""
    import tifffile

    from nucleiseg.io import header_bytes

    grey = _dsb_rgb()[..., 0]
    write_png(tmp_path / "png_as.tif", grey)
    write_png(tmp_path / "png_as.TIFF", grey)
    for name in ("png_as.tif", "png_as.TIFF"):
        np.testing.assert_array_equal(read_image(tmp_path / name), grey)
        assert header_bytes(tmp_path / name) == grey.nbytes
    planar = np.stack([grey.astype(np.uint16) * 100, grey.astype(np.uint16), 65535 - grey.astype(np.uint16)])
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="minisblack")  # 3 pages of 16 bits: not for Pillow
    (tmp_path / "tif_as.png").write_bytes((tmp_path / "planar.tif").read_bytes())
    as_tiff = read_image(tmp_path / "planar.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "tif_as.png"), as_tiff)
    np.testing.assert_array_equal(read_image(tmp_path / "tif_as.png", channel=3), as_tiff[..., 2])
    assert header_bytes(tmp_path / "tif_as.png") == header_bytes(tmp_path / "planar.tif") == planar.nbytes


# ----------------------------------------------------------------------------- pixel size
def test_pixel_size_read_from_imagej_ome_and_resolution_tags(tmp_path: Path) -> None:
    import tifffile

    from nucleiseg.io import PixelSize, read_pixel_size

    image = np.zeros((20, 30), np.uint8)
    tifffile.imwrite(tmp_path / "ij.tif", image, imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"unit": "micron"})
    assert read_pixel_size(tmp_path / "ij.tif") == PixelSize(0.325, 0.325, "um")
    tifffile.imwrite(tmp_path / "ij_nm.tif", image, imagej=True, resolution=(1 / 65, 1 / 80), metadata={"unit": "nm"})
    assert read_pixel_size(tmp_path / "ij_nm.tif") == PixelSize(65.0, 80.0, "nm")
    tifffile.imwrite(tmp_path / "ome.ome.tif", image, metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25})
    assert read_pixel_size(tmp_path / "ome.ome.tif") == PixelSize(0.5, 0.25, "um")
    tifffile.imwrite(tmp_path / "cm.tif", image, resolution=(10_000 / 0.65, 10_000 / 0.65), resolutionunit="CENTIMETER")
    assert read_pixel_size(tmp_path / "cm.tif") == PixelSize(0.65, 0.65, "um")
    tifffile.imwrite(tmp_path / "inch.tif", image, resolution=(25_400, 25_400), resolutionunit="INCH")
    assert read_pixel_size(tmp_path / "inch.tif") == PixelSize(1.0, 1.0, "um")
    # none recorded: tifffile's default (1 pixel per no unit), an image editor's 72 dpi, a PNG, an unreadable file
    tifffile.imwrite(tmp_path / "plain.tif", image)
    tifffile.imwrite(tmp_path / "72dpi.tif", image, resolution=(72, 72), resolutionunit="INCH")
    write_png(tmp_path / "plain.png", image)
    (tmp_path / "junk.tif").write_bytes(b"II*\0 not really")
    for name in ("plain.tif", "72dpi.tif", "plain.png", "junk.tif", "missing.tif"):
        assert read_pixel_size(tmp_path / name) is None, name


def test_pixel_size_read_from_png_phys(tmp_path: Path) -> None:
    from PIL import Image

    from nucleiseg.io import PixelSize, read_pixel_size

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "cal.png", dpi=(25_400 / 0.5, 25_400 / 0.5))
    size = read_pixel_size(tmp_path / "cal.png")
    assert size.unit == "um" and abs(size.x - 0.5) < 1e-3 and abs(size.y - 0.5) < 1e-3
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "72.png", dpi=(72, 72))
    assert read_pixel_size(tmp_path / "72.png") is None
    assert isinstance(size, PixelSize)


@pytest.mark.parametrize("top", [5, 70_000])  # ImageJ's 16-bit labels; plain 32-bit TIFF
def test_labels_tiff_keeps_the_pixel_size(tmp_path: Path, top: int) -> None:
    """Written as ImageJ reads it: Fiji and napari measure the labels in micrometres, not pixels."""
    import tifffile

    from nucleiseg.io import PixelSize, read_pixel_size

    tifffile.imwrite(tmp_path / "image.tif", np.zeros((60, 80), np.uint8), imagej=True,
                     resolution=(1 / 0.325, 1 / 0.325), metadata={"unit": "um"})
    size = read_pixel_size(tmp_path / "image.tif")
    labels = (_labels() > 0) * top
    write_labels_tiff(tmp_path / "labels.tif", labels, pixel_size=size)
    assert read_pixel_size(tmp_path / "labels.tif") == PixelSize(0.325, 0.325, "um")
    np.testing.assert_array_equal(read_labels(tmp_path / "labels.tif"), labels)
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        page = tif.pages.first
        xres = page.tags["XResolution"].value
        assert abs(xres[0] / xres[1] - 1 / 0.325 * (1 if top < 65536 else 10_000)) < 1e-6
        if top < 65536:
            assert tif.imagej_metadata["unit"] == "um"  # ImageJ's own: pixels per unit, the unit in its metadata
        else:
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    write_labels_tiff(tmp_path / "bare.tif", labels)  # none given: none written
    assert read_pixel_size(tmp_path / "bare.tif") is None
    with pytest.raises(ValueError, match="pixel_size"):
        write_labels_tiff(tmp_path / "bad.tif", labels, pixel_size=(0, 1, "um"))


def test_probabilities_tiff_keeps_the_pixel_size(tmp_path: Path) -> None:
    import tifffile

    from nucleiseg.io import PixelSize, read_pixel_size

    probs = np.random.default_rng(0).random((3, 17, 23), dtype=np.float32)
    write_probabilities_tiff(tmp_path / "p.tif", probs, ["body", "contour", "touch"],
                             pixel_size=PixelSize(0.325, 0.5, "µm"))
    assert read_pixel_size(tmp_path / "p.tif") == PixelSize(0.325, 0.5, "um")
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.imagej_metadata["unit"] == "um" and tif.imagej_metadata["Labels"] == ["body", "contour", "touch"]
        assert tif.series[0].axes == "CYX" and np.array_equal(tif.asarray(), probs)


def test_atomic_writes_of_names_near_the_systems_limit(tmp_path: Path) -> None:
    """A 250-character file name (the limit is 255 bytes) leaves no room for the temporary name's additions."""
    path = tmp_path / ("n" * 239 + "_labels.tif")
    write_labels_tiff(path, _labels())
    assert np.array_equal(read_labels(path), _labels()) and [p.name for p in tmp_path.iterdir()] == [path.name]
