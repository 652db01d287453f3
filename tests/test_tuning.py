"""Tests of nucleiseg.tuning and the ``tune`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from nucleiseg import cli
from nucleiseg.metrics import instance_scores
from nucleiseg.postprocess import PostprocessParams, instances_from_probabilities
from nucleiseg.tuning import (
    DEFAULT_GRID,
    _grid,
    _image_scores,
    _tune_by_kind,
    best_of_grid,
    choose_prune_level,
    score_grid,
    tune_postprocess,
    update_model_metadata,
)

CHANNELS = ["body", "contour", "touch"]


def touching_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two touching 10 x 10 nuclei that only a seed threshold in [0.544, 0.68) separates.

    Left nucleus: p_body 0.95; right nucleus: p_body 0.68; a 2-px touch strip
    (p_touch 0.2) across the contact. Seed map p_body * (1 - p_boundary): 0.95
    left, 0.68 right, 0.76 and 0.544 on the strip's two columns. Seed threshold
    <= 0.5: the strip joins the seeds, one object (DSB 0). >= 0.7: the right
    nucleus has no seed of its own and is flooded from the left one (DSB 0).
    0.6: the strip's right column breaks the seeds apart, two objects.
    """
    truth = np.zeros((20, 30), np.int32)
    truth[4:14, 4:14] = 1
    truth[4:14, 14:24] = 2
    probs = np.zeros((3, 20, 30), np.float32)
    probs[0][truth == 1] = 0.95
    probs[0][truth == 2] = 0.68
    probs[2, 4:14, 13:15] = 0.2
    return probs, truth


def test_grid_is_coarse_and_validated():
    n = np.prod([len(v) for v in DEFAULT_GRID.values()])
    assert 100 <= n <= 450
    with pytest.raises(ValueError, match="unknown grid parameter"):
        _grid({"threshold": [0.5]})


def test_shared_computation_matches_instances_from_probabilities():
    rng = np.random.default_rng(3)
    probs = ndi.gaussian_filter(rng.random((3, 48, 48)), (0, 2.5, 2.5))
    probs = ((probs - probs.min(axis=(1, 2), keepdims=True)) / np.ptp(probs, axis=(1, 2), keepdims=True)).astype(np.float32)
    truth = ndi.label(probs[0] > 0.55)[0]
    grid = _grid({"foreground_threshold": [0.3, 0.5], "seed_threshold": [0.3, 0.6], "min_seed_size": [1, 8],
                  "min_size": [1, 20]})
    scores = _image_scores(probs, truth, CHANNELS, grid)
    assert len(scores) == 16
    for combo, (dsb, ap50) in scores.items():
        ref = instance_scores(truth, instances_from_probabilities(probs, CHANNELS, PostprocessParams(*combo)))
        assert (dsb, ap50) == (ref.score, ref.ap50), combo


def test_tune_finds_the_only_separating_seed_threshold():
    probs, truth = touching_pair()
    best, table = tune_postprocess([probs, probs], [truth, truth], CHANNELS)
    assert best.seed_threshold == 0.6
    assert best.foreground_threshold < 0.68  # the right nucleus must stay foreground
    assert table.iloc[0]["dsb"] > 0.8  # the 1-px contact column goes to one side
    assert len(table) == np.prod([len(v) for v in DEFAULT_GRID.values()])
    # merged pair: DSB 0, or 0.5 when foreground_threshold 0.7 drops the right nucleus and leaves the left alone
    assert table.loc[table["seed_threshold"] == 0.5, "dsb"].max() == 0.5
    assert table.loc[table["seed_threshold"] == 0.8, "dsb"].max() == 0.5
    labels = instances_from_probabilities(probs, CHANNELS, best)
    assert labels.max() == 2


def test_tune_body_only_channels_uses_connected_components():
    probs, truth = touching_pair()
    truth = (truth > 0).astype(np.int32)  # one object, body only
    best, table = tune_postprocess([probs[:1]], [truth], ["body"], grid={"foreground_threshold": [0.5, 0.7]})
    assert best.foreground_threshold == 0.5
    assert len(table) == 2 * len(DEFAULT_GRID["min_size"])


