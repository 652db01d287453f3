"""``nucleiseg predict``: outputs, formats, and bad input that never costs good work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nucleiseg.cli import main
from nucleiseg.io import read_image, read_labels, write_png
from nucleiseg.models import UNetPlusPlus, save_model

DSB_TRAIN = Path(__file__).resolve().parent / "fixtures" / "dsb" / "stage1_train"
FLUO = "0b2e702f90aee4fff2bc6e4326308d50cf04701082e718d4f831c8959fbcda93"
TISSUE = "af576e8ec3a8d0b57eb6a311299e9e4fd2047970d3dd9d6f52e54ea6a91109da"


def _fixture(image_id: str, size: int = 96) -> np.ndarray:
    return read_image(DSB_TRAIN / image_id / "images" / f"{image_id}.png")[:size, :size]


@pytest.fixture(scope="module")
def model(blob_model_file: str) -> str:
    """A tiny model that finds blobs (tests/conftest.py)."""
    return blob_model_file


@pytest.fixture(scope="module")
def blind_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model that never sees a nucleus (body bias -20)."""
    torch.manual_seed(0)
    net = UNetPlusPlus(widths=(4, 8, 16)).eval()
    with torch.no_grad():
        for head in net.heads:
            head.bias[0] = -20.0
    path = tmp_path_factory.mktemp("model") / "blind.safetensors"
    save_model(path, net)
    return str(path)


def _good(folder: Path, name: str = "good.png", image_id: str = FLUO) -> Path:
    path = folder / name
    write_png(path, _fixture(image_id, 64))
    return path


def _run(capsys, *args: str) -> tuple[int, list[str]]:
    """Run the CLI; return the exit status and the non-empty stderr lines but the closing count (no progress bar:
    stderr is not a terminal)."""
    status = main(["predict", *map(str, args)])
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.strip() and " images segmented, " not in line]


def _outputs(out: Path, name: str) -> list[Path]:
    return [out / f"{name}_{suffix}" for suffix in ("labels.tif", "mask.png", "overlay.png", "nuclei.csv")]


# ----------------------------------------------------------------------------- outputs
def test_outputs_and_formats(tmp_path: Path, capsys, model: str) -> None:
    import tifffile

    images = tmp_path / "images"
    images.mkdir()
    fluo = _fixture(FLUO, 80)
    write_png(images / "rgba.png", fluo)  # RGBA 8-bit
    tifffile.imwrite(images / "grey16.tif", (fluo[..., 0].astype(np.uint16) * 257)[:70, :75])
    write_png(images / "tissue.png", _fixture(TISSUE, 90)[..., :3])
    import imageio.v3 as iio

    iio.imwrite(images / "photo.jpg", _fixture(TISSUE, 72)[..., :3])
    out = tmp_path / "out"
    status, lines = _run(capsys, images, "-o", out, "--model", model, "--formats", "rle,imagej-roi,geojson",
                         "--save-probabilities", "--threads", "1", "--tile", "64", "--overlap", "16")
    assert status == 0, lines
    names = {"rgba": (80, 80), "grey16": (70, 75), "tissue": (90, 90), "photo": (72, 72)}
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["name"]) == sorted(names) and (summary["status"] == "ok").all()
    for name, shape in names.items():
        assert all(p.is_file() for p in _outputs(out, name))
        labels = read_labels(out / f"{name}_labels.tif")
        assert labels.shape == shape and labels.dtype == np.uint16
        mask = read_image(out / f"{name}_mask.png")
        assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask > 0, labels > 0)
        assert read_image(out / f"{name}_overlay.png").shape == shape + (3,)
        table = pd.read_csv(out / f"{name}_nuclei.csv")
        assert len(table) == labels.max() and "mean_intensity" in table
        assert int(summary.loc[summary["name"] == name, "nuclei"].iloc[0]) == len(table)
        probs = tifffile.imread(out / f"{name}_probabilities.tif")
        assert probs.shape == (3,) + shape and probs.dtype == np.float32
        features = json.loads((out / f"{name}.geojson").read_text())["features"]
        assert len(features) == len(table)
        import roifile

        assert len(roifile.roiread(out / f"{name}_rois.zip")) == len(table)
    assert summary["nuclei"].sum() > 0
    from nucleiseg.data.rle import read_rle_csv, rle_to_labels

    rles = read_rle_csv(out / "submission.csv")
    assert sorted(rles) == sorted(names)
    for name, shape in names.items():
        decoded, problems = rle_to_labels(rles[name], shape)
        assert not problems and np.array_equal(decoded > 0, read_labels(out / f"{name}_labels.tif") > 0)
    # atomic writes leave no temporary files behind; the bookkeeping holds a record per image, nothing staged
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".nucleiseg"]
    assert sorted(p.name for p in (out / ".nucleiseg" / "done").iterdir()) == sorted(f"{n}.json" for n in names)
    assert not list((out / ".nucleiseg" / "staging").iterdir()) and not list((out / ".nucleiseg" / "journal").iterdir())


