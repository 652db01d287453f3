"""The finishing stage of ``predict``, piece by piece, against what it replaced; and the network's cost by tile side.

Run from the repository root (about 3 minutes on 2 cores; needs the DSB 2018 images):

    .venv/bin/python benchmarks/finishing_speed.py [--images 40] [--rounds 3] [--sides 256 976 1504 1760]
        [--workers-images 0] [--json OUT]

Each line times the replaced code and the current one on the same inputs, best of ``--rounds``:

- measurements: ``skimage.measure.regionprops_table`` (as ``measure_nuclei`` called it before) against
  :func:`nucleiseg.measure.measure_nuclei`, on the annotated labels of the first ``--images`` DSB images,
  with the largest difference per column;
- outlines: two ``skimage.segmentation.find_boundaries`` calls (inner and outer) against
  :func:`nucleiseg.io.label_edges`, same labels, checked equal;
- relabelling: ``skimage.segmentation.relabel_sequential`` against :func:`nucleiseg.postprocess.relabel` on a
  4096² image of 40,000 labels, checked equal;
- grey levels: a float32 copy and ``np.dot`` against :func:`nucleiseg.measure.grey_image` (256² RGB);
- PNG: the overlays of 32 256² DSB crops (shipped model, fast mode) encoded by Pillow at zlib levels 3 and 6
  (Pillow's default) against :func:`nucleiseg.io.encode_png` at levels 1, 2 and 3 (the current
  :data:`nucleiseg.io.PNG_COMPRESS_LEVEL`), ms per image and bytes, its files checked to decode to the overlay;
- intensity percentiles: ``np.percentile`` of a float32 copy (as ``normalize`` took them before) against
  :func:`nucleiseg.preprocess.byte_percentiles` on the same crops, checked equal;
- the watershed: ``skimage.segmentation.watershed`` over the whole foreground against
  :func:`nucleiseg.postprocess.flood` given the regions (only regions of several markers flooded), on the
  crops' probabilities with the model's thresholds, checked equal;
- the network's seconds per megapixel by input side (accurate mode, bf16 where the CPU has it, batch 1),
  the sides interleaved in each round;
- with ``--workers-images N``: ``predict_files`` on N 256² crops, one image at a time against 2 image
  workers, accurate mode, two interleaved rounds.
"""

from __future__ import annotations

import argparse
import io as pyio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import DATA_CANDIDATES, ROOT, autocast, dsb_crops, machine  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))


