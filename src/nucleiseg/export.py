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

An ONNX opset asked for is written as asked or refused: the dynamo exporter writes
opsets 18 and above, the TorchScript exporter those below (from 9, the first with the
network's upsampling), up to the newest each exporter of the installed torch declares
(:func:`onnx_opsets`); a graph whose opset is not the one asked for is never written.

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
import numbers
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import NucleisegError, OptionError
from .models import DEFAULT_CHANNELS, UNetPlusPlus, load_model_file, resolve_model_path, resolve_prune_level
from .models.fuse import fuse_batchnorm, is_fused
from .models.unetplusplus import heads_to_probabilities

__all__ = [
    "BIOIMAGEIO_HALO", "ONNX_INPUT", "ONNX_OUTPUT", "ProbabilityNetwork", "export_bioimageio", "export_onnx",
    "onnx_opsets", "read_onnx_metadata",
]

log = logging.getLogger("nucleiseg.export")

#: Names of the graph's input and output.
ONNX_INPUT = "image"
ONNX_OUTPUT = "probabilities"

_INSTALL_HINT = "pip install 'nucleiseg[onnx]'"

#: The lowest ONNX opset the network exports to: its nearest-neighbour upsampling to a given size needs
#: opset 9's ``Upsample`` (torch's TorchScript exporter refuses 7 and 8).
MIN_OPSET = 9


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


def onnx_opsets(exporter: Literal["dynamo", "torchscript"]) -> range:
    """The ONNX opsets ``exporter`` writes for the network as asked, with the installed torch and onnx.

    The dynamo exporter builds opset 18 (lower ones only by a version conversion that fails on this
    network and leaves the graph at 18) and converts to newer ones up to the newest torch declares;
    the TorchScript exporter writes :data:`MIN_OPSET` up to its own newest. Neither beyond the
    newest opset the installed ``onnx`` knows.

    Examples
    --------
    >>> onnx_opsets("dynamo")  # doctest: +SKIP
    range(18, 24)
    """
    import onnx

    # torch's own limits are private: read with the values of torch 2.5-2.13 as fallbacks
    try:
        from torch.onnx import _constants
    except ImportError:  # pragma: no cover - a torch that moved them
        _constants = None
    newest = onnx.defs.onnx_opset_version()
    if exporter == "dynamo":
        low = getattr(_constants, "TORCHLIB_OPSET", 18)
        try:
            from torch.onnx._internal.exporter import _constants as dynamo_constants

            low = getattr(dynamo_constants, "TORCHLIB_OPSET", low)
        except ImportError:  # pragma: no cover - older or newer torch
            pass
        return range(low, min(getattr(_constants, "ONNX_MAX_OPSET", 23), newest) + 1)
    return range(MIN_OPSET, min(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20), newest) + 1)


def _span(opsets: range) -> str:
    return f"{opsets.start}..{opsets.stop - 1}"


def _use_dynamo(exporter: str, opset: int | None = None) -> bool:
    """Whether the dynamo exporter writes the graph; an ``opset`` the exporter(s) cannot write is an :class:`OptionError`.

    With ``exporter="auto"`` the dynamo exporter writes the opsets it can (and the default one) where
    ``onnxscript`` is installed, the TorchScript exporter the others.
    """
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, numbers.Integral)):
        raise OptionError("opset", f"must be a whole number, got {opset!r}")
    has_kwarg = "dynamo" in inspect.signature(torch.onnx.export).parameters
    available = has_kwarg and importlib.util.find_spec("onnxscript") is not None
    if exporter == "dynamo":
        if not has_kwarg:
            raise NucleisegError(f"torch {torch.__version__} has no dynamo ONNX exporter; use exporter='torchscript'")
        _require("onnxscript", "the dynamo ONNX exporter")
        dynamo = True
    elif exporter == "torchscript":
        dynamo = False
    elif exporter != "auto":
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    else:
        dynamo = available and (opset is None or int(opset) in onnx_opsets("dynamo"))
    if opset is None or int(opset) in onnx_opsets("dynamo" if dynamo else "torchscript"):
        return dynamo
    if exporter != "auto":
        opsets = onnx_opsets(exporter)
        raise OptionError("opset", f"must be in {_span(opsets)} with the {exporter} exporter, got {opset}")
    ours, theirs = onnx_opsets("torchscript"), onnx_opsets("dynamo")
    if available:
        span = f"{min(ours.start, theirs.start)}..{max(ours.stop, theirs.stop) - 1}"
        raise OptionError("opset", f"must be in {span} (the opsets torch {torch.__version__.split('+')[0]} "
                          f"writes for this network), got {opset}")
    raise OptionError("opset", f"must be in {_span(ours)} (install onnxscript for torch's dynamo exporter, which "
                      f"writes {_span(theirs)}), got {opset}")


