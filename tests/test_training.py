"""Training on the committed DSB fixture: loss goes down, files appear, resume is exact, DDP agrees."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nucleiseg.cli import main
from nucleiseg.data.dataset import CropDataset, EpochSampler
from nucleiseg.errors import NucleisegError
from nucleiseg.losses import DeepSupervisionLoss
from nucleiseg.models import UNetPlusPlus
from nucleiseg.training import TrainConfig, accumulate_gradients, load_split, train

TINY = dict(widths=(4, 8, 16), crop=64, batch_size=4, threads=1, workers=0, val_every=1)


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_short_training_lowers_the_loss_and_writes_its_files(fixture_cache, tmp_path):
    config = TrainConfig(epochs=8, samples_per_epoch=16, lr=2e-2, warmup_epochs=0.25, augment_strength=0.0, **TINY)
    best = train(fixture_cache, tmp_path / "run", config)
    rows = _rows(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert float(rows[-1]["train_loss"]) < 0.85 * float(rows[0]["train_loss"])
    for column in ("val_loss", "val_f1", "val_iou", "val_auc", "val_dsb", "val_ap50"):
        assert rows[-1][column] != ""
    run = tmp_path / "run"
    for name in ("best.safetensors", "last.safetensors", "last_state.pt", "curves.png", "train_config.json"):
        assert (run / name).is_file(), name
    assert best == run / "best.safetensors"
    # the training state loads without unpickling arbitrary objects
    state = torch.load(run / "last_state.pt", weights_only=True)
    assert state["epoch"] == 8


def test_sampler_is_seeded_by_epoch_and_splits_across_ranks():
    sampler = EpochSampler([1, 1, 2], samples_per_epoch=10, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(2)
    assert first != list(sampler)
    ranks = [EpochSampler([1, 1, 2], 10, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(first)
    # a resumed epoch skips the pairs trained before; the epoch's length stays
    sampler.set_epoch(1, start=4)
    assert list(sampler) == first[4:] and len(sampler) == 10


def test_crops_are_reproducible_from_their_seed(fixture_cache):
    split = load_split(fixture_cache, "train")
    data = CropDataset(split.images, split.labels, crop=64)
    x1, y1 = data[(0, 42)]
    x2, y2 = data[(0, 42)]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (3, 64, 64) and y1.shape == (3, 64, 64)


def test_threaded_batches_hold_the_same_crops(fixture_cache):
    split = load_split(fixture_cache, "train")
    items = [(i % len(split.images), 100 + i) for i in range(6)]
    serial = CropDataset(split.images, split.labels, crop=64).__getitems__(items)
    threaded = CropDataset(split.images, split.labels, crop=64, threads=3).__getitems__(items)
    assert len(serial) == len(threaded) == 6
    for (xa, ya), (xb, yb) in zip(serial, threaded):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(serial[0][0], serial[3][0])  # different seeds give different crops


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_micro_batches_accumulate_the_full_batch_gradient(micro_batch):
    torch.manual_seed(0)
    # Fixed BatchNorm statistics and a per-pixel loss: the chunks' weighted gradients must then add up
    # to the batch's exactly (the batch-wide Dice term is, by design, taken per micro-batch).
    model = UNetPlusPlus(3, 3, (4, 8, 16)).eval()
    loss_fn = DeepSupervisionLoss(dice_weight=0.0)
    x, y = torch.randn(5, 3, 32, 32), (torch.rand(5, 3, 32, 32) > 0.6).float()
    full_loss = accumulate_gradients(model, loss_fn, x, y, micro_batch=5, autocast_dtype=None)
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    chunked_loss = accumulate_gradients(model, loss_fn, x, y, micro_batch=micro_batch, autocast_dtype=None)
    with torch.no_grad():
        assert full_loss == pytest.approx(5 * float(loss_fn(model(x), y)), rel=1e-5)
    assert chunked_loss == pytest.approx(full_loss, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[name], rtol=1e-4, atol=1e-6, msg=name)


def _train_cli(cache: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nucleiseg.cli", "train", str(cache), "--out", str(run), "--widths", "4,8,16",
            "--crop", "64", "--batch-size", "2", "--samples-per-epoch", "24", "--threads", "1", "--workers", "0",
            "--seed", "5", *extra]


def test_killed_training_resumes_to_the_same_weights(fixture_cache, tmp_path):
    epochs = ["--epochs", "3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_train_cli(fixture_cache, tmp_path / "straight", *epochs), check=True, env=env,
                   capture_output=True, timeout=300)

    # Kill the second run hard in the middle of epoch 2, right after epoch 1's checkpoint.
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cli(fixture_cache, run, *epochs), env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "epoch 1:" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert torch.load(run / "last_state.pt", weights_only=True)["epoch"] == 1

    resumed = subprocess.run([sys.executable, "-m", "nucleiseg.cli", "train", "--resume", str(run)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = load_file(tmp_path / "straight" / "last.safetensors")
    again = load_file(run / "last.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=0, msg=key)
    assert [r["epoch"] for r in _rows(run)] == ["1", "2", "3"]


def test_two_process_ddp_keeps_replicas_identical(fixture_cache, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "nucleiseg.cli", "train", str(fixture_cache), "--out", str(run), "--widths", "4,8,16",
           "--crop", "64", "--batch-size", "4", "--micro-batch", "2", "--samples-per-epoch", "16", "--epochs", "2", "--threads", "1",
           "--workers", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all 2 replicas hold identical weights" in done.stderr
    assert (run / "last.safetensors").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing: no such folder" in err[0]
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--kind-weights", "tissue=lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'tissue=lots' is not KIND=NUMBER" in err[0]
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--kind-weights", "brightfield=nan"]) == 2
    assert "finite number >= 0" in capsys.readouterr().err
    with pytest.raises(NucleisegError, match="nothing to resume"):
        (tmp_path / "train_config.json").write_text("{}")
        train(tmp_path, tmp_path, resume=True)


def test_fine_tuning_starts_from_the_model_and_keeps_its_thresholds(fixture_cache, tmp_path):
    from nucleiseg.inference import load_model
    from nucleiseg.models import load_model_file, save_model

    torch.manual_seed(1)
    parent = UNetPlusPlus(3, 3, (4, 8, 16))
    thresholds = {"foreground_threshold": 0.4, "seed_threshold": 0.7, "min_seed_size": 3, "min_size": 9}
    by_kind = {"tissue": {"foreground_threshold": 0.5, "seed_threshold": 0.8, "min_seed_size": 40, "min_size": 60}}
    save_model(tmp_path / "parent.safetensors", parent, {"postprocess": thresholds, "postprocess_by_kind": by_kind})
    config = TrainConfig(epochs=1, samples_per_epoch=4, init=str(tmp_path / "parent.safetensors"),
                         widths=(16, 32), crop=64, batch_size=4, threads=1, workers=0)
    train(fixture_cache, tmp_path / "run", config, max_steps=1)
    child, meta = load_model_file(tmp_path / "run" / "last.safetensors")
    assert child.config.widths == (4, 8, 16)  # the parent's architecture, whatever widths said
    assert TrainConfig.from_json(tmp_path / "run" / "train_config.json").widths == (4, 8, 16)  # recorded as trained
    assert meta["postprocess"] == thresholds and meta["postprocess_by_kind"] == by_kind
    # the size of the nuclei it was trained on, for --diameter (the three training images: 14.5-17.7 px)
    from nucleiseg.measure import typical_diameter

    expected = typical_diameter(load_split(fixture_cache, "train").labels)
    assert 14 < expected < 18 and meta["nucleus_diameter"] == pytest.approx(expected, abs=0.01)
    assert load_model(tmp_path / "run" / "last.safetensors").nucleus_diameter == meta["nucleus_diameter"]
    moved = [name for name, value in child.state_dict().items() if not torch.equal(value, parent.state_dict()[name])]
    assert moved  # it trained ...
    assert all(  # ... one step away from the parent's weights, not from fresh ones
        torch.allclose(v, parent.state_dict()[k], atol=0.05) for k, v in child.state_dict().items()
        if v.is_floating_point() and "running" not in k)


def test_channel_weights_reach_the_loss(fixture_cache, tmp_path):
    """A channel weighted 0 gets no gradient: its rows of every head stay the parent's after training steps."""
    from nucleiseg.models import load_model_file, save_model

    torch.manual_seed(2)
    parent = UNetPlusPlus(3, 3, (4, 8, 16))
    save_model(tmp_path / "parent.safetensors", parent, {})
    assert main(["train", str(fixture_cache), "--out", str(tmp_path / "run"), "--init", str(tmp_path / "parent.safetensors"),
                 "--channel-weights", "contour=0,touch=0", "--epochs", "1", "--samples-per-epoch", "8",
                 "--crop", "64", "--batch-size", "4", "--threads", "1", "--workers", "0"]) == 0
    config = TrainConfig.from_json(tmp_path / "run" / "train_config.json")
    assert config.channel_weights == {"body": 1.0, "contour": 0.0, "touch": 0.0}  # kept for --resume
    child, _ = load_model_file(tmp_path / "run" / "last.safetensors")
    before, after = parent.state_dict(), child.state_dict()
    for name in (k for k in after if k.startswith("heads.")):
        assert torch.equal(after[name][1:], before[name][1:]), name  # contour and touch rows untouched
        assert not torch.equal(after[name][0], before[name][0]), name  # the body row trained


