"""How much of a kind's validation score is owed to choosing its thresholds on the same images?

    .venv/bin/python benchmarks/threshold_bias.py cache/dsb2018 [--kind tissue] [--model default]

``nucleiseg tune`` picks a kind's own post-processing thresholds on the validation images of that
kind, and ``nucleiseg evaluate`` then scores the same images: a small optimistic bias, largest for
a kind with few images (9 stained-tissue images in DSB2018's validation split). This script
predicts the kind's validation and training images once (bf16) and prints the kind's mean
validation DSB score three ways:

- with the model's stored thresholds for the kind (what ``evaluate`` reports);
- leave-one-out: each validation image scored with the thresholds best on the other validation
  images of its kind;
- with the thresholds best on the kind's *training* images (also printed: the training images'
  own score, which tells over-fitting apart from a hard kind).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from nucleiseg.inference import load_model, predict_probabilities
from nucleiseg.postprocess import PostprocessParams
from nucleiseg.training import load_split
from nucleiseg.tuning import _key, best_of_grid, score_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--kind", default="tissue")
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    args = parser.parse_args()
    model = load_model(None if args.model in (None, "default") else args.model)
    channels = list(model.channels)
    stored = PostprocessParams.from_dict(
        model.metadata.get("postprocess_by_kind", {}).get(args.kind, model.metadata.get("postprocess", {})))

    def scores(split: str) -> tuple[list[tuple], np.ndarray]:
        data = load_split(args.cache, split)
        chosen = [i for i, kind in enumerate(data.kinds) if kind == args.kind]
        probs = [predict_probabilities(model, data.images[i], precision="bf16") for i in chosen]
        print(f"{len(chosen)} {split} images of kind {args.kind}", flush=True)
        return score_grid(probs, [data.labels[i] for i in chosen], channels)

    combos, val = scores("val")
    print(f"validation DSB with the stored thresholds ({stored}): {val[:, combos.index(_key(stored)), 0].mean():.3f}")
    left_out = [val[k, combos.index(_key(best_of_grid(combos, np.delete(val, k, axis=0))[0])), 0] for k in range(len(val))]
    print(f"validation DSB, leave-one-out thresholds: {np.mean(left_out):.3f} (per image: "
          + ", ".join(f"{x:.3f}" for x in left_out) + ")")
    _, train = scores("train")
    best, table = best_of_grid(combos, train)
    print(f"thresholds best on the training images ({best}): training DSB {table['dsb'].iloc[0]:.3f} "
          f"({train[:, combos.index(_key(stored)), 0].mean():.3f} with the stored ones)")
    print(f"validation DSB with them: {val[:, combos.index(_key(best)), 0].mean():.3f}")


if __name__ == "__main__":
    main()
