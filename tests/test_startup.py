"""What the command line imports: nothing heavy to build its parser; predict not the training machinery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nucleiseg.io import write_png
from nucleiseg.models import UNetPlusPlus, save_model

SRC = str(Path(__file__).resolve().parent.parent / "src")
#: NumPy (about 0.1 s) is allowed: the options' and the batch module's constants come with it.
HEAVY = ("torch", "pandas", "scipy", "skimage", "albumentations", "nucleiseg.training")


def _imported_after(code: str) -> list[str]:
    """The HEAVY modules imported by running ``code`` in a fresh interpreter."""
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_parser_help_and_version_import_nothing_heavy() -> None:
    assert _imported_after("import nucleiseg.cli as cli\ncli.build_parser()") == []
    assert _imported_after("import nucleiseg.cli as cli\ntry:\n    cli.main(['--version'])\n"
                           "except SystemExit:\n    pass") == []


def test_train_help_shows_the_training_defaults(capsys) -> None:
    from nucleiseg.cli import build_parser
    from nucleiseg.training import TrainConfig

    try:
        build_parser().parse_args(["train", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    d = TrainConfig()
    assert f"(default: {d.epochs})" in text and "(default: 16,32,64,128,256)" in text
    assert "(default: " + ",".join(f"{k}={v:g}" for k, v in d.kind_weights.items()) + ")" in text
    args = build_parser().parse_args(["train", "data", "--out", "run", "--lr", "0.01"])
    assert str(args.epochs) == str(d.epochs) and args.lr == 0.01


def test_predict_does_not_import_the_training_machinery(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_model(tmp_path / "tiny.safetensors", UNetPlusPlus(widths=(4, 8, 16)))
    write_png(tmp_path / "cells.png", (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))
    code = ("from nucleiseg.cli import main\n"
            f"assert main(['-q', 'predict', {str(tmp_path / 'cells.png')!r}, '-o', {str(tmp_path / 'out')!r}, "
            f"'--model', {str(tmp_path / 'tiny.safetensors')!r}]) == 0")
    imported = _imported_after(code)
    assert "torch" in imported and "nucleiseg.training" not in imported and "albumentations" not in imported


@pytest.mark.parametrize("command", ["prepare", "train", "predict", "evaluate", "tune", "export"])
def test_help_states_each_default_once(capsys, command: str) -> None:
    import re

    from nucleiseg.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert not re.search(r"\(default:[^()]*(\([^()]*\))?[^()]*\) \(default:", text), text