def test_channel_weights_errors_are_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--channel-weights", "edge=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown channel 'edge'; the channels are body, contour, touch" in err[0]
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--channel-weights", "body=0,contour=0,touch=0"]) == 2
    assert "at least one channel needs a weight above 0" in capsys.readouterr().err
    with pytest.raises(NucleisegError, match="channel_weights must name each of the channels body, contour, touch"):
        TrainConfig(channel_weights={"body": 1.0})


# ----------------------------------------------------------------------------- resume, and runs that cannot start
TINY_CLI = ["--widths", "4,8,16", "--crop", "64", "--batch-size", "2", "--threads", "1", "--workers", "0"]


def test_resume_after_max_steps_continues_mid_epoch_to_the_same_weights(fixture_cache, tmp_path, capsys):
    """Epochs of 5 steps: 2 steps, resumed to 7, then to the end, trains all 15 steps, as one run does."""
    run, straight = tmp_path / "m", tmp_path / "straight"
    args = ["--epochs", "3", "--samples-per-epoch", "10", "--val-every", "3", *TINY_CLI]
    assert main(["-q", "train", str(fixture_cache), "--out", str(straight), *args]) == 0
    assert main(["-q", "train", str(fixture_cache), "--out", str(run), *args, "--max-steps", "2"]) == 0
    rows = _rows(run)
    assert [(r["epoch"], r["steps"]) for r in rows] == [("1", "2")]  # an epoch cut short says so
    assert main(["-q", "train", "--resume", str(run), "--max-steps", "7"]) == 0
    assert [(r["epoch"], r["steps"]) for r in _rows(run)] == [("1", "5"), ("2", "2")]
    assert main(["-q", "train", "--resume", str(run)]) == 0
    capsys.readouterr()
    assert [(r["epoch"], r["steps"]) for r in _rows(run)] == [("1", "5"), ("2", "5"), ("3", "5")]
    # the schedule ran to its end: the same learning rates and the same weights as the run never stopped
    assert [r["lr"] for r in _rows(run)] == [r["lr"] for r in _rows(straight)]
    assert float(_rows(run)[-1]["train_loss"]) == pytest.approx(float(_rows(straight)[-1]["train_loss"]))
    resumed, whole = load_file(run / "last.safetensors"), load_file(straight / "last.safetensors")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0, msg=key)
    # asking to stop at a step already passed trains nothing and says why
    assert main(["train", "--resume", str(run), "--epochs", "4", "--max-steps", "15"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("nucleiseg train: error: --max-steps counts the run's steps from its start, and 15 are done "
                    "already; give more than 15 to continue")]
    assert TrainConfig.from_json(run / "train_config.json").epochs == 3  # the refused resume changed nothing


def test_resume_takes_epochs_even_at_their_default_value(fixture_cache, tmp_path, capsys):
    run = tmp_path / "a"
    assert main(["-q", "train", str(fixture_cache), "--out", str(run), "--epochs", "1", "--samples-per-epoch", "4",
                 "--val-every", "5", *TINY_CLI]) == 0
    default = TrainConfig().epochs
    assert main(["-q", "train", "--resume", str(run), "--epochs", str(default), "--max-steps", "3"]) == 0
    assert TrainConfig.from_json(run / "train_config.json").epochs == default
    assert [(r["epoch"], r["steps"]) for r in _rows(run)] == [("1", "2"), ("2", "1")]


def test_resume_refuses_other_options_in_one_line(tmp_path, capsys):
    run = tmp_path / "d"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"epochs": 2}))
    before = (run / "train_config.json").read_bytes()
    argv = ["train", "--resume", str(run), "--out", str(tmp_path / "elsewhere"), "--lr", "1", "--crop", "32",
            "--batch-size", "0", "--augment", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"nucleiseg train: error: --out, --batch-size, --crop, --lr, --augment cannot be combined with "
                    f"--resume: the run keeps its own settings (in {run / 'train_config.json'}); --resume takes only "
                    "--epochs, --max-steps and DATA")]
    assert (run / "train_config.json").read_bytes() == before and not (tmp_path / "elsewhere").exists()