def test_tune_rejects_mismatched_inputs():
    probs, truth = touching_pair()
    with pytest.raises(ValueError, match="2 probability maps for 1"):
        tune_postprocess([probs, probs], [truth], CHANNELS)
    with pytest.raises(ValueError, match="do not match"):
        tune_postprocess([probs[:2]], [truth], CHANNELS)


def test_score_grid_then_best_of_grid_is_tune_postprocess():
    probs, truth = touching_pair()
    grid = {"min_seed_size": [2, 8], "min_size": [5, 15]}
    combos, scores = score_grid([probs, probs[:, ::-1]], [truth, truth[::-1]], CHANNELS, grid)
    assert scores.shape == (2, len(combos), 2)
    best, table = best_of_grid(combos, scores)
    expected, expected_table = tune_postprocess([probs, probs[:, ::-1]], [truth, truth[::-1]], CHANNELS, grid)
    assert best == expected
    assert table.equals(expected_table)
    one, _ = best_of_grid(combos, scores[:1])  # a subset of the images, as per kind
    score = instance_scores(truth, instances_from_probabilities(probs, CHANNELS, one)).score
    assert score == pytest.approx(scores[0, :, 0].max()) and score > scores[0, :, 0].min()


def test_tune_by_kind_keeps_clear_gains_on_enough_images():
    shared = PostprocessParams(0.5, 0.5, 2, 5)
    own = PostprocessParams(0.5, 0.6, 2, 5)
    combos = [(0.5, 0.5, 2, 5), (0.5, 0.6, 2, 5)]
    kinds = ["tissue"] * 5 + ["brightfield"] * 2 + ["fluorescence"] * 5
    dsb = np.array([[0.3, 0.5]] * 5 + [[0.3, 0.9]] * 2 + [[0.70, 0.705]] * 5)
    scores = np.stack([dsb, dsb], axis=-1)
    by_kind, record = _tune_by_kind(kinds, combos, scores, dsb[:, 0], shared)
    assert by_kind == {"tissue": own}  # brightfield: too few images; fluorescence: gain under 0.01
    assert record["tissue"]["dsb_shared_thresholds"] == pytest.approx(0.3)
    assert record["tissue"]["dsb_own_thresholds"] == pytest.approx(0.5)
    assert record["brightfield"]["n_images"] == 2 and "dsb_own_thresholds" not in record["brightfield"]
    assert record["fluorescence"]["uses_own_thresholds"] is False
    assert _tune_by_kind(kinds, combos, scores, dsb[:, 0], shared, min_images=2)[0].keys() == {"tissue", "brightfield"}


def test_choose_prune_level():
    assert choose_prune_level({1: 0.50, 2: 0.58, 3: 0.60}, 0.61) == 2
    assert choose_prune_level({1: 0.60, 2: 0.58}, 0.61) == 1
    assert choose_prune_level({1: 0.1, 2: 0.3, 3: 0.2}, 0.61) == 2  # none close: the best


def _tiny_model(path: Path):
    import torch

    from nucleiseg.models import UNetPlusPlus, save_model

    torch.manual_seed(0)
    model = UNetPlusPlus(widths=(4, 8, 16)).eval()
    save_model(path, model, {"postprocess": PostprocessParams().to_dict()})
    return model


def test_update_model_metadata_keeps_tensors(tmp_path):
    from safetensors.torch import load_file

    from nucleiseg.models import load_model_file

    path = tmp_path / "m.safetensors"
    _tiny_model(path)
    before = load_file(str(path))
    out = update_model_metadata(path, {"postprocess": {"seed_threshold": 0.7}, "fast_prune_level": 1},
                                out=tmp_path / "copy.safetensors")
    after = load_file(str(out))
    assert before.keys() == after.keys() and all(bool((before[k] == after[k]).all()) for k in before)
    _, meta = load_model_file(out)
    assert meta["postprocess"] == {"seed_threshold": 0.7} and meta["fast_prune_level"] == 1
    assert meta["config"]["widths"] == [4, 8, 16]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.safetensors", "m.safetensors"]  # no temp left


