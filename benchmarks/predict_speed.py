"""What users wait for: ``predict_files`` (``nucleiseg predict``) end to end against the network alone.

Run from the repository root (a few minutes on 2 cores):

    .venv/bin/python benchmarks/predict_speed.py [--images 32] [--modes fast accurate] [--large 8000]
        [--variants default sequential pipelined threads] [--paired 3]
        [--large-stages] [--large-tiles 1024 1408 1760] [--tile-side-by-side 976] [--same-outputs CACHE]
        [--json OUT]

For each mode, in one process, with the model loaded once and the default
options (precision auto, default outputs: labels, mask, overlay, table):

- network only: :func:`inference_speed.network_throughput` on 256x256 inputs,
  batch 8 (the figure of ``inference_speed.py``) and batch 1 (what
  ``predict`` runs for an image of one tile);
- network only, side by side: two threads each running the network on
  batches of one with half of PyTorch's threads (what ``predict_files``
  runs by default on a CPU);
- ``predict_files`` on a folder of ``--images`` 256x256 DSB crops (written
  as PNG beforehand): the default (on a CPU, two images side by side in
  threads), one image at a time (``workers=0``), with worker processes
  (``--workers``, default one per core; on a CPU each segments whole
  images, on a GPU they label, measure and write while the network runs
  here) and pipelined with worker threads instead, and the ratio of its
  images/s to network-only's;
- the paired ratio (:func:`paired_ratio`): network-only and ``predict_one``
  timed image by image in turn, robust to the machine's drift; and folder by
  folder (:func:`paired_folder_ratio`): network-only on as many inputs, then
  ``predict_files`` on the folder (the default, and one image at a time), in turn;
- with ``--large-tiles T ...``: that image with each tile side in turn, in
  ``--rounds`` interleaved rounds (a larger tile predicts fewer overlap pixels
  and holds more activations);
- with ``--large-stages``: that image once more, its reading, network and
  finishing stage timed apart;
- with ``--tile-side-by-side SIDE``: the accurate network alone on one
  SIDE x SIDE input, on all threads against two side by side (a large
  image's tiles);
- with ``--same-outputs CACHE``: the validation images of a prepared cache
  predicted the default way and one image at a time, each output file
  compared byte for byte;
- with ``--large SIDE``: one SIDE x SIDE mosaic of DSB crops, accurate mode,
  the default path, as seconds per megapixel against the 256x256 folder's
  (timed just before and after it).

The machine is shared: the measurements are interleaved in ``--rounds``
rounds and the best of each kept; the load average (``uptime``'s) is recorded
with each figure, and figures taken at a load above the core count are marked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import ROOT, SIDE, dsb_crops, machine, mosaic, network_throughput  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))


#: predict_files variants: name -> workers ("many": --workers, default one per core). "default": what predict runs
#: (on a CPU, images side by side in threads); "threads": the pipeline with worker threads instead of processes;
#: "default-overlay-thread" / "-inline": see OVERLAY_THREAD_MODES.
VARIANTS = {"default": None, "sequential": 0, "pipelined": "many", "threads": "many", "default-overlay-thread": None,
            "default-overlay-inline": None}
#: The default with each image's overlay PNG encoded in a thread of its own, or in the image's thread, in every mode.
OVERLAY_THREAD_MODES = {"default-overlay-thread": ("fast", "accurate"), "default-overlay-inline": ()}


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def timed_predict(folder: Path, model: Any, mode: str, workers: int | None, repeats: int,
                  images: int | None = None, device: str = "auto", tile: int | None = None) -> tuple[float, float]:
    """(best seconds of ``repeats`` predict_files runs into fresh folders, load average during the best);
    ``tile``: the tile side (default: predict's)."""
    from nucleiseg.batch import predict_files

    best, best_load = float("inf"), 0.0
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="nucleiseg-predict-speed-"))
        try:
            before = load()
            t0 = time.perf_counter()
            options = {"mode": mode, "device": device, **({"tile": tile} if tile else {})}
            summary = predict_files([folder], out, model=model, options=options,
                                    progress=False, say=lambda kind, text: None, workers=workers)
            seconds = time.perf_counter() - t0
            assert (summary["status"] == "ok").all(), summary
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if seconds < best:
            best, best_load = seconds, max(before, load())
    return best, best_load


