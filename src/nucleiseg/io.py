"""Reading images robustly and writing outputs atomically.

Every reader here turns a user mistake (missing file, empty file, not an image)
into :class:`~nucleiseg.errors.ImageReadError` naming the file, so the command
line can report it in one line and go on with the other images.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import ImageReadError, NucleisegError

_UMASK = os.umask(0)
os.umask(_UMASK)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2-D image (grey, RGB or RGBA; 8/16-bit or float) as stored.

    Parameters
    ----------
    path : str or Path
        PNG, JPEG, TIFF or BMP file.

    Returns
    -------
    image : ndarray
        ``(H, W)`` or ``(H, W, C)`` with C in 1..4, in the file's own dtype.
        Channel-first TIFFs ``(C, H, W)`` are moved to channel-last.

    Raises
    ------
    ImageReadError
        The file does not exist, is empty, cannot be decoded, or is not 2-D.

    Examples
    --------
    >>> img = read_image("tests/fixtures/dsb/stage1_train/.../images/....png")  # doctest: +SKIP
    >>> img.shape, img.dtype  # doctest: +SKIP
    ((256, 256, 4), dtype('uint8'))
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError("no such file", path)
    if path.is_dir():
        raise ImageReadError("is a folder, expected an image file", path)
    if path.stat().st_size == 0:
        raise ImageReadError("empty file (0 bytes)", path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            image = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            with warnings.catch_warnings():  # imageio's plugin probing announces its own deprecations
                warnings.simplefilter("ignore", DeprecationWarning)
                image = iio.imread(path)
    except Exception as exc:  # decoders raise many types; all mean "not a readable image"
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            formats = ", ".join(sorted({s.lstrip(".").upper() for s in IMAGE_SUFFIXES} - {"JPEG", "TIFF"}))
            raise ImageReadError(
                f"cannot be read as an image: {path.suffix or 'no extension'} is not a format nucleiseg reads "
                f"({formats}); convert it first, e.g. with Fiji (Bio-Formats) to TIFF", path) from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(f"cannot be read as an image ({reason})", path) from None
    image = np.asarray(image)
    return _as_2d_image(image, path)


def _as_2d_image(image: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze singleton axes and bring channels last, or refuse a stack."""
    if image.dtype == bool:
        image = image.astype(np.uint8)
    thin = (image.ndim == 2 and 1 in image.shape) or (
        image.ndim == 3 and image.shape[-1] in (1, 2, 3, 4) and 1 in image.shape[:2]
    )
    if not thin:  # squeezing a 1-pixel-high or -wide image would lose a spatial axis
        image = np.squeeze(image)
    if image.ndim == 3 and image.shape[0] in (1, 2, 3, 4) and image.shape[-1] > 4:
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 2, 3, 4)):
        if image.size == 0:
            raise ImageReadError("image has no pixels", path)
        return image
    hint = ""
    if image.ndim >= 3:  # what a microscope's multi-plane file usually is
        hint = ("; a z-stack, time series or multi-channel stack? Segment one 2-D plane or a projection "
                "(Fiji: Image > Stacks > Z Project), saved as its own image")
    raise ImageReadError(f"expected a 2-D grey, RGB or RGBA image, got an array of shape {image.shape}{hint}", path)


def read_csv_rows(path: str | Path, columns: Sequence[str], what: str = "CSV") -> list[dict[str, str]]:
    """The rows of a CSV file with a header, checking it has ``columns``.

    Values are stripped strings ('' for empty cells); a UTF-8 byte-order mark is
    accepted (spreadsheets write one).

    Raises
    ------
    NucleisegError
        The file is missing, unreadable, or lacks one of ``columns``.

    Examples
    --------
    >>> rows = read_csv_rows("mosaic_groups.csv", ["ImageId", "mosaic_group"])  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise NucleisegError(f"{what} not found", path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise NucleisegError(f"expected a CSV with columns {','.join(columns)}, missing {', '.join(missing)}", path)
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise NucleisegError(f"cannot be read as a CSV ({exc})", path) from None


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A reader never sees a half-written file, and an interrupted write leaves the
    previous file (if any) untouched.

    Examples
    --------
    >>> with atomic_path("out.csv") as tmp:  # doctest: +SKIP
    ...     table.to_csv(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files, and some writers (safetensors) replace the file they are
        # given: set the usual permissions on what was written, just before it takes the name.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8/uint16 grey, RGB or RGBA array as PNG, atomically."""
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.ascontiguousarray(image), extension=".png")


