"""Speed of nucleiseg.metrics on realistic sizes (CPU only).

Run from the repository root:

    .venv/bin/python benchmarks/metrics_speed.py

Cases
-----
- ``instance_scores`` on a 1000 x 1000 label image with 1,000 nuclei against a
  perturbed prediction (shifted/resized nuclei, ~5 % missed, ~30 false
  positives, non-consecutive label values);
- ``pixel_scores`` (with AUC) on the same image;
- ``roc_auc`` on 1e7 pixels, histogram and exact methods.

Prints the median of several runs and the peak NumPy memory (tracemalloc).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc

import numpy as np
from skimage.draw import disk

from nucleiseg.metrics import instance_scores, pixel_scores, roc_auc


def make_pair(size: int = 1000, n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Truth with exactly ``n`` disjoint nuclei on a jittered grid, and a perturbed prediction."""
    rng = np.random.default_rng(seed)
    shape = (size, size)
    per_side = int(np.ceil(np.sqrt(n)))
    step = size / per_side
    truth = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    pred_values = rng.permutation(np.arange(1, 40 * n))[: n + 100] * 7 + 3  # sparse, shuffled
    k = 0
    for i in range(per_side):
        for j in range(per_side):
            if k == n:
                break
            r = (i + 0.5) * step + rng.uniform(-2, 2)
            c = (j + 0.5) * step + rng.uniform(-2, 2)
            rad = rng.uniform(6, step / 2 - 3)
            k += 1
            truth[disk((r, c), rad, shape=shape)] = k
            if rng.random() < 0.95:
                pred[disk((r + rng.integers(-2, 3), c + rng.integers(-2, 3)),
                          rad * rng.uniform(0.8, 1.15), shape=shape)] = pred_values[k]
    for m in range(30):  # false positives in the gaps between grid cells
        r, c = rng.integers(0, per_side, size=2) * step
        pred[disk((r, c), 3, shape=shape)] = pred_values[n + 1 + m]
    assert len(np.unique(truth)) - 1 == n
    return truth, pred


def timed(fn, repeat: int) -> tuple[float, object]:
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def peak_mb(fn) -> float:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"numpy {np.__version__}, python {platform.python_version()}")

    truth, pred = make_pair()
    t, s = timed(lambda: instance_scores(truth, pred), args.repeat)
    print(f"instance_scores 1000x1000, {s.n_true} true / {s.n_pred} predicted nuclei: "
          f"median {t * 1000:.1f} ms (score {s.score:.4f}, AP50 {s.ap50:.4f}), "
          f"peak {peak_mb(lambda: instance_scores(truth, pred)):.0f} MiB")

    rng = np.random.default_rng(1)
    mask_t = truth > 0
    prob = np.clip((pred > 0) * 0.7 + rng.normal(0.15, 0.15, pred.shape), 0, 1).astype(np.float32)
    t, sc = timed(lambda: pixel_scores(mask_t, prob > 0.5, prob), args.repeat)
    print(f"pixel_scores 1000x1000 with AUC: median {t * 1000:.1f} ms (F1 {sc['f1']:.4f}, AUC {sc['auc']:.4f})")

    big_t = rng.random((2500, 4000)) < 0.3
    big_p = np.clip(rng.normal(0.4 + 0.2 * big_t, 0.2), 0, 1).astype(np.float32)
    rep = max(1, args.repeat // 2)
    t_h, auc_h = timed(lambda: roc_auc(big_t, big_p), rep)
    t_e, auc_e = timed(lambda: roc_auc(big_t, big_p, method="exact"), rep)
    print(f"roc_auc 1e7 pixels: histogram {t_h:.2f} s (peak {peak_mb(lambda: roc_auc(big_t, big_p)):.0f} MiB), "
          f"exact {t_e:.2f} s; |difference| = {abs(auc_h - auc_e):.2e}")


if __name__ == "__main__":
    main()