def paired_ratio(folder: Path, model: Any, mode: str, passes: int, device: str = "cpu") -> list[dict[str, float]]:
    """Per pass over the folder: network-only and one-image-at-a-time images/s, taken image by image in turn.

    For each image, the network alone runs once on a random 256x256 batch of one (as ``network_throughput``),
    then :func:`nucleiseg.batch.predict_one` reads, segments and writes that image (the default path of
    ``predict_files``, which also reads the next image meanwhile), each timed. Summed over the folder, their ratio compares moments a fraction of a
    second apart, so it holds however much the machine's speed drifts (tens of per cent over minutes on
    this shared VM), unlike two throughputs measured minutes apart.
    """
    import torch
    from inference_speed import autocast

    from nucleiseg.batch import ImageJob, OutputFolder, plan_outputs, predict_one
    from nucleiseg.device import resolve_precision
    from nucleiseg.inference import resolve_prune_level
    from nucleiseg.options import PredictOptions

    level = resolve_prune_level(model.depth, model.metadata, mode)
    bf16 = resolve_precision("auto", torch.device(device)) == torch.bfloat16
    opts = PredictOptions(mode=mode, device=device).resolved(model.depth, model.nucleus_diameter)
    x = torch.rand(1, 3, SIDE, SIDE, device=device).contiguous(memory_format=torch.channels_last)
    paths = sorted(folder.glob("*.png"))
    passes_out = []
    for _ in range(passes):
        out = Path(tempfile.mkdtemp(prefix="nucleiseg-predict-speed-"))
        try:
            target = OutputFolder(out).open()
            network = end_to_end = 0.0
            for path in paths:
                t0 = time.perf_counter()
                with torch.inference_mode(), autocast(bf16, x.device.type):
                    model.network.predict_proba(x, prune_level=level)
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                row = predict_one(ImageJob(path, path.stem, plan_outputs(out, path.stem)), model, opts, target,
                                  say=lambda kind, text: None)
                end_to_end += time.perf_counter() - t1
                network += t1 - t0
                assert row["status"] == "ok", row
            target.close()
        finally:
            shutil.rmtree(out, ignore_errors=True)
        passes_out.append({"network_images_per_s": len(paths) / network,
                           "predict_images_per_s": len(paths) / end_to_end, "ratio": network / end_to_end})
    return passes_out


def paired_folder_ratio(folder: Path, model: Any, mode: str, passes: int, device: str = "cpu",
                        workers: int | None = None) -> list[dict[str, float]]:
    """Per pass: the network alone on as many 256x256 batches of one as the folder has images, then
    ``predict_files`` on the folder (``workers``: None, the default path; 0, one image at a time; all default
    outputs), each timed.

    What ``nucleiseg predict`` does for a folder (reading ahead, progress, summary) beside the network alone
    a few seconds apart, unlike :func:`paired_ratio`, which times :func:`nucleiseg.batch.predict_one` image by
    image and so leaves out what only the folder's loop does.
    """
    import torch
    from inference_speed import autocast

    from nucleiseg.device import resolve_precision
    from nucleiseg.inference import resolve_prune_level

    level = resolve_prune_level(model.depth, model.metadata, mode)
    bf16 = resolve_precision("auto", torch.device(device)) == torch.bfloat16
    x = torch.rand(1, 3, SIDE, SIDE, device=device).contiguous(memory_format=torch.channels_last)
    count = len(list(folder.glob("*.png")))
    out = []
    for _ in range(passes):
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(bf16, x.device.type):
            for _ in range(count):
                model.network.predict_proba(x, prune_level=level)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        network = time.perf_counter() - t0
        seconds, _ = timed_predict(folder, model, mode, workers, 1, device=device)
        out.append({"network_images_per_s": count / network, "predict_images_per_s": count / seconds,
                    "ratio": network / seconds})
    return out