def write_labels_tiff(path: str | Path, labels: np.ndarray) -> None:
    """Write an instance label image as an ImageJ-compatible TIFF, atomically.

    16-bit when the largest label fits, else 32-bit, so napari, Fiji and QuPath
    open it as labels with one integer per nucleus and 0 as background.
    """
    import tifffile

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    top = int(labels.max()) if labels.size else 0
    if labels.min(initial=0) < 0:
        raise ValueError("labels must be non-negative")
    dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
    # ImageJ's hyperstack format has no 32-bit integer type; write plain TIFF then.
    imagej = dtype == np.uint16
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), imagej=imagej, compression=None if imagej else "zlib")


def read_labels(path: str | Path) -> np.ndarray:
    """Read an instance label image (TIFF or PNG) as a 2-D integer array."""
    labels = read_image(path)
    if labels.ndim == 3:
        if labels.shape[-1] in (3, 4) and np.all(labels[..., 0:1] == labels[..., :3]):
            labels = labels[..., 0]
        else:
            raise ImageReadError("expected a single-channel label image, got colour channels", path)
    if not np.issubdtype(labels.dtype, np.integer):
        if np.any(labels != np.round(labels)):
            raise ImageReadError("label image holds non-integer values", path)
        labels = labels.astype(np.int64)
    return labels


# ------------------------------------------------------------------------------ output formats
#: Outline colours of :func:`write_overlay`, cycled by label: saturated hues that
#: stand out on dark fluorescence; a darkened 1-pixel halo keeps them visible on
#: bright brightfield and stained-tissue images too.
OVERLAY_COLOURS = np.array(
    [
        (255, 255, 0),  # yellow
        (0, 255, 255),  # cyan
        (255, 0, 255),  # magenta
        (0, 255, 0),  # green
        (255, 128, 0),  # orange
        (0, 128, 255),  # azure
        (255, 0, 128),  # rose
        (128, 255, 0),  # chartreuse
        (255, 64, 64),  # light red
        (160, 96, 255),  # violet
    ],
    dtype=np.uint8,
)

# Rows handled at once by the band-wise writers: bounds temporaries on huge images.
_BAND_ROWS = 1024


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    return labels


