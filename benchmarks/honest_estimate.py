"""The honest accuracy estimate of a model: its thresholds' choice cross-validated on the validation split.

    .venv/bin/python benchmarks/honest_estimate.py cache/dsb2018 [--model default] [--work /tmp/nucleiseg-honest]
        [--tissue-variants grey haematoxylin tta reinhard] [--folds 5] [--repeats 10]

Predicts every validation image of a prepared cache once per mode (accurate, fast; bf16 where the CPU has it,
as ``predict`` does) and keeps the probabilities in ``--work`` (outside git, as float16, so figures can differ
from ``tune``'s in the third decimal; reused by later runs of the same model file), scores each image under ``tune``'s whole threshold grid once
(:func:`nucleiseg.tuning.score_grid`, also kept), then prints:

- validation: the model's stored thresholds (what ``evaluate`` reports; chosen on these very images);
- the honest estimate (:func:`nucleiseg.honest.nested_cv_estimate`): 5-fold cross-validation by mosaic group,
  stratified by image kind, repeated 10 times, thresholds chosen by ``tune``'s rule (shared, then per kind) on
  the other folds; overall and per kind with the spread (std over repeats, 95% group-bootstrap interval);
- the same with the per-kind rule v6 was tuned with (own thresholds on an in-sample gain of 0.01, no
  cross-validated confirmation), with shared thresholds only, and the fast mode (thresholds chosen in
  accurate mode, as ``tune`` does, read from fast-mode predictions);
- with ``--tissue-variants``: the estimate when the stained-tissue images (and only they) are predicted from a
  changed input: ``grey`` (luminance), ``haematoxylin`` (the H channel of a colour deconvolution, drawn dark on
  bright like a brightfield image), ``tta`` (the 8 flips and turns averaged), ``reinhard`` (stain
  normalisation: each image's CIELAB means and spreads moved to the average of the training split's tissue
  images, Reinhard et al. 2001). The other kinds keep their scores;
- with ``--tissue-seed-maps``: the same for other seed maps of the watershed on the tissue images (``squared``:
  ``body * (1 - boundary)^2``, ``difference``: ``body - boundary``, ``smoothed``: the shipped map smoothed by a
  1-px Gaussian).

Writes ``WORK/honest.json`` with every figure. The checkpoint of the shipped model was also chosen on these
images; the estimate removes only the thresholds' share of the optimism.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from nucleiseg.data.cache import Cache
from nucleiseg.honest import format_estimate, nested_cv_estimate
from nucleiseg.inference import load_model, predict_probabilities
from nucleiseg.metrics import instance_scores
from nucleiseg.models import resolve_model_path
from nucleiseg.options import PredictOptions
from nucleiseg.postprocess import instances_from_probabilities
from nucleiseg.tuning import grid_key, score_grid

TISSUE = "tissue"


def grey(rgb: np.ndarray) -> np.ndarray:
    """Luminance, repeated in the three channels."""
    y = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.clip(y + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """The haematoxylin density of a colour deconvolution (Ruifrok & Johnston), dark nuclei on bright."""
    from skimage.color import rgb2hed

    h = rgb2hed(rgb)[..., 0]
    lo, hi = np.percentile(h, (1, 99.5))
    y = 255.0 * (1.0 - np.clip((h - lo) / max(hi - lo, 1e-6), 0, 1))
    return np.repeat(y.astype(np.uint8)[..., None], 3, axis=-1)


def lab_statistics(rgb: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of each CIELAB channel of an RGB image: shape (2, 3)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb[..., :3]).reshape(-1, 3)
    return np.stack([lab.mean(axis=0), lab.std(axis=0)])


def reinhard(reference: np.ndarray):
    """Reinhard et al.'s colour transfer: each CIELAB channel's mean and spread moved to ``reference``'s."""
    from skimage.color import lab2rgb, rgb2lab

    def transform(rgb: np.ndarray) -> np.ndarray:
        lab = rgb2lab(rgb[..., :3])
        mean, std = lab_statistics(rgb)
        lab = (lab - mean) / np.maximum(std, 1e-6) * reference[1] + reference[0]
        return np.clip(lab2rgb(lab) * 255.0 + 0.5, 0, 255).astype(np.uint8)

    return transform


