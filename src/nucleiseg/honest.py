"""An honest accuracy estimate: the threshold choice cross-validated on the images it is made on.

``nucleiseg tune`` chooses the watershed's thresholds (shared, and per image kind) on the validation
images, so the validation score of the tuned model is optimistic: it is the best of 400 combinations
on the very images it is read from. :func:`nested_cv_estimate` removes that bias. The validation
images are split into folds by mosaic group (tiles of one mosaic never straddle two folds), each
image kind spread over the folds; for every fold the thresholds are chosen by ``tune``'s own rule
(:func:`~nucleiseg.tuning.best_of_grid` for all images, then
:func:`~nucleiseg.tuning.tune_by_kind`) on the *other* folds only, and scored on the held-out fold.
Every image is so scored once with thresholds chosen without it; the fold assignment is repeated
with different shuffles and the scores averaged.

The spread of the estimate is reported two ways: ``std_repeats``, the standard deviation of the mean
over the repeated fold assignments (how much the number depends on the luck of the folds), and a
95% bootstrap interval that resamples whole mosaic groups (images of one mosaic are not independent),
the larger of the two uncertainties.

What it cannot remove: the bias of anything else chosen on the same images, e.g. a training run's
checkpoint picked by its validation score. It estimates the thresholds' choice honestly, not that. (One
detail of ``tune`` is not repeated per fold: keeping the model's previous thresholds when they lie off the
grid and score higher; the folds choose on the grid alone.)

Per kind, a figure is reported only for kinds with at least :data:`MIN_REPORT_IMAGES` images; smaller
kinds are pooled as ``"other kinds"`` when together they reach that number, else they count in the
overall figure only (``summary["not_reported"]`` names them).

Everything works on the array of :func:`~nucleiseg.tuning.score_grid` (every image under every
combination), so one prediction of the images serves the whole estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .tuning import MIN_KIND_GAIN, MIN_KIND_IMAGES, best_of_grid, grid_key, tune_by_kind

__all__ = [
    "DEFAULT_FOLDS",
    "DEFAULT_REPEATS",
    "MIN_REPORT_IMAGES",
    "HonestEstimate",
    "choose_thresholds",
    "format_estimate",
    "group_folds",
    "nested_cv_estimate",
]

#: Outer folds: 5 leaves 80% of the images to choose on, as close to ``tune`` on all of them as the
#: 9 stained-tissue validation images (2 mosaics of 4 and 1 single image) allow.
DEFAULT_FOLDS = 5
#: Fold assignments averaged. On the shipped model's 58 validation images the mean moved by less than
#: 0.002 DSB between 10 and 50 repeats.
DEFAULT_REPEATS = 10
#: A kind's own figure needs at least this many images.
MIN_REPORT_IMAGES = 3
#: Bootstrap resamples of the mosaic groups for the 95% interval.
DEFAULT_BOOTSTRAP = 2000
OTHER = "other kinds"


def _group_ids(groups: Sequence[Any] | None, n: int) -> list[str]:
    """Each image's group; a missing group (None, NaN, '') makes an image a group of its own."""
    out = []
    for i in range(n):
        g = None if groups is None else groups[i]
        missing = g is None or (isinstance(g, float) and math.isnan(g)) or str(g) == ""
        out.append(f"\0image{i}" if missing else str(g))
    return out


def group_folds(kinds: Sequence[str], groups: Sequence[Any] | None, n_folds: int = DEFAULT_FOLDS,
                seed: int = 0) -> np.ndarray:
    """Assign images to folds, whole groups together, each kind spread evenly over the folds.

    Groups are taken largest first (ties in a shuffled order set by ``seed``) and each goes to the
    fold holding the fewest images of its kind (the kind most of its images have), then the fewest
    images overall.

    Parameters
    ----------
    kinds : sequence of str
        Each image's kind.
    groups : sequence, optional
        Each image's group (a mosaic); None, NaN or '' for an image alone.
    n_folds : int
        At least 2.
    seed : int
        Shuffles the order of groups of equal size.

    Returns
    -------
    ndarray of int, shape (n_images,)
        The fold of each image, in ``0 .. n_folds - 1``.

    Examples
    --------
    >>> group_folds(["a", "a", "a", "b"], ["g", "g", None, None], n_folds=2)
    array([0, 0, 1, 1])
    """
    n = len(kinds)
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    gids = _group_ids(groups, n)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(gids):
        members.setdefault(g, []).append(i)
    names = list(members)
    order = np.random.default_rng(seed).permutation(len(names))
    names = sorted((names[j] for j in order), key=lambda g: -len(members[g]))  # stable: shuffled within a size
    per_kind = {k: np.zeros(n_folds, int) for k in set(kinds)}
    total = np.zeros(n_folds, int)
    fold = np.empty(n, int)
    for g in names:
        rows = members[g]
        kind = pd.Series([kinds[i] for i in rows]).mode().iloc[0]
        f = min(range(n_folds), key=lambda j: (per_kind[kind][j], total[j], j))
        fold[rows] = f
        for i in rows:
            per_kind[kinds[i]][f] += 1
        total[f] += len(rows)
    return fold


