"""The plugin's manifest, sample data, reader and writers, through napari and npe2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
npe2 = pytest.importorskip("npe2")

from nucleiseg.napari import _io  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "src" / "nucleiseg" / "napari" / "napari.yaml"


def test_manifest_validates_with_its_imports():
    npe2_cli = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2_cli), "validate", "--imports", str(MANIFEST)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_plugin_modules_import_without_torch():
    code = ("import sys, nucleiseg.napari._widget, nucleiseg.napari._io, nucleiseg.napari._finetune; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO / "src")}).returncode == 0


def test_samples_are_the_example_images(make_napari_viewer):
    for name in ("fluorescence", "tissue", "brightfield"):
        assert (_io.SAMPLES / f"{name}.png").read_bytes() == (REPO / "examples" / "images" / f"{name}.png").read_bytes()
    viewer = make_napari_viewer()
    for name in ("fluorescence", "tissue", "brightfield"):
        viewer.open_sample("nucleiseg", name)
    assert [layer.name for layer in viewer.layers] == ["fluorescence", "tissue", "brightfield"]
    assert all(layer.rgb for layer in viewer.layers)


def test_reader_opens_predict_outputs_with_their_table(make_napari_viewer, tmp_path):
    from nucleiseg.io import write_labels_tiff
    from nucleiseg.measure import measure_nuclei

    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:15], labels[20:30, 30:45] = 1, 2
    write_labels_tiff(tmp_path / "cells_labels.tif", labels)
    measure_nuclei(labels, np.full(labels.shape, 9, np.uint8)).to_csv(tmp_path / "cells_nuclei.csv", index=False)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "cells_labels.tif"), plugin="nucleiseg")
    layer = viewer.layers["cells nuclei"]
    assert isinstance(layer, napari.layers.Labels)
    np.testing.assert_array_equal(layer.data, labels)
    assert layer.features["index"].tolist() == [1, 2]
    assert layer.features["area"].tolist() == [100, 150]
    assert _io.get_reader(str(tmp_path / "cells.png")) is None


def test_writers_save_a_labels_layer_for_fiji_and_qupath(make_napari_viewer, tmp_path):
    import roifile

    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:15], labels[20:30, 30:45] = 3, 7
    viewer = make_napari_viewer()
    layer = viewer.add_labels(labels, name="nuclei")
    napari.save_layers(str(tmp_path / "nuclei.zip"), [layer], plugin="nucleiseg")
    napari.save_layers(str(tmp_path / "nuclei.geojson"), [layer], plugin="nucleiseg")
    rois = roifile.roiread(tmp_path / "nuclei.zip")
    assert sorted(roi.name for roi in rois) == ["3", "7"]
    features = json.loads((tmp_path / "nuclei.geojson").read_text())["features"]
    assert sorted(f["properties"]["label"] for f in features) == [3, 7]


@pytest.mark.parametrize("table", [b"", b"label,area\n1,2,3,4\n\"unterminated\n", b"\xff\xfe\x00binary"])
def test_reader_opens_the_labels_when_their_table_is_damaged(tmp_path, caplog, table):
    from nucleiseg.io import write_labels_tiff

    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 5:15] = 1
    write_labels_tiff(tmp_path / "cells_labels.tif", labels)
    (tmp_path / "cells_nuclei.csv").write_bytes(table)
    [(data, kwargs, kind)] = _io.get_reader(str(tmp_path / "cells_labels.tif"))(str(tmp_path / "cells_labels.tif"))
    np.testing.assert_array_equal(data, labels)
    assert kind == "labels" and "features" not in kwargs
    assert "cells_nuclei.csv: not read" in caplog.text


def test_fine_tune_refuses_a_layer_painted_with_one_value(tmp_path):
    from nucleiseg.errors import NucleisegError
    from nucleiseg.napari._finetune import fine_tune

    image = np.zeros((64, 64), np.uint8)
    labels = np.zeros((64, 64), np.uint8)
    labels[5:15, 5:15] = labels[30:40, 30:40] = 1  # two nuclei, one value: a mask, not instances
    with pytest.raises(NucleisegError, match="labels 'cells': a binary mask .*give each nucleus its own label") as info:
        fine_tune([("cells", image, labels)], None, tmp_path / "m.safetensors", steps=1)
    assert "nucleiseg-finetune" not in str(info.value) and not (tmp_path / "m.safetensors").exists()
