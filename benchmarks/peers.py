"""Peers side by side: nucleiseg, MONAI, Cellpose (and StarDist where it installs), one process, same threads, same images.

Run from the repository root (a few minutes on 2 cores):

    .venv/bin/python benchmarks/peers.py [--images 16] [--threads N] [--cellpose DIR] [--cellpose3 DIR] [--json OUT]

On the same 256x256 DSB 2018 crops, in one process with ``--threads`` torch
threads, each network in fp32 and bf16 autocast (channels-last,
``inference_mode``, batch 8 unless said), in images/s and seconds per
megapixel:

- nucleiseg, the shipped model: accurate and fast mode, network only, and end
  to end (:func:`nucleiseg.segment`: normalisation, network at the default
  precision, watershed, measurements; one image at a time);
- MONAI ``BasicUNetPlusPlus`` (2-D, 3 -> 3 channels, default features, deep
  supervision; ``pip install 'nucleiseg[benchmark]'``), network only: MONAI
  has no instance post-processing of its own;
- Cellpose 3's network in its ``nuclei`` configuration (``CPnet``, 2 input
  channels: the grey image and zeros; nbase 32-256; 3 outputs: flows y, x and
  cell probability) with random weights: nothing can be downloaded, and speed
  does not depend on the weights. Only its ``resnet_torch.py`` is loaded (from
  ``--cellpose3 DIR``, a ``pip install --target DIR --no-deps "cellpose<4"``):
  Cellpose 3 pins numba, which would downgrade NumPy;
- Cellpose 4's network (``CPSAM``, a ViT-L encoder, the only model of Cellpose 4;
  random weights), batch 1, from ``--cellpose DIR`` (``pip install --target DIR
  --no-deps cellpose fastremap fill_voids natsort segment-anything
  opencv-python-headless``; its dependencies pull torchvision, which PyPI
  builds against a CUDA torch: a stand-in module replaces it for the
  segment_anything parts CPSAM does not use);
- Cellpose's mask reconstruction (Cellpose 4's ``dynamics.compute_masks``:
  200 steps of flow following, then the flow-error check) on flow-shaped input:
  the flows Cellpose's ``masks_to_flows`` makes of nucleiseg's labels of the
  same images, and a cell probability of +/-5 inside/outside them; with the
  Cellpose 3 network's time that is a Cellpose end to end on these images.

- StarDist's 2-D network (the ``2D_versatile_fluo`` architecture, 32 rays,
  grid 2; random weights) under TensorFlow with ``--threads`` intra-op
  threads, from ``--stardist DIR`` (``pip install --target DIR stardist
  tensorflow-cpu``; appended to the path, so the venv's NumPy stays in use).

What cannot be compared is printed with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import ROOT, SIDE, autocast, dsb_crops, machine, monai_network, timed  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
MPIX = SIDE * SIDE / 1e6


def throughput(net: Callable[[torch.Tensor], Any], x: torch.Tensor, bf16: bool, min_time: float,
               min_runs: int = 3) -> float:
    """Images/s of ``net`` on the batch ``x`` (median of timed calls)."""
    def run() -> None:
        with torch.inference_mode(), autocast(bf16):
            net(x)

    return x.shape[0] / statistics.median(timed(run, min_time, min_runs=min_runs))


def stub_torchvision() -> None:
    """A stand-in for torchvision when it cannot load: segment_anything and cellpose.transforms import it for
    parts this benchmark does not use.

    (PyPI's torchvision is built against a CUDA torch; with torch's CPU build its operators fail to register.)
    """
    import types

    try:
        import torchvision  # noqa: F401

        return
    except (ImportError, RuntimeError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torchvision stand-in of benchmarks/peers.py")

    modules = {name: types.ModuleType(name) for name in (
        "torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.transforms",
        "torchvision.transforms.functional", "torchvision.transforms._functional_tensor")}
    for name, module in modules.items():
        module.__getattr__ = lambda attr: unavailable  # any function: fails if called
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
        sys.modules[name] = module


def load_file_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    from nucleiseg.device import reuse_freed_memory
    from nucleiseg.inference import load_model, segment
    from nucleiseg.preprocess import normalize

    reuse_freed_memory()  # as predict and train do on a CPU (NUCLEISEG_MALLOC=system: glibc's own behaviour)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="256x256 DSB crops (a multiple of 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--time", type=float, default=2.0, help="seconds of timing per network configuration")
    parser.add_argument("--cellpose", default=None, help="folder holding Cellpose 4 (pip install --target)")
    parser.add_argument("--cellpose3", default=None, help="folder holding Cellpose 3 (pip install --target)")
    parser.add_argument("--stardist", default=None, help="folder holding StarDist and TensorFlow (pip install --target)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["cpsam", "monai", "cellpose3", "masks"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    say = lambda text="": print(text, flush=True)
    m = machine()
    results: dict[str, Any] = {"machine": m, "threads": args.threads, "images": args.images, "rows": [],
                               "not_compared": {}, "load": [os.getloadavg()[0]]}
    say(f"# peers: {m['cpu']}, {m['cores']} cores, {args.threads} threads, torch {m['torch']}; {m['date']}; "
        f"load {os.getloadavg()[0]:.2f}")

    crops = dsb_crops(args.images, SIDE)
    rgb = torch.from_numpy(np.stack([normalize(c) for c in crops])).contiguous(memory_format=torch.channels_last)
    batch = rgb[:8]

    def add(name: str, ips: float, note: str = "") -> None:
        results["rows"].append({"name": name, "images_per_s": ips, "s_per_mpixel": 1 / (ips * MPIX), "note": note})
        say(f"  {name:58s} {ips:8.2f} images/s {1 / (ips * MPIX):8.2f} s/Mpixel {note}")

    # nucleiseg
    model = load_model(None)
    fast = model.fast_prune_level
    for mode, level in (("accurate", None), ("fast", fast)):
        for bf16 in (False, True):
            ips = throughput(lambda x: model.network.predict_proba(x, prune_level=level), batch, bf16, args.time)
            add(f"nucleiseg {mode}, network, {'bf16' if bf16 else 'fp32'}", ips)
    labels = []
    for mode in ("accurate", "fast"):
        segment(crops[0], model, mode=mode)
        t0 = time.perf_counter()
        for crop in crops:
            result = segment(crop, model, mode=mode)
            if mode == "accurate":
                labels.append(result.labels)
        add(f"nucleiseg {mode}, end to end (segment, precision auto)", len(crops) / (time.perf_counter() - t0),
            "one image at a time")

    # MONAI
    if "monai" not in args.skip:
        try:
            import monai

            peer = monai_network().to(memory_format=torch.channels_last)
            for bf16 in (False, True):
                add(f"MONAI {monai.__version__} BasicUNetPlusPlus, network, {'bf16' if bf16 else 'fp32'}",
                    throughput(lambda x: [torch.sigmoid(h.float()) for h in peer(x)], batch, bf16, args.time))
        except ImportError as exc:
            results["not_compared"]["MONAI"] = f"not installed ({exc.name}); pip install 'nucleiseg[benchmark]'"

    # Cellpose 3 network, nuclei configuration
    grey = torch.stack([batch[:, :3].mean(1), torch.zeros_like(batch[:, 0])], 1).contiguous(
        memory_format=torch.channels_last)
    cp3_ips = None
    source = Path(args.cellpose3 or "") / "cellpose" / "resnet_torch.py"
    if "cellpose3" in args.skip:
        pass
    elif args.cellpose3 and source.is_file():
        resnet = load_file_module("cellpose3_resnet_torch", source)
        torch.manual_seed(0)
        cpnet = resnet.CPnet([2, 32, 64, 128, 256], 3, 3, mkldnn=False, max_pool=True, diam_mean=17.0).eval()
        cpnet = cpnet.to(memory_format=torch.channels_last)
        for bf16 in (False, True):
            ips = throughput(lambda x: cpnet(x)[0], grey, bf16, args.time)
            cp3_ips = ips if not bf16 else cp3_ips
            add(f"Cellpose 3 CPnet (nuclei configuration), network, {'bf16' if bf16 else 'fp32'}", ips, "random weights")
    else:
        results["not_compared"]["Cellpose 3 network"] = "give --cellpose3 DIR (pip install --target DIR --no-deps 'cellpose<4')"

    # Cellpose 4: CPSAM network, and the mask reconstruction
    if args.cellpose:
        sys.path.insert(0, args.cellpose)
    stub_torchvision()
    try:
        import cellpose
        from cellpose import dynamics

        version = getattr(cellpose, "version", None) or "4"
        if "cpsam" not in args.skip:
            from cellpose.vit import CPSAM

            torch.manual_seed(0)
            sam = CPSAM(dtype=torch.float32).eval()
            one = batch[:1].contiguous()
            for bf16 in (False, True):
                add(f"Cellpose {version} CPSAM (ViT-L), network, {'bf16' if bf16 else 'fp32'}, batch 1",
                    throughput(lambda x: sam(x)[0], one, bf16, args.time, min_runs=2), "random weights")
            del sam
        if "masks" not in args.skip and labels:
            flows = [dynamics.masks_to_flows_gpu(lab.astype(np.int32), device=torch.device("cpu"))[0]
                     if lab.max() else np.zeros((2,) + lab.shape, np.float32) for lab in labels]
            probs = [np.where(lab > 0, 5.0, -5.0).astype(np.float32) for lab in labels]
            dynamics.compute_masks(flows[0] * 5, probs[0])  # warm-up
            t0 = time.perf_counter()
            masks = [dynamics.compute_masks(f * 5, p) for f, p in zip(flows, probs)]
            found = [(m[0] if isinstance(m, tuple) else m).max() for m in masks]  # Cellpose 4: the masks alone
            seconds = (time.perf_counter() - t0) / len(labels)
            agree = np.mean([int(n) for n in found]) / max(1.0, np.mean([lab.max() for lab in labels]))
            add(f"Cellpose {version} mask reconstruction (compute_masks)", 1 / seconds,
                f"on flows of nucleiseg's labels; {agree:.0%} of the nuclei recovered")
            if cp3_ips:
                add("Cellpose end to end: CPnet fp32 + compute_masks", 1 / (1 / cp3_ips + seconds),
                    "network batch 8 + masks one at a time")
    except ImportError as exc:
        results["not_compared"]["Cellpose 4"] = f"cannot import ({exc.name}); give --cellpose DIR"

    # StarDist
    if args.stardist:
        sys.path.append(args.stardist)  # after the venv: its own copies of NumPy etc. stay unused
    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import stardist
        from stardist.models import Config2D, StarDist2D

        tf.keras.utils.set_random_seed(0)
        config = Config2D(n_channel_in=1, n_rays=32, grid=(2, 2))  # the architecture of 2D_versatile_fluo
        star = StarDist2D(config, name=None, basedir=None)
        x = batch[:, :3].mean(1, keepdim=True).permute(0, 2, 3, 1).contiguous().numpy()
        star.keras_model(x, training=False)

        def run_star() -> None:
            star.keras_model(x, training=False)

        ips = x.shape[0] / statistics.median(timed(run_star, args.time))
        add(f"StarDist {stardist.__version__} 2-D (TensorFlow {tf.__version__}), network, fp32", ips,
            "random weights; TensorFlow's own threads")
        results["not_compared"]["StarDist end to end"] = (
            "its polygon NMS needs trained weights to do representative work (random weights give "
            "probabilities near 0.5 everywhere), and none can be downloaded")
    except ImportError as exc:
        results["not_compared"]["StarDist"] = (f"cannot import {exc.name}: StarDist's network is a Keras/TensorFlow "
                                               "model (CSBDeep); give --stardist DIR (pip install --target DIR "
                                               "stardist tensorflow-cpu)")
    results["load"].append(os.getloadavg()[0])
    say("\nnot compared: " + "; ".join(f"{k}: {v}" for k, v in results["not_compared"].items()))
    say(f"load average at the start and end: {results['load'][0]:.2f}, {results['load'][1]:.2f}")
    say("\n| 256x256 DSB crops | images/s | s/Mpixel | note |\n| --- | ---: | ---: | --- |")
    for row in results["rows"]:
        say(f"| {row['name']} | {row['images_per_s']:.2f} | {row['s_per_mpixel']:.2f} | {row['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