def seed_scores(prob: np.ndarray, truth: np.ndarray, channels, combos, seeds_of) -> np.ndarray:
    """(DSB, AP50) of one image under every combination, with ``seeds_of(body, boundary)`` as the seed map.

    ``tuning.score_grid``'s loop over the watershed's shared steps, with another seed map.
    """
    from nucleiseg.postprocess import (boundary_probability, flood, foreground_regions, remove_small_labels,
                                       seed_markers, seed_orphans)

    body = prob[list(channels).index("body")]
    seeds = seeds_of(body, boundary_probability(prob, channels))
    out = {}
    for fg in sorted({c[0] for c in combos}):
        foreground, blobs, n_blobs = foreground_regions(body, fg)
        for st, mss in sorted({(c[1], c[2]) for c in combos}):
            flooded = flood(body, seed_orphans(seed_markers(seeds, foreground, st, mss), blobs, n_blobs), foreground,
                            blobs, n_blobs)
            for ms in sorted({c[3] for c in combos}):
                s = instance_scores(truth, remove_small_labels(flooded, ms))
                out[(fg, st, mss, ms)] = (s.score, s.ap50)
    return np.array([out[c] for c in combos])


def _smoothed(body, boundary):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(body * (1.0 - boundary), 1.0)


#: Seed maps tried for tissue, against the shipped ``body * (1 - boundary)``.
SEED_MAPS = {
    "squared": lambda body, boundary: body * (1.0 - boundary) ** 2,  # boundaries cut deeper
    "difference": lambda body, boundary: np.clip(body - boundary, 0, 1),
    "smoothed": _smoothed,  # Gaussian sigma 1 px: fewer seeds from noise
}

VARIANTS = {"grey": (grey, {}), "haematoxylin": (haematoxylin, {}), "tta": (None, {"tta": True}),
            "reinhard": (None, {})}  # the transform is made in main: it needs the training split's tissue images


def model_tag(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:10]


def cached_probs(work: Path, name: str, ids, images, net, opts, transform=None) -> dict[str, np.ndarray]:
    """Probabilities of the images, read from ``work/name.npz`` when there, else predicted and saved (float16)."""
    path = work / f"probs-{name}.npz"
    if path.exists():
        with np.load(path) as f:
            if set(ids) <= set(f.files):
                return {i: f[i].astype(np.float32) for i in ids}
    start = time.perf_counter()
    out = {}
    for i in ids:
        rgb = images(i)
        out[i] = predict_probabilities(net, rgb if transform is None else transform(rgb), opts).astype(np.float16)
    print(f"predicted {len(ids)} images ({name}) in {time.perf_counter() - start:.0f} s", flush=True)
    np.savez_compressed(path, **out)
    return {i: v.astype(np.float32) for i, v in out.items()}


