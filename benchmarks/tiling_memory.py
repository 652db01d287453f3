"""Tiled prediction: peak memory on a huge image, and seamlessness against untiled prediction.

Run from the repository root (CPU is fine; both take minutes, mostly network time):

    .venv/bin/python benchmarks/tiling_memory.py memory [--size 8000] [--model PATH] [--threads 1]
    .venv/bin/python benchmarks/tiling_memory.py seams  [--size 2048] [--tile 512] [--overlap 128] [--model PATH]

``memory``
    Writes a ``size x size`` RGB PNG mosaic of DSB 2018 images, then runs
    ``nucleiseg predict`` on it (fp32, default tile and overlap, all outputs
    but the probability TIFF) under ``/usr/bin/time -v`` and reports the
    maximum resident set size of that process: the whole pipeline (reading,
    normalisation, tiled prediction, watershed, measurements, writers).
    ``--stage probabilities`` measures ``predict_probabilities`` alone.

``seams``
    Predicts a ``size x size`` mosaic untiled and tiled (fp32) and reports the
    largest absolute difference of the probabilities (whole image and away
    from a 32-pixel border) and the DSB 2018 score of the tiled instance
    labels against the untiled ones. Criterion: < 1e-2 and >= 0.99.

The model: ``--model``, else the shipped default model when present, else the
default architecture (widths 16..256) with random weights (memory does not
depend on the weights; seamlessness does, so prefer a trained model there).
DSB images are read from ``--data`` (default ``../shared/data/dsb2018/stage1_train``
or ``/work/shared/data/dsb2018/stage1_train``), else the test fixtures.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA_CANDIDATES = [
    ROOT.parent / "shared" / "data" / "dsb2018" / "stage1_train",
    Path("/work/shared/data/dsb2018/stage1_train"),
    ROOT / "tests" / "fixtures" / "dsb" / "stage1_train",
]


def dsb_mosaic(size: int, root: Path, cell: int = 256) -> np.ndarray:
    """A ``size x size`` RGB uint8 mosaic of ``cell``-pixel crops of the DSB images under ``root``."""
    from nucleiseg.io import read_image
    from nucleiseg.preprocess import to_rgb_uint8

    files = sorted(root.glob("*/images/*.png"))
    if not files:
        raise SystemExit(f"no DSB images under {root}")
    per_side = -(-size // cell)
    out = np.zeros((per_side * cell, per_side * cell, 3), np.uint8)
    for k in range(per_side * per_side):
        image = to_rgb_uint8(read_image(files[k % len(files)]))
        crop = image[:cell, :cell]
        r, c = divmod(k, per_side)
        out[r * cell : r * cell + crop.shape[0], c * cell : c * cell + crop.shape[1]] = crop
    return np.ascontiguousarray(out[:size, :size])


def model_file(spec: str | None, workdir: Path) -> tuple[Path, str]:
    """The model to use and a description of it."""
    from nucleiseg.models import DEFAULT_MODEL_PATH, UNetPlusPlus, save_model

    if spec:
        return Path(spec), f"model file {spec}"
    if DEFAULT_MODEL_PATH.is_file():
        return DEFAULT_MODEL_PATH, "the shipped default model"
    import torch

    torch.manual_seed(0)
    path = workdir / "random-default-widths.safetensors"
    save_model(path, UNetPlusPlus(widths=(16, 32, 64, 128, 256)).eval())
    return path, "default architecture (widths 16, 32, 64, 128, 256), random weights"


def data_root(spec: str | None) -> Path:
    if spec:
        return Path(spec)
    return next(p for p in DATA_CANDIDATES if p.is_dir())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"NumPy {np.__version__}, torch {torch.__version__}")


def _time_v(command: list[str]) -> tuple[float, str, int]:
    """Run ``command`` under /usr/bin/time -v: (max RSS in GiB, elapsed, exit status)."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr)
    if result.returncode or not rss:
        sys.stderr.write(result.stderr[-3000:])
    return (int(rss.group(1)) / 2**20 if rss else float("nan"), elapsed.group(1) if elapsed else "?",
            result.returncode)


