"""Prediction: model loading, native-resolution probabilities, modes, TTA, tiling, segment(), measurements."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nucleiseg import inference, scaling, tiling
from nucleiseg.errors import NucleisegError
from nucleiseg.inference import (
    Model,
    Segmentation,
    label_nuclei,
    load_model,
    predict_probabilities,
    segment,
)
from nucleiseg.measure import MEASUREMENT_COLUMNS, measure_nuclei
from nucleiseg.metrics import dsb_score
from nucleiseg.models import UNetPlusPlus, save_model
from nucleiseg.postprocess import PostprocessParams, instances_from_probabilities
from nucleiseg.preprocess import normalize, to_rgb_uint8

DSB_TRAIN = Path(__file__).resolve().parent / "fixtures" / "dsb" / "stage1_train"
WIDTHS = (4, 8, 16)  # depth 2: receptive field 44 px, 22 px each side


def calibrated_tiny_model(seed: int = 0) -> UNetPlusPlus:
    """A tiny random UNet++ that behaves like a trained one where tiling is concerned.

    Fresh BatchNorm statistics shrink the activations layer after layer, so a
    random network barely depends on its input (tiles would agree trivially).
    Setting the statistics from the fixture images restores unit-scale
    activations, and shifting the body bias makes about a quarter of the
    pixels foreground, so there are nuclei to compare.
    """
    torch.manual_seed(seed)
    net = UNetPlusPlus(widths=WIDTHS)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = those of the one batch below
    x = torch.from_numpy(np.stack([normalize(image) for image in _fixture_images()]))
    with torch.no_grad():
        net.train()(x)
        net.eval()
        for head, logits in zip(net.heads, net(x)):
            head.bias[0] -= torch.quantile(logits[:, 0].flatten(), 0.75)
    return net


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model file with metadata as training writes it."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(path, calibrated_tiny_model(),
               {"postprocess": {"min_size": 5, "seed_threshold": 0.4}, "fast_prune_level": 1})
    return path


@pytest.fixture(scope="module")
def model(model_path: Path) -> Model:
    return load_model(model_path)


def _fixture_images() -> list[np.ndarray]:
    from nucleiseg.io import read_image

    return [to_rgb_uint8(read_image(p))[:256, :256] for p in sorted(DSB_TRAIN.glob("*/images/*.png"))]


@pytest.fixture(scope="module")
def mosaic() -> np.ndarray:
    """A 2x2 mosaic of the DSB fixtures, cropped to odd sizes (500 x 470)."""
    a, b, c, d = _fixture_images()
    return np.ascontiguousarray(np.concatenate([np.concatenate([a, b], 1), np.concatenate([c, d], 1)], 0)[:500, :470])


# ----------------------------------------------------------------------------- model
def test_load_model(model: Model, model_path: Path) -> None:
    assert model.path == model_path
    assert model.channels == ("body", "contour", "touch")
    assert model.postprocess == PostprocessParams(min_size=5, seed_threshold=0.4)
    assert model.config["widths"] == list(WIDTHS)
    assert model.depth == 2 and model.fast_prune_level == 1
    assert not model.network.training
    conv = model.network.nodes["x0_0"][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_default_model_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nucleiseg import models

    monkeypatch.setattr(models, "DEFAULT_MODEL_PATH", tmp_path / "absent.safetensors")
    with pytest.raises(NucleisegError, match="default model is missing") as info:
        load_model()
    assert "absent.safetensors" in str(info.value)
    with pytest.raises(NucleisegError, match="default model is missing"):
        segment(np.zeros((32, 32), np.uint8))


def test_default_model_is_cached(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    from nucleiseg import models

    monkeypatch.setattr(models, "DEFAULT_MODEL_PATH", model_path)
    monkeypatch.setattr(inference, "_default", {})
    image = np.zeros((32, 32), np.uint8)
    segment(image)
    first = next(iter(inference._default.values()))
    segment(image, model="default")
    assert next(iter(inference._default.values())) is first and len(inference._default) == 1


def test_import_is_light() -> None:
    code = "import sys, nucleiseg; assert 'torch' not in sys.modules; assert callable(nucleiseg.segment)"
    subprocess.run([sys.executable, "-c", code], check=True)


_MAPPED_AFTER_PREDICT = """
import ctypes, sys
import numpy as np
from nucleiseg.inference import load_model, predict_probabilities

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
predict_probabilities(load_model(sys.argv[1]), np.zeros((48, 48), np.uint8))
big = np.ones(64 << 20, np.uint8)  # 64 MiB: over glibc's largest mmap threshold
print(libc.mallinfo2().hblkhd >= 64 << 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
@pytest.mark.parametrize("malloc", ["system", "default"])
def test_cpu_prediction_reuses_freed_memory(model_path: Path, malloc: str) -> None:
    """After a CPU prediction a 64 MiB block comes from the heap, not a mapping of its own (which is faulted in
    page by page on every forward pass); ``NUCLEISEG_MALLOC=system`` leaves glibc as it is."""
    env = dict(os.environ, NUCLEISEG_MALLOC=malloc)
    out = subprocess.run([sys.executable, "-c", _MAPPED_AFTER_PREDICT, str(model_path)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(malloc == "system")]


_RESIDENT_AFTER_LARGE_IMAGE = """
import os, sys
import numpy as np
from nucleiseg.inference import load_model, predict_probabilities

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

model = load_model(sys.argv[1])
predict_probabilities(model, np.zeros((48, 48), np.uint8))  # tunes the allocator
base = resident()
block = np.ones(512 << 20, np.uint8)
del block  # freed, kept by the heap for reuse
kept = resident() - base
predict_probabilities(model, np.zeros((1100, 1000), np.uint8), tile=512)  # over one pass: released after it
print(kept >> 20, (resident() - base) >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/statm").exists(),
                    reason="tunes glibc's malloc, reads /proc")
def test_large_image_releases_freed_memory(model_path: Path) -> None:
    """Freed memory is kept for the next forward pass, and handed back once an image of more than one pass is
    done, so a long-lived process does not hold its largest image's heap."""
    env = dict(os.environ, NUCLEISEG_MALLOC="default")
    kept, after = map(int, subprocess.run([sys.executable, "-c", _RESIDENT_AFTER_LARGE_IMAGE, str(model_path)],
                                          env=env, capture_output=True, text=True, check=True).stdout.split())
    assert kept >= 500 and after < 100, (kept, after)


# ----------------------------------------------------------------------------- probabilities
@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8),  # odd RGB
        np.random.default_rng(1).integers(0, 4095, (41, 29), dtype=np.uint16),  # 12-bit grey in 16
        np.random.default_rng(2).integers(0, 255, (33, 35, 4), dtype=np.uint8),  # RGBA
        np.random.default_rng(3).random((19, 70, 1)).astype(np.float32),  # float, one channel
    ],
    ids=["rgb-odd", "grey16", "rgba", "float-1ch"],
)
def test_native_resolution(model: Model, image: np.ndarray) -> None:
    probs = predict_probabilities(model, image)
    assert probs.shape == (3,) + image.shape[:2] and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1