def side_by_side_throughput(net: Any, level: int | None, bf16: bool, min_time: float, lanes: int = 2,
                            side: int = SIDE) -> float:
    """Images/s of ``lanes`` threads each running ``predict_proba`` on random ``side`` x ``side`` batches of
    one, with :func:`nucleiseg.device.share_threads` (as ``predict_files`` runs networks by default on a CPU)."""
    import threading

    import torch
    from inference_speed import autocast

    from nucleiseg.device import share_threads

    counts = [0] * lanes
    start = threading.Barrier(lanes + 1)

    def lane(i: int, until: list[float]) -> None:
        x = torch.rand(1, 3, side, side).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(bf16, "cpu"):
            net.predict_proba(x, prune_level=level)  # warm-up
            start.wait()
            while time.perf_counter() < until[0]:
                net.predict_proba(x, prune_level=level)
                counts[i] += 1

    until = [float("inf")]
    with share_threads(lanes):
        threads = [threading.Thread(target=lane, args=(i, until)) for i in range(lanes)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        until[0] = t0 + min_time
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
    return sum(counts) / seconds


def same_outputs(cache: Path, model: Any, mode: str, device: str = "auto") -> dict[str, Any]:
    """``predict_files`` on the validation images of a prepared cache, the default path and one image at a
    time (``workers=0``): every output file compared byte for byte (``summary.csv`` by its findings)."""
    import pandas as pd

    from nucleiseg.batch import predict_files

    split = pd.read_csv(cache / "split.csv")
    paths = [cache / "images" / f"{i}.png" for i in split.loc[split["split"] == "val", "image_id"]]
    tmp = Path(tempfile.mkdtemp(prefix="nucleiseg-same-outputs-"))
    try:
        for name, workers in (("default", None), ("sequential", 0)):
            summary = predict_files(paths, tmp / name, model=model, options={"mode": mode, "device": device},
                                    progress=False, say=lambda kind, text: None, workers=workers)
            assert (summary["status"] == "ok").all(), summary
        files = sorted(f.name for f in (tmp / "sequential").iterdir() if f.is_file() and f.name != "summary.csv")
        differ = [f for f in files if (tmp / "default" / f).read_bytes() != (tmp / "sequential" / f).read_bytes()]
        columns = ["image", "nuclei", "mean_area", "status"]
        if not pd.read_csv(tmp / "default" / "summary.csv")[columns].equals(
                pd.read_csv(tmp / "sequential" / "summary.csv")[columns]):
            differ.append("summary.csv")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": len(paths), "files": len(files), "differ": differ}


def large_stages(path: Path, model: Any, device: str) -> dict[str, float]:
    """Wall seconds of each stage of ``predict_files`` for one image (accurate mode, default outputs), in turn."""
    from nucleiseg.batch import ImageJob, OutputFolder, _finish, _infer, _read, plan_outputs
    from nucleiseg.options import PredictOptions

    opts = PredictOptions(mode="accurate", device=device).resolved(model.depth, model.nucleus_diameter)
    out = Path(tempfile.mkdtemp(prefix="nucleiseg-predict-speed-"))
    try:
        target = OutputFolder(out).open()
        job = ImageJob(path, path.stem, plan_outputs(out, path.stem))
        t0 = time.perf_counter()
        read = _read(job, opts)
        t1 = time.perf_counter()
        predicted = _infer(job, *read, model, opts, None)
        t2 = time.perf_counter()
        row, _ = _finish(predicted, target)
        t3 = time.perf_counter()
        assert row["status"] == "ok", row
        target.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"read": t1 - t0, "network": t2 - t1, "finish": t3 - t2}