def choose_thresholds(combos: Sequence[tuple], scores: np.ndarray, kinds: Sequence[str],
                      rows: np.ndarray | None = None, *, per_kind: bool | str = True,
                      groups: Sequence[Any] | None = None, min_kind_images: int = MIN_KIND_IMAGES,
                      min_gain: float = MIN_KIND_GAIN, inner_folds: int = 3) -> tuple[int, dict[str, int]]:
    """``tune``'s choice made on the images ``rows`` of ``scores`` (all when None).

    Returns the index of the shared combination in ``combos`` and, per kind that earns thresholds of
    its own (at least ``min_kind_images`` images, a gain of ``min_gain`` DSB), the index of its own.
    ``per_kind="cv"`` keeps a kind's own thresholds only where they also win on images they were not
    chosen on: an inner cross-validation of the same choice on ``rows`` (``inner_folds`` folds by
    ``groups``) must show a mean held-out gain over the shared thresholds for the kind's images.
    """
    rows = np.ones(len(scores), bool) if rows is None else np.asarray(rows)
    sub = scores[rows]
    params, _ = best_of_grid(combos, sub)
    shared = combos.index(grid_key(params))
    own: dict[str, int] = {}
    if not per_kind:
        return shared, own
    sub_kinds = [k for k, r in zip(kinds, rows) if r]
    by_kind, _ = tune_by_kind(sub_kinds, combos, sub, sub[:, shared, 0], params,
                              min_images=min_kind_images, min_gain=min_gain)
    own = {kind: combos.index(grid_key(p)) for kind, p in by_kind.items()}
    if per_kind != "cv" or not own:
        return shared, own
    sub_groups = None if groups is None else [g for g, r in zip(groups, rows) if r]
    if len(set(_group_ids(sub_groups, len(sub_kinds)))) < 2:
        return shared, {}
    fold = group_folds(sub_kinds, sub_groups, inner_folds)
    gains: dict[str, list[float]] = {kind: [] for kind in own}
    for f in np.unique(fold):
        inner_shared, inner_own = choose_thresholds(combos, sub, sub_kinds, fold != f, per_kind=True,
                                                    min_kind_images=min_kind_images, min_gain=min_gain)
        for kind in own:
            test = (fold == f) & np.array([k == kind for k in sub_kinds])
            pick = inner_own.get(kind, inner_shared)
            gains[kind] += list(sub[test, pick, 0] - sub[test, inner_shared, 0])
    return shared, {kind: own[kind] for kind in own if gains[kind] and float(np.mean(gains[kind])) > 0}


def _applied(scores: np.ndarray, kinds: Sequence[str], shared: int, own: Mapping[str, int],
             rows: np.ndarray) -> np.ndarray:
    """(DSB, AP50) of the images ``rows`` under the chosen thresholds, shape (rows, 2)."""
    idx = np.flatnonzero(rows)
    return np.array([scores[i, own.get(kinds[i], shared)] for i in idx]).reshape(len(idx), 2)


@dataclass
class HonestEstimate:
    """What :func:`nested_cv_estimate` found.

    Attributes
    ----------
    per_image : pandas.DataFrame
        ``image_id, kind, group, dsb, ap50`` (out of fold, mean over the repeats),
        ``dsb_validation, ap50_validation`` (with the thresholds chosen on all images).
    summary : dict
        ``overall`` and ``per_kind`` blocks: ``n_images, dsb, dsb_std_repeats, dsb_ci95, ap50,
        ap50_ci95, dsb_validation, ap50_validation``; ``not_reported`` (kinds too small to report)
        and the settings (``folds, repeats, per_kind_thresholds, bootstrap``).
    """

    per_image: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def dsb(self) -> float:
        return float(self.summary["overall"]["dsb"])


def _bootstrap_ci(values: np.ndarray, gids: Sequence[str], n_boot: int, rng: np.random.Generator) -> list[float]:
    """95% interval of the mean of ``values`` under resampling whole groups."""
    codes, uniq = pd.factorize(pd.Series(list(gids)))
    sums = np.bincount(codes, weights=values, minlength=len(uniq))
    counts = np.bincount(codes, minlength=len(uniq)).astype(float)
    if len(uniq) < 2:
        return [float(values.mean())] * 2
    picks = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return [float(lo), float(hi)]


