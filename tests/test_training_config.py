"""Training settings and checkpoints: a bad value or a damaged file costs one line, never a traceback."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nucleiseg.cli import main
from nucleiseg.errors import NucleisegError
from nucleiseg.training import TrainConfig, TrainConfigError, train

TINY = ["--widths", "4,8,16", "--crop", "64", "--batch-size", "2", "--samples-per-epoch", "6", "--threads", "1",
        "--workers", "0", "--val-every", "5"]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("lr", -1.0, "must be a number > 0"),
        ("lr", math.nan, "must be a number > 0"),
        ("lr", "0.1", "must be a number > 0"),
        ("crop", 17, "must be a multiple of 16"),
        ("crop", 8, "must be an integer >= 16"),
        ("crop", 16, "must be at least 32 for a network of depth 4"),
        ("widths", (16,), "must be 2 to 9 channel counts"),
        ("widths", (16, 0), "must be 2 to 9 channel counts"),
        ("widths", (8,) * 12, "must be 2 to 9 channel counts"),
        ("widths", "16,32", "must be a list of integers"),
        ("epochs", 0, "must be an integer >= 1"),
        ("epochs", 2.5, "must be an integer >= 1"),
        ("batch_size", True, "must be an integer >= 1"),
        ("micro_batch", 0, "must be an integer >= 1"),
        ("samples_per_epoch", -4, "must be an integer >= 1"),
        ("workers", -1, "must be an integer >= 0"),
        ("threads", 0, "must be an integer >= 1"),
        ("val_every", 0, "must be an integer >= 1"),
        ("seed", -1, "must be an integer >= 0"),
        ("seed", 2**64, "must be below 2**63"),
        ("weight_decay", -0.1, "must be a number >= 0"),
        ("warmup_epochs", math.inf, "must be a number >= 0"),
        ("augment_strength", 1.5, "must be a number in [0, 1]"),
        ("stain_augment", 5.0, "must be a number in [0, 1]"),
        ("stain_augment", -1.0, "must be a number in [0, 1]"),
        ("schedule", "linear", "must be 'cosine' or 'plateau'"),
        ("precision", "fp16", "must be 'auto', 'fp32' or 'bf16'"),
        ("kind_weights", {"phase": 1.0}, "must name the kinds"),
        ("kind_weights", {"tissue": -1.0}, "finite numbers >= 0"),
        ("kind_weights", {"tissue": 0.0, "fluorescence": 0.0, "brightfield": 0.0}, "not all 0"),
        ("channel_weights", {"body": 1.0}, "must name each of the channels body, contour, touch"),
        ("channel_weights", {"body": math.inf, "contour": 1.0, "touch": 1.0}, "finite numbers >= 0"),
        ("init", 3, "must be a path or None"),
    ],
)
def test_every_setting_is_checked_in_the_librarys_words(field, value, expected):
    with pytest.raises(TrainConfigError) as info:
        TrainConfig(**{field: value})
    assert info.value.field == field and expected in str(info.value)
    assert "--" not in str(info.value)  # the library names its fields, not command-line options


def test_the_defaults_and_a_crop_for_a_shallow_network_are_fine():
    TrainConfig()
    assert TrainConfig(widths=(4, 8, 16), crop=20).crop == 20  # depth 2: multiples of 4
    assert TrainConfig(crop=32).crop == 32  # depth 4: the deepest level 2x2 pixels
    # with a model to start from, its depth decides (train checks the crop once it has read the model)
    assert TrainConfig(crop=36, init="parent.safetensors").crop == 36


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--lr", "-1"], "--lr (learning rate) must be a number > 0, got -1.0"),
        (["--crop", "17"], "--crop must be a multiple of 16 (2**depth for a network of depth 4), got 17; e.g. 32 or 48"),
        (["--crop", "16", "--batch-size", "1"],
         ("--crop must be at least 32 for a network of depth 4 (its deepest level, 1/16 of the crop, needs 2x2 pixels), "
          "got 16")),
        (["--stain-augment", "5"], "--stain-augment must be a number in [0, 1], got 5.0"),
        (["--stain-augment", "-1"], "--stain-augment must be a number in [0, 1], got -1.0"),
        (["--max-steps", "0"], "--max-steps must be an integer >= 1, got 0"),
        (["--max-steps", "-3"], "--max-steps must be an integer >= 1, got -3"),
        (["--widths", "16"], "--widths must be 2 to 9 channel counts"),
        (["--augment", "3"], "--augment must be a number in [0, 1]"),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be a number >= 0"),
        (["--threads", "0"], "--threads must be an integer >= 1"),
        (["--micro-batch", "0"], "--micro-batch must be an integer >= 1"),
    ],
)
def test_cli_maps_settings_to_its_options_in_one_line(tmp_path, capsys, argv, expected):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nucleiseg train: error: {expected}"), err
    assert not (tmp_path / "run").exists() and not (tmp_path.parent / f"{tmp_path.name}-cache").exists()


def test_fine_tuning_checks_the_crop_against_the_parents_depth(fixture_cache, tmp_path, capsys):
    from nucleiseg.models import UNetPlusPlus, save_model

    save_model(tmp_path / "parent.safetensors", UNetPlusPlus(widths=(4, 8, 16, 32)), {})
    # a crop of 36 is no multiple of the default widths' 16, but the parent's depth 3 replaces them: it decides
    assert main(["train", str(fixture_cache), "--out", str(tmp_path / "run"), "--init", str(tmp_path / "parent.safetensors"),
                 "--crop", "36", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "nucleiseg train: error: --crop must be a multiple of 8 (2**depth for a network of depth 3), got 36; e.g. 32 or 40"
    assert not (tmp_path / "run").exists()  # refused before the run folder was written


def test_widths_other_than_the_init_models_are_refused_in_one_line(fixture_cache, tmp_path, capsys):
    """The network takes the init model's widths: other widths asked for would be recorded but not trained."""
    from nucleiseg.models import UNetPlusPlus, save_model

    assert main(["train", str(fixture_cache), "--out", str(tmp_path / "run"), "--init", "default",
                 "--widths", "8,16", "--crop", "64", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("nucleiseg train: error: --widths 8,16 cannot be combined with --init default, whose widths are "
                    "32,64,128,256,512: a fine-tuned network keeps the widths of the model it starts from; leave "
                    "--widths out")]
    assert not (tmp_path / "run").exists()
    # the model's own widths, as a recipe may spell them out, are fine
    save_model(tmp_path / "parent.safetensors", UNetPlusPlus(widths=(4, 8, 16)), {})
    assert main(["-q", "train", str(fixture_cache), "--out", str(tmp_path / "run"), "--init",
                 str(tmp_path / "parent.safetensors"), *TINY, "--epochs", "1", "--max-steps", "1"]) == 0
    assert TrainConfig.from_json(tmp_path / "run" / "train_config.json").widths == (4, 8, 16)


def test_smallest_crop_trains_a_single_crop_batch(fixture_cache, tmp_path):
    """The minimum crop (twice 2**depth) works with batches of one crop, where BatchNorm sees the least."""
    config = TrainConfig(epochs=1, samples_per_epoch=2, widths=(4, 4, 4, 4, 4), crop=32, batch_size=1, threads=1,
                         workers=0, val_every=5)
    train(fixture_cache, tmp_path / "run", config, max_steps=1, progress=False)
    assert (tmp_path / "run" / "last_state.pt").is_file()


def _short_run(fixture_cache, run, capsys, *extra, quiet=False):
    assert main([*(["-q"] if quiet else []), "train", str(fixture_cache), "--out", str(run), "--epochs", "1", *TINY,
                 *extra]) == 0
    return capsys.readouterr().err


def test_resume_from_a_truncated_or_damaged_state_is_one_line(fixture_cache, tmp_path, capsys):
    run = tmp_path / "run"
    _short_run(fixture_cache, run, capsys, quiet=True)
    state = (run / "last_state.pt").read_bytes()
    damaged = {
        "empty": b"",
        "half": state[: len(state) // 2],
        "last byte gone": state[:-1],
        "not a checkpoint": b"PK\x03\x04" + bytes(200),
        "a pickle": b"\x80\x04\x95" + bytes(40),
    }
    for what, data in damaged.items():
        (run / "last_state.pt").write_bytes(data)
        assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, (what, err)
        assert err[0].startswith(f"nucleiseg train: error: {run / 'last_state.pt'}: training state "), (what, err)
        assert "weights_only" not in err[0]
        assert "last.safetensors holds the weights saved last" in err[0]
    # a state from another network
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "best_score": 0.0,
                "torch_rng": torch.get_rng_state()}, run / "last_state.pt")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "training state does not fit this run" in capsys.readouterr().err
    (run / "train_config.json").write_text("{broken")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "cannot be read as training settings" in capsys.readouterr().err
    (run / "train_config.json").write_text(json.dumps({"epochs": 3, "dropout": 0.1}))
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "unknown: ['dropout']" in capsys.readouterr().err
    (run / "train_config.json").write_text(json.dumps({"epochs": 3, "crop": 17}))
    with pytest.raises(NucleisegError, match="saved setting crop must be a multiple of 16"):
        train(fixture_cache, run, resume=True)


def test_quiet_training_draws_no_progress_bar_and_a_log_gets_few_updates(fixture_cache, tmp_path, capsys):
    # stderr is not a terminal here, as when a run's output goes to a log file
    quiet = _short_run(fixture_cache, tmp_path / "quiet", capsys, "--samples-per-epoch", "12", quiet=True)
    assert "epoch 1/1" not in quiet and "it/s" not in quiet
    logged = _short_run(fixture_cache, tmp_path / "logged", capsys, "--samples-per-epoch", "12")
    # 6 steps: the bar is drawn when it opens and cleared when it closes, not redrawn at every step
    assert 1 <= logged.count("epoch 1/1") <= 2, logged