def test_float_image_with_missing_data(model: Model) -> None:
    """NaN (no data) and infinities in a float image spoil neither its contrast nor its prediction."""
    grey = _fixture_images()[0][..., 0].astype(np.float32) / 7.0  # a real image in float units
    holed = grey.copy()
    holed[:12, :12] = np.nan
    holed[100, 100], holed[101, 101] = np.inf, -np.inf
    rgb_clean, rgb_holed = to_rgb_uint8(grey), to_rgb_uint8(holed)
    data = np.isfinite(holed)
    assert np.abs(rgb_holed[data].astype(int) - rgb_clean[data]).max() <= 1
    assert (rgb_holed[:12, :12] == rgb_clean.min()).all() and (rgb_holed[100, 100] == 255).all()
    probs = predict_probabilities(model, holed)
    assert np.isfinite(probs).all()
    assert np.abs(probs[:, 20:, 20:] - predict_probabilities(model, grey)[:, 20:, 20:]).mean() < 0.01
    assert (to_rgb_uint8(np.full((4, 4), np.nan, np.float32)) == 0).all()


def test_tiled_native_resolution_odd_sizes(model: Model) -> None:
    image = np.random.default_rng(4).integers(0, 255, (131, 97, 3), dtype=np.uint8)
    probs = predict_probabilities(model, image, tile=48, overlap=16)
    assert probs.shape == (3, 131, 97)


def test_fast_mode_is_the_pruned_head(model: Model, mosaic: np.ndarray) -> None:
    image = mosaic[:90, :75]
    x = torch.from_numpy(normalize(to_rgb_uint8(image)))[None]
    for kwargs, level in [({"mode": "fast"}, 1), ({"prune_level": 2}, 2), ({"mode": "fast", "prune_level": 2}, 2)]:
        expected = model.network.predict_proba(x, prune_level=level)[0].numpy()
        assert np.allclose(predict_probabilities(model, image, precision="fp32", **kwargs), expected, atol=1e-6), kwargs
    accurate = model.network.predict_proba(x)[0].numpy()
    assert np.allclose(predict_probabilities(model, image, precision="fp32"), accurate, atol=1e-6)
    assert not np.allclose(accurate, model.network.predict_proba(x, prune_level=1)[0].numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="prune_level"):
        predict_probabilities(model, image, prune_level=3)
    with pytest.raises(ValueError, match="mode"):
        predict_probabilities(model, image, mode="quick")


