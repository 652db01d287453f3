"""The honest estimate: tune's threshold choice cross-validated by mosaic group and kind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nucleiseg import cli
from nucleiseg.honest import choose_thresholds, group_folds, nested_cv_estimate, report_kinds
from nucleiseg.tuning import best_of_grid, grid_key, score_grid


def _grid_case(n=12, n_combos=6, seed=0):
    """Random per-image scores under a few combinations (4-tuples as score_grid gives them)."""
    rng = np.random.default_rng(seed)
    combos = [(0.3 + 0.1 * c, 0.5, 2, 5) for c in range(n_combos)]
    scores = rng.uniform(0, 1, (n, n_combos, 2))
    return combos, scores


def test_group_folds_keep_mosaics_together_and_spread_each_kind():
    kinds = ["fluorescence"] * 12 + ["tissue"] * 9
    groups = ["m1"] * 4 + ["m2"] * 4 + [None] * 4 + ["t1"] * 4 + ["t2"] * 4 + [None]
    for seed in range(5):
        fold = group_folds(kinds, groups, n_folds=3, seed=seed)
        for g in ("m1", "m2", "t1", "t2"):
            assert len({fold[i] for i, x in enumerate(groups) if x == g}) == 1
        tissue_folds = sorted(np.bincount(fold[12:], minlength=3))
        assert tissue_folds == [1, 4, 4]  # two mosaics of 4 and the single image, each in its own fold
        assert sorted(np.bincount(fold[:12], minlength=3)) == [4, 4, 4]


def test_held_out_scores_use_thresholds_chosen_without_the_image():
    combos, scores = _grid_case()
    kinds = ["fluorescence"] * 12
    est = nested_cv_estimate(combos, scores, kinds, None, n_folds=12, repeats=1, n_boot=0, per_kind=False)
    for k in range(12):  # leave-one-out: the best of the other 11 images, read on image k
        best, _ = best_of_grid(combos, np.delete(scores, k, axis=0))
        assert est.per_image["dsb"][k] == pytest.approx(scores[k, combos.index(grid_key(best)), 0])
    chosen = combos.index(grid_key(best_of_grid(combos, scores)[0]))
    assert est.summary["overall"]["dsb_validation"] == pytest.approx(scores[:, chosen, 0].mean())
    assert est.dsb <= est.summary["overall"]["dsb_validation"]  # the best on all images, read on them, is optimistic


def test_per_kind_thresholds_are_chosen_on_the_training_folds_only():
    combos, scores = _grid_case(n=12)
    kinds = ["fluorescence"] * 6 + ["tissue"] * 6
    scores[6:, 0, 0] = 1.0  # tissue images all best under combination 0, a clear gain
    shared, own = choose_thresholds(combos, scores, kinds)
    assert own == {"tissue": 0} or shared == 0
    est = nested_cv_estimate(combos, scores, kinds, None, n_folds=3, repeats=2, n_boot=200)
    tissue = est.summary["per_kind"]["tissue"]
    assert tissue["dsb"] == pytest.approx(1.0) and tissue["n_images"] == 6
    low, high = est.summary["overall"]["dsb_ci95"]
    assert low <= est.dsb <= high
    assert est.summary["overall"]["dsb_std_repeats"] >= 0


def test_fast_mode_reads_other_scores_with_the_same_choice():
    combos, scores = _grid_case()
    kinds = ["fluorescence"] * 12
    fast = scores * 0.5
    plain = nested_cv_estimate(combos, scores, kinds, None, repeats=2, n_boot=0)
    halved = nested_cv_estimate(combos, scores, kinds, None, repeats=2, n_boot=0, score_with=fast)
    assert halved.dsb == pytest.approx(plain.dsb * 0.5)


def test_small_kinds_are_pooled_or_left_out_of_per_kind_figures():
    combos, scores = _grid_case(n=8)
    kinds = ["fluorescence"] * 6 + ["brightfield", "tissue"]
    est = nested_cv_estimate(combos, scores, kinds, None, repeats=1, n_boot=0)
    assert set(est.summary["per_kind"]) == {"fluorescence"}
    assert est.summary["not_reported"] == ["brightfield (1 image)", "tissue (1 image)"]
    assert report_kinds(["f"] * 3 + ["t"] * 2 + ["b"])[0][3:] == ["other kinds"] * 3
    with pytest.raises(ValueError, match="2 groups"):
        nested_cv_estimate(combos, scores, kinds, ["one"] * 8)


def test_tune_and_evaluate_print_the_honest_estimate_first(tmp_path, capsys, synthetic_cache):
    pytest.importorskip("nucleiseg.inference")
    import torch

    from nucleiseg.models import UNetPlusPlus, load_model_file, save_model

    cache, truth = synthetic_cache(tmp_path, n=6)
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_model(path, UNetPlusPlus(widths=(4, 8, 16)).eval())
    assert cli.main(["-q", "tune", str(cache), "--model", str(path), "--split", "all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("honest estimate of the tuned thresholds")
    _, meta = load_model_file(path)
    honest = meta["tuning"]["honest_estimate"]
    assert honest["overall"]["n_images"] == 6

    # evaluate on the split the thresholds were tuned on: the estimate by default, first, and equal to tune's
    report = tmp_path / "eval"
    assert cli.main(["-q", "evaluate", str(cache), "--model", str(path), "--split", "all", "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("honest estimate") and out.index("honest estimate") < out.index("validation")
    summary = json.loads((report / "summary.json").read_text())
    assert summary["honest"]["source"].startswith("stored by tune")  # free: tune's own estimate
    assert summary["honest"]["overall"] == honest["overall"] and summary["tuned_on_split"] is True
    # --honest computes it again from this run's predictions: the same figure
    assert cli.main(["-q", "evaluate", str(cache), "--model", str(path), "--split", "all", "--out", str(report),
                     "--honest"]) == 0
    assert capsys.readouterr().out.startswith("honest estimate")
    summary = json.loads((report / "summary.json").read_text())
    assert "source" not in summary["honest"]
    assert summary["honest"]["overall"]["dsb"] == pytest.approx(honest["overall"]["dsb"], abs=1e-6)
    assert cli.main(["-q", "evaluate", str(cache), "--model", str(path), "--split", "all", "--out", str(report),
                     "--no-honest"]) == 0
    assert "honest" not in capsys.readouterr().out

    # half of the tuning images (the val split): the thresholds were chosen on them, but tune's estimate was not
    assert cli.main(["-q", "evaluate", str(cache), "--model", str(path), "--split", "val", "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "chosen on these same images" in out
    summary = json.loads((report / "summary.json").read_text())
    assert summary["tuned_on_images"] == summary["overall"]["n_images"] == 3 and "source" not in summary["honest"]
    # other images, in a split of the same name and size: no claim that the thresholds were chosen on them,
    # and no estimate computed unasked
    other, _ = synthetic_cache(tmp_path / "other", n=6, shape=(40, 56))
    assert cli.main(["-q", "evaluate", str(other), "--model", str(path), "--split", "all", "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "honest" not in out and "chosen on" not in out
    summary = json.loads((report / "summary.json").read_text())
    assert "tuned_on_split" not in summary and "honest" not in summary

    # tune never overwrites a file that is not a model
    precious = tmp_path / "notes.csv"
    precious.write_text("keep me\n")
    assert cli.main(["-q", "tune", str(cache), "--model", str(path), "--split", "all", "--out", str(precious)]) == 2
    assert "is not a nucleiseg model file" in capsys.readouterr().err and precious.read_text() == "keep me\n"


def test_score_grid_rows_are_what_the_estimate_reads(synthetic_cache, tmp_path):
    """One image scored alone (as evaluate does, image by image) gives its row of the whole grid."""
    cache, truth = synthetic_cache(tmp_path, n=2)
    probs = []
    for labels in truth.values():
        p = np.zeros((3,) + labels.shape, np.float32)
        p[0] = labels > 0
        probs.append(p)
    combos, together = score_grid(probs, list(truth.values()), ["body", "contour", "touch"])
    _, alone = score_grid(probs[1:], list(truth.values())[1:], ["body", "contour", "touch"])
    assert np.array_equal(together[1], alone[0]) and len(combos) == together.shape[1]


def test_cross_validated_rule_drops_kind_thresholds_that_win_on_one_mosaic_only():
    combos = [(0.5, 0.5, 2, 5), (0.6, 0.5, 2, 5)]
    kinds = ["fluorescence"] * 10 + ["tissue"] * 6
    groups = [None] * 10 + ["t1", "t1", "t2", "t2", "t3", "t3"]
    scores = np.zeros((16, 2, 2))
    scores[:10, 0, 0], scores[:10, 1, 0] = 0.7, 0.1  # fluorescence: combination 0 by far
    scores[10:, 0, 0] = 0.5
    scores[10:, 1, 0] = [1.0, 1.0, 0.45, 0.45, 0.45, 0.45]  # tissue: combination 1 wins on mosaic t1 alone
    plain = choose_thresholds(combos, scores, kinds, groups=groups, per_kind=True, min_kind_images=2)
    assert plain == (0, {"tissue": 1})  # in-sample: 0.633 against 0.5
    assert choose_thresholds(combos, scores, kinds, groups=groups, per_kind="cv", min_kind_images=2) == (0, {})
    honest = nested_cv_estimate(combos, scores, kinds, groups, per_kind="cv", min_kind_images=2, repeats=1, n_boot=0)
    naive = nested_cv_estimate(combos, scores, kinds, groups, per_kind=True, min_kind_images=2, repeats=1, n_boot=0)
    assert honest.summary["per_kind"]["tissue"]["dsb"] > naive.summary["per_kind"]["tissue"]["dsb"]