def stage_cpu_seconds(folder: Path, model: Any, mode: str) -> dict[str, float]:
    """CPU seconds (all threads of this process) per image of each stage of predict_files, run one after the other.

    CPU time is far less disturbed than wall time by other processes on a shared machine. With C cores, a
    pipeline that keeps the network busy reaches at best ``network / (network + read + finish)`` of the
    network-only throughput when every stage competes for the same cores (the network itself using them all).
    """
    from nucleiseg.batch import ImageJob, OutputFolder, _finish, _infer, _read, plan_outputs
    from nucleiseg.options import PredictOptions

    opts = PredictOptions(mode=mode).resolved(model.depth, model.nucleus_diameter)
    out = Path(tempfile.mkdtemp(prefix="nucleiseg-predict-speed-"))
    try:
        target = OutputFolder(out).open()
        jobs = [ImageJob(p, p.stem, plan_outputs(out, p.stem)) for p in sorted(folder.glob("*.png"))]
        cpu = {"read": 0.0, "network": 0.0, "finish": 0.0}
        _finish(_infer(jobs[0], *_read(jobs[0], opts), model, opts, None), target)  # warm-up
        for job in jobs:
            t0 = time.process_time()
            read = _read(job, opts)
            t1 = time.process_time()
            predicted = _infer(job, *read, model, opts, None)
            t2 = time.process_time()
            _finish(predicted, target)
            t3 = time.process_time()
            cpu["read"] += t1 - t0
            cpu["network"] += t2 - t1
            cpu["finish"] += t3 - t2
        target.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {k: v / len(jobs) for k, v in cpu.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from nucleiseg import batch, pipeline
    from nucleiseg.inference import load_model, resolve_prune_level
    from nucleiseg.io import write_png
    from nucleiseg.device import resolve_precision, reuse_freed_memory

    reuse_freed_memory()  # as predict and train do on a CPU (NUCLEISEG_MALLOC=system: glibc's own behaviour)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="256x256 images in the folder")
    parser.add_argument("--modes", nargs="+", default=["fast", "accurate"], choices=["fast", "accurate"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement (best kept)")
    parser.add_argument("--net-time", type=float, default=1.5, help="seconds of timing per network configuration")
    parser.add_argument("--large", type=int, default=None, metavar="SIDE", help="also one SIDE x SIDE image, accurate")
    parser.add_argument("--device", default="cpu", help="torch device of the network (cpu, cuda, ...)")
    parser.add_argument("--workers", type=int, default=None, help="predict_files workers when pipelined (default: one per core)")
    parser.add_argument("--paired", type=int, default=3, metavar="PASSES",
                        help="passes of the image-by-image paired measurement (paired_ratio; 0: none)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="predict_files variants to time (see VARIANTS)")
    parser.add_argument("--large-stages", action="store_true",
                        help="with --large: the large image once more, timing reading, the network (with "
                        "normalising) and the finishing stage (labels, measurements, writing) apart")
    parser.add_argument("--large-tiles", type=int, nargs="+", default=None, metavar="TILE",
                        help="with --large: the large image with each of these tile sides in turn, --rounds "
                        "interleaved rounds, seconds each (a larger tile predicts fewer overlap pixels)")
    parser.add_argument("--tile-side-by-side", type=int, default=None, metavar="SIDE",
                        help="also the network alone (accurate) on SIDE x SIDE inputs: one on all threads against "
                        "two side by side, in Mpixel/s (large images' tiles)")
    parser.add_argument("--same-outputs", type=Path, default=None, metavar="CACHE",
                        help="also predict the validation images of a prepared cache the default way and one at "
                        "a time, in each mode, and compare every output file byte for byte")
    parser.add_argument("--json", metavar="OUT", default=None)
    args = parser.parse_args(argv)

    cores = os.cpu_count() or 1
    on_cpu = args.device == "cpu"
    say = lambda text="": print(text, flush=True)
    results: dict[str, Any] = {"machine": machine(), "images": args.images, "modes": {}}
    m = results["machine"]
    model = load_model(None, args.device)
    precision = resolve_precision("auto", torch.device(args.device))
    results["device"] = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    say(f"# predict speed: {results['device']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({torch.get_num_threads()} threads), "
        f"precision auto = {precision}; {m['date']}; load average {load():.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="nucleiseg-predict-speed-in-"))
    try:
        folder = tmp / "in"
        folder.mkdir()
        for k, crop in enumerate(dsb_crops(args.images, SIDE)):
            write_png(folder / f"img{k:03d}.png", crop)
        bf16 = precision == torch.bfloat16
        # Rounds of every measurement, interleaved, the best of each kept: on a shared machine the best is the
        # least disturbed, and neighbours in time see similar load.
        best: dict[tuple[str, str], tuple[float, float]] = {}

        rounds: dict[tuple[str, str], list[float]] = {}

        def keep(key: tuple[str, str], value: float, at: float) -> None:
            rounds.setdefault(key, []).append(value)
            if value > best.get(key, (0.0, 0.0))[0]:
                best[key] = (value, at)

        for round_ in range(args.rounds):
            for mode in args.modes:
                level = resolve_prune_level(model.depth, model.metadata, mode)
                l0 = load()
                keep((mode, "network_batch8"), network_throughput(model.network, level, bf16, True, True,
                                                                  args.net_time), max(l0, load()))
                l0 = load()
                keep((mode, "network_batch1"), network_throughput(model.network, level, bf16, True, True,
                                                                  args.net_time, batch=1), max(l0, load()))
                if on_cpu:  # what predict_files runs on a CPU; on a GPU the network runs one batch at a time
                    l0 = load()
                    keep((mode, "network_side_by_side"), side_by_side_throughput(model.network, level, bf16,
                                                                                  args.net_time), max(l0, load()))
                for name in args.variants:
                    workers = VARIANTS[name] if VARIANTS[name] != "many" else (args.workers or cores)
                    if name == "threads":  # the pipeline with worker threads instead of processes
                        pipeline.PROCESS_MIN_IMAGES, saved = 1 << 30, pipeline.PROCESS_MIN_IMAGES
                    if name in OVERLAY_THREAD_MODES:
                        batch.OVERLAY_THREAD_SIDE_BY_SIDE, saved = OVERLAY_THREAD_MODES[name], batch.OVERLAY_THREAD_SIDE_BY_SIDE
                    try:
                        seconds, at = timed_predict(folder, model, mode, workers, 1, device=args.device)
                    finally:
                        if name == "threads":
                            pipeline.PROCESS_MIN_IMAGES = saved
                        if name in OVERLAY_THREAD_MODES:
                            batch.OVERLAY_THREAD_SIDE_BY_SIDE = saved
                    keep((mode, name), args.images / seconds, at)
                say(f"round {round_ + 1}: {mode} " + ", ".join(f"{k[1]} {v[0]:.2f}" for k, v in best.items()
                                                              if k[0] == mode) + f" (best so far); load {load():.1f}")
        for mode in args.modes:
            row: dict[str, Any] = {k[1]: {"images_per_s": v[0], "load": v[1]} for k, v in best.items() if k[0] == mode}
            # Within a round the measurements are seconds apart: each variant against the faster network-only
            # figure of its own round, then the median over rounds.
            for name in args.variants:
                ratios = sorted(v / max(n8, n1) for v, n8, n1 in zip(rounds[(mode, name)],
                                rounds[(mode, "network_batch8")], rounds[(mode, "network_batch1")]))
                row[name]["round_ratios"] = ratios
                row[name]["median_round_ratio"] = ratios[len(ratios) // 2]
                say(f"{mode} {name}: per round, of that round's network-only: "
                    + ", ".join(f"{r:.0%}" for r in ratios) + f" (median {ratios[len(ratios) // 2]:.0%})")
            if args.paired:
                l0 = load()
                row["paired"] = paired_ratio(folder, model, mode, args.paired, args.device)
                ratios = sorted(p["ratio"] for p in row["paired"])
                say(f"\n{mode}: paired, image by image (load {max(l0, load()):.1f}): one image at a time reaches "
                    + ", ".join(f"{p['ratio']:.0%}" for p in row["paired"])
                    + f" of network-only (median {ratios[len(ratios) // 2]:.0%}; network "
                    + ", ".join(f"{p['network_images_per_s']:.1f}" for p in row["paired"]) + " images/s)")
                for key, workers, what in (("paired_folder", None, "the default"),
                                           ("paired_folder_sequential", 0, "one image at a time")):
                    row[key] = paired_folder_ratio(folder, model, mode, args.paired, args.device, workers)
                    say(f"{mode}: paired, folder by folder: predict_files, {what}, reaches "
                        + ", ".join(f"{p['ratio']:.0%}" for p in row[key])
                        + " of network-only (network " + ", ".join(f"{p['network_images_per_s']:.1f}"
                                                                     for p in row[key])
                        + f" images/s; load {load():.1f})")
            cpu = stage_cpu_seconds(folder, model, mode)
            row["cpu_seconds_per_image"] = cpu
            row["bound_from_cpu"] = cpu["network"] / sum(cpu.values())
            say(f"\n{mode}: CPU seconds per image, stages run in turn: read {cpu['read']:.3f}, "
                f"network (incl. normalising) {cpu['network']:.3f}, labels + measurements + writing {cpu['finish']:.3f}; "
                f"a pipeline sharing the cores reaches at best {row['bound_from_cpu']:.0%} of network-only")
            net8, net1 = row["network_batch8"]["images_per_s"], row["network_batch1"]["images_per_s"]
            net2 = row["network_side_by_side"]["images_per_s"] if on_cpu else None
            for name in args.variants:
                row[name]["of_network_batch8"] = row[name]["images_per_s"] / net8
                row[name]["of_network_batch1"] = row[name]["images_per_s"] / net1
                if net2:
                    row[name]["of_network_side_by_side"] = row[name]["images_per_s"] / net2
                row[name]["seconds"] = args.images / row[name]["images_per_s"]
            results["modes"][mode] = row
            say(f"\n{mode}: network only {net8:.2f} images/s (batch 8, load {row['network_batch8']['load']:.1f}), "
                f"{net1:.2f} (batch 1, load {row['network_batch1']['load']:.1f})"
                + (f", {net2:.2f} (two of batch 1 side by side, load {row['network_side_by_side']['load']:.1f})"
                   if net2 else ""))
            for name in args.variants:
                r = row[name]
                say(f"  predict_files {name:10s}: {r['images_per_s']:.2f} images/s = {100 * r['of_network_batch8']:.0f}% "
                    f"of network-only batch 8, {100 * r['of_network_batch1']:.0f}% of batch 1"
                    + (f", {100 * r['of_network_side_by_side']:.0f}% of side by side" if net2 else "")
                    + f" (load {r['load']:.1f}{', UNDER LOAD' if r['load'] > cores else ''})")
        if args.tile_side_by_side and on_cpu:
            side = args.tile_side_by_side
            level = resolve_prune_level(model.depth, model.metadata, "accurate")
            runs = []
            for _ in range(args.rounds):
                one = network_throughput(model.network, level, bf16, True, True, args.net_time, batch=1,
                                         min_runs=2, side=side)
                two = side_by_side_throughput(model.network, level, bf16, args.net_time, side=side)
                runs.append({"one_network": one * side * side / 1e6, "side_by_side": two * side * side / 1e6})
            results["tile_side_by_side"] = {"side": side, "mpixel_per_s": runs}
            say(f"\naccurate network alone on {side}x{side}, Mpixel/s per round: one on all threads "
                + ", ".join(f"{r['one_network']:.2f}" for r in runs) + "; two side by side "
                + ", ".join(f"{r['side_by_side']:.2f}" for r in runs))
        if args.same_outputs:
            for mode in args.modes:
                same = results.setdefault("same_outputs", {})[mode] = same_outputs(args.same_outputs, model, mode,
                                                                                  args.device)
                say(f"\n{mode}: {same['images']} validation images, {same['files']} output files: "
                    + (f"DIFFERENT: {', '.join(same['differ'])}" if same["differ"] else
                       "the default path's are byte-identical to one image at a time's"))
        if args.large:

            big = folder.parent / "large"
            big.mkdir()
            write_png(big / "large.png", mosaic(args.large, dsb_crops(64, SIDE)))
            # The 256x256 folder just before and just after the large image, both in accurate mode, the default
            # path: this machine's speed drifts by tens of per cent over minutes, so the reference is taken
            # around the measurement rather than from the best of the rounds above.
            first, _ = timed_predict(folder, model, "accurate", None, 1, device=args.device)
            seconds, before = timed_predict(big, model, "accurate", None, 1, images=1, device=args.device)
            last, _ = timed_predict(folder, model, "accurate", None, 1, device=args.device)
            mpix = args.large**2 / 1e6
            per_small = (first + last) / 2 / (args.images * SIDE * SIDE / 1e6)
            results["large"] = {"side": args.large, "seconds": seconds, "s_per_mpixel": seconds / mpix,
                                "s_per_mpixel_256": per_small, "load": max(before, load())}
            say(f"\n{args.large}x{args.large} accurate: {seconds:.1f} s = {seconds / mpix:.2f} s/Mpixel"
                f" = {seconds / mpix / per_small:.2f}x the 256x256 folder's {per_small:.2f} s/Mpixel"
                f" (load {results['large']['load']:.1f})")
            if args.large_tiles:
                from nucleiseg.tiling import DEFAULT_OVERLAP, tile_spans

                runs = []
                for _ in range(args.rounds):
                    runs.append({t: timed_predict(big, model, "accurate", None, 1, images=1, device=args.device,
                                                  tile=t)[0] for t in args.large_tiles})
                pixels = {t: (sum(b - a for a, b in tile_spans(args.large, t, DEFAULT_OVERLAP, 16)) / args.large) ** 2
                          for t in args.large_tiles}
                results["large"]["tiles"] = {"seconds": runs, "predicted_pixels": pixels}
                for t in args.large_tiles:
                    say(f"{args.large}x{args.large} accurate, tile {t} ({pixels[t]:.2f}x the pixels): "
                        + ", ".join(f"{r[t]:.1f} s" for r in runs))
            if args.large_stages:
                stages = large_stages(big / "large.png", model, args.device)
                results["large"]["stages_seconds"] = stages
                say(f"{args.large}x{args.large} accurate, once more stage by stage: " + ", ".join(
                    f"{name} {value:.1f} s" for name, value in stages.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"\nload average at the end: {load():.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