def best_of(rounds: int, fn: Callable[[], Any]) -> float:
    """The shortest of ``rounds`` timings of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def dsb_labels(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, annotated instance labels) of the first ``count`` DSB images."""
    from nucleiseg.io import read_image

    root = next((p for p in DATA_CANDIDATES if p.is_dir()), None)
    if root is None:
        raise SystemExit(f"DSB 2018 stage1_train not found under {DATA_CANDIDATES}")
    out = []
    for sample in sorted(root.iterdir())[:count]:
        image = read_image(next((sample / "images").glob("*.png")))
        labels = np.zeros(image.shape[:2], np.int32)
        for k, mask in enumerate(sorted((sample / "masks").glob("*.png"))):
            labels[read_image(mask) > 0] = k + 1
        out.append((image, labels))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch
    from PIL import Image
    from skimage.measure import regionprops_table
    from skimage.segmentation import find_boundaries, relabel_sequential

    from nucleiseg.device import resolve_precision, reuse_freed_memory
    from nucleiseg.inference import load_model, resolve_prune_level, segment
    from skimage.segmentation import watershed

    from nucleiseg.io import PNG_COMPRESS_LEVEL, draw_overlay, encode_png, label_edges
    from nucleiseg.measure import _PROPERTIES, grey_image, measure_nuclei
    from nucleiseg.postprocess import (
        boundary_probability,
        flood,
        foreground_regions,
        relabel,
        seed_map,
        seed_markers,
        seed_orphans,
    )
    from nucleiseg.preprocess import byte_percentiles, to_rgb_uint8

    reuse_freed_memory()  # as predict and train do on a CPU (NUCLEISEG_MALLOC=system: glibc's own behaviour)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40, help="DSB images whose annotations are measured")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 976, 1504, 1760])
    parser.add_argument("--workers-images", type=int, default=0, help="also time --workers 2 on this many crops")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    say = lambda text="": print(text, flush=True)  # noqa: E731
    results: dict[str, Any] = {"machine": machine()}
    say(f"# finishing speed: {results['machine']}")

    pairs = dsb_labels(args.images)
    properties = ("label", "area", "centroid", "bbox", "equivalent_diameter_area", "eccentricity", "intensity_mean")
    old = best_of(args.rounds, lambda: [regionprops_table(lab, intensity_image=grey_image(im), properties=properties)
                                        for im, lab in pairs])
    new = best_of(args.rounds, lambda: [measure_nuclei(lab, im) for im, lab in pairs])
    worst: dict[str, float] = {}
    for im, lab in pairs:
        table = measure_nuclei(lab, im)
        ref = regionprops_table(lab, intensity_image=grey_image(im), properties=properties)
        for key, column in _PROPERTIES.items():
            d = np.abs(table[column].to_numpy(float) - ref[key]) / np.maximum(1, np.abs(ref[key]))
            worst[column] = max(worst.get(column, 0.0), float(d.max(initial=0)))
    results["measure"] = {"regionprops_s": old, "measure_nuclei_s": new, "max_relative_difference": worst}
    say(f"measurements, {len(pairs)} label images: regionprops_table {old:.3f} s, measure_nuclei {new:.3f} s "
        f"({old / new:.1f}x); largest relative difference {max(worst.values()):.1e} ({max(worst, key=worst.get)})")

    old = best_of(args.rounds, lambda: [(find_boundaries(lab, mode="inner"), find_boundaries(lab, mode="outer"))
                                        for _, lab in pairs])
    new = best_of(args.rounds, lambda: [label_edges(lab) for _, lab in pairs])
    same = all(np.array_equal(label_edges(lab) & (lab != 0), find_boundaries(lab, mode="inner")) for _, lab in pairs)
    results["edges"] = {"find_boundaries_s": old, "label_edges_s": new, "equal": same}
    say(f"outlines: find_boundaries x2 {old:.3f} s, label_edges {new:.3f} s ({old / new:.0f}x), equal: {same}")

    rng = np.random.default_rng(0)
    big = (rng.integers(0, 40000, (4096, 4096)) * (rng.random((4096, 4096)) < 0.3)).astype(np.int32)
    old = best_of(args.rounds, lambda: relabel_sequential(big)[0].astype(np.int32))
    new = best_of(args.rounds, lambda: relabel(big))
    same = bool(np.array_equal(relabel(big), relabel_sequential(big)[0]))
    results["relabel"] = {"relabel_sequential_s": old, "relabel_s": new, "equal": same}
    say(f"relabelling 4096²: relabel_sequential {old:.3f} s, relabel {new:.3f} s ({old / new:.1f}x), equal: {same}")
    del big

    rgb = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    weights = np.asarray((0.2125, 0.7154, 0.0721), np.float32)
    old = best_of(args.rounds, lambda: [np.dot(rgb.astype(np.float32), weights) for _ in range(100)]) / 100
    new = best_of(args.rounds, lambda: [grey_image(rgb) for _ in range(100)]) / 100
    results["grey"] = {"dot_ms": old * 1e3, "grey_image_ms": new * 1e3}
    say(f"grey levels 256² RGB: float32 copy + np.dot {old * 1e3:.2f} ms, grey_image {new * 1e3:.2f} ms")

    model = load_model(None, "cpu")
    crops = dsb_crops(32, 256)
    segmentations = [segment(c, model, mode="fast") for c in crops]
    overlays = [draw_overlay(to_rgb_uint8(c), s.labels) for c, s in zip(crops, segmentations)]
    results["png"] = {}
    for name, level in (("Pillow", 3), ("Pillow", 6), ("encode_png", 1), ("encode_png", 2),
                        ("encode_png", PNG_COMPRESS_LEVEL)):
        sizes = []

        def encode(name: str = name, level: int = level) -> None:
            sizes.clear()
            for overlay in overlays:
                if name == "Pillow":
                    buffer = pyio.BytesIO()
                    Image.fromarray(overlay).save(buffer, format="PNG", compress_level=level)
                    sizes.append(len(buffer.getvalue()))
                else:
                    sizes.append(len(b"".join(encode_png(overlay, level))))

        seconds = best_of(args.rounds, encode) / len(overlays)
        results["png"][f"{name} {level}"] = {"ms": seconds * 1e3, "bytes": float(np.mean(sizes))}
        say(f"PNG overlay 256², {name} at zlib level {level}: {seconds * 1e3:.1f} ms, {np.mean(sizes) / 1e3:.1f} kB")
    same = all(np.array_equal(np.asarray(Image.open(pyio.BytesIO(b"".join(encode_png(o))))), o) for o in overlays)
    results["png"]["decodes_equal"] = same
    say(f"  encode_png's files decode to the overlays: {same}")

    old = best_of(args.rounds, lambda: [np.percentile(c.astype(np.float32) / 255.0, (1.0, 99.8)) for c in crops])
    new = best_of(args.rounds, lambda: [byte_percentiles(c, (1.0, 99.8)) for c in crops])
    same = all(byte_percentiles(c, (1.0, 99.8)) == tuple(np.percentile(c.astype(np.float32) / 255.0, (1.0, 99.8)))
               for c in crops)
    results["percentiles"] = {"np_percentile_ms": old / len(crops) * 1e3, "byte_percentiles_ms": new / len(crops) * 1e3,
                              "equal": same}
    say(f"percentiles 256² RGB: np.percentile of a float copy {old / len(crops) * 1e3:.2f} ms, byte_percentiles "
        f"{new / len(crops) * 1e3:.2f} ms, equal: {same}")

    steps = []
    for crop, segmentation in zip(crops, segmentations):
        params = model.postprocess_for(crop)
        probs = segmentation.probabilities
        body = probs[0]
        foreground, regions, n = foreground_regions(body, params.foreground_threshold)
        seeds = seed_map(body, boundary_probability(probs, model.channels))
        markers = seed_orphans(seed_markers(seeds, foreground, params.seed_threshold, params.min_seed_size), regions, n)
        steps.append((body, markers, foreground, regions, n))
    old = best_of(args.rounds, lambda: [watershed(-b, m, mask=f) for b, m, f, _, _ in steps])
    new = best_of(args.rounds, lambda: [flood(b, m, f, r, n) for b, m, f, r, n in steps])
    same = all(np.array_equal(watershed(-b, m, mask=f), flood(b, m, f, r, n)) for b, m, f, r, n in steps)
    results["flood"] = {"watershed_ms": old / len(steps) * 1e3, "flood_ms": new / len(steps) * 1e3, "equal": same}
    say(f"watershed 256²: over the whole foreground {old / len(steps) * 1e3:.2f} ms, flood by regions "
        f"{new / len(steps) * 1e3:.2f} ms, equal: {same}")

    level = resolve_prune_level(model.depth, model.metadata, "accurate")
    bf16 = resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    per_side: dict[int, list[float]] = {side: [] for side in args.sides}
    for _ in range(args.rounds):
        for side in args.sides:
            x = torch.rand(1, 3, side, side).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast(bf16, "cpu"):
                model.network.predict_proba(x[..., :64, :64], prune_level=level)  # warm-up
                seconds = best_of(2 if side < 1500 else 1, lambda: model.network.predict_proba(x, prune_level=level))
            per_side[side].append(seconds / (side * side / 1e6))
    results["network_s_per_mpixel"] = per_side
    say("network, accurate, s/Mpixel by input side (each round): "
        + "; ".join(f"{side}: " + ", ".join(f"{v:.2f}" for v in values) for side, values in per_side.items()))

    if args.workers_images:
        from nucleiseg.batch import predict_files
        from nucleiseg.io import write_png

        tmp = Path(tempfile.mkdtemp(prefix="nucleiseg-finishing-"))
        try:
            folder = tmp / "in"
            folder.mkdir()
            for k, crop in enumerate(dsb_crops(args.workers_images, 256)):
                write_png(folder / f"img{k:04d}.png", crop)
            runs: dict[int, list[float]] = {0: [], 2: []}
            for round_ in range(2):
                for workers in (0, 2):
                    t0 = time.perf_counter()
                    predict_files([folder], tmp / f"out{round_}-{workers}", model=model, options={"mode": "accurate"},
                                  progress=False, say=lambda kind, text: None, workers=workers)
                    runs[workers].append(args.workers_images / (time.perf_counter() - t0))
            results["workers"] = runs
            say(f"predict_files, {args.workers_images} crops, accurate, images/s per round: one at a time "
                + ", ".join(f"{v:.2f}" for v in runs[0]) + "; 2 image workers " + ", ".join(f"{v:.2f}" for v in runs[2]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
