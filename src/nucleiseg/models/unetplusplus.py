"""UNet++ (Zhou et al., 2018): a U-Net with nested, dense skip pathways.

Node ``X(i, j)`` sits at resolution level ``i`` (``i`` poolings down) and column
``j``. Column 0 is the encoder. Every later node fuses everything before it on
its own level with the upsampled node below::

    X(i, j) = conv( [X(i, 0), ..., X(i, j-1), up(X(i+1, j-1))] )

On a CPU the convolution of the concatenation is computed as the sum of each
part's convolution (:meth:`ConvBlock.forward_parts`): the same function and
weights, without the memory traffic of building the concatenation.

One 1×1 head reads each top node ``X(0, 1) ... X(0, depth)`` (deep supervision).
Head ``k`` needs only the nodes with ``i + j <= k``, so pruning to head ``k``
(the *fast* mode) skips the rest of the network instead of discarding it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Nearest-neighbour upsampling: as accurate here as bilinear and cheaper on a CPU.
UPSAMPLE = "nearest"


@dataclass
class UNetPlusPlusConfig:
    """Everything needed to rebuild a :class:`UNetPlusPlus`.

    Parameters
    ----------
    in_channels : int
        Channels of the input image (3: RGB).
    out_channels : int
        Channels each head predicts (1 for a mask; 3 for body, contour, touch).
    widths : tuple of int
        Feature channels per level, top to bottom; ``len(widths) - 1`` poolings.
    """

    in_channels: int = 3
    out_channels: int = 3
    widths: tuple[int, ...] = field(default=(16, 32, 64, 128, 256))

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) < 2 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths needs at least two positive entries, got {self.widths}")
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("in_channels and out_channels must be positive")

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    def to_dict(self) -> dict:
        return {"architecture": "unetplusplus", **asdict(self), "widths": list(self.widths)}


def _sum_of_parts(x: torch.Tensor) -> bool:
    """Whether dense nodes sum per-input convolutions (:meth:`ConvBlock.forward_parts`).

    Only for eager runs on a CPU, where it is measured to be faster. A GPU
    (not measured here) keeps one wide convolution, and so does an exported
    graph: ONNX runtimes, GPU ones included, get the textbook concatenation.
    """
    exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
    return x.device.type == "cpu" and not exporting


class ConvBlock(nn.Sequential):
    """Two 3×3 convolutions, each followed by BatchNorm and ReLU."""

    def forward_parts(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``self(torch.cat(parts, dim=1))``, without building the concatenation.

        A convolution of concatenated inputs is the sum of each input's
        convolution with its slice of the weight's input channels. On a CPU
        this saves copying every earlier node into each new concatenation, and
        the backward pass gets dense gradients instead of strided slices of
        one: training runs ~28% more images/s (``benchmarks/train_speed.py``).
        """
        conv = self[0]
        out = None
        start = 0
        for part in parts:
            stop = start + part.shape[1]
            bias = conv.bias if start == 0 else None  # a BatchNorm-folded block has one
            y = F.conv2d(part, conv.weight[:, start:stop], bias, padding=conv.padding)
            out = y if out is None else out + y
            start = stop
        for layer in list(self)[1:]:
            out = layer(out)
        return out

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetPlusPlus(nn.Module):
    """Nested U-Net with deep supervision and prunable inference.

    Parameters
    ----------
    in_channels : int, default 3
        Channels of the input image.
    out_channels : int, default 3
        Channels predicted by each head.
    widths : sequence of int, default (16, 32, 64, 128, 256)
        Feature channels per level; the depth (number of poolings) is
        ``len(widths) - 1``.

    Examples
    --------
    >>> net = UNetPlusPlus(widths=(4, 8, 16))
    >>> heads = net(torch.zeros(1, 3, 32, 32))
    >>> len(heads), tuple(heads[0].shape)
    (2, (1, 3, 32, 32))
    >>> net.predict_proba(torch.zeros(1, 3, 30, 45), prune_level=1).shape
    torch.Size([1, 3, 30, 45])
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, widths=(16, 32, 64, 128, 256)):
        super().__init__()
        self.config = UNetPlusPlusConfig(in_channels, out_channels, tuple(widths))
        w = self.config.widths
        depth = self.config.depth
        nodes = {}
        for i in range(depth + 1):
            nodes[f"x{i}_0"] = ConvBlock(in_channels if i == 0 else w[i - 1], w[i])
            for j in range(1, depth - i + 1):
                nodes[f"x{i}_{j}"] = ConvBlock(j * w[i] + w[i + 1], w[i])
        self.nodes = nn.ModuleDict(nodes)
        self.heads = nn.ModuleList(nn.Conv2d(w[0], out_channels, 1) for _ in range(depth))

    @property
    def depth(self) -> int:
        return self.config.depth

    def forward(self, x: torch.Tensor, prune_level: int | None = None) -> list[torch.Tensor]:
        """Logits of heads 1..k, where k is ``prune_level`` (default: all heads).

        Only nodes with ``i + j <= k`` are computed. ``x``'s height and width
        must be multiples of ``2**k``; :meth:`predict_proba` pads for you.
        """
        k = self.depth if prune_level is None else int(prune_level)
        if not 1 <= k <= self.depth:
            raise ValueError(f"prune_level must be in 1..{self.depth}, got {prune_level}")
        factor = 2**k
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"input height and width must be multiples of {factor}, got {tuple(x.shape[-2:])}")
        sum_of_parts = _sum_of_parts(x)
        # levels[i] holds X(i, 0), X(i, 1), ... as they are computed.
        levels: list[list[torch.Tensor]] = [[self.nodes["x0_0"](x)]]
        for i in range(1, k + 1):
            levels.append([self.nodes[f"x{i}_0"](F.max_pool2d(levels[i - 1][0], 2))])
        for j in range(1, k + 1):
            for i in range(k - j + 1):
                node = self.nodes[f"x{i}_{j}"]
                parts = [*levels[i][:j], F.interpolate(levels[i + 1][j - 1], scale_factor=2.0, mode=UPSAMPLE)]
                if sum_of_parts:
                    levels[i].append(node.forward_parts(parts))
                else:
                    levels[i].append(node(torch.cat(parts, dim=1)))
        return [self.heads[j - 1](levels[0][j]) for j in range(1, k + 1)]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, prune_level: int | None = None) -> torch.Tensor:
        """Probabilities ``(N, out_channels, H, W)`` for any input size.

        Accurate mode (``prune_level=None``) averages the sigmoid of all heads;
        fast mode (``prune_level=k``) computes and returns head ``k`` alone.
        The input is padded by reflection to a multiple of ``2**depth`` and the
        output cropped back.
        """
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, 2**self.depth)
        # On a CPU one image at a time is 25-35% faster than a batch: the dense skip pathways'
        # activations stay in cache. GPUs prefer the whole batch.
        chunk = 1 if padded.device.type == "cpu" else len(padded)
        outputs = []
        for part in torch.split(padded, max(1, chunk)):
            outputs.append(heads_to_probabilities(self(part, prune_level=prune_level), pruned=prune_level is not None))
        probs = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return probs[..., :h, :w]


def heads_to_probabilities(heads: list[torch.Tensor], pruned: bool) -> torch.Tensor:
    """Accurate mode: the mean of all heads' sigmoids; pruned (fast) mode: the last head's sigmoid."""
    if pruned:
        return torch.sigmoid(heads[-1].float())
    return torch.stack([torch.sigmoid(t.float()) for t in heads]).mean(dim=0)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last two axes at the bottom/right up to a multiple of ``multiple``."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not pad_h and not pad_w:
        return x
    # Reflection needs the pad to be smaller than the side; tiny inputs fall back to replication.
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
