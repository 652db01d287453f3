"""Prediction on a Dask cluster: correctness and cost of the block path, and images/s over workers.

Run from the repository root (needs the ``cluster`` extra and the DSB 2018 images):

    .venv/bin/python benchmarks/distributed_scale.py mosaic [--size 4096] [--workers 2] [--block 2048] [--mode accurate]
    .venv/bin/python benchmarks/distributed_scale.py folder [--images 48] [--workers 1 2] [--mode accurate]

``mosaic``
    Builds a ``size x size`` mosaic of 256 x 256 crops of DSB 2018 fluorescence images as a tiled
    BigTIFF (streamed: never whole in memory), then segments it twice: as ``nucleiseg predict``
    does in one process (``segment`` on the whole image, in a subprocess under
    ``/usr/bin/time -v`` for its peak memory), and with :func:`nucleiseg.distributed.segment_large`
    on a ``LocalCluster`` of ``--workers`` processes. Reports the DSB 2018 score of the cluster's
    labels against the single process's (criterion >= 0.99) and the nucleus counts (within 0.5%);
    the wall time of each; the peak resident memory of each worker (from the blocks' records) and
    of the client (this process, before the comparison loads both label images); the time and
    memory per block; and from them the cost of a 100,000 x 100,000 slide on N workers.
    ``--skip-single`` leaves out the single-process run (for sizes it cannot hold); ``--no-network``
    replaces the network by a grey-level threshold, to measure the rest of the pipeline (reading,
    watershed, measurements, outlines, writing, the client's assembly) at sizes where the network
    would take hours on a small machine.

``folder``
    Writes ``--images`` DSB 2018 images (their own sizes) into a folder and runs
    :func:`nucleiseg.predict_files` on it with a cluster of each ``--workers`` count (started
    beforehand: its start-up is reported apart), reporting images/s and megapixels/s.

Both print a Markdown summary and the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
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
]
CELL = 256


def data_root(spec: str | None) -> Path:
    if spec:
        return Path(spec)
    for path in DATA_CANDIDATES:
        if path.is_dir():
            return path
    raise SystemExit("DSB 2018 stage1_train not found; pass --data")


def fluorescence_files(root: Path, n: int) -> list[Path]:
    """The first ``n`` fluorescence images (sorted by id) at least CELL pixels on a side."""
    from nucleiseg.data.kinds import image_kind
    from nucleiseg.io import read_image

    out = []
    for path in sorted(root.glob("*/images/*.png")):
        image = read_image(path)
        if min(image.shape[:2]) >= CELL and image_kind(image) == "fluorescence":
            out.append(path)
            if len(out) == n:
                break
    return out


def write_mosaic(path: Path, size: int, root: Path) -> None:
    """A ``size x size`` RGB BigTIFF of 256-pixel crops, tiled 256 x 256, written tile by tile."""
    import tifffile

    from nucleiseg.io import read_image
    from nucleiseg.preprocess import to_rgb_uint8

    crops = [to_rgb_uint8(read_image(p))[:CELL, :CELL] for p in fluorescence_files(root, 256)]
    per_side = -(-size // CELL)

    def tiles():
        for k in range(per_side * per_side):
            yield crops[(k * 7 + k // per_side) % len(crops)]  # neighbours differ from row to row

    tifffile.imwrite(path, tiles(), shape=(per_side * CELL, per_side * CELL, 3), dtype=np.uint8, tile=(CELL, CELL),
                     photometric="rgb", bigtiff=True)


def machine() -> str:
    """tiling_memory's description of the machine, with the memory and Dask's version."""
    import dask

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiling_memory import machine as described

    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f"{described()}, {memory:.0f} GiB, dask {dask.__version__}"


def single(image_path: str, out: str, mode: str) -> None:
    """(Subprocess) segment the whole image in this process, as ``nucleiseg predict`` does."""
    import tifffile

    from nucleiseg import segment

    image = tifffile.imread(image_path)
    start = time.perf_counter()
    result = segment(image, "default", mode=mode)
    seconds = time.perf_counter() - start
    np.save(out, result.labels)
    print(json.dumps({"seconds": seconds, "nuclei": result.n_nuclei}))


class ThresholdPredictor:
    """No network: "probabilities" from the grey level (bright nuclei), for the pipeline's own cost at scale."""

    reach = 0

    def __call__(self, image):
        grey = image[..., :3].mean(axis=-1, dtype=np.float32) / 255.0
        body = np.clip(4.0 * grey, 0.0, 1.0)
        zero = np.zeros_like(body)
        return np.stack([body, zero, zero]), ("body", "contour", "touch")