@pytest.mark.parametrize("tile", [None, 48], ids=["untiled", "tiled"])
def test_tta_is_invariant_to_flips(model: Model, mosaic: np.ndarray, tile: int | None) -> None:
    image = mosaic[100:161, 200:250]  # odd height, non-square
    probs = predict_probabilities(model, image, tta=True, tile=tile, overlap=16)
    for flip in (np.fliplr, np.flipud, lambda a: np.rot90(a, 1, axes=(0, 1))):
        flipped = predict_probabilities(model, np.ascontiguousarray(flip(image)), tta=True, tile=tile, overlap=16)
        back = np.stack([flip(p) for p in probs])
        assert np.abs(back - flipped).max() < 1e-5


def test_tiling_is_seamless(model: Model, mosaic: np.ndarray) -> None:
    """The benchmark criterion on a small mosaic: probabilities within 1e-2, labels DSB >= 0.99."""
    untiled = predict_probabilities(model, mosaic, tile=0)  # 0: never tile
    tiled = predict_probabilities(model, mosaic, tile=128, overlap=64)  # 3 x 4 tiles over the seams
    diff = np.abs(tiled - untiled)
    assert diff.max() < 1e-2
    # The window's dead margin (3/8 of 64 = 24 px) exceeds half the receptive field (22 px):
    # every pixel then comes from tiles that did not see their edges, so they agree to rounding.
    assert diff.max() < 1e-4
    params = PostprocessParams(min_size=5)
    reference = instances_from_probabilities(untiled, params=params)
    labels = instances_from_probabilities(tiled, params=params)
    assert reference.max() > 100
    assert dsb_score(reference, labels) >= 0.99
    # The model does feel tile edges: a short overlap misses the criterion.
    assert np.abs(predict_probabilities(model, mosaic, tile=128, overlap=16) - untiled).max() > 1e-2


def test_tiling_independent_of_batch_size(model: Model, mosaic: np.ndarray) -> None:
    image = mosaic[:200, :150]
    one = predict_probabilities(model, image, tile=64, overlap=16, batch_size=1)
    many = predict_probabilities(model, image, tile=64, overlap=16, batch_size=5)
    assert np.abs(one - many).max() < 1e-5  # batched convolutions may round differently


@pytest.mark.parametrize("n", [16, 64, 65, 100, 127, 128, 129, 191, 200, 333, 1000])
def test_tile_layout(n: int) -> None:
    tile, overlap, align = 64, 24, 4
    spans = tiling.tile_spans(n, tile, overlap, align)
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s1 % align == 0 and s0 < s1 and e0 - s1 >= overlap
    weights = tiling.span_weights(n, spans, overlap)
    total = np.zeros(n)
    for w, (s, e) in zip(weights, spans):
        total[s:e] += w
    assert np.allclose(total, 1.0)
    if len(spans) > 1:  # no down-weighting at the image border
        assert weights[0][0] == 1.0 and weights[-1][-1] == 1.0


def test_bad_arguments(model: Model) -> None:
    image = np.zeros((40, 40), np.uint8)
    with pytest.raises(NucleisegError, match=r"too small: the minimum is 16x16"):
        predict_probabilities(model, np.zeros((1, 1), np.uint8))
    with pytest.raises(ValueError, match="half the tile"):
        predict_probabilities(model, image, tile=64, overlap=40)
    with pytest.raises(ValueError, match="precision"):
        predict_probabilities(model, image, precision="fp16")
    with pytest.raises(TypeError, match="load_model"):
        predict_probabilities(model.network, image)


def test_bf16_close_to_fp32(model: Model, mosaic: np.ndarray) -> None:
    image = mosaic[:64, :64]
    fp32 = predict_probabilities(model, image)
    bf16 = predict_probabilities(model, image, precision="bf16")
    assert bf16.dtype == np.float32 and np.abs(bf16 - fp32).max() < 0.05


# ----------------------------------------------------------------------------- nuclei
def _random_blobs(shape=(300, 120), n=60, seed=0) -> np.ndarray:
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    probs = np.zeros((3,) + shape, np.float32)
    for _ in range(n):
        centre = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        rr, cc = disk(centre, rng.integers(3, 9), shape=shape)
        probs[0, rr, cc] = np.maximum(probs[0, rr, cc], rng.uniform(0.6, 1.0))
        probs[1, rr, cc] = np.maximum(probs[1, rr, cc], rng.uniform(0.0, 0.3))
    probs[2] = rng.uniform(0, 0.6, shape) * (probs[0] > 0)
    probs[0] += rng.uniform(0, 1e-3, shape).astype(np.float32) * (probs[0] > 0)  # no exact ties, as in real output
    return probs


