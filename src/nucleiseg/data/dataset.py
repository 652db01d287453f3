"""PyTorch datasets over a prepared cache (see docs/architecture.md)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ImageReadError, NucleisegError
from ..preprocess import normalize
from .augment import train_transform
from .cache import Cache
from .targets import make_targets

#: How much more often each image kind is drawn than its share (the 2018
#: winners oversampled the rare kinds two to four times).
DEFAULT_KIND_WEIGHTS = {"fluorescence": 1.0, "tissue": 2.0, "brightfield": 4.0}


def load_cached_image(cache_dir: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit RGB image and uint16 instance labels of one cached image.

    Raises
    ------
    NucleisegError
        A file of the image missing or damaged (named), or the two of different sizes,
        with the command that rebuilds the cache.
    """
    cache = Cache(Path(cache_dir))
    rebuild = f"the cache is damaged: run 'nucleiseg prepare DATA_DIR --out {cache.path} --force' to rebuild it"
    try:
        image, labels = cache.image(image_id), cache.labels(image_id)
    except ImageReadError as exc:
        raise NucleisegError(f"{exc.message}; {rebuild}", exc.path) from None
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise NucleisegError(f"is not the 8-bit RGB image prepare writes; {rebuild}", cache.image_path(image_id))
    if labels.shape != image.shape[:2]:
        raise NucleisegError(f"labels of {labels.shape[0]}x{labels.shape[1]} pixels for an image of "
                             f"{image.shape[0]}x{image.shape[1]}; {rebuild}", cache.labels_path(image_id))
    return image, labels


class CropDataset(Dataset):
    """Random augmented crops for training, deterministic given a seed.

    Each item is drawn with ``transform.set_random_seed(seed)`` where the seed
    comes from the sampler, so a resumed training sees the same crops as an
    uninterrupted one whatever the number of loader workers.

    Parameters
    ----------
    images, labels : sequence of ndarray
        8-bit RGB images and their instance labels, kept in memory.
    crop : int
        Crop side.
    strength : float
        Photometric augmentation strength (see :func:`train_transform`).
    stain : float
        Probability of the H&E stain jitter on stained images (see :func:`train_transform`).
    threads : int
        Threads that prepare the crops of one batch together (``__getitems__``);
        the crops are the same whatever the number.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], crop: int = 256, strength: float = 1.0,
                 threads: int = 1, stain: float = 0.0):
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = list(images)
        self.labels = list(labels)
        self.crop, self.strength, self.stain = crop, strength, stain
        self.threads = max(1, int(threads))
        self._local = threading.local()  # one transform per thread: each reseeds its own generators
        self._pool: ThreadPoolExecutor | None = None

    @property
    def transform(self):
        if not hasattr(self._local, "transform"):
            self._local.transform = train_transform(self.crop, self.strength, self.stain)
        return self._local.transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item
        transform = self.transform
        transform.set_random_seed(int(seed))
        out = transform(image=self.images[index], mask=self.labels[index])
        x = torch.from_numpy(normalize(out["image"]))
        y = torch.from_numpy(make_targets(out["mask"]))
        return x, y

    def __getitems__(self, items: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch, over ``threads`` threads (OpenCV and NumPy release the GIL)."""
        if self.threads == 1 or len(items) == 1:
            return [self[item] for item in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="crops")
        return list(self._pool.map(self.__getitem__, items))

    def __getstate__(self) -> dict:
        # loader worker processes get a copy without the thread pool and thread-local state
        state = dict(self.__dict__)
        state["_local"], state["_pool"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


class EpochSampler(torch.utils.data.Sampler):
    """Draws ``(index, seed)`` pairs for one epoch, weighted, seeded by epoch.

    Every rank of a distributed run builds the same list and keeps its own
    stride of it, as ``DistributedSampler`` does.
    """

    def __init__(self, weights: Sequence[float], samples_per_epoch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw the pairs of ``epoch``; skip this rank's first ``start`` of them (a resumed epoch's trained part).

        The length stays the whole epoch's, so a loader's number of batches (and whether it drops
        the last incomplete one) does not change when an epoch is resumed.
        """
        self.epoch, self.start = int(epoch), int(start)

    def _draw(self) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        p = self.weights / self.weights.sum()
        indices = rng.choice(len(p), size=self.samples_per_epoch, replace=True, p=p)
        seeds = rng.integers(0, 2**31 - 1, size=self.samples_per_epoch)
        pairs = list(zip(indices.tolist(), seeds.tolist()))
        return pairs[self.rank :: self.world_size][self.start :]

    def __iter__(self):
        return iter(self._draw())

    def __len__(self) -> int:
        return len(range(self.rank, self.samples_per_epoch, self.world_size))


def sampling_weights(kinds: Sequence[str], sizes: Sequence[tuple[int, int]], kind_weights: dict[str, float] | None = None, crop: int = 256) -> np.ndarray:
    """Per-image draw weights: the kind's weight times sqrt(area in crops), capped at 2.

    Large images hold more distinct crops, so they are drawn a little more
    often; rare kinds are oversampled as the 2018 winners did.
    """
    kind_weights = DEFAULT_KIND_WEIGHTS if kind_weights is None else kind_weights
    out = []
    for kind, (h, w) in zip(kinds, sizes):
        area_in_crops = max(1.0, h * w / float(crop * crop))
        out.append(kind_weights.get(kind, 1.0) * min(2.0, np.sqrt(area_in_crops)))
    return np.asarray(out)
