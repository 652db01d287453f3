"""Inference speed on the CPU: the processor's peak, the network, the whole pipeline, and a peer.

Run from the repository root on an otherwise idle machine (about 5 minutes on 2 cores):

    .venv/bin/python benchmarks/inference_speed.py [--model PATH] [--threads N] [--quick] [--json OUT]

It prints, all measured in the one run:

- the processor's matrix-multiply peak (GFLOP/s, fp32 and bf16): the best of
  several rounds of a large ``torch.mm``, with ``--threads`` threads (default:
  all cores);
- the model's FLOPs per 256x256 image (``torch.utils.flop_counter``), accurate
  and fast mode;
- network-only throughput (images/s, 256x256, batch 8) in accurate and fast
  mode, fp32 and bf16 autocast, with the BatchNorms folded
  (:func:`nucleiseg.models.fuse.fuse_batchnorm`), channels-last and
  ``torch.inference_mode``; each with its fraction of the peak of its precision
  (and of the bf16 peak). Also the levers one by one for accurate mode, from
  the plain eval-mode network up;
- ONNX Runtime throughput of the exported model (fp32), when onnxruntime is installed;
- end-to-end :func:`nucleiseg.segment` throughput on 256x256 DSB 2018 images
  (normalisation, network, watershed, measurements), and its ratio to
  network-only; seconds for one 1024x1024 and one 4096x4096 image (a mosaic
  of DSB images; default tiling);
- MONAI's ``BasicUNetPlusPlus`` (2-D, 3 -> 3 channels, its default features,
  deep supervision) in fp32 and in its fastest setting tried, and the ratio
  of our throughput to MONAI's fp32 (``pip install 'nucleiseg[benchmark]'``).

Then a Markdown table for ``docs/benchmarks.md`` and a check of the issue's targets.
``--quick`` runs every part briefly (seconds each; 4096x4096 skipped): a smoke test,
not figures to record. ``--json OUT`` writes every number.

The model: ``--model``, else the shipped default model when present, else the
default architecture (widths 16..256) with random weights (the output says
which). Network speed does not depend on the weights; the end-to-end numbers
do a little (the watershed's work depends on what the network finds).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from nucleiseg.device import reuse_freed_memory
from nucleiseg.models import DEFAULT_MODEL_PATH, UNetPlusPlus, load_model_file
from nucleiseg.models.fuse import fuse_batchnorm, is_fused

DATA_CANDIDATES = [
    ROOT.parent / "shared" / "data" / "dsb2018" / "stage1_train",
    Path("/work/shared/data/dsb2018/stage1_train"),
    ROOT / "tests" / "fixtures" / "dsb" / "stage1_train",
]
SIDE = 256
BATCH = 8


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any], min_time: float, min_runs: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of each call of ``fn`` after ``warmup`` calls: at least ``min_runs``, and ``min_time`` in all."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype: torch.dtype, n: int, rounds: int, per_round: int) -> float:
    """Best GFLOP/s of ``torch.mm`` on ``n x n`` matrices over ``rounds`` rounds of ``per_round`` products."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per_round):
            torch.mm(a, b, out=c)
        best = min(best, (time.perf_counter() - t0) / per_round)
    return 2 * n**3 / best / 1e9


def flops_per_image(net: torch.nn.Module, level: int | None, side: int = SIDE) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, side, side)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if isinstance(net, UNetPlusPlus):
            net.predict_proba(x, prune_level=level)
        else:
            net(x)
    return float(counter.get_total_flops())


def autocast(bf16: bool, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)


