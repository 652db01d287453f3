"""Tests of nucleiseg.evaluate and the ``evaluate`` command: hand-made label images, a tiny cache."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from nucleiseg import cli
from nucleiseg.errors import NucleisegError
from nucleiseg.evaluate import (
    Evaluator,
    evaluate_labels,
    find_prediction,
    format_summary,
    overlay_outlines,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def squares(shape=(20, 30), boxes=((2, 2, 8, 8), (10, 12, 18, 22)), values=None) -> np.ndarray:
    """Label image with one rectangle (r0, c0, r1, c1) per object, labelled 1..n (or ``values``)."""
    labels = np.zeros(shape, np.int32)
    for k, (r0, c0, r1, c1) in enumerate(boxes):
        labels[r0:r1, c0:c1] = values[k] if values else k + 1
    return labels


def test_perfect_prediction_scores_one_and_has_per_kind_blocks():
    a, b = squares(), squares(boxes=((0, 0, 5, 5),))
    truth = {"a": a, "b": b}
    pred = {"a": a * 7, "b": b}  # label values need not match
    table, summary = evaluate_labels(truth, pred, kinds={"a": "fluorescence", "b": "tissue"})
    assert list(table.columns[:11]) == ["image_id", "kind", "n_true", "n_pred", "precision", "recall",
                                        "f1", "iou", "dsb", "ap50", "missing"]
    assert table["dsb"].tolist() == [1.0, 1.0]
    assert table["n_true"].tolist() == [2, 1]
    assert summary["overall"]["dsb"] == 1.0 and summary["overall"]["f1"] == 1.0
    assert set(summary["per_kind"]) == {"fluorescence", "tissue"}
    assert summary["per_kind"]["tissue"]["n_images"] == 1
    assert "auc" not in table and "auc" not in summary["overall"]
    json.dumps(summary, allow_nan=False)  # JSON-ready


def test_hand_case_numbers():
    truth = squares()  # object 1: 6x6 = 36 px, object 2: 8x10 = 80 px
    pred = squares(boxes=((2, 2, 8, 8),))  # only object 1 found
    table, summary = evaluate_labels({"x": truth}, {"x": pred})
    row = table.iloc[0]
    # pixels: TP 36, FN 80, FP 0 -> precision 1, recall 36/116, f1 72/152, iou 36/116
    assert row["precision"] == 1.0
    assert row["recall"] == pytest.approx(36 / 116)
    assert row["f1"] == pytest.approx(72 / 152)
    # instances: 1 TP, 0 FP, 1 FN at every threshold -> 1/2
    assert row["dsb"] == pytest.approx(0.5) and row["ap50"] == pytest.approx(0.5)
    assert row["kind"] == "unknown"
    assert summary["overall"]["dsb_per_threshold"]["0.50"] == pytest.approx(0.5)


def test_micro_average_pools_pixels_and_dsb_is_mean_over_images():
    big = squares((20, 20), ((0, 0, 10, 10),))  # 100 px, found
    small = squares((20, 20), ((0, 0, 2, 2),))  # 4 px, missed
    table, summary = evaluate_labels({"big": big, "small": small}, {"big": big, "small": np.zeros_like(small)})
    assert summary["overall"]["f1"] == pytest.approx(2 * 100 / (2 * 100 + 4))  # pooled pixels
    assert summary["overall"]["dsb"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert "micro" in " ".join(summary["averaging"].values())


def test_probabilities_add_auc_and_connected_components_baseline():
    truth = squares((20, 30), ((4, 4, 14, 14), (4, 14, 14, 24)))  # two touching squares
    body = (truth > 0).astype(np.float32) * 0.9 + 0.05
    table, summary = evaluate_labels({"t": truth}, {"t": truth}, probs={"t": body})
    assert table.loc[0, "auc"] == 1.0
    assert table.loc[0, "dsb"] == 1.0
    assert table.loc[0, "dsb_cc"] == 0.0  # connected components merge the touching pair
    assert summary["overall"]["dsb_gain_over_cc"] == 1.0
    assert summary["overall"]["auc"] == 1.0
    # (C, H, W) probabilities: the body channel is picked by name
    probs = np.stack([np.zeros_like(body), body])
    table2, _ = evaluate_labels({"t": truth}, {"t": truth}, probs={"t": probs}, channels=["contour", "body"])
    assert table2.loc[0, "auc"] == 1.0


def test_missing_prediction_warns_and_scores_zero(caplog):
    truth = {"a": squares(), "b": squares()}
    with caplog.at_level(logging.WARNING):
        table, summary = evaluate_labels(truth, {"a": truth["a"]})
    assert "1 of 2 images have no prediction (b)" in caplog.text
    row = table.set_index("image_id").loc["b"]
    assert row["dsb"] == 0.0 and row["n_pred"] == 0 and bool(row["missing"])
    assert summary["n_missing_predictions"] == 1
    assert summary["overall"]["dsb"] == pytest.approx(0.5)


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(NucleisegError, match="image a has shape"):
        evaluate_labels({"a": squares()}, {"a": np.zeros((5, 5), int)})


def test_empty_truth_and_empty_prediction_is_perfect():
    ev = Evaluator()
    row = ev.add("e", np.zeros((8, 8), int), np.zeros((8, 8), int))
    assert row["dsb"] == 1.0


# ------------------------------------------------------------------ report
def test_overlay_outlines_draws_inner_boundaries():
    labels = squares((10, 10), ((1, 1, 5, 5), (1, 5, 5, 9)))  # touching pair
    out = overlay_outlines(np.zeros((10, 10), np.uint8), labels)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    lit = out.sum(axis=-1) > 0
    assert lit[1, 4] and lit[1, 5]  # both sides of the contact are outlined
    assert not lit[3, 2] and tuple(out[1, 4]) != tuple(out[1, 5])  # interior untouched; one colour per nucleus


def test_write_report_files(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"image_{i:02d}" for i in range(8)]
    truth = {i: squares() for i in ids}
    pred = {i: squares(boxes=((2, 2, 8, 8 + k % 4),)) for k, i in enumerate(ids)}
    images = {i: rng.integers(0, 255, (20, 30, 3), dtype=np.uint8) for i in ids}
    table, summary = evaluate_labels(truth, pred, kinds={i: "fluorescence" for i in ids})
    paths = write_report(tmp_path / "out", table, summary, images, truth, pred)
    assert paths["report"].read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads(paths["summary"].read_text())["n_images"] == 8
    assert pd.read_csv(paths["per_image"])["image_id"].tolist() == ids
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["per_image.csv", "report.png", "summary.json"]
    # a single image (best == worst) and no image panels at all both work
    one_table, one_summary = evaluate_labels({"a": truth[ids[0]]}, {"a": truth[ids[0]]})
    write_report(tmp_path / "one", one_table, one_summary, {"a": images[ids[0]]}, {"a": truth[ids[0]]}, {})
    write_report(tmp_path / "bare", one_table, one_summary)
    assert (tmp_path / "bare" / "report.png").read_bytes()[:8] == PNG_SIGNATURE


def test_format_summary_lists_kinds():
    _, summary = evaluate_labels({"a": squares()}, {"a": squares()}, kinds={"a": "tissue"})
    text = format_summary(summary)
    assert text.splitlines()[1].startswith("all") and "tissue" in text
    assert "under 3 images: no figure" in text  # one tissue image: no score of its own
    truth = {k: squares() for k in "abc"}
    _, summary = evaluate_labels(truth, truth, kinds=dict.fromkeys("abc", "tissue"))
    assert "no figure" not in format_summary(summary) and "tissue" in format_summary(summary)


# ------------------------------------------------------------------ the command
def test_find_prediction_names(tmp_path):
    (tmp_path / "x_labels.tif").write_bytes(b"")
    (tmp_path / "y.png").write_bytes(b"")
    assert find_prediction(tmp_path, "x").name == "x_labels.tif"
    assert find_prediction(tmp_path, "y").name == "y.png"
    assert find_prediction(tmp_path, "z") is None
    # predict writes its labels beside the image when the output folder is the input folder: the labels win
    (tmp_path / "x.png").write_bytes(b"")
    assert find_prediction(tmp_path, "x").name == "x_labels.tif"


def test_cli_evaluate_labels_end_to_end(tmp_path, capsys, caplog, synthetic_cache):
    from nucleiseg.io import write_labels_tiff, write_png

    cache, truth = synthetic_cache(tmp_path)
    preds = tmp_path / "preds"
    preds.mkdir()
    write_labels_tiff(preds / "img0_labels.tif", truth["img0"])  # as 'nucleiseg predict' names it
    write_png(preds / "img1.png", truth["img1"].astype(np.uint8))
    wrong = truth["img2"].copy()
    wrong[wrong == 2] = 0  # one of three nuclei missed
    write_labels_tiff(preds / "img2.tif", wrong)
    # img3: no prediction

    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        rc = cli.main(["evaluate", str(cache), "--labels", str(preds), "--split", "all", "--out", str(out)])
    assert rc == 0
    assert "no predicted labels for 1 of 4 images" in caplog.text and "img3" in caplog.text
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].split()[:3] == ["kind", "images", "DSB"]
    table = pd.read_csv(out / "per_image.csv").set_index("image_id")
    assert table.loc["img0", "dsb"] == 1.0 and table.loc["img1", "dsb"] == 1.0
    assert table.loc["img2", "dsb"] == pytest.approx(2 / 3)
    assert table.loc["img3", "dsb"] == 0.0 and bool(table.loc["img3", "missing"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["dsb"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    assert summary["evaluated"]["split"] == "all" and summary["n_missing_predictions"] == 1
    assert (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE


def test_cli_evaluate_user_errors(tmp_path, capsys, synthetic_cache):
    from nucleiseg.io import write_labels_tiff

    cache, truth = synthetic_cache(tmp_path, n=2)
    (tmp_path / "small").mkdir()
    write_labels_tiff(tmp_path / "small" / "img0_labels.tif", truth["img0"][:20])
    rc = cli.main(["evaluate", str(cache), "--labels", str(tmp_path / "small"), "--split", "all",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "img0_labels.tif: labels of 20x48 pixels, but image img0 is 40x48" in err[0]
    rc = cli.main(["evaluate", str(cache), "--labels", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "prediction folder not found" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    rc = cli.main(["evaluate", str(cache), "--labels", str(tmp_path / "empty"), "--split", "all",
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "no predicted labels for any of the 2 images" in capsys.readouterr().err
    rc = cli.main(["evaluate", str(tmp_path / "empty"), "--labels", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a prepared cache" in capsys.readouterr().err
    rc = cli.main(["evaluate", str(cache), "--labels", str(tmp_path / "empty"), "--tta", "--out", str(tmp_path / "o")])
    assert rc == 2 and "go with --model" in capsys.readouterr().err


def test_cli_evaluate_model(tmp_path, capsys, synthetic_cache):
    pytest.importorskip("nucleiseg.inference")
    import torch

    from nucleiseg.models import UNetPlusPlus, save_model

    cache, _ = synthetic_cache(tmp_path, n=2)
    torch.manual_seed(0)
    model_path = tmp_path / "tiny.safetensors"
    save_model(model_path, UNetPlusPlus(widths=(4, 8, 16)).eval())
    out = tmp_path / "eval"
    rc = cli.main(["-q", "evaluate", str(cache), "--model", str(model_path), "--split", "all", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out / "per_image.csv")
    assert {"auc", "dsb_cc", "dsb"} <= set(table.columns) and len(table) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert "dsb_cc" in summary["overall"] and summary["evaluated"]["mode"] == "accurate"
    assert "DSB(cc)" in capsys.readouterr().out
