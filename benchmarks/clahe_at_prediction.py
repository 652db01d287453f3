"""Does CLAHE, the reference notebook's preprocessing, help at prediction time?

    .venv/bin/python benchmarks/clahe_at_prediction.py cache/dsb2018 [--model default]

Scores the validation split of a prepared cache twice with the same model and its own thresholds:
as is, and after CLAHE on the Lab lightness channel (clip limit 2, 8 x 8 tiles). Prints the mean
DSB score overall and per image kind. nucleiseg uses CLAHE only as a training augmentation; this
script is the measurement behind that choice (docs/model-card.md, "Training").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from nucleiseg.inference import label_nuclei, load_model, predict_probabilities
from nucleiseg.metrics import dsb_score
from nucleiseg.training import load_split


def clahe_lightness(rgb: np.ndarray, clip_limit: float, tiles: int) -> np.ndarray:
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path, help="a prepared cache (nucleiseg prepare)")
    parser.add_argument("--model", default="default", help="model file (default: the shipped model)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--clip-limit", type=float, default=2.0)
    parser.add_argument("--tiles", type=int, default=8)
    args = parser.parse_args()
    model = load_model(args.model)
    val = load_split(args.cache, "val")  # cached images are 8-bit RGB
    rows = []
    for kind, rgb, truth in zip(val.kinds, val.images, val.labels):
        params = model.postprocess_for(rgb)  # the kind's thresholds, read from the original pixels
        for name, image in (("as is", rgb), ("CLAHE", clahe_lightness(rgb, args.clip_limit, args.tiles))):
            probs = predict_probabilities(model, image, precision=args.precision)
            rows.append({"input": name, "kind": kind, "dsb": dsb_score(truth, label_nuclei(probs, model.channels, params))})
    scores = pd.DataFrame(rows)
    print(f"validation DSB, {len(val.ids)} images, model {args.model}, {args.precision}")
    print(scores.groupby("input")["dsb"].mean().round(3).to_string())
    print(scores.pivot_table(index="kind", columns="input", values="dsb").round(3).to_string())


if __name__ == "__main__":
    main()
