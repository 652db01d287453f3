"""Export a model for other runtimes: ONNX, for ONNX Runtime, OpenVINO, TensorRT, DeepImageJ, ...

The exported graph is the network of a nucleiseg model file with its
BatchNorms folded into the convolutions (:func:`~nucleiseg.models.fuse.fuse_batchnorm`)
and the probabilities step on top, in float32:

``image``
    float32 ``N x 3 x H x W``; ``N``, ``H`` and ``W`` are dynamic, but ``H``
    and ``W`` must be multiples of ``2**depth`` (16 for the default network;
    the metadata key ``input_multiple`` says it). The values are those of
    :func:`nucleiseg.preprocess.normalize`: the 8-bit RGB image scaled so that
    its 1st and 99.8th percentiles (over all channels) map to 0 and 1, clipped
    to [-0.5, 1.5]. Pad other sizes at the bottom and right by reflection
    (as :func:`nucleiseg.models.unetplusplus.pad_to_multiple` does) and crop the
    output back.
``probabilities``
    float32 ``N x C x H x W`` in [0, 1], channels in the order of the metadata
    key ``channels`` (``body``, ``contour``, ``touch``). Accurate mode: the mean
    of the sigmoids of all deep-supervision heads; fast mode: the sigmoid of
    head ``k`` alone, computing only its sub-network.

The ONNX ``metadata_props`` carry, as JSON strings, what the model file's
metadata holds (``config``, ``channels``, ``postprocess``, ``preprocess``,
``nucleiseg_version``) and the export's own settings (``mode``,
``prune_level``, ``input_multiple``, ``input``, ``output``), so the
watershed post-processing (:func:`nucleiseg.postprocess.instances_from_probabilities`)
can be applied to the exported model's output with the model's own thresholds.

Needs the optional packages ``onnx`` (and ``onnxscript`` for torch's default,
dynamo-based exporter; without it the TorchScript exporter is used):
``pip install 'nucleiseg[onnx]'``.

Examples
--------
>>> export_onnx("default", "nuclei.onnx", mode="fast")     # doctest: +SKIP
PosixPath('nuclei.onnx')
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import NucleisegError, OptionError
from .models import DEFAULT_CHANNELS, UNetPlusPlus, load_model_file, resolve_model_path, resolve_prune_level
from .models.fuse import fuse_batchnorm
from .models.unetplusplus import heads_to_probabilities

__all__ = ["ONNX_INPUT", "ONNX_OUTPUT", "ProbabilityNetwork", "export_onnx", "read_onnx_metadata"]

log = logging.getLogger("nucleiseg.export")

#: Names of the graph's input and output.
ONNX_INPUT = "image"
ONNX_OUTPUT = "probabilities"

_INSTALL_HINT = "pip install 'nucleiseg[onnx]'"


class ProbabilityNetwork(nn.Module):
    """``image -> probabilities`` of a network: the mean of all heads' sigmoids, or head ``k``'s."""

    def __init__(self, network: UNetPlusPlus, prune_level: int | None = None):
        super().__init__()
        self.network = network
        self.prune_level = prune_level

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        heads = self.network(image, prune_level=self.prune_level)
        return heads_to_probabilities(heads, pruned=self.prune_level is not None)


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise NucleisegError(f"{what} needs the optional package '{module}': {_INSTALL_HINT}")


def _resolve_level(depth: int, metadata: dict[str, Any], mode: str, prune_level: int | None) -> int | None:
    """Prediction's rule (:func:`nucleiseg.models.metadata.resolve_prune_level`), a bad level reported in one line."""
    if prune_level is not None and not 1 <= int(prune_level) <= depth:
        raise OptionError("prune_level", f"must be in 1..{depth} for this model, got {prune_level}")
    return resolve_prune_level(depth, metadata, mode, prune_level)


def _load(model: Any) -> tuple[UNetPlusPlus, dict[str, Any], str | None]:
    """The network, its metadata and its file name, from a path spec, a Model or a network."""
    if isinstance(model, UNetPlusPlus):
        out = model.config.out_channels
        return model, {"config": model.config.to_dict(), "channels": list(DEFAULT_CHANNELS[:out])}, None
    if hasattr(model, "network") and hasattr(model, "metadata"):  # an inference.Model
        path = getattr(model, "path", None)
        return model.network, dict(model.metadata), None if path is None else Path(path).name
    path = resolve_model_path(model)
    network, metadata = load_model_file(path)
    return network, metadata, path.name


def _use_dynamo(exporter: str) -> bool:
    has_kwarg = "dynamo" in inspect.signature(torch.onnx.export).parameters
    if exporter == "dynamo":
        if not has_kwarg:
            raise NucleisegError(f"torch {torch.__version__} has no dynamo ONNX exporter; use exporter='torchscript'")
        _require("onnxscript", "the dynamo ONNX exporter")
        return True
    if exporter == "torchscript":
        return False
    if exporter != "auto":
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    return has_kwarg and importlib.util.find_spec("onnxscript") is not None


