"""Scoring a segmentation against annotations: per-image table, summary JSON, report figure.

Everything is built on :mod:`nucleiseg.metrics`; nothing is re-implemented here.

Per image (``per_image.csv``)
    ``image_id, kind, n_true, n_pred, precision, recall, f1, iou, [auc], dsb, ap50,
    [dsb_cc], missing``. The pixel scores compare the foreground of the truth
    with the foreground of the prediction; ``dsb`` is the Kaggle Data Science
    Bowl 2018 instance score and ``ap50`` its term at IoU 0.5. With
    probabilities, ``auc`` is the pixel ROC AUC of the body probability and
    ``dsb_cc`` the DSB score of the connected-components baseline (each blob of
    ``p_body > foreground_threshold`` one nucleus, touching nuclei left merged),
    so the watershed's gain is ``dsb - dsb_cc``. ``missing`` marks images that
    had no prediction: they are scored as an empty prediction (DSB 0 when the
    truth has nuclei).

Summary (``summary.json``)
    ``overall`` and ``per_kind`` blocks with the same keys. Pixel precision,
    recall, F1, IoU and AUC are *micro-averaged*: the pixels of all images are
    pooled before the score is taken (large images weigh more). DSB and AP@0.5
    are *means over images* (the Kaggle dataset score; every image weighs the
    same). ``averaging`` in the JSON says so.

Use :class:`Evaluator` to stream images one at a time (the command line does,
so no probability maps pile up in memory), or :func:`evaluate_labels` for
dictionaries already in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import NucleisegError
from .io import atomic_path
from .metrics import PixelScoreAccumulator, instance_scores, summarize_instance_scores
from .options import PredictOptions
from .postprocess import PostprocessParams, connected_components

_DEFAULTS = PredictOptions()

__all__ = [
    "AVERAGING",
    "Evaluator",
    "evaluate_dataset",
    "evaluate_labels",
    "find_prediction",
    "format_summary",
    "open_dataset",
    "overlay_outlines",
    "write_report",
]

log = logging.getLogger(__name__)

#: How each summary score is averaged; written into ``summary.json``.
AVERAGING = {
    "precision, recall, f1, iou, auc": "micro: pixels of all images pooled, then scored",
    "dsb, ap50, dsb_cc": "mean over images (Kaggle DSB 2018 dataset score)",
    "dsb_per_threshold": "TP / (TP + FP + FN) at each IoU threshold, counts pooled over images",
}

_PIXEL_KEYS = ("precision", "recall", "f1", "iou")


class Evaluator:
    """Accumulate per-image scores one image at a time.

    Parameters
    ----------
    channels : sequence of str, optional
        Names of the channels of ``(C, H, W)`` probabilities passed to
        :meth:`add` (the body channel is ``channels.index("body")``). Not
        needed for ``(H, W)`` body probabilities; default: channel 0 is body.
    params : PostprocessParams, optional
        ``foreground_threshold`` and ``min_size`` of the connected-components
        baseline; defaults when omitted.

    Examples
    --------
    >>> ev = Evaluator()
    >>> truth = np.zeros((8, 8), int); truth[2:6, 2:6] = 1
    >>> _ = ev.add("a", truth, truth, kind="fluorescence")
    >>> table, summary = ev.result()
    >>> summary["overall"]["dsb"]
    1.0
    """

    def __init__(self, channels: Sequence[str] | None = None, params: PostprocessParams | None = None):
        self.channels = list(channels) if channels is not None else None
        self.params = params or PostprocessParams()
        self.rows: list[dict[str, Any]] = []
        self._instances: dict[str, list] = {}  # kind -> InstanceScores (and "__all__")
        self._baseline: dict[str, list[float]] = {}
        self._pixels: dict[str, PixelScoreAccumulator] = {}
        self._seen: set[str] = set()

    def _body(self, prob: np.ndarray) -> np.ndarray:
        prob = np.asarray(prob)
        if prob.ndim == 2:
            return prob
        if prob.ndim == 3:
            index = self.channels.index("body") if self.channels and "body" in self.channels else 0
            return prob[index]
        raise ValueError(f"probabilities must be (H, W) or (C, H, W), got shape {prob.shape}")

    def add(
        self,
        image_id: str,
        truth: np.ndarray,
        pred: np.ndarray | None,
        kind: str | None = None,
        prob: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Score one image; ``pred=None`` means no prediction (scored as empty).

        Returns the image's row of the per-image table.

        Raises
        ------
        NucleisegError
            The prediction (or probability map) does not have the truth's shape.
        ValueError
            The image id was added before.
        """
        image_id = str(image_id)
        if image_id in self._seen:
            raise ValueError(f"image {image_id} was added twice")
        self._seen.add(image_id)
        kind = "unknown" if kind is None or (isinstance(kind, float) and math.isnan(kind)) else str(kind)
        truth = np.asarray(truth)
        missing = pred is None
        pred = np.zeros(truth.shape, np.uint8) if pred is None else np.asarray(pred)
        if pred.shape != truth.shape:
            raise NucleisegError(
                f"prediction of image {image_id} has shape {pred.shape}, its annotation {truth.shape}"
            )
        body = None if prob is None else self._body(prob)
        if body is not None and body.shape != truth.shape:
            raise NucleisegError(
                f"probabilities of image {image_id} have shape {body.shape}, its annotation {truth.shape}"
            )

        inst = instance_scores(truth, pred)
        row: dict[str, Any] = {"image_id": image_id, "kind": kind, "n_true": inst.n_true, "n_pred": inst.n_pred}
        pixel = None
        for key in ("__all__", kind):
            acc = self._pixels.setdefault(key, PixelScoreAccumulator())
            scores = acc.update(truth, pred, prob=body)
            pixel = pixel or scores
            self._instances.setdefault(key, []).append(inst)
        row.update({k: pixel[k] for k in _PIXEL_KEYS})
        if body is not None:
            row["auc"] = pixel["auc"]
        row["dsb"] = inst.score
        row["ap50"] = inst.ap50
        if body is not None:
            baseline = connected_components(body, self.params.foreground_threshold, self.params.min_size)
            row["dsb_cc"] = instance_scores(truth, baseline).score
            for key in ("__all__", kind):
                self._baseline.setdefault(key, []).append(row["dsb_cc"])
        row["missing"] = missing
        self.rows.append(row)
        return row

    def _block(self, key: str) -> dict[str, Any]:
        acc = self._pixels[key]
        pixel = acc.scores("micro")
        inst = summarize_instance_scores(self._instances[key])
        block: dict[str, Any] = {"n_images": acc.n_images, "n_true": inst["n_true"], "n_pred": inst["n_pred"]}
        block.update({k: pixel[k] for k in _PIXEL_KEYS})
        if "auc" in pixel:
            block["auc"] = pixel["auc"]
        block["dsb"] = inst["score"]
        block["ap50"] = inst["ap50"]
        baseline = self._baseline.get(key, [])
        if baseline and len(baseline) == acc.n_images:
            block["dsb_cc"] = float(np.mean(baseline))
            block["dsb_gain_over_cc"] = block["dsb"] - block["dsb_cc"]
        block["dsb_per_threshold"] = {
            f"{t:.2f}": float(p) for t, p in zip(inst["thresholds"], inst["precision_per_threshold"])
        }
        return block

    def result(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The per-image table and the summary dict (JSON-ready: NaN becomes None)."""
        table = pd.DataFrame(self.rows)
        if table.empty:
            table = pd.DataFrame(columns=["image_id", "kind", "n_true", "n_pred", *_PIXEL_KEYS, "dsb", "ap50", "missing"])
        summary: dict[str, Any] = {
            "n_images": len(self.rows),
            "n_missing_predictions": int(sum(bool(r["missing"]) for r in self.rows)),
            "averaging": dict(AVERAGING),
        }
        if self.rows:
            summary["overall"] = self._block("__all__")
            kinds = sorted(k for k in self._pixels if k != "__all__")
            summary["per_kind"] = {k: self._block(k) for k in kinds}
            if "__all__" in self._baseline:
                summary["baseline"] = {
                    "dsb_cc": "connected components of p_body > foreground_threshold "
                    f"({self.params.foreground_threshold}), objects < {self.params.min_size} px removed",
                }
        return table, _json_ready(summary)


def evaluate_labels(
    truth: Mapping[str, np.ndarray],
    pred: Mapping[str, np.ndarray],
    kinds: Mapping[str, str] | None = None,
    probs: Mapping[str, np.ndarray] | None = None,
    *,
    channels: Sequence[str] | None = None,
    params: PostprocessParams | None = None,
    warn_missing: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score predicted instance labels against the truth, per image and overall.

    Parameters
    ----------
    truth : mapping image_id -> ndarray of int
        Annotated instance labels (0 = background). Every id here is scored.
    pred : mapping image_id -> ndarray of int
        Predicted instance labels. An id of ``truth`` absent here is scored as
        an empty prediction (DSB 0 when the truth has nuclei) with a warning.
    kinds : mapping image_id -> str, optional
        Image kind (fluorescence, tissue, brightfield) for the per-kind summary;
        ``"unknown"`` when omitted.
    probs : mapping image_id -> ndarray, optional
        Body probability ``(H, W)`` or all channels ``(C, H, W)`` (see
        ``channels``). Adds the pixel AUC and the connected-components baseline.
    channels : sequence of str, optional
        Channel names of ``(C, H, W)`` probabilities; the body channel is used.
    params : PostprocessParams, optional
        Threshold and minimum size of the connected-components baseline.
    warn_missing : bool
        Log a warning listing the ids of ``truth`` without a prediction.

    Returns
    -------
    per_image : pandas.DataFrame
        One row per image: ``image_id, kind, n_true, n_pred, precision, recall,
        f1, iou, [auc], dsb, ap50, [dsb_cc], missing``.
    summary : dict
        ``n_images, n_missing_predictions, averaging, overall, per_kind`` and,
        with probabilities, ``baseline``; JSON-ready (NaN as None). See the
        module notes for how each score is averaged.

    Examples
    --------
    >>> t = {"a": np.array([[0, 1, 1], [0, 1, 1]])}
    >>> table, summary = evaluate_labels(t, t, kinds={"a": "tissue"})
    >>> float(table.loc[0, "dsb"]), summary["per_kind"]["tissue"]["dsb"]
    (1.0, 1.0)
    """
    kinds = kinds or {}
    missing = [i for i in truth if i not in pred]
    if missing and warn_missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        log.warning(
            "%d of %d images have no prediction (%s); they are scored as an empty prediction "
            "(DSB 0 where the annotation has nuclei)", len(missing), len(truth), shown,
        )
    extra = [i for i in pred if i not in truth]
    if extra:
        log.warning("%d predictions have no annotation and are ignored (%s)", len(extra), ", ".join(map(str, extra[:5])))
    evaluator = Evaluator(channels=channels, params=params)
    for image_id, labels in truth.items():
        prob = None if probs is None else probs.get(image_id)
        evaluator.add(image_id, labels, pred.get(image_id), kinds.get(image_id), prob)
    return evaluator.result()


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# ------------------------------------------------------------------ reporting
def _stored_thresholds(summary: Mapping[str, Any]) -> str:
    """The line above the validation table: were the thresholds chosen on the images scored?"""
    if not summary.get("tuned_on_split"):
        return "with the model's stored thresholds"
    n, total = summary.get("tuned_on_images"), summary.get("overall", {}).get("n_images")
    chosen = "these same images" if n is None or n == total else f"{n} of these {total} images"
    return f"validation: the model's stored thresholds, chosen on {chosen} (optimistic; quote the honest estimate above)"


def format_summary(summary: dict[str, Any]) -> str:
    """A short fixed-width table of the summary: one line overall, one per kind.

    A kind with fewer than :data:`nucleiseg.honest.MIN_REPORT_IMAGES` images is listed without scores
    (``summary.json`` keeps them).
    """
    blocks = summary.get("per_kind") or {}
    if "overall" not in summary:
        return "no images were scored"
    first = []
    if summary.get("honest"):  # the figure to quote first; the table below is the validation figure
        from .honest import format_estimate

        source = summary["honest"].get("source")
        first = [format_estimate(summary["honest"], "honest estimate" + (f", {source}" if source else "")), "",
                 _stored_thresholds(summary)]
    with_auc = "auc" in summary["overall"]
    with_cc = "dsb_cc" in summary["overall"]
    head = f"{'kind':<14}{'images':>7}{'DSB':>8}{'AP50':>8}{'F1':>8}{'IoU':>8}"
    head += f"{'AUC':>8}" if with_auc else ""
    head += f"{'DSB(cc)':>9}" if with_cc else ""

    def fmt(x) -> str:
        return "     n/a" if x is None else f"{x:8.3f}"

    lines = [*first, head]
    from .honest import MIN_REPORT_IMAGES

    for name, block in [("all", summary["overall"]), *blocks.items()]:
        if name != "all" and block["n_images"] < MIN_REPORT_IMAGES:  # one or two images are a draw, not a figure
            lines.append(f"{name:<14}{block['n_images']:>7}  (under {MIN_REPORT_IMAGES} images: no figure of its "
                         "own; counted in 'all')")
            continue
        line = f"{name:<14}{block['n_images']:>7}" + "".join(fmt(block.get(k)) for k in ("dsb", "ap50", "f1", "iou"))
        line += fmt(block.get("auc")) if with_auc else ""
        line += " " + fmt(block.get("dsb_cc")) if with_cc else ""
        lines.append(line)
    lines.append("F1/IoU/AUC: pixels pooled over images; DSB/AP50: mean over images")
    if summary.get("n_missing_predictions"):
        lines.append(f"{summary['n_missing_predictions']} image(s) had no prediction and scored as empty")
    return "\n".join(lines)


def overlay_outlines(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A copy of an RGB image with every nucleus outlined, drawn by :func:`nucleiseg.io.draw_overlay`.

    The same drawing as ``nucleiseg predict``'s overlays (one colour per
    nucleus, darkened halo), so the report looks like the tool's outputs; grey
    or RGBA images and any integer label type are accepted.

    Examples
    --------
    >>> lab = np.zeros((6, 6), int); lab[1:5, 1:5] = 1
    >>> out = overlay_outlines(np.zeros((6, 6, 3), np.uint8), lab)
    >>> int((out.sum(axis=-1) > 0).sum())  # the 12 border pixels of a 4 x 4 square
    12
    """
    from .io import draw_overlay

    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.unsignedinteger) and labels.dtype.itemsize >= 8:
        labels = labels.astype(np.int64)
    return draw_overlay(rgb, labels)


def _pick_rows(per_image: pd.DataFrame, n: int = 3) -> list[tuple[str, pd.Series]]:
    """The n best and n worst images by DSB (each image at most once)."""
    ordered = per_image.sort_values(["dsb", "image_id"], ascending=[False, True], kind="mergesort")
    best = list(ordered.head(n).itertuples(index=False))
    taken = {r.image_id for r in best}
    worst = [r for r in ordered.iloc[::-1].itertuples(index=False) if r.image_id not in taken][:n]
    return [("best", r) for r in best] + [("worst", r) for r in reversed(worst)]


def _short(image_id: str, n: int = 16) -> str:
    return image_id if len(image_id) <= n else image_id[: n - 1] + "…"


def _draw_report(path: Path, per_image: pd.DataFrame, summary: dict, images, truth, pred, with_panels=True) -> None:
    # A bare Figure draws with Agg and leaves pyplot's global state (and backend) alone.
    from matplotlib.figure import Figure

    picks = _pick_rows(per_image) if with_panels and len(per_image) else []
    n_rows = len(picks)
    fig = Figure(figsize=(10.5, 2.2 + 3.0 * n_rows), dpi=100, layout="constrained")
    grid = fig.add_gridspec(n_rows + 1, 3, height_ratios=[2.0] + [3.0] * n_rows)

    ax = fig.add_subplot(grid[0, :])
    scores = per_image["dsb"].to_numpy(dtype=float) if len(per_image) else np.zeros(0)
    ax.hist(scores, bins=np.linspace(0, 1, 21), color="#4477aa", edgecolor="white")
    overall = summary.get("overall", {})
    title = f"DSB score per image ({len(scores)} images; mean {overall.get('dsb', float('nan')):.3f}"
    if overall.get("dsb_cc") is not None:
        title += f", connected-components baseline {overall['dsb_cc']:.3f}"
    ax.set_title(title + ")", fontsize=11)
    ax.set_xlabel("DSB 2018 score (mean precision over IoU 0.50–0.95)")
    ax.set_ylabel("images")
    ax.set_xlim(0, 1)

    for row, (which, r) in enumerate(picks, start=1):
        rgb = np.asarray(images[r.image_id])
        t = np.asarray(truth[r.image_id])
        p = pred.get(r.image_id) if hasattr(pred, "get") else pred[r.image_id]
        p = np.zeros_like(t) if p is None else np.asarray(p)
        panels = [
            (rgb, f"{which}: {_short(r.image_id)} ({r.kind})"),
            (overlay_outlines(rgb, t), f"truth: {r.n_true} nuclei"),
            (overlay_outlines(rgb, p),
             f"prediction: {r.n_pred} nuclei, DSB {r.dsb:.3f}" + (" (missing)" if r.missing else "")),
        ]
        for col, (img, label) in enumerate(panels):
            a = fig.add_subplot(grid[row, col])
            a.imshow(img, interpolation="antialiased")  # 1-px outlines survive the downscaling
            a.set_title(label, fontsize=9)
            a.set_axis_off()
    fig.savefig(path, format="png")


def write_report(
    out_dir: str | Path,
    per_image: pd.DataFrame,
    summary: dict[str, Any],
    images: Mapping[str, np.ndarray] | None = None,
    truth: Mapping[str, np.ndarray] | None = None,
    pred: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Path]:
    """Write ``per_image.csv``, ``summary.json`` and ``report.png`` into ``out_dir``, atomically.

    Parameters
    ----------
    out_dir : str or Path
        Created if needed; files there of the same names are replaced.
    per_image, summary
        What :func:`evaluate_labels` returned.
    images, truth, pred : mapping image_id -> ndarray, optional
        RGB images, true and predicted labels. Only the 3 best and 3 worst
        images by DSB are looked up, so lazy mappings that read files on access
        are fine. Without them the figure holds only the histogram. A missing
        prediction (``pred.get(id)`` is None) is drawn as an empty one.

    Returns
    -------
    dict
        ``{"per_image": path, "summary": path, "report": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f for name, f in (("per_image", "per_image.csv"), ("summary", "summary.json"),
                                               ("report", "report.png"))}
    with atomic_path(paths["per_image"]) as tmp:
        per_image.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(paths["summary"]) as tmp:
        tmp.write_text(json.dumps(_json_ready(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with atomic_path(paths["report"]) as tmp:
        with_panels = images is not None and truth is not None and pred is not None
        _draw_report(tmp, per_image, summary, images, truth, pred, with_panels=with_panels)
    return paths


# ------------------------------------------------------------ whole data sets
#: File names looked for in a folder of predicted labels, in this order: ``_labels`` first, because
#: ``nucleiseg predict`` may write its labels beside the input image itself (``<id>.png``).
PREDICTION_PATTERNS = ("{id}_labels.tif", "{id}_labels.tiff", "{id}_labels.png", "{id}.tif", "{id}.tiff", "{id}.png")


def find_prediction(folder: Path, image_id: str) -> Path | None:
    """The predicted label file of ``image_id`` in ``folder`` (see :data:`PREDICTION_PATTERNS`), or None."""
    for pattern in PREDICTION_PATTERNS:
        path = folder / pattern.format(id=image_id)
        if path.is_file():
            return path
    return None


def _tuned_on(tuning: Mapping[str, Any], images: Mapping[str, np.ndarray], split: str) -> int:
    """How many of ``images`` (by id) a model's ``tuning`` record says its thresholds were chosen on.

    Models tuned since the fourteenth session record their tuning images (:func:`nucleiseg.tuning.image_digests`);
    for older records the split's name and its number of images must both match (then all, else none).
    """
    if tuning.get("images"):
        from .tuning import image_digests

        return len(set(tuning["images"]).intersection(image_digests(images[i] for i in images)))
    return len(images) if tuning.get("split") in (split, "all") and tuning.get("n_images") == len(images) else 0


def open_dataset(data: str | Path, split: str | None, fallback_dir: str | Path | None = None, progress: bool = True):
    """The cache folder and its rows of ``split``, for a cache or a raw data folder.

    A folder that is not a prepared cache is prepared (incrementally, with
    ``nucleiseg prepare``'s defaults) into ``<DATA>-cache`` beside it, the
    folder ``nucleiseg train`` prepares raw data into, so a model trained on
    ``DATA`` is evaluated on the same validation split. When that folder
    cannot be written, ``fallback_dir`` is used instead.

    ``split=None`` means ``"val"`` for a cache (given, or ``<DATA>-cache``
    already there from training) and ``"all"`` for a data folder seen for the
    first time (it has no training split to keep apart).

    Returns
    -------
    cache_dir : Path
    table : pandas.DataFrame
        :func:`nucleiseg.data.cache.read_cache` rows of the split.
    split : str
        The split used.
    """
    import os

    from .data.cache import Cache, cache_beside, prepare_dataset, read_cache

    data = Path(data)
    if not data.exists():
        raise NucleisegError("no such folder", data)
    if split is not None and split not in ("val", "train", "all"):
        raise NucleisegError(f"unknown split {split!r}; choose val, train or all")
    if Cache.is_cache(data) or not data.is_dir():
        cache_dir = data
        table = read_cache(data)
        split = split or "val"
    else:
        cache_dir = cache_beside(data)
        existed = Cache.is_cache(cache_dir)
        if not existed and not os.access(data.parent, os.W_OK) and fallback_dir is not None:
            cache_dir = Path(fallback_dir)
            existed = Cache.is_cache(cache_dir)
        log.info("preparing %s into %s", data, cache_dir)
        try:
            result = prepare_dataset(data, cache_dir, progress=progress)
        except NucleisegError as exc:
            if exc.path is not None and Path(exc.path) == data:
                raise NucleisegError(
                    f"not a prepared cache (no manifest.json), and as a data folder: {exc.message}", data
                ) from None
            raise
        table = read_cache(result.cache_dir)
        split = split or ("val" if existed else "all")
    if split != "all":
        table = table[table["split"] == split]
    if table.empty:
        raise NucleisegError(f"the cache has no images in the {split!r} split (see split.csv); score the split 'all' instead", cache_dir)
    log.info("evaluating the %s split of %s: %d images", split, cache_dir, len(table))
    return Path(cache_dir), table.reset_index(drop=True), split


class _CacheFiles(Mapping):
    """Read-on-access mapping image_id -> array of a cache's images/ or labels/ files."""

    def __init__(self, cache_dir: Path, ids: Sequence[str], what: str):
        from .data.cache import Cache

        self.cache, self.ids, self.what = Cache(Path(cache_dir)), list(ids), what

    def __getitem__(self, image_id: str) -> np.ndarray:
        return self.cache.image(image_id) if self.what == "images" else self.cache.labels(image_id)

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def _compact(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    return labels.astype(np.uint16) if top <= np.iinfo(np.uint16).max else labels


def evaluate_dataset(
    data: str | Path,
    out_dir: str | Path,
    *,
    model: str | Path | None = None,
    labels_dir: str | Path | None = None,
    split: str | None = None,
    options: PredictOptions | Mapping[str, Any] | None = None,
    progress: bool = True,
    honest: bool | None = None,
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Path]]:
    """Score a model (or a folder of predicted labels) on a prepared cache; write the report.

    This is ``nucleiseg evaluate``.

    Parameters
    ----------
    data : str or Path
        A prepared cache, or a data folder ``nucleiseg prepare`` reads (it is
        then prepared first; see :func:`open_dataset`).
    out_dir : str or Path
        Receives ``per_image.csv``, ``summary.json`` and ``report.png``.
    model : str or Path, optional
        Model file, run folder or ``"default"``; used when ``labels_dir`` is None.
    labels_dir : str or Path, optional
        Folder of predicted label images named ``<image_id>_labels.tif`` (what
        ``nucleiseg predict`` writes; looked for first) or ``<image_id>.tif|.tiff|.png``. Images
        without one are warned about and scored as an empty prediction.
    split : {'val', 'train', 'all'}, optional
        Images to score; default ``val`` for a cache, ``all`` for a new data
        folder (see :func:`open_dataset`).
    options : PredictOptions or mapping, optional
        How the model predicts (mode, TTA, tiles, precision, scale or nucleus
        diameter: see :class:`~nucleiseg.options.PredictOptions`); the
        defaults are ``nucleiseg predict``'s.
    progress : bool
        Progress bar on stderr.
    honest : bool, optional
        Also score every image under ``tune``'s whole threshold grid and
        cross-validate the choice by mosaic group and kind
        (:func:`nucleiseg.honest.nested_cv_estimate`): ``summary["honest"]``,
        the score of thresholds chosen without the image. Default (None): when
        a model is scored on the split its thresholds were tuned on (its
        ``"tuning"`` record), where the plain figure is optimistic: the
        estimate ``tune`` stored (accurate mode) when it has one for as many
        images, else computed here. Computing it costs the 100 watersheds per
        image of ``tune``.

    Returns
    -------
    per_image, summary, paths
        As :func:`evaluate_labels` and :func:`write_report`; the summary also
        records what was evaluated (``data``, ``split``, ``model`` or ``labels``).
    """
    from tqdm import tqdm

    from .io import read_labels

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NucleisegError("is a file; expected an output folder", out_dir)
    cache_dir, table, split = open_dataset(data, split, out_dir / "cache", progress=progress)
    ids = table["image_id"].astype(str).tolist()
    kinds = dict(zip(ids, table["kind"].astype(str)))
    truth = _CacheFiles(cache_dir, ids, "labels")
    images = _CacheFiles(cache_dir, ids, "images")
    preds: dict[str, np.ndarray] = {}
    about: dict[str, Any] = {"data": str(Path(data)), "cache": str(cache_dir), "split": split}

    bar = dict(desc="evaluate", unit="image", file=sys.stderr, disable=None if progress else True)
    if labels_dir is not None:
        labels_dir = Path(labels_dir)
        if not labels_dir.is_dir():
            raise NucleisegError("prediction folder not found", labels_dir)
        found = {i: find_prediction(labels_dir, i) for i in ids}
        missing = [i for i, p in found.items() if p is None]
        if len(missing) == len(ids):
            raise NucleisegError(
                f"no predicted labels for any of the {len(ids)} images; looked for "
                f"{', '.join(p.format(id='<image_id>') for p in PREDICTION_PATTERNS[:4])}", labels_dir
            )
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            log.warning(
                "no predicted labels for %d of %d images in %s (%s); they score 0 (an empty prediction)",
                len(missing), len(ids), labels_dir, shown,
            )
        evaluator = Evaluator()
        for image_id in tqdm(ids, **bar):
            path = found[image_id]
            pred = None if path is None else _compact(read_labels(path))
            true = truth[image_id]
            if pred is not None:
                if pred.shape != true.shape:
                    raise NucleisegError(f"labels of {pred.shape[0]}x{pred.shape[1]} pixels, but image {image_id} "
                                         f"is {true.shape[0]}x{true.shape[1]}", path)
                preds[image_id] = pred
            evaluator.add(image_id, true, pred, kinds[image_id])
        about["labels"] = str(labels_dir)
    else:
        from .inference import load_model, predict_labels, resolve_device

        opts = PredictOptions.from_any(options)
        net = load_model(model, resolve_device(opts.device))
        opts = opts.resolved(net.depth, net.nucleus_diameter)
        channels = list(net.channels)
        params = net.postprocess
        tuning = net.metadata.get("tuning") or {}
        tuned_on = _tuned_on(tuning, images, split)
        tuned_on_split = tuned_on > 0
        stored = tuning.get("honest_estimate") or {}
        if honest is None and tuned_on == len(ids) == tuning.get("n_images") and stored.get("overall"):
            # tune's own estimate on these images (accurate mode): printed at no cost; --honest recomputes it
            about["honest"] = {**stored, "source": "stored by tune (accurate mode)"}
            about["tuned_on_split"] = True
            about["tuned_on_images"] = tuned_on
            honest = False
        honest = tuned_on_split if honest is None else honest
        evaluator = Evaluator(channels=channels, params=params)
        grid_rows = []
        for image_id in tqdm(ids, **bar):
            rgb = images[image_id]
            # the thresholds of the image's kind, as segment() / predict use them
            probs, pred, _ = predict_labels(net, rgb, net.postprocess_for(rgb), opts)
            pred = _compact(pred)
            preds[image_id] = pred
            evaluator.add(image_id, truth[image_id], pred, kinds[image_id], probs)
            if honest:
                from .tuning import score_grid

                combos, image_scores = score_grid([probs], [truth[image_id]], channels)
                grid_rows.append(image_scores[0])
        if honest:
            from .honest import nested_cv_estimate

            try:
                about["honest"] = nested_cv_estimate(
                    combos, np.stack(grid_rows), [kinds[i] for i in ids], table["group"].tolist(), ids
                ).summary
                about["tuned_on_split"] = tuned_on_split
                about["tuned_on_images"] = tuned_on
            except ValueError as exc:  # a single image or mosaic: nothing to hold out
                log.warning("no honest estimate: %s", exc)
        if net.postprocess_by_kind:
            about["postprocess_by_kind"] = {kind: p.to_dict() for kind, p in net.postprocess_by_kind.items()}
        about.update(model=str(model or "default"), mode=opts.mode, postprocess=params.to_dict(),
                     **{k: v for k, v in dataclasses.asdict(opts).items()
                        if k != "mode" and v != getattr(_DEFAULTS, k) and isinstance(v, (bool, int, float, str))})
    per_image, summary = evaluator.result()
    extra = {k: about.pop(k) for k in ("honest", "tuned_on_split", "tuned_on_images") if k in about}
    summary = {**extra, "evaluated": about, **summary}
    paths = write_report(out_dir, per_image, summary, images, truth, preds)
    return per_image, summary, paths
