"""Inference copies of a network with every BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is an affine map per channel::

    bn(y) = (y - mean) / sqrt(var + eps) * gamma + beta

so ``bn(conv(x))`` is one convolution with weights ``W * s`` (``s = gamma /
sqrt(var + eps)`` per output channel) and bias ``(b - mean) * s + beta``. The
folded network computes the same function (to float32 rounding) with one fewer
pass over every activation tensor: about a third of the memory traffic of a
``Conv -> BN -> ReLU`` block.

The copy is for prediction only: it has no BatchNorm statistics left to train.

Examples
--------
>>> net = UNetPlusPlus(widths=(4, 8, 16)).eval()
>>> fused = fuse_batchnorm(net)
>>> any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
False
>>> x = torch.randn(1, 3, 32, 32)
>>> bool(torch.allclose(fused.predict_proba(x), net.predict_proba(x), atol=1e-5))
True
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .unetplusplus import UNetPlusPlus

__all__ = ["fold_conv_bn", "fuse_batchnorm", "is_fused"]


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) computing ``bn(conv(x))`` of the eval-mode BatchNorm.

    The arithmetic is done in float64 and rounded once to the convolution's dtype.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics (track_running_stats=False)")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm2d has {bn.num_features} features, the convolution {conv.out_channels} outputs")
    dtype, device = conv.weight.dtype, conv.weight.device
    weight = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                        device=device)
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)

    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=device, dtype=dtype,
    )
    fused.weight.copy_((weight * scale.reshape(-1, 1, 1, 1)).to(dtype))
    fused.bias.copy_(((bias - mean) * scale + beta).to(dtype))
    # Keep the memory format the weights had (channels-last stays channels-last).
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
        fused.weight.data = fused.weight.data.contiguous(memory_format=torch.channels_last)
    return fused


def _fuse_sequential(seq: nn.Sequential) -> int:
    """Fold each ``Conv2d`` directly followed by a ``BatchNorm2d`` in ``seq``; returns how many."""
    names = list(seq._modules)
    count = 0
    for first, second in zip(names[:-1], names[1:]):
        conv, bn = seq._modules[first], seq._modules[second]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            seq._modules[first] = fold_conv_bn(conv, bn)
            seq._modules[second] = nn.Identity()
            count += 1
    return count


def fuse_batchnorm(model: UNetPlusPlus | nn.Module, inplace: bool = False) -> UNetPlusPlus | nn.Module:
    """An eval-mode copy of ``model`` with every ``Conv2d -> BatchNorm2d`` pair folded.

    Each pair inside an ``nn.Sequential`` (every :class:`ConvBlock` of a
    :class:`UNetPlusPlus`) becomes a single ``Conv2d`` with bias, and the
    BatchNorm an ``nn.Identity``. The copy is the same class as ``model``, so
    ``forward(x, prune_level=k)`` and ``predict_proba`` work unchanged; its
    eval-mode outputs equal the original's to about 1e-6. Its parameters do
    not require gradients: it is meant for prediction and export.

    Parameters
    ----------
    model : UNetPlusPlus or nn.Module
        Any network; its BatchNorm running statistics are used (as in eval mode).
    inplace : bool
        Fold ``model`` itself instead of a deep copy.

    Returns
    -------
    The folded network, in eval mode.
    """
    fused = model if inplace else copy.deepcopy(model)
    fused.eval()
    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


def is_fused(model: nn.Module) -> bool:
    """Whether ``model`` has no BatchNorm layer left (already folded, or never had one)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
