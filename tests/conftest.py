"""Fixtures shared across the test suite: the committed DSB2018 sample, prepared once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DSB_FIXTURE = FIXTURES / "dsb"


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """Tests use small models: one thread keeps them deterministic and leaves the other core free."""
    torch.set_num_threads(1)


@pytest.fixture
def outliving():
    """Factory: ``outliving(pids, seconds=10)`` -> the processes of ``pids`` still running (zombies count as
    ended) after waiting up to ``seconds`` for them to end."""
    import time

    psutil = pytest.importorskip("psutil")

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def outliving(pids, seconds: float = 10.0) -> list[int]:
        deadline = time.monotonic() + seconds
        while any(running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [pid for pid in pids if running(pid)]

    return outliving


@pytest.fixture(scope="session")
def fixture_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four-image DSB fixture as a prepared cache; the brightfield crop is its validation image.

    (Each kind has a single group in the fixture, so a stratified split keeps them all in
    training; the split file is edited by hand, as a user may do.)
    """
    import pandas as pd

    from nucleiseg.data.cache import prepare_dataset

    out = tmp_path_factory.mktemp("fixture-cache") / "dsb"
    prepare_dataset(DSB_FIXTURE, out, workers=1, progress=False)
    split = pd.read_csv(out / "split.csv")
    split["split"] = ["val" if i.endswith("_crop256") else "train" for i in split["image_id"]]
    split.to_csv(out / "split.csv", index=False)
    return out


def _make_synthetic_cache(tmp_path: Path, n: int = 4, shape=(40, 48)):
    """A tiny prepared cache of n images with three square nuclei each, and the labels by image id."""
    import imageio.v3 as iio
    import numpy as np
    import tifffile

    from nucleiseg.data.cache import prepare_dataset

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(n):
        labels = np.zeros(shape, np.uint16)
        for k in range(3):
            r, c = 4 + 12 * k, 5 + 6 * i + 8 * k
            labels[r : r + 9, c : c + 9] = k + 1
        image = (rng.integers(0, 20, shape) + 180 * (labels > 0)).astype(np.uint8)
        iio.imwrite(src / "images" / f"img{i}.png", image)
        tifffile.imwrite(src / "labels" / f"img{i}.tif", labels)
        truth[f"img{i}"] = labels
    cache = tmp_path / "cache"
    prepare_dataset(src, cache, val_fraction=0.5, workers=1, progress=False)
    return cache, truth


@pytest.fixture
def synthetic_cache():
    """Factory: ``synthetic_cache(tmp_path, n=4, shape=(40, 48)) -> (cache_dir, labels by id)``."""
    return _make_synthetic_cache


@pytest.fixture(scope="session")
def blob_model_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model file (widths 4-16) with BatchNorm statistics from real images, so that it finds blobs:
    about a quarter of the pixels foreground, as a trained model would give. Fast enough for batch tests."""
    import numpy as np

    from nucleiseg.io import read_image
    from nucleiseg.models import UNetPlusPlus, save_model
    from nucleiseg.preprocess import normalize, to_rgb_uint8

    train = DSB_FIXTURE / "stage1_train"
    ids = ("0b2e702f90aee4fff2bc6e4326308d50cf04701082e718d4f831c8959fbcda93",  # fluorescence
           "af576e8ec3a8d0b57eb6a311299e9e4fd2047970d3dd9d6f52e54ea6a91109da")  # stained tissue
    images = [read_image(train / i / "images" / f"{i}.png")[:256, :256] for i in ids]
    torch.manual_seed(0)
    net = UNetPlusPlus(widths=(4, 8, 16))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = those of the one batch below
    x = torch.from_numpy(np.stack([normalize(to_rgb_uint8(image)) for image in images]))
    with torch.no_grad():
        net.train()(x)
        net.eval()
        for head, logits in zip(net.heads, net(x)):
            head.bias[0] -= torch.quantile(logits[:, 0].flatten(), 0.75)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(path, net, {"postprocess": {"min_size": 5}})
    return str(path)
