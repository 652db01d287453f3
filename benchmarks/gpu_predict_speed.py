"""``predict`` end to end on a GPU against the network alone, the machine's CPU cores post-processing.

One short call on a lent GPU machine (about 2 minutes; nothing is downloaded):

    python benchmarks/gpu_predict_speed.py --json $OUT/gpu_predict_speed.json

It runs :mod:`predict_speed` (``benchmarks/predict_speed.py``) with the network
on ``--device`` (default cuda) and ``predict_files``' default workers (one
process per core) doing labels, measurements and writing, on ``--images``
256x256 DSB crops in accurate mode, and checks the issue's target: end to end
at least 50% of network-only images/s (batch 8). ``--device cpu --quick`` is
a smoke test of the script on a machine without a GPU, not figures to record.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import predict_speed  # noqa: E402

#: The issue's target for a GPU: end-to-end accurate mode at least this fraction of network-only images/s.
TARGET = 0.50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=512, help="256x256 images in the folder")
    parser.add_argument("--quick", action="store_true", help="8 images, one round: a smoke test")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: try --device cpu --quick, or benchmarks/predict_speed.py")
    images, rounds = (8, 1) if args.quick else (args.images, 2)
    forwarded = ["--device", args.device, "--modes", "accurate", "--images", str(images), "--rounds", str(rounds),
                 "--net-time", "0.5" if args.quick else "2"]
    results = predict_speed.main(forwarded + (["--json", args.json] if args.json else []))
    row = results["modes"]["accurate"]
    ratio = row["pipelined"]["of_network_batch8"]
    print(f"\ntarget: end to end >= {TARGET:.0%} of network-only (accurate, batch 8): "
          f"{'PASS' if ratio >= TARGET else 'FAIL'} {ratio:.0%} "
          f"({row['pipelined']['images_per_s']:.1f} of {row['network_batch8']['images_per_s']:.1f} images/s; "
          f"one image at a time: {row['sequential']['images_per_s']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
