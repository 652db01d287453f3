"""Readers fed random, truncated or bit-flipped bytes raise the project's error (one line naming the file), never
another exception: images (PNG, JPEG, TIFF, BMP), label images, model files and training settings.

hypothesis generates the damage (where to cut, which bytes to flip, what to write); each test tries
``max_examples`` files. docs/reliability.md lists the figures.
"""

from __future__ import annotations

import io as _io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nucleiseg.errors import NucleisegError
from nucleiseg.io import read_image, read_labels

#: Cases per test; NUCLEISEG_FUZZ_EXAMPLES raises it for a longer campaign (docs/reliability.md).
EXAMPLES = int(os.environ.get("NUCLEISEG_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FOLDER = Path(tempfile.mkdtemp(prefix="nucleiseg-fuzz-"))
#: Files and bytes fed to the readers, per test; written as JSON to $NUCLEISEG_FUZZ_REPORT when set.
FED: dict[str, list[int]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_figures():
    yield
    report = os.environ.get("NUCLEISEG_FUZZ_REPORT")
    if report:
        import json

        Path(report).write_text(json.dumps({k: {"files": v[0], "bytes": v[1]} for k, v in FED.items()}, indent=1))


def _fed(name: str, data: bytes) -> None:
    counts = FED.setdefault(name, [0, 0])
    counts[0] += 1
    counts[1] += len(data)


def _samples() -> dict[str, bytes]:
    """Small valid files of every format read_image reads."""
    import tifffile

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (24, 20), dtype=np.uint8)
    rgb = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
    out = {}
    for name, image, kwargs in [("png", rgb, {}), ("jpg", rgb, {"quality": 90}), ("bmp", grey, {})]:
        buffer = _io.BytesIO()
        Image.fromarray(image).save(buffer, format={"jpg": "JPEG"}.get(name, name.upper()), **kwargs)
        out[name] = buffer.getvalue()
    buffer = _io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 200).save(buffer, format="PNG")
    out["png16"] = buffer.getvalue()
    for name, kwargs in [("tif", {}), ("zlib.tif", {"compression": "zlib"}), ("big.tif", {"bigtiff": True}),
                         ("tiled.tif", {"tile": (16, 16)})]:
        buffer = _io.BytesIO()
        tifffile.imwrite(buffer, grey.astype(np.uint16), **kwargs)
        out[name] = buffer.getvalue()
    return out


SAMPLES = _samples()
SUFFIX = {"png": ".png", "png16": ".png", "jpg": ".jpg", "bmp": ".bmp", "tif": ".tif", "zlib.tif": ".tif",
          "big.tif": ".tif", "tiled.tif": ".tif"}


def _check_reader(read, data: bytes, suffix: str) -> None:
    _fed(f"{read.__name__} ({suffix or 'no suffix'})", data)
    path = FOLDER / f"case{suffix}"
    path.write_bytes(data)
    try:
        result = read(path)
    except NucleisegError as exc:  # the only exception allowed
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
    else:
        assert isinstance(result, np.ndarray) and result.size > 0


@st.composite
def damaged(draw):
    """A sample file cut short, with some bytes overwritten, or both."""
    kind = draw(st.sampled_from(sorted(SAMPLES)))
    data = bytearray(SAMPLES[kind])
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data) - 1))]
    for _ in range(draw(st.integers(0, 6))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return kind, bytes(data)


@pytest.mark.parametrize("read", [read_image, read_labels], ids=["read_image", "read_labels"])
@FUZZ
@given(case=damaged())
def test_damaged_images_raise_only_the_projects_error(read, case):
    kind, data = case
    _check_reader(read, data, SUFFIX[kind])


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".gif", ".txt", ""]),
       header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"II+\x00", b"BM", b"\xff\xd8\xff"]))
def test_random_bytes_raise_only_the_projects_error(data, suffix, header):
    _check_reader(read_image, header + data, suffix)


def _model_bytes() -> bytes:
    from nucleiseg.models import UNetPlusPlus, save_model

    path = FOLDER / "tiny.safetensors"
    save_model(path, UNetPlusPlus(widths=(2, 4)), {"postprocess": {"min_size": 3}, "fast_prune_level": 1})
    return path.read_bytes()


MODEL = _model_bytes()


@FUZZ
@given(cut=st.one_of(st.none(), st.integers(0, len(MODEL) - 1)),
       flips=st.lists(st.tuples(st.integers(0, len(MODEL) - 1), st.integers(0, 255)), max_size=6),
       header_only=st.booleans())
def test_damaged_model_files_raise_only_the_projects_error(cut, flips, header_only):
    from nucleiseg.models import ModelMetadata, load_model_file

    data = bytearray(MODEL)
    header_end = 8 + int.from_bytes(MODEL[:8], "little")
    for offset, value in flips:  # most flips aimed at the JSON header, where the checks are
        data[(offset % header_end) if header_only else offset] = value
    if cut is not None:
        data = data[:cut]
    path = FOLDER / "case.safetensors"
    path.write_bytes(bytes(data))
    _fed("model file", bytes(data))
    for load in (ModelMetadata.read, load_model_file):
        try:
            load(path)
        except NucleisegError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.builds(lambda d: __import__("json").dumps(d), st.dictionaries(
    st.sampled_from(["epochs", "crop", "widths", "lr", "seed", "kind_weights", "channel_weights", "precision",
                     "schedule", "threads", "other"]),
    st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(), st.text(max_size=5),
              st.lists(st.integers(-2, 64), max_size=10), st.dictionaries(st.text(max_size=8), st.floats(), max_size=3)),
    max_size=5))))
def test_damaged_training_settings_raise_only_the_projects_error(text):
    from nucleiseg.training import TrainConfig

    path = FOLDER / "train_config.json"
    path.write_text(text, encoding="utf-8")
    _fed("train_config.json", text.encode())
    try:
        TrainConfig.from_json(path)
    except NucleisegError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