def cached_scores(work: Path, name: str, ids, probs, truths, channels) -> tuple[list[tuple], np.ndarray]:
    path = work / f"scores-{name}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            if list(f["ids"]) == list(ids):
                return [(a, b, int(c), int(d)) for a, b, c, d in f["combos"].tolist()], f["scores"]
    start = time.perf_counter()
    combos, scores = score_grid([probs[i] for i in ids], [truths[i] for i in ids], channels)
    print(f"scored {len(ids)} images ({name}) under {len(combos)} combinations in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    np.savez(path, ids=np.array(ids), combos=np.array(combos, dtype=np.float64), scores=scores)
    return combos, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--model", default="default")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nucleiseg-honest"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--modes", nargs="*", default=["accurate", "fast"], choices=["accurate", "fast"])
    parser.add_argument("--tissue-variants", nargs="*", default=[], choices=sorted(VARIANTS))
    parser.add_argument("--tissue-seed-maps", nargs="*", default=[], choices=sorted(SEED_MAPS))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    start = time.perf_counter()

    path = resolve_model_path(args.model)
    net = load_model(path)
    channels = list(net.channels)
    cache = Cache.open(args.cache)
    table = cache.table(args.split)
    ids = table["image_id"].astype(str).tolist()
    kinds = table["kind"].astype(str).tolist()
    groups = table["group"].tolist()
    truths = {i: cache.labels(i) for i in ids}
    work = args.work / model_tag(path)
    work.mkdir(parents=True, exist_ok=True)
    base = PredictOptions().resolved(net.depth, net.nucleus_diameter)
    cv = dict(n_folds=args.folds, repeats=args.repeats)
    report: dict = {"model": str(path), "cache": str(args.cache), "split": args.split, "n_images": len(ids),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"}

    scores_by_mode = {}
    for mode in dict.fromkeys(["accurate", *args.modes]):
        opts = base.replace(mode=mode)
        probs = cached_probs(work, mode, ids, cache.image, net, opts)
        combos, scores_by_mode[mode] = cached_scores(work, mode, ids, probs, truths, channels)
        if mode == "accurate":
            # the model's stored thresholds, as evaluate scores the images (each its kind's own, if tuned)
            stored = []
            for i, kind in zip(ids, kinds):
                p = net.postprocess_by_kind.get(kind, net.postprocess)
                key = grid_key(p)
                stored.append(scores_by_mode[mode][ids.index(i), combos.index(key)] if key in combos else
                              (lambda s: (s.score, s.ap50))(instance_scores(truths[i],
                                                                            instances_from_probabilities(probs[i], channels, p))))
            stored = np.asarray(stored)
            report["validation_stored_thresholds"] = {
                "overall": {"dsb": float(stored[:, 0].mean()), "ap50": float(stored[:, 1].mean())},
                "per_kind": {k: {"n_images": kinds.count(k), "dsb": float(stored[[x == k for x in kinds], 0].mean())}
                             for k in sorted(set(kinds))},
            }
        del probs

    acc = scores_by_mode["accurate"]
    vs = report["validation_stored_thresholds"]
    print(f"validation, the model's stored thresholds (chosen on these {len(ids)} images): DSB "
          f"{vs['overall']['dsb']:.3f}, AP50 {vs['overall']['ap50']:.3f}; "
          + ", ".join(f"{k} ({b['n_images']}) {b['dsb']:.3f}" for k, b in vs["per_kind"].items()))
    runs = {"accurate": nested_cv_estimate(combos, acc, kinds, groups, ids, **cv),
            "accurate, per-kind thresholds by the old rule (in-sample gain only, as v6 was tuned)":
                nested_cv_estimate(combos, acc, kinds, groups, ids, per_kind=True, **cv),
            "accurate, shared thresholds only": nested_cv_estimate(combos, acc, kinds, groups, ids, per_kind=False,
                                                                   **cv)}
    if "fast" in scores_by_mode:
        runs["fast (thresholds chosen in accurate mode)"] = nested_cv_estimate(
            combos, acc, kinds, groups, ids, score_with=scores_by_mode["fast"], **cv)

    tissue = [i for i, k in zip(ids, kinds) if k == TISSUE]
    rows = [ids.index(i) for i in tissue]
    for variant in args.tissue_variants:
        transform, extra = VARIANTS[variant]
        if variant == "reinhard":  # the mean CIELAB statistics of the training split's tissue images
            train = cache.table("train")
            train_tissue = train.loc[train["kind"] == TISSUE, "image_id"].astype(str)
            reference = np.mean([lab_statistics(cache.image(i)) for i in train_tissue], axis=0)
            report["reinhard_reference"] = {"train_tissue_images": len(train_tissue), "lab": reference.tolist()}
            transform = reinhard(reference)
        probs = cached_probs(work, f"tissue-{variant}", tissue, cache.image, net, base.replace(**extra), transform)
        _, tissue_scores = cached_scores(work, f"tissue-{variant}", tissue, probs, truths, channels)
        key = grid_key(net.postprocess)
        if key in combos:  # per image, at the model's stored thresholds
            column = combos.index(key)
            per_image = {i: (float(acc[r, column, 0]), float(tissue_scores[n, column, 0]))
                         for n, (r, i) in enumerate(zip(rows, tissue))}
            report[f"tissue {variant}, per image at the stored thresholds (as is, {variant})"] = per_image
            print(f"tissue images at the stored thresholds, DSB as they are -> with {variant}: "
                  + ", ".join(f"{i[:8]} {a:.3f} -> {b:.3f}" for i, (a, b) in per_image.items()), flush=True)
        scores = acc.copy()
        scores[rows] = tissue_scores
        runs[f"accurate, tissue predicted with {variant}"] = nested_cv_estimate(combos, scores, kinds, groups, ids,
                                                                                **cv)
    if args.tissue_seed_maps:
        probs = cached_probs(work, "accurate", ids, cache.image, net, base)
        for variant in args.tissue_seed_maps:
            scores = acc.copy()
            for r, i in zip(rows, tissue):
                scores[r] = seed_scores(probs[i], truths[i], channels, combos, SEED_MAPS[variant])
            runs[f"accurate, tissue seed map {variant}"] = nested_cv_estimate(combos, scores, kinds, groups, ids, **cv)
        del probs
    for name, est in runs.items():
        print()
        print(format_estimate(est.summary, f"honest estimate, {name}"))
        report[name] = est.summary
    report["seconds"] = time.perf_counter() - start
    (work / "honest.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {work / 'honest.json'} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