def test_globs_same_names_and_existing_outputs(tmp_path: Path, capsys, model: str) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _good(tmp_path / folder, "cells.png")
    out = tmp_path / "out"
    status, lines = _run(capsys, tmp_path / "*" / "cells.png", "-o", out, "--model", model)
    assert status == 0
    assert [line for line in lines if "same name" in line] == [
        f"nucleiseg predict: note: {tmp_path / 'b' / 'cells.png'}: same name as {tmp_path / 'a' / 'cells.png'}; "
        "its outputs are named cells-2_*"
    ]
    assert all(p.is_file() for p in _outputs(out, "cells") + _outputs(out, "cells-2"))

    before = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in ("summary.csv", ".nucleiseg")}
    status, lines = _run(capsys, tmp_path / "a", tmp_path / "b", "-o", out, "--model", model)
    assert status == 0
    assert sum("skipped" in line for line in lines) == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing replaced
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["status"] == "skipped").all() and summary["nuclei"].notna().all()

    status, lines = _run(capsys, tmp_path / "a", "-o", out, "--model", model, "--overwrite")
    assert status == 0 and not any("skipped" in line for line in lines)
    assert (out / "cells_labels.tif").stat().st_mtime_ns != before[out / "cells_labels.tif"]


# ----------------------------------------------------------------------------- bad input
def _zero_byte(folder: Path) -> tuple[Path, str]:
    path = folder / "empty.png"
    path.write_bytes(b"")
    return path, "empty file"


def _truncated(folder: Path) -> tuple[Path, str]:
    whole = folder / "whole.tmp"
    write_png(whole.with_suffix(".png"), _fixture(FLUO, 64))
    data = whole.with_suffix(".png").read_bytes()
    whole.with_suffix(".png").unlink()
    path = folder / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return path, "cannot be read as an image"


def _not_an_image(folder: Path) -> tuple[Path, str]:
    path = folder / "notes.tif"
    path.write_text("these are my notes, not an image\n")
    return path, "cannot be read as an image"


def _z_stack(folder: Path) -> tuple[Path, str]:
    import tifffile

    path = folder / "stack.tif"
    tifffile.imwrite(path, np.stack([_fixture(FLUO, 64)[..., 0]] * 5))
    return path, "got an array of shape (5, 64, 64); a z-stack"


def _foreign_format(folder: Path) -> tuple[Path, str]:
    path = folder / "scan.nd2"
    path.write_bytes(b"ND2 microscope file, not readable here" * 10)
    return path, ".nd2 is not a format nucleiseg reads (BMP, JPG, PNG, TIF)"


def _tiny(folder: Path) -> tuple[Path, str]:
    path = folder / "dot.png"
    write_png(path, np.full((1, 1), 200, np.uint8))
    return path, "1x1 pixels, too small: the minimum is 16x16"


