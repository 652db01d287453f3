"""Where a network runs and in which precision: one rule for training, prediction and export.

:func:`resolve_device` turns a device name (``"auto"``, ``"cpu"``, ``"cuda"``,
``"cuda:1"``, ``"mps"``) into a :class:`torch.device` that exists on this
machine, or says in one line why not; :func:`resolve_precision` picks the
autocast dtype for a precision setting on a device.
"""

from __future__ import annotations

import torch

from .errors import NucleisegError
from .options import DEVICES, PRECISIONS, is_device_name

__all__ = ["DEVICES", "PRECISIONS", "bf16_supported", "resolve_device", "resolve_precision"]



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
