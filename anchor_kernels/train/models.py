"""CIFAR ResNet-18 (or a small CNN) with a projection head and a linear classifier (DESIGN
section 4).

The CIFAR variant (He et al. 2016 as adapted by the Madry / TRADES / SupContrast code): a 3x3
stride-1 stem and no max-pool, four stages of two BasicBlocks at 64, 128, 256, 512 channels
(times ``width``), global average pooling to a 512-d feature. Projection head
512 -> 512 -> ReLU -> 128 (SupContrast's ``head='mlp'``), classifier 512 -> classes.
``small-cnn`` is three 3x3 conv-BN-ReLU layers at 32, 64, 128 channels (times ``width``) with
two 2x2 max-pools, for small images such as 8 x 8 digits. Both take any number of input
channels and any image size (global pooling), so the model follows the data.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Backbone(nn.Module):
    """x (B, C, H, W) in [0, 1] -> features (B, feature_dim), feature_dim = 512 * width."""

    def __init__(self, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        chans = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True))
        stages, c_in = [], chans[0]
        for i, c in enumerate(chans):
            stages.append(nn.Sequential(BasicBlock(c_in, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.feature_dim = chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        # A mean rather than adaptive_avg_pool2d: same result, and its CUDA backward is
        # deterministic (needed by --deterministic).
        return self.stages(self.stem(x)).mean(dim=(2, 3))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNNBackbone(nn.Module):
    """x (B, C, H, W) in [0, 1] -> features (B, feature_dim), feature_dim = 128 * width:
    conv 32, max-pool, conv 64, max-pool, conv 128, global average pool (H, W >= 4)."""

    def __init__(self, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        chans = [max(1, round(c * width)) for c in (32, 64, 128)]
        self.layers = nn.Sequential(
            *_conv_bn_relu(in_channels, chans[0]), nn.MaxPool2d(2),
            *_conv_bn_relu(chans[0], chans[1]), nn.MaxPool2d(2),
            *_conv_bn_relu(chans[1], chans[2]))
        self.feature_dim = chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).mean(dim=(2, 3))


BACKBONES = {"resnet18": ResNet18Backbone, "small-cnn": SmallCNNBackbone}


class AnchorNet(nn.Module):
    """Backbone + projection head + classifier.

    ``forward(x)`` returns the logits (B, classes), so attacks and evaluation see a plain
    classifier; ``forward(x, with_embedding=True)`` returns (logits, embedding (B, embed_dim)).
    Both go through ``forward`` so that DistributedDataParallel's hooks see every call.
    With ``freeze_backbone()`` (phase 2) the backbone's BatchNorm stays in eval mode.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, embed_dim: int = 128,
                 in_channels: int = 3, model: str = "resnet18"):
        super().__init__()
        if model not in BACKBONES:
            raise ValueError(f"model must be one of {', '.join(BACKBONES)}, got {model!r}")
        self.backbone = BACKBONES[model](width, in_channels)
        d = self.backbone.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, embed_dim))
        self.classifier = nn.Linear(d, num_classes)
        self.backbone_frozen = False

    def forward(self, x: Tensor, with_embedding: bool = False):
        feats = self.backbone(x)
        logits = self.classifier(feats)
        if with_embedding:
            return logits, self.head(feats)
        return logits

    def freeze_backbone(self) -> None:
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.head.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "AnchorNet":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self
