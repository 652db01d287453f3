"""Network architectures and their (de)serialisation.

Model files are safetensors: tensors only, never pickled objects, so loading a
file from anywhere cannot run code. Their metadata holds JSON strings: the
network ``config`` (enough to rebuild it alone), the output ``channels``,
``postprocess`` and ``preprocess`` settings, and the ``nucleiseg_version``.
:mod:`nucleiseg.models.metadata` owns that format: every read and write is
validated against the tensors (:class:`~nucleiseg.models.metadata.ModelMetadata`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import NucleisegError
from .metadata import DEFAULT_CHANNELS, ModelMetadata, read_model_file, resolve_prune_level, write_model_file
from .unetplusplus import UNetPlusPlus, UNetPlusPlusConfig

__all__ = [
    "DEFAULT_CHANNELS",
    "DEFAULT_MODEL_PATH",
    "ModelMetadata",
    "UNetPlusPlus",
    "UNetPlusPlusConfig",
    "build_model",
    "load_model_file",
    "read_model_file",
    "read_raw_model_file",
    "resolve_model_path",
    "resolve_prune_level",
    "save_model",
    "write_model_file",
]

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
    """Write ``model``'s weights and metadata to a safetensors file, atomically.

    The metadata (``config`` and ``channels`` from the network, then ``metadata``,
    then ``nucleiseg_version``) is validated against the weights
    (:class:`~nucleiseg.models.metadata.ModelMetadata`) before anything is written.
    """
    from .. import __version__

    meta = {"config": model.config.to_dict(), "channels": list(DEFAULT_CHANNELS[: model.config.out_channels])}
    meta.update(metadata or {})
    meta["nucleiseg_version"] = __version__
    write_model_file(path, model.state_dict(), meta)


def read_raw_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the undecoded (JSON string) metadata of a safetensors file, validated.

    Raises
    ------
    NucleisegError
        Naming the file, when it is missing, not a safetensors file, or its
        metadata does not describe its tensors.
    """
    tensors, meta = read_model_file(path)
    return tensors, meta.to_raw()


def load_model_file(path: str | Path) -> tuple[UNetPlusPlus, ModelMetadata]:
    """Rebuild a network from a safetensors model file.

    The metadata is validated against the tensors' shapes, read from the
    file's header, before the network is built.

    Returns
    -------
    model : UNetPlusPlus
        In eval mode, on the CPU.
    metadata : ModelMetadata
        The decoded, validated metadata (``config``, ``channels``, ``postprocess``, ...);
        a read-only mapping.
    """
    path = Path(path)
    state, metadata = read_model_file(path)
    model = build_model(metadata.config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # checked above; kept for a torch that adds a buffer
        raise NucleisegError(f"weights do not match the stored config ({str(exc).splitlines()[0]})", path) from None
    model.eval()
    return model, metadata
