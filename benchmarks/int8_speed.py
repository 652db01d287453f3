"""int8 as a lever: ONNX Runtime's dynamic and static (QDQ, per-channel) quantisation against PyTorch's default.

Run from the repository root (several minutes on 2 cores):

    .venv/bin/python benchmarks/int8_speed.py [--val 24] [--threads N] [--json OUT]

The shipped model, accurate mode, exported by :func:`nucleiseg.export.export_onnx`
(fp32), then quantised with ``onnxruntime.quantization``:

- dynamic: weights int8, activations quantised at run time (``quantize_dynamic``);
- static: QDQ format, int8 weights per channel, uint8 activations calibrated
  (min-max) on 16 256x256 crops of *training* images (``quantize_static``).

Measured in one process with ``--threads`` threads: network-only images/s
(256x256, batch 8) of PyTorch at the default precision (bf16 where native),
ONNX Runtime fp32 and each int8 model; then each runs :func:`nucleiseg.segment`'s
whole path (tiling, watershed with the model's thresholds, measurements) on the
first ``--val`` validation images of the prepared cache, giving the DSB score
against the annotations and the end-to-end seconds. The issue's rule: ship int8
only if the DSB moves by <= 0.005 and it is >= 1.3x faster end to end than the
default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import ROOT, SIDE, dsb_crops, machine, network_throughput, timed  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
CACHES = [ROOT / "cache" / "dsb2018", ROOT.parent / "main" / "cache" / "dsb2018"]


class OrtNetwork(torch.nn.Module):
    """An ONNX Runtime session in the place of the network (``predict_proba``), for nucleiseg's tiling."""

    def __init__(self, session, network):
        super().__init__()
        self.session, self.config, self.depth = session, network.config, network.depth
        self._device_anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def predict_proba(self, x: torch.Tensor, prune_level: int | None = None) -> torch.Tensor:
        from nucleiseg.models.unetplusplus import pad_to_multiple

        h, w = x.shape[-2:]
        padded = pad_to_multiple(x.float(), 2**self.depth)  # the graph takes multiples of 16, as the network
        (out,) = self.session.run(None, {"image": np.ascontiguousarray(padded.numpy())})
        return torch.from_numpy(out[..., :h, :w])


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from nucleiseg.export import export_onnx
    from nucleiseg.inference import load_model, segment
    from nucleiseg.io import read_image, read_labels
    from nucleiseg.metrics import dsb_score
    from nucleiseg.preprocess import normalize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", type=int, default=24, help="validation images scored")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--time", type=float, default=3.0, help="seconds of timing per network")
    parser.add_argument("--cache", default=None, help="prepared DSB cache (default: cache/dsb2018)")
    parser.add_argument("--dynamic-end-to-end", action="store_true",
                        help="also score the dynamic model (its ConvInteger runs far slower than fp32 on ONNX Runtime's CPU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    say = lambda text="": print(text, flush=True)
    results: dict[str, Any] = {"machine": machine(), "threads": args.threads, "load": [os.getloadavg()[0]]}
    say(f"# int8: {results['machine']['cpu']}, {args.threads} threads; load {os.getloadavg()[0]:.2f}")

    cache = Path(args.cache) if args.cache else next((c for c in CACHES if (c / "split.csv").is_file()), None)
    if cache is None:
        raise SystemExit("no prepared cache: nucleiseg prepare ../shared/data/dsb2018/stage1_train --out cache/dsb2018")
    split = pd.read_csv(cache / "split.csv")
    val_ids = split.loc[split["split"] == "val", "image_id"].tolist()[: args.val]
    train_ids = split.loc[split["split"] == "train", "image_id"].tolist()

    model = load_model(None)
    tmp = Path(tempfile.mkdtemp(prefix="nucleiseg-int8-"))
    fp32 = export_onnx(model, tmp / "fp32.onnx", mode="accurate")
    calib = [normalize(c)[None] for c in dsb_crops(16, SIDE)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"image": x}

    t0 = time.perf_counter()
    quantize_dynamic(str(fp32), str(tmp / "dynamic.onnx"), weight_type=QuantType.QInt8)
    say(f"dynamic quantisation: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    quantize_static(str(fp32), str(tmp / "static.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    say(f"static quantisation (16 calibration crops): {time.perf_counter() - t0:.1f} s")
    del train_ids

    variants: dict[str, Any] = {"torch (default precision)": model}
    x8 = np.stack([normalize(c) for c in dsb_crops(8, SIDE)])
    network: dict[str, float] = {}
    network["torch (default precision)"] = network_throughput(model.network, None, True, True, True, args.time)
    for name in ("fp32", "dynamic", "static"):
        try:
            session = ort_session(tmp / f"{name}.onnx", args.threads)
            session.run(None, {"image": x8[:1]})
        except Exception as exc:  # an operator ONNX Runtime's CPU provider lacks for this quantisation
            say(f"ONNX Runtime {name}: cannot run ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            results[f"ort_{name}_error"] = str(exc)[:500]
            continue
        if name == "dynamic":  # ConvInteger: minutes per batch of 8 on 2 cores; one image, one timed call
            x1 = x8[:1]
            network[f"ONNX Runtime {name}"] = 1 / min(timed(lambda: session.run(None, {"image": x1}), 0.0,
                                                            min_runs=1, warmup=0))
        else:
            network[f"ONNX Runtime {name}"] = 8 / statistics.median(
                timed(lambda: session.run(None, {"image": x8}), args.time))
        if name != "dynamic" or args.dynamic_end_to_end:
            variants[f"ONNX Runtime {name}"] = dataclasses.replace(model, network=OrtNetwork(session, model.network))
    for name, ips in network.items():
        say(f"  network only, accurate, batch 8: {name:28s} {ips:7.2f} images/s")
    results["network_images_per_s"] = network

    images = [read_image(cache / "images" / f"{i}.png") for i in val_ids]
    truth = [read_labels(cache / "labels" / f"{i}.tif") for i in val_ids]
    scores: dict[str, Any] = {}
    for name, variant in variants.items():
        precision = "auto" if name.startswith("torch") else "fp32"
        segment(images[0], variant, mode="accurate", precision=precision)
        t0 = time.perf_counter()
        dsb = [dsb_score(t, segment(im, variant, mode="accurate", precision=precision).labels)
               for im, t in zip(images, truth)]
        seconds = time.perf_counter() - t0
        scores[name] = {"dsb": float(np.mean(dsb)), "seconds": seconds}
        say(f"  end to end on {len(images)} validation images: {name:28s} DSB {np.mean(dsb):.4f}, {seconds:6.1f} s")
    base = scores["torch (default precision)"]
    for name, s in scores.items():
        s["dsb_change"] = s["dsb"] - base["dsb"]
        s["speedup"] = base["seconds"] / s["seconds"]
        s["ships"] = abs(s["dsb_change"]) <= 0.005 and s["speedup"] >= 1.3
    results["end_to_end"] = scores
    results["load"].append(os.getloadavg()[0])
    say("\n| accurate mode | network images/s (256², batch 8) | DSB (first %d val images) | DSB change | end to end, s | speed-up | ships? |"
        % len(images))
    say("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, s in scores.items():
        say(f"| {name} | {network.get(name, float('nan')):.2f} | {s['dsb']:.4f} | {s['dsb_change']:+.4f} | "
            f"{s['seconds']:.1f} | {s['speedup']:.2f}x | {'yes' if s['ships'] and not name.startswith('torch') else 'no'} |")
    say(f"load average at the start and end: {results['load'][0]:.2f}, {results['load'][1]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
