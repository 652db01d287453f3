"""Model file metadata is validated against the tensors, from the header, before anything is built."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from nucleiseg.device import resolve_device, resolve_precision
from nucleiseg.errors import NucleisegError
from nucleiseg.inference import load_model
from nucleiseg.models import ModelMetadata, UNetPlusPlus, load_model_file, save_model
from nucleiseg.tuning import update_model_metadata


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A depth-2 model file, as training writes it."""
    path = tmp_path_factory.mktemp("meta") / "tiny.safetensors"
    torch.manual_seed(0)
    save_model(path, UNetPlusPlus(widths=(4, 8, 16)).eval(),
               {"postprocess": {"min_size": 5, "seed_threshold": 0.4}, "fast_prune_level": 1,
                "nucleus_diameter": 12.5})
    return path


def _crafted(tiny, tmp_path, **changes):
    """``tiny``'s tensors with its metadata changed (a key set to None is removed)."""
    from safetensors import safe_open

    with safe_open(str(tiny), framework="pt") as f:
        raw = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value if isinstance(value, str) and key.startswith("raw_") else json.dumps(value)
    raw = {k.removeprefix("raw_"): v for k, v in raw.items()}
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path), metadata=raw)
    return path


def test_a_valid_file_loads_with_typed_metadata(tiny):
    network, meta = load_model_file(tiny)
    assert isinstance(meta, ModelMetadata)
    assert meta.channels == ("body", "contour", "touch") and meta.depth == 2
    assert meta.fast_prune_level == 1 and meta.nucleus_diameter == 12.5
    assert meta["postprocess"] == {"min_size": 5, "seed_threshold": 0.4}  # still a mapping
    assert dict(meta)["config"]["widths"] == [4, 8, 16]
    model = load_model(tiny)
    assert model.postprocess.min_size == 5 and model.fast_prune_level == 1 and model.nucleus_diameter == 12.5