def test_kind_weights_that_leave_no_training_image_are_one_line(synthetic_cache, tmp_path, capsys):
    cache, _ = synthetic_cache(tmp_path)  # fluorescence images only
    assert main(["train", str(cache), "--out", str(tmp_path / "run"), "--kind-weights", "fluorescence=0,tissue=0",
                 "--max-steps", "1", *TINY_CLI]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("nucleiseg train: error: --kind-weights gives weight 0 to every image of the training split "
                    "(its kinds: fluorescence)")]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["labels missing", "labels damaged", "image missing", "image damaged"])
def test_a_missing_or_damaged_cache_file_is_one_line(synthetic_cache, tmp_path, capsys, damage):
    cache, _ = synthetic_cache(tmp_path)
    what, how = damage.split()
    path = cache / "labels" / "img1.tif" if what == "labels" else cache / "images" / "img1.png"
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:40])
    assert main(["train", str(cache), "--out", str(tmp_path / "run"), "--max-steps", "1", *TINY_CLI]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nucleiseg train: error: {path}: "), err
    assert err[0].endswith(f"the cache is damaged: run 'nucleiseg prepare DATA_DIR --out {cache} --force' to "
                           "rebuild it"), err
    assert not (tmp_path / "run").exists()


def test_train_in_a_raw_data_folder_prepares_the_cache_beside_it(synthetic_cache, tmp_path, monkeypatch):
    synthetic_cache(tmp_path)  # tmp_path/src: a paired data folder
    monkeypatch.chdir(tmp_path / "src")
    assert main(["-q", "train", ".", "--out", str(tmp_path / "run"), "--max-steps", "1", *TINY_CLI]) == 0
    assert (tmp_path / "src-cache" / "manifest.json").is_file()
    assert not (tmp_path / "src" / "-cache").exists()
    assert TrainConfig.from_json(tmp_path / "run" / "train_config.json").cache == str(tmp_path / "src-cache")
    # evaluate, run in the same folder, scores the validation split of that same cache
    assert main(["-q", "evaluate", ".", "--labels", str(tmp_path / "src" / "labels"), "--out",
                 str(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["evaluated"]["cache"] == str(tmp_path / "src-cache") and summary["evaluated"]["split"] == "val"
    assert not (tmp_path / "src" / "-cache").exists()


def test_a_run_that_cannot_start_leaves_no_run_folder_and_the_same_command_works_later(synthetic_cache, tmp_path,
                                                                                       capsys):
    from nucleiseg.models import save_model

    cache, _ = synthetic_cache(tmp_path)
    parent, run = tmp_path / "parent.safetensors", tmp_path / "run"
    argv = ["-q", "train", str(cache), "--out", str(run), "--init", str(parent), "--crop", "32", "--batch-size", "2",
            "--threads", "1", "--workers", "0", "--max-steps", "1"]
    assert main(argv) == 2  # no such model file yet
    assert f"{parent}: no such model file" in capsys.readouterr().err
    assert not run.exists()
    # a cache whose prepare was interrupted
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    save_model(parent, UNetPlusPlus(3, 3, (4, 8, 16)), {})
    assert main(argv) == 2
    assert "the prepare that wrote this cache was interrupted" in capsys.readouterr().err
    assert not run.exists()
    (cache / "manifest.json").write_text(json.dumps(manifest))
    # the plateau schedule on a cache without validation images: it could never lower the learning rate
    split = (cache / "split.csv").read_text()
    (cache / "split.csv").write_text(split.replace(",val", ",train"))
    assert main([*argv, "--schedule", "plateau"]) == 2
    assert "the cache has no validation images, and the plateau schedule" in capsys.readouterr().err
    assert not run.exists()
    (cache / "split.csv").write_text(split)
    assert main(argv) == 0
    assert (run / "last_state.pt").is_file()
