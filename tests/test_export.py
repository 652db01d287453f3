"""``nucleiseg export``: the ONNX graph gives PyTorch's probabilities on a real image, in both modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nucleiseg.cli import main
from nucleiseg.io import read_image
from nucleiseg.models import UNetPlusPlus, load_model_file, save_model
from nucleiseg.models.unetplusplus import pad_to_multiple
from nucleiseg.preprocess import normalize, to_rgb_uint8

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

DSB_TRAIN = Path(__file__).resolve().parent / "fixtures" / "dsb" / "stage1_train"
POSTPROCESS = {"foreground_threshold": 0.4, "seed_threshold": 0.6, "min_seed_size": 7, "min_size": 11}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model (depth 3) with non-trivial BatchNorm statistics, saved with metadata."""
    torch.manual_seed(0)
    net = UNetPlusPlus(widths=(4, 8, 16, 32))
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.rand(2, 3, 32, 32) * 1.5 - 0.2)
    path = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    save_model(path, net.eval(), {"postprocess": POSTPROCESS, "fast_prune_level": 2})
    return path


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A real DSB image, normalised and padded to a multiple of 8 (here 2**depth), as a batch of one."""
    files = sorted(DSB_TRAIN.glob("*/images/*.png"))
    assert files, "the DSB fixture is missing"
    rgb = to_rgb_uint8(read_image(files[0]))[:90, :75]  # sides that need padding
    x = torch.from_numpy(normalize(rgb))[None]
    return pad_to_multiple(x, 8).numpy()


@pytest.mark.parametrize("mode", ["accurate", "fast"])
def test_onnx_runtime_matches_pytorch(model_file, image, tmp_path, mode):
    out = tmp_path / f"{mode}.onnx"
    assert main(["export", "--format", "onnx", str(model_file), "-o", str(out), "--mode", mode]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]

    net, _ = load_model_file(model_file)
    level = None if mode == "accurate" else 2
    with torch.no_grad():
        expected = net.predict_proba(torch.from_numpy(image), prune_level=level).numpy()
    got = session.run(None, {"image": image})[0]
    assert got.shape == expected.shape == (1, 3) + image.shape[2:]
    assert np.abs(got - expected).max() <= 1e-3

    # Dynamic batch and sides: two images of another size in one run.
    batch = np.concatenate([image[..., :64, :48], image[..., 8:72, 16:64]])
    with torch.no_grad():
        expected = net.predict_proba(torch.from_numpy(batch), prune_level=level).numpy()
    assert np.abs(session.run(None, {"image": batch})[0] - expected).max() <= 1e-3


def test_metadata_is_stored_in_the_onnx_file(model_file, tmp_path):
    from nucleiseg.export import export_onnx, read_onnx_metadata

    out = export_onnx(model_file, tmp_path / "m.onnx", prune_level=1)
    meta = read_onnx_metadata(out)
    assert meta["channels"] == ["body", "contour", "touch"]
    assert meta["postprocess"] == POSTPROCESS
    assert meta["config"]["widths"] == [4, 8, 16, 32]
    assert meta["mode"] == "fast" and meta["prune_level"] == 1
    assert meta["input_multiple"] == 8
    assert meta["source_model"] == "tiny.safetensors"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape[1] == 3 and all(isinstance(d, str) for d in (shape[0], shape[2], shape[3]))


def test_bad_prune_level_is_a_one_line_error(model_file, tmp_path, capsys):
    assert main(["export", str(model_file), "-o", str(tmp_path / "x.onnx"), "--prune-level", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "prune-level" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnx_is_a_one_line_error_naming_the_package(model_file, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", str(model_file), "-o", str(tmp_path / "y.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'onnx'" in err and "pip install" in err


def test_torchscript_exporter_gives_the_same_graph_output(model_file, image, tmp_path):
    """The fallback exporter (used where onnxscript is not installed) is correct too."""
    from nucleiseg.export import export_onnx

    out = export_onnx(model_file, tmp_path / "ts.onnx", exporter="torchscript")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    net, _ = load_model_file(model_file)
    with torch.no_grad():
        expected = net.predict_proba(torch.from_numpy(image)).numpy()
    assert np.abs(session.run(None, {"image": image})[0] - expected).max() <= 1e-3
    assert [d for d in session.get_inputs()[0].shape] == ["N", 3, "H", "W"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_exported_graph_has_one_convolution_per_layer(model_file, tmp_path, exporter):
    """The graph keeps UNet++'s concatenations (one Conv per layer), not the CPU's sum of per-input convolutions."""
    import onnx

    from nucleiseg.export import export_onnx

    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    out = export_onnx(model_file, tmp_path / f"{exporter}.onnx", exporter=exporter)
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    net, _ = load_model_file(model_file)
    n_conv_layers = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert ops.count("Conv") == n_conv_layers
    assert ops.count("Concat") >= sum(range(1, net.depth + 1))  # one per dense node X(i, j), j >= 1


@pytest.mark.slow
def test_bioimageio_package_passes_bioimageio_test_and_reproduces_predict(model_file, tmp_path):
    """`nucleiseg export --format bioimageio`: bioimageio.core's own test passes (all three weight formats,
    the test tensors, several input sizes and batch sizes), and the package's expected output is what
    nucleiseg itself predicts on its test input."""
    pytest.importorskip("bioimageio.core")
    import zipfile

    import yaml
    from bioimageio.core import test_model

    from nucleiseg.export import BIOIMAGEIO_HALO
    from nucleiseg.inference import load_model, predict_probabilities

    out = tmp_path / "nucleiseg.zip"
    assert main(["export", "--format", "bioimageio", str(model_file), "-o", str(out)]) == 0
    summary = test_model(str(out))
    assert summary.status == "passed", summary.format()
    assert {"onnx", "pytorch_state_dict", "torchscript"} <= {
        fmt for d in summary.details for fmt in ("onnx", "pytorch_state_dict", "torchscript") if fmt in d.name}

    with zipfile.ZipFile(out) as package:
        rdf = yaml.safe_load(package.read("rdf.yaml"))
        test_input = np.load(package.open(rdf["inputs"][0]["test_tensor"]["source"]))
        test_output = np.load(package.open(rdf["outputs"][0]["test_tensor"]["source"]))
    assert rdf["format_version"].startswith("0.5")
    assert {c["doi"] for c in rdf["cite"]} == {"10.1007/978-3-030-00889-5_1", "10.1038/s41592-019-0612-7"}
    assert [p["id"] for p in rdf["inputs"][0]["preprocessing"] if p["id"] != "ensure_dtype"] == ["scale_range", "clip"]
    assert rdf["inputs"][0]["axes"][2]["size"]["step"] == 8  # 2**depth of the depth-3 test model
    assert [a.get("halo") for a in rdf["outputs"][0]["axes"][2:]] == [BIOIMAGEIO_HALO] * 2
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["body", "contour", "touch"]
    rgb = test_input[0].transpose(1, 2, 0).astype(np.uint8)
    expected = predict_probabilities(load_model(model_file), rgb, tile=0, precision="fp32")
    np.testing.assert_allclose(test_output[0], expected, atol=1e-4)
