"""What the widget hands to :func:`nucleiseg.segment`: a layer's pixels, channel and options (no Qt, no torch).

A napari Image layer holds one of:

- a 2-D grey image ``(H, W)``;
- an RGB(A) image ``(H, W, 3|4)`` (``layer.rgb``): segmented as colour, or one of its channels;
- a multi-channel image ``(C, H, W)`` with at most :data:`MAX_CHANNELS` channels (napari's
  layout for a stack it did not split into layers): one channel, chosen by the user;
- anything else (a 3-D or time stack, ``C > MAX_CHANNELS``): refused with a one-line message.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import NucleisegError
from ..preprocess import select_channel

__all__ = ["ALL_CHANNELS", "MAX_CHANNELS", "channel_names", "layer_array", "parse_diameter"]

#: A non-RGB 3-D layer with at most this many planes along its first axis is taken as channels
#: (DAPI plus a few stains); more planes are a z or time stack, which nucleiseg does not segment.
MAX_CHANNELS = 8

#: The channel choice that segments an RGB layer as colour.
ALL_CHANNELS = "all (colour)"


def _layout(shape: tuple[int, ...], rgb: bool, name: str) -> str:
    if rgb and len(shape) == 3:
        return "rgb"
    if len(shape) == 2:
        return "grey"
    if len(shape) == 3 and shape[0] <= MAX_CHANNELS:
        return "channels"
    raise NucleisegError(
        f"layer '{name}' has shape {tuple(shape)}: nucleiseg segments 2-D images (grey, RGB, or up to "
        f"{MAX_CHANNELS} channels), not 3-D or time stacks"
    )


def channel_names(shape: tuple[int, ...], rgb: bool, name: str = "image") -> list[str]:
    """The channel choices of a layer of this shape: empty for grey, ``ALL_CHANNELS`` first for RGB.

    Raises
    ------
    NucleisegError
        A stack that is not a 2-D image (see the module docstring).

    Examples
    --------
    >>> channel_names((64, 64), False), channel_names((64, 64, 3), True)
    ([], ['all (colour)', '1', '2', '3'])
    >>> channel_names((2, 64, 64), False)
    ['1', '2']
    """
    layout = _layout(tuple(shape), rgb, name)
    if layout == "grey":
        return []
    count = shape[-1] if layout == "rgb" else shape[0]
    return ([ALL_CHANNELS] if layout == "rgb" else []) + [str(k) for k in range(1, count + 1)]


def layer_array(data: Any, rgb: bool, channel: str | int | None = None, name: str = "image") -> np.ndarray:
    """The 2-D image (grey ``(H, W)`` or colour ``(H, W, C)``) to segment, from a layer's data.

    Parameters
    ----------
    data : array-like
        ``layer.data`` (a multiscale layer's first, full-resolution level is taken by the caller).
    rgb : bool
        ``layer.rgb``.
    channel : str, int or None
        A choice of :func:`channel_names` (1 = the first channel); None or ``ALL_CHANNELS``: all
        channels of an RGB layer, the first of a multi-channel one.
    name : str
        The layer's name, for messages.

    Raises
    ------
    NucleisegError
        A 3-D or time stack; a channel the layer does not have.

    Examples
    --------
    >>> stack = np.zeros((2, 32, 32), np.uint16); stack[1] = 5
    >>> layer_array(stack, False, "2").shape, int(layer_array(stack, False, "2").max())
    ((32, 32), 5)
    >>> layer_array(np.zeros((32, 32, 3), np.uint8), True).shape
    (32, 32, 3)
    """
    shape = tuple(np.shape(data))
    layout = _layout(shape, rgb, name)
    image = np.asarray(data)
    if layout == "grey":
        return image
    if layout == "channels":
        image = np.moveaxis(image, 0, -1)
        channel = 1 if channel in (None, ALL_CHANNELS) else channel
    if channel in (None, ALL_CHANNELS):
        return image
    try:
        return select_channel(image, int(channel))
    except ValueError as exc:
        raise NucleisegError(f"layer '{name}' {exc}") from None


def parse_diameter(text: str) -> float | str | None:
    """The diameter field: empty / "as trained" -> None, "measure" -> ``"auto"``, else pixels > 0.

    Raises
    ------
    NucleisegError
        Neither a positive number nor one of the words.

    Examples
    --------
    >>> parse_diameter(""), parse_diameter("measure"), parse_diameter(" 36 ")
    (None, 'auto', 36.0)
    """
    text = str(text).strip().lower()
    if text in ("", "as trained", "none"):
        return None
    if text in ("measure", "auto"):
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise NucleisegError(f"nucleus diameter must be a number of pixels > 0 or 'measure', got '{text}'")
    return value
