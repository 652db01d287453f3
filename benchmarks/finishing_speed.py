"""The finishing stage of ``predict``, piece by piece, against what it replaced; and the network's cost by tile side.

Run from the repository root (about 3 minutes on 2 cores; needs the DSB 2018 images):

    .venv/bin/python benchmarks/finishing_speed.py [--images 40] [--rounds 3] [--sides 256 976 1504 1760]
        [--workers-images 0] [--large-png 0] [--json OUT]

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
  crops' probabilities with the model's thresholds, checked equal there and under three other threshold sets;
- ``normalize``'s stretch on a 2048² mosaic: the whole-image float temporaries it replaced against the
  in-place one, checked equal;
- the image-kind features on the DSB images: reductions over the channel axis against
  :func:`nucleiseg.data.kinds.kind_features` (channel by channel), checked equal;
- ``predict``'s finishing stage per 256² crop in fast mode: each step alone (labels, measurements, drawing,
  the PNGs, CSV, TIFF), then the whole ``_finish`` with its commit (wall and CPU time, and the time waited for
  the overlay's thread);
- with ``--large-png SIDE``: a SIDE x SIDE mosaic of the overlays encoded by Pillow and by ``encode_png``;
- the network's seconds per megapixel by input side (accurate mode, bf16 where the CPU has it, batch 1),
  the sides interleaved in each round;
- with ``--workers-images N``: ``predict_files`` on N 256² crops, one image at a time against 2 image
  workers, accurate mode, two interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
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
from inference_speed import DATA_CANDIDATES, ROOT, autocast, dsb_crops, machine, mosaic  # noqa: E402

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
    from nucleiseg.data.kinds import kind_features
    from nucleiseg.preprocess import byte_percentiles, normalize, to_rgb_uint8

    reuse_freed_memory()  # as predict and train do on a CPU (NUCLEISEG_MALLOC=system: glibc's own behaviour)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40, help="DSB images whose annotations are measured")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 976, 1504, 1760])
    parser.add_argument("--workers-images", type=int, default=0, help="also time --workers 2 on this many crops")
    parser.add_argument("--large-png", type=int, default=0, metavar="SIDE",
                        help="also encode a SIDE x SIDE mosaic of the overlays with Pillow and encode_png")
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

    def watershed_steps(fg: float | None = None, st: float | None = None, mss: int | None = None) -> list[tuple]:
        """The flood's inputs for every crop: the model's thresholds, or those given."""
        steps = []
        for crop, segmentation in zip(crops, segmentations):
            params = model.postprocess_for(crop)
            probs = segmentation.probabilities
            body = probs[0]
            foreground, regions, n = foreground_regions(body, params.foreground_threshold if fg is None else fg)
            seeds = seed_map(body, boundary_probability(probs, model.channels))
            markers = seed_markers(seeds, foreground, params.seed_threshold if st is None else st,
                                   params.min_seed_size if mss is None else mss)
            steps.append((body, seed_orphans(markers, regions, n), foreground, regions, n))
        return steps

    steps = watershed_steps()
    old = best_of(args.rounds, lambda: [watershed(-b, m, mask=f) for b, m, f, _, _ in steps])
    new = best_of(args.rounds, lambda: [flood(b, m, f, r, n) for b, m, f, r, n in steps])
    checked = [steps] + [watershed_steps(*t) for t in ((0.4, 0.3, 1), (0.5, 0.5, 5), (0.7, 0.8, 20))]
    same = all(np.array_equal(watershed(-b, m, mask=f), flood(b, m, f, r, n)) for c in checked for b, m, f, r, n in c)
    results["flood"] = {"watershed_ms": old / len(steps) * 1e3, "flood_ms": new / len(steps) * 1e3, "equal": same,
                        "floods_checked": sum(map(len, checked))}
    say(f"watershed 256²: over the whole foreground {old / len(steps) * 1e3:.2f} ms, flood by regions "
        f"{new / len(steps) * 1e3:.2f} ms, equal in {sum(map(len, checked))} floods (4 threshold sets): {same}")

    # normalize's stretch: the whole-image float temporaries it replaced, on a 2048² mosaic of DSB crops
    big_rgb = mosaic(2048, dsb_crops(64, 256))
    lo, hi = byte_percentiles(big_rgb[::2, ::2], (1.0, 99.8))

    def old_stretch() -> np.ndarray:
        out = np.clip((big_rgb.astype(np.float32) / 255.0 - lo) * (1.0 / max(hi - lo, 1e-2)), -0.5, 1.5)
        return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)

    old = best_of(args.rounds, old_stretch)
    new = best_of(args.rounds, lambda: normalize(big_rgb))
    same = bool(np.array_equal(old_stretch(), normalize(big_rgb)))
    results["normalize_2048"] = {"temporaries_ms": old * 1e3, "normalize_ms": new * 1e3, "equal": same}
    say(f"normalize 2048² RGB: whole-image temporaries {old * 1e3:.0f} ms, in place {new * 1e3:.0f} ms, equal: {same}")

    # the image-kind features: NumPy's reductions over the last axis of 3 they replaced, on DSB images
    def old_features(image: np.ndarray) -> dict[str, float]:
        rgb = to_rgb_uint8(image)
        step = max(1, int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / 65536))))
        sample = rgb[::step, ::step]
        grey = sample.sum(axis=-1, dtype=np.uint16).ravel()
        counts = np.cumsum(np.bincount(grey, minlength=766))
        median = float(np.searchsorted(counts, (grey.size + 1) / 2)) / 765.0
        chroma = sample.max(axis=-1).astype(np.int16) - sample.min(axis=-1)
        return {"background": median, "lean": float(grey.mean()) / 765.0 - median, "chroma": float(chroma.mean()) / 255.0}

    images = [im for im, _ in pairs]
    old = best_of(args.rounds, lambda: [old_features(im) for im in images])
    new = best_of(args.rounds, lambda: [kind_features(im) for im in images])
    same = all(old_features(im) == kind_features(im) for im in images)
    results["kind_features"] = {"reductions_ms": old / len(images) * 1e3, "kind_features_ms": new / len(images) * 1e3,
                                "equal": same}
    say(f"kind features, {len(images)} DSB images: reductions over the channel axis {old / len(images) * 1e3:.2f} ms, "
        f"channel by channel {new / len(images) * 1e3:.2f} ms, equal: {same}")

    # predict's finishing stage per 256² image (fast mode): each step alone, then the whole stage
    from nucleiseg import pipeline
    from nucleiseg.batch import ImageJob, OutputFolder, _finish, _infer, _read, plan_outputs
    from nucleiseg.io import write_labels_tiff, write_png
    from nucleiseg.options import PredictOptions
    from nucleiseg.postprocess import label_nuclei

    tmp = Path(tempfile.mkdtemp(prefix="nucleiseg-finishing-stage-"))
    try:
        opts = PredictOptions(mode="fast").resolved(model.depth, model.nucleus_diameter)
        (tmp / "in").mkdir()
        for k, crop in enumerate(crops):
            write_png(tmp / "in" / f"img{k:03d}.png", crop)
        jobs = [ImageJob(q, q.stem, plan_outputs(tmp / "out", q.stem)) for q in sorted((tmp / "in").glob("*.png"))]
        predicted = [_infer(job, *_read(job, opts), model, opts, None) for job in jobs]
        labels = [label_nuclei(q.probabilities, q.channels, q.params) for q in predicted]
        tables = [measure_nuclei(lab, q.image) for lab, q in zip(labels, predicted)]
        parts = {
            "labels (label_nuclei)": lambda: [label_nuclei(q.probabilities, q.channels, q.params) for q in predicted],
            "measurements": lambda: [measure_nuclei(lab, q.image) for lab, q in zip(labels, predicted)],
            "drawing the overlay": lambda: [draw_overlay(to_rgb_uint8(q.image), lab) for lab, q in zip(labels, predicted)],
            "overlay PNG": lambda: [write_png(tmp / "o.png", o) for o in overlays],
            "mask PNG": lambda: [write_png(tmp / "m.png", (lab > 0).astype(np.uint8) * np.uint8(255)) for lab in labels],
            "table CSV": lambda: [t.to_csv(tmp / "t.csv", index=False) for t in tables],
            "labels TIFF": lambda: [write_labels_tiff(tmp / "l.tif", lab) for lab in labels],
        }
        stage: dict[str, float] = {name: best_of(args.rounds, fn) / len(jobs) * 1e3 for name, fn in parts.items()}
        waited = [0.0]
        real_result = pipeline.Background.result

        def timed_result(self) -> None:
            t0 = time.perf_counter()
            try:
                real_result(self)
            finally:
                waited[0] += time.perf_counter() - t0

        pipeline.Background.result = timed_result
        try:
            walls, cpus, waits = [], [], []
            for _ in range(args.rounds):
                target = OutputFolder(tmp / "out").open()
                fresh = [copy.copy(q) for q in predicted]
                waited[0], c0, t0 = 0.0, time.process_time(), time.perf_counter()
                for q in fresh:
                    _finish(q, target)
                walls.append((time.perf_counter() - t0) / len(jobs) * 1e3)
                cpus.append((time.process_time() - c0) / len(jobs) * 1e3)
                waits.append(waited[0] / len(jobs) * 1e3)
                target.close()
        finally:
            pipeline.Background.result = real_result
        stage.update({"whole stage, wall": min(walls), "whole stage, CPU": cpus[walls.index(min(walls))],
                      "waiting for the overlay's thread": waits[walls.index(min(walls))]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["finishing_stage_ms"] = stage
    say("finishing stage, fast mode, ms per 256² image (steps alone; the stage with its commit, best round): "
        + "; ".join(f"{name} {ms:.2f}" for name, ms in stage.items()))

    if args.large_png:
        side = args.large_png
        big_overlay = mosaic(side, overlays)
        t0 = time.perf_counter()
        size = sum(map(len, encode_png(big_overlay)))
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        buffer = pyio.BytesIO()
        Image.fromarray(big_overlay).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        pillow = time.perf_counter() - t0
        results["png_large"] = {"side": side, "encode_png_s": ours, "encode_png_bytes": size, "pillow_s": pillow,
                                "pillow_bytes": len(buffer.getvalue())}
        say(f"PNG overlay {side}², zlib level {PNG_COMPRESS_LEVEL}: Pillow {pillow:.2f} s, "
            f"{len(buffer.getvalue()) / 1e6:.1f} MB; encode_png {ours:.2f} s, {size / 1e6:.1f} MB")
        del big_overlay, buffer

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
