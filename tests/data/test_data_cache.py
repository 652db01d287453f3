"""The prepared cache: contents, up-to-date re-runs, changed and removed sources, skipped images."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest

from nucleiseg.data import prepare_dataset, read_cache
from nucleiseg.errors import NucleisegError

from .conftest import (
    BRIGHTFIELD,
    DSB_TRAIN,
    FLUO_A,
    FLUO_B,
    KINDS,
    TISSUE,
    mask_files,
    read_masks,
    read_tif,
)


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cache_contents(dsb_cache):
    table = read_cache(dsb_cache)
    assert list(table.columns) == ["image_id", "height", "width", "kind", "n_nuclei", "group", "source", "split"]
    table = table.set_index("image_id")
    assert table["kind"].to_dict() == KINDS
    assert table.loc[FLUO_A, "group"] == table.loc[FLUO_B, "group"] == "mosaic062"
    assert table.loc[TISSUE, "group"] == ""
    assert table.loc[FLUO_A, "split"] == table.loc[FLUO_B, "split"]
    assert table.loc[TISSUE, "source"] == f"stage1_train/{TISSUE}/images/{TISSUE}.png"
    for image_id in KINDS:
        masks = read_masks(DSB_TRAIN, image_id)
        labels = read_tif(dsb_cache / "labels" / f"{image_id}.tif")
        assert labels.dtype == np.uint16
        assert table.loc[image_id, "n_nuclei"] == len(masks) == labels.max()
        assert (table.loc[image_id, "height"], table.loc[image_id, "width"]) == labels.shape
        for k, mask in enumerate(masks, start=1):
            np.testing.assert_array_equal(labels == k, mask)
        semantic = iio.imread(dsb_cache / "masks" / f"{image_id}.png")
        assert semantic.dtype == np.uint8 and set(np.unique(semantic)) <= {0, 255}
        np.testing.assert_array_equal(semantic == 255, labels > 0)
        rgb = iio.imread(dsb_cache / "images" / f"{image_id}.png")
        source = iio.imread(DSB_TRAIN / image_id / "images" / f"{image_id}.png")
        assert rgb.shape == labels.shape + (3,) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb, source[..., :3])
    manifest = json.loads((dsb_cache / "manifest.json").read_text())
    assert manifest["format"] == "nucleiseg-cache" and manifest["layout"] == "kaggle"
    assert manifest["groups_file"].endswith("mosaic_groups.csv")
    assert sorted(manifest["images"]) == sorted(KINDS) and manifest["skipped"] == []
    assert manifest["split"] == {"seed": 0, "val_fraction": 0.1}
    split = pd.read_csv(dsb_cache / "split.csv", dtype=str)
    assert list(split.columns) == ["image_id", "split"] and set(split["split"]) <= {"train", "val"}


def test_rerun_does_no_work_and_changes_are_redone(dsb_copy, tmp_path, caplog):
    out = tmp_path / "cache"
    first = prepare_dataset(dsb_copy, out, workers=1, progress=False)
    assert sorted(first.processed) == sorted(KINDS) and first.reused == []
    before = _mtimes(out)
    split_before = (out / "split.csv").read_text()

    # unchanged source: nothing processed, no file touched
    with caplog.at_level(logging.INFO, logger="nucleiseg"):
        again = prepare_dataset(dsb_copy, out, workers=1, progress=False)
    assert again.processed == [] and sorted(again.reused) == sorted(KINDS)
    assert _mtimes(out) == before
    assert any("0 processed, 4 reused" in r.getMessage() for r in caplog.records)

    # the parent folder or stage1_train itself: same sources, still up to date
    assert prepare_dataset(dsb_copy / "stage1_train", out, workers=1, progress=False).processed == []

    # a mask edited (one nucleus erased) -> only that image is redone, labels follow
    root = dsb_copy / "stage1_train"
    edited = mask_files(root, TISSUE)[0]
    iio.imwrite(edited, np.zeros_like(iio.imread(edited)))
    os.utime(edited, ns=(1, 1))
    # an image removed from the source -> dropped from the index, its files removed
    shutil.rmtree(root / BRIGHTFIELD)
    third = prepare_dataset(dsb_copy, out, workers=1, progress=False)
    assert third.processed == [TISSUE]
    assert sorted(third.reused) == sorted([FLUO_A, FLUO_B])
    assert third.dropped == [BRIGHTFIELD]
    assert not (out / "labels" / f"{BRIGHTFIELD}.tif").exists()
    table = read_cache(out).set_index("image_id")
    assert BRIGHTFIELD not in table.index
    assert table.loc[TISSUE, "n_nuclei"] == len(mask_files(root, TISSUE)) - 1
    labels = read_tif(out / "labels" / f"{TISSUE}.tif")
    assert labels.max() == len(mask_files(root, TISSUE)) - 1
    # untouched images keep their files and their split
    assert (out / "labels" / f"{FLUO_A}.tif").stat().st_mtime_ns == before[out / "labels" / f"{FLUO_A}.tif"]
    old_split = dict(line.split(",") for line in split_before.splitlines()[1:])
    for image_id, side in read_cache(out).set_index("image_id")["split"].items():
        assert side == old_split[image_id]

    # the image is back: it is processed and assigned, the others keep their side
    shutil.copytree(DSB_TRAIN / BRIGHTFIELD, root / BRIGHTFIELD)
    fourth = prepare_dataset(dsb_copy, out, workers=1, progress=False)
    assert fourth.processed == [BRIGHTFIELD]
    assert read_cache(out).set_index("image_id").loc[FLUO_A, "split"] == old_split[FLUO_A]


def test_force_and_new_seed(dsb_copy, tmp_path, caplog):
    out = tmp_path / "cache"
    prepare_dataset(dsb_copy, out, workers=1, progress=False)
    forced = prepare_dataset(dsb_copy, out, workers=1, progress=False, force=True)
    assert sorted(forced.processed) == sorted(KINDS)
    with caplog.at_level(logging.INFO, logger="nucleiseg"):
        prepare_dataset(dsb_copy, out, workers=1, progress=False, seed=3)
    assert any("split settings changed" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "manifest.json").read_text())["split"]["seed"] == 3


def test_process_pool_gives_the_same_cache(tmp_path, dsb_cache):
    out = tmp_path / "cache"
    result = prepare_dataset(DSB_TRAIN, out, workers=2, progress=False)
    assert sorted(result.processed) == sorted(KINDS)
    for image_id in KINDS:
        np.testing.assert_array_equal(
            read_tif(out / "labels" / f"{image_id}.tif"), read_tif(dsb_cache / "labels" / f"{image_id}.tif")
        )
    # source paths are relative to the folder given (here stage1_train itself); the rest is equal
    pd.testing.assert_frame_equal(read_cache(out).drop(columns="source"), read_cache(dsb_cache).drop(columns="source"))


def test_bad_sources_are_logged_and_listed(dsb_copy, tmp_path, caplog):
    root = dsb_copy / "stage1_train"
    # unreadable image: skipped, listed in the manifest with its reason
    (root / FLUO_B / "images" / f"{FLUO_B}.png").write_bytes(b"not a png")
    # all masks of an image unusable: skipped
    for path in mask_files(root, TISSUE):
        path.write_bytes(b"")
    # one overlapping mask: kept, warned about
    first = iio.imread(mask_files(root, FLUO_A)[0])
    iio.imwrite(root / FLUO_A / "masks" / "zz_overlap.png", first)
    with caplog.at_level(logging.WARNING, logger="nucleiseg"):
        result = prepare_dataset(dsb_copy, tmp_path / "cache", workers=1, progress=False)
    assert sorted(result.table["image_id"]) == sorted([FLUO_A, BRIGHTFIELD])
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"skipped {FLUO_B}" in m and "unreadable image" in m for m in messages)
    assert any(f"skipped {TISSUE}" in m and "masks is usable" in m for m in messages)
    assert any("zz_overlap.png" in m and "entirely inside earlier masks" in m for m in messages)
    assert sum("empty file" in m for m in messages) == len(mask_files(root, TISSUE))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    reasons = {s["image_id"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {FLUO_B, TISSUE}
    assert "zz_overlap.png" in " ".join(manifest["images"][FLUO_A]["warnings"])
    # an unchanged skipped source is not retried, but is still reported
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nucleiseg"):
        again = prepare_dataset(dsb_copy, tmp_path / "cache", workers=1, progress=False)
    assert again.processed == [] and len(again.skipped) == 2
    assert any(f"skipped {FLUO_B}" in r.getMessage() for r in caplog.records)


def test_errors(tmp_path, dsb_cache):
    with pytest.raises(NucleisegError, match="data folder not found") as err:
        prepare_dataset(tmp_path / "missing", tmp_path / "out")
    assert str(tmp_path / "missing") in str(err.value)
    (tmp_path / "unknown").mkdir()
    with pytest.raises(NucleisegError, match="not in a known data layout; looked for kaggle .* paired .* kaggle-rle"):
        prepare_dataset(tmp_path / "unknown", tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(NucleisegError, match="holds no nucleiseg cache"):
        prepare_dataset(DSB_TRAIN, busy)
    with pytest.raises(NucleisegError, match="val_fraction must be at least 0 and below 1"):
        prepare_dataset(DSB_TRAIN, tmp_path / "out", val_fraction=1.5)
    with pytest.raises(NucleisegError, match="not a prepared cache") as err:
        read_cache(busy)
    assert str(busy) in str(err.value)
    with pytest.raises(NucleisegError, match="cache folder not found"):
        read_cache(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(dsb_cache, broken)
    (broken / "split.csv").unlink()
    with pytest.raises(NucleisegError, match="split.csv"):
        read_cache(broken)


def test_interrupted_run_saves_what_is_done(dsb_copy, tmp_path, monkeypatch):
    from nucleiseg.data import cache as cache_module

    out = tmp_path / "cache"
    real = cache_module._process_sample
    calls = []

    def interrupt_on_third(*args):
        calls.append(args[0].image_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(cache_module, "_process_sample", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(dsb_copy, out, workers=1, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["images"]) == 2
    with pytest.raises(NucleisegError, match="interrupted"):
        read_cache(out)
    monkeypatch.setattr(cache_module, "_process_sample", real)
    result = prepare_dataset(dsb_copy, out, workers=1, progress=False)
    assert len(result.processed) == 2 and len(result.reused) == 2
    # the same cache as a run never interrupted, split included
    straight = prepare_dataset(dsb_copy, tmp_path / "straight", workers=1, progress=False)
    pd.testing.assert_frame_equal(read_cache(out), straight.table)


def test_interrupted_first_run_leaves_a_usable_folder(tmp_path, monkeypatch):
    from nucleiseg.data import cache as cache_module

    def interrupt(*args):
        raise KeyboardInterrupt

    out = tmp_path / "cache"
    (out / "images").mkdir(parents=True)  # as left by a run stopped before its first image was done
    monkeypatch.setattr(cache_module, "_process_sample", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(DSB_TRAIN, out, workers=1, progress=False)
    monkeypatch.undo()
    assert len(prepare_dataset(DSB_TRAIN, out, workers=1, progress=False).processed) == 4


# ----------------------------------------------------------------------------- damaged caches
@pytest.mark.parametrize("force", [False, True])
def test_a_damaged_index_is_rebuilt(tmp_path, force, caplog):
    """index.csv not UTF-8 (binary), or garbled: prepare warns and rebuilds it, processing its images again."""
    out = tmp_path / "cache"
    first = prepare_dataset(DSB_TRAIN, out, workers=1, progress=False)
    for damage in (bytes(range(256)), b"image_id,height\nx,abc\n", (out / "index.csv").read_bytes() * 2):
        (out / "index.csv").write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nucleiseg"):
            again = prepare_dataset(DSB_TRAIN, out, workers=1, progress=False, force=force)
        assert sorted(again.processed) == sorted(KINDS)
        assert any("index.csv" in r.getMessage() and "rebuilding it" in r.getMessage() for r in caplog.records)
        pd.testing.assert_frame_equal(read_cache(out), first.table)


@pytest.mark.parametrize("force", [False, True])
def test_a_damaged_split_is_drawn_again_with_a_warning(tmp_path, force, caplog):
    out = tmp_path / "cache"
    first = prepare_dataset(DSB_TRAIN, out, workers=1, progress=False)
    for damage in (b"\xe9\n", b"\n" + (out / "split.csv").read_bytes().splitlines()[-1] + b"\n"):  # not UTF-8; a row twice
        with open(out / "split.csv", "ab") as split:
            split.write(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nucleiseg"):
            again = prepare_dataset(DSB_TRAIN, out, workers=1, progress=False, force=force)
        assert again.processed == ([] if not force else again.processed)
        assert any("split.csv" in r.getMessage() and "drawing a new split" in r.getMessage() for r in caplog.records)
        pd.testing.assert_frame_equal(read_cache(out), first.table)  # the same seed draws the same split


@pytest.mark.parametrize("name, damage, problem", [
    ("split.csv", b"\xe9\n", "cannot be read (not UTF-8 text"),
    ("index.csv", bytes(range(256)), "cannot be read"),
    ("index.csv", b'"unterminated\n', "cannot be read"),
    ("split.csv", b"", "cannot be read"),
    ("split.csv", "{last}", "twice"),
    ("index.csv", "{last}", "twice"),
    ("index.csv", b"image_id,kind\n", "lacks the columns"),
])
def test_readers_refuse_a_damaged_table_in_one_line(tmp_path, dsb_cache, name, damage, problem):
    """read_cache (and so evaluate, train, tune, Cache.open) names the file, the problem and the command that
    rebuilds it; never a traceback."""
    from nucleiseg.data.cache import Cache

    broken = tmp_path / "broken"
    shutil.copytree(dsb_cache, broken)
    path = broken / name
    if damage == "{last}":
        damage = path.read_bytes().splitlines()[-1] + b"\n"
    if damage.startswith(b"image_id") or damage == b"":
        path.write_bytes(damage)
    else:
        with open(path, "ab") as handle:
            handle.write(damage)
    for read in (read_cache, Cache.open):
        with pytest.raises(NucleisegError) as err:
            read(broken)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and problem in message and "\n" not in message
        assert f"nucleiseg prepare {DSB_TRAIN.parent}" in message and f"--out {broken}' again to rebuild it" in message
    assert len(prepare_dataset(DSB_TRAIN.parent, broken, workers=1, progress=False).table) == 4
    read_cache(broken)


def test_a_garbled_count_is_refused_by_readers_and_rebuilt_by_prepare(tmp_path, dsb_cache):
    broken = tmp_path / "broken"
    shutil.copytree(dsb_cache, broken)
    index = pd.read_csv(broken / "index.csv", dtype=str, keep_default_na=False)
    index.loc[1, "height"] = "12.5"
    index.to_csv(broken / "index.csv", index=False)
    with pytest.raises(NucleisegError, match=r"index.csv: has height '12.5' for image .*, not a whole number >= 1"):
        read_cache(broken)
    result = prepare_dataset(DSB_TRAIN.parent, broken, workers=1, progress=False)
    assert sorted(result.processed) == sorted(KINDS)
    pd.testing.assert_frame_equal(read_cache(broken), read_cache(dsb_cache))


def test_prepare_cli_on_a_non_utf8_split_is_not_a_traceback(tmp_path, capsys):
    from nucleiseg.cli import main

    out = tmp_path / "cache1"
    assert main(["-q", "prepare", str(DSB_TRAIN.parent), "--out", str(out), "--workers", "1"]) == 0
    with open(out / "split.csv", "ab") as split:
        split.write(b"image_id,split\n\xe9\n")
    for extra in ([], ["--force"]):
        assert main(["-q", "prepare", str(DSB_TRAIN.parent), "--out", str(out), "--workers", "1", *extra]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert len(read_cache(out)) == 4


def test_a_damaged_cache_file_is_redone(dsb_copy, tmp_path, caplog):
    """A cache file truncated, or rewritten with its size kept, is processed again; the rest stays up to date."""
    out = tmp_path / "cache"
    prepare_dataset(dsb_copy, out, workers=1, progress=False)
    image = out / "images" / f"{TISSUE}.png"
    good = image.read_bytes()
    image.write_bytes(good[:100])
    labels = out / "labels" / f"{FLUO_A}.tif"
    stat = labels.stat()
    labels.write_bytes(bytes(stat.st_size))  # same size, rewritten an hour later
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 3600 * 10**9))
    with caplog.at_level(logging.WARNING, logger="nucleiseg"):
        again = prepare_dataset(dsb_copy, out, workers=1, progress=False)
    assert sorted(again.processed) == sorted([TISSUE, FLUO_A]) and sorted(again.reused) == sorted([FLUO_B, BRIGHTFIELD])
    assert sum("cache files changed since prepare wrote them" in r.getMessage() for r in caplog.records) == 2
    assert image.read_bytes() == good
    assert read_tif(labels).max() == read_cache(out).set_index("image_id").loc[FLUO_A, "n_nuclei"]
    before = _mtimes(out)
    assert prepare_dataset(dsb_copy, out, workers=1, progress=False).processed == []
    assert _mtimes(out) == before


def test_a_cache_of_an_earlier_version_is_still_up_to_date(dsb_copy, tmp_path):
    """A manifest without the cache files' sizes and times (written before they were recorded): its images are
    not redone; the record is added once."""
    out = tmp_path / "cache"
    prepare_dataset(dsb_copy, out, workers=1, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["images"].values():
        del entry["outputs"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert prepare_dataset(dsb_copy, out, workers=1, progress=False).processed == []
    assert all("outputs" in e for e in json.loads((out / "manifest.json").read_text())["images"].values())
    before = _mtimes(out)
    assert prepare_dataset(dsb_copy, out, workers=1, progress=False).processed == []
    assert _mtimes(out) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: workers die with prepare by PR_SET_PDEATHSIG")
def test_pool_workers_die_with_a_killed_prepare(tmp_path, outliving):
    """SIGKILL of prepare ends its pool's worker processes too (pipeline.worker_pool), none left running."""
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "slow_prepare.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from pathlib import Path

        from nucleiseg.data import cache

        def slow(*args):  # runs in the pool's workers: this file is their __main__ too
            (Path(__file__).parent / f"worker-{os.getpid()}").touch()
            time.sleep(120)

        cache._process_sample = slow
        if __name__ == "__main__":
            cache.prepare_dataset(sys.argv[1], sys.argv[2], workers=2, progress=False)
    """))
    proc = subprocess.Popen([sys.executable, str(script), str(DSB_TRAIN), str(tmp_path / "cache")])
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
        assert len(workers) == 2, "the pool's workers did not start"
        proc.kill()
        proc.wait()
        assert not outliving(workers), "prepare's workers outlived it"
    finally:
        proc.kill()
        for pid in workers:  # only what this test started, should the assertion above fail
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
