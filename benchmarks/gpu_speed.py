"""Inference speed on a CUDA GPU, and whether the GPU's labels agree with the CPU's.

Run from the repository root on a machine with a CUDA GPU (about a minute):

    python benchmarks/gpu_speed.py [--model PATH] [--json OUT]

``--device cpu --quick`` runs it briefly on a machine without a GPU (a smoke test of
the script, not figures to record).

It prints, for the shipped default model (or ``--model``):

- network-only throughput (images/s, 256x256 random images, batch 8 and 32),
  accurate and fast mode, fp32 and bf16 autocast, timed with CUDA synchronisation;
- end-to-end :func:`nucleiseg.segment` throughput on 256x256 DSB 2018 crops
  (the watershed and measurements still run on the CPU), and seconds for one
  1024x1024 and one 4096x4096 mosaic (default tiling);
- agreement of the GPU's labels with the CPU's on a few DSB crops (fp32, accurate
  mode): the DSB score of one against the other, which is 1.0 when they are identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import (SIDE, dsb_crops, load_network, machine, mosaic, network_throughput, segment_seconds,
                             segment_throughput)


def main(argv: list[str] | None = None) -> int:
    from nucleiseg.inference import load_model, segment
    from nucleiseg.metrics import instance_scores
    from nucleiseg.models.fuse import fuse_batchnorm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file (default: the shipped model)")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="a few seconds per part, no 4096x4096 image")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; benchmarks/inference_speed.py measures the CPU")

    net, meta, what, path = load_network(args.model)
    fast_level = int(meta.get("fast_prune_level", 2))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result: dict = {"machine": {**machine(), "gpu": gpu}, "model": what}
    print(f"{what} on {gpu or device}", flush=True)
    net = fuse_batchnorm(net).to(device, memory_format=torch.channels_last).eval()
    for mode, level in (("accurate", None), ("fast", fast_level)):
        for bf16 in (False, True):
            for batch in (1,) if args.quick else (8, 32):
                key = f"network {mode} {'bf16' if bf16 else 'fp32'} batch {batch}"
                result[key] = round(network_throughput(net, level, bf16, True, True, 0.1 if args.quick else 2.0, batch,
                                                        min_runs=5, warmup=3), 1)
                print(f"{key}: {result[key]} images/s", flush=True)

    model = load_model(path, device)
    crops = dsb_crops(4 if args.quick else 64, SIDE)
    for mode in ("accurate", "fast"):
        key = f"segment {mode} bf16, 256x256 images/s"
        result[key] = round(segment_throughput(model, crops, mode, "bf16"), 2)
        print(f"{key}: {result[key]}", flush=True)
    for size in (1024,) if args.quick else (1024, 4096):
        seconds, nuclei = segment_seconds(model, mosaic(size, crops), "accurate", "bf16")
        result[f"segment accurate bf16 {size}x{size} seconds"] = round(seconds, 2)
        print(f"one {size}x{size} image, accurate bf16: {seconds:.2f} s, {nuclei} nuclei", flush=True)

    cpu_model = load_model(path, "cpu")
    agreement = []
    started = time.perf_counter()
    for crop in crops[: 2 if args.quick else 8]:
        on_gpu = segment(crop, model, mode="accurate", precision="fp32").labels
        on_cpu = segment(crop, cpu_model, mode="accurate", precision="fp32").labels
        agreement.append(instance_scores(on_cpu, on_gpu).score)
    result["device vs cpu labels, DSB score of one against the other (fp32)"] = [round(a, 4) for a in agreement]
    print(f"{device} against CPU labels, fp32 (1.0 = identical): min {min(agreement):.4f}, "
          f"mean {np.mean(agreement):.4f} ({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
