"""nucleiseg: find and outline every cell nucleus in a microscopy image."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
