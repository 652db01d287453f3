"""The batch workflow (nucleiseg.predict_files): outputs complete or absent, whatever kills a run.

A run is killed (SIGKILL, in a forked child) before each of its file operations in turn; the next run
must finish the batch with outputs byte-identical to an uninterrupted run's, and report nothing failed.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nucleiseg import batch
from nucleiseg.batch import OutputFolder, predict_files
from nucleiseg.errors import NucleisegError, OptionError
from nucleiseg.io import read_image, write_png
from nucleiseg.options import PredictOptions

DSB_TRAIN = Path(__file__).resolve().parent / "fixtures" / "dsb" / "stage1_train"
FLUO = "0b2e702f90aee4fff2bc6e4326308d50cf04701082e718d4f831c8959fbcda93"
TISSUE = "af576e8ec3a8d0b57eb6a311299e9e4fd2047970d3dd9d6f52e54ea6a91109da"
FORMATS = ["rle", "imagej-roi", "geojson"]


def _fixture(image_id: str, size: int) -> np.ndarray:
    return read_image(DSB_TRAIN / image_id / "images" / f"{image_id}.png")[:size, :size]


@pytest.fixture(scope="module")
def model(blob_model_file: str):
    """A tiny loaded model that finds blobs (tests/conftest.py)."""
    from nucleiseg.inference import load_model

    return load_model(blob_model_file)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    write_png(folder / "fluo.png", _fixture(FLUO, 72))
    write_png(folder / "tissue.png", _fixture(TISSUE, 64)[..., :3])
    return folder


def _snapshot(out: Path) -> dict[str, object]:
    """Every output file's bytes (the bookkeeping folder aside); of summary.csv, what was found per image."""
    files: dict[str, object] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    files["summary.csv"] = pd.read_csv(out / "summary.csv")[["image", "name", "nuclei", "mean_area"]].to_dict()
    return files


def _run(images: Path, out: Path, model, **kwargs) -> pd.DataFrame:
    return predict_files([images], out, model=model, options=PredictOptions(precision="fp32"), formats=FORMATS,
                         save_probabilities=True, progress=False, say=lambda kind, text: None, **kwargs)