def report_kinds(kinds: Sequence[str], min_images: int = MIN_REPORT_IMAGES) -> tuple[list[str], list[str]]:
    """Each image's reporting kind (small kinds pooled as ``"other kinds"``) and the kinds left unreported.

    Examples
    --------
    >>> report_kinds(["f", "f", "f", "t", "b"])
    (['f', 'f', 'f', None, None], ['b (1 image)', 't (1 image)'])
    >>> report_kinds(["f", "f", "f", "t", "t", "b"])[0]
    ['f', 'f', 'f', 'other kinds', 'other kinds', 'other kinds']
    """
    counts = pd.Series(list(kinds)).value_counts()
    small = sorted(k for k, c in counts.items() if c < min_images)
    pooled = sum(int(counts[k]) for k in small)
    if pooled >= min_images:
        return [OTHER if k in small else k for k in kinds], []
    return [None if k in small else k for k in kinds], [f"{k} ({int(counts[k])} image{'s' * int(counts[k] > 1)})"
                                                         for k in small]


def nested_cv_estimate(
    combos: Sequence[tuple],
    scores: np.ndarray,
    kinds: Sequence[str],
    groups: Sequence[Any] | None = None,
    image_ids: Sequence[str] | None = None,
    *,
    score_with: np.ndarray | None = None,
    n_folds: int = DEFAULT_FOLDS,
    repeats: int = DEFAULT_REPEATS,
    per_kind: bool | str = "cv",
    min_kind_images: int = MIN_KIND_IMAGES,
    min_gain: float = MIN_KIND_GAIN,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> HonestEstimate:
    """Cross-validate ``tune``'s threshold choice by mosaic group and image kind.

    Parameters
    ----------
    combos, scores
        From :func:`~nucleiseg.tuning.score_grid`: the grid's combinations and every image's
        (DSB, AP@0.5) under each, shape ``(images, combinations, 2)``.
    kinds : sequence of str
        Each image's kind (the cache's ``kind`` column).
    groups : sequence, optional
        Each image's mosaic group (the cache's ``group`` column); missing: an image alone.
    image_ids : sequence of str, optional
        For the per-image table.
    score_with : ndarray, optional
        Scores of the same images and combinations to read the held-out figures from, when they
        differ from those the thresholds are chosen on: the fast mode's, say, which uses the
        thresholds tuned in accurate mode.
    n_folds, repeats, seed
        Outer folds (:func:`group_folds`; fewer when there are fewer groups), how many shuffled
        assignments, the first seed.
    per_kind, min_kind_images, min_gain
        ``tune``'s per-kind rule: ``"cv"`` (``tune``'s) keeps a kind's own thresholds
        (:func:`~nucleiseg.tuning.tune_by_kind`) only when an inner cross-validation on the training
        folds confirms them (:func:`choose_thresholds`); ``True`` without that check (``tune``
        before the eighth session); ``False`` chooses shared thresholds only.
    n_boot : int
        Bootstrap resamples (of whole groups) for the 95% intervals; 0 for none.

    Returns
    -------
    HonestEstimate

    Raises
    ------
    ValueError
        Fewer than 2 groups (nothing to hold out), or inputs that do not match.

    Examples
    --------
    Two combinations; image 3 alone prefers the second, which wins on all four images together. Held
    out, image 3 gets the first (chosen on the others), so the honest mean is lower:

    >>> s = np.zeros((4, 2, 2)); s[:, 0, 0] = [0.6, 0.6, 0.6, 0.0]; s[:, 1, 0] = [0.5, 0.5, 0.5, 0.9]
    >>> combos = [(0.5, 0.5, 2, 5), (0.6, 0.5, 2, 5)]  # as score_grid gives them
    >>> est = nested_cv_estimate(combos, s, ["f"] * 4, n_folds=4, repeats=1, n_boot=0)
    >>> round(est.summary["overall"]["dsb_validation"], 3), round(est.dsb, 3)
    (0.6, 0.375)
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    kinds = [str(k) for k in kinds]
    if len(kinds) != n:
        raise ValueError(f"got {len(kinds)} kinds for {n} images")
    gids = _group_ids(groups, n)
    n_folds = min(n_folds, len(set(gids)))  # a fold per group at most
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 groups of images, got {len(set(gids))}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    target = scores if score_with is None else np.asarray(score_with, dtype=np.float64)
    if target.shape != scores.shape:
        raise ValueError(f"score_with has shape {target.shape}, the scores {scores.shape}")
    combos = list(combos)
    rule = dict(per_kind=per_kind, groups=groups, min_kind_images=min_kind_images, min_gain=min_gain)

    held_out = np.zeros((repeats, n, 2))
    for r in range(repeats):
        fold = group_folds(kinds, groups, n_folds, seed=seed + r)
        for f in range(n_folds):
            test = fold == f
            if not test.any():
                continue
            shared, own = choose_thresholds(combos, scores, kinds, ~test, **rule)
            held_out[r, test] = _applied(target, kinds, shared, own, test)
    shared, own = choose_thresholds(combos, scores, kinds, None, **rule)
    validation = _applied(target, kinds, shared, own, np.ones(n, bool))

    mean_oof = held_out.mean(0)
    table = pd.DataFrame({
        "image_id": list(image_ids) if image_ids is not None else [str(i) for i in range(n)],
        "kind": kinds,
        "group": [None if g.startswith("\0") else g for g in gids],
        "dsb": mean_oof[:, 0], "ap50": mean_oof[:, 1],
        "dsb_validation": validation[:, 0], "ap50_validation": validation[:, 1],
    })
    rng = np.random.default_rng(seed)

    def block(rows: np.ndarray) -> dict[str, Any]:
        g = [gids[i] for i in np.flatnonzero(rows)]
        out: dict[str, Any] = {
            "n_images": int(rows.sum()),
            "dsb": float(mean_oof[rows, 0].mean()),
            "dsb_std_repeats": float(held_out[:, rows, 0].mean(1).std(ddof=1)) if repeats > 1 else 0.0,
            "ap50": float(mean_oof[rows, 1].mean()),
            "dsb_validation": float(validation[rows, 0].mean()),
            "ap50_validation": float(validation[rows, 1].mean()),
        }
        if n_boot:
            out["dsb_ci95"] = _bootstrap_ci(mean_oof[rows, 0], g, n_boot, rng)
            out["ap50_ci95"] = _bootstrap_ci(mean_oof[rows, 1], g, n_boot, rng)
        return out

    shown, not_reported = report_kinds(kinds)
    per_kind_blocks = {k: block(np.array([s == k for s in shown])) for k in sorted({s for s in shown if s})}
    summary = {
        "method": f"{n_folds}-fold cross-validation by mosaic group, stratified by kind, {repeats} repeats: "
                  "thresholds chosen by tune's rule on the other folds, scored on the held-out fold",
        "folds": n_folds, "repeats": repeats, "per_kind_thresholds": per_kind, "bootstrap": n_boot,
        "overall": block(np.ones(n, bool)),
        "per_kind": per_kind_blocks,
        "not_reported": not_reported,
        "validation_thresholds": {"shared": dict(zip(("foreground_threshold", "seed_threshold", "min_seed_size",
                                                      "min_size"), combos[shared])),
                                  "own_kinds": sorted(own)},
    }
    return HonestEstimate(table, summary)


def format_estimate(summary: Mapping[str, Any], title: str = "honest estimate") -> str:
    """A fixed-width table of an estimate's summary: held-out DSB with its spread beside validation.

    Examples
    --------
    >>> s = {"overall": {"n_images": 4, "dsb": 0.45, "dsb_std_repeats": 0.0, "dsb_ci95": [0.2, 0.6],
    ...      "ap50": 0.5, "dsb_validation": 0.6}, "per_kind": {}, "not_reported": ["b (1 image)"], "folds": 4,
    ...      "repeats": 1}
    >>> print(format_estimate(s))  # doctest: +NORMALIZE_WHITESPACE
    honest estimate (4-fold CV by mosaic group and kind, 1 repeats; thresholds chosen without the image)
    kind             images  DSB held-out  (95% CI)       ±repeats  AP50  | DSB validation
    all                   4  0.450         (0.200-0.600)  0.000     0.500 | 0.600
    not reported on their own (under 3 images; in 'all'): b (1 image)
    """
    if "folds" not in summary:  # as tune stores it: the method in words
        head = f"{title} ({summary.get('method', 'cross-validated')})"
    else:
        head = (f"{title} ({summary.get('folds')}-fold CV by mosaic group and kind, {summary.get('repeats')} repeats; "
                "thresholds chosen without the image)")
    lines = [head, f"{'kind':<17}{'images':<8}{'DSB held-out':<14}{'(95% CI)':<15}{'±repeats':<10}{'AP50':<6}"
                   "| DSB validation"]
    for name, b in [("all", summary["overall"]), *summary.get("per_kind", {}).items()]:
        ci = b.get("dsb_ci95")
        ci_text = f"({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
        lines.append(f"{name:<17}{b['n_images']:<8}{b['dsb']:<14.3f}{ci_text:<15}{b['dsb_std_repeats']:<10.3f}"
                     f"{b['ap50']:<6.3f}| {b['dsb_validation']:.3f}")
    if summary.get("not_reported"):
        lines.append(f"not reported on their own (under {MIN_REPORT_IMAGES} images; in 'all'): "
                     + ", ".join(summary["not_reported"]))
    return "\n".join(lines)
