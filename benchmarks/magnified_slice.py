"""Make the fine-tuning example's data: the validation images at 2x magnification (simulated).

    .venv/bin/python benchmarks/magnified_slice.py cache/dsb2018 my_annotations/

Writes the paired layout that ``nucleiseg prepare`` reads (``images/<id>.png`` + ``labels/<id>.tif``)
from the validation split of a prepared cache, which the shipped model never trained on: each image
enlarged twice (bicubic; labels nearest-neighbour) and cut to at most 768 x 768 pixels, as if taken with
an objective of twice the magnification. See docs/fine-tuning.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from nucleiseg.data.cache import read_cache
from nucleiseg.io import read_image, read_labels, write_labels_tiff, write_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path, help="a prepared cache (nucleiseg prepare)")
    parser.add_argument("out", type=Path, help="folder for images/ and labels/")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--max-side", type=int, default=768)
    args = parser.parse_args()
    table = read_cache(args.cache)
    table = table[table["split"] == "val"]
    for image_id in table["image_id"].astype(str):
        rgb = read_image(args.cache / "images" / f"{image_id}.png")
        labels = read_labels(args.cache / "labels" / f"{image_id}.tif")
        big = cv2.resize(rgb, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_CUBIC)
        big_labels = cv2.resize(labels.astype(np.uint16), None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_NEAREST)
        crop = (slice(0, args.max_side), slice(0, args.max_side))
        write_png(args.out / "images" / f"{image_id}.png", big[crop])
        write_labels_tiff(args.out / "labels" / f"{image_id}.tif", big_labels[crop])
    print(f"{len(table)} images written to {args.out}")


if __name__ == "__main__":
    main()
