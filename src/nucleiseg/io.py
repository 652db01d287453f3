"""Reading images robustly and writing outputs atomically.

Every reader here turns a user mistake (missing file, empty file, not an image,
an image whose header claims more than :data:`MAX_IMAGE_BYTES`) into
:class:`~nucleiseg.errors.ImageReadError` naming the file, so the command line
can report it in one line and go on with the other images. A file is decoded
as what its first bytes say it is, whatever its extension, and as a viewer
shows it (CMYK as RGB, a min-is-white grey TIFF inverted); its pixel size is
read by :func:`read_pixel_size` and written back into the label and
probability TIFFs (``pixel_size=``). Every writer goes
through :func:`atomic_path`: a reader never sees a half-written file, and a full
disk is one line too (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import ImageReadError, NucleisegError

_UMASK = os.umask(0)
os.umask(_UMASK)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")

#: Largest image :func:`read_image` decodes, in bytes of the decoded array (all pages and channels):
#: 2 GiB, e.g. a 46,000 x 46,000 8-bit grey image, 26,000 x 26,000 RGB, 32,000 x 32,000 16-bit.
#: Checked from the file's header before anything is decoded, so a small file claiming a huge
#: image (a "decompression bomb": 2.4 MB of TIFF claiming 50,000 x 50,000 grew to 10 GB before
#: failing) costs one error line. Predicting an image needs several times its decoded size
#: (3.62 GiB peak for an 8000 x 8000 RGB image, docs/benchmarks.md): an image within this limit whose
#: prediction would not fit in the memory available is refused by nucleiseg.inference.check_memory. Override per call
#: (``max_bytes=``) or per process with the environment variable ``NUCLEISEG_MAX_IMAGE_BYTES``
#: (bytes, or with a K/M/G/T suffix, powers of 1024; 0 = no limit).
MAX_IMAGE_BYTES = 2 * 1024**3

#: The environment variable that overrides :data:`MAX_IMAGE_BYTES`.
MAX_IMAGE_BYTES_ENV = "NUCLEISEG_MAX_IMAGE_BYTES"

_PIL_LIMIT_LOCK = threading.Lock()
_reading = threading.local()


class _QuietWhileReading(logging.Filter):
    """Drop tifffile's log records (a damaged file's "incorrect StripByteCounts", ...) while
    :func:`read_image` reads in this thread: its one error line says what is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_reading, "active", False)


logging.getLogger("tifffile").addFilter(_QuietWhileReading())


def max_image_bytes(max_bytes: int | None = None) -> int | None:
    """The decoded-size limit in force: ``max_bytes`` if given, else the environment's, else the default.

    Returns None for no limit (a value of 0).

    Raises
    ------
    NucleisegError
        ``NUCLEISEG_MAX_IMAGE_BYTES`` is set to something that is not a size.

    Examples
    --------
    >>> max_image_bytes(), max_image_bytes(0), max_image_bytes(10**9)
    (2147483648, None, 1000000000)
    """
    if max_bytes is None:
        text = os.environ.get(MAX_IMAGE_BYTES_ENV, "").strip()
        if not text:
            return MAX_IMAGE_BYTES
        units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
        number, unit = text.upper().removesuffix("B").removesuffix("I"), ""
        if number and number[-1] in units:
            number, unit = number[:-1], number[-1]
        try:
            max_bytes = int(float(number) * units[unit])
            if not float(number) >= 0:
                raise ValueError
        except (ValueError, OverflowError):
            raise NucleisegError(f"environment variable {MAX_IMAGE_BYTES_ENV}={text!r} is not a size "
                                 "(bytes, or a number with K, M, G or T; 0 for no limit)") from None
    max_bytes = int(max_bytes)
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 (0 = no limit), got {max_bytes}")
    return max_bytes or None


def _refuse_if_too_large(path: Path, shape: Sequence[int], itemsize: int, limit: int | None) -> None:
    """Raise ImageReadError when an image of ``shape`` would decode to more than ``limit`` bytes."""
    shape = tuple(int(n) for n in shape)
    nbytes = int(np.prod(shape, dtype=object)) * int(itemsize)
    if limit is None or nbytes <= limit:
        return
    size = " x ".join(f"{n:,}" for n in shape if n != 1)
    raise ImageReadError(
        f"image claims {size} pixels ({nbytes / 1024**3:.1f} GiB decoded), above the {limit / 1024**3:.1f} GiB "
        f"limit on a decoded image; if it is genuine, raise the limit with {MAX_IMAGE_BYTES_ENV} "
        "(e.g. 16G) or read_image(max_bytes=...)", path)


def _png_16bit_colour(path: Path) -> int | None:
    """PNG's colour type (4: grey + alpha, 2: RGB, 6: RGBA) of a 16-bit colour PNG at ``path``, else None.

    Pillow decodes such files to 8 bits; :func:`_read_pil_format` reads them at their own depth.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    # signature, IHDR's length and type, width, height, then bit depth and colour type
    if (len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24] == 16
            and head[25] in (2, 4, 6)):
        return head[25]
    return None


def _read_png_16bit_colour(path: Path, colour_type: int) -> np.ndarray:
    """A 16-bit colour PNG at its own depth (libpng through OpenCV), channels in RGB(A) or grey + alpha order."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.dtype != np.uint16 or image.ndim != 3:
        raise ValueError("not a decodable 16-bit colour PNG")
    if colour_type == 4:  # grey + alpha, which OpenCV expands to BGRA
        return np.ascontiguousarray(image[..., [0, 3]])
    return np.ascontiguousarray(image[..., [2, 1, 0, 3][: image.shape[-1]]])


def _pil_header(path: Path) -> tuple[tuple[int, ...], int]:
    """``(shape, bytes per value)`` of the array imageio will decode, from the header (Pillow, lazily)."""
    shape, itemsize, _ = _pil_header_mode(path)
    return shape, itemsize


