"""Train the chosen recipe inside a wall-clock budget on a lent GPU; validate, tune, estimate honestly.

    python scripts/gpu_train.py PACKED.zip --out "$OUT" --train-seconds 420 [--init default] [-- TRAIN FLAGS]

A lent machine gives minutes, so nothing is set up there by hand. In one run this script

1. unpacks the packed cache (``scripts/pack_cache.py pack cache/dsb2018 packed/dsb2018.zip``: 35 MB, under the
   64 MiB a device call carries) into a temporary folder, or takes a cache folder as it is;
2. times a few optimisation steps of the recipe on the device (``benchmarks/train_speed.step_times``) and sets
   ``--epochs`` so that training ends inside ``--train-seconds`` (steps per epoch x seconds per step x 1.3 for
   data loading and validation, the margin the seventh session's v6 run needed);
3. trains with ``nucleiseg train`` (the recipe below; flags after ``--`` are appended and win);
4. tunes the best checkpoint with ``nucleiseg tune`` (thresholds, per-kind thresholds, fast prune level; float16
   weights), which also prints and stores the honest estimate (nested CV by mosaic group and kind);
5. scores it with ``nucleiseg evaluate`` (accurate and fast mode; validation figures beside the honest one);

and writes into ``--out``: ``model.safetensors``, ``metrics.csv`` and ``curves.png`` of the run,
``train_config.json``, ``eval-accurate/`` and ``eval-fast/`` (per_image.csv, summary.json, report.png),
``honest.json`` (the tuned model's honest estimate) and ``gpu_train.json`` (timings of each step, the sizing, the
commands). The run folder itself stays in the temporary folder (its ``last_state.pt`` is large).

``--max-steps N`` stops training after N steps whatever the budget: with the tiny flags of the test
(``tests/test_gpu_train.py``) the whole pipeline runs on a CPU in well under a minute, so a GPU call is never
the first time the script runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The chosen recipe: v6's (docs/model-card.md), the best measured so far. Flags after ``--`` override it.
RECIPE = ["--widths", "32,64,128,256,512", "--batch-size", "16", "--lr", "2e-3", "--warmup-epochs", "2",
          "--kind-weights", "tissue=4,brightfield=6", "--seed", "6"]
#: Validations per run: the best checkpoint is chosen among these (and the last epoch).
VALIDATIONS = 6
#: Seconds per step are multiplied by this for data loading, validation and start-up (v6: 355 s of training
#: steps in a 460 s run with 6 validations).
OVERHEAD = 1.3


def _say(log: Path, text: str) -> None:
    print(text, flush=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(text + "\n")


def _run(args: list[str], log: Path, timings: dict, name: str) -> None:
    """Run a ``nucleiseg`` command line in this process (no second start-up of PyTorch); fail loudly."""
    from nucleiseg.cli import main as nucleiseg

    _say(log, "$ nucleiseg " + " ".join(args))
    started = time.perf_counter()
    rc = nucleiseg(args)
    timings[name] = round(time.perf_counter() - started, 1)
    _say(log, f"  ({timings[name]:.0f} s)")
    if rc:
        raise SystemExit(f"{name} failed (exit {rc}); see the messages above")


def seconds_per_step(widths: tuple[int, ...], batch: int, crop: int, micro_batch: int | None, steps: int = 5) -> float:
    """Mean seconds of one optimisation step of the recipe on this machine's device."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_speed import step_times

    on_gpu = torch.cuda.is_available()
    times = step_times(widths, batch, crop, steps, bf16=on_gpu, channels_last=True,
                       micro_batch=micro_batch or batch, device="cuda" if on_gpu else "cpu", warmup=2)
    return sum(times) / len(times)


def size_epochs(train_seconds: float, step_s: float, steps_per_epoch: int) -> int:
    """Epochs that fit ``train_seconds`` at ``step_s`` a step (at least 1).

    >>> size_epochs(420, 0.048, 34)
    197
    """
    return max(1, int(train_seconds / (steps_per_epoch * step_s * OVERHEAD)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="packed cache (.zip from scripts/pack_cache.py) or a cache folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, metrics and reports")
    parser.add_argument("--train-seconds", type=float, default=420.0,
                        help="wall-clock budget of the training itself (tune and evaluate come after: about "
                             "3-5 min of CPU on a 16-core machine)")
    parser.add_argument("--init", default=None, help="start from this model file (fine-tuning), e.g. default")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps (dry run)")
    parser.add_argument("--work", type=Path, default=None, help="where to unpack and train (default: a temp folder)")
    args = parser.parse_args(argv)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    work = Path(tempfile.mkdtemp(prefix="gpu-train-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    record: dict = {"timings_s": timings}
    started = time.perf_counter()

    # 1. the cache
    if args.data.is_dir():
        cache = args.data
    else:
        cache = work / "cache"
        sys.path.insert(0, str(ROOT / "scripts"))
        from pack_cache import unpack

        t0 = time.perf_counter()
        unpack(args.data, cache)
        timings["unpack"] = round(time.perf_counter() - t0, 1)

    # 2. size the run to the budget, with the train command's own parser (so its defaults are the same)
    from nucleiseg.cli import build_parser
    from nucleiseg.data.cache import Cache

    train_args = [*RECIPE, *extra]
    parsed = build_parser().parse_args(["train", str(cache), "--out", "x", *train_args])
    widths = tuple(int(w) for w in parsed.widths.split(","))
    n_train = len(Cache.open(cache).table("train"))
    steps_per_epoch = math.ceil((parsed.samples_per_epoch or n_train) / parsed.batch_size)
    t0 = time.perf_counter()
    step_s = seconds_per_step(widths, parsed.batch_size, parsed.crop, parsed.micro_batch)
    timings["step_timing"] = round(time.perf_counter() - t0, 1)
    epochs = size_epochs(args.train_seconds, step_s, steps_per_epoch)
    val_every = max(1, epochs // VALIDATIONS)
    record.update(seconds_per_step=step_s, steps_per_epoch=steps_per_epoch, epochs=epochs, val_every=val_every,
                  recipe=train_args, train_seconds=args.train_seconds, max_steps=args.max_steps)
    _say(log, f"{step_s:.3f} s a step x {steps_per_epoch} steps an epoch: {epochs} epochs in {args.train_seconds:.0f} s")

    # 3. train
    run = work / "run"
    cmd = ["train", str(cache), "--out", str(run), "--epochs", str(epochs),
           "--val-every", str(val_every), *train_args]
    cmd += ["--init", args.init] if args.init else []
    cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    _run(cmd, log, timings, "train")

    # 4. tune (prints and stores the honest estimate), 5. evaluate
    model = out / "model.safetensors"
    _run(["tune", str(cache), "--model", str(run / "best.safetensors"), "--out",
          str(model), "--float16"], log, timings, "tune")
    for mode in ("accurate", "fast"):
        _run(["-q", "evaluate", str(cache), "--model", str(model), "--mode", mode,
              "--no-honest", "--out", str(out / f"eval-{mode}")], log, timings, f"evaluate_{mode}")

    from nucleiseg.models import load_model_file

    _, metadata = load_model_file(model)
    (out / "honest.json").write_text(json.dumps(metadata["tuning"].get("honest_estimate", {}), indent=1) + "\n")
    for name in ("metrics.csv", "curves.png", "train_config.json"):
        if (run / name).exists():
            shutil.copy2(run / name, out / name)
    timings["total"] = round(time.perf_counter() - started, 1)
    (out / "gpu_train.json").write_text(json.dumps(record, indent=1) + "\n")
    _say(log, f"done in {timings['total']:.0f} s: {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