# ----------------------------------------------------------------------------- inputs
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from nucleiseg.device import bf16_supported

    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "bf16_native": bf16_supported(torch.device("cpu")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def load_network(spec: str | None) -> tuple[UNetPlusPlus, dict[str, Any], str, Path | None]:
    """(network in eval mode, metadata, description, file or None)."""
    if spec:
        net, meta = load_model_file(spec)
        return net, meta, f"model file {spec}", Path(spec)
    if DEFAULT_MODEL_PATH.is_file():
        net, meta = load_model_file(DEFAULT_MODEL_PATH)
        return net, meta, "the shipped default model (weights/default.safetensors)", DEFAULT_MODEL_PATH
    torch.manual_seed(0)
    net = UNetPlusPlus(widths=(16, 32, 64, 128, 256)).eval()
    return net, {}, "default architecture (widths 16, 32, 64, 128, 256) with RANDOM weights", None


def dsb_crops(count: int, side: int) -> list[np.ndarray]:
    """``count`` RGB uint8 ``side x side`` crops of DSB 2018 images (cycling over the images found)."""
    from nucleiseg.io import read_image
    from nucleiseg.preprocess import to_rgb_uint8

    root = next((p for p in DATA_CANDIDATES if p.is_dir()), None)
    files = sorted(root.glob("*/images/*.png")) if root else []
    crops: list[np.ndarray] = []
    for path in files:
        image = to_rgb_uint8(read_image(path))
        for y in range(0, image.shape[0] - side + 1, side):
            for x in range(0, image.shape[1] - side + 1, side):
                crops.append(image[y : y + side, x : x + side])
        if len(crops) >= count:
            break
    if not crops:
        raise SystemExit(f"no DSB images of at least {side}x{side} under {DATA_CANDIDATES}")
    return [crops[k % len(crops)] for k in range(count)]


def mosaic(size: int, tiles: list[np.ndarray]) -> np.ndarray:
    """A ``size x size`` RGB image tiled with ``tiles``."""
    cell = tiles[0].shape[0]
    per_side = -(-size // cell)
    out = np.zeros((per_side * cell, per_side * cell, 3), np.uint8)
    for k in range(per_side * per_side):
        r, c = divmod(k, per_side)
        out[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = tiles[k % len(tiles)]
    return np.ascontiguousarray(out[:size, :size])


# ----------------------------------------------------------------------------- parts
def network_throughput(net: UNetPlusPlus, level: int | None, bf16: bool, channels_last: bool,
                       inference_mode: bool, min_time: float, batch: int = BATCH,
                       min_runs: int | None = None, warmup: int = 1, side: int = SIDE) -> float:
    """Images/s of ``predict_proba`` on batches of ``batch`` random ``side`` x ``side`` images (median batch time).

    Runs on the network's device; on a GPU each batch is timed to its end (synchronised).
    """
    device = next(net.parameters()).device
    x = torch.rand(batch, 3, side, side, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.inference_mode if inference_mode else torch.no_grad

    def run() -> None:
        with grad(), autocast(bf16, device.type):
            net.predict_proba(x, prune_level=level)
        if device.type == "cuda":
            torch.cuda.synchronize()

    runs = min_runs if min_runs is not None else (3 if batch >= BATCH else 8)
    return batch / statistics.median(timed(run, min_time, min_runs=runs, warmup=warmup))


def onnx_throughput(net: UNetPlusPlus, level: int | None, threads: int, min_time: float, workdir: Path) -> float:
    import onnxruntime as ort

    from nucleiseg.export import export_onnx

    path = export_onnx(net, workdir / f"model-{level}.onnx", prune_level=level)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((BATCH, 3, SIDE, SIDE), dtype=np.float32)
    return BATCH / statistics.median(timed(lambda: session.run(None, {"image": x}), min_time))


def segment_throughput(model, images: list[np.ndarray], mode: str, precision: str) -> float:
    from nucleiseg.inference import segment

    segment(images[0], model, mode=mode, precision=precision)  # warm-up
    t0 = time.perf_counter()
    for image in images:
        segment(image, model, mode=mode, precision=precision)
    return len(images) / (time.perf_counter() - t0)


def segment_seconds(model, image: np.ndarray, mode: str, precision: str) -> tuple[float, int]:
    from nucleiseg.inference import segment

    t0 = time.perf_counter()
    result = segment(image, model, mode=mode, precision=precision)
    return time.perf_counter() - t0, result.n_nuclei


def monai_network():
    from monai.networks.nets import BasicUNetPlusPlus

    torch.manual_seed(0)
    return BasicUNetPlusPlus(spatial_dims=2, in_channels=3, out_channels=3, deep_supervision=True).eval()


def monai_throughput(net, bf16: bool, channels_last: bool, min_time: float) -> float:
    """Images/s of MONAI's network, all deep-supervision heads, sigmoid mean (as our accurate mode)."""
    x = torch.rand(BATCH, 3, SIDE, SIDE)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        net = net.to(memory_format=torch.contiguous_format)

    def run() -> None:
        with torch.inference_mode(), autocast(bf16):
            heads = net(x)
            torch.stack([torch.sigmoid(h.float()) for h in heads]).mean(0)

    return BATCH / statistics.median(timed(run, min_time))


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model file (default: the shipped model, else random weights)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch / ONNX Runtime threads")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: short timings, no 4096x4096")
    parser.add_argument("--json", metavar="OUT", default=None, help="write all numbers to this JSON file")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="PX",
                        help="sides of the large images timed end to end (default: 1024 4096; --quick: 1024)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("levers", "onnx", "e2e", "large", "monai"),
                        help="parts to leave out")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as predict and train do on a CPU (NUCLEISEG_MALLOC=system: glibc's own behaviour)
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    quick = args.quick
    t_net = 0.5 if quick else 3.0  # seconds of timing per network configuration
    results: dict[str, Any] = {"machine": machine(), "threads": args.threads, "quick": quick}
    say = lambda text="": print(text, flush=True)
    m = results["machine"]
    say(f"# nucleiseg inference speed{' (QUICK smoke run: do not record)' if quick else ''}")
    say(f"{m['cpu']}, {m['cores']} cores, {args.threads} threads; Python {m['python']}, torch {m['torch']}, "
        f"NumPy {m['numpy']}; native bf16: {m['bf16_native']}; {m['date']}")

    # Peak.
    n, rounds = (1024, 3) if quick else (2048, 6)
    peak = {
        "fp32": matmul_peak(torch.float32, n, rounds, 4),
        "bf16": matmul_peak(torch.bfloat16, n, rounds, 4),
    }
    results["peak_gflops"] = peak
    say(f"\nmatrix-multiply peak ({n}x{n} torch.mm, best of {rounds}): "
        f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")

    # Model and FLOPs.
    net, metadata, description, path = load_network(args.model)
    fast_level = min(max(int(metadata.get("fast_prune_level", 2)), 1), net.depth)
    levels = {"accurate": None, "fast": fast_level}
    flops = {mode: flops_per_image(net, level) for mode, level in levels.items()}
    results.update(model=description, fast_prune_level=fast_level,
                   gflop_per_image={k: v / 1e9 for k, v in flops.items()})
    say(f"\nmodel: {description}; fast mode = head {fast_level} of {net.depth}")
    say(f"FLOPs per {SIDE}x{SIDE} image: accurate {flops['accurate'] / 1e9:.2f} GFLOP, "
        f"fast {flops['fast'] / 1e9:.2f} GFLOP")

    fused = fuse_batchnorm(net).to(memory_format=torch.channels_last)

    # Levers, accurate mode.
    if "levers" not in args.skip:
        plain_cl = UNetPlusPlus(**{k: v for k, v in net.config.to_dict().items() if k != "architecture"})
        plain_cl.load_state_dict(net.state_dict())
        plain_cl = plain_cl.eval().to(memory_format=torch.channels_last)
        fused_nchw = fuse_batchnorm(net)
        steps = [
            ("eval + no_grad, fp32", net, False, False, False),
            ("+ BatchNorm folded", fused_nchw, False, False, False),
            ("+ channels-last", fused, False, True, False),
            ("+ inference_mode", fused, False, True, True),
            ("+ bf16 autocast", fused, True, True, True),
            ("channels-last + bf16 (BN not folded)", plain_cl, True, True, True),
        ]
        levers = {}
        say(f"\nlevers, accurate mode, network only, batch {BATCH}:")
        for name, model, bf16, cl, inf in steps:
            levers[name] = network_throughput(model, None, bf16, cl, inf, t_net / 2)
            say(f"  {name:40s} {levers[name]:7.2f} images/s")
        results["levers_images_per_s"] = levers

    # Network only.
    network: dict[str, dict[str, float]] = {}
    say(f"\nnetwork only ({SIDE}x{SIDE}, batch {BATCH}; BN folded, channels-last, inference_mode):")
    for mode, level in levels.items():
        for precision in ("fp32", "bf16"):
            ips = network_throughput(fused, level, precision == "bf16", True, True, t_net)
            single = network_throughput(fused, level, precision == "bf16", True, True, t_net / 2, batch=1)
            gflops = ips * flops[mode] / 1e9
            network[f"{mode}/{precision}"] = {
                "images_per_s": ips, "gflops": gflops, "fraction_of_peak": gflops / peak[precision],
                "fraction_of_bf16_peak": gflops / peak["bf16"], "batch1_images_per_s": single,
            }
            say(f"  {mode:8s} {precision}: {ips:7.2f} images/s, {gflops:6.1f} GFLOP/s = "
                f"{100 * gflops / peak[precision]:3.0f}% of {precision} peak, "
                f"{100 * gflops / peak['bf16']:3.0f}% of bf16 peak; batch 1: {single:7.2f} images/s")
    results["network"] = network

    # ONNX Runtime.
    if "onnx" not in args.skip:
        try:
            import onnxruntime

            say(f"\nONNX Runtime {onnxruntime.__version__} (fp32, {args.threads} threads, batch {BATCH}):")
            results["onnxruntime"] = {"version": onnxruntime.__version__}
            with tempfile.TemporaryDirectory(prefix="nucleiseg-bench-") as tmp:
                for mode, level in levels.items():
                    ips = onnx_throughput(net, level, args.threads, t_net, Path(tmp))
                    results["onnxruntime"][mode] = {"images_per_s": ips, "gflops": ips * flops[mode] / 1e9}
                    say(f"  {mode:8s} fp32: {ips:7.2f} images/s, {ips * flops[mode] / 1e9:6.1f} GFLOP/s "
                        f"({ips / network[f'{mode}/fp32']['images_per_s']:.2f}x torch fp32)")
        except ImportError as exc:
            say(f"\nONNX Runtime: not installed ({exc.name}); pip install 'nucleiseg[onnx]'")

    # End to end.
    if "e2e" not in args.skip:
        from nucleiseg.inference import Model, load_model
        from nucleiseg.models import DEFAULT_CHANNELS

        if path is not None:
            model = load_model(path)
        else:
            model = Model(network=net.to(memory_format=torch.channels_last), channels=DEFAULT_CHANNELS)
        already = is_fused(model.network)
        if not already:
            model = dataclasses.replace(model, network=fuse_batchnorm(model.network).to(
                memory_format=torch.channels_last))
        model.network.eval()
        note = "load_model folds BN itself" if already else "BN folded here (load_model does not yet)"
        images = dsb_crops(4 if quick else 16, SIDE)
        say(f"\nend to end, nucleiseg.segment on {len(images)} DSB {SIDE}x{SIDE} images, one at a time "
            f"(normalise, network, watershed, measurements; {note}):")
        e2e: dict[str, Any] = {"note": note}
        for mode in levels:
            for precision in ("fp32", "bf16"):
                ips = segment_throughput(model, images, mode, precision)
                ratio = ips / network[f"{mode}/{precision}"]["images_per_s"]
                ratio1 = ips / network[f"{mode}/{precision}"]["batch1_images_per_s"]
                e2e[f"{mode}/{precision}"] = {"images_per_s": ips, "ratio_to_network": ratio,
                                              "ratio_to_network_batch1": ratio1}
                say(f"  {mode:8s} {precision}: {ips:7.2f} images/s = {100 * ratio:3.0f}% of network-only "
                    f"(batch {BATCH}), {100 * ratio1:3.0f}% of network-only batch 1")
        results["end_to_end"] = e2e

        if "large" not in args.skip:
            large: dict[str, Any] = {}
            sizes = args.sizes or ((1024,) if quick else (1024, 4096))
            tiles = dsb_crops(64, SIDE)
            say("\nend to end, one large image (mosaic of DSB crops, default tiling):")
            for size in sizes:
                image = mosaic(size, tiles)
                configs = [("accurate", "fp32"), ("accurate", "bf16"), ("fast", "bf16")]
                if size <= 1024:
                    configs.insert(2, ("fast", "fp32"))
                for mode, precision in configs:
                    seconds, n_nuclei = segment_seconds(model, image, mode, precision)
                    large[f"{size}/{mode}/{precision}"] = {"seconds": seconds, "nuclei": n_nuclei}
                    say(f"  {size}x{size} {mode:8s} {precision}: {seconds:6.2f} s ({n_nuclei} nuclei)")
            if 4096 not in sizes:
                say("  4096x4096: skipped")
            results["large_images"] = large

    # MONAI.
    if "monai" not in args.skip:
        try:
            import monai

            peer = monai_network()
            monai_flops = flops_per_image(peer, None)
            say(f"\nMONAI {monai.__version__} BasicUNetPlusPlus (2-D, 3->3, default features, deep supervision; "
                f"{monai_flops / 1e9:.1f} GFLOP per {SIDE}x{SIDE} image), batch {BATCH}, inference_mode:")
            settings = {"fp32": (False, False), "fp32 channels-last": (False, True),
                        "bf16": (True, False), "bf16 channels-last": (True, True)}
            if quick:
                settings = {k: settings[k] for k in ("fp32", "bf16 channels-last")}
            peer_ips = {}
            for name, (bf16, cl) in settings.items():
                peer_ips[name] = monai_throughput(peer, bf16, cl, t_net)
                say(f"  {name:20s} {peer_ips[name]:7.2f} images/s")
            fastest = max(peer_ips, key=peer_ips.get)
            base = peer_ips["fp32"]
            results["monai"] = {"version": monai.__version__, "gflop_per_image": monai_flops / 1e9,
                                "images_per_s": peer_ips, "fastest": fastest}
            ratios = {k: v["images_per_s"] / base for k, v in network.items()}
            results["ratio_to_monai_fp32"] = ratios
            results["ratio_to_monai_fastest"] = {k: v["images_per_s"] / peer_ips[fastest] for k, v in network.items()}
            say(f"  fastest: {fastest}; ours / MONAI fp32: "
                + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
        except ImportError as exc:
            say(f"\nMONAI: not installed ({exc.name}); pip install 'nucleiseg[benchmark]'")

    print_table(results)
    check_targets(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        say(f"\nwrote {args.json}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    m, peak = r["machine"], r["peak_gflops"]
    lines = [
        "",
        f"### Inference speed ({m['cpu']}, {m['cores']} cores, {r['threads']} threads, torch {m['torch']})",
        "",
        f"Model: {r['model']}. Matrix-multiply peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s. "
        f"FLOPs per {SIDE}x{SIDE} image: accurate {r['gflop_per_image']['accurate']:.2f} G, "
        f"fast (head {r['fast_prune_level']}) {r['gflop_per_image']['fast']:.2f} G.",
        "",
        f"| {SIDE}x{SIDE} images, network batch {BATCH} | images/s | GFLOP/s | % of peak (own precision) "
        "| % of bf16 peak | batch 1 images/s | end to end images/s | end to end / network | x MONAI fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, v in r["network"].items():
        e2e = r.get("end_to_end", {}).get(key)
        ratio = r.get("ratio_to_monai_fp32", {}).get(key)
        lines.append(
            f"| nucleiseg {key.replace('/', ' ')} | {v['images_per_s']:.2f} | {v['gflops']:.0f} | "
            f"{100 * v['fraction_of_peak']:.0f}% | {100 * v['fraction_of_bf16_peak']:.0f}% | "
            f"{v['batch1_images_per_s']:.2f} | "
            + (f"{e2e['images_per_s']:.2f} | {100 * e2e['ratio_to_network']:.0f}% | " if e2e else "– | – | ")
            + (f"{ratio:.1f}x |" if ratio else "– |")
        )
    for mode, v in r.get("onnxruntime", {}).items():
        if isinstance(v, dict):
            lines.append(f"| ONNX Runtime {r['onnxruntime']['version']} {mode} fp32 | {v['images_per_s']:.2f} | "
                         f"{v['gflops']:.0f} | {100 * v['gflops'] / peak['fp32']:.0f}% | "
                         f"{100 * v['gflops'] / peak['bf16']:.0f}% | – | – | – | – |")
    if "monai" in r:
        mon = r["monai"]
        base = mon["images_per_s"]["fp32"]
        for name, ips in mon["images_per_s"].items():
            gflops = ips * mon["gflop_per_image"]
            own = peak["bf16" if name.startswith("bf16") else "fp32"]
            lines.append(f"| MONAI {mon['version']} BasicUNetPlusPlus {name} | {ips:.2f} | {gflops:.0f} | "
                         f"{100 * gflops / own:.0f}% | {100 * gflops / peak['bf16']:.0f}% | – | – | – | {ips / base:.1f}x |")
    if r.get("large_images"):
        lines += ["", "| one image, end to end | seconds | nuclei |", "| --- | ---: | ---: |"]
        for key, v in r["large_images"].items():
            size, mode, precision = key.split("/")
            lines.append(f"| {size}x{size} {mode} {precision} | {v['seconds']:.2f} | {v['nuclei']} |")
    if r.get("levers_images_per_s"):
        lines += ["", f"| accurate mode, network only, batch {BATCH} | images/s |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in r["levers_images_per_s"].items()]
    print("\n".join(lines), flush=True)


def check_targets(r: dict[str, Any]) -> None:
    """The issue's targets, for the best precision of this machine (bf16 where native, else fp32)."""
    precision = "bf16" if r["machine"]["bf16_native"] else "fp32"
    net = r["network"]
    acc, fast = net[f"accurate/{precision}"], net[f"fast/{precision}"]
    checks = [
        (f"accurate network-only >= 60% of bf16 peak ({precision})", acc["fraction_of_bf16_peak"], 0.60, "{:.0%}"),
        (f"fast >= 2x accurate ({precision})", fast["images_per_s"] / acc["images_per_s"], 2.0, "{:.2f}x"),
    ]
    if "end_to_end" in r:
        ratio = r["end_to_end"][f"accurate/{precision}"]["ratio_to_network"]
        checks.append((f"end to end >= 70% of network-only (accurate, {precision})", ratio, 0.70, "{:.0%}"))
    if "ratio_to_monai_fp32" in r:
        checks.append((f"accurate >= 4x MONAI fp32 ({precision})", r["ratio_to_monai_fp32"][f"accurate/{precision}"],
                       4.0, "{:.1f}x"))
    print("\ntargets:")
    for name, value, target, fmt in checks:
        print(f"  {'PASS' if value >= target else 'FAIL'}  {name}: {fmt.format(value)}")
    r["targets"] = {name: {"value": value, "target": target, "pass": value >= target} for name, value, target, _ in checks}


if __name__ == "__main__":
    sys.exit(main())