def _pil_header_mode(path: Path) -> tuple[tuple[int, ...], int, str]:
    """:func:`_pil_header` and Pillow's mode of the image (``"L"``, ``"RGB"``, ``"CMYK"``...)."""
    from PIL import Image

    def read() -> tuple[tuple[int, ...], int, str]:
        with Image.open(path) as im:
            width, height = im.size
            frames = int(getattr(im, "n_frames", 1) or 1)
            mode = im.mode
            bands = 4 if mode in ("P", "PA") else len(im.getbands())  # a palette is expanded to RGB(A)
        itemsize = 4 if mode in ("I", "F") or mode.startswith(("I;32", "F;")) else 2 if "16" in mode else 1
        if _png_16bit_colour(path) is not None:  # read at its own depth (_read_pil_format), not Pillow's 8 bits
            itemsize = 2
        return ((frames,) if frames > 1 else ()) + (height, width, bands), itemsize, mode

    try:
        return read()
    except Image.DecompressionBombError:  # Pillow's own, lower limit: our limit decides
        with _PIL_LIMIT_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return read()
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def header_bytes(path: str | Path) -> int | None:
    """Bytes the image at ``path`` decodes to, from its header only; None when the header cannot be read.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "grey.png")
    >>> write_png(path, np.zeros((30, 40), np.uint8))
    >>> header_bytes(path), header_bytes(os.path.join(os.path.dirname(path), "missing.png"))
    (1200, None)
    """
    path = Path(path)
    try:
        if is_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, itemsize = series.shape, series.dtype.itemsize
        else:
            shape, itemsize = _pil_header(path)
    except Exception:  # unreadable: read_image will say why
        return None
    return int(np.prod(shape, dtype=object)) * int(itemsize)


#: Pillow's modes of ink (a CMYK JPEG or TIFF; Pillow decodes a YCCK JPEG to CMYK too), read as RGB: their four
#: values per pixel are not red, green, blue and alpha.
_INK_MODES = ("CMYK",)


def _read_pil_format(path: Path, shape: tuple[int, ...], mode: str = "") -> np.ndarray:
    """Decode with imageio (Pillow); an image already checked against our limit may exceed Pillow's.

    16-bit colour PNGs, which Pillow reduces to 8 bits, are decoded by libpng (OpenCV) at their own depth;
    CMYK (and YCCK) images are converted to RGB by Pillow (``mode``: Pillow's mode of the file).
    """
    import imageio.v3 as iio
    from PIL import Image

    colour_type = _png_16bit_colour(path)
    if colour_type is not None:
        return _read_png_16bit_colour(path, colour_type)
    kwargs = {"mode": "RGB"} if mode in _INK_MODES else {}

    with warnings.catch_warnings():  # imageio's plugin probing announces its own deprecations
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sized against our own limit
        limit = Image.MAX_IMAGE_PIXELS
        if limit is None or shape[-3] * shape[-2] <= 2 * limit:
            return iio.imread(path, **kwargs)
        with _PIL_LIMIT_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return iio.imread(path, **kwargs)
            finally:
                Image.MAX_IMAGE_PIXELS = saved


#: The first four bytes of a TIFF (little- and big-endian) and of a BigTIFF.
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def is_tiff(path: str | Path) -> bool:
    """Whether the file at ``path`` is a TIFF, from its first bytes (its magic number), whatever its name.

    The readers choose their decoder by what a file holds, not by its extension, so a PNG named
    ``.tif`` and a TIFF named ``.png`` read as what they are; a file that cannot be opened is
    judged by its name (the reader then says why it cannot be read).

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "really_a_png.tif")
    >>> write_png(path, np.zeros((4, 4), np.uint8))
    >>> is_tiff(path)
    False
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return path.suffix.lower() in TIFF_SUFFIXES


def _cmyk_to_rgb(image: np.ndarray) -> np.ndarray:
    """8- or 16-bit ink ``(..., 4)`` (C, M, Y, K; 0 = no ink) as RGB, by Pillow's formula ``(max - C)(max - K) / max``."""
    top = np.iinfo(image.dtype).max
    ink = image.astype(np.float32)
    white = (top - ink[..., 3:4]) / top
    return np.clip((top - ink[..., :3]) * white + 0.5, 0, top).astype(image.dtype)


def _tiff_page_fixes(page, image: np.ndarray, axes: str) -> np.ndarray:
    """What tifffile leaves as stored and a viewer shows otherwise: a grey min-is-white TIFF (0 = white)
    inverted to min-is-black, and a CMYK (separated, 4 inks) TIFF converted to RGB, as Pillow would.

    A 1-bit (bilevel) image keeps its bits: tifffile writes every boolean array as min-is-white and
    reads it back as written, so its set bits are the mask's foreground (ImageJ too reads them as 255).
    """
    import tifffile

    photometric = getattr(page, "photometric", None)
    samples = int(getattr(page, "samplesperpixel", 1) or 1)
    bits = int(getattr(page, "bitspersample", 0) or 0)
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE and samples == 1 and bits != 1 and image.dtype != bool:
        if image.dtype.kind == "u":
            top = (1 << bits) - 1 if 0 < bits < 8 * image.dtype.itemsize else np.iinfo(image.dtype).max
            return (top - image).astype(image.dtype)
        if image.dtype.kind == "i":
            return ~image  # -1 - value: the order reversed within the type's range
        if image.dtype.kind == "f":
            return -image
        return image
    if (photometric == tifffile.PHOTOMETRIC.SEPARATED and samples == 4 and axes.upper().endswith("S")
            and image.shape[-1] == 4 and image.dtype in (np.uint8, np.uint16)
            and int(getattr(page, "inkset", 1) or 1) == 1):  # InkSet 1 = CMYK
        return _cmyk_to_rgb(image)
    return image