def run_memory(args: argparse.Namespace) -> None:
    import imageio.v3 as iio

    with tempfile.TemporaryDirectory(prefix="nucleiseg-bench-") as tmp:
        workdir = Path(tmp)
        model, about = model_file(args.model, workdir)
        root = data_root(args.data)
        t = time.perf_counter()
        image = dsb_mosaic(args.size, root)
        image_path = workdir / f"mosaic{args.size}.png"
        iio.imwrite(image_path, image, extension=".png")
        del image
        print(f"mosaic {args.size}x{args.size} RGB from {root} written in {time.perf_counter() - t:.0f} s", flush=True)
        if args.stage == "pipeline":
            command = [sys.executable, "-m", "nucleiseg.cli", "predict", str(image_path), "-o", str(workdir / "out"),
                       "--model", str(model), "--precision", args.precision, "--threads", str(args.threads),
                       "--formats", "imagej-roi,geojson"]
        else:
            command = [sys.executable, __file__, "_probabilities", str(image_path), str(model),
                       args.precision, str(args.threads)]
        rss, elapsed, status = _time_v(command)
        print(f"stage: {args.stage}; model: {about}; precision {args.precision}; threads {args.threads}")
        print(f"command: {' '.join(command)}")
        print(f"maximum resident set size: {rss:.2f} GiB; elapsed {elapsed}; exit status {status}")
        if args.stage == "pipeline" and (workdir / "out" / "summary.csv").is_file():
            print((workdir / "out" / "summary.csv").read_text())
        print(f"machine: {machine()}")


def _probabilities_child(image_path: str, model: str, precision: str, threads: str) -> None:
    import torch

    from nucleiseg.inference import load_model, predict_probabilities
    from nucleiseg.io import read_image

    torch.set_num_threads(int(threads))
    probs = predict_probabilities(load_model(model), read_image(image_path), precision=precision)
    print(probs.shape, probs.dtype)


def run_seams(args: argparse.Namespace) -> None:
    import torch

    from nucleiseg.inference import label_nuclei, load_model, predict_probabilities
    from nucleiseg.metrics import dsb_score

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="nucleiseg-bench-") as tmp:
        path, about = model_file(args.model, Path(tmp))
        model = load_model(path)
    image = dsb_mosaic(args.size, data_root(args.data))
    t = time.perf_counter()
    untiled = predict_probabilities(model, image, tile=0)  # 0: never tile (None would keep the default tile)
    t_untiled = time.perf_counter() - t
    ref = label_nuclei(untiled, model.channels, model.postprocess)
    print(f"model: {about}; mosaic {args.size}x{args.size}; fp32; untiled {t_untiled:.0f} s, {ref.max()} nuclei")
    for tile, overlap in zip(args.tile, args.overlap):
        t = time.perf_counter()
        tiled = predict_probabilities(model, image, tile=tile, overlap=overlap)
        elapsed = time.perf_counter() - t
        diff = np.abs(tiled - untiled).max(axis=0)
        labels = label_nuclei(tiled, model.channels, model.postprocess)
        b = 32
        print(f"tile {tile}, overlap {overlap}: max |diff| {diff.max():.2e} (away from a {b}-px border "
              f"{diff[b:-b, b:-b].max():.2e}), DSB vs untiled {dsb_score(ref, labels):.4f}, {elapsed:.0f} s")
    print(f"machine: {machine()}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_probabilities":
        _probabilities_child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory", help="peak memory of predicting a huge image")
    m.add_argument("--size", type=int, default=8000)
    m.add_argument("--stage", choices=("pipeline", "probabilities"), default="pipeline")
    m.add_argument("--precision", default="fp32")
    s = sub.add_parser("seams", help="tiled vs untiled agreement")
    s.add_argument("--size", type=int, default=2048)
    s.add_argument("--tile", type=int, nargs="+", default=[512, 1024])
    s.add_argument("--overlap", type=int, nargs="+", default=[128, 192])
    for p in (m, s):
        p.add_argument("--model", default=None, help="model file (default: shipped model, else random weights)")
        p.add_argument("--data", default=None, help="DSB stage1_train folder for the mosaic")
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    (run_memory if args.what == "memory" else run_seams)(args)


if __name__ == "__main__":
    main()
