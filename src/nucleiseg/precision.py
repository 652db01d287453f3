"""Which arithmetic the network runs in: one rule for training and prediction.

bf16 autocast where the processor or GPU runs it natively (``precision="auto"``),
else fp32. Imports PyTorch only; prediction uses it without loading the
training machinery.

Examples
--------
>>> import torch
>>> resolve_precision("fp32", torch.device("cpu")) is None
True
>>> resolve_precision("bf16", torch.device("cpu"))
torch.bfloat16
"""

from __future__ import annotations

import torch

__all__ = ["bf16_supported", "resolve_precision"]


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively (CPU with AVX-512 BF16/AMX, or a bf16 GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16" or bf16_supported(device):
        return torch.bfloat16
    return None
