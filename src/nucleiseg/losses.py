"""BCE + Dice loss over every deep-supervision head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``1 - Dice`` per channel, from logits, computed over the whole batch.

    Returns a tensor of shape ``(C,)``. Summing over the batch (rather than per
    image) keeps crops without nuclei from dominating the gradient.
    """
    prob = torch.sigmoid(logits)
    dims = (0, 2, 3)
    intersection = (prob * target).sum(dims)
    total = prob.sum(dims) + target.sum(dims)
    return 1.0 - (2.0 * intersection + eps) / (total + eps)


class DeepSupervisionLoss(nn.Module):
    """Weighted BCE + Dice on each head, averaged over heads.

    Parameters
    ----------
    bce_weight, dice_weight : float
        Weights of the two terms.
    channel_weights : sequence of float, optional
        Weight of each output channel (e.g. body, contour, touch); default equal.
    head_weights : sequence of float, optional
        Weight of each head, shallowest first; default equal (the UNet++ paper).

    Examples
    --------
    >>> loss = DeepSupervisionLoss()
    >>> heads = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)]
    >>> # all-zero logits, empty target: BCE = log 2, Dice = 1 - 1/(0.5 * 128 + 1)
    >>> round(float(loss(heads, torch.zeros(2, 3, 8, 8))), 3)
    1.678
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        channel_weights: Sequence[float] | None = None,
        head_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.channel_weights = None if channel_weights is None else list(channel_weights)
        self.head_weights = None if head_weights is None else list(head_weights)

    def forward(self, heads: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        n_channels = target.shape[1]
        cw = torch.ones(n_channels) if self.channel_weights is None else torch.tensor(self.channel_weights)
        if cw.numel() != n_channels:
            raise ValueError(f"{cw.numel()} channel weights for {n_channels} channels")
        cw = (cw / cw.sum()).to(target.device)
        hw = [1.0] * len(heads) if self.head_weights is None else self.head_weights[: len(heads)]
        total = 0.0
        for weight, logits in zip(hw, heads):
            logits = logits.float()
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(0, 2, 3))
            dice = soft_dice_loss(logits, target)
            total = total + weight * ((self.bce_weight * bce + self.dice_weight * dice) * cw).sum()
        return total / sum(hw)