def test_label_nuclei_in_bands_equals_whole_image() -> None:
    probs = _random_blobs()
    params = PostprocessParams(min_size=5)
    whole = instances_from_probabilities(probs, params=params)
    banded = label_nuclei(probs, params=params, band_rows=20)
    across = {k for b in range(20, whole.shape[0], 20) for k in np.intersect1d(whole[b - 1], whole[b]) if k}
    assert len(across) > 3, "the test needs nuclei across band borders"
    assert banded.dtype == np.int32 and banded.max() == whole.max() > 10
    # the same partition of the pixels, whatever the numbering
    pairs = np.unique(np.stack([whole.ravel(), banded.ravel()]), axis=1)
    assert pairs.shape[1] == whole.max() + 1 and np.array_equal((whole > 0), (banded > 0))


def test_label_nuclei_tall_and_joined_regions() -> None:
    probs = np.zeros((3, 100, 30), np.float32)
    probs[0, 2:95, 3:6] = 0.9  # one tall nucleus through every band
    probs[0, 10:20, 10:20] = 0.8 + np.linspace(0, 0.01, 100, dtype=np.float32).reshape(10, 10)
    probs[0, 40:45, 20:28] = 0.95
    probs[0, 45:60, 25:28] = 0.95  # 8-connected to the one above: one region over two bands
    params = PostprocessParams(min_size=5, min_seed_size=2)
    whole = instances_from_probabilities(probs, params=params)
    banded = label_nuclei(probs, params=params, band_rows=10)
    assert banded.max() == whole.max() == 3
    pairs = np.unique(np.stack([whole.ravel(), banded.ravel()]), axis=1)
    assert pairs.shape[1] == 4
    everything = np.full((3, 55, 20), 0.9, np.float32)  # foreground joined everywhere, within the margin
    assert label_nuclei(everything, band_rows=10).max() == instances_from_probabilities(everything).max() == 1
    assert label_nuclei(everything, band_rows=10, margin=5).max() == 0  # a nucleus taller than the margin
    assert label_nuclei(np.zeros((3, 50, 20), np.float32), band_rows=10).max() == 0


def test_label_nuclei_cuts_tall_clumps() -> None:
    """A clump of touching nuclei taller than a band is cut with a margin; its nuclei stay the same."""
    rng = np.random.default_rng(0)
    probs = np.zeros((3, 400, 60), np.float32)
    probs[0, 5:395, 10:50] = rng.uniform(0.7, 0.9, (390, 40))  # one 390-row region ...
    probs[2, 5:395:20, 10:50] = 0.9  # ... of 19-row nuclei between touching strips
    probs[2, 5:395, 30] = 0.9  # two nuclei side by side in each row
    probs[0, 100:110, 55:58] = 0.95  # and a small separate nucleus
    params = PostprocessParams(min_size=5, min_seed_size=2)
    whole = instances_from_probabilities(probs, params=params)
    banded = label_nuclei(probs, params=params, band_rows=40, margin=30)
    assert whole.max() > 30 and banded.max() == whole.max()
    pairs = np.unique(np.stack([whole.ravel(), banded.ravel()]), axis=1)
    assert pairs.shape[1] == whole.max() + 1


def test_segment(model_path: Path, mosaic: np.ndarray) -> None:
    image = mosaic[:120, :100]
    result = segment(image, model=str(model_path), tile=64, overlap=16)
    assert isinstance(result, Segmentation)
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.int32
    assert result.probabilities.shape == (3,) + image.shape[:2]
    assert list(result.table.columns) == list(MEASUREMENT_COLUMNS)
    assert result.n_nuclei == result.labels.max() == len(np.unique(result.labels)) - 1
    assert result.n_nuclei > 0
    assert (result.table["area"] >= 5).all()  # the model's min_size
    none = segment(image, model=str(model_path), min_size=10**6)
    assert none.n_nuclei == 0 and none.labels.max() == 0
    custom = segment(image, model=str(model_path), postprocess={"foreground_threshold": 0.999})
    assert custom.n_nuclei <= result.n_nuclei


