"""Start-up: ``nucleiseg --version`` / ``--help`` wall time, and how long ``predict`` takes to read its first image.

Run from the repository root (under a minute):

    .venv/bin/python benchmarks/startup_speed.py [--repeats 7] [--src DIR ...]

Each command runs ``--repeats`` times in a fresh interpreter (``python -m
nucleiseg.cli``) with ``PYTHONPATH`` set to each ``--src`` (default: this
checkout's ``src``), giving the minimum and the median, and the 1-minute load
average. Then one ``predict -q`` of a 256x256 DSB crop with the shipped model,
timed from the interpreter's start to the first image read, and the heavy
modules that run imported. ``python -X importtime -m nucleiseg.cli --help``
shows where the time goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIRST_IMAGE = """
import sys, time
t0 = time.perf_counter()
import nucleiseg.batch as batch
real = batch._read
def timed_read(*args, **kwargs):
    print(f"first image read at {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
    batch._read = real
    return real(*args, **kwargs)
batch._read = timed_read
from nucleiseg.cli import main
main(["-q", "predict", sys.argv[1], "-o", sys.argv[2]])
heavy = ("albumentations", "nucleiseg.training", "nucleiseg.data.dataset", "pandas", "skimage.measure")
print("imported: " + ", ".join(m for m in heavy if m in sys.modules), file=sys.stderr)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--src", nargs="+", default=[str(ROOT / "src")], help="source folders to compare")
    args = parser.parse_args(argv)
    for src in args.src:
        env = {**os.environ, "PYTHONPATH": src}
        for flag in ("--version", "--help"):
            seconds = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "nucleiseg.cli", flag], env=env, capture_output=True, check=True)
                seconds.append(time.perf_counter() - t0)
            print(f"{src} {flag}: min {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inference_speed import dsb_crops

    sys.path.insert(0, args.src[-1])
    from nucleiseg.io import write_png

    with tempfile.TemporaryDirectory(prefix="nucleiseg-startup-") as tmp:
        image = Path(tmp) / "cells.png"
        write_png(image, dsb_crops(1, 256)[0])
        done = subprocess.run([sys.executable, "-c", FIRST_IMAGE, str(image), str(Path(tmp) / "out")],
                              env={**os.environ, "PYTHONPATH": args.src[-1]}, capture_output=True, text=True)
        print("\n".join(line for line in done.stderr.splitlines() if line.startswith(("first", "imported"))),
              f"(load {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
