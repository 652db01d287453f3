"""The *Segment nuclei* dock widget: segment in a thread worker; correct, then fine-tune.

*Segment* runs :func:`nucleiseg.segment` on the chosen layer (the channel choice of
:mod:`._inputs`) with the chosen model and :class:`~nucleiseg.options.PredictOptions` in a napari
thread worker, so the viewer stays responsive; its progress bar counts the tiles predicted. Its result is the Labels layer ``"<image> nuclei"`` whose ``features`` are the
per-nucleus table (:func:`nucleiseg.measure.measure_nuclei`, an ``index`` column added for
napari), and optionally ``"<image> body|contour|touch"`` probability Image layers; running again
on the same image replaces them. *Cancel* stops the network after its current batch of tiles (the
progress callback raises) or the fine-tuning after its current step.

*Fine-tune* takes the ticked Labels layers (a result corrected with napari's paint, erase and fill
tools, or any Labels layer named ``"<image> ..."`` after its image), trains the current model on
them (:func:`._finetune.fine_tune`) showing the loss, saves the model file, renames the corrected
layers ``"<image> corrected"`` (so they are kept) and segments their images again with the new model.

A user mistake (no image layer, a 3-D stack, a model file that is not one, a cancelled run) gets a
one-line napari notification; no layer is removed or changed by a failed run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import NucleisegError
from ..options import PredictOptions
from ..tiling import DEFAULT_OVERLAP, DEFAULT_TILE
from ._finetune import DEFAULT_LR, DEFAULT_STEPS
from ._inputs import channel_names, layer_array, parse_diameter
from ._io import labels_features

__all__ = ["Cancelled", "SegmentWidget"]

log = logging.getLogger("nucleiseg.napari")

SHIPPED = "shipped model"
MODEL_FILE = "model file"
DIAMETER_CHOICES = ("as trained", "measure")
#: layer.metadata key of the layers the widget makes
META = "nucleiseg"


class Cancelled(Exception):
    """Raised in the worker thread when the user pressed Cancel."""


class _Relay(QObject):
    """Signals from the worker thread to the widget (queued onto the GUI thread)."""

    tiles = Signal(int, int)
    loss = Signal(int, int, float)


def _image_of(layer) -> Any:
    data = layer.data
    return data[0] if getattr(layer, "multiscale", False) else data


class SegmentWidget(QWidget):
    """Dock widget: segment the chosen image layer, correct, fine-tune (see the module docstring)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._abort = threading.Event()
        self._worker = None
        self._models: dict[tuple[str, float], Any] = {}
        self._relay = _Relay()
        self._relay.tiles.connect(self._show_tiles)
        self._relay.loss.connect(self._show_loss)
        #: crops per fine-tuning step and their side (TrainConfig's; tests make them small)
        self.finetune_batch_size = 8
        self.finetune_crop = 256
        self.last_result = None  # the Segmentation of the last run (tests, scripting)

        form = QFormLayout()
        self.image_combo = QComboBox()
        self.channel_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.addItems([SHIPPED, MODEL_FILE])
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("a .safetensors model file or training run folder")
        browse = QPushButton("…")
        browse.setToolTip("choose a model file")
        browse.clicked.connect(self._browse_model)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_path)
        model_row.addWidget(browse)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["accurate", "fast"])
        self.tta_check = QCheckBox("test-time augmentation (8x slower)")
        self.diameter_combo = QComboBox()
        self.diameter_combo.setEditable(True)
        self.diameter_combo.addItems(DIAMETER_CHOICES)
        self.diameter_combo.setToolTip("typical nucleus diameter in pixels: the image is resized to the model's "
                                       "training size; 'measure' estimates it from a first pass")
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(2 * DEFAULT_OVERLAP, 16384)  # a tile is at least twice the overlap
        self.tile_spin.setSingleStep(64)
        self.tile_spin.setValue(DEFAULT_TILE)
        self.tile_spin.setToolTip("images larger than this (pixels) are predicted in overlapping tiles")
        self.probabilities_check = QCheckBox("add probability maps")
        form.addRow("Image", self.image_combo)
        form.addRow("Channel", self.channel_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("", model_row)
        form.addRow("Mode", self.mode_combo)
        form.addRow("", self.tta_check)
        form.addRow("Diameter (px)", self.diameter_combo)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("", self.probabilities_check)

        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        tune = QGroupBox("Correct and fine-tune")
        tune_form = QFormLayout(tune)
        self.labels_list = QListWidget()
        self.labels_list.setToolTip("the corrected Labels layers to train on (each named after its image)")
        self.labels_list.setMaximumHeight(90)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100000)
        self.steps_spin.setValue(DEFAULT_STEPS)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1e-1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(DEFAULT_LR)
        self.save_path = QLineEdit(str(Path.home() / "nucleiseg-finetuned.safetensors"))
        save_browse = QPushButton("…")
        save_browse.clicked.connect(self._browse_save)
        save_row = QHBoxLayout()
        save_row.addWidget(self.save_path)
        save_row.addWidget(save_browse)
        self.finetune_button = QPushButton("Fine-tune")
        self.finetune_button.clicked.connect(self.fine_tune)
        tune_form.addRow("Labels", self.labels_list)
        tune_form.addRow("Steps", self.steps_spin)
        tune_form.addRow("Learning rate", self.lr_spin)
        tune_form.addRow("Save as", save_row)
        tune_form.addRow(self.finetune_button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(tune)
        layout.addStretch(1)

        self.image_combo.currentTextChanged.connect(self._refresh_channels)
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.moved, events.changed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ layers
    def _layers(self, kind: str) -> list:
        import napari.layers

        cls = {"image": napari.layers.Image, "labels": napari.layers.Labels}[kind]
        return [layer for layer in self.viewer.layers if isinstance(layer, cls)]

    def _refresh_layers(self, event=None) -> None:
        for layer in self.viewer.layers:  # follow renames (napari connects a callback once)
            layer.events.name.connect(self._refresh_layers)
        current = self.image_combo.currentText()
        names = [layer.name for layer in self._layers("image")]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        elif names:
            selected = [layer.name for layer in self.viewer.layers.selection if layer.name in names]
            self.image_combo.setCurrentText(selected[0] if selected else names[-1])
        self.image_combo.blockSignals(False)
        self._refresh_channels()
        ticked = {self.labels_list.item(i).text() for i in range(self.labels_list.count())
                  if self.labels_list.item(i).checkState() == Qt.Checked}
        self.labels_list.clear()
        for layer in self._layers("labels"):
            item = QListWidgetItem(layer.name)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if layer.name in ticked else Qt.Unchecked)
            self.labels_list.addItem(item)

    def _refresh_channels(self, *_) -> None:
        layer = self._image_layer()
        current = self.channel_combo.currentText()
        self.channel_combo.clear()
        if layer is None:
            return
        try:
            names = channel_names(_image_of(layer).shape, layer.rgb, layer.name)
        except NucleisegError:
            names = []
        self.channel_combo.addItems(names)
        self.channel_combo.setEnabled(bool(names))
        if current in names:
            self.channel_combo.setCurrentText(current)

    def _image_layer(self):
        name = self.image_combo.currentText()
        return next((layer for layer in self._layers("image") if layer.name == name), None)

    # ------------------------------------------------------------------ options
    def _model_spec(self) -> str | None:
        if self.model_combo.currentText() == SHIPPED:
            return None
        text = self.model_path.text().strip()
        if not text:
            raise NucleisegError("choose a model file, or the shipped model")
        return text

    def options(self) -> PredictOptions:
        """The options of :func:`nucleiseg.segment` the widget's fields ask for (the rest: its defaults).

        Raises
        ------
        NucleisegError
            A field's value is not valid (a one-line message naming it).
        """
        return PredictOptions(mode=self.mode_combo.currentText(), tta=self.tta_check.isChecked(),
                              tile=int(self.tile_spin.value()), diameter=parse_diameter(self.diameter_combo.currentText()))

    def input_array(self, layer=None):
        """The array segmented for ``layer`` (default: the chosen one) with the chosen channel."""
        layer = layer or self._image_layer()
        if layer is None:
            raise NucleisegError("no image layer: open an image first (File > Open, or File > Open Sample > nucleiseg)")
        channel = self.channel_combo.currentText() or None if layer is self._image_layer() else None
        return layer_array(_image_of(layer), layer.rgb, channel, layer.name)

    def _load_model(self, spec: str | None):
        """The model for ``spec`` (None: shipped), loaded once per file and modification time.

        On the device :func:`nucleiseg.segment` picks by default (``device="auto"``: CUDA when present).
        """
        from ..inference import load_model, resolve_device
        from ..models import resolve_model_path

        path = resolve_model_path(spec)
        key = (str(path.resolve()), path.stat().st_mtime)
        if key not in self._models:
            self._models.clear()
            self._models[key] = load_model(path, resolve_device("auto"))
        return self._models[key]

    def _segment_array(self, image, model, options: PredictOptions):
        """:func:`nucleiseg.segment`; Cancel raises from its progress callback, after the current batch of tiles."""
        from .. import segment

        def progress(done: int, total: int) -> None:
            if self._abort.is_set():
                raise Cancelled()
            self._relay.tiles.emit(done, total)

        return segment(image, model, options, progress=progress)

    # ------------------------------------------------------------------ running
    def _notify(self, message: str, level: str = "info") -> None:
        from napari.utils.notifications import show_error, show_info, show_warning

        message = str(message).splitlines()[0] if str(message) else "failed"
        self.status.setText(message)
        {"info": show_info, "warning": show_warning, "error": show_error}[level](message)

    def _start(self, job, on_done, what: str) -> None:
        """Run ``job`` in a napari thread worker; ``on_done(result)`` or a one-line notice on the GUI thread.

        The job's exceptions come back as values: napari's workers would otherwise relay them to its
        notification manager as errors with a traceback button. Warnings are logged, not shown.
        """
        import warnings

        from napari.qt.threading import create_worker

        def guarded():
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = job()
                for w in caught:
                    log.warning("%s: %s", w.category.__name__, w.message)
                return True, result
            except Exception as exc:  # noqa: BLE001 -- reported by _failed, as one line
                return False, exc

        def returned(outcome) -> None:
            ok, value = outcome
            if ok:
                on_done(value)
            else:
                self._failed(what, value)

        self._abort.clear()
        worker = create_worker(guarded, _start_thread=False)
        worker.returned.connect(returned)
        worker.finished.connect(self._finished)
        self._worker = worker
        self._busy(True)
        worker.start()

    def _busy(self, busy: bool) -> None:
        self.segment_button.setEnabled(not busy)
        self.finetune_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.progress.setRange(0, 0 if busy else 1)
        self.progress.setValue(0)

    def _finished(self) -> None:
        self._worker = None
        self._busy(False)

    def _failed(self, what: str, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self._notify(f"{what} cancelled; no layer was changed.")
        elif isinstance(exc, NucleisegError):
            self._notify(f"{what} failed: {exc}", "warning")
        else:
            log.error("%s failed", what, exc_info=(type(exc), exc, exc.__traceback__))
            self._notify(f"{what} failed: {type(exc).__name__}: {exc}", "error")

    def cancel(self) -> None:
        """Stop the running segmentation or fine-tuning at its next network pass or step."""
        self._abort.set()
        if self._worker is not None:
            self.status.setText("cancelling…")

    @property
    def running(self) -> bool:
        return self._worker is not None

    def _show_tiles(self, done: int, total: int) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.status.setText(f"{done} of {total} tiles…" if total > 1 else "predicting…")

    def _show_loss(self, step: int, total: int, loss: float) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(step)
        self.status.setText(f"fine-tuning: step {step}/{total}, loss {loss:.4f}")

    def segment(self) -> None:
        """Segment the chosen image layer in a worker (the *Segment* button)."""
        if self.running:
            return
        try:
            layer = self._image_layer()
            image = self.input_array(layer)
            spec, options = self._model_spec(), self.options()
        except NucleisegError as exc:
            self._notify(str(exc), "warning")
            return
        channel = self.channel_combo.currentText() or None
        want_probs = self.probabilities_check.isChecked()

        def job():
            model = self._load_model(spec)
            return self._segment_array(image, model, options)

        def done(result) -> None:
            self.last_result = result
            self._show_result(layer, channel, result, want_probs, spec)
            self._notify(f"{layer.name}: {result.n_nuclei} nuclei" +
                         (f" (resized by {result.scale:.3g} for the network)" if result.scale != 1.0 else ""))

        self.status.setText(f"segmenting {layer.name}…")
        self._start(job, done, "Segmentation")

    def _show_result(self, layer, channel, result, probabilities: bool, spec, name: str | None = None) -> Any:
        """Add, or replace in place, the result layers of ``layer``."""
        import napari.layers

        scale, translate = tuple(layer.scale)[-2:], tuple(layer.translate)[-2:]
        meta = {"role": "result", "image": layer.name, "channel": channel,
                "model": "default" if spec is None else str(spec), "scale": result.scale}
        features = labels_features(result.table)
        name = name or f"{layer.name} nuclei"

        def find(role: str, channel_name: str | None = None):
            for other in self.viewer.layers:
                info = other.metadata.get(META, {}) if isinstance(other.metadata, dict) else {}
                if info.get("role") == role and info.get("image") == layer.name and info.get("probability") == channel_name:
                    return other
            return None

        labels_layer = find("result")
        if labels_layer is not None and isinstance(labels_layer, napari.layers.Labels):
            labels_layer.data = result.labels
            labels_layer.features = features
            labels_layer.metadata[META] = meta
            labels_layer.scale, labels_layer.translate = scale, translate
        else:
            labels_layer = self.viewer.add_labels(result.labels, name=name, features=features,
                                                  metadata={META: meta}, scale=scale, translate=translate)
        for index, channel_name in enumerate(result.channels):
            old = find("probability", channel_name)
            if not probabilities:
                if old is not None:
                    self.viewer.layers.remove(old)  # would no longer match the nuclei
                continue
            data = result.probabilities[index]
            if old is not None:
                old.data = data
            else:
                self.viewer.add_image(data, name=f"{layer.name} {channel_name}", contrast_limits=(0.0, 1.0),
                                      colormap={"body": "green", "contour": "magenta", "touch": "yellow"}.get(
                                          channel_name, "gray"), blending="additive", visible=False,
                                      metadata={META: {"role": "probability", "image": layer.name,
                                                       "probability": channel_name}},
                                      scale=scale, translate=translate)
        return labels_layer

    # ------------------------------------------------------------------ fine-tuning
    def _checked_labels(self) -> list:
        names = [self.labels_list.item(i).text() for i in range(self.labels_list.count())
                 if self.labels_list.item(i).checkState() == Qt.Checked]
        return [layer for layer in self._layers("labels") if layer.name in names]

    def _pair(self, labels_layer):
        """The image layer and channel a Labels layer annotates: from its metadata, else its name."""
        info = labels_layer.metadata.get(META, {}) if isinstance(labels_layer.metadata, dict) else {}
        images = {layer.name: layer for layer in self._layers("image")}
        if info.get("image") in images:
            return images[info["image"]], info.get("channel")
        prefixes = [name for name in images if labels_layer.name.startswith(name)]
        if prefixes:
            return images[max(prefixes, key=len)], None
        raise NucleisegError(f"Labels layer '{labels_layer.name}' is not named after an image layer "
                             "(name it '<image> nuclei')")

    def fine_tune(self) -> None:
        """Train the current model on the ticked Labels layers, save it, segment their images again."""
        if self.running:
            return
        try:
            chosen = self._checked_labels()
            if not chosen:
                raise NucleisegError("tick at least one corrected Labels layer to fine-tune on")
            pairs, sources = [], []
            for labels_layer in chosen:
                image_layer, channel = self._pair(labels_layer)
                image = layer_array(_image_of(image_layer), image_layer.rgb, channel, image_layer.name)
                labels = labels_layer.data
                if labels.shape != image.shape[:2]:
                    raise NucleisegError(f"Labels layer '{labels_layer.name}' is {labels.shape} but image "
                                         f"'{image_layer.name}' is {image.shape[:2]}")
                pairs.append((image_layer.name, image, labels.copy()))
                sources.append((labels_layer, image_layer, channel, image))
            spec, options = self._model_spec(), self.options()
            out = Path(self.save_path.text().strip()).expanduser()
            if not out.name:
                raise NucleisegError("choose where to save the fine-tuned model")
            if out.suffix != ".safetensors":
                out = out.with_name(out.name + ".safetensors")
        except NucleisegError as exc:
            self._notify(str(exc), "warning")
            return
        steps, lr = int(self.steps_spin.value()), float(self.lr_spin.value())
        batch_size, crop = self.finetune_batch_size, self.finetune_crop

        def on_step(step: int, loss: float) -> None:
            if self._abort.is_set():
                raise Cancelled()
            self._relay.loss.emit(step, steps, loss)

        def job():
            from ._finetune import fine_tune

            path = fine_tune(pairs, spec, out, steps=steps, lr=lr, batch_size=batch_size, crop=crop, on_step=on_step)
            model = self._load_model(str(path))
            return path, [self._segment_array(image, model, options) for *_, image in sources]

        def done(outcome) -> None:
            path, results = outcome
            self.model_combo.setCurrentText(MODEL_FILE)
            self.model_path.setText(str(path))
            for (labels_layer, image_layer, channel, _), result in zip(sources, results):
                # the corrections are kept as they are, under a name that says so
                labels_layer.metadata[META] = {"role": "corrected", "image": image_layer.name, "channel": channel}
                if labels_layer.name == f"{image_layer.name} nuclei":
                    labels_layer.name = f"{image_layer.name} corrected"
                self._show_result(image_layer, channel, result, False, str(path))
                self.last_result = result
            self._notify(f"fine-tuned model saved as {path}; its nuclei replace the '... nuclei' layers")

        self.status.setText(f"fine-tuning on {len(pairs)} image(s)…")
        self._start(job, done, "Fine-tuning")

    # ------------------------------------------------------------------ dialogs
    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model file", "", "nucleiseg models (*.safetensors)")
        if path:
            self.model_path.setText(path)
            self.model_combo.setCurrentText(MODEL_FILE)

    def _browse_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the fine-tuned model", self.save_path.text(),
                                              "nucleiseg models (*.safetensors)")
        if path:
            self.save_path.setText(path)
