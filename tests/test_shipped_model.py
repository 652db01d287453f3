"""The model file that ships inside the package: its form, and that it finds nuclei.

The accuracy figures of the model card come from ``nucleiseg evaluate`` on the
validation split (docs/model-card.md); these tests only guard the shipped file
against being broken, replaced by mistake or loaded wrongly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nucleiseg.io import read_image
from nucleiseg.metrics import instance_scores

FIXTURE = Path(__file__).parent / "fixtures" / "dsb" / "stage1_train"


def _truth(sample: Path) -> np.ndarray:
    """Merge a DSB sample's per-nucleus masks into one label image."""
    from nucleiseg.data.dsb import read_kaggle_labels

    image = read_image(next((sample / "images").glob("*.png")))
    labels, problems = read_kaggle_labels(sorted((sample / "masks").glob("*.png")), image.shape[:2])
    assert not problems
    return labels


def test_shipped_file_is_small_safe_and_complete():
    from safetensors import safe_open

    from nucleiseg.models import DEFAULT_MODEL_PATH, load_model_file

    assert DEFAULT_MODEL_PATH.is_file()
    assert DEFAULT_MODEL_PATH.stat().st_size <= 20 * 1024 * 1024  # the limit
    with safe_open(str(DEFAULT_MODEL_PATH), framework="pt") as f:  # tensors and JSON only, nothing unpickled
        dtypes = {str(f.get_slice(name).get_dtype()) for name in f.keys()}
    assert dtypes <= {"F16", "F32", "I64"}
    model, meta = load_model_file(DEFAULT_MODEL_PATH)
    assert next(model.parameters()).dtype.is_floating_point and str(next(model.parameters()).dtype) == "torch.float32"
    assert {"postprocess", "fast_prune_level", "nucleus_diameter", "channels"} <= set(meta)
    assert 1 <= meta["fast_prune_level"] < model.depth
    assert meta["channels"] == ["body", "contour", "touch"]


@pytest.mark.parametrize("mode", ["accurate", "fast"])
def test_shipped_model_finds_the_fixture_nuclei(mode):
    """Three fixture images (two whole, one crop; training images, so a check that the file works, not of
    accuracy): every nucleus counted to within a quarter, most matched at IoU 0.5."""
    from nucleiseg.inference import segment

    scores = {}
    for sample in sorted(FIXTURE.iterdir()):
        if sample.name.startswith("af576e8e"):  # 3 blurred nuclei; a validation image, in the model card
            continue
        truth = _truth(sample)
        image = read_image(next((sample / "images").glob("*.png")))
        result = segment(image, mode=mode, precision="fp32")
        assert result.labels.shape == truth.shape
        assert abs(result.n_nuclei - truth.max()) <= 0.25 * truth.max() + 1, sample.name
        scores[sample.name] = instance_scores(truth, result.labels)
    assert len(scores) == 3
    for name, s in scores.items():
        assert s.ap50 >= 0.6, (name, s.ap50)
    assert np.mean([s.score for s in scores.values()]) >= 0.6
