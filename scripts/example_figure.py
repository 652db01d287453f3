"""Rebuild docs/images/example.png, the README's picture, from `nucleiseg predict`'s overlays.

    nucleiseg predict examples/images -o results/
    .venv/bin/python scripts/example_figure.py results/ docs/images/example.png

Joins the overlays of the three example images (fluorescence, tissue, brightfield), each scaled to
300 pixels high, side by side with white gaps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from nucleiseg.io import read_image, write_png

NAMES = ("fluorescence", "tissue", "brightfield")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="the folder `nucleiseg predict` wrote")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--gap", type=int, default=6)
    args = parser.parse_args()
    panels = []
    for name in NAMES:
        overlay = read_image(args.results / f"{name}_overlay.png")[..., :3]
        width = round(overlay.shape[1] * args.height / overlay.shape[0])
        panels.append(cv2.resize(overlay, (width, args.height), interpolation=cv2.INTER_AREA))
        panels.append(np.full((args.height, args.gap, 3), 255, np.uint8))
    figure = np.concatenate(panels[:-1], axis=1)
    write_png(args.out, figure)
    print(f"wrote {args.out} ({figure.shape[1]} x {figure.shape[0]})")


if __name__ == "__main__":
    main()
