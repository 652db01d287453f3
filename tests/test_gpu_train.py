"""The GPU training script runs end to end on the CPU (tiny network, two steps) before any GPU call."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_train_dry_run_writes_model_metrics_and_honest_estimate(tmp_path, synthetic_cache):
    pytest.importorskip("torch")
    from nucleiseg.models import load_model_file

    cache, _ = synthetic_cache(tmp_path, n=6, shape=(48, 48))
    packed = tmp_path / "packed.zip"
    _load("pack_cache").pack(cache, packed)
    out = tmp_path / "out"
    rc = _load("gpu_train").main([str(packed), "--out", str(out), "--train-seconds", "3", "--max-steps", "2",
                                  "--work", str(tmp_path / "work"), "--",
                                  "--widths", "4,8,16", "--batch-size", "2", "--crop", "32", "--workers", "0"])
    assert rc == 0
    record = json.loads((out / "gpu_train.json").read_text())
    assert record["epochs"] >= 1 and record["seconds_per_step"] > 0 and record["timings_s"]["train"] > 0
    assert len(pd.read_csv(out / "metrics.csv")) >= 1
    _, meta = load_model_file(out / "model.safetensors")
    assert meta["config"]["widths"] == [4, 8, 16] and "postprocess" in meta
    honest = json.loads((out / "honest.json").read_text())
    assert honest["overall"]["n_images"] == 3
    for mode in ("accurate", "fast"):
        summary = json.loads((out / f"eval-{mode}" / "summary.json").read_text())
        assert summary["evaluated"]["mode"] == mode and summary["n_images"] == 3


def test_epochs_fill_the_budget():
    size_epochs = _load("gpu_train").size_epochs
    assert size_epochs(420, 0.048, 34) == 197
    assert size_epochs(1, 10.0, 34) == 1
