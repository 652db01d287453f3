"""The metadata of a model file: read, validated against the tensors, updated, written.

A nucleiseg model file is a safetensors file: named tensors plus a string
table, whose values are JSON. :class:`ModelMetadata` is that table decoded and
checked; it is a read-only mapping (``meta["postprocess"]``, ``meta.get(...)``)
with typed accessors for what prediction uses.

Everything is checked before a network is built or a tensor loaded, from the
file's header alone (:meth:`ModelMetadata.read`): a crafted ``config`` cannot
make the loader allocate a network the tensors do not hold, and a threshold
stored as text fails at load, naming the file, instead of once per image.

=======================  ===============================================================
key                      checked
=======================  ===============================================================
``config``               required; ``architecture`` ``"unetplusplus"``, ``in_channels``,
                         ``out_channels``, ``widths`` positive integers, and every tensor
                         name, shape and dtype the network would have present in the file
``channels``             unique names, as many as ``out_channels``
``postprocess``          known keys; thresholds numbers in [0, 1], sizes integers >= 0
``postprocess_by_kind``  kinds among :data:`nucleiseg.data.kinds.KINDS`, values as above
``fast_prune_level``     integer in 1..depth
``nucleus_diameter``     finite number > 0
``preprocess``           an object
=======================  ===============================================================

Other keys (``epoch``, ``training``, ``tuning``, ``nucleiseg_version``, ...) are
kept as they are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import NucleisegError

__all__ = [
    "DEFAULT_CHANNELS",
    "DEFAULT_FAST_PRUNE_LEVEL",
    "MAX_DEPTH",
    "ModelMetadata",
    "read_model_file",
    "resolve_prune_level",
    "write_model_file",
]

#: Output channel names when a file does not list them.
DEFAULT_CHANNELS = ("body", "contour", "touch")

#: Prune level of fast mode when the model file does not name one (``fast_prune_level``).
DEFAULT_FAST_PRUNE_LEVEL = 2

#: Deepest network a model file may describe (poolings): 2**8 = 256-pixel input multiple.
MAX_DEPTH = 8

_CONFIG_KEYS = {"architecture", "in_channels", "out_channels", "widths"}
_THRESHOLDS = ("foreground_threshold", "seed_threshold")
_SIZES = ("min_seed_size", "min_size")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_INT_DTYPES = {"I64", "I32"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and float(value).is_integer()


class ModelMetadata(Mapping):
    """The decoded, validated metadata of a model file; a read-only mapping.

    Build one with :meth:`read` (from a file's header), :meth:`from_raw`
    (the undecoded string table) or :meth:`create` (values, e.g. for a new
    file); each validates. :meth:`updated` returns a validated copy with keys
    replaced.

    Parameters
    ----------
    values : mapping
        Decoded metadata (JSON values by key).
    shapes : mapping, optional
        ``{tensor name: (shape, safetensors dtype)}`` of the file; when given,
        ``config`` is checked against it.
    path : str or Path, optional
        The file, named in errors.

    Raises
    ------
    NucleisegError
        One line naming the file and the first key found wrong.

    Examples
    --------
    >>> meta = ModelMetadata({"config": {"architecture": "unetplusplus", "in_channels": 3,
    ...                                  "out_channels": 3, "widths": [4, 8]}})
    >>> meta.channels, meta.depth, meta.fast_prune_level
    (('body', 'contour', 'touch'), 1, None)
    >>> meta.updated({"fast_prune_level": 3})
    Traceback (most recent call last):
    ...
    nucleiseg.errors.NucleisegError: model metadata 'fast_prune_level' must be an integer in 1..1 (the network's depth), got 3
    """

    def __init__(self, values: Mapping[str, Any], shapes: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
                 path: str | Path | None = None):
        self._values = dict(values)
        self.path = None if path is None else Path(path)
        self._validate(shapes)

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ModelMetadata({self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        """A plain (deep) copy of the values."""
        return json.loads(json.dumps(self._values))

    # ------------------------------------------------------------------ typed views
    @property
    def config(self) -> dict[str, Any]:
        return dict(self._values["config"])

    @property
    def depth(self) -> int:
        return len(self._values["config"]["widths"]) - 1

    @property
    def out_channels(self) -> int:
        return int(self._values["config"]["out_channels"])

    @property
    def channels(self) -> tuple[str, ...]:
        """Names of the output channels (``"channels"``, else the first ``out_channels`` of body, contour, touch)."""
        names = self._values.get("channels")
        return tuple(names) if names else DEFAULT_CHANNELS[: self.out_channels]

    @property
    def postprocess(self) -> dict[str, Any]:
        return dict(self._values.get("postprocess") or {})

    @property
    def postprocess_by_kind(self) -> dict[str, dict[str, Any]]:
        return {kind: dict(values) for kind, values in (self._values.get("postprocess_by_kind") or {}).items()}

    @property
    def fast_prune_level(self) -> int | None:
        level = self._values.get("fast_prune_level")
        return None if level is None else int(level)

    @property
    def nucleus_diameter(self) -> float | None:
        diameter = self._values.get("nucleus_diameter")
        return None if diameter is None else float(diameter)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_raw(cls, raw: Mapping[str, str], shapes: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
                 path: str | Path | None = None) -> ModelMetadata:
        """Decode a safetensors string table (JSON values) and validate it."""
        values = {}
        for key, text in raw.items():
            try:
                values[str(key)] = json.loads(text)
            except (TypeError, ValueError) as exc:
                raise NucleisegError(f"not a nucleiseg model file (metadata {key!r} is not JSON: {exc})", path) from None
        return cls(values, shapes, path)

    @classmethod
    def read(cls, path: str | Path) -> ModelMetadata:
        """The validated metadata of a model file, from its header alone (no tensor is loaded)."""
        path = Path(path)
        raw, shapes = _read_header(path)
        return cls.from_raw(raw, shapes, path)

    @classmethod
    def create(cls, values: Mapping[str, Any], tensors: Mapping[str, Any] | None = None,
               path: str | Path | None = None) -> ModelMetadata:
        """Metadata for tensors about to be written (``torch.Tensor`` values), validated against them."""
        values = json.loads(json.dumps(dict(values)))  # tuples -> lists, as the file will hold them
        return cls(values, None if tensors is None else tensor_shapes(tensors), path)

    def updated(self, updates: Mapping[str, Any], shapes: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
                ) -> ModelMetadata:
        """A validated copy with the keys of ``updates`` replaced (JSON-able values)."""
        values = dict(self._values)
        values.update({str(k): json.loads(json.dumps(v)) for k, v in updates.items()})
        return ModelMetadata(values, shapes, self.path)

    def to_raw(self) -> dict[str, str]:
        """The safetensors string table: each value as JSON."""
        return {key: json.dumps(value) for key, value in self._values.items()}

    # ------------------------------------------------------------------ validation
    def _fail(self, message: str) -> None:
        raise NucleisegError(message, self.path)

    def _validate(self, shapes: Mapping[str, tuple[tuple[int, ...], str]] | None) -> None:
        values = self._values
        if "config" not in values:
            self._fail("model file has no 'config' metadata; was it written by nucleiseg?")
        config = values["config"]
        if not isinstance(config, dict):
            self._fail(f"model metadata 'config' must be an object, got {type(config).__name__}")
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            self._fail(f"model metadata 'config' has unknown keys {sorted(unknown)} (this version knows {sorted(_CONFIG_KEYS)})")
        architecture = config.get("architecture", "unetplusplus")
        if architecture != "unetplusplus":
            self._fail(f"unknown architecture {architecture!r} (this version knows 'unetplusplus')")
        for key in ("in_channels", "out_channels"):
            value = config.get(key, 3)
            if not (_is_integer(value) and 1 <= value <= 4096):
                self._fail(f"model metadata 'config.{key}' must be an integer in 1..4096, got {value!r}")
        widths = config.get("widths")
        if (not isinstance(widths, list) or not 2 <= len(widths) <= MAX_DEPTH + 1
                or not all(_is_integer(w) and 1 <= w <= 65536 for w in widths)):
            self._fail(f"model metadata 'config.widths' must be 2..{MAX_DEPTH + 1} integers in 1..65536, "
                       f"got {_short(widths)}")
        depth = len(widths) - 1
        if shapes is not None:
            self._check_tensors(config, shapes)

        channels = values.get("channels")
        out_channels = int(config.get("out_channels", 3))
        if channels is None:
            if out_channels > len(DEFAULT_CHANNELS):
                self._fail(f"model metadata lacks 'channels' and the network has {out_channels} output channels")
        elif (not isinstance(channels, list) or not all(isinstance(c, str) and c for c in channels)
              or len(set(channels)) != len(channels)):
            self._fail(f"model metadata 'channels' must be a list of distinct names, got {_short(channels)}")
        elif len(channels) != out_channels:
            self._fail(f"model metadata names {len(channels)} channels, the network has {out_channels}")

        self._check_postprocess("postprocess", values.get("postprocess"))
        by_kind = values.get("postprocess_by_kind")
        if by_kind is not None:
            from ..data.kinds import KINDS

            if not isinstance(by_kind, dict):
                self._fail(f"model metadata 'postprocess_by_kind' must be an object, got {_short(by_kind)}")
            for kind, params in by_kind.items():
                if kind not in KINDS:
                    self._fail(f"model metadata 'postprocess_by_kind' names an unknown kind {kind!r} "
                               f"(kinds: {', '.join(KINDS)})")
                self._check_postprocess(f"postprocess_by_kind.{kind}", params)

        level = values.get("fast_prune_level")
        if level is not None and not (_is_integer(level) and 1 <= level <= depth):
            self._fail(f"model metadata 'fast_prune_level' must be an integer in 1..{depth} (the network's depth), "
                       f"got {_short(level)}")
        diameter = values.get("nucleus_diameter")
        if diameter is not None and not (_is_number(diameter) and math.isfinite(diameter) and diameter > 0):
            self._fail(f"model metadata 'nucleus_diameter' must be a positive number of pixels, got {_short(diameter)}")
        preprocess = values.get("preprocess")
        if preprocess is not None and not isinstance(preprocess, dict):
            self._fail(f"model metadata 'preprocess' must be an object, got {_short(preprocess)}")

    def _check_postprocess(self, key: str, params: Any) -> None:
        if params is None:
            return
        if not isinstance(params, dict):
            self._fail(f"model metadata '{key}' must be an object, got {_short(params)}")
        unknown = set(params) - set(_THRESHOLDS) - set(_SIZES)
        if unknown:
            self._fail(f"model metadata '{key}' has unknown keys {sorted(unknown)} "
                       f"(known: {', '.join(_THRESHOLDS + _SIZES)})")
        for name in _THRESHOLDS:
            value = params.get(name, 0.5)
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                self._fail(f"model metadata '{key}.{name}' must be a number in [0, 1], got {_short(value)}")
        for name in _SIZES:
            value = params.get(name, 0)
            if not (_is_integer(value) and value >= 0):
                self._fail(f"model metadata '{key}.{name}' must be a whole number of pixels >= 0, got {_short(value)}")

    def _check_tensors(self, config: dict[str, Any], shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
        """The file's tensors are exactly those of the network ``config`` describes."""
        widths = [int(w) for w in config["widths"]]
        # the stem of each level names its width: compare those first, so a crafted config is refused
        # from the header before anything the size of the config is built
        for i, width in enumerate(widths):
            name = f"nodes.x{i}_0.0.weight"
            found = shapes.get(name)
            if found is None or not found[0] or found[0][0] != width:
                have = "absent" if found is None else f"of shape {list(found[0])}"
                self._fail(f"weights do not match the stored config: config.widths[{i}] = {width} "
                           f"but tensor {name} is {have}")
        expected = expected_shapes(config)
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        if missing or extra:
            what = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
            self._fail(f"weights do not match the stored config ({len(missing)} tensors missing, "
                       f"{len(extra)} unexpected; first {what})")
        for name, shape in expected.items():
            found_shape, dtype = shapes[name]
            if tuple(found_shape) != shape:
                self._fail(f"weights do not match the stored config: tensor {name} is {list(found_shape)}, "
                           f"the config needs {list(shape)}")
            allowed = _INT_DTYPES if name.endswith("num_batches_tracked") else _FLOAT_DTYPES
            if dtype not in allowed:
                self._fail(f"tensor {name} has type {dtype}, expected one of {', '.join(sorted(allowed))}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
                "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def tensor_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` of a dict of torch tensors."""
    return {name: (tuple(t.shape), _DTYPE_NAMES.get(str(t.dtype).removeprefix("torch."), str(t.dtype)))
            for name, t in tensors.items()}


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state-dict tensor shapes of the network ``config`` describes, without allocating it.

    Built on PyTorch's ``meta`` device, so the answer is the network's own.

    Examples
    --------
    >>> shapes = expected_shapes({"in_channels": 3, "out_channels": 3, "widths": [4, 8]})
    >>> shapes["nodes.x0_0.0.weight"], shapes["heads.0.weight"]
    ((4, 3, 3, 3), (3, 4, 1, 1))
    """
    import torch

    from .unetplusplus import UNetPlusPlus

    kwargs = {k: v for k, v in config.items() if k != "architecture"}
    with torch.device("meta"):
        network = UNetPlusPlus(**kwargs)
    return {name: tuple(t.shape) for name, t in network.state_dict().items()}


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """A safetensors file's string table and tensor shapes/dtypes, read from its header only."""
    from safetensors import safe_open

    if not path.is_file():
        raise NucleisegError("no such model file", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            shapes = {}
            for name in f.keys():
                view = f.get_slice(name)
                shapes[name] = (tuple(int(n) for n in view.get_shape()), str(view.get_dtype()))
    except Exception as exc:  # safetensors raises several types; all mean "not a model file"
        raise NucleisegError(f"not a nucleiseg model file ({_first_line(exc)})", path) from None
    return raw, shapes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_model_file(path: str | Path) -> tuple[dict[str, Any], ModelMetadata]:
    """The tensors and validated metadata of a model file.

    The header is validated first (:meth:`ModelMetadata.read`); only then are
    the tensors loaded (on the CPU).

    Raises
    ------
    NucleisegError
        Naming the file: missing, not safetensors, or metadata that does not
        describe its tensors.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = ModelMetadata.read(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # a header that parses over a truncated body
        raise NucleisegError(f"not a nucleiseg model file ({_first_line(exc)})", path) from None
    return tensors, meta


def write_model_file(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> Path:
    """Write tensors and metadata (validated against them) as a safetensors file, atomically."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = ModelMetadata.create(metadata, tensors, path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta.to_raw())
    return path


def resolve_prune_level(depth: int, metadata: Mapping[str, Any], mode: str, prune_level: int | None = None) -> int | None:
    """The head to compute: ``prune_level`` if given, else the model's fast head in fast mode, else None (all).

    The fast head is the metadata's ``fast_prune_level`` (chosen by ``nucleiseg tune``;
    :data:`DEFAULT_FAST_PRUNE_LEVEL` when absent), kept within 1..depth.

    Examples
    --------
    >>> resolve_prune_level(4, {"fast_prune_level": 3}, "fast"), resolve_prune_level(4, {}, "accurate")
    (3, None)
    """
    if mode not in ("accurate", "fast"):
        raise ValueError(f"mode must be 'accurate' or 'fast', got {mode!r}")
    if prune_level is not None:
        level = int(prune_level)
        if not 1 <= level <= depth:
            raise ValueError(f"prune_level must be in 1..{depth}, got {prune_level}")
        return level
    if mode == "fast":
        return min(max(int(metadata.get("fast_prune_level", DEFAULT_FAST_PRUNE_LEVEL)), 1), depth)
    return None
