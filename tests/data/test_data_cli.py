"""`nucleiseg prepare` on the command line: options, success, one-line errors."""

from __future__ import annotations

import pytest

from nucleiseg.cli import main
from nucleiseg.data import read_cache

from .conftest import DSB, KINDS


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--out", "--layout", "--rle-csv", "--groups", "--val-fraction", "--seed", "--workers", "--force"):
        assert option in text
    for default in ("(default: auto)", "(default: 0.1)", "(default: 0)"):
        assert default in text


def test_prepare_runs(tmp_path, capsys):
    out = tmp_path / "cache"
    args = ["-q", "prepare", str(DSB), "--out", str(out), "--workers", "1", "--val-fraction", "0.2", "--seed", "4"]
    code = main(args)
    assert code == 0
    assert sorted(read_cache(out)["image_id"]) == sorted(KINDS)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("nucleiseg prepare: error: ")
    return err[0]


def test_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    assert main(["prepare", str(missing), "--out", str(tmp_path / "c")]) != 0
    line = _error_line(capsys)
    assert str(missing) in line and "not found" in line


def test_unknown_layout(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) != 0
    line = _error_line(capsys)
    assert str(tmp_path / "empty") in line
    for layout in ("kaggle", "paired", "kaggle-rle"):
        assert layout in line


def test_forced_layout_that_does_not_fit(tmp_path, capsys):
    assert main(["prepare", str(DSB), "--out", str(tmp_path / "c"), "--layout", "paired"]) != 0
    line = _error_line(capsys)
    assert str(DSB) in line and "paired" in line


def test_option_errors(tmp_path, capsys):
    assert main(["prepare", str(DSB), "--out", str(tmp_path / "c"), "--rle-csv", "x.csv", "--layout", "kaggle"]) != 0
    assert "--rle-csv goes with the layout kaggle-rle" in _error_line(capsys)
    assert main(["prepare", str(DSB), "--out", str(tmp_path / "c"), "--layout", "kaggle-rle"]) != 0
    line = _error_line(capsys)
    assert "--rle-csv is missing: the layout kaggle-rle reads the nuclei from a run-length CSV" in line
    assert "rle_csv" not in line  # the option as typed, not the library's parameter
    missing_csv = tmp_path / "labels.csv"
    assert main(["prepare", str(DSB), "--out", str(tmp_path / "c"), "--rle-csv", str(missing_csv)]) != 0
    assert str(missing_csv) in _error_line(capsys)
    missing_groups = tmp_path / "groups.csv"
    assert main(["prepare", str(DSB), "--out", str(tmp_path / "c"), "--groups", str(missing_groups)]) != 0
    assert str(missing_groups) in _error_line(capsys)
    assert main(["prepare", str(DSB), "--out", str(tmp_path / "c"), "--workers", "0"]) != 0
    assert "--workers" in _error_line(capsys)
