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
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import step_times


def main(argv: list[str]) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    result = {}
    for spec in argv or ["16,32,64,128,256:8"]:
        widths, batch = spec.split(":")
        times = step_times(tuple(int(w) for w in widths.split(",")), int(batch), 256 if on_gpu else 64, 20,
                           bf16=on_gpu, channels_last=True, micro_batch=int(batch), device=device, warmup=5)
        result[spec] = statistics.mean(times)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
