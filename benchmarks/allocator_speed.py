"""The C allocator's share of a CPU forward pass: glibc's own behaviour against ``reuse_freed_memory``.

Run from the repository root (about 5 minutes on 2 cores; glibc only):

    .venv/bin/python benchmarks/allocator_speed.py [--rounds 3] [--sides 256 1024 1760] [--train-steps 3]

In one process, the two settings toggled at run time with ``mallopt`` and interleaved in each round (the
machine's speed drifts, so only figures seconds apart are compared):

- *system*: glibc's defaults (blocks over its mmap threshold mapped on their own, freed memory trimmed);
- *reuse*: what :func:`nucleiseg.device.reuse_freed_memory` sets (no mmap, ``MALLOC_KEEP_BYTES`` kept).

Printed per round: the shipped network's seconds per megapixel (accurate mode, bf16 where the CPU has it,
best of 2 passes) on a batch of 8 256² images and on one image of each ``--sides``; training images/s of
v6's widths (batch 8 in micro-batches of 4, ``train_speed.step_times``); then, in a fresh process per
setting, the peak resident memory of four forward passes over one 976² tile.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import ROOT, autocast, machine
from train_speed import step_times

sys.path.insert(0, str(ROOT / "src"))
from nucleiseg.device import MALLOC_KEEP_BYTES, resolve_precision
from nucleiseg.inference import load_model
from nucleiseg.models import resolve_prune_level

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
LIBC = ctypes.CDLL(None)


def set_allocator(reuse: bool) -> None:
    """Toggle between glibc's defaults and what ``reuse_freed_memory`` sets."""
    if reuse:
        LIBC.mallopt(M_MMAP_MAX, 0)
        LIBC.mallopt(M_TRIM_THRESHOLD, MALLOC_KEEP_BYTES)
    else:
        LIBC.mallopt(M_MMAP_MAX, 65536)
        LIBC.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        LIBC.malloc_trim(0)


def seconds_per_mpixel(model, level: int, bf16: bool, shape: tuple[int, int, int, int]) -> float:
    x = torch.rand(*shape).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode(), autocast(bf16, "cpu"):
        model.network.predict_proba(x[..., :64, :64], prune_level=level)  # warm-up
        for _ in range(2):
            t0 = time.perf_counter()
            model.network.predict_proba(x, prune_level=level)
            best = min(best, time.perf_counter() - t0)
    return best / (shape[0] * shape[2] * shape[3] / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 1024, 1760])
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps per setting (0: none)")
    args = parser.parse_args()

    print(f"# allocator speed: {machine()}", flush=True)
    model = load_model()
    level = resolve_prune_level(model.depth, model.metadata, "accurate")
    bf16 = resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    shapes = [(8, 3, 256, 256)] + [(1, 3, side, side) for side in args.sides]
    for round_ in range(args.rounds):
        for reuse in (False, True):
            set_allocator(reuse)
            cells = [f"{n}x{side}²: {seconds_per_mpixel(model, level, bf16, (n, c, side, side)):.2f}"
                     for n, c, side, _ in shapes]
            if args.train_steps:
                times = step_times((32, 64, 128, 256, 512), 8, 256, args.train_steps, bf16, True, 4)
                cells.append(f"training {8 / min(times):.2f} images/s")
            print(f"round {round_ + 1}, {'reuse ' if reuse else 'system'}: s/Mpixel " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