def read_image(path: str | Path, *, max_bytes: int | None = None, channel: int | None = None) -> np.ndarray:
    """Read a 2-D image (grey, RGB or RGBA; 8/16-bit or float) as stored, or one channel of it.

    Parameters
    ----------
    path : str or Path
        PNG, JPEG, TIFF or BMP file.
    channel : int, optional
        Read only this channel (1 = the first, as in Fiji), as a grey image: of
        the channel axis of a TIFF hyperstack, however many channels it has
        (ImageJ ``C``, RGB samples, or a leading axis of a planar
        multi-channel TIFF), else of the colour channels.
    max_bytes : int, optional
        Refuse an image whose decoded array would exceed this many bytes (0:
        no limit); default :data:`MAX_IMAGE_BYTES` (2 GiB) or the environment
        variable ``NUCLEISEG_MAX_IMAGE_BYTES``. Checked from the header,
        before decoding.

    Returns
    -------
    image : ndarray
        ``(H, W)`` or ``(H, W, C)`` with C in 1..4, in the file's own dtype
        (``(H, W)`` with ``channel``). Channel-first TIFFs ``(C, H, W)`` are
        moved to channel-last.

    Raises
    ------
    ImageReadError
        The file does not exist, is empty, cannot be decoded, is not 2-D, has
        no channel ``channel``, or would decode to more than ``max_bytes``.

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
    limit = max_image_bytes(max_bytes)
    tiff = is_tiff(path)  # by its content: a PNG named .tif reads as a PNG, a TIFF named .png as a TIFF
    _reading.active = True
    try:
        if tiff:
            import tifffile

            with tifffile.TiffFile(path) as tif:  # what tifffile.imread does, with a look at the header first
                series = tif.series[0]  # all pages of a multi-page file; level 0 of a pyramid
                _refuse_if_too_large(path, series.shape, series.dtype.itemsize, limit)
                image = tif.asarray()
                axes = series.axes
                image = _tiff_page_fixes(series.keyframe, image, axes)
        else:
            shape, itemsize, mode = _pil_header_mode(path)
            _refuse_if_too_large(path, shape, itemsize, limit)
            image = _read_pil_format(path, shape, mode)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError("not enough memory to decode this image", path) from None
    except Exception as exc:  # decoders raise many types; all mean "not a readable image"
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            formats = ", ".join(sorted({s.lstrip(".").upper() for s in IMAGE_SUFFIXES} - {"JPEG", "TIFF"}))
            raise ImageReadError(
                f"cannot be read as an image: {path.suffix or 'no extension'} is not a format nucleiseg reads "
                f"({formats}); convert it first, e.g. with Fiji (Bio-Formats) to TIFF", path) from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(f"cannot be read as an image ({reason})", path) from None
    finally:
        _reading.active = False
    image = np.asarray(image)
    if channel is not None and tiff:
        picked = _tiff_channel(image, axes, channel, path)
        if picked is not None:
            return as_2d_image(picked, path)
    image = as_2d_image(image, path)
    if channel is None:
        return image
    from .preprocess import select_channel

    try:
        return select_channel(image, channel)
    except ValueError as exc:
        raise ImageReadError(str(exc), path) from None


def _tiff_channel(image: np.ndarray, axes: str, channel: int, path: Path) -> np.ndarray | None:
    """Channel ``channel`` (from 1) of a TIFF series with ``axes`` (tifffile's: ``CYX``, ``ZCYX``, ``YXS``...).

    None when the series names no channel axis (a plain grey or colour image: the caller picks from
    its colour channels). A leading axis of a planar multi-channel TIFF (``QYX``) counts as the channels.
    """
    axes = axes.upper()
    if "C" in axes:
        axis = axes.index("C")
    elif "S" in axes and image.shape[axes.index("S")] > 1:
        axis = axes.index("S")
    elif image.ndim == 3 and axes[0] in "QI":
        axis = 0
    else:
        return None
    n_channels = image.shape[axis]
    if not 1 <= channel <= n_channels:
        raise ImageReadError(f"has {n_channels} channel{'s' if n_channels > 1 else ''} (axes {axes}), "
                             f"so there is no channel {channel} (channels count from 1)", path)
    rest = [(name, size) for name, size in zip(axes[:axis] + axes[axis + 1 :], image.shape[:axis] + image.shape[axis + 1 :])
            if name not in "YX" and size > 1]
    if rest:
        what = ", ".join(f"{name} ({size})" for name, size in rest)
        raise ImageReadError(f"channel {channel} of this stack still has the axes {what} besides Y and X: a z-stack "
                             "or time series? Segment one 2-D plane or a projection, saved as its own image", path)
    return np.take(image, channel - 1, axis=axis)


def as_2d_image(image, path: str | Path | None = None) -> np.ndarray:
    """An image as :func:`read_image` returns it: ``(H, W)`` or ``(H, W, C)``, C in 1..4; or a refusal in words.

    The one conversion of a decoded file and of an array given to the Python API
    (:func:`nucleiseg.inference.segment`): singleton axes squeezed (``(1, H, W)``,
    ``(H, W, 1, 1)``; not those of a 1-pixel-high or -wide image), a leading axis of
    1 to 4 channels moved last (``(3, H, W)`` -> ``(H, W, 3)``), booleans as uint8 0/1.

    Parameters
    ----------
    image : array_like
        Decoded pixels.
    path : str or Path, optional
        The file they were read from, named in the error.

    Raises
    ------
    ImageReadError
        With ``path``: not a 2-D grey, grey + alpha, RGB or RGBA image (a stack), no pixels, not numbers.
    NucleisegError
        The same, for an array (no ``path``).

    Examples
    --------
    >>> as_2d_image(np.zeros((3, 20, 30), np.uint16)).shape, as_2d_image(np.zeros((1, 20, 30))).shape
    ((20, 30, 3), (20, 30))
    >>> as_2d_image(np.ones((2, 2), bool)).dtype
    dtype('uint8')
    """
    error = NucleisegError if path is None else ImageReadError
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if image.dtype.kind not in "uif":
        raise error(f"expected an image of numbers (integers or floats), got {image.dtype} values", path)
    thin = (image.ndim == 2 and 1 in image.shape) or (
        image.ndim == 3 and image.shape[-1] in (1, 2, 3, 4) and 1 in image.shape[:2]
    )
    if not thin:  # squeezing a 1-pixel-high or -wide image would lose a spatial axis
        image = np.squeeze(image)
    if image.ndim == 3 and image.shape[0] in (1, 2, 3, 4) and image.shape[-1] > 4:
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 2, 3, 4)):
        if image.size == 0:
            raise error("image has no pixels", path)
        return image
    if path is None:
        raise error(f"expected a 2-D image as an array of shape (H, W), (H, W, C) or (C, H, W) with C = 1 to 4 "
                    f"channels (grey, grey + alpha, RGB, RGBA), got shape {image.shape}"
                    + ("; a stack? Pass one channel (the channel option) or one 2-D plane or a projection"
                       if image.ndim >= 3 else ""))
    hint = ""
    if image.ndim >= 3:  # what a microscope's multi-plane file usually is
        hint = ("; a z-stack, time series or multi-channel stack? Segment one channel of it (the channel option) "
                "or one 2-D plane or a projection (Fiji: Image > Stacks > Z Project), saved as its own image")
    raise error(f"expected a 2-D grey, RGB or RGBA image, got an array of shape {image.shape}{hint}", path)


# ------------------------------------------------------------------------------ pixel size
class PixelSize(NamedTuple):
    """The physical size of a pixel: its width ``x`` and height ``y``, in ``unit``.

    ``unit`` is ``"um"`` for micrometres however a file spells them (ImageJ's
    ``micron``, ``µm``), else as the file gives it (``"nm"``, ``"mm"``...).
    """

    x: float
    y: float
    unit: str


#: Spellings of units in files (ImageJ, OME, users) -> the name :class:`PixelSize` uses.
_UNIT_NAMES = {
    "um": "um", "µm": "um", "μm": "um", "\\u00b5m": "um", "micron": "um", "microns": "um",
    "micrometer": "um", "micrometre": "um", "micrometers": "um", "micrometres": "um",
    "nm": "nm", "nanometer": "nm", "nanometre": "nm", "mm": "mm", "millimeter": "mm", "millimetre": "mm",
    "cm": "cm", "centimeter": "cm", "centimetre": "cm", "m": "m", "meter": "m", "metre": "m",
    "in": "inch", "inch": "inch", "inches": "inch",
}
#: Micrometres per unit of the lengths a TIFF's ResolutionUnit tag can hold (centimetre) or ImageJ converts.
_UM_PER_UNIT = {"nm": 1e-3, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6, "inch": 25400.0}
#: Pixels per inch that image editors and screenshots write by default (72, 96), not a calibration: ignored.
_DEFAULT_DPI = (72.0, 96.0)


def _unit_name(unit: object) -> str | None:
    """The :class:`PixelSize` name of a unit as spelt in a file; None for none ("pixel", blank)."""
    text = str(unit).strip()
    if not text or text.lower() in ("pixel", "pixels", "px", "none"):
        return None
    return _UNIT_NAMES.get(text.lower(), _UNIT_NAMES.get(text, text))


def _pixel_size(x: float, y: float, unit: str | None) -> PixelSize | None:
    """A :class:`PixelSize`, or None unless both sizes are finite and positive and there is a unit."""
    if unit is None or not (np.isfinite(x) and np.isfinite(y) and x > 0 and y > 0):
        return None
    # 12 significant digits: a resolution is a ratio of integers (ImageJ's 0.325 um comes back as 0.32499999999999996)
    return PixelSize(float(f"{x:.12g}"), float(f"{y:.12g}"), unit)


def _rational(tag) -> float:
    """A TIFF RATIONAL tag's value as a float (0.0 when absent or zero)."""
    if tag is None:
        return 0.0
    value = tag.value
    if isinstance(value, tuple) and len(value) == 2:
        return value[0] / value[1] if value[1] else 0.0
    return float(value)


def _tiff_pixel_size(path: Path) -> PixelSize | None:
    """OME ``PhysicalSizeX/Y`` (and their units), else ImageJ's ``unit`` with the resolution tags, else
    the resolution tags in centimetres or inches (converted to micrometres)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            found = _ome_pixel_size(tif.ome_metadata)
            if found is not None:
                return found
        page = tif.pages.first
        xres, yres = _rational(page.tags.get("XResolution")), _rational(page.tags.get("YResolution"))
        if xres <= 0:
            return None
        yres = yres if yres > 0 else xres
        imagej = tif.imagej_metadata or {}
        if "unit" in imagej:
            return _pixel_size(1 / xres, 1 / yres, _unit_name(imagej["unit"]))
        unit = page.tags.get("ResolutionUnit")
        unit = int(unit.value) if unit is not None else 2  # the TIFF default: inch
        if unit == 2 and xres in _DEFAULT_DPI:
            return None
        per_unit = {2: _UM_PER_UNIT["inch"], 3: _UM_PER_UNIT["cm"]}.get(unit)
        return None if per_unit is None else _pixel_size(per_unit / xres, per_unit / yres, "um")


def _ome_pixel_size(xml: str) -> PixelSize | None:
    """The first image's ``PhysicalSizeX/Y`` from OME-XML (their unit µm unless given)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels":
            attrs = element.attrib
            if "PhysicalSizeX" not in attrs:
                return None
            try:
                x = float(attrs["PhysicalSizeX"])
                y = float(attrs.get("PhysicalSizeY", x))
            except ValueError:
                return None
            unit_x = _unit_name(attrs.get("PhysicalSizeXUnit", "µm"))
            unit_y = _unit_name(attrs.get("PhysicalSizeYUnit", attrs.get("PhysicalSizeXUnit", "µm")))
            if unit_y != unit_x and unit_x in _UM_PER_UNIT and unit_y in _UM_PER_UNIT:
                y = y * _UM_PER_UNIT[unit_y] / _UM_PER_UNIT[unit_x]
            return _pixel_size(x, y, unit_x)
    return None


def _png_pixel_size(path: Path) -> PixelSize | None:
    """A PNG's ``pHYs`` chunk in pixels per metre, as micrometres (before the image data; none: None)."""
    import struct

    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND") or length > 1 << 24:
                return None
            if kind != b"pHYs":
                f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
                continue
            data = f.read(length)
            if length != 9 or len(data) != 9 or data[8] != 1:  # unit 1: the metre (0: an aspect ratio only)
                return None
            x, y = struct.unpack(">II", data[:8])
            if not x or not y or round(x * 0.0254) in _DEFAULT_DPI:
                return None
            return _pixel_size(1e6 / x, 1e6 / y, "um")


def read_pixel_size(path: str | Path) -> PixelSize | None:
    """The physical size of an image file's pixels, from its header; None when the file records none.

    Read, in this order, from OME-TIFF's ``PhysicalSizeX`` / ``PhysicalSizeY``;
    an ImageJ TIFF's ``unit`` with the XResolution / YResolution tags (pixels
    per unit); a TIFF's resolution tags in centimetres or inches; a PNG's
    ``pHYs`` chunk (pixels per metre). Lengths in centimetres, inches or metres
    are given in micrometres. 72 and 96 pixels per inch (image editors' and
    screens' defaults) and resolutions without a unit count as none. Cheap: the
    pixels are not decoded. The format is told by the file's content, as
    :func:`read_image` does.

    Parameters
    ----------
    path : str or Path
        An image file.

    Returns
    -------
    PixelSize or None
        ``PixelSize(x, y, unit)``; None also for a file that cannot be read
        (:func:`read_image` says why).

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "labels.tif")
    >>> write_labels_tiff(path, np.zeros((8, 8), np.uint16), pixel_size=(0.325, 0.325, "micron"))
    >>> read_pixel_size(path)
    PixelSize(x=0.325, y=0.325, unit='um')
    """
    path = Path(path)
    _reading.active = True  # tifffile's complaints about a damaged header are read_image's to report
    try:
        if is_tiff(path):
            return _tiff_pixel_size(path)
        return _png_pixel_size(path)
    except Exception:  # unreadable or damaged: no pixel size
        return None
    finally:
        _reading.active = False


def _checked_pixel_size(pixel_size) -> PixelSize | None:
    """``pixel_size`` as a :class:`PixelSize` (its unit's name normalised), or None; ValueError when malformed."""
    if pixel_size is None:
        return None
    try:
        x, y, unit = pixel_size
        x, y = float(x), float(y)
    except (TypeError, ValueError):
        raise ValueError(f"pixel_size must be (x, y, unit), e.g. PixelSize(0.325, 0.325, 'um'), got {pixel_size!r}") from None
    name = _unit_name(unit) if isinstance(unit, str) else None
    checked = _pixel_size(x, y, name)
    if checked is None:
        raise ValueError(f"pixel_size must be two sizes > 0 and a unit, got {pixel_size!r}")
    return checked


def _tiff_resolution(pixel_size: PixelSize | None, imagej: bool) -> dict:
    """tifffile.imwrite's arguments that record ``pixel_size`` as ImageJ reads it.

    ImageJ TIFFs: pixels per unit in XResolution / YResolution and the unit in ImageJ's metadata
    (Fiji, napari and :func:`read_pixel_size` read both). Plain TIFFs, which have no such metadata:
    pixels per centimetre (ResolutionUnit 3) for lengths, the resolution alone otherwise.
    """
    if pixel_size is None:
        return {}
    if imagej:  # ImageJ's own TIFFs: no ResolutionUnit (tifffile writes NONE), the unit in the metadata
        return {"resolution": (1 / pixel_size.x, 1 / pixel_size.y)}
    if pixel_size.unit in _UM_PER_UNIT:
        per_cm = _UM_PER_UNIT["cm"] / _UM_PER_UNIT[pixel_size.unit]
        return {"resolution": (per_cm / pixel_size.x, per_cm / pixel_size.y), "resolutionunit": "CENTIMETER"}
    return {"resolution": (1 / pixel_size.x, 1 / pixel_size.y), "resolutionunit": "NONE"}


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


#: Errors of writing that are the machine's state, not a bug: reported as one line naming the file.
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or process limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def _write_error(exc: BaseException, path: Path, tmp: Path | None = None) -> NucleisegError | None:
    """The one-line error for a write that failed for want of space, quota or permission; None for anything else.

    Writers report a full disk in their own ways: an ``OSError`` with its errno (Pillow, Python's
    files), one without (tifffile: "... requested and ... written"), "(os error 28)" in a message
    (safetensors), a bare ``RuntimeError`` (torch.save). So the errno is taken where given, else
    read from the message, else the device's free space and the process' file size limit decide.
    """
    import re

    code = exc.errno if isinstance(exc, OSError) and exc.errno in _WRITE_ERRORS else None
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found and int(found.group(1)) in _WRITE_ERRORS else None
    if code is None and isinstance(exc, (OSError, RuntimeError)):
        try:
            stats = os.statvfs(path.parent)
            if stats.f_bavail * stats.f_frsize < 1 << 20:
                code = errno.ENOSPC
        except (OSError, AttributeError):
            pass
        try:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if code is None and tmp is not None and limit != resource.RLIM_INFINITY and tmp.exists() \
                    and tmp.stat().st_size >= limit - (1 << 16):
                code = errno.EFBIG
        except (ImportError, OSError):
            pass
    if code is None:
        return None
    return NucleisegError(f"cannot be written: {_WRITE_ERRORS[code]} ({errno.errorcode.get(code, code)}); "
                          "nothing half-written was left", path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A reader never sees a half-written file, and an interrupted write leaves the
    previous file (if any) untouched. A write that fails for want of space,
    quota or permission (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EROFS``, ``EACCES``,
    ``EPERM``) removes the temporary file and raises
    :class:`~nucleiseg.errors.NucleisegError` naming ``path``, in one line.

    Examples
    --------
    >>> with atomic_path("out.csv") as tmp:  # doctest: +SKIP
    ...     table.to_csv(tmp)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the name's first 100 characters: a name near the system's 255 must still leave room for the rest
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp" + path.suffix[:16],
                                        dir=path.parent)
        os.close(fd)
    except OSError as exc:
        error = _write_error(exc, path)
        if error is None:
            raise
        raise error from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files, and some writers (safetensors) replace the file they are
        # given: set the usual permissions on what was written, just before it takes the name.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except Exception as exc:  # a failed write: is it the machine's state (full disk...) or a bug?
        error = _write_error(exc, path, tmp)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp.exists():
            tmp.unlink()


#: zlib level of the PNGs written. With :func:`encode_png`, on the overlays of 32 256x256 DSB crops segmented by
#: the shipped model (``benchmarks/finishing_speed.py``, twelfth session): level 3 4.2 ms and 51.1 kB, level 2
#: 2.7 ms and 55.5 kB, level 1 2.5 ms and 57.7 kB (Pillow at level 3: 6.4 ms, 49.5 kB; at its default 6:
#: 15.7 ms, 48.3 kB). The overlay is encoded beside the rest of an image's finishing.
PNG_COMPRESS_LEVEL = 3

#: Bytes of image rows filtered and compressed at a time by :func:`encode_png` (so an 8000x8000 RGB overlay
#: needs a few MB beside itself, not a second copy of its 192 MB).
PNG_BAND_BYTES = 4 << 20

_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type: grey, grey+alpha, RGB, RGBA


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(image: np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> Iterator[bytes]:
    """The bytes of ``image`` as a PNG file, in pieces (its signature, then chunks).

    Every row gets PNG's *Sub* filter (each byte minus the one a pixel to its
    left), computed with NumPy, and zlib compresses them band by band; zlib
    releases the GIL, so this runs beside other Python work. On 32 overlays of
    256x256 DSB crops it took 4.2 ms against 6.4 ms for Pillow at the same zlib
    level (which chooses a filter per row), for files 3% larger
    (``benchmarks/finishing_speed.py``).

    Parameters
    ----------
    image : ndarray, shape (H, W) or (H, W, C), uint8 or uint16
        Grey, grey + alpha (C = 2), RGB (3) or RGBA (4); at least 1 x 1.
    level : int
        zlib's compression level, 0-9.

    Examples
    --------
    >>> import io, imageio.v3 as iio
    >>> image = np.arange(24, dtype=np.uint16).reshape(4, 6) * 2000
    >>> data = b"".join(encode_png(image))
    >>> data[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
    >>> bool((iio.imread(io.BytesIO(data), extension=".png") == image).all())
    True
    """
    import struct
    import zlib

    image = np.asarray(image)
    channels = 1 if image.ndim == 2 else image.shape[-1] if image.ndim == 3 else 0
    if channels not in _PNG_COLOUR_TYPES or image.dtype.kind != "u" or image.dtype.itemsize > 2 or 0 in image.shape:
        raise ValueError(f"PNG needs a non-empty uint8 or uint16 (H, W) or (H, W, 1-4) array, "
                         f"got {image.dtype} of shape {image.shape}")
    height, width = image.shape[:2]
    depth = image.dtype.itemsize
    step = channels * depth  # bytes per pixel: the Sub filter's distance
    yield b"\x89PNG\r\n\x1a\n"
    yield _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8 * depth, _PNG_COLOUR_TYPES[channels], 0, 0, 0))
    compressor = zlib.compressobj(level)
    rows_per_band = max(1, PNG_BAND_BYTES // (width * step))
    for top in range(0, height, rows_per_band):
        band = image[top : top + rows_per_band]
        rows = np.ascontiguousarray(band.astype(">u2", copy=False) if depth == 2 else band)
        rows = rows.view(np.uint8).reshape(len(band), width * step)
        filtered = np.empty((len(band), width * step + 1), np.uint8)
        filtered[:, 0] = 1  # the Sub filter
        filtered[:, 1 : step + 1] = rows[:, :step]
        np.subtract(rows[:, step:], rows[:, :-step], out=filtered[:, step + 1 :])
        compressed = compressor.compress(filtered)
        if compressed:
            yield _png_chunk(b"IDAT", compressed)
    yield _png_chunk(b"IDAT", compressor.flush())
    yield _png_chunk(b"IEND", b"")


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8/uint16 grey, grey + alpha, RGB or RGBA array as PNG (:func:`encode_png`), atomically.

    Examples
    --------
    >>> write_png("mask.png", np.zeros((32, 32), np.uint8))  # doctest: +SKIP
    """
    pieces = encode_png(image)
    first = next(pieces)  # a wrong array is a ValueError before any file is made
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(first)
        f.writelines(pieces)


def write_labels_tiff(path: str | Path, labels: np.ndarray, *,
                      pixel_size: PixelSize | tuple[float, float, str] | None = None) -> None:
    """Write an instance label image as an ImageJ-compatible TIFF, atomically.

    16-bit when the largest label fits, else 32-bit, so napari, Fiji and QuPath
    open it as labels with one integer per nucleus and 0 as background.

    Parameters
    ----------
    path : str or Path
        Output ``.tif``.
    labels : ndarray, shape (H, W), integer
        Instance labels, 0 for background.
    pixel_size : PixelSize or (x, y, unit), optional
        The image's pixel size (:func:`read_pixel_size`), recorded as ImageJ
        reads it: pixels per unit in the resolution tags and the unit in the
        ImageJ metadata (32-bit labels, which ImageJ's format lacks: pixels per
        centimetre), so Fiji and napari measure in that unit. Default: none
        (resolution 1 pixel per pixel).

    Examples
    --------
    >>> write_labels_tiff("labels.tif", labels, pixel_size=read_pixel_size("image.tif"))  # doctest: +SKIP
    """
    import tifffile

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    top = int(labels.max()) if labels.size else 0
    if labels.min(initial=0) < 0:
        raise ValueError("labels must be non-negative")
    pixel_size = _checked_pixel_size(pixel_size)
    dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
    # ImageJ's hyperstack format has no 32-bit integer type; write plain TIFF then.
    imagej = dtype == np.uint16
    extra = _tiff_resolution(pixel_size, imagej)
    if imagej and pixel_size is not None:
        extra["metadata"] = {"unit": pixel_size.unit}
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), imagej=imagej, compression=None if imagej else "zlib", **extra)


def read_labels(path: str | Path, *, max_bytes: int | None = None) -> np.ndarray:
    """Read an instance label image (TIFF or PNG) as a 2-D integer array (``max_bytes``: see :func:`read_image`)."""
    labels = read_image(path, max_bytes=max_bytes)
    if labels.ndim == 3:
        if labels.shape[-1] in (3, 4) and np.all(labels[..., 0:1] == labels[..., :3]):
            labels = labels[..., 0]
        else:
            h, w, n = labels.shape
            raise ImageReadError(f"expected a single-channel label image, got {n} channels or pages of {h}x{w}: "
                                 "save the labels as one plane", path)
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


def dense_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Sparse label values (global ids, e.g. ``1 + row * width + col``) numbered ``1..n``.

    Code that allocates per label value (``scipy.ndimage.find_objects``,
    ``np.bincount``) would otherwise need memory for every value up to the
    largest. Labels whose largest value is under twice their pixel count
    (plus 1024) are returned as they are.

    Returns
    -------
    labels : ndarray
        The labels, or their dense numbering (int64, 0 kept for background).
    ids : ndarray or None
        ``ids[k]`` is the original value of dense label ``k``; None when the labels were returned as they are.

    Examples
    --------
    >>> dense, ids = dense_labels(np.array([[0, 10**9], [7, 10**9]]))
    >>> dense.tolist(), ids.tolist()
    ([[0, 2], [1, 2]], [0, 7, 1000000000])
    >>> dense_labels(np.array([[0, 3]]))[1] is None
    True
    """
    top = int(labels.max(initial=0))
    if top <= 2 * labels.size + 1024:
        return labels, None
    ids, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(labels.shape).astype(np.int64)
    if ids[0] != 0:  # no background pixel: keep label 0 free
        ids, dense = np.concatenate([[0], ids]), dense + 1
    return dense, ids


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
    labels = _check_labels(labels)
    rgb = np.asarray(rgb)
    if rgb.shape != labels.shape + (3,) or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 of shape {labels.shape + (3,)}, got {rgb.dtype} {rgb.shape}")
    out = rgb.copy()
    height = labels.shape[0]
    for r0 in range(0, height, _BAND_ROWS):  # a 1-row halo makes bands agree with the whole image
        r1 = min(height, r0 + _BAND_ROWS)
        a0, a1 = max(0, r0 - 1), min(height, r1 + 1)
        edge = label_edges(labels[a0:a1])[r0 - a0 : r1 - a0]
        core = labels[r0:r1]
        inner = edge & (core != 0)
        halo = edge & (core == 0)
        view = out[r0:r1]
        view[halo] //= 3
        view[inner] = OVERLAY_COLOURS[(core[inner].astype(np.int64) - 1) % len(OVERLAY_COLOURS)]
    return out


def label_edges(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (the image's border counts as the pixel's own label).

    The same pixels as scikit-image's ``find_boundaries(labels)`` (its default
    connectivity); ``& (labels != 0)`` gives its ``mode="inner"`` and
    ``& (labels == 0)`` its ``mode="outer"``. Written with shifted comparisons:
    XX

    Examples
    --------
    >>> labels = np.zeros((4, 5), np.int32); labels[1:3, 1:3] = 7
    >>> label_edges(labels).astype(int)
    array([[0, 1, 1, 0, 0],
           [1, 1, 1, 1, 0],
           [1, 1, 1, 1, 0],
           [0, 1, 1, 0, 0]])
    """
    edge = np.zeros(labels.shape, bool)
    vertical = labels[1:] != labels[:-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def write_overlay(path: str | Path, rgb: np.ndarray, labels: np.ndarray) -> None:
    """Write :func:`draw_overlay` of ``rgb`` and ``labels`` as PNG, atomically.

    Examples
    --------
    >>> labels = np.zeros((32, 32), np.int32); labels[8:20, 8:20] = 1
    >>> write_overlay("overlay.png", np.zeros((32, 32, 3), np.uint8), labels)  # doctest: +SKIP
    """
    write_png(path, draw_overlay(rgb, labels))


def nucleus_polygons(labels: np.ndarray) -> Iterator[tuple[int, list[list[np.ndarray]]]]:
    """Every nucleus as polygons with holes, in image (x, y) coordinates.

    Parameters
    ----------
    labels : ndarray, shape (H, W), integer
        Instance labels, 0 for background.

    Yields
    ------
    label : int
        The nucleus' label, in increasing order.
    polygons : list of list of ndarray
        One polygon per piece of the nucleus (4-connected pixels), the largest
        first; each is ``[exterior, hole, hole, ...]``, closed rings (first
        point repeated last) of ``(x, y)`` vertices where pixel ``(row, col)``
        spans ``[col, col + 1) x [row, row + 1)`` (the ImageJ and QuPath
        convention). Rings follow :func:`skimage.measure.find_contours` at 0.5,
        holes wound opposite to their exterior, so even-odd and non-zero
        filling agree; filled, they cover exactly the nucleus' pixel centres.

    Examples
    --------
    >>> labels = np.zeros((5, 9), np.int32); labels[1:4, 1:4] = 3; labels[2, 2] = 0; labels[1:3, 6:8] = 3
    >>> [(k, [len(p) for p in polygons]) for k, polygons in nucleus_polygons(labels)]  # a ring and a square
    [(3, [2, 1])]
    """
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    labels = _check_labels(labels)
    if not labels.size or labels.max() == 0:
        return
    labels, ids = dense_labels(labels)
    for index, box in enumerate(ndi.find_objects(labels)):
        if box is None:
            continue
        mask = np.pad(labels[box] == index + 1, 1)
        label = index + 1 if ids is None else int(ids[index + 1])
        pieces, n = ndi.label(mask)  # 4-connected: find_contours' own connectivity of the foreground
        masks = [mask] if n == 1 else [pieces == k for k in range(1, n + 1)]
        polygons = []
        for piece in masks:
            rings = find_contours(piece.astype(np.float32), 0.5)
            outer = max(range(len(rings)), key=lambda i: _ring_area(rings[i]))
            exterior = rings[outer]
            holes = [r if np.sign(_signed_area(r)) != np.sign(_signed_area(exterior)) else r[::-1]
                     for i, r in enumerate(rings) if i != outer]
            # (row, col) of the padded crop -> (x, y) with pixel centres at +0.5
            polygons.append([_to_xy(r, box) for r in [exterior, *holes]])
        polygons.sort(key=lambda rings: -_ring_area(rings[0]))  # stable: equal pieces keep raster order
        yield label, polygons


def _to_xy(ring: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
    xy = np.empty_like(ring)
    xy[:, 0] = ring[:, 1] + (box[1].start - 1 + 0.5)
    xy[:, 1] = ring[:, 0] + (box[0].start - 1 + 0.5)
    return xy


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
        :func:`skimage.measure.find_contours` at 0.5) of the largest piece;
        :func:`nucleus_polygons` gives every piece and hole.

    Examples
    --------
    >>> labels = np.zeros((4, 5), np.int32); labels[1, 2] = 7
    >>> [(k, p.min(axis=0).tolist(), p.max(axis=0).tolist()) for k, p in nucleus_outlines(labels)]
    [(7, [2.0, 1.0], [3.0, 2.0])]
    """
    for label, polygons in nucleus_polygons(labels):
        yield label, polygons[0][0]


def _ring_area(ring: np.ndarray) -> float:
    """Absolute shoelace area of a polygon."""
    return abs(_signed_area(ring))


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a polygon, its sign the winding direction."""
    y, x = ring[:, 0], ring[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def _composite_roi(polygons: list[list[np.ndarray]], name: str):
    """An ImageJ composite ROI (a ShapeRoi: path of MOVETO/LINETO/CLOSE in image coordinates, even-odd filled)."""
    import roifile

    path: list[float] = []
    for rings in polygons:
        for ring in rings:
            points = ring[:-1]  # CLOSE returns to the first point
            path += [0.0, float(points[0, 0]), float(points[0, 1])]
            for x, y in points[1:]:
                path += [1.0, float(x), float(y)]
            path.append(4.0)
    every = np.concatenate([ring for rings in polygons for ring in rings])
    left, top = np.floor(every.min(axis=0)).astype(int)
    right, bottom = np.ceil(every.max(axis=0)).astype(int)
    return roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, name=name, left=int(left), top=int(top),
                             right=int(right), bottom=int(bottom), shape_roi_size=len(path),
                             multi_coordinates=np.asarray(path, np.float32))


def write_imagej_rois(path: str | Path, labels: np.ndarray) -> None:
    """Write every nucleus as an ImageJ ROI into a zip, atomically.

    Open the zip in Fiji's ROI Manager (drag and drop, or *More > Open*). Each
    ROI is named by its label; coordinates are sub-pixel, in pixels. A nucleus
    of one piece without holes is a polygon ROI; one with a hole or in several
    pieces a composite ROI (ImageJ's ``ShapeRoi``, even-odd filled), so that
    its area and outline hold every piece and leave the holes out.

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
    for label, polygons in nucleus_polygons(labels):
        if len(polygons) == 1 and len(polygons[0]) == 1:
            roi = roifile.ImagejRoi.frompoints(polygons[0][0][:-1], name=str(label))  # ImageJ closes polygons itself
            roi.roitype = roifile.ROI_TYPE.POLYGON
        else:
            roi = _composite_roi(polygons, str(label))
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
    for label, polygons in nucleus_polygons(labels):
        if origin != (0, 0):
            for rings in polygons:
                for ring in rings:
                    ring += (origin[1], origin[0])
        if len(polygons) == 1:
            geometry = {"type": "Polygon", "coordinates": [ring.tolist() for ring in polygons[0]]}
        else:
            geometry = {"type": "MultiPolygon", "coordinates": [[ring.tolist() for ring in rings] for rings in polygons]}
        yield {
            "type": "Feature",
            "geometry": geometry,
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
            if isinstance(feature, str):
                handle.write(feature)
            else:
                json.dump(feature, handle)
        handle.write("]}")


def write_geojson(path: str | Path, labels: np.ndarray) -> None:
    """Write every nucleus as a QuPath detection in a GeoJSON FeatureCollection, atomically.

    Coordinates are in pixels, (0, 0) the top-left corner of the image. Each
    Feature is a Polygon (exterior ring, then a ring per hole) or, for a
    nucleus in several pieces, a MultiPolygon of them, with ``properties``
    ``{"objectType": "detection", "classification": {"name": "Nucleus"}, "label": k}``,
    which QuPath (*File > Import objects*) reads as nucleus detections.

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


def write_probabilities_tiff(path: str | Path, probabilities: np.ndarray, channels: Sequence[str] | None = None, *,
                             pixel_size: PixelSize | tuple[float, float, str] | None = None) -> None:
    """Write ``(C, H, W)`` float32 probability maps as an ImageJ hyperstack TIFF, atomically.

    Fiji opens it as C channels; their names (``channels``) are stored as the
    ImageJ channel labels. ``pixel_size``: the image's pixel size, recorded as
    ImageJ reads it (see :func:`write_labels_tiff`).

    Examples
    --------
    >>> write_probabilities_tiff("probs.tif", np.zeros((3, 8, 8), np.float32), ["body", "contour", "touch"])  # doctest: +SKIP
    """
    import tifffile

    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 3:
        raise ValueError(f"probabilities must be (C, H, W), got shape {probabilities.shape}")
    pixel_size = _checked_pixel_size(pixel_size)
    metadata: dict = {"axes": "CYX"}
    if channels is not None:
        if len(channels) != probabilities.shape[0]:
            raise ValueError(f"{len(channels)} channel names for {probabilities.shape[0]} channels")
        metadata["Labels"] = [str(c) for c in channels]
    if pixel_size is not None:
        metadata["unit"] = pixel_size.unit
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, probabilities, imagej=True, metadata=metadata, **_tiff_resolution(pixel_size, True))
