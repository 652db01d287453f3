"""Prediction on a Dask cluster: blocks stitched exactly, a killed worker, resume, many images.

One 2-process LocalCluster serves the whole module. Stitching is checked on exact synthetic
probability maps (a predictor that reads them from the image's pixels), so every block sees
exactly the whole image's probabilities and the stitched labels must equal the whole-image ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nucleiseg.blocks import cover, raster_ids, settle
from nucleiseg.errors import NucleisegError
from nucleiseg.postprocess import PostprocessParams, label_nuclei

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

BLOCK = 64
OVERLAP = 48


def _disc(probs: np.ndarray, y: float, x: float, r: float) -> None:
    yy, xx = np.ogrid[: probs.shape[1], : probs.shape[2]]
    probs[0][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 0.95


def synthetic_probabilities(shape=(200, 232), seed: int = 0) -> np.ndarray:
    """body/contour/touch maps: discs on every block border and corner, touching pairs across borders."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((3,) + shape, np.float32)
    for y in range(0, shape[0] + 1, BLOCK):  # centred exactly on corners of the block grid
        for x in range(0, shape[1] + 1, BLOCK):
            _disc(probs, y, x, rng.uniform(4, 9))
    for y in range(BLOCK // 2, shape[0], BLOCK):  # on the middle of each vertical border
        for x in range(BLOCK, shape[1], BLOCK):
            _disc(probs, y, x + rng.integers(-3, 4), rng.uniform(4, 8))
    for y in range(BLOCK, shape[0], BLOCK):  # touching pairs straddling each horizontal border
        x = int(rng.integers(20, shape[1] - 20))
        _disc(probs, y - 5, x, 6)
        _disc(probs, y + 6, x, 6)
        probs[2, y : y + 1, x - 6 : x + 7] = 0.9 * (probs[0, y : y + 1, x - 6 : x + 7] > 0)
    for _ in range(25):  # and some anywhere
        _disc(probs, rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(3, 7))
    return probs


class ExactPredictor:
    """Probabilities read from the pixels: channel k / 255 (what a perfect network would give)."""

    reach = 0

    def __call__(self, image):
        return np.moveaxis(image, -1, 0).astype(np.float32) / 255.0, ("body", "contour", "touch")


class FailingPredictor(ExactPredictor):
    """Fails on the blocks whose outer region starts at row ``row``."""

    def __init__(self, row: int):
        self.row = row

    def __call__(self, image):
        if image.shape[0] == self.row:
            raise RuntimeError("simulated failure")
        return super().__call__(image)


class CountingPredictor(ExactPredictor):
    """Appends a line to a file per block it predicts."""

    def __init__(self, log: str):
        self.log = log

    def __call__(self, image):
        with open(self.log, "a") as handle:
            handle.write("block\n")
        return super().__call__(image)


class KillingPredictor(ExactPredictor):
    """Kills its worker process the first time it sees a block (a marker file remembers)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, image):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os._exit(1)
        return super().__call__(image)


def _as_image(probs: np.ndarray) -> np.ndarray:
    return np.round(np.moveaxis(probs, 0, -1) * 255).astype(np.uint8)


PARAMS = PostprocessParams(min_seed_size=3, min_size=5)


def _whole(image: np.ndarray) -> np.ndarray:
    """The single-machine result, labelled as a blockwise run labels (first pixel in raster order)."""
    probs, channels = ExactPredictor()(image)
    labels = label_nuclei(probs, channels, PARAMS)
    return raster_ids(labels)[labels]


def test_blocks_stitch_exactly_in_memory() -> None:
    image = _as_image(synthetic_probabilities())
    expected = _whole(image)
    stitched = np.zeros(expected.shape, np.uint64)
    owned = []
    for block in cover(image.shape[:2], BLOCK, OVERLAP):
        probs, channels = ExactPredictor()(image[block.outer])
        kept = settle(label_nuclei(probs, channels, PARAMS), block, 0, probs[0] > PARAMS.foreground_threshold)
        stitched[block.core] = kept.core
        owned.extend(kept.ids.tolist())
        assert kept.uncertain == 0
    np.testing.assert_array_equal(stitched, expected)
    assert sorted(owned) == np.unique(expected[expected > 0]).tolist()  # each nucleus owned once


@pytest.fixture(scope="module")
def client():
    import cloudpickle
    from distributed import Client, LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as c:
        yield c


def _segment(client, image, out, predictor=None, **kw):
    from nucleiseg.distributed import segment_large

    return segment_large(image, out, cluster=client, block=BLOCK, overlap=OVERLAP, name="synthetic",
                         predictor=predictor or ExactPredictor(), options={"postprocess": PARAMS.to_dict()}, **kw)


def _check_outputs(out: Path, expected: np.ndarray) -> None:
    root = zarr.open_group(out / "synthetic_labels.ome.zarr", mode="r")
    np.testing.assert_array_equal(root["0"][:], expected)
    assert "image-label" in root.attrs.get("ome", root.attrs)
    table = pd.read_csv(out / "synthetic_nuclei.csv")
    ids = np.unique(expected[expected > 0])
    assert sorted(table["label"]) == ids.tolist()
    areas = np.bincount(np.searchsorted(ids, expected[expected > 0]))
    assert table.sort_values("label")["area"].tolist() == areas.tolist()
    features = json.loads((out / "synthetic.geojson").read_text())["features"]
    assert sorted(f["properties"]["label"] for f in features) == ids.tolist()
    assert not (out / ".synthetic.blocks").exists()


def test_cluster_stitches_exactly(client, tmp_path: Path) -> None:
    image = _as_image(synthetic_probabilities(seed=1))
    row = _segment(client, image, tmp_path)
    expected = _whole(image)
    assert row["status"] == "ok" and row["nuclei"] == len(np.unique(expected)) - 1
    _check_outputs(tmp_path, expected)
    assert _segment(client, image, tmp_path)["status"] == "skipped"


def test_resume_after_failed_blocks(client, tmp_path: Path) -> None:
    image = _as_image(synthetic_probabilities(seed=2))
    last_row = cover(image.shape[:2], BLOCK, OVERLAP)[-1].outer[0]
    with pytest.raises(NucleisegError, match="blocks failed"):
        _segment(client, image, tmp_path, predictor=FailingPredictor(last_row.stop - last_row.start))
    total = len(cover(image.shape[:2], BLOCK, OVERLAP))
    done = len(list((tmp_path / ".synthetic.blocks").glob("*_*.json")))
    assert 0 < done < total
    assert not (tmp_path / "synthetic_nuclei.csv").exists()
    calls = tmp_path / "calls.txt"
    _segment(client, image, tmp_path, predictor=CountingPredictor(str(calls)))
    assert len(calls.read_text().splitlines()) == total - done  # only the failed blocks ran again
    _check_outputs(tmp_path, _whole(image))


def test_killed_worker_is_replaced(client, tmp_path: Path) -> None:
    image = _as_image(synthetic_probabilities(seed=3))
    row = _segment(client, image, tmp_path, predictor=KillingPredictor(str(tmp_path / "killed")))
    assert (tmp_path / "killed").exists() and row["status"] == "ok"
    _check_outputs(tmp_path, _whole(image))


# ----------------------------------------------------------------------------- with a (tiny) network
DSB_TRAIN = Path(__file__).resolve().parent / "fixtures" / "dsb" / "stage1_train"
FLUO = "0b2e702f90aee4fff2bc6e4326308d50cf04701082e718d4f831c8959fbcda93"
TISSUE = "af576e8ec3a8d0b57eb6a311299e9e4fd2047970d3dd9d6f52e54ea6a91109da"


def _fixture(image_id: str, size: int) -> np.ndarray:
    from nucleiseg.io import read_image

    return read_image(DSB_TRAIN / image_id / "images" / f"{image_id}.png")[:size, :size, :3]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model with BatchNorm statistics from real images, so that it finds blobs."""
    import torch

    from nucleiseg.models import UNetPlusPlus, save_model
    from nucleiseg.preprocess import normalize, to_rgb_uint8

    torch.manual_seed(0)
    net = UNetPlusPlus(widths=(4, 8, 16))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    x = torch.from_numpy(np.stack([normalize(to_rgb_uint8(_fixture(FLUO, 256)))]))
    with torch.no_grad():
        net.train()(x)
        net.eval()
        for head, logits in zip(net.heads, net(x)):
            head.bias[0] -= torch.quantile(logits[:, 0].flatten(), 0.85)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(path, net, {"postprocess": {"min_size": 5}})
    return str(path)


def test_many_images_same_outputs_as_one_process(client, tiny_model: str, tmp_path: Path) -> None:
    from nucleiseg.batch import predict_files
    from nucleiseg.io import write_png

    images = tmp_path / "images"
    images.mkdir()
    for k, (image_id, size) in enumerate([(FLUO, 96), (TISSUE, 80), (FLUO, 64), (TISSUE, 72)]):
        write_png(images / f"img{k}.png", _fixture(image_id, size))
    (images / "broken.png").write_bytes(b"")  # fails alone
    kw = {"model": tiny_model, "formats": ["geojson"], "options": {"precision": "fp32"}, "progress": False}
    one = predict_files(images, tmp_path / "one", **kw)
    seen = []
    many = predict_files(images, tmp_path / "many", cluster=client, **{**kw, "progress": lambda d, t: seen.append((d, t))})
    pd.testing.assert_frame_equal(one, many)
    assert list(many["status"]) == ["failed", "ok", "ok", "ok", "ok"] and seen[-1] == (5, 5)
    files = sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_file())
    assert files == sorted(p.name for p in (tmp_path / "many").iterdir() if p.is_file()) and len(files) == 4 * 5 + 1
    for name in files:
        if name != "summary.csv":
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name
    again = predict_files(images, tmp_path / "many", cluster=client, **kw)
    assert list(again["status"]) == ["failed"] + ["skipped"] * 4


