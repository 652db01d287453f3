"""Network architectures and their (de)serialisation.

Model files are safetensors: tensors only, never pickled objects, so loading a
file from anywhere cannot run code. Their metadata holds JSON strings: the
network ``config`` (enough to rebuild it alone), the output ``channels``,
``postprocess`` and ``preprocess`` settings, and the ``nucleiseg_version``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import NucleisegError
from .unetplusplus import UNetPlusPlus, UNetPlusPlusConfig

__all__ = [
    "DEFAULT_MODEL_PATH",
    "UNetPlusPlus",
    "UNetPlusPlusConfig",
    "build_model",
    "load_model_file",
    "read_raw_model_file",
    "resolve_model_path",
    "save_model",
]

DEFAULT_CHANNELS = ("body", "contour", "touch")

#: The trained model shipped inside the package.
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "weights" / "default.safetensors"


def resolve_model_path(spec: str | Path | None) -> Path:
    """The model file meant by ``spec``: a path, or None / ``"default"`` for the shipped model."""
    if spec is None or str(spec) == "default":
        if not DEFAULT_MODEL_PATH.is_file():
            raise NucleisegError("the shipped default model is missing from this installation", DEFAULT_MODEL_PATH)
        return DEFAULT_MODEL_PATH
    path = Path(spec)
    if path.is_dir():  # a training run folder: take its best model
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise NucleisegError("folder holds no best.safetensors or last.safetensors", path)
    if not path.is_file():
        raise NucleisegError("no such model file", path)
    return path


def build_model(config: dict[str, Any]) -> UNetPlusPlus:
    """Build a network from the ``config`` dict stored in a model file."""
    config = dict(config)
    architecture = config.pop("architecture", "unetplusplus")
    if architecture != "unetplusplus":
        raise NucleisegError(f"unknown architecture {architecture!r} (this version knows 'unetplusplus')")
    return UNetPlusPlus(**config)


def save_model(path: str | Path, model: UNetPlusPlus, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and metadata to a safetensors file, atomically."""
    from safetensors.torch import save_file

    from .. import __version__
    from ..io import atomic_path

    meta = {"config": model.config.to_dict(), "channels": list(DEFAULT_CHANNELS[: model.config.out_channels])}
    meta.update(metadata or {})
    meta["nucleiseg_version"] = __version__
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})


def read_raw_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the undecoded (JSON string) metadata of a safetensors file.

    Raises
    ------
    NucleisegError
        Naming the file, when it is missing or not a safetensors file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise NucleisegError("no such model file", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
        return load_file(str(path)), raw
    except Exception as exc:  # safetensors raises several types; all mean "not a model file"
        raise NucleisegError(f"not a nucleiseg model file ({exc})", path) from None


def load_model_file(path: str | Path) -> tuple[UNetPlusPlus, dict[str, Any]]:
    """Rebuild a network from a safetensors model file.

    Returns
    -------
    model : UNetPlusPlus
        In eval mode, on the CPU.
    metadata : dict
        The decoded JSON metadata (``config``, ``channels``, ``postprocess``, ...).
    """
    path = Path(path)
    state, raw = read_raw_model_file(path)
    try:
        metadata = {k: json.loads(v) for k, v in raw.items()}
    except ValueError as exc:
        raise NucleisegError(f"not a nucleiseg model file (metadata is not JSON: {exc})", path) from None
    if "config" not in metadata:
        raise NucleisegError("model file has no 'config' metadata; was it written by nucleiseg?", path)
    model = build_model(metadata["config"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise NucleisegError(f"weights do not match the stored config ({str(exc).splitlines()[0]})", path) from None
    model.eval()
    return model, metadata
