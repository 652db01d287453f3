"""Wall time of ``nucleiseg prepare`` on a data folder, into a temporary cache.

Usage::

    .venv/bin/python benchmarks/prepare_speed.py /work/shared/data/dsb2018 [--workers N] [--repeat R]

Prints the time of a full prepare (median of ``--repeat`` runs, each into a
fresh temporary folder), images per second, and the time of a second,
up-to-date run on the same cache (which should do no work).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="data folder (any layout nucleiseg prepare reads)")
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: %(default)s)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="full runs; the median is reported (default: %(default)s)"
    )
    parser.add_argument("--layout", default="auto", help="as nucleiseg prepare --layout (default: %(default)s)")
    parser.add_argument("--rle-csv", default=None, help="as nucleiseg prepare --rle-csv")
    args = parser.parse_args(argv)

    import numpy as np

    from nucleiseg.data.cache import prepare_dataset

    times, rerun = [], None
    n_images = n_nuclei = 0
    for _ in range(max(1, args.repeat)):
        with tempfile.TemporaryDirectory(prefix="nucleiseg-prepare-") as tmp:
            out = Path(tmp) / "cache"
            start = time.perf_counter()
            result = prepare_dataset(
                args.data_dir, out, layout=args.layout, rle_csv=args.rle_csv, workers=args.workers, progress=False
            )
            times.append(time.perf_counter() - start)
            n_images, n_nuclei = len(result.table), int(result.table["n_nuclei"].sum())
            start = time.perf_counter()
            again = prepare_dataset(
                args.data_dir, out, layout=args.layout, rle_csv=args.rle_csv, workers=args.workers, progress=False
            )
            rerun = time.perf_counter() - start
            assert not again.processed, "the second run should find the cache up to date"
    wall = statistics.median(times)
    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, NumPy {np.__version__}")
    print(f"data: {args.data_dir} ({n_images} images, {n_nuclei} nuclei), workers={args.workers}")
    print(f"full prepare: {wall:.1f} s wall ({n_images / wall:.1f} images/s)"
          + (f"; runs: {', '.join(f'{t:.1f}' for t in times)} s" if len(times) > 1 else ""))
    print(f"up-to-date re-run: {rerun:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