def _killed_run(images: Path, out: Path, model, kill_at: int) -> int:
    """Run predict_files in a forked child that SIGKILLs itself before its kill_at-th file operation.

    Returns how many file operations the child reached (fewer than kill_at: it finished)."""
    counter = {"n": 0}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        signal.alarm(120)  # a child that hangs (a lock inherited through fork) dies instead of hanging the suite

        def hooked(real):
            def operation(*args, **kwargs):
                counter["n"] += 1
                os.write(write_end, b".")
                if counter["n"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)
            return operation

        os.replace = hooked(os.replace)
        os.unlink = hooked(os.unlink)
        try:
            _run(images, out, model)
        finally:
            os._exit(0)
    os.close(write_end)
    reached = 0
    while chunk := os.read(read_end, 4096):
        reached += len(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return reached


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_at_every_file_operation_a_rerun_finishes_the_batch(tmp_path: Path, images: Path, model) -> None:
    reference = tmp_path / "reference"
    _run(images, reference, model)
    expected = _snapshot(reference)
    assert "submission.csv" in expected and "fluo_labels.tif" in expected

    kills = 0
    kill_at = 1
    while True:
        out = tmp_path / f"killed-{kill_at}"
        reached = _killed_run(images, out, model, kill_at)
        if reached < kill_at:  # the run ended before this operation: every moment was tried
            break
        kills += 1
        # whatever the moment, an image's outputs are complete or absent ...
        done = {p.stem for p in (out / ".nucleiseg" / "done").glob("*.json")} if out.exists() else set()
        for name in ("fluo", "tissue"):
            present = [p for p in out.glob(f"{name}*")] if out.exists() else []
            if name in done:
                assert len(present) == 7, (kill_at, present)
        # ... and the next run finishes the batch, with nothing failed
        summary = _run(images, out, model)
        assert (summary["status"] != "failed").all(), (kill_at, summary)
        assert _snapshot(out) == expected, kill_at
        assert not list((out / ".nucleiseg" / "staging").iterdir())
        kill_at += 1
    print(f"{kills} kills survived")
    assert kills >= 20  # 7 outputs and a record per image, the journal, summary and submission


def test_summary_and_skip(tmp_path: Path, images: Path, model) -> None:
    out = tmp_path / "out"
    summary = _run(images, out, model)
    assert list(summary.columns) == batch.SUMMARY_COLUMNS
    assert summary["status"].tolist() == ["ok", "ok"] and (summary["nuclei"] > 0).all()
    again = _run(images, out, model)
    assert again["status"].tolist() == ["skipped", "skipped"]
    assert again["nuclei"].tolist() == summary["nuclei"].tolist()  # from the records
    # an output deleted by hand makes the image incomplete: redone, not skipped
    (out / "fluo_mask.png").unlink()
    third = _run(images, out, model)
    assert third.set_index("name")["status"].to_dict() == {"fluo": "ok", "tissue": "skipped"}


def test_overwrite_replaces_the_whole_output_set(tmp_path: Path, images: Path, model) -> None:
    out = tmp_path / "out"
    _run(images, out, model)
    assert (out / "fluo.geojson").is_file() and (out / "fluo_rois.zip").is_file()
    summary = predict_files([images], out, model=model, overwrite=True, progress=False,
                            options={"precision": "fp32", "min_size": 400})
    assert (summary["status"] == "ok").all()
    for stale in ("fluo.geojson", "fluo_rois.zip", "fluo_probabilities.tif"):
        assert not (out / stale).exists(), stale  # formats not asked for this time are gone
    assert pd.read_csv(out / "fluo_nuclei.csv")["area"].min() >= 400


def test_output_folder_checked_before_any_work(tmp_path: Path, images: Path, model, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(batch, "predict_one", lambda *a, **k: calls.append(a))
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    with pytest.raises(NucleisegError, match="a part of the path is a file"):
        predict_files([images], a_file / "sub", model=model, progress=False)
    with pytest.raises(NucleisegError, match="expected an output folder"):
        predict_files([images], a_file, model=model, progress=False)
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops others
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
        with pytest.raises(NucleisegError, match="cannot write the output folder"):
            predict_files([images], read_only / "out", model=model, progress=False)
    assert not calls


def test_one_run_at_a_time(tmp_path: Path, images: Path, model) -> None:
    out = tmp_path / "out"
    with OutputFolder(out):  # another run holds the folder
        with pytest.raises(NucleisegError, match="another nucleiseg run .* is writing into this folder"):
            _run(images, out, model)
    assert (_run(images, out, model)["status"] == "ok").all()  # released: the next run goes ahead


def test_file_names_that_are_not_utf8(tmp_path: Path, images: Path, model) -> None:
    odd = images / os.fsdecode(b"cells-\xff.png")
    os.rename(images / "fluo.png", odd)
    out = tmp_path / "out"
    summary = _run(images, out, model)
    assert (summary["status"] == "ok").all()
    assert "cells-\\xff" in set(pd.read_csv(out / "summary.csv")["name"])
    assert "cells-\\xff" in (out / "submission.csv").read_text()
    assert (out / os.fsdecode(b"cells-\xff_labels.tif")).is_file()


def test_disk_full_fails_the_image_in_one_line(tmp_path: Path, images: Path, model, monkeypatch) -> None:
    from nucleiseg import io

    real = io.write_png

    def full(path, image):
        if "tissue" in Path(path).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, image)

    monkeypatch.setattr(io, "write_png", full)
    lines = []
    out = tmp_path / "out"
    summary = predict_files([images], out, model=model, progress=False, say=lambda k, t: lines.append((k, t)))
    status = summary.set_index("name")["status"].to_dict()
    assert status == {"fluo": "ok", "tissue": "failed"}
    errors = [t for k, t in lines if k == "error"]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "tissue.png" in errors[0]
    assert not list(out.glob("tissue*")) and not list((out / ".nucleiseg" / "staging").iterdir())


def test_options_checked_once_with_the_cli_words(tmp_path: Path, images: Path, model, capsys) -> None:
    from nucleiseg.cli import main

    with pytest.raises(OptionError, match="tile must be a multiple of 4"):
        predict_files([images], tmp_path / "out", model=model, options={"tile": 30, "overlap": 8})
    for args, message in [
        (["--tile", "100", "--overlap", "32"], "--tile must be a multiple of 16 pixels (the network's pooling grid), got 100: 96 or 112"),
        (["--tile", "64", "--overlap", "48"], "--overlap must be at most half the tile (32 pixels), got 48"),
        (["--tile", "96"], "--overlap must be at most half the tile (48 pixels), got 192 (the default): give a smaller"),
        (["--min-size", "-3"], "--min-size must be a whole number of pixels >= 0, got -3"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
        (["--channel", "0"], "--channel counts from 1"),
        (["--workers", "-1"], "--workers must be a whole number >= 0, got -1"),
        (["--diameter", "1e-310"], "--diameter must be a number of pixels > 0, got 1e-310: too small to resize"),
    ]:
        assert main(["-q", "predict", str(images), "-o", str(tmp_path / "refused"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "refused").exists()
    if not torch.cuda.is_available():
        assert main(["-q", "predict", str(images), "-o", str(tmp_path / "refused"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "CUDA" in err[0] and "--model" not in err[0], err


def test_progress_reports_tiles_of_a_large_image(tmp_path: Path, model) -> None:
    from nucleiseg.inference import segment

    from nucleiseg.tiling import tiles

    image = np.tile(_fixture(FLUO, 64), (3, 3, 1))  # 192 x 192
    seen = []
    segment(image, model, tile=64, overlap=16, progress=lambda done, total: seen.append((done, total)))
    n = len(tiles((192, 192), 64, 16, 4))
    assert n == 16 and seen[-1] == (n, n) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from /proc")
@pytest.mark.parametrize("threads", [1, 2], ids=["one-at-a-time", "side-by-side"])
def test_memory_does_not_grow_over_2000_images(tmp_path: Path, model, threads: int) -> None:
    """A long batch holds one image at a time (two side by side with two threads): resident memory after
    2,000 images is what it was after 200."""
    folder = tmp_path / "in"
    folder.mkdir()
    tile = _fixture(FLUO, 256)
    for k in range(2000):
        r, c = divmod(k % 49, 7)
        write_png(folder / f"img{k:04d}.png", tile[32 * r : 32 * r + 32, 32 * c : 32 * c + 32])
    samples = {}

    def progress(done: int, total: int) -> None:
        if done in (200, 2000):
            samples[done] = _rss_bytes()

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        summary = predict_files([folder], tmp_path / "out", model=model, options={"precision": "fp32"},
                                progress=progress, say=lambda kind, text: None)
    finally:
        torch.set_num_threads(before)
    assert len(summary) == 2000 and (summary["status"] == "ok").all()
    growth = samples[2000] - samples[200]
    print(f"resident memory after 200 images {samples[200] / 2**20:.0f} MiB, after 2000 "
          f"{samples[2000] / 2**20:.0f} MiB ({growth / 2**20:+.1f} MiB)")
    assert growth < 20 * 2**20


@pytest.mark.parametrize("image_workers", [True, False], ids=["image-workers", "finishing-workers"])
def test_pipelined_run_equals_one_image_at_a_time(tmp_path: Path, images: Path, model, monkeypatch,
                                                  image_workers: bool) -> None:
    """Worker processes (whole images on a CPU; labelling, measuring and writing while the network runs in this
    process on a GPU) give the sequential run's files, byte for byte; a failure in a worker fails that image
    alone, in one line."""
    from nucleiseg import pipeline
    from nucleiseg.inference import segment

    if not image_workers:  # the GPU host's pipeline, on this CPU
        monkeypatch.setattr(batch, "IMAGE_WORKER_DEVICES", ())

    write_png(images / "third.png", _fixture(FLUO, 96)[16:, 8:, :3])
    sequential = tmp_path / "sequential"
    _run(images, sequential, model, workers=0)
    monkeypatch.setattr(pipeline, "PROCESS_MIN_IMAGES", 1)  # processes even for three images
    assert pipeline.use_processes(2, 3)
    pipelined = tmp_path / "pipelined"
    summary = _run(images, pipelined, model, workers=2)
    assert (summary["status"] == "ok").all() and summary["name"].tolist() == ["fluo", "third", "tissue"]
    assert _snapshot(pipelined) == _snapshot(sequential)
    labels = read_image(pipelined / "third_labels.tif")
    assert labels.max() > 0
    assert np.array_equal(labels, segment(read_image(images / "third.png"), model, precision="fp32").labels)

    failing = tmp_path / "failing"
    (failing / ".nucleiseg" / "staging").mkdir(parents=True)
    (failing / ".nucleiseg" / "staging" / "third").write_text("")  # a file: the worker cannot stage there
    lines: list[tuple[str, str]] = []
    summary = predict_files([images], failing, model=model, options=PredictOptions(precision="fp32"),
                            progress=False, say=lambda kind, text: lines.append((kind, text)), workers=2)
    assert summary.set_index("name")["status"].to_dict() == {"fluo": "ok", "third": "failed", "tissue": "ok"}
    errors = [text for kind, text in lines if kind == "error"]
    assert len(errors) == 1 and "third.png" in errors[0] and "cannot write its outputs" in errors[0]
    assert "\n" not in errors[0]
    assert not list(failing.glob("third*")) and (failing / "tissue_labels.tif").is_file()


def test_image_worker_killed_mid_run_costs_nothing(tmp_path: Path, images: Path, model, monkeypatch) -> None:
    """An image worker SIGKILLed while the batch runs: its images are redone, each written once, and the
    outputs equal a run one image at a time."""
    psutil = pytest.importorskip("psutil")
    from nucleiseg import pipeline

    for k in range(6):
        write_png(images / f"more{k}.png", _fixture(FLUO, 72)[4 * k :, 2 * k :, :3])
    sequential = tmp_path / "sequential"
    _run(images, sequential, model, workers=0)
    monkeypatch.setattr(pipeline, "PROCESS_MIN_IMAGES", 1)
    killed: list[int] = []

    def progress(done: int, total: int) -> None:
        if killed:
            return
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
        assert workers, "no image worker process found"
        workers[0].kill()
        killed.append(workers[0].pid)

    out = tmp_path / "killed"
    summary = predict_files([images], out, model=model, options=PredictOptions(precision="fp32"), formats=FORMATS,
                            save_probabilities=True, progress=progress, say=lambda kind, text: None, workers=2)
    assert killed and (summary["status"] == "ok").all() and len(summary) == 8
    assert _snapshot(out) == _snapshot(sequential)
    assert not list((out / ".nucleiseg" / "staging").iterdir())


@pytest.mark.parametrize("limit", [None, 0])
def test_next_image_is_read_while_one_is_segmented(tmp_path: Path, images: Path, model, monkeypatch, limit) -> None:
    """One image at a time, the next small image is read during the network of this one; a large one
    (over READ_AHEAD_MAX_BYTES, here 0 bytes) only in its turn. The outputs are the same."""
    import threading

    from nucleiseg import batch

    if limit is not None:
        monkeypatch.setattr(batch, "READ_AHEAD_MAX_BYTES", limit)
    second_read = threading.Event()
    seen: list[bool] = []
    real_read, real_infer = batch._read, batch._infer

    def read(job, options):
        result = real_read(job, options)
        if job.name == "tissue":
            second_read.set()
        return result

    def infer(job, *args):
        if job.name == "fluo":  # the first image: is the second read meanwhile?
            seen.append(second_read.wait(timeout=10 if limit is None else 0.5))
        return real_infer(job, *args)

    monkeypatch.setattr(batch, "_read", read)
    monkeypatch.setattr(batch, "_infer", infer)
    summary = _run(images, tmp_path / "out", model, workers=0)
    assert (summary["status"] == "ok").all()
    assert seen == [limit is None]
    monkeypatch.setattr(batch, "_read", real_read)
    monkeypatch.setattr(batch, "_infer", real_infer)
    _run(images, tmp_path / "plain", model, workers=0)
    assert _snapshot(tmp_path / "out") == _snapshot(tmp_path / "plain")


@pytest.mark.parametrize("mode", ["accurate", "fast"])  # the overlay's PNG in a thread of its own, or not
def test_images_side_by_side_equal_one_at_a_time(tmp_path: Path, images: Path, model, monkeypatch, mode) -> None:
    """By default on a CPU two images are segmented at once, in two threads with one PyTorch thread each (after
    the first, alone); an image over SIDE_BY_SIDE_MAX_BYTES afterwards with both. The files equal a run one image at a time, byte
    for byte; a failure in one thread fails that image alone, in one line; PyTorch's setting is restored."""
    import threading

    def _run(images: Path, out: Path, model, **kwargs) -> pd.DataFrame:
        return predict_files([images], out, model=model, options=PredictOptions(precision="fp32", mode=mode),
                             formats=FORMATS, save_probabilities=True, progress=False, say=lambda kind, text: None,
                             **kwargs)

    write_png(images / "third.png", _fixture(FLUO, 96)[40:, 30:, :3])
    write_png(images / "fourth.png", _fixture(TISSUE, 64)[..., :3][::-1])
    sequential = tmp_path / "sequential"
    _run(images, sequential, model, workers=0)

    sizes = {p.stem: batch._io.header_bytes(p) for p in images.iterdir()}
    assert sizes["fluo"] > max(sizes["third"], sizes["tissue"], sizes["fourth"])
    monkeypatch.setattr(batch, "SIDE_BY_SIDE_MAX_BYTES", sizes["fluo"] - 1)  # fluo is "large"
    together = threading.Barrier(2, timeout=20)  # broken unless two images are segmented at the same time
    seen: dict[str, tuple[str, int]] = {}
    real_infer = batch._infer

    def infer(job, *args):
        seen[job.name] = (threading.current_thread().name, torch.get_num_threads())
        if job.name in ("third", "tissue"):
            together.wait()
        return real_infer(job, *args)

    monkeypatch.setattr(batch, "_infer", infer)
    from nucleiseg import pipeline

    overlay_threads: list[str] = []
    real_background = pipeline.Background

    def background(fn, *args):
        overlay_threads.append(Path(args[0]).name)
        return real_background(fn, *args)

    monkeypatch.setattr(pipeline, "Background", background)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        side_by_side = tmp_path / "side-by-side"
        summary = _run(images, side_by_side, model)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert (summary["status"] == "ok").all(), summary
    assert summary["name"].tolist() == ["fluo", "fourth", "third", "tissue"]  # in input order, as always
    assert _snapshot(side_by_side) == _snapshot(sequential)
    assert seen["fourth"] == (threading.main_thread().name, 2)  # the first small image: alone, this thread
    side = {seen[name] for name in ("third", "tissue")}
    assert {threads for _, threads in side} == {1} and len({name for name, _ in side}) == 2
    assert seen["fluo"] == (threading.main_thread().name, 2)  # the large image: afterwards, with both threads
    # the overlay's PNG in a thread of its own: alone always, side by side in accurate mode only
    expected = ["fourth", "fluo"] if mode == "fast" else ["fourth", "third", "tissue", "fluo"]
    assert sorted(overlay_threads) == sorted(f"{name}_overlay.png" for name in expected)

    monkeypatch.setattr(batch, "_infer", real_infer)
    failing = tmp_path / "failing"
    (failing / ".nucleiseg" / "staging").mkdir(parents=True)
    (failing / ".nucleiseg" / "staging" / "third").write_text("")  # a file: that image cannot be staged
    lines: list[tuple[str, str]] = []
    torch.set_num_threads(2)
    try:
        summary = predict_files([images], failing, model=model, options=PredictOptions(precision="fp32", mode=mode),
                                progress=False, say=lambda kind, text: lines.append((kind, text)))
    finally:
        torch.set_num_threads(before)
    assert summary.set_index("name")["status"].to_dict() == {"fluo": "ok", "fourth": "ok", "third": "failed",
                                                            "tissue": "ok"}
    errors = [text for kind, text in lines if kind == "error"]
    assert len(errors) == 1 and "third.png" in errors[0] and "cannot write its outputs" in errors[0]
    assert "\n" not in errors[0]
    assert not list(failing.glob("third*")) and (failing / "fourth_labels.tif").is_file()


def test_interrupted_side_by_side_finishes_the_images_in_hand(tmp_path: Path, images: Path, model,
                                                              monkeypatch) -> None:
    """Ctrl-C (KeyboardInterrupt in the calling thread) while images run side by side: the images in hand are
    finished, no other is started, nothing half-written is left; a re-run does the rest, and the outputs equal
    an uninterrupted run's."""
    for k in range(6):
        write_png(images / f"more{k}.png", _fixture(FLUO, 72)[4 * k :, 2 * k :, :3])
    sequential = tmp_path / "sequential"
    _run(images, sequential, model, workers=0)

    started: list[str] = []
    real_infer = batch._infer

    def infer(job, *args):
        started.append(job.name)
        return real_infer(job, *args)

    def progress(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    # a second Ctrl-C while the images in hand finish (the first join): still finished, then exit as interrupted
    real_join, joins = threading.Thread.join, []

    def join(thread, *args, **kwargs):
        if thread.name.startswith("nucleiseg-image"):
            joins.append(thread.name)
            if len(joins) == 1:
                raise KeyboardInterrupt
        return real_join(thread, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "join", join)
    monkeypatch.setattr(batch, "_infer", infer)
    out = tmp_path / "out"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            predict_files([images], out, model=model, options=PredictOptions(precision="fp32"), formats=FORMATS,
                          save_probabilities=True, progress=progress, say=lambda kind, text: None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(joins) > 2  # interrupted once, then joined them all
    assert not [t.name for t in threading.enumerate() if t.name.startswith("nucleiseg-image")]
    monkeypatch.setattr(threading.Thread, "join", real_join)
    done = sorted(p.stem for p in (out / ".nucleiseg" / "done").glob("*.json"))
    assert sorted(started) == done  # every image started was finished
    assert 3 <= len(done) < 8  # and the batch stopped
    assert not list((out / ".nucleiseg" / "staging").iterdir())
    assert sorted(p.name.split("_")[0] for p in out.glob("*_labels.tif")) == done

    monkeypatch.setattr(batch, "_infer", real_infer)
    summary = _run(images, out, model)
    assert sorted(summary.loc[summary["status"] == "skipped", "name"]) == done
    assert (summary.loc[summary["status"] != "skipped", "status"] == "ok").all() and len(summary) == 8
    assert _snapshot(out) == _snapshot(sequential)


@pytest.mark.parametrize("threads, each", [(1, 1), (4, 2)])
def test_image_workers_share_the_threads_asked_for(tmp_path: Path, images: Path, model, monkeypatch,
                                                   threads: int, each: int) -> None:
    """``--threads`` caps the whole run: two image workers get half of the process's threads each."""
    from nucleiseg import pipeline

    class Started(Exception):
        pass

    def worker_pool(n, processes, initializer=None, initargs=()):
        raise Started(n, initargs[2])

    monkeypatch.setattr(pipeline, "PROCESS_MIN_IMAGES", 1)
    monkeypatch.setattr(pipeline, "worker_pool", worker_pool)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    with pytest.raises(Started) as started:
        predict_files([images], tmp_path / "out", model=model, progress=False, say=lambda kind, text: None, workers=2)
    assert started.value.args == (2, each)


def test_predict_files_arguments_are_checked_in_words(tmp_path: Path, images: Path, model, capsys) -> None:
    from nucleiseg.cli import main

    for inputs, kwargs, message in [
        (b"cells.png", {}, "inputs must be file names, folders or glob patterns (str or Path), got bytes"),
        (np.zeros((64, 64)), {}, "got ndarray; an image array is segmented with nucleiseg.segment"),
        ([images], {"overwrite": "no"}, "overwrite must be True or False, got 'no'"),
        ([images], {"save_probabilities": 1}, "save_probabilities must be True or False, got 1"),
    ]:
        with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            predict_files(inputs, tmp_path / "out", model=model, progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
    assert main(["predict", str(images), "-o", ""]) == 2
    assert capsys.readouterr().err.strip() == ("nucleiseg predict: error: --out is empty; name the output folder "
                                               "('.' for this one)")
