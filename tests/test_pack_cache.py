"""scripts/pack_cache.py: a cache packed and unpacked elsewhere is the same cache."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import tifffile

from nucleiseg.data.cache import read_cache
from nucleiseg.io import read_image

SCRIPTS = Path(__file__).parent.parent / "scripts"


def test_pack_then_unpack_gives_the_same_cache(fixture_cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))  # importable by name: unpack's worker processes need that
    pack_cache = importlib.import_module("pack_cache")
    packed = tmp_path / "packed" / "cache.zip"
    pack_cache.pack(fixture_cache, packed)
    out = tmp_path / "elsewhere"
    pack_cache.unpack(packed, out)
    before, after = read_cache(fixture_cache), read_cache(out)
    assert before.equals(after) and len(after) == 4
    for image_id in after["image_id"]:
        for folder, suffix in (("images", "png"), ("masks", "png")):
            a, b = read_image(fixture_cache / folder / f"{image_id}.{suffix}"), read_image(out / folder / f"{image_id}.{suffix}")
            assert a.shape == b.shape and np.array_equal(a, b), (folder, image_id)
        labels = tifffile.imread(fixture_cache / "labels" / f"{image_id}.tif")
        assert np.array_equal(labels, tifffile.imread(out / "labels" / f"{image_id}.tif"))
    assert packed.stat().st_size < sum(p.stat().st_size for p in fixture_cache.rglob("*") if p.is_file())