def test_update_model_metadata_float16_halves_the_file_and_keeps_the_outputs(tmp_path):
    import torch
    from safetensors.torch import load_file

    from nucleiseg.errors import NucleisegError
    from nucleiseg.models import load_model_file, save_model

    path = tmp_path / "m.safetensors"
    model = _tiny_model(path)
    out = update_model_metadata(path, {}, out=tmp_path / "half.safetensors", float16=True)
    stored = load_file(str(out))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    assert {t.dtype for t in stored.values() if not t.is_floating_point()} == {torch.int64}  # BatchNorm counters
    assert out.stat().st_size < 0.6 * path.stat().st_size
    loaded, meta = load_model_file(out)
    assert next(loaded.parameters()).dtype == torch.float32 and meta["config"]["widths"] == [4, 8, 16]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(x)[-1], loaded(x)[-1]
    assert torch.allclose(got, expected, atol=2e-2) and not torch.equal(got, expected)  # rounded, not rebuilt

    big = tmp_path / "big.safetensors"
    model.heads[0].bias.data.fill_(1e6)
    save_model(big, model)
    with pytest.raises(NucleisegError, match="big.safetensors.*beyond float16's range"):
        update_model_metadata(big, {}, float16=True)


def test_update_model_metadata_names_a_bad_file(tmp_path):
    from nucleiseg.errors import NucleisegError

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    with pytest.raises(NucleisegError, match="junk.safetensors.*not a nucleiseg model file"):
        update_model_metadata(junk, {"fast_prune_level": 1})
    assert junk.read_bytes() == b"not a model"
    with pytest.raises(NucleisegError, match="no such model file"):
        update_model_metadata(tmp_path / "missing.safetensors", {"fast_prune_level": 1})


def test_cli_tune_updates_metadata(tmp_path, capsys, synthetic_cache):
    pytest.importorskip("nucleiseg.inference")
    import torch
    from safetensors.torch import load_file

    from nucleiseg.models import load_model_file

    cache, _ = synthetic_cache(tmp_path, n=4)
    path = tmp_path / "tiny.safetensors"
    _tiny_model(path)
    weights = load_file(str(path))
    rc = cli.main(["-q", "tune", str(cache), "--model", str(path), "--split", "all"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "before" in out.out and "after tuning" in out.out and "prune level" in out.out
    model, meta = load_model_file(path)
    assert set(meta["postprocess"]) == {"foreground_threshold", "seed_threshold", "min_seed_size", "min_size"}
    assert meta["fast_prune_level"] in (1, 2)
    assert meta["tuning"]["n_images"] == 4 and meta["tuning"]["dsb_after"] >= meta["tuning"]["dsb_before"]
    kinds = meta["tuning"]["kinds"]
    assert sum(entry["n_images"] for entry in kinds.values()) == 4
    assert set(meta["postprocess_by_kind"]) <= set(kinds)  # 4 images: under the 5 a kind needs
    assert "images): DSB" in out.out
    after = load_file(str(path))
    assert all(bool((weights[k] == after[k]).all()) for k in weights)

    half = tmp_path / "half.safetensors"
    assert cli.main(["-q", "tune", str(cache), "--model", str(path), "--split", "all", "--out", str(half), "--float16"]) == 0
    assert load_file(str(half))["heads.0.weight"].dtype == torch.float16
    assert load_file(str(path))["heads.0.weight"].dtype == torch.float32  # --out leaves the source as it was


def test_cli_tune_errors(tmp_path, capsys):
    cache = tmp_path / "not-a-cache"
    cache.mkdir()
    rc = cli.main(["tune", str(cache), "--model", "default"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and len(err.strip().splitlines()) == 1
    rc = cli.main(["tune", str(cache), "--model", str(tmp_path / "missing.safetensors")])
    assert rc == 2 and "no such model file" in capsys.readouterr().err