def test_many_images_survive_a_killed_worker(client, tiny_model: str, tmp_path: Path) -> None:
    from nucleiseg.batch import predict_files
    from nucleiseg.io import write_png

    images = tmp_path / "images"
    images.mkdir()
    for k in range(8):
        write_png(images / f"img{k}.png", _fixture(FLUO if k % 2 else TISSUE, 64 + 8 * k))
    kw = {"model": tiny_model, "options": {"precision": "fp32"}}
    one = predict_files(images, tmp_path / "one", progress=False, **kw)
    import signal

    pids = client.run(os.getpid)
    killed = []

    def kill_one(done: int, total: int) -> None:  # after the first image: a worker is SIGKILLed mid-run
        if done >= 1 and not killed:
            pid = pids[sorted(pids)[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    many = predict_files(images, tmp_path / "many", cluster=client, progress=kill_one, **kw)
    assert killed
    pd.testing.assert_frame_equal(one, many)
    for path in sorted((tmp_path / "one").iterdir()):
        if path.is_file() and path.name != "summary.csv":
            assert path.read_bytes() == (tmp_path / "many" / path.name).read_bytes(), path.name
    assert not list((tmp_path / "many" / ".nucleiseg" / "staging").iterdir())


def test_large_image_in_blocks_matches_the_whole(client, tiny_model: str, tmp_path: Path) -> None:
    import tifffile

    from nucleiseg.distributed import segment_large
    from nucleiseg.inference import segment
    from nucleiseg.metrics import dsb_score

    tile = _fixture(FLUO, 256)
    mosaic = np.concatenate([np.concatenate([tile, tile[:, ::-1]], axis=1),
                             np.concatenate([tile[::-1], tile[::-1, ::-1]], axis=1)], axis=0)
    mosaic = np.concatenate([mosaic, mosaic[:, :256]], axis=1)  # 512 x 768 x 3
    path = tmp_path / "mosaic.ome.tif"
    tifffile.imwrite(path, mosaic, tile=(128, 128), photometric="rgb", ome=True)
    row = segment_large(path, tmp_path / "out", model=tiny_model, options={"precision": "fp32"}, cluster=client,
                        block=256)
    whole = segment(mosaic, tiny_model, precision="fp32")
    labels = zarr.open_group(tmp_path / "out" / "mosaic_labels.ome.zarr", mode="r")["0"][:]
    assert row["status"] == "ok" and row["nuclei"] == len(np.unique(labels)) - 1
    assert abs(row["nuclei"] - whole.n_nuclei) <= 0.005 * whole.n_nuclei
    assert dsb_score(whole.labels, labels.astype(np.int64)) >= 0.99
    table = pd.read_csv(tmp_path / "out" / "mosaic_nuclei.csv")
    assert len(table) == row["nuclei"] and table["label"].is_unique


def test_block_size_reaches_the_blocks_and_is_checked_first(client, tiny_model: str, tmp_path: Path,
                                                             monkeypatch, capsys) -> None:
    """--block-size / block_size= cuts a large image on a cluster into blocks of that side; bad values are one line."""
    import tifffile

    from nucleiseg import distributed as dist
    from nucleiseg.batch import predict_files
    from nucleiseg.cli import main
    from nucleiseg.errors import OptionError

    tile = _fixture(FLUO, 256)
    path = tmp_path / "in" / "wide.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, np.concatenate([tile, tile[::-1], tile[:, ::-1]], axis=1), tile=(128, 128),
                     photometric="rgb")  # 256 x 768
    monkeypatch.setattr(dist, "LARGE_IMAGE_PIXELS", 1000)  # every TIFF goes the block path
    blocks = []
    real = dist.segment_large

    def counting(*args, **kwargs):
        row = real(*args, **kwargs)
        blocks.append(len(row["blocks"]))
        return row

    monkeypatch.setattr(dist, "segment_large", counting)
    summary = predict_files([path], tmp_path / "out", model=tiny_model, options={"precision": "fp32"},
                            cluster=client, block_size=256, progress=False)
    assert summary["status"].tolist() == ["ok"] and blocks == [3]  # 768 / 256 blocks of the default 2048 would be 1
    assert (tmp_path / "out" / "wide_labels.ome.zarr").is_dir()
    with pytest.raises(OptionError, match="applies to large images on a cluster only"):
        predict_files([path], tmp_path / "out2", model=tiny_model, block_size=256)
    # On the command line: one line naming the flag, before any work (no output folder made).
    assert main(["predict", str(path), "-o", str(tmp_path / "out3"), "--model", tiny_model,
                 "--cluster", client.scheduler.address, "--block-size", "250"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nucleiseg predict: error: --block-size must be a multiple of 4 pixels (the network's grid), "
                   "at least 8, got 250: 248 or 252 would do"]  # the tiny model's grid: depth 2
    assert not (tmp_path / "out3").exists()


# ----------------------------------------------------------------------------- lazy reading
def test_open_image_reads_blocks_of_every_layout(tmp_path: Path) -> None:
    import tifffile
    from ome_zarr.writer import write_image

    from nucleiseg.distributed import open_image

    rgb = np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8)
    grey16 = rgb[..., 0].astype(np.uint16) * 200
    pyramid = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(pyramid, bigtiff=True, ome=True) as tif:  # tiled, pyramidal: level 0 is read
        tif.write(rgb, tile=(128, 128), subifds=1, photometric="rgb")
        tif.write(rgb[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "grey.tif", grey16)
    write_image(np.moveaxis(rgb, -1, 0)[:, None], zarr.open_group(tmp_path / "ngff.ome.zarr", mode="w"),
                axes="czyx")  # NGFF c, z (one plane), y, x
    zarr.open_array(tmp_path / "plain.zarr", mode="w", shape=grey16.shape, dtype=grey16.dtype)[:] = grey16
    rows, cols = slice(37, 211), slice(129, 260)
    for name, expected in [("pyramid.ome.tif", rgb), ("planar.tif", rgb), ("grey.tif", grey16),
                           ("ngff.ome.zarr", rgb), ("plain.zarr", grey16)]:
        source, stem = open_image(tmp_path / name)
        assert source.shape == expected.shape, name
        np.testing.assert_array_equal(source.read(rows, cols), expected[rows, cols], err_msg=name)
        assert stem == name.split(".")[0]
    from nucleiseg.distributed import _sample

    source, _ = open_image(tmp_path / "pyramid.ome.tif")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        np.testing.assert_array_equal(_sample(client, source, 7, local_pixels=0, piece_side=64), rgb[::7, ::7])  # in pieces
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 40, 40), np.uint8), metadata={"axes": "ZYX"})
    with pytest.raises(NucleisegError, match="z-stack"):
        open_image(stack)
    with pytest.raises(NucleisegError, match="no such file"):
        open_image(tmp_path / "missing.tif")


def test_cli_cluster_option(client, tiny_model: str, tmp_path: Path, capsys) -> None:
    from nucleiseg.cli import main
    from nucleiseg.io import write_png

    write_png(tmp_path / "cells.png", _fixture(FLUO, 64))
    assert main(["predict", str(tmp_path / "cells.png"), "-o", str(tmp_path / "out"), "--model", tiny_model,
                 "--cluster", client.scheduler.address]) == 0
    assert (tmp_path / "out" / "cells_labels.tif").is_file()
    assert main(["predict", str(tmp_path / "cells.png"), "-o", str(tmp_path / "out2"), "--model", tiny_model,
                 "--cluster", "local:0"]) != 0
    assert "local:N with N >= 1" in capsys.readouterr().err
