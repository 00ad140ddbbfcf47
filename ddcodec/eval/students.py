"""Student networks for evaluation: ConvNet-D (the dataset-distillation standard), ResNet-18, AlexNet, VGG-11, ViT-tiny.

Every student takes normalised float images (B, 3, H, W) and returns class logits. `build_student(name, ...)`
parses names such as `convnet3`, `resnet18`, `alexnet`, `vgg11`, `vit-tiny`, optionally with a norm suffix
(`-in` instance, `-bn` batch, `-nn` none), e.g. `resnet18-in` or `convnet3-bn`.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

from ..errors import DDCodecError

NORMS = ("instancenorm", "batchnorm", "none")


def make_norm(kind: str, channels: int) -> nn.Module:
    """instancenorm (GroupNorm with one group per channel, affine, as in DC/DM/MTT), batchnorm or none."""
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise DDCodecError(f"unknown norm {kind!r}", f"use one of {', '.join(NORMS)}")


def _size(im_size: int | tuple[int, int]) -> tuple[int, int]:
    return (im_size, im_size) if isinstance(im_size, int) else (int(im_size[0]), int(im_size[1]))


class ConvNet(nn.Module):
    """ConvNet-D: D blocks of [3x3 conv(width) → norm → act → 2x2 pool], then a linear classifier (DC/DM/MTT standard)."""

    def __init__(self, channel: int = 3, num_classes: int = 10, net_width: int = 128, net_depth: int = 3,
                 net_act: str = "relu", net_norm: str = "instancenorm", net_pooling: str = "avgpooling",
                 im_size: int | tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        h, w = _size(im_size)
        act: Callable[[], nn.Module] = {"relu": lambda: nn.ReLU(inplace=True), "leakyrelu": lambda: nn.LeakyReLU(0.01),
                                        "sigmoid": nn.Sigmoid}[net_act]
        pool: Callable[[], nn.Module] = {"avgpooling": lambda: nn.AvgPool2d(2, 2), "maxpooling": lambda: nn.MaxPool2d(2, 2),
                                         "none": nn.Identity}[net_pooling]
        layers: list[nn.Module] = []
        c = channel
        for d in range(net_depth):
            layers += [nn.Conv2d(c, net_width, 3, padding=3 if channel == 1 and d == 0 else 1),
                       make_norm(net_norm, net_width), act()]
            c = net_width
            if net_pooling != "none":
                layers.append(pool())
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(net_width * h * w, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier (used by distribution matching)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), make_norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18: a CIFAR stem (3x3 conv, stride 1, no max-pool) below 64 px, the ImageNet stem (7x7/2 + max-pool) from 64 px."""

    def __init__(self, num_classes: int = 10, im_size: int | tuple[int, int] = 32, norm: str = "batchnorm",
                 channel: int = 3) -> None:
        super().__init__()
        small = min(_size(im_size)) < 64
        self.stem = (nn.Sequential(nn.Conv2d(channel, 64, 3, 1, 1, bias=False), make_norm(norm, 64), nn.ReLU(inplace=True))
                     if small else
                     nn.Sequential(nn.Conv2d(channel, 64, 7, 2, 3, bias=False), make_norm(norm, 64), nn.ReLU(inplace=True),
                                   nn.MaxPool2d(3, 2, 1)))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


class AlexNet(nn.Module):
    """AlexNet as used for cross-architecture tests in DC/GLaD/LD3M: five convs, three max-pools, one linear layer."""

    def __init__(self, num_classes: int = 10, im_size: int | tuple[int, int] = 32, channel: int = 3) -> None:
        super().__init__()
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(channel, 128, 5, 1, 4 if channel == 1 else 2), relu(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, 5, padding=2), relu(), nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, 3, padding=1), relu(),
            nn.Conv2d(256, 192, 3, padding=1), relu(),
            nn.Conv2d(192, 192, 3, padding=1), relu(), nn.MaxPool2d(2, 2),
            nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(192 * 4 * 4, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


class VGG11(nn.Module):
    """VGG-11 with a norm after every conv (instance norm by default, as in the DC benchmark) and a linear head."""

    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = 10, im_size: int | tuple[int, int] = 32, norm: str = "instancenorm",
                 channel: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channel
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=3 if channel == 1 and c == 1 else 1),
                           make_norm(norm, int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ViT(nn.Module):
    """A small pre-norm Vision Transformer: patch embedding, class token, learned positions, GELU MLPs."""

    def __init__(self, num_classes: int = 10, im_size: int | tuple[int, int] = 32, patch: int | None = None,
                 dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0, channel: int = 3) -> None:
        super().__init__()
        h, w = _size(im_size)
        patch = patch or (4 if max(h, w) <= 32 else 8 if max(h, w) <= 64 else 16)
        if h % patch or w % patch:
            raise DDCodecError(f"ViT patch size {patch} does not divide the image size {h}x{w}", "use another image size")
        self.patch_embed = nn.Conv2d(channel, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (h // patch) * (w // patch), dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.pos_embed
        return self.norm(self.blocks(tokens))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def convnet_depth(image_size: int) -> int:
    """The conventional ConvNet depth for a resolution: 3 at 32 px, 4 at 64, 5 at 128, 6 at 256."""
    return max(1, min(6, 3 + max(0, (int(image_size) // 32).bit_length() - 1)))


_NAME = re.compile(r"^(convnet(?:-?d?(\d+))?|resnet-?18|alexnet|vgg-?11|vit(?:-tiny)?)(?:-(in|bn|nn))?$")
STUDENTS = ("convnet3", "convnet4", "convnet5", "resnet18", "alexnet", "vgg11", "vit-tiny")
_SUFFIX = {"in": "instancenorm", "bn": "batchnorm", "nn": "none"}


def build_student(name: str, num_classes: int, image_size: int | tuple[int, int], channels: int = 3) -> nn.Module:
    """A freshly initialised student by name (see STUDENTS; add -in/-bn/-nn to choose the norm)."""
    m = _NAME.match(name.strip().lower())
    if m is None:
        raise DDCodecError(f"unknown student {name!r}", f"use one of {', '.join(STUDENTS)} (optionally with -in, -bn or -nn)")
    base, depth, suffix = m.group(1), m.group(2), m.group(3)
    norm = _SUFFIX.get(suffix or "")
    size = _size(image_size)
    if base.startswith("convnet"):
        d = int(depth) if depth else convnet_depth(min(size))
        if not 1 <= d <= 8 or min(size) >> d < 1:
            raise DDCodecError(f"ConvNet depth {d} does not fit {size[0]}x{size[1]} images", "use a smaller depth")
        return ConvNet(channels, num_classes, 128, d, "relu", norm or "instancenorm", "avgpooling", size)
    if base.startswith("resnet"):
        return ResNet18(num_classes, size, norm or "batchnorm", channels)
    if base == "alexnet":
        if suffix:
            raise DDCodecError("AlexNet has no norm layers", "drop the norm suffix")
        return AlexNet(num_classes, size, channels)
    if base.startswith("vgg"):
        return VGG11(num_classes, size, norm or "instancenorm", channels)
    if suffix:
        raise DDCodecError("the ViT uses layer norm only", "drop the norm suffix")
    return ViT(num_classes, size, channel=channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
