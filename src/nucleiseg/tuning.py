"""Choosing the post-processing thresholds (and the fast mode's prune level) on validation images.

:func:`tune_postprocess` grid-searches the four :class:`~nucleiseg.postprocess.PostprocessParams`
for the highest mean DSB score. It gives exactly the labels of
:func:`~nucleiseg.postprocess.instances_from_probabilities` for every combination
(the tests check this) but shares the work between them: per image the seed map
is computed once, the foreground and its blobs once per foreground threshold,
the watershed once per (foreground, seed threshold, minimum seed size), and
every ``min_size`` only filters that watershed's result.

:func:`tune_model` is ``nucleiseg tune``: predict the validation split once,
tune (for all images, then per image kind), pick the fast mode's prune level,
and store them in the model file's metadata (``"postprocess"``,
``"postprocess_by_kind"``, ``"fast_prune_level"``, ``"tuning"``).
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import NucleisegError
from .metrics import instance_scores
from .options import PredictOptions
from .postprocess import (
    PostprocessParams,
    boundary_probability,
    connected_components,
    flood,
    foreground_regions,
    instances_from_probabilities,
    remove_small_labels,
    seed_map,
    seed_markers,
    seed_orphans,
)

__all__ = [
    "DEFAULT_GRID",
    "FAST_MODE_TOLERANCE",
    "MIN_KIND_GAIN",
    "MIN_KIND_IMAGES",
    "TuneResult",
    "best_of_grid",
    "choose_prune_level",
    "grid_key",
    "image_digests",
    "mean_dsb",
    "score_grid",
    "tune_model",
    "tune_by_kind",
    "tune_postprocess",
    "update_model_metadata",
]

log = logging.getLogger(__name__)

#: The default search grid: 5 x 5 x 4 x 4 = 400 combinations, 100 watersheds per image. The sizes reach
#: 40-60 px because DSB2018's large brightfield and tissue nuclei favour the upper end.
DEFAULT_GRID: dict[str, tuple] = {
    "foreground_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "seed_threshold": (0.4, 0.5, 0.6, 0.7, 0.8),
    "min_seed_size": (2, 8, 20, 40),
    "min_size": (5, 15, 30, 60),
}

#: An image kind gets thresholds of its own when it has at least this many tuning images ...
MIN_KIND_IMAGES = 5
#: ... and its own thresholds beat the shared ones on them by at least this much DSB.
MIN_KIND_GAIN = 0.01

#: The fast mode uses the smallest prune level whose validation DSB is at most this far below the accurate mode's.
FAST_MODE_TOLERANCE = 0.03

_PARAM_NAMES = tuple(DEFAULT_GRID)


def _grid(grid: Mapping[str, Sequence] | None) -> dict[str, tuple]:
    out = dict(DEFAULT_GRID)
    for key, values in (grid or {}).items():
        if key not in out:
            raise ValueError(f"unknown grid parameter {key!r}; expected some of {', '.join(_PARAM_NAMES)}")
        values = tuple(sorted(set(values)))
        if not values:
            raise ValueError(f"grid parameter {key!r} needs at least one value")
        out[key] = values
    for key in ("min_seed_size", "min_size"):
        out[key] = tuple(int(v) for v in out[key])
    for key in ("foreground_threshold", "seed_threshold"):
        out[key] = tuple(float(v) for v in out[key])
    return out


def _image_scores(
    probs: np.ndarray, truth: np.ndarray, channels: Sequence[str], grid: dict[str, tuple]
) -> dict[tuple, tuple[float, float]]:
    """(DSB, AP50) of one image for every combination of the grid."""
    channels = list(channels)
    body = probs[channels.index("body")].astype(np.float32)
    boundary = boundary_probability(probs, channels)
    out: dict[tuple, tuple[float, float]] = {}

    def score(labels: np.ndarray) -> tuple[float, float]:
        s = instance_scores(truth, labels)
        return s.score, s.ap50

    if boundary is None:  # no contour/touch channel: connected components, seeds play no part
        default = PostprocessParams()
        for fg, ms in itertools.product(grid["foreground_threshold"], grid["min_size"]):
            result = score(connected_components(body, fg, ms))
            out[(fg, default.seed_threshold, default.min_seed_size, ms)] = result
        return out

    # postprocess.instances_from_probabilities' steps, each shared by the combinations that agree up to it
    seeds = seed_map(body, boundary)
    for fg in grid["foreground_threshold"]:
        foreground, blobs, n_blobs = foreground_regions(body, fg)
        for st, mss in itertools.product(grid["seed_threshold"], grid["min_seed_size"]):
            markers = seed_orphans(seed_markers(seeds, foreground, st, mss), blobs, n_blobs)
            flooded = flood(body, markers, foreground, blobs, n_blobs)
            for ms in grid["min_size"]:
                out[(fg, st, mss, ms)] = score(remove_small_labels(flooded, ms))
    return out


def tune_postprocess(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    channels: Sequence[str] = ("body", "contour", "touch"),
    grid: Mapping[str, Sequence] | None = None,
    *,
    progress: bool = False,
) -> tuple[PostprocessParams, pd.DataFrame]:
    """Grid-search the post-processing thresholds for the best mean DSB score.

    Parameters
    ----------
    probs : sequence of ndarray, each (C, H, W)
        Network probabilities of the validation images.
    truths : sequence of ndarray, each (H, W)
        Their annotated instance labels, in the same order.
    channels : sequence of str
        Channel names of ``probs``; must include ``"body"``. Without
        ``"contour"``/``"touch"`` only ``foreground_threshold`` and
        ``min_size`` matter (connected components) and the other two columns
        hold the defaults.
    grid : mapping name -> values, optional
        Values to try for some of ``foreground_threshold``, ``seed_threshold``,
        ``min_seed_size``, ``min_size``; the others keep :data:`DEFAULT_GRID`.
    progress : bool
        Show a progress bar over the images on stderr.

    Returns
    -------
    best : PostprocessParams
        The combination with the highest mean DSB (ties: higher mean AP@0.5,
        then the first in grid order).
    results : pandas.DataFrame
        One row per combination: the four parameters, ``dsb`` and ``ap50``
        (means over images), sorted best first.

    Examples
    --------
    >>> p = np.zeros((3, 16, 16), np.float32); p[0, 4:12, 4:12] = 0.9
    >>> t = np.zeros((16, 16), int); t[4:12, 4:12] = 1
    >>> best, table = tune_postprocess([p], [t], grid={"foreground_threshold": [0.5]})
    >>> float(table["dsb"].max())
    1.0
    """
    channels = list(channels)
    if "body" not in channels:
        raise ValueError(f"channels must include 'body', got {channels}")
    probs = list(probs)
    truths = list(truths)
    if len(probs) != len(truths):
        raise ValueError(f"got {len(probs)} probability maps for {len(truths)} label images")
    if not probs:
        raise ValueError("tune_postprocess needs at least one image")
    combos, scores = score_grid(probs, truths, channels, grid, progress=progress)
    return best_of_grid(combos, scores)


def score_grid(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    channels: Sequence[str],
    grid: Mapping[str, Sequence] | None = None,
    *,
    progress: bool = False,
) -> tuple[list[tuple], np.ndarray]:
    """Every image's (DSB, AP@0.5) under every grid combination.

    Returns the combinations (tuples in the order of :data:`DEFAULT_GRID`'s keys)
    and an array of shape ``(images, combinations, 2)``; :func:`best_of_grid`
    picks from it for all images or any subset (one image kind, say).
    """
    grid = _grid(grid)
    from tqdm import tqdm

    combos: list[tuple] = []
    rows = []
    for prob, truth in tqdm(list(zip(probs, truths)), desc="tune", unit="image", file=sys.stderr,
                            disable=None if progress else True):
        prob = np.asarray(prob)
        if prob.ndim != 3 or prob.shape[0] != len(channels) or prob.shape[1:] != np.shape(truth):
            raise ValueError(
                f"probabilities of shape {prob.shape} do not match {len(channels)} channels "
                f"and labels of shape {np.shape(truth)}"
            )
        image = _image_scores(prob, np.asarray(truth), channels, grid)
        combos = combos or list(image)
        rows.append([image[c] for c in combos])
    return combos, np.asarray(rows, dtype=np.float64).reshape(len(rows), len(combos), 2)


def best_of_grid(combos: Sequence[tuple], scores: np.ndarray) -> tuple[PostprocessParams, pd.DataFrame]:
    """The combination with the highest mean DSB over the images of ``scores`` (see :func:`score_grid`).

    Ties go to the higher mean AP@0.5, then to the first in grid order.
    Returns the parameters and the table of all combinations, best first.
    """
    if len(scores) == 0:
        raise ValueError("no images to choose thresholds on")
    means = scores.mean(axis=0)
    table = pd.DataFrame([dict(zip(_PARAM_NAMES, combo)) for combo in combos])
    table["dsb"], table["ap50"] = means[:, 0], means[:, 1]
    table["grid_order"] = np.arange(len(table))
    table = table.sort_values(["dsb", "ap50", "grid_order"], ascending=[False, False, True], kind="mergesort")
    table = table.drop(columns="grid_order").reset_index(drop=True)
    best = table.iloc[0]
    params = PostprocessParams(
        foreground_threshold=float(best["foreground_threshold"]),
        seed_threshold=float(best["seed_threshold"]),
        min_seed_size=int(best["min_seed_size"]),
        min_size=int(best["min_size"]),
    )
    return params, table


def mean_dsb(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    channels: Sequence[str],
    params: PostprocessParams | None = None,
) -> float:
    """Mean DSB score of :func:`instances_from_probabilities` with ``params`` over the images."""
    scores = [
        instance_scores(truth, instances_from_probabilities(np.asarray(prob), channels, params)).score
        for prob, truth in zip(probs, truths)
    ]
    return float(np.mean(scores)) if scores else float("nan")


def choose_prune_level(
    level_scores: Mapping[int, float], accurate_score: float, tolerance: float = FAST_MODE_TOLERANCE
) -> int:
    """The smallest prune level scoring at least ``accurate_score - tolerance``.

    When no level is that close, the best-scoring one (the smallest among ties).

    Examples
    --------
    >>> choose_prune_level({1: 0.50, 2: 0.58, 3: 0.60}, accurate_score=0.61)
    2
    >>> choose_prune_level({1: 0.3, 2: 0.4}, accurate_score=0.6)
    2
    """
    if not level_scores:
        raise ValueError("no prune level was scored")
    for level in sorted(level_scores):
        if level_scores[level] >= accurate_score - tolerance:
            return int(level)
    return int(max(sorted(level_scores), key=lambda k: level_scores[k]))


def update_model_metadata(path: str | Path, updates: Mapping[str, Any], out: str | Path | None = None,
                          *, float16: bool = False) -> Path:
    """Rewrite a model file with the same tensors and its metadata updated, atomically.

    Parameters
    ----------
    path : str or Path
        A nucleiseg safetensors model file.
    updates : mapping
        Metadata keys to set (values are stored as JSON, like
        :func:`nucleiseg.models.save_model` does).
    out : str or Path, optional
        Where to write; default: replace ``path`` itself (atomically, so an
        interruption leaves the old file intact).
    float16 : bool
        Store the floating-point tensors as float16: half the file. Loading
        casts them back to float32, so only their rounding (a relative
        0.05 %) changes; values beyond float16's range are refused.

    Returns
    -------
    Path
        The file written.
    """
    from .models.metadata import read_model_file, tensor_shapes, write_model_file

    path = Path(path)
    out = path if out is None else Path(out)
    tensors, metadata = read_model_file(path)  # validated against its tensors
    if float16:
        import torch

        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                if float(tensor.abs().max()) > torch.finfo(torch.float16).max:
                    raise NucleisegError(f"tensor {name} holds values beyond float16's range; keep it float32", path)
                tensors[name] = tensor.half()
    metadata = metadata.updated(updates, tensor_shapes(tensors))  # the updates are checked too
    write_model_file(out, tensors, metadata)
    return out


@dataclass
class TuneResult:
    """What :func:`tune_model` did.

    Attributes
    ----------
    params : PostprocessParams
        The chosen thresholds (written as ``"postprocess"``).
    previous : PostprocessParams
        The thresholds the model file held before.
    dsb_before, dsb_after : float
        Mean validation DSB (accurate mode) with the previous and the chosen
        thresholds (each image with its kind's, where a kind has its own).
    fast_prune_level : int
        Written as ``"fast_prune_level"``.
    fast_dsb : dict int -> float
        Mean validation DSB of each prune level (fast mode) with the chosen thresholds.
    n_images : int
        Validation images used.
    results : pandas.DataFrame
        Every grid combination with its scores (:func:`tune_postprocess`).
    path : Path
        The model file written.
    by_kind : dict str -> PostprocessParams
        The image kinds given thresholds of their own (``"postprocess_by_kind"``).
    kinds : dict str -> dict
        Per kind: images, DSB with the shared and with its own best thresholds.
    honest : dict
        The nested cross-validation estimate of these thresholds' DSB on images they were not chosen on
        (:func:`nucleiseg.honest.nested_cv_estimate`'s summary; also stored in the ``"tuning"`` record).
    """

    params: PostprocessParams
    previous: PostprocessParams
    dsb_before: float
    dsb_after: float
    fast_prune_level: int
    fast_dsb: dict[int, float]
    n_images: int
    results: pd.DataFrame
    path: Path
    by_kind: dict[str, PostprocessParams] = field(default_factory=dict)
    kinds: dict[str, dict] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    honest: dict[str, Any] = field(default_factory=dict)


def _predict(model, rgb: np.ndarray, prune_level: int | None, options: PredictOptions) -> np.ndarray:
    """Probabilities of the accurate mode (prune_level None) or of one prune level."""
    from .inference import predict_probabilities

    if prune_level is None:
        return predict_probabilities(model, rgb, options.replace(mode="accurate", prune_level=None))
    return predict_probabilities(model, rgb, options.replace(mode="fast", prune_level=prune_level))


def tune_model(
    cache_dir: str | Path,
    model: str | Path,
    out: str | Path | None = None,
    *,
    split: str = "val",
    grid: Mapping[str, Sequence] | None = None,
    tolerance: float = FAST_MODE_TOLERANCE,
    options: PredictOptions | Mapping[str, Any] | None = None,
    min_kind_images: int = MIN_KIND_IMAGES,
    progress: bool = True,
    float16: bool = False,
) -> TuneResult:
    """Tune a model file's post-processing on a cache's validation split and store the result.

    This is ``nucleiseg tune``. The validation images are predicted once in
    accurate mode; :func:`tune_postprocess` picks the thresholds; then each
    prune level ``1..depth`` predicts the same images in fast mode and the
    smallest level within ``tolerance`` DSB of the accurate mode becomes
    ``"fast_prune_level"``. An image kind with at least ``min_kind_images``
    images whose own best thresholds beat the shared ones by
    :data:`MIN_KIND_GAIN` DSB, and still gain on held-out mosaics in a
    cross-validation (:func:`nucleiseg.honest.choose_thresholds` with
    ``per_kind="cv"``), keeps them (``"postprocess_by_kind"``; prediction
    picks them by the image's kind). The choice's honest estimate
    (:func:`nucleiseg.honest.nested_cv_estimate`) is stored in the
    ``"tuning"`` record and returned. The model file is rewritten with the same tensors
    and the updated metadata (``"postprocess"``, ``"fast_prune_level"`` and a
    ``"tuning"`` record of the scores).

    Parameters
    ----------
    cache_dir : str or Path
        A prepared cache (``nucleiseg prepare``).
    model : str or Path
        The model file (or run folder) to tune; ``"default"`` needs ``out``.
    out : str or Path, optional
        Where to write the tuned model; default: replace ``model`` in place (atomically).
    split : {'val', 'train', 'all'}
        Images to tune on.
    grid : mapping, optional
        Values to search (see :func:`tune_postprocess`).
    tolerance : float
        DSB the fast mode may lose against the accurate mode.
    options : PredictOptions or mapping, optional
        How the network predicts (``tta``, ``precision``, ``tile``, ...; see
        :class:`~nucleiseg.options.PredictOptions`); the mode is set here.
    min_kind_images : int
        Fewest images of a kind for it to get thresholds of its own.
    progress : bool
        Progress bars on stderr.
    float16 : bool
        Write the weights as float16 (half the file; see :func:`update_model_metadata`).
    """
    from tqdm import tqdm

    from .data.cache import Cache
    from .data.kinds import image_kind
    from .models import load_model_file, resolve_model_path

    if model is None or str(model) == "default":
        if out is None:
            raise NucleisegError("the shipped default model is never changed in place: give a file to write (out)")
    path = resolve_model_path(model)
    out = path if out is None else Path(out)
    if out.is_dir():
        raise NucleisegError("is a folder; expected the model file to write", out)
    if out != path and out.exists():
        from .models.metadata import ModelMetadata

        try:
            ModelMetadata.read(out)
        except NucleisegError:
            raise NucleisegError("exists and is not a nucleiseg model file; tune writes a model file there: "
                                 "choose a new name", out) from None
    if split not in ("val", "train", "all"):
        raise NucleisegError(f"unknown split {split!r}; choose val, train or all")
    cache = Cache.open(cache_dir)
    table = cache.table(split)
    if table.empty:
        raise NucleisegError(f"the cache has no images in the {split!r} split (see split.csv)", cache_dir)
    ids = table["image_id"].astype(str).tolist()

    from .inference import load_model, resolve_device

    opts = PredictOptions.from_any(options)
    net = load_model(path, resolve_device(opts.device))
    opts = opts.resolved(net.depth, net.nucleus_diameter)

    channels = list(net.channels)
    previous = net.postprocess
    images = [cache.image(i) for i in ids]
    truths = [cache.labels(i) for i in ids]
    bar = dict(unit="image", file=sys.stderr, disable=None if progress else True)
    probs = [_predict(net, rgb, None, opts) for rgb in tqdm(images, desc="predict", **bar)]

    dsb_before = mean_dsb(probs, truths, channels, previous)
    combos, scores = score_grid(probs, truths, channels, grid, progress=progress)
    params, results = best_of_grid(combos, scores)
    shared = scores[:, combos.index(_key(params)), 0]
    if float(results["dsb"].iloc[0]) < dsb_before:  # the previous thresholds lie off the grid and do better: keep them
        params = previous
        shared = np.array([instance_scores(t, instances_from_probabilities(p, channels, params)).score
                           for p, t in zip(probs, truths)])
    del probs

    # Image kinds with enough validation images and a clear gain get thresholds of their own, when a
    # cross-validation by mosaic group confirms the gain on images they were not chosen on.
    from .honest import choose_thresholds, nested_cv_estimate

    kinds = [image_kind(rgb) for rgb in images]
    groups = table["group"].tolist()
    by_kind, kind_record = _tune_by_kind(kinds, combos, scores, shared, params, min_images=min_kind_images)
    if by_kind:
        _, confirmed = choose_thresholds(combos, scores, kinds, per_kind="cv", groups=groups,
                                         min_kind_images=min_kind_images)
        for kind in by_kind:
            kind_record[kind]["confirmed_by_cross_validation"] = kind in confirmed
            kind_record[kind]["uses_own_thresholds"] = kind in confirmed
        by_kind = {kind: p for kind, p in by_kind.items() if kind in confirmed}
    chosen = [by_kind.get(kind, params) for kind in kinds]
    dsb_after = float(np.mean([scores[i, combos.index(_key(by_kind[k])), 0] if k in by_kind else shared[i]
                               for i, k in enumerate(kinds)]))

    # The same choice cross-validated by mosaic group and kind: the score of thresholds chosen without the image.
    try:
        honest = nested_cv_estimate(combos, scores, kinds, groups, ids,
                                    min_kind_images=min_kind_images).summary
    except ValueError as exc:  # a single image or mosaic: nothing to hold out
        log.warning("no honest estimate: %s", exc)
        honest = {}

    depth = net.depth
    fast_dsb: dict[int, float] = {}
    for level in range(1, depth + 1):
        level_probs = (_predict(net, rgb, level, opts) for rgb in tqdm(images, desc=f"fast level {level}", **bar))
        fast_dsb[level] = float(np.mean([
            instance_scores(t, instances_from_probabilities(p, channels, c)).score
            for p, t, c in zip(level_probs, truths, chosen)
        ]))
    level = choose_prune_level(fast_dsb, dsb_after, tolerance)
    if fast_dsb[level] < dsb_after - tolerance:
        log.warning(
            "no prune level comes within %.2f DSB of the accurate mode (%.3f); fast mode uses the best, level %d (%.3f)",
            tolerance, dsb_after, level, fast_dsb[level],
        )
    record = {
        "split": split,
        "n_images": len(ids),
        "images": image_digests(images),
        "dsb_before": dsb_before,
        "dsb_after": dsb_after,
        "previous_postprocess": previous.to_dict(),
        "fast_dsb_per_level": {str(k): v for k, v in fast_dsb.items()},
        "fast_tolerance": tolerance,
        "grid_size": len(results),
        "kinds": kind_record,
        "honest_estimate": {k: honest[k] for k in ("method", "folds", "repeats", "overall", "per_kind", "not_reported")
                            if k in honest},
    }
    updates = {"postprocess": params.to_dict(), "fast_prune_level": level, "tuning": record,
               "postprocess_by_kind": {kind: p.to_dict() for kind, p in by_kind.items()}}
    update_model_metadata(path, updates, out=out, float16=float16)
    _, metadata = load_model_file(out)  # the file written must load again
    return TuneResult(params, previous, dsb_before, dsb_after, level, fast_dsb, len(ids), results, out, by_kind,
                      kind_record, metadata, honest)


def image_digests(images: Iterable[np.ndarray]) -> list[str]:
    """Short fingerprints of images' pixels, sorted: the first 12 hex digits of each one's SHA-256.

    ``tune`` stores them with its record (``"images"``), so that ``evaluate``
    can tell which of the images it scores the thresholds were chosen on,
    whatever their names or cache (12 digits: 48 bits, a few bytes an image
    in the model file). The shape and dtype are part of the fingerprint.

    Examples
    --------
    >>> a, b = np.zeros((2, 3), np.uint8), np.ones((2, 3), np.uint8)
    >>> image_digests([a, b]) == image_digests([b, a.copy()])
    True
    >>> image_digests([a]) == image_digests([a.reshape(3, 2)])
    False
    """
    import hashlib

    out = []
    for image in images:
        image = np.ascontiguousarray(image)
        digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode())
        digest.update(memoryview(image).cast("B"))
        out.append(digest.hexdigest()[:12])
    return sorted(out)


def _key(params: PostprocessParams) -> tuple:
    """``params`` as a combination of :func:`score_grid`."""
    return (params.foreground_threshold, params.seed_threshold, params.min_seed_size, params.min_size)


def _tune_by_kind(
    kinds: Sequence[str], combos: Sequence[tuple], scores: np.ndarray, shared_scores: np.ndarray,
    params: PostprocessParams, min_images: int = MIN_KIND_IMAGES, min_gain: float = MIN_KIND_GAIN,
) -> tuple[dict[str, PostprocessParams], dict[str, dict]]:
    """Per image kind: its best thresholds, kept where they beat the shared ``params`` by ``min_gain``
    DSB on ``min_images`` or more images (``shared_scores``: each image's DSB under ``params``)."""
    by_kind: dict[str, PostprocessParams] = {}
    record: dict[str, dict] = {}
    for kind in sorted(set(kinds)):
        rows = np.array([k == kind for k in kinds])
        shared = float(np.mean(shared_scores[rows]))
        entry: dict[str, Any] = {"n_images": int(rows.sum()), "dsb_shared_thresholds": shared}
        if rows.sum() >= min_images:
            own, table = best_of_grid(combos, scores[rows])
            entry.update(dsb_own_thresholds=float(table["dsb"].iloc[0]), own_thresholds=own.to_dict())
            if entry["dsb_own_thresholds"] >= shared + min_gain and own != params:
                by_kind[kind] = own
        entry["uses_own_thresholds"] = kind in by_kind
        record[kind] = entry
    return by_kind, record


#: Public names of the two steps above, for :mod:`nucleiseg.honest` (which repeats ``tune``'s choice per fold).
grid_key = _key
tune_by_kind = _tune_by_kind
