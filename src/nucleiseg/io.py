"""Reading images robustly and writing outputs atomically.

Every reader here turns a user mistake (missing file, empty file, not an image)
into :class:`~nucleiseg.errors.ImageReadError` naming the file, so the command
line can report it in one line and go on with the other images.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ImageReadError

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

            image = iio.imread(path)
    except Exception as exc:  # decoders raise many types; all mean "not a readable image"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(f"cannot be read as an image ({reason})", path) from None
    image = np.asarray(image)
    return _as_2d_image(image, path)


def _as_2d_image(image: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze singleton axes and bring channels last, or refuse a stack."""
    if image.dtype == bool:
        image = image.astype(np.uint8)
    image = np.squeeze(image)
    if image.ndim == 3 and image.shape[0] in (1, 2, 3, 4) and image.shape[-1] > 4:
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 2, 3, 4)):
        if image.size == 0:
            raise ImageReadError("image has no pixels", path)
        return image
    raise ImageReadError(
        f"expected a 2-D grey, RGB or RGBA image, got an array of shape {image.shape}", path
    )


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
