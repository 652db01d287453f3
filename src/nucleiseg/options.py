"""One set of prediction options, checked once, with one set of defaults.

:class:`PredictOptions` is what ``nucleiseg predict``, :func:`nucleiseg.segment`,
:func:`nucleiseg.predict_files`, ``evaluate`` and ``tune`` take: the command
line builds one from its flags, the Python API from keywords, and both get the
same defaults (bf16 where the processor runs it natively, tiles of 1024 px).
Every value is validated when the object is made; what depends on the model
(the tile's multiple, the scale a nucleus diameter asks for) when it is
:meth:`~PredictOptions.resolved` for one. Torch-free.

Examples
--------
>>> options = PredictOptions(mode="fast", diameter=36)
>>> options.mode, options.precision, options.tile
('fast', 'auto', 1024)
>>> options.replace(tta=True).tta
True
>>> PredictOptions(min_size=-3)
Traceback (most recent call last):
...
nucleiseg.errors.OptionError: min_size must be a whole number of pixels >= 0, got -3
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import OptionError
from .tiling import DEFAULT_OVERLAP, DEFAULT_TILE, check_tiling

__all__ = ["DEVICES", "MODES", "PRECISIONS", "PredictOptions", "is_device_name"]

MODES = ("accurate", "fast")
PRECISIONS = ("auto", "fp32", "bf16")
#: Device names (``cuda`` also as ``cuda:N``); :func:`nucleiseg.device.resolve_device` checks they exist here.
DEVICES = ("auto", "cpu", "cuda", "mps")
_THRESHOLDS = ("foreground_threshold", "seed_threshold")
_SIZES = ("min_seed_size", "min_size")


def is_device_name(text: str) -> bool:
    """Whether ``text`` (lower case) names a device: one of :data:`DEVICES`, or ``cuda:N``.

    Examples
    --------
    >>> is_device_name("cuda:1"), is_device_name("tpu"), is_device_name("cpu:1")
    (True, False, False)
    """
    kind, _, index = text.partition(":")
    return kind in DEVICES and (not index or (kind == "cuda" and index.isdigit()))


def _shown(value: Any) -> str:
    """A value as the user typed it: 0 rather than 0.0, text quoted."""
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _whole(option: str, value: Any, lowest: int, what: str = "a whole number") -> int:
    try:
        whole = isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value)
    except (OverflowError, ValueError):  # inf, nan
        whole = False
    if not whole or value < lowest:
        raise OptionError(option, f"must be {what} >= {lowest}, got {_shown(value)}")
    return int(value)


def _positive(option: str, value: Any, what: str = "a number") -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
        raise OptionError(option, f"must be {what} > 0, got {_shown(value)}")
    return number


@dataclass(frozen=True)
class PredictOptions:
    """How to predict: the network's mode, tiling, arithmetic, scale and post-processing.

    Parameters
    ----------
    mode : {"accurate", "fast"}
        Accurate averages all UNet++ heads; fast computes only the sub-network
        of the head stored with the model (several times faster).
    tta : bool
        Average the predictions of the 8 flips and quarter turns (8x slower).
    tile : int or None
        Images larger than this (pixels) are predicted in overlapping tiles of
        this side, a multiple of the network's pooling grid (16 for the shipped
        model); None or 0: never tile.
    overlap : int
        Overlap of neighbouring tiles, at most half the tile.
    batch_size : int or None
        Tiles per forward pass; None: as many as fit in about 1 Mpixel.
    precision : {"auto", "fp32", "bf16"}
        Network arithmetic; auto: bf16 where the processor or GPU runs it natively.
    device : str
        ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    scale : float or "auto"
        Resize images by this factor for the network (outputs keep the image's
        size); "auto" measures the nuclei of a first pass. See
        :func:`nucleiseg.inference.predict_labels`.
    diameter : float, "auto" or None
        The nuclei's typical diameter in pixels, instead of ``scale``: the
        images are resized so it matches the model's training nuclei.
        ``"auto"`` is ``scale="auto"``.
    channel : int or None
        Segment only this channel (1 = the first, as in Fiji) of multi-channel images.
    min_size : int or None
        Drop nuclei smaller than this many image pixels (None: the model's setting).
    prune_level : int or None
        Use this UNet++ head alone, whatever ``mode`` says.
    postprocess : mapping or None
        Watershed thresholds replacing the model's (``foreground_threshold``,
        ``seed_threshold``, ``min_seed_size``, ``min_size``; see
        :class:`~nucleiseg.postprocess.PostprocessParams`).

    Raises
    ------
    OptionError
        A value out of range, naming the option.
    """

    mode: Literal["accurate", "fast"] = "accurate"
    tta: bool = False
    tile: int | None = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch_size: int | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    scale: float | Literal["auto"] = 1.0
    diameter: float | Literal["auto"] | None = None
    channel: int | None = None
    min_size: int | None = None
    prune_level: int | None = None
    postprocess: Mapping[str, float] | None = field(default=None)

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.mode not in MODES:
            raise OptionError("mode", f"must be one of {', '.join(MODES)}, got {_shown(self.mode)}")
        if not isinstance(self.tta, bool):
            raise OptionError("tta", f"must be True or False, got {_shown(self.tta)}")
        put("tile", None if self.tile in (None, 0) else _whole("tile", self.tile, 1, "a whole number of pixels"))
        put("overlap", _whole("overlap", self.overlap, 0, "a whole number of pixels"))
        try:  # what holds for any network: the pooling grid's multiple is checked in resolved()
            check_tiling(self.tile, self.overlap, 1)
        except ValueError as exc:
            option, message = str(exc).split(" ", 1)
            if option == "overlap" and self.overlap == DEFAULT_OVERLAP:  # the user gave a small tile, not the overlap
                message += " (the default): give a smaller overlap with tiles this small"
            raise OptionError(option, message) from None
        if self.batch_size is not None:
            put("batch_size", _whole("batch_size", self.batch_size, 1))
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"must be one of {', '.join(PRECISIONS)}, got {_shown(self.precision)}")
        if not isinstance(self.device, str) or not is_device_name(self.device.strip().lower()):
            raise OptionError("device", f"must be auto, cpu, cuda, cuda:N or mps, got {_shown(self.device)}")
        put("device", self.device.strip().lower())
        if isinstance(self.scale, str):
            if self.scale.strip().lower() != "auto":
                raise OptionError("scale", f"must be a number > 0 or 'auto', got {_shown(self.scale)}")
            put("scale", "auto")
        else:
            put("scale", _positive("scale", self.scale))
        if self.diameter is not None:
            if self.scale != 1.0:
                raise OptionError("diameter", "and scale are two ways to say one thing: give one of them")
            if isinstance(self.diameter, str):
                if self.diameter.strip().lower() != "auto":
                    raise OptionError("diameter", f"must be a number of pixels > 0 or 'auto', got {_shown(self.diameter)}")
                put("diameter", "auto")
            else:
                put("diameter", _positive("diameter", self.diameter, "a number of pixels"))
        if self.channel is not None:
            if isinstance(self.channel, int) and not isinstance(self.channel, bool) and self.channel < 1:
                raise OptionError("channel", f"counts from 1 (the first channel, as in Fiji), got {self.channel}")
            put("channel", _whole("channel", self.channel, 1))
        if self.min_size is not None:
            put("min_size", _whole("min_size", self.min_size, 0, "a whole number of pixels"))
        if self.prune_level is not None:
            put("prune_level", _whole("prune_level", self.prune_level, 1))
        if self.postprocess is not None:
            put("postprocess", self._checked_postprocess(self.postprocess))

    @staticmethod
    def _checked_postprocess(values: Mapping[str, Any]) -> dict[str, float]:
        if not isinstance(values, Mapping):
            values = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else values
        if not isinstance(values, Mapping):
            raise OptionError("postprocess", f"must be a mapping of thresholds, got a {type(values).__name__}")
        out: dict[str, float] = {}
        for key, value in values.items():
            if key in _THRESHOLDS:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                    raise OptionError("postprocess", f"threshold {key} must be a number in [0, 1], got {_shown(value)}")
                out[key] = float(value)
            elif key in _SIZES:
                try:
                    out[key] = _whole(key, value, 0, "a whole number of pixels")
                except OptionError as exc:
                    raise OptionError("postprocess", f"size {exc}") from None
            else:
                raise OptionError("postprocess", f"has an unknown threshold {key!r}; the thresholds are "
                                                 f"{', '.join(_THRESHOLDS + _SIZES)}")
        return out

    def replace(self, **changes: Any) -> PredictOptions:
        """A copy with some options changed (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_any(cls, options: PredictOptions | Mapping[str, Any] | None = None, **overrides: Any) -> PredictOptions:
        """``options`` (an object, a mapping or None for the defaults) with ``overrides`` applied.

        Overrides whose value is None keep the option's value, so a caller can
        pass optional arguments straight through.

        Examples
        --------
        >>> PredictOptions.from_any({"mode": "fast"}, tta=True, tile=None).tile
        1024
        """
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if isinstance(options, Mapping):
            unknown += sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown prediction option(s): {', '.join(unknown)}")
        if options is None:
            return cls(**changes)
        if isinstance(options, Mapping):
            return cls(**{**options, **changes})
        if not isinstance(options, cls):
            raise TypeError(f"options must be PredictOptions or a mapping, got {type(options).__name__}")
        return dataclasses.replace(options, **changes) if changes else options

    def resolved(self, depth: int, nucleus_diameter: float) -> PredictOptions:
        """These options checked against a network of ``depth`` poolings, a ``diameter`` turned into a scale.

        Parameters
        ----------
        depth : int
            The network's depth: tiles must be multiples of ``2**depth`` and
            ``prune_level`` within ``1..depth``.
        nucleus_diameter : float
            The typical nucleus diameter of the model's training images.

        Examples
        --------
        >>> PredictOptions(diameter=36).resolved(4, 18.0).scale
        0.5
        >>> PredictOptions(tile=100, overlap=32).resolved(4, 18.0)
        Traceback (most recent call last):
        ...
        nucleiseg.errors.OptionError: tile must be a multiple of 16 pixels (the network's pooling grid), got 100: 96 or 112 would do
        """
        try:
            check_tiling(self.tile, self.overlap, 2**depth)
        except ValueError as exc:
            option, message = str(exc).split(" ", 1)
            raise OptionError(option, message) from None
        if self.prune_level is not None and self.prune_level > depth:
            raise OptionError("prune_level", f"must be in 1..{depth} for this network, got {self.prune_level}")
        if self.diameter is None:
            return self
        scale = "auto" if self.diameter == "auto" else nucleus_diameter / self.diameter
        if scale != "auto" and not math.isfinite(scale):  # a diameter so small that no resize factor follows
            raise OptionError("diameter", f"must be a number of pixels > 0, got {self.diameter:g}: too small to "
                                          "resize the image by")
        return dataclasses.replace(self, diameter=None, scale=scale)