def test_segment_uses_the_thresholds_of_the_image_kind(model_path: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from nucleiseg.data.kinds import image_kind

    images = _fixture_images()
    kinds = [image_kind(i) for i in images]
    fluorescence, tissue = images[kinds.index("fluorescence")], images[kinds.index("tissue")]
    shared = load_model(model_path)
    baseline = segment(tissue, model=shared)
    assert baseline.n_nuclei > 0
    # tissue images get thresholds of their own (here: a minimum size that removes everything)
    by_kind = replace(shared, postprocess_by_kind={"tissue": PostprocessParams(min_size=10**6)})
    assert by_kind.postprocess_for(tissue).min_size == 10**6
    assert by_kind.postprocess_for(fluorescence) == shared.postprocess
    assert segment(tissue, model=by_kind).n_nuclei == 0
    assert segment(fluorescence, model=by_kind).n_nuclei == segment(fluorescence, model=shared).n_nuclei > 0
    # and they travel in the model file's metadata
    from nucleiseg.tuning import update_model_metadata

    path = update_model_metadata(model_path, {"postprocess_by_kind": {"tissue": {"min_size": 10**6}}},
                                 out=tmp_path / "by-kind.safetensors")
    assert segment(tissue, model=str(path)).n_nuclei == 0


# ----------------------------------------------------------------------------- measurements
def test_measure_nuclei_values() -> None:
    labels = np.zeros((20, 30), np.int32)
    labels[2:6, 3:11] = 4  # 4 x 8 rectangle
    labels[10:15, 20:25] = 7
    grey = np.zeros((20, 30), np.uint16)
    grey[2:6, 3:11] = 1000
    table = measure_nuclei(labels, grey)
    assert list(table.columns) == list(MEASUREMENT_COLUMNS)
    row = table.iloc[0]
    assert table["label"].tolist() == [4, 7] and table["area"].tolist() == [32, 25]
    assert (row.centroid_y, row.centroid_x) == (3.5, 6.5)
    assert (row.bbox_min_row, row.bbox_min_col, row.bbox_max_row, row.bbox_max_col) == (2, 3, 6, 11)
    assert row.mean_intensity == 1000.0 and table.iloc[1].mean_intensity == 0.0  # raw 16-bit units
    assert np.isclose(row.equivalent_diameter, np.sqrt(4 * 32 / np.pi))
    assert 0 < row.eccentricity < 1 and np.isclose(table.iloc[1].eccentricity, 0)


def test_measure_nuclei_colour_and_empty() -> None:
    rgb = np.zeros((10, 10, 4), np.uint8)
    rgb[..., :3] = (100, 200, 50)
    labels = np.zeros((10, 10), np.uint16)
    labels[3:6, 3:6] = 1
    table = measure_nuclei(labels, rgb)
    assert np.isclose(table.mean_intensity[0], 0.2125 * 100 + 0.7154 * 200 + 0.0721 * 50, atol=1e-3)
    empty = measure_nuclei(np.zeros((10, 10), np.int32), rgb)
    assert len(empty) == 0 and list(empty.columns) == list(MEASUREMENT_COLUMNS)
    with pytest.raises(ValueError, match="does not match"):
        measure_nuclei(labels, rgb[:5])


def test_measure_nuclei_equals_regionprops_on_dsb_labels() -> None:
    """The bincount measurements are scikit-image's regionprops, column by column, on real annotated nuclei."""
    from skimage.measure import regionprops_table

    from nucleiseg.io import read_image
    from nucleiseg.measure import _PROPERTIES as names
    from nucleiseg.measure import grey_image
    measured = 0
    for sample in sorted(DSB_TRAIN.iterdir()):
        image = read_image(next((sample / "images").glob("*.png")))
        labels = np.zeros(image.shape[:2], np.int32)
        for k, mask in enumerate(sorted((sample / "masks").glob("*.png"))):
            labels[read_image(mask) > 0] = 3 * k + 2  # gaps between the labels, as after removing small ones
        table = measure_nuclei(labels, image)
        expected = regionprops_table(labels, intensity_image=grey_image(image), properties=(
            "label", "area", "centroid", "bbox", "equivalent_diameter_area", "eccentricity", "intensity_mean"))
        assert len(table) == len(expected["label"]) > 0
        measured += len(table)
        for key, column in names.items():
            tolerance = 1e-5 if column == "mean_intensity" else 1e-9  # scikit-image averages in float32
            np.testing.assert_allclose(table[column], expected[key], rtol=tolerance, atol=1e-9, err_msg=column)
        assert table["label"].dtype == np.int64 and table["area"].dtype == np.int64
    assert measured > 30


def test_measure_nuclei_sparse_and_huge_label_values() -> None:
    """Global ids (label values far above the pixel count) are measured without an array as long as the ids."""
    labels = np.zeros((30, 40), np.int64)
    labels[2:6, 3:11] = 2**40
    labels[10:15, 20:25] = 7
    labels[29, 39] = 2**40 + 5
    table = measure_nuclei(labels, np.full(labels.shape, 9, np.uint8))
    assert table["label"].tolist() == [7, 2**40, 2**40 + 5] and table["area"].tolist() == [25, 32, 1]
    assert table.iloc[1][["bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col"]].tolist() == [2, 3, 6, 11]
    everywhere = np.full((4, 4), 10**12, np.int64)  # no background pixel at all
    assert measure_nuclei(everywhere, np.zeros((4, 4), np.uint8))[["label", "area"]].values.tolist() == [[10**12, 16]]
    with pytest.raises(ValueError, match="non-negative"):
        measure_nuclei(-labels, np.zeros(labels.shape, np.uint8))


# ----------------------------------------------------------------------------- scale
def test_scale_keeps_the_image_size_and_checks_its_argument(model: Model) -> None:
    image = np.random.default_rng(5).integers(0, 255, (45, 61, 3), dtype=np.uint8)
    for scale in (0.5, 1.7):
        assert predict_probabilities(model, image, scale=scale).shape == (3, 45, 61)
    with pytest.raises(NucleisegError, match=r"45x61 pixels, 14x18 at scale 0.3: too small"):
        predict_probabilities(model, image, scale=0.3)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a number > 0"):
            predict_probabilities(model, image, scale=bad)
    assert inference.scale_for_diameter(36.0, model) == pytest.approx(0.5)  # no "nucleus_diameter": 18 px


def test_scale_refuses_to_enlarge_past_the_pixel_cap(model: Model, monkeypatch) -> None:
    """A given scale obeys the cap that "auto" keeps to, with an error instead of running out of memory."""
    image = np.random.default_rng(6).integers(0, 255, (45, 61, 3), dtype=np.uint8)
    monkeypatch.setattr(scaling, "MAX_ENLARGED_PIXELS", 5000)  # 45x61 at scale 1.7 is 76x104 = 7904 pixels
    with pytest.raises(NucleisegError, match=r"45x61 pixels, 76x104 at scale 1.7: enlarging past 0.005 Mpixel"):
        predict_probabilities(model, image, scale=1.7)
    assert predict_probabilities(model, image, scale=1.2).shape == (3, 45, 61)  # 54x73: under the cap
    assert predict_probabilities(model, image, scale=0.9).shape == (3, 45, 61)  # shrinking is never refused
    # "auto" stops at the cap exactly; rounding the sizes may overshoot it by a fraction of a row, never refused
    small = image[:23, :20]
    factor = inference.auto_scale(2.0, 18.0, small.shape[:2])
    assert factor == pytest.approx((5000 / (23 * 20)) ** 0.5)
    assert round(23 * factor) * round(20 * factor) > 5000  # 76 x 66
    assert predict_probabilities(model, small, scale=factor).shape == (3, 23, 20)


@pytest.fixture(scope="module")
def magnified(fixture_cache: Path):
    """A fluorescence fixture enlarged 4x (a 4x stronger objective), its labels, and the shipped model's result
    on it as it is (computed once: the two tests below share this, the slowest pass)."""
    import cv2

    from nucleiseg.io import read_image, read_labels

    image_id = "0b2e702f90aee4fff2bc6e4326308d50cf04701082e718d4f831c8959fbcda93"
    image = read_image(fixture_cache / "images" / f"{image_id}.png")
    truth = read_labels(fixture_cache / "labels" / f"{image_id}.tif")
    big = cv2.resize(image, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    big_truth = cv2.resize(truth.astype(np.uint16), None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST)
    return image, truth, big, big_truth, segment(big, precision="bf16")


def test_scale_undoes_a_magnification_with_the_shipped_model(magnified) -> None:
    """Its nuclei are larger than any the model trained on, and scale 1/4 (or diameter 72) gives back close to
    the score at the original size."""
    from nucleiseg.options import PredictOptions

    image, truth, big, big_truth, as_is = magnified
    native = dsb_score(truth, segment(image, precision="bf16").labels)
    rescaled = segment(big, precision="bf16", scale=0.25)
    assert rescaled.labels.shape == big.shape[:2] and rescaled.scale == 0.25
    assert dsb_score(big_truth, rescaled.labels) > dsb_score(big_truth, as_is.labels) + 0.15  # measured: 0.67 -> 0.91
    assert dsb_score(big_truth, rescaled.labels) > native - 0.1  # native: 0.93
    # a nucleus diameter of 72 px is that scale for a model trained on 18-px nuclei
    assert PredictOptions(diameter=4 * 18.0).resolved(4, inference.DEFAULT_NUCLEUS_DIAMETER).scale == 0.25
    assert inference.scale_for_diameter(4 * 18.0) == 0.25


def test_auto_scale_finds_the_magnification_from_a_first_pass(magnified) -> None:
    """scale="auto" measures the nuclei of a first pass: an image enlarged 4x is predicted again at about 1/4
    (the shipped model's 18-px nuclei over the ~62 px found), one at its own size is left alone."""
    image, truth, big, big_truth, as_is = magnified
    auto = segment(image, precision="bf16", scale="auto")
    assert auto.scale == 1.0
    np.testing.assert_array_equal(auto.labels, segment(image, precision="bf16").labels)

    auto = segment(big, precision="bf16", scale="auto")
    assert 0.2 < auto.scale < 0.4  # measured: 0.29
    assert auto.labels.shape == big.shape[:2]
    assert dsb_score(big_truth, auto.labels) > dsb_score(big_truth, as_is.labels) + 0.15
    with pytest.raises(ValueError, match="'auto'"):
        segment(image, precision="bf16", scale="automatic")


def test_auto_scale_keeps_an_empty_first_pass(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = UNetPlusPlus(widths=WIDTHS).eval()
    with torch.no_grad():
        for head in net.heads:
            head.bias[0] = -20.0  # never sees a nucleus
    save_model(tmp_path / "blind.safetensors", net)
    image = np.random.default_rng(6).integers(0, 255, (64, 64), dtype=np.uint8)
    result = segment(image, load_model(tmp_path / "blind.safetensors"), scale="auto")
    assert result.scale == 1.0 and result.n_nuclei == 0


@pytest.mark.parametrize("seed", range(4))
def test_flooding_only_shared_regions_changes_nothing(seed: int) -> None:
    """flood() with the regions gives skimage's watershed over the whole foreground, label for label."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from nucleiseg.postprocess import boundary_probability, flood, foreground_regions, seed_map, seed_markers, seed_orphans

    rng = np.random.default_rng(seed)
    probs = np.stack([ndi.gaussian_filter(rng.random((160, 130)), s) for s in (3.0, 1.5, 1.5)]).astype(np.float32)
    probs = (probs - probs.min(axis=(1, 2), keepdims=True)) / np.ptp(probs, axis=(1, 2), keepdims=True)
    body, boundary = probs[0], boundary_probability(probs, ("body", "contour", "touch"))
    shared = 0
    for fg, st, mss in ((0.3, 0.2, 1), (0.5, 0.3, 3), (0.6, 0.35, 1)):
        foreground, regions, n = foreground_regions(body, fg)
        markers = seed_orphans(seed_markers(seed_map(body, boundary), foreground, st, mss), regions, n)
        per_region = [len(np.unique(markers[regions == r])) for r in range(1, n + 1)]
        shared += sum(k > 1 for k in per_region)
        np.testing.assert_array_equal(flood(body, markers, foreground, regions, n),
                                      watershed(-body, markers, mask=foreground))
    assert shared >= 2, "the test needs regions flooded from several markers"


# ----------------------------------------------------------------------------- arrays in the layouts files have
def test_segment_accepts_the_layouts_a_file_may_have(model: Model) -> None:
    """(C, H, W) and (1, H, W) arrays give what the same pixels give as read_image returns them, not
    "image is 3x256 pixels, too small"; a stack is refused in words that say what layout is expected."""
    rgb = _fixture_images()[1][:64, :72]
    grey = rgb[..., 1]
    expected_rgb, expected_grey = segment(rgb, model=model), segment(grey, model=model)
    for array, expected in ((np.moveaxis(rgb, -1, 0), expected_rgb), (grey[None], expected_grey),
                            (grey[None, :, :, None], expected_grey)):
        result = segment(array, model=model)
        np.testing.assert_array_equal(result.labels, expected.labels)
        assert result.table.equals(expected.table)
    np.testing.assert_array_equal(predict_probabilities(model, np.moveaxis(rgb, -1, 0)),
                                  predict_probabilities(model, rgb))
    with pytest.raises(NucleisegError, match=r"expected a 2-D image as an array of shape \(H, W\), \(H, W, C\) or "
                                             r"\(C, H, W\) with C = 1 to 4 channels .* got shape \(7, 64, 72\)"):
        segment(np.stack([grey] * 7), model=model)
    with pytest.raises(NucleisegError, match="expected an image of numbers"):
        segment(grey.astype(np.complex64), model=model)


def test_bool_array_segments_like_the_bool_tiff_read_by_the_cli(model: Model, tmp_path: Path) -> None:
    """A boolean array and the same mask saved as a TIFF go through one conversion (read_image's: 0/1 uint8)."""
    import tifffile

    from nucleiseg.io import read_image

    grey = _fixture_images()[0][:96, :96, 0]
    mask = grey > np.percentile(grey, 80)  # the brightest fifth: the nuclei, roughly
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    from_file = segment(read_image(tmp_path / "mask.tif"), model=model)
    from_array = segment(mask, model=model)
    np.testing.assert_array_equal(from_array.labels, from_file.labels)
    np.testing.assert_array_equal(from_array.probabilities, from_file.probabilities)


def test_mean_intensity_leaves_out_pixels_without_data() -> None:
    """A NaN (or infinite) pixel inside a nucleus does not make its mean intensity NaN."""
    labels = np.zeros((12, 12), np.int32)
    labels[1:5, 1:5] = 1
    labels[6:10, 6:10] = 2
    labels[0, 11] = 3
    image = np.full((12, 12), 10.0, np.float32)
    image[1:5, 1:5] = np.arange(16, dtype=np.float32).reshape(4, 4)
    image[2, 2], image[3, 3] = np.nan, np.inf  # 5 and 10 of 0..15 missing
    image[0, 11] = np.nan  # a nucleus with no data at all
    table = measure_nuclei(labels, image)
    finite = [v for v in range(16) if v not in (5, 10)]
    assert table["area"].tolist() == [16, 16, 1]  # the shape counts every pixel
    assert table["mean_intensity"][0] == pytest.approx(np.mean(finite))
    assert table["mean_intensity"][1] == 10.0 and np.isnan(table["mean_intensity"][2])
    rgb = np.repeat(image[..., None], 3, axis=2)  # colour: the luminance of a NaN pixel is NaN, left out too
    assert measure_nuclei(labels, rgb)["mean_intensity"][0] == pytest.approx(np.mean(finite), rel=1e-5)


# ----------------------------------------------------------------------------- memory
def test_prediction_refused_when_it_needs_more_memory_than_available(model: Model, monkeypatch) -> None:
    monkeypatch.delenv(inference.MEMORY_CHECK_ENV, raising=False)
    image = np.zeros((64, 80), np.uint8)
    need = inference.prediction_memory(image.shape)
    assert need == inference.BYTES_PER_PIXEL * 64 * 80
    monkeypatch.setattr(inference, "available_memory", lambda: need - 1)
    with pytest.raises(NucleisegError) as info:
        predict_probabilities(model, image)
    message = str(info.value)
    assert "\n" not in message
    for words in ("image of 64 x 80 pixels", "GiB of memory", "GiB is available", "--cluster", "segment_large",
                  "NUCLEISEG_MEMORY_CHECK=0"):
        assert words in message
    with pytest.raises(NucleisegError, match="64 x 80 pixels"):
        segment(image, model=model)
    monkeypatch.setattr(inference, "available_memory", lambda: need)  # just enough
    assert predict_probabilities(model, image).shape == (3, 64, 80)
    monkeypatch.setattr(inference, "available_memory", lambda: 1)
    monkeypatch.setenv(inference.MEMORY_CHECK_ENV, "0")  # the user's override
    assert predict_probabilities(model, image).shape == (3, 64, 80)


def test_memory_estimate_of_a_huge_image(monkeypatch) -> None:
    """The 1.5 MB PNG that claims 40,000 x 40,000 grey pixels (1.6 GB decoded, under the reading limit) is
    refused before prediction on a machine with 16 GiB free; 8000 x 8000 (3.6 GiB measured in all) fits."""
    monkeypatch.delenv(inference.MEMORY_CHECK_ENV, raising=False)
    monkeypatch.setattr(inference, "available_memory", lambda: 16 * 1024**3)
    with pytest.raises(NucleisegError, match=r"40,000 x 40,000 pixels: predicting it needs about 46\.2 GiB .* "
                                             r"16 GiB is available"):
        inference.check_memory((40_000, 40_000))
    inference.check_memory((8000, 8000, 3))
    assert 1.4 < inference.prediction_memory((8000, 8000)) / 1024**3 < 3.62  # x + acc at least; a floor
    # resized for the network: counted at the larger size, plus the probabilities resized back
    assert inference.prediction_memory((1000, 1000), 2.0) == inference.BYTES_PER_PIXEL * 4e6 + 12e6
    with pytest.raises(NucleisegError, match=r"at scale 2"):
        inference.check_memory((16_000, 16_000), 2.0)


def test_available_memory_is_a_figure() -> None:
    available = inference.available_memory()
    assert available is None or 0 < available <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_absurd_scale_is_refused_in_a_short_line(model: Model) -> None:
    with pytest.raises(NucleisegError, match=r"256x256 pixels, 4\.608e\+303x4\.608e\+303 at scale 1\.8e\+301") as info:
        predict_probabilities(model, np.zeros((256, 256), np.uint8), diameter=1e-300)
    assert len(str(info.value)) < 250
