"""The *Segment nuclei* widget in a real (virtual-display) napari viewer: same nuclei as nucleiseg.segment,
features, replacing, cancelling, one-line notices for bad input, and fine-tuning from an edited layer."""

from __future__ import annotations


import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari.utils.notifications import notification_manager  # noqa: E402

import nucleiseg  # noqa: E402
from nucleiseg.napari._widget import SegmentWidget  # noqa: E402

TIMEOUT_MS = 120_000


def _dock(viewer) -> SegmentWidget:
    """The widget as napari's Plugins menu docks it (through the npe2 manifest)."""
    _, widget = viewer.window.add_plugin_dock_widget("nucleiseg", "Segment nuclei")
    assert isinstance(widget, SegmentWidget)
    return widget


def _run(qtbot, widget: SegmentWidget, action) -> None:
    action()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def _messages(start: int) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:]]


def test_widget_gives_what_segment_gives_and_replaces_its_layers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("nucleiseg", "fluorescence")
    image = viewer.layers["fluorescence"].data
    widget = _dock(viewer)
    widget.mode_combo.setCurrentText("fast")
    _run(qtbot, widget, widget.segment)

    expected = nucleiseg.segment(image, mode="fast")
    layer = viewer.layers["fluorescence nuclei"]
    assert isinstance(layer, napari.layers.Labels)
    np.testing.assert_array_equal(layer.data, expected.labels)
    assert expected.n_nuclei > 20
    features = layer.features
    assert len(features) == expected.n_nuclei == int(layer.data.max())
    assert features["index"].tolist() == expected.table["label"].astype(int).tolist()
    np.testing.assert_allclose(features["area"], expected.table["area"])
    assert [type(x).__name__ for x in viewer.layers] == ["Image", "Labels"]

    # again, one channel of the RGBA sample, with probabilities: the same layer, now with channel 1's nuclei
    widget.channel_combo.setCurrentText("1")
    widget.probabilities_check.setChecked(True)
    _run(qtbot, widget, widget.segment)
    expected = nucleiseg.segment(image[..., 0], mode="fast")
    assert [x.name for x in viewer.layers].count("fluorescence nuclei") == 1
    np.testing.assert_array_equal(viewer.layers["fluorescence nuclei"].data, expected.labels)
    np.testing.assert_array_equal(viewer.layers["fluorescence body"].data, expected.probabilities[0])
    assert {"fluorescence contour", "fluorescence touch"} <= {x.name for x in viewer.layers}
    assert len(viewer.layers) == 5

    # a two-channel layer (napari's channel-first stack), its second channel chosen: the same nuclei again
    viewer.add_image(np.stack([np.zeros_like(image[..., 0]), image[..., 0]]), name="two channels")
    widget.image_combo.setCurrentText("two channels")
    assert [widget.channel_combo.itemText(i) for i in range(widget.channel_combo.count())] == ["1", "2"]
    widget.channel_combo.setCurrentText("2")
    widget.probabilities_check.setChecked(False)
    _run(qtbot, widget, widget.segment)
    np.testing.assert_array_equal(viewer.layers["two channels nuclei"].data, expected.labels)


def test_cancel_stops_the_network_and_changes_no_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    viewer.add_image(rng.integers(0, 255, (2048, 2048), dtype=np.uint8), name="large")
    widget = _dock(viewer)
    widget.mode_combo.setCurrentText("fast")
    widget.tile_spin.setValue(384)  # 100 tiles of 384 px, predicted a batch of 7 at a time
    passes: list[tuple[int, int]] = []
    widget._relay.tiles.connect(lambda done, total: passes.append((done, total)))
    start = len(notification_manager.records)
    widget.segment()
    qtbot.waitUntil(lambda: len(passes) >= 1, timeout=TIMEOUT_MS)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert [x.name for x in viewer.layers] == ["large"]
    assert passes[-1][0] < passes[-1][1] and len(passes) <= 3, f"the network kept running after Cancel: {passes}"
    assert any("cancelled" in m for m in _messages(start))
    assert widget.segment_button.isEnabled()