def draw_overlay(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A copy of ``rgb`` with every nucleus outlined in its own colour.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
        The image to draw on (see :func:`nucleiseg.preprocess.to_rgb_uint8`).
    labels : ndarray, shape (H, W), integer
        Instance labels, 0 for background.

    Notes
    -----
    The inner boundary of nucleus ``k`` is drawn in ``OVERLAY_COLOURS[(k - 1) % 10]``;
    background pixels just outside it are darkened to a third, so the outline
    reads on dark and light images alike.

    Examples
    --------
    >>> labels = np.zeros((6, 6), np.int32); labels[1:5, 1:5] = 1
    >>> out = draw_overlay(np.zeros((6, 6, 3), np.uint8), labels)
    >>> int((out.sum(axis=-1) > 0).sum())  # the 12 border pixels of a 4 x 4 square
    12
    """
    from skimage.segmentation import find_boundaries

    labels = _check_labels(labels)
    rgb = np.asarray(rgb)
    if rgb.shape != labels.shape + (3,) or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 of shape {labels.shape + (3,)}, got {rgb.dtype} {rgb.shape}")
    out = rgb.copy()
    height = labels.shape[0]
    for r0 in range(0, height, _BAND_ROWS):  # a 1-row halo makes bands agree with the whole image
        r1 = min(height, r0 + _BAND_ROWS)
        a0, a1 = max(0, r0 - 1), min(height, r1 + 1)
        band = labels[a0:a1]
        inner = find_boundaries(band, mode="inner")[r0 - a0 : r1 - a0]
        halo = find_boundaries(band, mode="outer")[r0 - a0 : r1 - a0]
        core = labels[r0:r1]
        halo &= core == 0
        view = out[r0:r1]
        view[halo] //= 3
        view[inner] = OVERLAY_COLOURS[(core[inner].astype(np.int64) - 1) % len(OVERLAY_COLOURS)]
    return out


def write_overlay(path: str | Path, rgb: np.ndarray, labels: np.ndarray) -> None:
    """Write :func:`draw_overlay` of ``rgb`` and ``labels`` as PNG, atomically.

    Examples
    --------
    >>> labels = np.zeros((32, 32), np.int32); labels[8:20, 8:20] = 1
    >>> write_overlay("overlay.png", np.zeros((32, 32, 3), np.uint8), labels)  # doctest: +SKIP
    """
    write_png(path, draw_overlay(rgb, labels))


def nucleus_outlines(labels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """The outline polygon of every nucleus, in image (x, y) coordinates.

    Parameters
    ----------
    labels : ndarray, shape (H, W), integer
        Instance labels, 0 for background.

    Yields
    ------
    label : int
        The nucleus' label, in increasing order.
    points : ndarray, shape (N, 2), float
        Closed ring (first point repeated last) of ``(x, y)`` vertices, where
        pixel ``(row, col)`` spans ``[col, col + 1) x [row, row + 1)`` (the
        ImageJ and QuPath convention): the ring's bounding box is the nucleus'
        bounding box. The outer boundary (from
        :func:`skimage.measure.find_contours` at 0.5) of the largest piece.

    Examples
    --------
    >>> labels = np.zeros((4, 5), np.int32); labels[1, 2] = 7
    >>> [(k, p.min(axis=0).tolist(), p.max(axis=0).tolist()) for k, p in nucleus_outlines(labels)]
    [(7, [2.0, 1.0], [3.0, 2.0])]
    """
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    labels = _check_labels(labels)
    if not labels.size or labels.max() == 0:
        return
    for index, box in enumerate(ndi.find_objects(labels)):
        if box is None:
            continue
        label = index + 1
        mask = np.pad(labels[box] == label, 1).astype(np.float32)
        rings = find_contours(mask, 0.5)
        ring = max(rings, key=_ring_area)
        # (row, col) of the padded crop -> (x, y) with pixel centres at +0.5
        xy = np.empty_like(ring)
        xy[:, 0] = ring[:, 1] + (box[1].start - 1 + 0.5)
        xy[:, 1] = ring[:, 0] + (box[0].start - 1 + 0.5)
        yield label, xy


def _ring_area(ring: np.ndarray) -> float:
    """Absolute shoelace area of a polygon."""
    y, x = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def write_imagej_rois(path: str | Path, labels: np.ndarray) -> None:
    """Write every nucleus as an ImageJ polygon ROI into a zip, atomically.

    Open the zip in Fiji's ROI Manager (drag and drop, or *More > Open*). Each
    ROI is named by its label; coordinates are sub-pixel, in pixels.

    Parameters
    ----------
    path : str or Path
        Output ``.zip``. An image without nuclei gives an empty zip.
    labels : ndarray, shape (H, W), integer
        Instance labels, 0 for background.

    Examples
    --------
    >>> labels = np.zeros((32, 32), np.int32); labels[8:20, 8:20] = 1
    >>> write_imagej_rois("rois.zip", labels)  # doctest: +SKIP
    >>> [r.name for r in roifile.roiread("rois.zip")]  # doctest: +SKIP
    ['1']
    """
    import roifile

    rois = []
    for label, xy in nucleus_outlines(labels):
        roi = roifile.ImagejRoi.frompoints(xy[:-1], name=str(label))  # ImageJ closes polygons itself
        roi.roitype = roifile.ROI_TYPE.POLYGON
        rois.append(roi)
    with atomic_path(path) as tmp:
        roifile.roiwrite(tmp, rois, mode="w")


def nucleus_features(labels: np.ndarray, origin: tuple[int, int] = (0, 0),
                     ids: np.ndarray | None = None) -> Iterator[dict]:
    """Every nucleus as a QuPath detection: a GeoJSON Feature (see :func:`write_geojson`).

    Parameters
    ----------
    labels : ndarray, shape (H, W), integer
        Instance labels, 0 for background.
    origin : (int, int)
        Image row and column of ``labels[0, 0]``, when ``labels`` is a block of
        a larger image: the polygons are in the larger image's pixels.
    ids : ndarray, optional
        ``ids[k]`` is the ``label`` property of nucleus ``k`` (default: ``k``).

    Examples
    --------
    >>> labels = np.zeros((4, 5), np.int32); labels[1, 2] = 1
    >>> feature = next(nucleus_features(labels, origin=(100, 10)))
    >>> feature["geometry"]["coordinates"][0][0], feature["properties"]["label"]
    ([12.5, 102.0], 1)
    """
    for label, xy in nucleus_outlines(labels):
        if origin != (0, 0):
            xy += (origin[1], origin[0])
        yield {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [xy.tolist()]},
            "properties": {"objectType": "detection", "classification": {"name": "Nucleus"},
                           "label": label if ids is None else int(ids[label])},
        }


def write_feature_collection(path: str | Path, features: Iterable[dict | str]) -> None:
    """Write a GeoJSON FeatureCollection one feature at a time, atomically.

    ``features`` holds Feature dicts, or Features already serialised by
    ``json.dumps`` (strings, e.g. read back from per-block files): a collection
    of millions of nuclei never sits in memory. The bytes are those of
    ``json.dump({"type": "FeatureCollection", "features": [...]})``.
    """
    import json

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write('{"type": "FeatureCollection", "features": [')
        for k, feature in enumerate(features):
            if k:
                handle.write(", ")
            handle.write(feature if isinstance(feature, str) else json.dumps(feature))
        handle.write("]}")


def write_geojson(path: str | Path, labels: np.ndarray) -> None:
    """Write every nucleus as a QuPath detection in a GeoJSON FeatureCollection, atomically.

    Coordinates are in pixels, (0, 0) the top-left corner of the image. Each
    Feature is a Polygon (closed ring) with ``properties`` ``{"objectType":
    "detection", "classification": {"name": "Nucleus"}, "label": k}``, which
    QuPath (*File > Import objects*) reads as nucleus detections.

    Parameters
    ----------
    path : str or Path
        Output ``.geojson``.
    labels : ndarray, shape (H, W), integer
        Instance labels, 0 for background.

    Examples
    --------
    >>> labels = np.zeros((32, 32), np.int32); labels[8:20, 8:20] = 1
    >>> write_geojson("nuclei.geojson", labels)  # doctest: +SKIP
    """
    write_feature_collection(path, nucleus_features(labels))


def write_probabilities_tiff(path: str | Path, probabilities: np.ndarray, channels: Sequence[str] | None = None) -> None:
    """Write ``(C, H, W)`` float32 probability maps as an ImageJ hyperstack TIFF, atomically.

    Fiji opens it as C channels; their names (``channels``) are stored as the
    ImageJ channel labels.

    Examples
    --------
    >>> write_probabilities_tiff("probs.tif", np.zeros((3, 8, 8), np.float32), ["body", "contour", "touch"])  # doctest: +SKIP
    """
    import tifffile

    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 3:
        raise ValueError(f"probabilities must be (C, H, W), got shape {probabilities.shape}")
    metadata: dict = {"axes": "CYX"}
    if channels is not None:
        if len(channels) != probabilities.shape[0]:
            raise ValueError(f"{len(channels)} channel names for {probabilities.shape[0]} channels")
        metadata["Labels"] = [str(c) for c in channels]
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, probabilities, imagej=True, metadata=metadata)
