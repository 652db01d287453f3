"""Training throughput (images/s) for 256×256 crops on this machine.

    .venv/bin/python benchmarks/train_speed.py [--widths 16,32,64,128,256] [--batch-size 8] [--steps 6] [--rounds 3]

Times full optimisation steps (forward of every deep-supervision head, BCE + Dice
loss, backward, AMSGrad update, through ``training.accumulate_gradients`` as
``nucleiseg train`` runs them) on random data: fp32 and bf16 autocast, contiguous
and channels-last, and for bf16 channels-last the batch split into micro-batches
of 8, 4 and 2 crops. Each configuration is timed in every round (rounds
interleave, so slow drift of a shared machine hits all alike) and the median of
all its steps is reported. Data loading is left out: with the OpenCV targets a
crop costs ~3.5 ms against ~200 ms of network per crop.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from nucleiseg.losses import DeepSupervisionLoss
from nucleiseg.models import UNetPlusPlus
from nucleiseg.device import bf16_supported
from nucleiseg.training import accumulate_gradients


def step_times(widths, batch: int, crop: int, steps: int, bf16: bool, channels_last: bool, micro_batch: int,
               device: str | torch.device = "cpu", warmup: int = 2) -> list[float]:
    """Seconds per optimisation step, after ``warmup`` warm-up steps (on a GPU, each timed to its end)."""
    torch.manual_seed(0)
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNetPlusPlus(3, 3, widths).to(device).to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    loss_fn = DeepSupervisionLoss()
    x = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 3, crop, crop, device=device) > 0.7).float()
    timings = []
    for step in range(steps + warmup):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(model, loss_fn, x, y, micro_batch, torch.bfloat16 if bf16 else None)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            timings.append(time.perf_counter() - started)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="16,32,64,128,256")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    b = args.batch_size
    configs = [  # (precision, layout, micro-batch)
        ("fp32", "contiguous", b), ("fp32", "channels-last", b), ("bf16", "contiguous", b),
        ("bf16", "channels-last", b), ("bf16", "channels-last", min(4, b)), ("bf16", "channels-last", min(2, b)),
    ]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 native: {bf16_supported(torch.device('cpu'))}")
    print(f"UNet++ widths {widths}, batch {b}, {args.crop}x{args.crop} crops, median of {args.rounds} rounds x {args.steps} steps")
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            precision, layout, micro = config
            times[config] += step_times(widths, b, args.crop, args.steps, precision == "bf16", layout == "channels-last", micro)
    print("| precision | layout | micro-batch | images/s |")
    print("|---|---|---|---|")
    for (precision, layout, micro), t in times.items():
        print(f"| {precision} | {layout} | {micro} | {b / float(np.median(t)):.2f} |")


if __name__ == "__main__":
    main()