def test_bad_input_gets_one_line_notices(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    start = len(notification_manager.records)
    widget.segment()  # no image layer
    assert not widget.running
    viewer.add_image(np.zeros((30, 64, 64), np.uint8), name="stack")
    widget.segment()  # a 3-D stack
    assert not widget.running
    viewer.add_image(np.zeros((64, 64), np.uint8), name="flat")
    widget.image_combo.setCurrentText("flat")
    widget.diameter_combo.setCurrentText("large")
    widget.segment()  # not a diameter
    assert not widget.running
    widget.diameter_combo.setCurrentText("as trained")
    not_a_model = tmp_path / "photo.safetensors"
    not_a_model.write_bytes(b"\x89PNG not a model")
    widget.model_combo.setCurrentText("model file")
    widget.model_path.setText(str(not_a_model))
    _run(qtbot, widget, widget.segment)
    messages = _messages(start)
    assert len(messages) == 4 and all("\n" not in m for m in messages), messages
    assert "no image layer" in messages[0]
    assert "not 3-D or time stacks" in messages[1]
    assert "diameter must be a number of pixels" in messages[2]
    assert "not a nucleiseg model file" in messages[3] and "photo.safetensors" in messages[3]
    assert [x.name for x in viewer.layers] == ["stack", "flat"]


def test_fine_tune_from_an_edited_layer_gives_a_model_predict_accepts(make_napari_viewer, qtbot, tmp_path):
    from safetensors.torch import load_file

    from nucleiseg.cli import main
    from nucleiseg.models import resolve_model_path

    viewer = make_napari_viewer()
    viewer.open_sample("nucleiseg", "fluorescence")
    crop = viewer.layers["fluorescence"].data[:96, :96]
    viewer.add_image(crop, name="crop", rgb=True)
    widget = _dock(viewer)
    widget.image_combo.setCurrentText("crop")
    widget.mode_combo.setCurrentText("fast")
    _run(qtbot, widget, widget.segment)
    labels = viewer.layers["crop nuclei"]
    # the user's corrections: erase a nucleus, paint a new one
    edited = labels.data.copy()
    edited[edited == 1] = 0
    edited[5:14, 80:90] = edited.max() + 1
    labels.data = edited

    widget.labels_list.item(0).setCheckState(2)  # Qt.Checked
    widget.steps_spin.setValue(2)
    widget.finetune_batch_size, widget.finetune_crop = 2, 64
    out = tmp_path / "tuned.safetensors"
    widget.save_path.setText(str(out))
    losses: list[tuple[int, int, float]] = []
    widget._relay.loss.connect(lambda *a: losses.append(a))
    _run(qtbot, widget, widget.fine_tune)

    assert out.is_file(), widget.status.text()
    assert [step for step, _, _ in losses] == [1, 2] and all(np.isfinite(loss) for *_, loss in losses)
    before, after = load_file(resolve_model_path(None)), load_file(out)
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k].numpy(), after[k].numpy()) for k in before), "no weight changed"
    # the corrections are kept, renamed; the new model's nuclei are the result layer
    np.testing.assert_array_equal(viewer.layers["crop corrected"].data, edited)
    assert viewer.layers["crop nuclei"].metadata["nucleiseg"]["model"] == str(out)
    assert widget.model_path.text() == str(out)
    # the file is a model that `nucleiseg predict --model` takes
    images = tmp_path / "images"
    images.mkdir()
    import imageio.v3 as iio

    iio.imwrite(images / "crop.png", crop)
    assert main(["predict", str(images), "--model", str(out), "-o", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "crop_labels.tif").is_file()


def test_cancelled_fine_tune_saves_nothing_and_keeps_the_layers(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    viewer.add_image(rng.integers(0, 255, (64, 64), dtype=np.uint8), name="cells")
    labels = np.zeros((64, 64), np.int32)
    labels[10:20, 10:20], labels[30:42, 35:45] = 1, 2
    viewer.add_labels(labels, name="cells nuclei")  # drawn by hand: paired with its image by name
    widget = _dock(viewer)
    widget.labels_list.item(0).setCheckState(2)
    widget.steps_spin.setValue(1000)
    widget.finetune_batch_size, widget.finetune_crop = 2, 32
    out = tmp_path / "never.safetensors"
    widget.save_path.setText(str(out))
    losses: list = []
    widget._relay.loss.connect(lambda *a: losses.append(a))
    start = len(notification_manager.records)
    widget.fine_tune()
    qtbot.waitUntil(lambda: len(losses) >= 1, timeout=TIMEOUT_MS)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert len(losses) < 10 and not out.exists()
    assert any("Fine-tuning cancelled" in m for m in _messages(start))
    assert [x.name for x in viewer.layers] == ["cells", "cells nuclei"]
    np.testing.assert_array_equal(viewer.layers["cells nuclei"].data, labels)