def run_mosaic(args: argparse.Namespace) -> None:
    from distributed import Client, LocalCluster

    from nucleiseg.distributed import segment_large

    work = Path(tempfile.mkdtemp(prefix="nucleiseg-dist-", dir=args.workdir))
    image = work / "mosaic.tif"
    start = time.perf_counter()
    write_mosaic(image, args.size, data_root(args.data))
    print(f"mosaic {args.size}^2 written in {time.perf_counter() - start:.0f} s: {image}", file=sys.stderr)
    report: dict = {"size": args.size, "workers": args.workers, "block": args.block,
                    "mode": "no network (grey-level threshold)" if args.no_network else args.mode}

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        start = time.perf_counter()
        predictor = ThresholdPredictor() if args.no_network else None
        row = segment_large(image, work / "cluster", options={"mode": args.mode}, cluster=client, block=args.block,
                            predictor=predictor, overlap=320 if args.no_network else None)
        report["cluster_seconds"] = time.perf_counter() - start
    report["client_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    blocks = row["blocks"]
    report.update(cluster_nuclei=row["nuclei"], n_blocks=len(blocks), uncertain=sum(b["uncertain"] for b in blocks),
                  worker_peak_gib=max(b["peak_rss_mib"] for b in blocks) / 1024,
                  block_seconds=[b["seconds"] for b in blocks], block_pixels=[b["pixels"] for b in blocks])
    full = [b for b in blocks if b["pixels"] == max(x["pixels"] for x in blocks)]
    report["full_block_seconds"] = float(np.median([b["seconds"] for b in full]))
    report["full_block_pixels"] = full[0]["pixels"]

    if not args.skip_single:
        labels_file = work / "single.npy"
        result = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, "_single", str(image),
                                 str(labels_file), args.mode], capture_output=True, text=True, check=False)
        if result.returncode:
            sys.stderr.write(result.stderr[-3000:])
            raise SystemExit("the single-process run failed")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
        single_report = json.loads(result.stdout.strip().splitlines()[-1])
        report.update(single_seconds=single_report["seconds"], single_nuclei=single_report["nuclei"],
                      single_peak_gib=rss / 2**20)
        import zarr

        from nucleiseg.metrics import dsb_score

        mine = zarr.open_group(work / "cluster" / "mosaic_labels.ome.zarr", mode="r")["0"][:].astype(np.int64)
        theirs = np.load(labels_file)
        report["dsb_cluster_vs_single"] = dsb_score(theirs, mine)
        report["count_difference"] = (report["cluster_nuclei"] - report["single_nuclei"]) / report["single_nuclei"]

    # a 100,000^2 slide: interior blocks read (block + 2 overlap)^2 pixels, at this run's time per pixel
    from nucleiseg.distributed import LARGEST_REGION, NETWORK_REACH

    overlap = -(-(NETWORK_REACH + LARGEST_REGION) // 16) * 16
    side = 100_000
    n = math.ceil(side / args.block) ** 2
    per_pixel = report["full_block_seconds"] / report["full_block_pixels"]
    report["slide_blocks"] = n
    report["slide_block_seconds"] = per_pixel * (args.block + 2 * overlap) ** 2
    report["slide_worker_hours"] = n * report["slide_block_seconds"] / 3600
    report["machine"] = machine()
    print(json.dumps(report, indent=1))
    print_mosaic(report)


def print_mosaic(r: dict) -> None:
    print(f"\n{r['size']}x{r['size']} mosaic, mode {r['mode']}, {r['workers']} workers, blocks {r['block']} px "
          f"({r['n_blocks']} blocks, full outer region {r['full_block_pixels'] / 1e6:.1f} Mpx)")
    if "single_seconds" in r:
        print(f"| single process | {r['single_seconds']:.0f} s | {r['single_nuclei']} nuclei | peak {r['single_peak_gib']:.2f} GiB |")
    print(f"| cluster | {r['cluster_seconds']:.0f} s | {r['cluster_nuclei']} nuclei | worker peak "
          f"{r['worker_peak_gib']:.2f} GiB, client peak {r['client_peak_gib']:.2f} GiB | uncertain {r['uncertain']} |")
    if "dsb_cluster_vs_single" in r:
        print(f"DSB of the cluster's labels against the single process's: {r['dsb_cluster_vs_single']:.4f}; "
              f"counts differ by {100 * r['count_difference']:+.2f}%")
    print(f"per full block: {r['full_block_seconds']:.1f} s ({r['full_block_seconds'] / r['full_block_pixels'] * 1e6:.1f} "
          f"s/Mpx); 100,000^2 slide: {r['slide_blocks']} blocks of {r['slide_block_seconds']:.0f} s = "
          f"{r['slide_worker_hours']:.1f} worker-hours (/ N workers)")
    print(f"machine: {r['machine']}")


def run_folder(args: argparse.Namespace) -> None:
    import shutil

    from distributed import Client, LocalCluster

    from nucleiseg import predict_files
    from nucleiseg.io import read_image

    work = Path(tempfile.mkdtemp(prefix="nucleiseg-dist-", dir=args.workdir))
    images = work / "images"
    images.mkdir()
    pixels = 0
    for path in fluorescence_files(data_root(args.data), args.images):
        shutil.copy(path, images / path.name)
        pixels += int(np.prod(read_image(path).shape[:2]))
    report = {"images": args.images, "megapixels": pixels / 1e6, "mode": args.mode, "runs": []}
    for n in args.workers:
        start = time.perf_counter()
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=40) as cluster, Client(cluster) as client:
            started = time.perf_counter() - start
            start = time.perf_counter()
            summary = predict_files(images, work / f"out-{n}", options={"mode": args.mode}, cluster=client,
                                    progress=False)
            seconds = time.perf_counter() - start
        assert (summary["status"] == "ok").all(), summary
        report["runs"].append({"workers": n, "startup_seconds": started, "seconds": seconds,
                               "images_per_second": args.images / seconds, "megapixels_per_second": pixels / 1e6 / seconds})
    report["machine"] = machine()
    print(json.dumps(report, indent=1))
    print(f"\n{args.images} DSB fluorescence images ({pixels / 1e6:.1f} Mpx), mode {args.mode}")
    print("| workers | cluster start (s) | seconds | images/s | Mpx/s |")
    for run in report["runs"]:
        print(f"| {run['workers']} | {run['startup_seconds']:.1f} | {run['seconds']:.1f} | "
              f"{run['images_per_second']:.2f} | {run['megapixels_per_second']:.2f} |")
    print(f"machine: {report['machine']}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_single":
        single(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mosaic")
    m.add_argument("--size", type=int, default=4096)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--block", type=int, default=2048)
    m.add_argument("--skip-single", action="store_true")
    m.add_argument("--no-network", action="store_true",
                   help="probabilities from the grey level instead of the network: the cost of reading, "
                   "post-processing, measuring and writing alone, at sizes the network would take hours on")
    f = sub.add_parser("folder")
    f.add_argument("--images", type=int, default=48)
    f.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    for p in (m, f):
        p.add_argument("--mode", choices=("accurate", "fast"), default="accurate")
        p.add_argument("--data", default=None)
        p.add_argument("--workdir", default=None, help="where the images and outputs go (a temporary folder)")
    args = parser.parse_args()
    (run_mosaic if args.what == "mosaic" else run_folder)(args)


if __name__ == "__main__":
    main()
