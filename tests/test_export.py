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


# ----------------------------------------------------------------------------- opsets and output files
@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the export loads the model: what is refused must be refused before any work."""
    import nucleiseg.export

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(nucleiseg.export, "_load", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("nucleiseg export: error: ")
    return err[0]


def _opset(path: Path) -> int:
    import onnx

    return max(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("opset", [11, 17, 20])  # below dynamo's lowest (TorchScript), converted by dynamo
def test_opset_is_written_as_asked(model_file, image, tmp_path, capsys, opset):
    pytest.importorskip("onnxscript")
    out = tmp_path / f"m{opset}.onnx"
    assert main(["-q", "export", str(model_file), "--opset", str(opset), "-o", str(out)]) == 0
    assert f"opset {opset}" in capsys.readouterr().out
    assert _opset(out) == opset
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    net, _ = load_model_file(model_file)
    with torch.no_grad():
        expected = net.predict_proba(torch.from_numpy(image)).numpy()
    assert np.abs(session.run(None, {"image": image})[0] - expected).max() <= 1e-3


@pytest.mark.parametrize("opset", ["5", "8", "99"])
def test_unsupported_opset_is_refused_in_one_line_before_any_work(model_file, tmp_path, capsys, no_work, opset):
    from nucleiseg.export import onnx_opsets

    out = tmp_path / "x.onnx"
    assert main(["export", str(model_file), "--opset", opset, "-o", str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"--opset must be in 9..{onnx_opsets('dynamo').stop - 1}" in line and line.endswith(f"got {opset}")
    assert not out.exists()


def test_an_exporter_refuses_the_opsets_it_does_not_write(model_file, tmp_path, no_work):
    from nucleiseg.errors import OptionError
    from nucleiseg.export import export_onnx

    pytest.importorskip("onnxscript")
    with pytest.raises(OptionError, match="opset must be in 18..* with the dynamo exporter, got 17"):
        export_onnx(model_file, tmp_path / "d.onnx", opset=17, exporter="dynamo")
    with pytest.raises(OptionError, match="opset must be in 9..20 with the torchscript exporter, got 21"):
        export_onnx(model_file, tmp_path / "t.onnx", opset=21, exporter="torchscript")
    with pytest.raises(OptionError, match="opset must be a whole number, got 17.5"):
        export_onnx(model_file, tmp_path / "t.onnx", opset=17.5)


def test_a_graph_of_another_opset_than_asked_is_never_written(model_file, tmp_path, monkeypatch):
    """Where the exporter falls back to another opset than the one asked for (dynamo's version conversion
    failing), the export fails in one line and writes nothing."""
    import nucleiseg.export
    from nucleiseg.errors import NucleisegError

    pytest.importorskip("onnxscript")
    monkeypatch.setattr(nucleiseg.export, "onnx_opsets", lambda exporter: range(9, 100))  # as if torch allowed 99
    out = tmp_path / "x.onnx"
    with pytest.raises(NucleisegError, match="wrote ONNX opset 18, not the 99 asked for; nothing was written"):
        nucleiseg.export.export_onnx(model_file, out, opset=99, exporter="dynamo")
    assert not out.exists()


def test_output_folder_is_refused_in_one_line_before_any_work(model_file, tmp_path, capsys, no_work):
    folder = tmp_path / "runs"
    folder.mkdir()
    for fmt in ("onnx", "bioimageio"):
        assert main(["export", "--format", fmt, str(model_file), "-o", str(folder)]) == 2
        line = _one_error_line(capsys)
        assert str(folder) in line and "is a folder" in line
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", str(model_file), "-o", str(tmp_path / "notes.txt" / "m.onnx")]) == 2
    assert "notes.txt: is a file" in _one_error_line(capsys)


def test_only_an_earlier_export_of_the_same_kind_is_replaced(model_file, tmp_path, capsys, monkeypatch):
    notes = tmp_path / "a.txt"
    notes.write_text("my notes")
    with monkeypatch.context() as patch:
        import nucleiseg.export

        patch.setattr(nucleiseg.export, "_load", lambda *a: (_ for _ in ()).throw(AssertionError("work done")))
        for fmt, name in (("onnx", "an ONNX model"), ("bioimageio", "a bioimage.io model package")):
            assert main(["export", "--format", fmt, str(model_file), "-o", str(notes)]) == 2
            line = _one_error_line(capsys)
            assert str(notes) in line and f"exists and is not {name}" in line
        assert notes.read_text() == "my notes"
        empty = tmp_path / "empty.onnx"
        empty.write_bytes(b"")
        assert main(["export", str(model_file), "-o", str(empty)]) == 2
        assert "is not an ONNX model" in _one_error_line(capsys)
    # an earlier ONNX export is replaced; it is not a bioimage.io package
    out = tmp_path / "m.onnx"
    assert main(["-q", "export", str(model_file), "-o", str(out), "--prune-level", "1"]) == 0
    assert main(["-q", "export", str(model_file), "-o", str(out), "--mode", "accurate"]) == 0
    from nucleiseg.export import read_onnx_metadata

    assert read_onnx_metadata(out)["mode"] == "accurate"
    capsys.readouterr()
    assert main(["export", "--format", "bioimageio", str(model_file), "-o", str(out)]) == 2
    assert "is not a bioimage.io model package" in _one_error_line(capsys)


def test_bioimageio_package_takes_the_opset(model_file, tmp_path, capsys):
    """--opset reaches the package's ONNX weights (and their RDF entry); one it cannot write is refused first."""
    pytest.importorskip("bioimageio.spec")
    import zipfile

    import yaml

    import nucleiseg.export

    out = tmp_path / "package.zip"
    real = nucleiseg.export._load
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nucleiseg.export, "_load", lambda *a: (_ for _ in ()).throw(AssertionError("work done")))
        assert main(["export", "--format", "bioimageio", str(model_file), "--opset", "99", "-o", str(out)]) == 2
        assert "--opset must be in 9.." in _one_error_line(capsys)
        with pytest.raises(nucleiseg.export.OptionError, match="no ONNX weights"):
            nucleiseg.export.export_bioimageio(model_file, out, weight_formats=("pytorch_state_dict",), opset=17)
    assert nucleiseg.export._load is real and not out.exists()

    assert main(["-q", "export", "--format", "bioimageio", str(model_file), "--opset", "17", "-o", str(out)]) == 0
    assert "onnx (opset 17)" in capsys.readouterr().out
    with zipfile.ZipFile(out) as package:
        rdf = yaml.safe_load(package.read("rdf.yaml"))
        package.extract(rdf["weights"]["onnx"]["source"], tmp_path / "unzipped")
    assert rdf["weights"]["onnx"]["opset_version"] == 17
    assert _opset(tmp_path / "unzipped" / rdf["weights"]["onnx"]["source"]) == 17
    # an earlier package is replaced
    assert main(["-q", "export", "--format", "bioimageio", str(model_file), "-o", str(out)]) == 0