def _missing(folder: Path) -> tuple[Path, str]:
    return folder / "absent.png", "no such file"


@pytest.mark.parametrize("make_bad", [_zero_byte, _truncated, _not_an_image, _z_stack, _foreign_format, _tiny, _missing],
                         ids=["zero-byte", "truncated", "not-an-image", "z-stack", "foreign-format", "1x1", "missing"])
def test_bad_input_costs_no_good_work(tmp_path: Path, capsys, model: str, make_bad) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad, problem = make_bad(inputs)
    good = _good(inputs)
    out = tmp_path / "out"
    status, lines = _run(capsys, bad, good, "-o", out, "--model", model)
    assert status == 1
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and str(bad) in errors[0] and problem in errors[0], lines
    assert all(p.is_file() for p in _outputs(out, "good"))
    assert not any(out.glob(f"{bad.stem}_*"))
    summary = pd.read_csv(out / "summary.csv").set_index("image")
    assert summary.loc[str(bad), "status"] == "failed" and problem in summary.loc[str(bad), "message"]
    assert summary.loc[str(good), "status"] == "ok"


@pytest.mark.parametrize("value", [0, 255], ids=["all-black", "all-white"])
def test_blank_images_are_valid(tmp_path: Path, capsys, model: str, blind_model: str, value: int) -> None:
    path = tmp_path / "blank.png"
    write_png(path, np.full((48, 40, 3), value, np.uint8))
    status, lines = _run(capsys, path, "-o", tmp_path / "out", "--model", model)  # a working model: no crash
    assert status == 0 and not any(": error: " in line for line in lines)
    status, lines = _run(capsys, path, "-o", tmp_path / "out2", "--model", blind_model, "--formats",
                         "rle,geojson,imagej-roi")
    assert status == 0
    assert lines == [f"nucleiseg predict: warning: {path}: no nuclei found (outputs written)"]
    assert all(p.is_file() for p in _outputs(tmp_path / "out2", "blank"))
    assert read_labels(tmp_path / "out2" / "blank_labels.tif").max() == 0
    assert pd.read_csv(tmp_path / "out2" / "blank_nuclei.csv").empty


def test_failure_while_writing_leaves_no_partial_result(tmp_path: Path, capsys, model: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from nucleiseg import io

    real = io.write_png

    def broken(path, image):  # the overlay, written in a second thread while the rest is written
        if "bad" in Path(path).name and "overlay" in Path(path).name:
            raise RuntimeError("disk on fire")
        real(path, image)

    monkeypatch.setattr(io, "write_png", broken)
    bad, good = _good(tmp_path, "bad.png"), _good(tmp_path, "good.png")
    out = tmp_path / "out"
    status, lines = _run(capsys, bad, good, "-o", out, "--model", model, "--formats", "geojson", "--save-probabilities")
    assert status == 1
    assert lines == [f"nucleiseg predict: error: {bad}: unexpected error (RuntimeError: disk on fire); "
                     "run with -v for the traceback"]
    assert not list(out.glob("bad*"))  # its probabilities and GeoJSON, written first, are gone
    assert all(p.is_file() for p in _outputs(out, "good"))


def test_empty_folder_and_unmatched_glob(tmp_path: Path, capsys, model: str) -> None:
    (tmp_path / "empty").mkdir()
    good = _good(tmp_path)
    status, lines = _run(capsys, tmp_path / "empty", tmp_path / "nothing*.tif", good, "-o", tmp_path / "out",
                         "--model", model)
    assert status == 1
    assert any(str(tmp_path / "empty") in line and "no images" in line for line in lines)
    assert any("nothing*.tif" in line and "no image file matches" in line for line in lines)
    assert (tmp_path / "out" / "good_labels.tif").is_file()


def test_refuses_to_overwrite_inputs(tmp_path: Path, capsys, model: str) -> None:
    _good(tmp_path, "x.png")
    _good(tmp_path, "x_mask.png")  # would be replaced by the mask of x.png
    status, lines = _run(capsys, tmp_path, "-o", tmp_path, "--model", model)
    assert status == 2
    assert len(lines) == 1 and "would overwrite the input image" in lines[0] and "x_mask.png" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "x_mask.png"]


