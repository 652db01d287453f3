"""A full disk ends in one error line naming the file, with no partial file left and the old file intact.

Three ways in: an injected ``ENOSPC`` (any writer's Python code), a process file-size limit (``RLIMIT_FSIZE``: a
real short write inside tifffile, Pillow, safetensors' Rust and torch's C++ writers), and a real full file system
(a 160 KiB tmpfs in a user namespace, where the system allows one) under ``nucleiseg prepare``.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nucleiseg.errors import NucleisegError
from nucleiseg.io import atomic_path, write_geojson

DSB_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dsb"
SRC = Path(__file__).resolve().parent.parent / "src"


def test_injected_enospc_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    import builtins

    from nucleiseg import io as nucleiseg_io

    target = tmp_path / "nuclei.geojson"
    target.write_text("OLD")
    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 5:15] = 1

    def small_disk(file, mode="r", *args, **kwargs):
        """open() on a disk with 40 bytes left: a write past them writes what fits, then fails."""
        handle = builtins.open(file, mode, *args, **kwargs)
        if "w" not in mode:
            return handle

        class Full:
            left = 40

            def write(self, text):
                if len(text) > self.left:
                    handle.write(text[: self.left])
                    handle.flush()
                    self.left = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                self.left -= len(text)
                return handle.write(text)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def __getattr__(self, name):
                return getattr(handle, name)

        return Full()

    monkeypatch.setattr(nucleiseg_io, "open", small_disk, raising=False)  # found before the builtin
    with pytest.raises(NucleisegError) as info:
        write_geojson(target, labels)
    assert str(info.value) == (f"{target}: cannot be written: no space left on the device (ENOSPC); "
                               "nothing half-written was left")
    assert target.read_text() == "OLD"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.geojson"]


def test_other_failures_keep_their_own_error(tmp_path):
    with pytest.raises(ZeroDivisionError):  # a bug is not a full disk
        with atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("partial")
            1 / 0
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_one_line(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(NucleisegError, match="cannot be written: permission denied"):
            write_geojson(folder / "n.geojson", np.zeros((4, 4), np.int32))
    finally:
        folder.chmod(0o700)


WRITERS = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np, torch
    from nucleiseg.errors import NucleisegError
    from nucleiseg import io
    from nucleiseg.data.rle import write_rle_csv
    from nucleiseg.models import UNetPlusPlus, save_model
    from nucleiseg.training import _save_state

    out = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:300, :400]
    labels = (rows // 10) * 40 + cols // 10 + 1  # 1200 squares
    net = UNetPlusPlus(widths=(8, 16, 32))
    opt = torch.optim.Adam(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    writers = {
        "labels.tif": lambda p: io.write_labels_tiff(p, labels),
        "image.png": lambda p: io.write_png(p, rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)),
        "overlay.png": lambda p: io.write_overlay(p, rng.integers(0, 255, (300, 400, 3), dtype=np.uint8),
                                                   labels),
        "nuclei.geojson": lambda p: io.write_geojson(p, labels),
        "rois.zip": lambda p: io.write_imagej_rois(p, labels),
        "probabilities.tif": lambda p: io.write_probabilities_tiff(p, rng.random((3, 300, 400), np.float32)),
        "submission.csv": lambda p: write_rle_csv(p, {"a": labels}),
        "model.safetensors": lambda p: save_model(p, net),
        "last_state.pt": lambda p: _save_state(p, net, opt, sched, 1, 0.5),
    }
    for name in writers:
        (out / name).write_bytes(b"OLD")
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))  # 16 KiB a file: every writer is cut short
    results = {}
    for name, write in writers.items():
        try:
            write(out / name)
            results[name] = "written"
        except NucleisegError as exc:
            results[name] = str(exc)
    print(json.dumps(results))
    """
)


def test_every_writer_cut_short_by_the_file_size_limit_is_one_line(tmp_path):
    pytest.importorskip("resource")
    done = subprocess.run([sys.executable, "-c", WRITERS, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 9
    for name, message in results.items():
        assert message == (f"{tmp_path / name}: cannot be written: file too large for this file system or process "
                           "limit (EFBIG); nothing half-written was left"), (name, message)
        assert (tmp_path / name).read_bytes() == b"OLD", name  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(results)  # no temporary file left
    assert done.stderr == ""  # no writer chatter either


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k none {where}"], capture_output=True)
    return probe.returncode == 0


def test_prepare_on_a_full_file_system_is_one_line_and_a_rerun_with_space_completes(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if not _can_mount_tmpfs(mount):
        pytest.skip("no user namespaces to mount a small tmpfs in")
    cache = mount / "cache"
    python = f"PYTHONPATH={SRC} {sys.executable} -m nucleiseg.cli -q prepare {DSB_FIXTURE} --out {cache} --workers 1"
    script = textwrap.dedent(
        f"""
        mount -t tmpfs -o size=160k none {mount}
        {python} 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.rc
        find {mount} -name '*.tmp*' > {tmp_path}/leftovers
        cp -r {cache} {tmp_path}/cache_when_full
        mount -o remount,size=8m {mount}
        {python} 2> {tmp_path}/again.err; echo $? > {tmp_path}/again.rc
        cp -r {cache} {tmp_path}/cache_after
        """
    )
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], check=True, timeout=300)
    err = (tmp_path / "full.err").read_text().strip().splitlines()
    assert (tmp_path / "full.rc").read_text().strip() == "2"
    assert len(err) == 1, err
    assert err[0].startswith(f"nucleiseg prepare: error: {cache}/") and err[0].endswith(
        "cannot be written: no space left on the device (ENOSPC); nothing half-written was left"), err
    assert (tmp_path / "leftovers").read_text() == ""
    # what was written when the disk filled up is whole: every image and label file reads
    from nucleiseg.io import read_image

    written = [p for p in (tmp_path / "cache_when_full").rglob("*") if p.suffix in (".png", ".tif")]
    assert written  # the disk filled up part way
    for path in written:
        read_image(path)
    # the same command with space finishes, and gives what a run that never failed gives
    assert (tmp_path / "again.rc").read_text().strip() == "0", (tmp_path / "again.err").read_text()
    reference = tmp_path / "reference"
    from nucleiseg.data.cache import prepare_dataset

    prepare_dataset(DSB_FIXTURE, reference, workers=1, progress=False)
    after = tmp_path / "cache_after"
    for name in ("index.csv", "split.csv"):
        assert (after / name).read_text().replace(str(cache), "") == (reference / name).read_text().replace(
            str(reference), ""), name
    for folder in ("images", "masks", "labels"):
        files = sorted(p.name for p in (reference / folder).iterdir())
        assert files == sorted(p.name for p in (after / folder).iterdir())
        for name in files:
            assert (after / folder / name).read_bytes() == (reference / folder / name).read_bytes(), name
