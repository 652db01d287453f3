"""The plugin's reader, writers and sample data (npe2 commands; no Qt, no torch).

- :func:`get_reader`: ``<name>_labels.tif`` as written by ``nucleiseg predict``, opened as a Labels
  layer with ``<name>_nuclei.csv`` beside it (when present) as the layer's ``features``.
- :func:`write_imagej_rois`, :func:`write_geojson`: a Labels layer to Fiji's ROI Manager zip or to
  QuPath detections, by :func:`nucleiseg.io.write_imagej_rois` / :func:`nucleiseg.io.write_geojson`.
- :func:`fluorescence`, :func:`tissue`, :func:`brightfield`: the example images (``samples/``, the
  same files as the repository's ``examples/images``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLES",
    "brightfield",
    "fluorescence",
    "get_reader",
    "labels_features",
    "read_nucleiseg_labels",
    "tissue",
    "write_geojson",
    "write_imagej_rois",
]

SAMPLES = Path(__file__).resolve().parent / "samples"

_LABELS_SUFFIXES = ("_labels.tif", "_labels.tiff")


def labels_features(table: Any) -> Any:
    """A per-nucleus table as a Labels layer's ``features``: an ``index`` column (the label values) first.

    napari finds a label's row through ``index`` (the hover status and the features table).

    Examples
    --------
    >>> import pandas as pd
    >>> labels_features(pd.DataFrame({"label": [1, 2], "area": [30.0, 41.0]})).columns.tolist()
    ['index', 'label', 'area']
    """
    import pandas as pd

    table = pd.DataFrame(table).reset_index(drop=True)
    if "index" in table.columns:
        return table
    index = table["label"].astype(np.int64) if "label" in table.columns else pd.RangeIndex(1, len(table) + 1)
    return pd.concat([pd.Series(np.asarray(index), name="index"), table], axis=1)


def _table_path(path: Path) -> Path | None:
    name = path.name
    for suffix in _LABELS_SUFFIXES:
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + "_nuclei.csv")
    return None


def read_nucleiseg_labels(path: str | Path) -> list[tuple[np.ndarray, dict, str]]:
    """napari layer data for a ``<name>_labels.tif``: one Labels layer, its table as features.

    Raises
    ------
    nucleiseg.errors.ImageReadError
        Not a readable label image.
    """
    import pandas as pd

    from ..io import read_labels

    path = Path(path)
    labels = read_labels(path)
    name = path.name
    for suffix in _LABELS_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    kwargs: dict[str, Any] = {"name": f"{name} nuclei", "metadata": {"nucleiseg": {"role": "result", "image": name,
                                                                                      "source": str(path)}}}
    table = _table_path(path)
    if table is not None and table.is_file():
        try:  # the table is optional: a damaged one costs its features, not the labels
            kwargs["features"] = labels_features(pd.read_csv(table))
        except (OSError, ValueError, KeyError) as exc:  # pandas' parser and empty-file errors are ValueErrors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("%s: not read (%s); the labels open without their measurements", table, first)
    return [(labels, kwargs, "labels")]


def get_reader(path: str | list[str]):
    """The reader for ``<name>_labels.tif`` files, None for anything else (napari then asks other readers)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith(_LABELS_SUFFIXES):
        return None
    return read_nucleiseg_labels


def _labels_2d(data: Any, path: str) -> np.ndarray:
    from ..errors import NucleisegError

    labels = np.asarray(data)
    if labels.ndim != 2:
        raise NucleisegError(f"only 2-D Labels layers can be written, this one has shape {labels.shape}", path)
    return labels


def write_imagej_rois(path: str, data: Any, meta: dict) -> list[str]:
    """A Labels layer as an ImageJ ROI zip (Fiji's ROI Manager), one polygon per nucleus."""
    from ..io import write_imagej_rois as write

    write(path, _labels_2d(data, path))
    return [path]


def write_geojson(path: str, data: Any, meta: dict) -> list[str]:
    """A Labels layer as QuPath detections in GeoJSON (*File > Import objects*)."""
    from ..io import write_geojson as write

    write(path, _labels_2d(data, path))
    return [path]


def _sample(name: str, kind: str) -> list[tuple[np.ndarray, dict, str]]:
    from ..io import read_image

    image = read_image(SAMPLES / f"{name}.png")
    rgb = image.ndim == 3
    return [(image, {"name": name, "rgb": rgb, "metadata": {"nucleiseg": {"sample": kind}}}, "image")]


def fluorescence() -> list[tuple[np.ndarray, dict, str]]:
    """Fluorescent nuclei (a DSB2018 image)."""
    return _sample("fluorescence", "fluorescence")


def tissue() -> list[tuple[np.ndarray, dict, str]]:
    """Stained tissue, RGB (a DSB2018 image)."""
    return _sample("tissue", "tissue")


def brightfield() -> list[tuple[np.ndarray, dict, str]]:
    """A crop of a grey brightfield image (DSB2018)."""
    return _sample("brightfield", "brightfield")