@contextlib.contextmanager
def _quiet_loggers():
    """Silence the exporters' own chatter (onnxscript's optimizer at INFO, torch's "torchvision is not
    installed" warnings): the user asked for a file, not for its passes."""
    names = {"torch.onnx": logging.ERROR, "onnxscript": logging.WARNING, "onnx_ir": logging.WARNING}
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        for name, level in names.items():
            logging.getLogger(name).setLevel(level)
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _export_proto(module: nn.Module, multiple: int, opset: int | None, dynamo: bool):
    import onnx

    # Example input: batch 2 and sides of 2 and 3 blocks, so that no dimension is specialised to 1.
    example = torch.rand(2, 3, 2 * multiple, 3 * multiple)
    kwargs: dict[str, Any] = {"input_names": [ONNX_INPUT], "output_names": [ONNX_OUTPUT]}
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")  # TracerWarning / DeprecationWarning: the shape check is for Python use
        if dynamo:
            dims = {
                0: torch.export.Dim("N", min=1),
                2: multiple * torch.export.Dim("H_blocks", min=1),
                3: multiple * torch.export.Dim("W_blocks", min=1),
            }
            program = torch.onnx.export(
                module, (example,), dynamo=True, dynamic_shapes={ONNX_INPUT: dims}, verbose=False, **kwargs
            )
            proto = program.model_proto
        else:
            buffer = io.BytesIO()
            axes = {0: "N", 2: "H", 3: "W"}
            extra = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(
                module, (example,), buffer, dynamic_axes={ONNX_INPUT: axes, ONNX_OUTPUT: axes},
                do_constant_folding=True, **extra, **kwargs,
            )
            proto = onnx.load_model_from_string(buffer.getvalue())
    # Same dimension names whichever exporter wrote the graph.
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for index, name in ((0, "N"), (2, "H"), (3, "W")):
            if len(dims) > index:
                dims[index].ClearField("dim_value")
                dims[index].dim_param = name
    return proto


def export_onnx(
    model: Any,
    path: str | Path,
    mode: Literal["accurate", "fast"] = "accurate",
    prune_level: int | None = None,
    opset: int | None = None,
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto",
) -> Path:
    """Write a model as an ONNX graph ``image -> probabilities`` (see the module docstring).

    Parameters
    ----------
    model : str, Path, None, inference.Model or UNetPlusPlus
        A model file, a training run folder, None / ``"default"`` for the
        shipped model, a loaded model, or a bare network (default channel names).
    path : str or Path
        The ``.onnx`` file to write (atomically; its folder is created).
    mode : {"accurate", "fast"}
        Accurate: mean of all heads; fast: head ``fast_prune_level`` of the
        model's metadata (default 2) and only its sub-network.
    prune_level : int, optional
        Export head ``prune_level`` alone, whatever the mode.
    opset : int, optional
        ONNX opset; default: the exporter's.
    exporter : {"auto", "dynamo", "torchscript"}
        torch's exporter: auto takes dynamo where ``onnxscript`` is installed.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    NucleisegError
        Missing optional packages (one line naming them), a bad model file or prune level.
    """
    _require("onnx", "ONNX export")
    import onnx

    from . import __version__
    from .io import atomic_path

    network, metadata, source = _load(model)
    depth = network.depth
    level = _resolve_level(depth, metadata, mode, prune_level)
    multiple = 2**depth
    dynamo = _use_dynamo(exporter)
    fused = fuse_batchnorm(network).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
    module = ProbabilityNetwork(fused, level).eval()
    log.info("exporting %s mode%s with the %s exporter", "accurate" if level is None else "fast",
             "" if level is None else f" (head {level})", "dynamo" if dynamo else "TorchScript")
    proto = _export_proto(module, multiple, opset, dynamo)

    channels = list(metadata.get("channels") or DEFAULT_CHANNELS[: network.config.out_channels])
    props = {key: value for key, value in metadata.items() if key != "nucleiseg_version"}
    props.update(
        {
            "channels": channels,
            "mode": "accurate" if level is None else "fast",
            "prune_level": level,
            "input_multiple": multiple,
            "input": f"{ONNX_INPUT}: float32 N x {network.config.in_channels} x H x W, H and W multiples of "
            f"{multiple}, normalised as nucleiseg.preprocess.normalize",
            "output": f"{ONNX_OUTPUT}: float32 N x {len(channels)} x H x W in [0, 1], channels as 'channels'",
            "source_model": source,
            "source_nucleiseg_version": metadata.get("nucleiseg_version"),
            "nucleiseg_version": __version__,
        }
    )
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    proto.producer_name = "nucleiseg"
    proto.producer_version = __version__
    proto.doc_string = (
        f"nucleiseg UNet++ nuclei segmentation ({props['mode']} mode). {props['input']}; {props['output']}."
    )
    onnx.checker.check_model(proto)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded ``metadata_props`` of an ONNX file written by :func:`export_onnx`."""
    _require("onnx", "reading ONNX metadata")
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for entry in proto.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            out[entry.key] = entry.value
    return out
