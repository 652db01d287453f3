"""Fine-tune a model on corrected labels held in memory (the widget's *Fine-tune*), with the project's training.

The pairs are written in the paired layout (``images/<name>.tif`` + ``labels/<name>.tif``,
:mod:`nucleiseg.data.paired`) into a temporary folder, prepared as a cache
(:func:`nucleiseg.data.cache.prepare_dataset`, all of them for training) and trained on with
:func:`nucleiseg.training.train` from the current model (``init``) for a given number of steps;
the result is a model file like any other (``nucleiseg predict --model FILE`` reads it).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NucleisegError

__all__ = ["DEFAULT_LR", "DEFAULT_STEPS", "fine_tune"]

#: Steps of the widget's fine-tuning (batches of ``batch_size`` crops): 8 x 64 crops at lr 3e-4 was
#: docs/fine-tuning.md's worked example (a 0.11 DSB gain on magnified images), 64 batches of 8.
DEFAULT_STEPS = 64
#: Learning rate of the worked examples in docs/fine-tuning.md.
DEFAULT_LR = 3e-4


def _safe_name(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"
    candidate, k = stem, 1
    while candidate in taken:
        k += 1
        candidate = f"{stem}_{k}"
    taken.add(candidate)
    return candidate


def fine_tune(
    pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
    model: str | Path | None,
    out: str | Path,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = 8,
    crop: int = 256,
    on_step: Callable[[int, float], Any] | None = None,
    **config: Any,
) -> Path:
    """Train ``model`` for ``steps`` steps on (name, image, labels) pairs and save it as ``out``.

    Parameters
    ----------
    pairs : sequence of (str, ndarray, ndarray)
        Name, image (as :func:`nucleiseg.segment` takes it) and instance labels of the same height
        and width (any integers, 0 = background; renumbered).
    model : str, Path or None
        The model to start from: a model file, or None / ``"default"`` for the shipped one.
    out : str or Path
        The model file to write (``.safetensors``), atomically.
    steps : int
        Optimisation steps.
    lr : float
        Peak learning rate (a short warm-up, then cosine decay over the steps).
    batch_size, crop : int
        Crops per step and their side (smaller images are padded by reflection).
    on_step : callable, optional
        ``on_step(step, loss)`` after each step (see :func:`nucleiseg.training.train`).
    **config
        More :class:`~nucleiseg.training.TrainConfig` settings (``augment_strength``, ``seed``, ...).

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    NucleisegError
        No pairs, labels without a nucleus, or labels of another size than their image.
    """
    from ..data.cache import prepare_dataset
    from ..data.paired import BinaryMaskError, check_binary_mask
    from ..io import atomic_path, write_labels_tiff
    from ..training import TrainConfig, train

    if not pairs:
        raise NucleisegError("fine-tuning needs at least one image with its corrected labels")
    if int(steps) < 1:
        raise NucleisegError(f"fine-tuning needs at least one step, got {steps}")
    with tempfile.TemporaryDirectory(prefix="nucleiseg-finetune-") as tmp:
        source = Path(tmp) / "pairs"
        (source / "images").mkdir(parents=True)
        (source / "labels").mkdir()
        taken: set[str] = set()
        for name, image, labels in pairs:
            image, labels = np.asarray(image), np.asarray(labels)
            if labels.shape != image.shape[:2]:
                raise NucleisegError(f"labels '{name}' are {labels.shape[0]}x{labels.shape[1]} but their image is "
                                     f"{image.shape[0]}x{image.shape[1]}")
            if not labels.any():
                raise NucleisegError(f"labels '{name}' hold no nucleus: nothing to learn from")
            try:
                check_binary_mask(labels, f"labels '{name}'")
            except BinaryMaskError as exc:  # its advice names prepare's option, not offered here
                what = str(exc).split(": each nucleus needs")[0]
                raise NucleisegError(f"{what}: give each nucleus its own label (a new label value for each, "
                                     "e.g. with the layer's 'new label' button before painting it)") from None
            import tifffile

            stem = _safe_name(name, taken)
            tifffile.imwrite(source / "images" / f"{stem}.tif", image)
            write_labels_tiff(source / "labels" / f"{stem}.tif", labels.astype(np.int64))
        cache = Path(tmp) / "cache"
        prepare_dataset(source, cache, layout="paired", val_fraction=0.0, workers=1, progress=False)
        settings = dict(epochs=1, samples_per_epoch=int(steps) * batch_size, batch_size=batch_size, crop=crop, lr=lr,
                        warmup_epochs=0.1, workers=0, init=str(model if model is not None else "default"))
        settings.update(config)
        best = train(cache, Path(tmp) / "run", TrainConfig(**settings), max_steps=int(steps), on_step=on_step)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp_out:
            shutil.copyfile(best, tmp_out)
    return out