def _opset_of(proto: Any) -> int:
    """The default (``ai.onnx``) domain's opset of an ONNX model."""
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _is_onnx_file(path: Path) -> bool:
    """Whether ``path`` holds an ONNX model (a protobuf ``ModelProto`` with a graph)."""
    import onnx
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    try:
        with open(path, "rb") as handle:
            if handle.read(1) != b"\x08":  # onnx writes ir_version (field 1, a varint) first
                return False
            proto.ParseFromString(b"\x08" + handle.read())  # whatever the file's name (onnx.load guesses by it)
    except (OSError, DecodeError):
        return False
    return proto.ir_version > 0 and len(proto.graph.node) > 0


def _is_bioimageio_package(path: Path) -> bool:
    """Whether ``path`` is a zip holding a bioimage.io description (``rdf.yaml`` or ``bioimageio.yaml``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as package:
            return any(name in ("rdf.yaml", "bioimageio.yaml") for name in package.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


_KINDS = {  # output kind -> (what it is, example name, test)
    "onnx": ("an ONNX model", "nuclei.onnx", _is_onnx_file),
    "bioimageio": ("a bioimage.io model package", "nucleiseg.zip", _is_bioimageio_package),
}


def _check_output(path: str | Path, kind: str) -> Path:
    """The file to write, refused before any work when it is a folder, lies under a file, or holds
    something other than an earlier export of the same ``kind`` (which is replaced)."""
    path = Path(path)
    what, example, is_kind = _KINDS[kind]
    if path.is_dir():
        raise NucleisegError(f"is a folder; expected the file to write, e.g. {path / example}", path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NucleisegError(f"is a file, so {path} cannot be written under it", parent)
            break
    if path.exists() and not is_kind(path):
        raise NucleisegError(f"exists and is not {what}; export replaces only an earlier export of that kind: "
                             "choose a new name or remove the file", path)
    return path


@contextlib.contextmanager
def _quiet_loggers():
    """Silence the exporters' own chatter (onnxscript's optimizer at INFO, torch's "torchvision is not
    installed" warnings): the user asked for a file, not for its passes."""
    # (a failed version conversion is reported by export_onnx in one line, without onnxscript's traceback)
    names = {"torch.onnx": logging.ERROR, "onnxscript": logging.WARNING, "onnx_ir": logging.WARNING,
             "onnxscript.version_converter": logging.ERROR}
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
        ONNX opset; default: the exporter's. Written as asked or refused (:func:`onnx_opsets`).
    exporter : {"auto", "dynamo", "torchscript"}
        torch's exporter: auto takes dynamo where ``onnxscript`` is installed, except for the opsets
        below its lowest (18), which the TorchScript exporter writes.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    NucleisegError
        Missing optional packages (one line naming them), a bad model file or prune level, an opset
        the exporter does not write (:class:`OptionError` ``opset``, naming those it writes), or a
        ``path`` that is a folder or an existing file other than an ONNX model (refused before any work).
    """
    _require("onnx", "ONNX export")
    import onnx

    from . import __version__
    from .io import atomic_path

    path = _check_output(path, "onnx")
    dynamo = _use_dynamo(exporter, opset)
    network, metadata, source = _load(model)
    depth = network.depth
    level = _resolve_level(depth, metadata, mode, prune_level)
    multiple = 2**depth
    fused = fuse_batchnorm(network).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
    module = ProbabilityNetwork(fused, level).eval()
    log.info("exporting %s mode%s with the %s exporter", "accurate" if level is None else "fast",
             "" if level is None else f" (head {level})", "dynamo" if dynamo else "TorchScript")
    proto = _export_proto(module, multiple, opset, dynamo)
    if opset is not None and _opset_of(proto) != int(opset):  # never another opset than the one asked for
        raise NucleisegError(f"torch's {'dynamo' if dynamo else 'TorchScript'} exporter wrote ONNX opset "
                             f"{_opset_of(proto)}, not the {opset} asked for; nothing was written")

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


# ----------------------------------------------------------------------------- bioimage.io
#: Pixels each side of a bioimage.io output tile that a consumer tiling an image should crop
#: (the spec's ``halo``): the default network's output still changed by ~4e-4 at 80 px from a tile's
#: edge and not at all from 96 px (``nucleiseg.tiling.DEFAULT_OVERLAP``).
BIOIMAGEIO_HALO = 96

#: The bioimage.io package's test image: the fluorescence example (the napari sample).
BIOIMAGEIO_TEST_IMAGE = Path(__file__).resolve().parent / "napari" / "samples" / "fluorescence.png"

# Appended to models/unetplusplus.py to make the package's architecture file: a module of torch alone
# whose callable rebuilds ``image -> probabilities`` (ProbabilityNetwork) from keyword arguments.
_BIOIMAGEIO_ARCHITECTURE = '''

class NucleisegProbabilities(nn.Module):
    """bioimage.io entry point: normalised image -> body/contour/touch probabilities.

    Accurate mode (prune_level None): the mean of all heads' sigmoids; fast mode: head
    ``prune_level``'s sigmoid, computing only its sub-network. Height and width must be
    multiples of 2**depth.
    """

    def __init__(self, in_channels=3, out_channels=3, widths=(16, 32, 64, 128, 256), prune_level=None):
        super().__init__()
        self.network = UNetPlusPlus(in_channels, out_channels, tuple(widths))
        self.prune_level = prune_level

    def forward(self, image):
        heads = self.network(image, prune_level=self.prune_level)
        return heads_to_probabilities(heads, pruned=self.prune_level is not None)
'''

_BIOIMAGEIO_README = """# nucleiseg UNet++

