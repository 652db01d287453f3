"""Seconds per training step on a GPU, for sizing a training run to the GPU time one has.

    python benchmarks/gpu_train_step.py 16,32,64,128,256:8 32,64,128,256,512:16

Each argument is ``WIDTHS:BATCH``. A full optimisation step (forward of every
deep-supervision head, BCE + Dice loss, backward, AMSGrad update, through
``training.accumulate_gradients`` as ``nucleiseg train`` runs it) on random
256x256 crops in bf16 autocast, channels-last: 5 warm-up steps, then the mean of
20, synchronised. Prints one JSON object {argument: seconds per step}. Without a
GPU it runs on the CPU on 64x64 crops in fp32 (a smoke test, not figures).
Data loading is left out; the seventh session's device script divided the
seconds it had left by (steps per epoch x these times x 1.3) to choose the
number of epochs of the v6 training (docs/model-card.md).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from nucleiseg.losses import DeepSupervisionLoss
from nucleiseg.models import UNetPlusPlus
from nucleiseg.training import accumulate_gradients


def step_seconds(widths: tuple[int, ...], batch: int, device: torch.device) -> float:
    model = UNetPlusPlus(3, 3, widths).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    loss = DeepSupervisionLoss()
    side = 256 if device.type == "cuda" else 64
    x = torch.rand(batch, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 3, side, side, device=device) > 0.5).float()
    autocast = torch.bfloat16 if device.type == "cuda" else None
    for step in range(25):
        if step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        optimizer.zero_grad()
        accumulate_gradients(model, loss, x, y, batch, autocast)
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / 20


def main(argv: list[str]) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {}
    for spec in argv or ["16,32,64,128,256:8"]:
        widths, batch = spec.split(":")
        result[spec] = step_seconds(tuple(int(w) for w in widths.split(",")), int(batch), device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
