"""Annotated data: reading the supported layouts into one prepared cache.

:func:`prepare_dataset` ingests a data set once (``nucleiseg prepare``);
:func:`read_cache` gives the prepared table (index with train/val split).
"""

from __future__ import annotations

from .cache import PrepareResult, prepare_dataset, read_cache

__all__ = ["PrepareResult", "prepare_dataset", "read_cache"]