A UNet++ trained on the DSB2018 nuclei (fluorescence, stained tissue, brightfield). Its output is three
probability maps (body, contour, touch); nucleiseg's post-processing
(`nucleiseg.postprocess.instances_from_probabilities`) turns them into one label per nucleus. The full
model card is docs/model-card.md in nucleiseg's source.
"""

_CITATIONS = (
    ("Zhou Z, Rahman Siddiquee MM, Tajbakhsh N, Liang J. UNet++: A Nested U-Net Architecture for Medical "
     "Image Segmentation. DLMIA 2018, LNCS 11045.", "10.1007/978-3-030-00889-5_1"),
    ("Caicedo JC, Goodman A, Karhohs KW, et al. Nucleus segmentation across imaging experiments: the 2018 "
     "Data Science Bowl. Nature Methods 16, 1247-1253 (2019).", "10.1038/s41592-019-0612-7"),
)


def _bioimageio_cover(rgb: Any, probabilities: Any, path: Path) -> None:
    """The cover: the test image beside its probabilities (body green, contour magenta)."""
    import numpy as np

    from .io import write_png

    body, contour = probabilities[0], probabilities[1]
    colour = np.zeros(rgb.shape, np.float32)
    colour[..., 1] = body
    colour[..., 0] = colour[..., 2] = contour
    right = (255 * np.clip(colour, 0, 1)).astype(np.uint8)
    write_png(path, np.concatenate([rgb, np.full((rgb.shape[0], 8, 3), 255, np.uint8), right], axis=1))


def export_bioimageio(
    model: Any,
    path: str | Path,
    mode: Literal["accurate", "fast"] = "accurate",
    prune_level: int | None = None,
    weight_formats: tuple[str, ...] = ("pytorch_state_dict", "torchscript", "onnx"),
    test_image: str | Path | None = None,
    test_size: int = 256,
    opset: int | None = None,
) -> Path:
    """Write a model as a bioimage.io model package (spec 0.5 zip), ``image -> probabilities``.

    The package holds: the RDF (name, description, authors, citations of UNet++ and DSB2018, licence,
    tags, the model card as documentation, a cover), the input ``image`` (batch, channel: RGB, y, x;
    sizes a multiple of ``2**depth``) with the pre-processing of :func:`nucleiseg.preprocess.normalize`
    as the spec writes it (``scale_range`` over channel, y and x between the 1st and 99.8th percentiles,
    then ``clip`` to [-0.5, 1.5]), the output ``probabilities`` (body, contour, touch; a halo of
    :data:`BIOIMAGEIO_HALO` px for tiling consumers), a test input (an 8-bit RGB image as float32) and
    its expected output, and the weights: ``pytorch_state_dict`` (architecture: the package's
    ``models/unetplusplus.py`` with a ``NucleisegProbabilities`` wrapper), and, derived from it,
    ``torchscript`` (traced) and ``onnx`` (:func:`export_onnx`).

    Where the spec's pre-processing differs from ``normalize``: images that are not 8-bit are first
    brought to 8 bits by :func:`~nucleiseg.preprocess.to_rgb_uint8` (0.1-99.9 percentile stretch),
    which the spec cannot say (give such a consumer the 8-bit RGB image); grey images must be given
    as three equal channels; ``normalize`` divides by ``max(p99.8 - p1, 0.01 * 255)`` where the spec
    divides by ``p99.8 - p1 + 1e-6``, so only nearly flat images differ; on images over a million
    pixels ``normalize`` takes the percentiles on a strided subsample.

    Parameters
    ----------
    model : str, Path, None, inference.Model or UNetPlusPlus
        As for :func:`export_onnx`.
    path : str or Path
        The ``.zip`` package to write (atomically).
    mode, prune_level
        As for :func:`export_onnx`.
    weight_formats : tuple of str
        Any of ``pytorch_state_dict`` (always included: the others derive from it), ``torchscript``, ``onnx``.
    test_image : str or Path, optional
        Image for the test tensors and the cover (default: the fluorescence example), cropped to
        ``test_size`` (rounded down to a multiple of ``2**depth``).
    opset : int, optional
        ONNX opset of the ``onnx`` weights (as for :func:`export_onnx`); only with ONNX weights.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    NucleisegError
        ``bioimageio.spec`` (or, for ONNX weights, ``onnx``) missing; a bad model file or prune level;
        an opset the exporter does not write, or one given without ONNX weights (:class:`OptionError`
        ``opset``); a ``path`` that is a folder or an existing file other than a bioimage.io package
        (refused before any work).
    """
    _require("bioimageio.spec", "bioimage.io export")
    import tempfile

    import numpy as np
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    from . import __version__
    from .io import atomic_path, read_image
    from .models import unetplusplus
    from .preprocess import normalize, to_rgb_uint8

    unknown = set(weight_formats) - {"pytorch_state_dict", "torchscript", "onnx"}
    if unknown:
        raise NucleisegError(f"unknown bioimage.io weight formats: {', '.join(sorted(unknown))}")
    path = _check_output(path, "bioimageio")
    if "onnx" in weight_formats:
        _require("onnx", "the bioimage.io package's ONNX weights")
        _use_dynamo("auto", opset)  # an opset no exporter writes: refused now, not after the other weights
    elif opset is not None:
        raise OptionError("opset", "sets the ONNX weights' opset; this package has no ONNX weights")
    network, metadata, source = _load(model)
    if is_fused(network):  # a loaded inference.Model: its BatchNorms are folded, the state dict must keep them
        if getattr(model, "path", None) is None:
            raise NucleisegError("bioimage.io export needs the model file, not a loaded model without one")
        network, metadata, source = _load(model.path)
    network = network.to("cpu", torch.float32).eval()
    depth = network.depth
    level = _resolve_level(depth, metadata, mode, prune_level)
    multiple = 2**depth
    channels = list(metadata.get("channels") or DEFAULT_CHANNELS[: network.config.out_channels])
    min_size = multiple * (2 * BIOIMAGEIO_HALO // multiple + 1)  # leaves output after cropping the halo
    side = max(min_size, int(test_size) // multiple * multiple)

    rgb = to_rgb_uint8(read_image(test_image or BIOIMAGEIO_TEST_IMAGE))
    if min(rgb.shape[:2]) < side:
        rgb = np.pad(rgb, ((0, max(0, side - rgb.shape[0])), (0, max(0, side - rgb.shape[1])), (0, 0)), mode="reflect")
    rgb = np.ascontiguousarray(rgb[:side, :side])
    module = ProbabilityNetwork(network, level).eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(normalize(rgb))[None]).numpy()

    input_id, output_id = bio.TensorId(ONNX_INPUT), bio.TensorId(ONNX_OUTPUT)
    config = network.config.to_dict()
    kwargs = {"in_channels": config["in_channels"], "out_channels": config["out_channels"],
              "widths": list(config["widths"]), "prune_level": level}
    with tempfile.TemporaryDirectory(prefix="nucleiseg-bioimageio-") as tmp:
        tmp = Path(tmp)
        test_input = tmp / "test_input.npy"
        np.save(test_input, rgb.transpose(2, 0, 1)[None].astype(np.float32))
        np.save(tmp / "test_output.npy", expected.astype(np.float32))
        import tifffile  # the sample tensors (for people and viewers): the same arrays as TIFF

        tifffile.imwrite(tmp / "sample_input.tif", rgb.transpose(2, 0, 1)[None].astype(np.float32))
        tifffile.imwrite(tmp / "sample_output.tif", expected.astype(np.float32))
        _bioimageio_cover(rgb, expected[0], tmp / "cover.png")
        architecture = tmp / "nucleiseg_unetplusplus.py"
        architecture.write_text(Path(unetplusplus.__file__).read_text() + _BIOIMAGEIO_ARCHITECTURE)
        torch.save(module.state_dict(), tmp / "weights.pt")
        documentation = tmp / "README.md"
        card = Path(__file__).resolve().parents[2] / "docs" / "model-card.md"  # in a source checkout
        documentation.write_text(card.read_text() if card.is_file() else _BIOIMAGEIO_README)
        pytorch_version = bio.Version(torch.__version__.split("+")[0])
        weights: dict[str, Any] = {"pytorch_state_dict": bio.PytorchStateDictWeightsDescr(
            source=tmp / "weights.pt",
            architecture=bio.ArchitectureFromFileDescr(source=architecture, callable=bio.Identifier(
                "NucleisegProbabilities"), kwargs=kwargs),
            pytorch_version=pytorch_version)}
        fused = ProbabilityNetwork(fuse_batchnorm(network), level).eval()
        if "torchscript" in weight_formats:
            example = torch.rand(1, 3, 2 * multiple, 3 * multiple)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(fused, example, check_trace=False)
            traced.save(str(tmp / "weights.torchscript"))
            weights["torchscript"] = bio.TorchscriptWeightsDescr(
                source=tmp / "weights.torchscript", pytorch_version=pytorch_version, parent="pytorch_state_dict")
        if "onnx" in weight_formats:
            import onnx

            onnx_path = export_onnx(model if not isinstance(model, UNetPlusPlus) else network, tmp / "weights.onnx",
                                    mode=mode, prune_level=prune_level, opset=opset)
            written = _opset_of(onnx.load_model(str(onnx_path), load_external_data=False))
            weights["onnx"] = bio.OnnxWeightsDescr(source=onnx_path, opset_version=written, parent="pytorch_state_dict")

        space = bio.ParameterizedSize(min=min_size, step=multiple)
        inputs = bio.InputTensorDescr(
            id=input_id,
            description="RGB image, 8-bit values as float32 (grey: the same plane three times)",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in ("r", "g", "b")]),
                  bio.SpaceInputAxis(id=bio.AxisId("y"), size=space), bio.SpaceInputAxis(id=bio.AxisId("x"), size=space)],
            test_tensor=bio.FileDescr(source=test_input),
            sample_tensor=bio.FileDescr(source=tmp / "sample_input.tif"),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[
                bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
                    axes=[bio.AxisId("channel"), bio.AxisId("y"), bio.AxisId("x")], min_percentile=1.0,
                    max_percentile=99.8)),
                bio.ClipDescr(kwargs=bio.ClipKwargs(min=-0.5, max=1.5)),
            ],
        )
        outputs = bio.OutputTensorDescr(
            id=output_id,
            description="probabilities: body (nucleus), contour (its inner edge), touch (where nuclei meet)",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in channels]),
                  *(bio.SpaceOutputAxisWithHalo(id=bio.AxisId(a), halo=BIOIMAGEIO_HALO,
                                                size=bio.SizeReference(tensor_id=input_id, axis_id=bio.AxisId(a)))
                    for a in ("y", "x"))],
            test_tensor=bio.FileDescr(source=tmp / "test_output.npy"),
            sample_tensor=bio.FileDescr(source=tmp / "sample_output.tif"),
            data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        )
        how = "accurate mode: the mean of all UNet++ heads" if level is None else f"fast mode: head {level} alone"
        descr = bio.ModelDescr(
            name="nucleiseg UNet++ nuclei" + ("" if level is None else " (fast)"),
            description=("Finds cell nuclei in fluorescence, stained-tissue and brightfield 2-D images: per-pixel "
                         f"probabilities of nucleus body, contour and touching borders ({how}); nucleiseg's watershed "
                         "turns them into one label per nucleus."),
            authors=[bio.Author(name="nucleiseg developers")],
            cite=[bio.CiteEntry(text=text, doi=bio.Doi(doi)) for text, doi in _CITATIONS],
            license=bio.LicenseId("BSD-3-Clause"),
            tags=["nuclei", "instance-segmentation", "semantic-segmentation", "unet++", "2d", "fluorescence-light-microscopy",
                  "brightfield", "histology", "pytorch", "nucleiseg", "dsb2018"],
            documentation=bio.FileDescr(source=documentation),
            covers=[bio.FileDescr(source=tmp / "cover.png")],
            inputs=[inputs],
            outputs=[outputs],
            weights=bio.WeightsDescr(**weights),
            version=bio.Version(__version__),
            # (bioimageio's default reproducibility tolerance, 1e-3, leaves room for a GPU's TF32 convolutions)
            config=bio.Config(**{"nucleiseg": {"source_model": source, "nucleiseg_version": __version__,
                                 "postprocess": metadata.get("postprocess"),
                                 "postprocess_by_kind": metadata.get("postprocess_by_kind"),
                                 "nucleus_diameter": metadata.get("nucleus_diameter"),
                                 "mode": "accurate" if level is None else "fast", "prune_level": level}}),
        )
        with atomic_path(path) as tmp_zip:  # a temporary name ending in .zip, as the packager wants
            save_bioimageio_package(descr, output_path=tmp_zip)
    return path