def test_default_model_missing(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from nucleiseg import models

    monkeypatch.setattr(models, "DEFAULT_MODEL_PATH", tmp_path / "weights" / "default.safetensors")
    status, lines = _run(capsys, _good(tmp_path), "-o", tmp_path / "out")
    assert status == 2
    assert len(lines) == 1
    assert "default model is missing" in lines[0] and "--model" in lines[0] and "default.safetensors" in lines[0]


def test_option_errors(tmp_path: Path, capsys, model: str) -> None:
    good = _good(tmp_path)
    status, lines = _run(capsys, good, "-o", tmp_path / "out", "--model", model, "--tile", "64", "--overlap", "48")
    assert status == 2 and "half the tile" in lines[-1]
    with pytest.raises(SystemExit):
        main(["predict", str(good), "-o", str(tmp_path / "out"), "--formats", "rle,shapefile"])
    assert "unknown format shapefile" in capsys.readouterr().err
    for option, value in (("--scale", "0"), ("--diameter", "-3"), ("--scale", "nan")):
        status, lines = _run(capsys, good, "-o", tmp_path / "out", "--model", model, option, value)
        assert status == 2 and len(lines) == 1 and f"error: {option} must be a number" in lines[0]
        assert f"> 0, got {value}" in lines[0]
    with pytest.raises(SystemExit):
        main(["predict", str(good), "-o", str(tmp_path / "out"), "--scale", "0.5", "--diameter", "30"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work
    # a scale that leaves the image under 16 px is that image's one-line error, not the run's
    status, lines = _run(capsys, good, "-o", tmp_path / "small", "--model", model, "--scale", "0.2")
    assert status == 1 and any("good.png" in line and "13x13 at scale 0.2: too small" in line for line in lines)


def test_scale_gives_outputs_at_the_image_size(tmp_path: Path, capsys, model: str) -> None:
    good = _good(tmp_path)
    for option in (("--scale", "1.5"), ("--diameter", "9")):
        out = tmp_path / option[0].strip("-")
        status, _ = _run(capsys, good, "-o", out, "--model", model, *option)
        assert status == 0
        assert read_labels(out / "good_labels.tif").shape == (64, 64)
        assert read_image(out / "good_overlay.png").shape[:2] == (64, 64)
    out = tmp_path / "auto"
    assert _run(capsys, good, "-o", out, "--model", model, "--diameter", "auto")[0] == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["status"].tolist() == ["ok"] and read_labels(out / "good_labels.tif").shape == (64, 64)
    with pytest.raises(SystemExit):
        main(["predict", str(good), "-o", str(tmp_path / "bad"), "--diameter", "big"])
    assert "expected a number of pixels or 'auto', got 'big'" in capsys.readouterr().err
    # --diameter 9 is --scale 2 for a model trained on 18-px nuclei
    status, _ = _run(capsys, good, "-o", tmp_path / "two", "--model", model, "--scale", "2")
    np.testing.assert_array_equal(read_labels(tmp_path / "two" / "good_labels.tif"),
                                  read_labels(tmp_path / "diameter" / "good_labels.tif"))


def test_channel_picks_the_nuclear_stain(tmp_path: Path, capsys, model: str) -> None:
    """--channel segments one channel of a multi-channel TIFF exactly as that channel saved alone."""
    import tifffile

    dapi = _fixture(FLUO, 96)[..., 0].astype(np.uint16) * 40  # 16-bit, as cameras write
    other = np.random.default_rng(0).integers(0, 9000, dapi.shape).astype(np.uint16)  # a bright second stain
    inputs = tmp_path / "in"
    inputs.mkdir()
    # (C, H, W) with DAPI second, as Fiji saves a composite
    tifffile.imwrite(inputs / "stack.tif", np.stack([other, dapi, other[::-1]]), photometric="minisblack")
    tifffile.imwrite(inputs / "dapi.tif", dapi)
    out = tmp_path / "out"
    status, lines = _run(capsys, inputs / "stack.tif", "-o", out, "--model", model, "--channel", "2")
    assert status == 0, lines
    assert _run(capsys, inputs / "dapi.tif", "-o", out, "--model", model)[0] == 0
    picked, alone = read_labels(out / "stack_labels.tif"), read_labels(out / "dapi_labels.tif")
    assert alone.max() > 0 and np.array_equal(picked, alone)
    table = pd.read_csv(out / "stack_nuclei.csv")
    assert table["mean_intensity"].max() > 255  # the channel's own 16-bit units

    status, _ = _run(capsys, inputs / "stack.tif", "-o", tmp_path / "colour", "--model", model)
    assert status == 0 and not np.array_equal(read_labels(tmp_path / "colour" / "stack_labels.tif"), alone)

    status, lines = _run(capsys, inputs / "stack.tif", inputs / "dapi.tif", "-o", tmp_path / "bad", "--model",
                         model, "--channel", "3", "--overwrite")
    errors = [line for line in lines if ": error: " in line]
    assert status == 1 and len(errors) == 1
    assert "dapi.tif: has 1 channel, so there is no channel 3" in errors[0]
    assert (tmp_path / "bad" / "stack_labels.tif").is_file()  # the other image is still done

    status, lines = _run(capsys, inputs / "dapi.tif", "-o", tmp_path / "zero", "--model", model, "--channel", "0")
    assert status == 2 and "--channel counts from 1" in lines[-1]

    # Two stains in a TIFF without --channel: segmented as grey + alpha, and the user is told.
    tifffile.imwrite(inputs / "two.tif", np.stack([dapi, other]), photometric="minisblack")
    status, lines = _run(capsys, inputs / "two.tif", "-o", tmp_path / "two", "--model", model)
    assert status == 0 and any("two.tif: 2 channels, read as grey + alpha" in line for line in lines), lines
    status, lines = _run(capsys, inputs / "two.tif", "-o", tmp_path / "two-1", "--model", model, "--channel", "1")
    assert status == 0 and not any("grey + alpha" in line for line in lines)
    assert np.array_equal(read_labels(tmp_path / "two-1" / "two_labels.tif"), alone)

    # An ImageJ hyperstack of 5 channels (more than any colour image has): --channel reaches every one.
    stack5 = np.stack([other, other[::-1], other.T, dapi, other[:, ::-1]])
    tifffile.imwrite(inputs / "five.tif", stack5, imagej=True, metadata={"axes": "CYX"})
    status, lines = _run(capsys, inputs / "five.tif", "-o", tmp_path / "five", "--model", model, "--channel", "4")
    assert status == 0, lines
    assert np.array_equal(read_labels(tmp_path / "five" / "five_labels.tif"), alone)
    status, lines = _run(capsys, inputs / "five.tif", "-o", tmp_path / "five-6", "--model", model, "--channel", "6")
    assert status == 1 and any("has 5 channels (axes CYX), so there is no channel 6" in line for line in lines)


def test_cli_defaults_are_the_library_defaults() -> None:
    """predict's flags and the Python API share one set of defaults (bf16 where supported, 1024-px tiles)."""
    from nucleiseg.cli import _predict_options, build_parser
    from nucleiseg.options import PredictOptions

    args = build_parser().parse_args(["predict", "x.png", "-o", "out"])
    assert _predict_options(args) == PredictOptions()
    assert PredictOptions().precision == "auto" and PredictOptions().tile == 1024


# ----------------------------------------------------------------------------- whose outputs these are
def test_files_no_run_wrote_are_never_deleted_or_replaced(tmp_path: Path, capsys, model: str) -> None:
    import tifffile

    folder = tmp_path / "data"
    folder.mkdir()
    _good(folder, "cells.png")
    tifffile.imwrite(folder / "cells_probabilities.tif", _fixture(TISSUE, 64)[..., 0])  # another input image
    (folder / "cells_rois.zip").write_bytes(b"my hand-drawn ROIs")
    (folder / "cells.geojson").write_text('{"my": "annotations"}')
    status, lines = _run(capsys, folder, "-o", folder, "--model", model)
    assert status == 0, lines
    assert (folder / "cells_rois.zip").read_bytes() == b"my hand-drawn ROIs"
    assert (folder / "cells.geojson").read_text() == '{"my": "annotations"}'
    assert (folder / "cells_probabilities.tif").is_file() and (folder / "cells_labels.tif").is_file()
    assert (folder / "cells_probabilities_labels.tif").is_file()  # it was segmented as the input it is

    # a hand-made ground truth where the labels would go: that image fails in one line, the file is kept
    truth, images = tmp_path / "truth", tmp_path / "images"
    truth.mkdir(), images.mkdir()
    _good(images, "cells.png")
    _good(images, "other.png", TISSUE)
    (truth / "cells_labels.tif").write_bytes(b"my ground truth")
    status, lines = _run(capsys, images, "-o", truth, "--model", model)
    assert status == 1
    assert [line for line in lines if "error" in line] == [
        f"nucleiseg predict: error: {images / 'cells.png'}: cells_labels.tif already in {truth}, not written by "
        "nucleiseg: overwrite replaces them; or choose another output folder"]
    assert (truth / "cells_labels.tif").read_bytes() == b"my ground truth" and (truth / "other_labels.tif").is_file()
    status, lines = _run(capsys, images, "-o", truth, "--model", model, "--overwrite")
    assert status == 0 and read_labels(truth / "cells_labels.tif").max() > 0


def test_each_image_keeps_its_own_outputs_across_runs(tmp_path: Path, capsys, model: str) -> None:
    for plate, image_id in (("plate1", FLUO), ("plate2", TISSUE)):
        (tmp_path / plate).mkdir()
        _good(tmp_path / plate, "well.png", image_id)
    out = tmp_path / "out"
    assert _run(capsys, tmp_path / "plate1", tmp_path / "plate2", "-o", out, "--model", model)[0] == 0
    first = pd.read_csv(out / "summary.csv").set_index("name")["nuclei"].to_dict()
    assert set(first) == {"well", "well-2"}

    # plate2 alone: its outputs are well-2's, skipped with its own count; plate1's are not touched
    status, lines = _run(capsys, tmp_path / "plate2", "-o", out, "--model", model)
    assert status == 0
    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert (row["name"], row["status"], row["nuclei"]) == ("well-2", "skipped", first["well-2"])

    # a new acquisition under the same file name is segmented again, not skipped
    before = (out / "well_labels.tif").read_bytes()
    _good(tmp_path / "plate1", "well.png", TISSUE)
    status, lines = _run(capsys, tmp_path / "plate1", "-o", out, "--model", model)
    assert status == 0 and any("changed since its outputs were written: segmenting it again" in l for l in lines)
    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert (row["name"], row["status"], row["nuclei"]) == ("well", "ok", first["well-2"])
    assert (out / "well_labels.tif").read_bytes() != before

    # a folder moved elsewhere keeps its outputs' names: nothing redone
    (tmp_path / "plate2").rename(tmp_path / "moved")
    status, lines = _run(capsys, tmp_path / "moved", "-o", out, "--model", model)
    assert status == 0 and pd.read_csv(out / "summary.csv")[["name", "status"]].values.tolist() == [["well-2", "skipped"]]


def test_formats_asked_for_later_are_written(tmp_path: Path, capsys, model: str) -> None:
    _good(tmp_path, "cells.png")
    out = tmp_path / "out"
    assert _run(capsys, tmp_path / "cells.png", "-o", out, "--model", model)[0] == 0
    status, lines = _run(capsys, tmp_path / "cells.png", "-o", out, "--model", model, "--formats", "geojson")
    assert status == 0 and any("its outputs lack geojson: segmenting it again" in line for line in lines)
    assert (out / "cells.geojson").is_file() and pd.read_csv(out / "summary.csv")["status"].tolist() == ["ok"]
    # fewer formats than last time: the complete outputs are kept, the image skipped; -q: no note, no count
    assert main(["-q", "predict", str(tmp_path / "cells.png"), "-o", str(out), "--model", model]) == 0
    assert capsys.readouterr().err == ""
    assert pd.read_csv(out / "summary.csv")["status"].tolist() == ["skipped"] and (out / "cells.geojson").is_file()


def test_a_run_into_its_input_folder_can_be_run_again(tmp_path: Path, capsys, model: str) -> None:
    _good(tmp_path, "a.png")
    _good(tmp_path, "b.png", TISSUE)
    assert _run(capsys, tmp_path, "-o", tmp_path, "--model", model)[0] == 0
    # as if killed while b's outputs were moved in: its journal lists them, the labels not there yet
    state = tmp_path / ".nucleiseg"
    (state / "done" / "b.json").rename(state / "journal" / "b.json")
    (tmp_path / "b_labels.tif").unlink()
    status, lines = _run(capsys, tmp_path, "-o", tmp_path, "--model", model)
    assert status == 0, lines
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["name"].tolist() == ["a", "b"]  # a's own outputs are not taken for inputs
    assert summary["status"].tolist() == ["skipped", "ok"]


def test_outputs_keep_the_pixel_size_of_the_input(tmp_path: Path, capsys, model: str) -> None:
    import tifffile

    from nucleiseg.io import read_pixel_size

    tifffile.imwrite(tmp_path / "calibrated.tif", _fixture(FLUO, 64)[..., 0], imagej=True,
                     resolution=(1 / 0.325, 1 / 0.325), metadata={"unit": "um"})
    _good(tmp_path, "plain.png")
    out = tmp_path / "out"
    assert _run(capsys, tmp_path, "-o", out, "--model", model, "--save-probabilities")[0] == 0
    for name in ("calibrated_labels.tif", "calibrated_probabilities.tif"):
        size = read_pixel_size(out / name)
        assert size is not None and size.unit == "um" and size.x == pytest.approx(0.325, rel=1e-6), name
    assert read_pixel_size(out / "plain_labels.tif") is None


def test_records_of_an_earlier_version_keep_their_names(tmp_path: Path, capsys, model: str) -> None:
    """Records written before they named their image: each image is matched by its name, as then."""
    _good(tmp_path, "a.png")
    _good(tmp_path, "b.png", TISSUE)
    out = tmp_path / "out"
    assert _run(capsys, tmp_path, "-o", out, "--model", model)[0] == 0
    counts = pd.read_csv(out / "summary.csv").set_index("name")["nuclei"].to_dict()
    for record in (out / ".nucleiseg" / "done").glob("*.json"):
        data = json.loads(record.read_text())
        del data["source"]
        record.write_text(json.dumps(data))
    assert _run(capsys, tmp_path / "b.png", "-o", out, "--model", model)[0] == 0
    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert (row["name"], row["status"], row["nuclei"]) == ("b", "skipped", counts["b"])


def test_a_broken_link_in_an_input_folder_is_named(tmp_path: Path, capsys, model: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _good(folder, "cells.png")
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")
    status, lines = _run(capsys, folder, "-o", tmp_path / "out", "--model", model)
    assert status == 1 and lines == [f"nucleiseg predict: error: {folder / 'gone.png'}: a link to a file that does "
                                     "not exist"]
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["status"].tolist() == ["ok", "failed"]
