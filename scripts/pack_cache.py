"""Pack a prepared cache into one compact file, and unpack it on another machine.

    .venv/bin/python scripts/pack_cache.py pack cache/dsb2018 packed/dsb2018.zip
    python scripts/pack_cache.py unpack packed/dsb2018.zip /tmp/cache

A cache holds PNG images, PNG masks and uncompressed label TIFFs (232 MB for DSB2018 stage1_train). The
packed zip file keeps only what the cache cannot rebuild: each image as lossless WebP (grey images once,
not three times; ``grey.json`` lists them) and each label image as a 16-bit PNG, plus ``index.csv``,
``split.csv`` and ``manifest.json``; masks are rebuilt from the labels on unpacking (35 MB for
DSB2018). Packing checks that every image decodes to the same pixels. The seventh session used it
to carry the cache to a lent GPU machine that accepts at most 64 MiB of files (docs/model-card.md).
"""

from __future__ import annotations

import argparse
import json
import zipfile
from multiprocessing import Pool
from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np
import tifffile

TABLES = ("index.csv", "split.csv", "manifest.json")


def pack(cache: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    grey_ids = []
    archive = zipfile.ZipFile(out, "w", zipfile.ZIP_STORED)  # WebP and PNG are compressed already
    paths = sorted((cache / "images").glob("*.png"))
    for path in sorted((cache / "images").glob("*.png")):
        image = iio.imread(path)
        grey = image.ndim == 3 and bool((image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all())
        if grey:
            image = image[..., 0]
        labels = tifffile.imread(cache / "labels" / f"{path.stem}.tif")
        if labels.max() >= 2**16:
            raise SystemExit(f"{path.stem}: more than 65535 nuclei, which a 16-bit PNG cannot hold")
        ok, image_bytes = cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, 101])  # 101 = lossless
        back = cv2.imdecode(image_bytes, cv2.IMREAD_UNCHANGED)
        if not ok or not np.array_equal(back[..., 0] if grey else back, image):
            raise SystemExit(f"{path}: lossless WebP did not give the same pixels back")
        ok, label_bytes = cv2.imencode(".png", labels.astype(np.uint16), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        archive.writestr(f"images/{path.stem}.webp", image_bytes.tobytes())
        archive.writestr(f"labels/{path.stem}.png", label_bytes.tobytes())
        if grey:
            grey_ids.append(path.stem)
    archive.writestr("grey.json", json.dumps(grey_ids))
    for name in TABLES:
        archive.write(cache / name, name)
    archive.close()
    print(f"packed {len(paths)} images into {out} ({out.stat().st_size / 1e6:.1f} MB)")


def _unpack_one(packed: Path, cache: Path, stem: str, grey: bool) -> None:
    with zipfile.ZipFile(packed) as archive:
        image_bytes, label_bytes = archive.read(f"images/{stem}.webp"), archive.read(f"labels/{stem}.png")
    image = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_UNCHANGED)
    if grey:
        image = np.repeat(image[..., :1], 3, axis=2)
    labels = cv2.imdecode(np.frombuffer(label_bytes, np.uint8), cv2.IMREAD_UNCHANGED)
    iio.imwrite(cache / "images" / f"{stem}.png", image)
    iio.imwrite(cache / "masks" / f"{stem}.png", np.where(labels > 0, 255, 0).astype(np.uint8))
    tifffile.imwrite(cache / "labels" / f"{stem}.tif", labels)


def unpack(packed: Path, cache: Path) -> None:
    for folder in ("images", "labels", "masks"):
        (cache / folder).mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(packed) as archive:
        grey = set(json.loads(archive.read("grey.json")))
        stems = [Path(name).stem for name in archive.namelist() if name.startswith("images/")]
        for name in TABLES:
            (cache / name).write_bytes(archive.read(name))
    with Pool() as pool:
        pool.starmap(_unpack_one, [(packed, cache, stem, stem in grey) for stem in stems])
    print(f"unpacked {len(stems)} images into {cache}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("source", type=Path, help="the cache (pack) or the packed file (unpack)")
    parser.add_argument("target", type=Path, help="the packed file to write (pack) or the cache folder (unpack)")
    args = parser.parse_args()
    (pack if args.action == "pack" else unpack)(args.source, args.target)


if __name__ == "__main__":
    main()
