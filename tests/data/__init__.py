"""Tests of nucleiseg.data (ingestion, the prepared cache, the split)."""
