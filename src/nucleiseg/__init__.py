"""nucleiseg: find and outline every cell nucleus in a microscopy image.

>>> import nucleiseg                                        # doctest: +SKIP
>>> result = nucleiseg.segment(nucleiseg.io.read_image("cells.png"))  # doctest: +SKIP
>>> result.labels, result.table                             # doctest: +SKIP

``load_model`` and ``segment`` (from :mod:`nucleiseg.inference`), ``predict_files``
(from :mod:`nucleiseg.batch`) and ``PredictOptions`` (from :mod:`nucleiseg.options`)
are imported on first use, so ``import nucleiseg`` stays light (no PyTorch).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["PredictOptions", "__version__", "load_model", "predict_files", "segment"]

_LAZY = {"load_model": "inference", "segment": "inference", "predict_files": "batch", "PredictOptions": "options"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
