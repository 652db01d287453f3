"""Where a network runs and in which precision: one rule for training, prediction and export.

:func:`resolve_device` turns a device name (``"auto"``, ``"cpu"``, ``"cuda"``,
``"cuda:1"``, ``"mps"``) into a :class:`torch.device` that exists on this
machine, or says in one line why not; :func:`resolve_precision` picks the
autocast dtype for a precision setting on a device; :func:`reuse_freed_memory`
keeps a CPU network's large activations from being faulted in afresh on every
forward pass, and :func:`release_freed_memory` hands it back once a large image is done;
:func:`share_threads` divides PyTorch's CPU threads among networks run side by side.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator

import torch

from .errors import NucleisegError
from .options import DEVICES, PRECISIONS, is_device_name

__all__ = ["DEVICES", "PRECISIONS", "bf16_supported", "resolve_device", "resolve_precision", "release_freed_memory",
           "reuse_freed_memory", "share_threads"]

#: Freed memory the C allocator keeps for reuse before it gives the top of its heap back to the system. Without
#: :func:`reuse_freed_memory`, glibc maps every block over 32 MiB on its own and unmaps it when freed, so each
#: large activation of a CPU forward pass (a 976² tile: 61 MB per width-32 feature map in bf16) is faulted in
#: page by page again on every pass: the accurate network cost 2.35–2.75 s/Mpixel on 1024² tiles, and
#: 1.23–2.03 once freed memory is reused, about what batches of 256² images cost either way (2-core VM,
#: interleaved rounds, eleventh session, ``benchmarks/allocator_speed.py``). Reuse costs peak memory:
#: ``predict`` of an 8000² image peaked at 3.59 GiB against 2.98 (``benchmarks/tiling_memory.py``).
MALLOC_KEEP_BYTES = 1 << 30

#: ``NUCLEISEG_MALLOC=system`` leaves the C allocator as it is.
MALLOC_ENV = "NUCLEISEG_MALLOC"

_malloc_tuned: bool | None = None



def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The :class:`torch.device` meant by ``name``, checked to exist here.

    Parameters
    ----------
    name : str or torch.device
        ``"auto"`` (the first CUDA GPU if there is one, else the CPU), ``"cpu"``,
        ``"cuda"`` / ``"cuda:N"``, ``"mps"`` (Apple GPUs), or a device.

    Raises
    ------
    NucleisegError
        An unknown name, or a device this machine or this torch build lacks.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    nucleiseg.errors.NucleisegError: unknown device 'tpu': nucleiseg runs on 'auto', 'cpu', 'cuda' (or 'cuda:N') or 'mps'
    """
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = text.partition(":")
    if not is_device_name(text):
        raise NucleisegError(f"unknown device {str(name)!r}: nucleiseg runs on 'auto', 'cpu', 'cuda' (or 'cuda:N') or 'mps'")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise NucleisegError("device 'mps' requested but this machine or torch build has no Apple GPU (MPS) support; "
                                 "use device 'cpu' or 'auto'")
        return torch.device("mps")
    if torch.version.cuda is None:
        raise NucleisegError(f"device {text!r} requested but this torch ({torch.__version__}) is a CPU-only build; "
                             "use device 'cpu' or 'auto', or install a CUDA build of torch")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise NucleisegError(f"device {text!r} requested but no CUDA GPU is visible (check nvidia-smi and "
                             "CUDA_VISIBLE_DEVICES); use device 'cpu' or 'auto'")
    if index and int(index) >= count:
        raise NucleisegError(f"device {text!r} requested but this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}")
    return torch.device(text)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively (CPU with AVX-512 BF16/AMX, or a bf16 GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``"auto"`` is bf16 where the device runs it natively, else fp32; ``"bf16"``
    and ``"fp32"`` are taken as given.

    Raises
    ------
    NucleisegError
        ``precision`` is not one of :data:`PRECISIONS`.

    Examples
    --------
    >>> resolve_precision("fp32", torch.device("cpu")) is None
    True
    >>> resolve_precision("bf16", torch.device("cpu"))
    torch.bfloat16
    """
    if precision not in PRECISIONS:
        raise NucleisegError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16" or bf16_supported(device):
        return torch.bfloat16
    return None


def reuse_freed_memory() -> bool:
    """Have the C allocator keep freed memory for reuse instead of returning large blocks to the system.

    glibc serves every allocation over 32 MiB with its own ``mmap`` and returns it when freed, so a CPU forward
    pass over a large tile pays a page fault for every 4 kB of every large activation, every time. After this
    call, large blocks come from the heap and up to :data:`MALLOC_KEEP_BYTES` of freed memory stays there for
    the next pass (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, ...)``). Called once per process
    before a network runs on the CPU (prediction and training); later calls do nothing. It changes the whole
    process's allocator: the price is a higher peak of resident memory on a large image (fragmentation), and
    freed memory kept until :func:`release_freed_memory`, which prediction calls after each large image.

    Returns
    -------
    bool
        Whether the allocator was tuned: False off glibc (macOS, Windows, musl), or when the environment
        variable ``NUCLEISEG_MALLOC`` is ``system``.

    Examples
    --------
    >>> reuse_freed_memory()              # on Linux with glibc  # doctest: +SKIP
    True
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        if os.environ.get(MALLOC_ENV, "").strip().lower() != "system" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
            _malloc_tuned = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, MALLOC_KEEP_BYTES))
    return _malloc_tuned


def release_freed_memory() -> None:
    """Give the memory freed since :func:`reuse_freed_memory` back to the system (``malloc_trim(0)``).

    Called after a large image, so that a long-lived process (napari, a Dask worker with a memory limit) does
    not keep the heap of its largest image while it idles or handles small ones. Does nothing when the
    allocator was not tuned.
    """
    if _malloc_tuned:
        ctypes.CDLL(None).malloc_trim(0)


@contextlib.contextmanager
def share_threads(lanes: int) -> Iterator[int]:
    """PyTorch's CPU threads divided among ``lanes`` threads that each run a network, for the ``with`` block.

    Yields how many threads each lane gets: ``torch.get_num_threads() // lanes``, at least 1. A thread started
    inside the block runs its networks on that many threads (PyTorch sets each new thread's OpenMP team from
    the process's setting on its first parallel operator); the calling thread's setting is restored after.
    The networks' results do not depend on their thread count (bit for bit, tested).

    Examples
    --------
    >>> before = torch.get_num_threads()
    >>> with share_threads(2) as each:
    ...     each == max(1, before // 2)
    True
    >>> torch.get_num_threads() == before
    True
    """
    total = torch.get_num_threads()
    each = max(1, total // max(1, lanes))
    torch.set_num_threads(each)
    try:
        yield each
    finally:
        torch.set_num_threads(total)