def test_the_shipped_model_is_valid():
    meta = ModelMetadata.read(load_model(None).path)
    assert meta.depth == 4 and set(meta.postprocess_by_kind) == {"tissue"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # a crafted width: refused from the header, before a network of that size is built
        ({"config": {"architecture": "unetplusplus", "in_channels": 3, "out_channels": 3,
                     "widths": [4, 8, 40000]}}, "config.widths[2] = 40000 but tensor nodes.x2_0.0.weight is of shape"),
        ({"config": {"architecture": "unetplusplus", "in_channels": 3, "out_channels": 3,
                     "widths": [4096] * 40}}, "config.widths' must be 2..9 integers"),
        ({"config": {"architecture": "unetplusplus", "in_channels": 3, "out_channels": 3, "widths": [4, 8]}},
         "unexpected"),
        ({"config": {"architecture": "unetplusplus", "in_channels": 3, "out_channels": 2, "widths": [4, 8, 16]}},
         "heads.0.weight"),
        ({"config": {"architecture": "unetplusplus", "widths": [4, 8, 16], "dropout": 0.5}}, "unknown keys ['dropout']"),
        ({"config": {"architecture": "resnet", "widths": [4, 8, 16]}}, "unknown architecture 'resnet'"),
        ({"config": "widths=4,8,16"}, "'config' must be an object"),
        ({"config": None}, "has no 'config' metadata"),
        ({"raw_config": "{not json"}, "metadata 'config' is not JSON"),
        ({"postprocess": {"seed_threshold": "0.5"}}, "'postprocess.seed_threshold' must be a number in [0, 1], got '0.5'"),
        ({"postprocess": {"foreground_threshold": 1.5}}, "'postprocess.foreground_threshold' must be a number in [0, 1]"),
        ({"postprocess": {"min_size": -3}}, "'postprocess.min_size' must be a whole number of pixels >= 0"),
        ({"postprocess": {"min_size": 2.5}}, "'postprocess.min_size' must be a whole number"),
        ({"postprocess": {"min_size": True}}, "'postprocess.min_size' must be a whole number"),
        ({"postprocess": {"seed_treshold": 0.5}}, "unknown keys ['seed_treshold']"),
        ({"postprocess": [0.5, 0.5]}, "'postprocess' must be an object"),
        ({"postprocess_by_kind": {"phase-contrast": {}}}, "unknown kind 'phase-contrast'"),
        ({"postprocess_by_kind": {"tissue": {"seed_threshold": None}}}, "'postprocess_by_kind.tissue.seed_threshold'"),
        ({"fast_prune_level": 3}, "'fast_prune_level' must be an integer in 1..2"),
        ({"fast_prune_level": 0}, "'fast_prune_level' must be an integer in 1..2"),
        ({"fast_prune_level": "2"}, "'fast_prune_level' must be an integer"),
        ({"nucleus_diameter": -4}, "'nucleus_diameter' must be a positive number"),
        ({"raw_nucleus_diameter": "Infinity"}, "'nucleus_diameter' must be a positive number"),
        ({"raw_nucleus_diameter": "NaN"}, "'nucleus_diameter' must be a positive number"),
        ({"channels": ["body", "contour"]}, "names 2 channels, the network has 3"),
        ({"channels": ["body", "body", "touch"]}, "'channels' must be a list of distinct names"),
        ({"channels": [1, 2, 3]}, "'channels' must be a list of distinct names"),
        ({"preprocess": "percentile"}, "'preprocess' must be an object"),
    ],
)
def test_bad_metadata_is_one_line_naming_the_file(tiny, tmp_path, changes, expected):
    path = _crafted(tiny, tmp_path, **changes)
    started = time.perf_counter()
    for load in (load_model_file, load_model, ModelMetadata.read):
        with pytest.raises(NucleisegError) as info:
            load(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
    assert time.perf_counter() - started < 5  # nothing of the crafted size was built


def test_tensors_of_the_wrong_type_are_refused(tiny, tmp_path):
    from safetensors import safe_open

    with safe_open(str(tiny), framework="pt") as f:
        raw = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["heads.0.weight"] = tensors["heads.0.weight"].to(torch.int8)
    save_file(tensors, str(tmp_path / "int8.safetensors"), metadata=raw)
    with pytest.raises(NucleisegError, match="heads.0.weight has type I8"):
        load_model_file(tmp_path / "int8.safetensors")


def test_updates_are_validated_and_a_refused_update_leaves_the_file(tiny, tmp_path):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(tiny.read_bytes())
    with pytest.raises(NucleisegError, match="'fast_prune_level' must be an integer in 1..2"):
        update_model_metadata(copy, {"fast_prune_level": 7})
    with pytest.raises(NucleisegError, match="must be a number in"):
        update_model_metadata(copy, {"postprocess": {"seed_threshold": "high"}})
    assert copy.read_bytes() == tiny.read_bytes()
    update_model_metadata(copy, {"fast_prune_level": 2})
    assert ModelMetadata.read(copy).fast_prune_level == 2
    assert list(tmp_path.iterdir()) == [copy]  # no temporary left behind


def test_save_model_refuses_metadata_that_would_not_load(tmp_path):
    with pytest.raises(NucleisegError, match="fast_prune_level"):
        save_model(tmp_path / "m.safetensors", UNetPlusPlus(widths=(4, 8)), {"fast_prune_level": 2})
    assert not any(tmp_path.iterdir())


def test_truncated_file_is_one_line(tiny, tmp_path):
    data = tiny.read_bytes()
    for size in (0, 7, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{size}.safetensors"
        path.write_bytes(data[:size])
        with pytest.raises(NucleisegError) as info:
            load_model_file(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_resolve_device_names_the_problem_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for name in ("tpu", "cuda:x", "cpu:1", "", "gpu"):
        with pytest.raises(NucleisegError, match="unknown device"):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(NucleisegError, match="CPU-only build|no CUDA GPU is visible") as info:
            resolve_device("cuda")
        assert "device 'cpu' or 'auto'" in str(info.value)
        with pytest.raises(NucleisegError):
            load_model(None, "cuda:1")
    with pytest.raises(NucleisegError, match="unknown device 'tpu'"):
        load_model(None, "tpu")


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(NucleisegError, match="precision must be"):
        resolve_precision("fp8", cpu)
