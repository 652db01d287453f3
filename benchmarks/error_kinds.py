"""What becomes of each annotated nucleus: found, merged with a neighbour, missed, split or cut short?

    .venv/bin/python benchmarks/error_kinds.py cache/dsb2018 [--model default] [--kind tissue]

Predicts the validation split of a prepared cache with a model and its own thresholds, and sorts every
annotated nucleus by what the prediction made of it:

- found: a predicted nucleus overlaps it with IoU > 0.5 (a match at the DSB score's first threshold);
- missed: predicted nuclei cover less than 30% of it;
- merged: its best-overlapping prediction also covers 30% or more of another annotated nucleus;
- split: two or more predictions each cover 20% or more of it;
- partial: anything else (one prediction, too small or too large for IoU 0.5).

With each kind's mean DSB, AP@0.5, AP@0.9 (the boundary: matches that must overlap by 90%) and the mean
IoU of the nuclei found (``found_iou``, how tight their outlines are). ``--kind tissue --only-kind``
predicts the tissue images alone; ``--shared-thresholds`` ignores the model's per-kind thresholds.
Prints the counts per image kind (and per image with ``--kind``): the measurement behind "merges, not
misses, cost stained tissue its score" in docs/model-card.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from nucleiseg.inference import load_model, predict_labels
from nucleiseg.metrics import instance_scores
from nucleiseg.training import load_split

OUTCOMES = ("found", "merged", "missed", "split", "partial")


def outcomes(truth: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """Counts of ``OUTCOMES`` over the annotated nuclei of one image."""
    n_true, n_pred = int(truth.max()), int(pred.max())
    overlap = np.zeros((n_true + 1, n_pred + 1), np.int64)
    np.add.at(overlap, (truth.ravel(), pred.ravel()), 1)
    true_area, pred_area = overlap.sum(1), overlap.sum(0)
    counts = dict.fromkeys(OUTCOMES, 0)
    for t in range(1, n_true + 1):
        if true_area[t] == 0:
            continue
        row = overlap[t, 1:]
        if row.sum() < 0.3 * true_area[t]:
            counts["missed"] += 1
            continue
        best = int(row.argmax()) + 1
        iou = overlap[t, best] / (true_area[t] + pred_area[best] - overlap[t, best])
        if iou > 0.5:
            counts["found"] += 1
        elif (overlap[1:, best] >= 0.3 * np.maximum(true_area[1:], 1)).sum() >= 2:
            counts["merged"] += 1
        elif (row >= 0.2 * true_area[t]).sum() >= 2:
            counts["split"] += 1
        else:
            counts["partial"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path, help="a prepared cache (nucleiseg prepare); its validation split is used")
    parser.add_argument("--model", default="default", help="model file (default: the shipped model)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--kind", default=None, help="also list the images of this kind one by one")
    parser.add_argument("--only-kind", action="store_true", help="predict only the images of --kind")
    parser.add_argument("--shared-thresholds", action="store_true",
                        help="use the model's shared thresholds for every kind (not its per-kind ones)")
    args = parser.parse_args()
    model = load_model(args.model)
    val = load_split(args.cache, "val")
    rows = []
    for image_id, kind, image, truth in zip(val.ids, val.kinds, val.images, val.labels):
        if args.only_kind and kind != args.kind:
            continue
        params = model.postprocess if args.shared_thresholds else model.postprocess_for(image)
        _, pred, _ = predict_labels(model, image, params, precision=args.precision)
        scores = instance_scores(truth, pred)
        rows.append({"image": image_id[:8], "kind": kind, "nuclei": int(truth.max()), "predicted": int(pred.max()),
                     **outcomes(truth, pred), "dsb": scores.score, "ap50": scores.ap50,
                     "ap90": float(scores.precision_per_threshold[np.isclose(scores.thresholds, 0.9)][0]), "found_iou": found_iou(truth, pred)})
    counts = pd.DataFrame(rows)
    columns = ["nuclei", "predicted", *OUTCOMES]
    print(f"annotated nuclei by outcome, validation split, model {args.model}, {args.precision}"
          + (", shared thresholds" if args.shared_thresholds else ""))
    table = counts.groupby("kind")[columns].sum()
    means = counts.groupby("kind")[["dsb", "ap50", "ap90", "found_iou"]].mean()
    print(table.join(means).to_string(float_format="%.3f"))
    if args.kind:
        print(counts[counts["kind"] == args.kind][["image", *columns, "dsb", "ap50", "ap90", "found_iou"]]
              .to_string(index=False, float_format="%.3f"))


def found_iou(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean IoU of the annotated nuclei found (IoU > 0.5) with their prediction: how tight the outlines are."""
    n_true, n_pred = int(truth.max()), int(pred.max())
    overlap = np.zeros((n_true + 1, n_pred + 1), np.int64)
    np.add.at(overlap, (truth.ravel(), pred.ravel()), 1)
    inter = overlap[1:, 1:]
    union = overlap.sum(1)[1:, None] + overlap.sum(0)[None, 1:] - inter
    iou = inter / np.maximum(union, 1)
    best = iou.max(axis=1) if iou.size else np.zeros(0)
    found = best[best > 0.5]
    return float(found.mean()) if found.size else float("nan")


if __name__ == "__main__":
    main()
