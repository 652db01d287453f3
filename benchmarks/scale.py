"""Does resizing images to the training nuclei's size (``--scale`` / ``--diameter``) help?

    .venv/bin/python benchmarks/scale.py cache/dsb2018 [--magnified cache/mag2] [--model default]

Two measurements with one model and its own thresholds (sizes scaled with the image, as ``segment`` does):

1. **Within the training range.** Each validation image of CACHE is predicted as is, and resized so that
   its annotated nuclei's median equivalent diameter becomes the model's training diameter (18 px for the
   shipped model; the factor kept within 0.5-2). This is the best any diameter estimate could do.
2. **Outside it** (with ``--magnified``). A cache of the validation images enlarged twice
   (``benchmarks/magnified_slice.py``, then ``nucleiseg prepare``; all its images are scored) is
   predicted as is and at scale 0.5.

Both sets are also predicted with ``scale="auto"`` (``--diameter auto``: the scale read from a first pass).

Prints the mean DSB score overall and per image kind for each variant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from nucleiseg.inference import load_model, predict_labels
from nucleiseg.measure import median_diameter
from nucleiseg.metrics import dsb_score
from nucleiseg.training import load_split


def score(model, splits, scale_of, precision: str, name: str) -> list[dict]:
    """Each image of ``splits`` (from ``load_split``) predicted at ``scale_of(its labels)``."""
    rows = []
    for split in splits:
        for kind, image, truth in zip(split.kinds, split.images, split.labels):
            _, labels, scale = predict_labels(model, image, model.postprocess_for(image),
                                             scale=scale_of(truth), precision=precision)
            rows.append({"variant": name, "kind": kind, "scale": scale, "dsb": dsb_score(truth, labels)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path, help="a prepared cache (nucleiseg prepare); its validation split is used")
    parser.add_argument("--magnified", type=Path, default=None, help="a prepared cache of 2x enlarged images")
    parser.add_argument("--model", default="default", help="model file (default: the shipped model)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    args = parser.parse_args()
    model = load_model(args.model)
    trained = model.nucleus_diameter
    val = [load_split(args.cache, "val")]  # read once, predicted three ways
    rows = score(model, val, lambda truth: 1.0, args.precision, "validation, as is")
    rows += score(model, val, lambda truth: float(np.clip(trained / median_diameter(truth), 0.5, 2.0)),
                  args.precision, f"validation, nuclei resized to {trained:g} px")
    rows += score(model, val, lambda truth: "auto", args.precision, "validation, --diameter auto")
    if args.magnified is not None:
        enlarged = [load_split(args.magnified, split) for split in ("train", "val")]  # all its images
        rows += score(model, enlarged, lambda truth: 1.0, args.precision, "2x enlarged, as is")
        rows += score(model, enlarged, lambda truth: 0.5, args.precision, "2x enlarged, scale 0.5")
        rows += score(model, enlarged, lambda truth: "auto", args.precision, "2x enlarged, --diameter auto")
    scores = pd.DataFrame(rows)
    print(f"DSB score, model {args.model}, {args.precision}")
    summary = scores.groupby("variant", sort=False).agg(images=("dsb", "size"), dsb=("dsb", "mean"),
                                                         resized=("scale", lambda s: int((s != 1.0).sum())))
    print(summary.round(3).to_string())
    print(scores.pivot_table(index="kind", columns="variant", values="dsb", sort=False).round(3).to_string())


if __name__ == "__main__":
    main()
