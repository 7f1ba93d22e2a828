"""Model registry: a params name -> an image classifier with normalisation built in.

Every model returned here takes pixels in [0, 1] and normalises inside (the RobustBench
convention), so attacks work in pixel space. Names:

- ``resnet18``: CIFAR-style ResNet-18 (3x3 stem, no max-pool; He et al. 2016).
- ``vgg11``, ``vgg16``: VGG with batch norm (Simonyan & Zisserman 2015), CIFAR-style head.
- ``mobilevit_xxs`` / ``_xs`` / ``_s``: timm's MobileViT (Mehta & Rastegari 2022); for
  32x32 inputs the stem stride is 1 so the last stage still sees a 2x2 map.
- ``wrnD_K``: WideResNet-D-K (Zagoruyko & Komodakis 2016; depth D = 6n + 4, widen factor K:
  ``wrn28_10``, ``wrn34_10``, ``wrn70_16``, ``wrn16_4``) and ``preact_resnet18`` /
  ``preact_resnet18_v2``: PreActResNet-18 (He et al. 2016b), both laid out as RobustBench's
  architectures (module and parameter names), so a state dict saved from RobustBench's zoo
  loads into ``Classifier.net`` without renaming a key (docs/deploy.md names the entries).
- a suffix ``_wN`` divides every width by N (``vgg11_w8``: ~150 k parameters, the
  CPU-scale model), e.g. ``resnet18_w4``.
- ``tv:NAME`` / ``timm:NAME``: any torchvision or timm classifier, built with
  ``num_classes`` and no pretrained weights.

The architecture description stored in checkpoints is ``{"name", "num_classes",
"input_size", "mean", "std", "activation"}``, plus ``pruning_history`` for a pruned model;
``instantiate(arch)`` rebuilds the model.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .errors import MrpfError


class Normalize(nn.Module):
    """Per-channel (x - mean) / std on pixel-space inputs."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(normalize(x))``: the wrapper every registry model comes in."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


# ----------------------------------------------------------------------------- ResNet

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.act1, self.act2 = act(), act()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stride-1 stem, no max-pool, global average pool."""

    def __init__(self, blocks: Sequence[int], num_classes: int, width: int = 64, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = act()
        layers, in_planes = [], width
        for i, n in enumerate(blocks):
            planes = width * 2 ** i
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1, act=act))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------- WideResNet, PreActResNet
# Module names follow RobustBench (robustbench/model_zoo/architectures/wide_resnet.py and the
# PreActResNet of resnet.py) so that its checkpoints load key for key; the layers are written
# here because RobustBench is not a dependency (it pins old torch and pulls in its model zoo).


class WideBlock(nn.Module):
    """Pre-activation wide basic block: act(bn1) -> conv1 -> act(bn2) -> conv2, plus the
    block's input where the widths agree, else ``convShortcut`` (1x1) of the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(in_planes), act()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(out_planes), act()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.convShortcut = None if in_planes == out_planes and stride == 1 else \
            nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class NetworkBlock(nn.Module):
    """One WideResNet stage: ``layer``, a sequence of wide blocks (the first may stride)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1, act) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-D-K: a 3x3 stem, three stages of (D - 4) / 6 wide blocks at widths 16K,
    32K, 64K (strides 1, 2, 2), then act(bn1), global average pool and ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int, width_div: int = 1, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        n = (depth - 4) // 6
        widths = [max(1, w // width_div) for w in (16, 16 * widen, 32 * widen, 64 * widen)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, act)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, act)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, act)
        self.bn1, self.relu = nn.BatchNorm2d(widths[3]), act()
        self.pool = nn.AdaptiveAvgPool2d(1)   # RobustBench's avg_pool2d(8) at 32x32; any input size here
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.relu(self.bn1(x))), 1))


class PreActBlock(nn.Module):
    """Pre-activation basic block: act(bn1) -> conv1 -> act(bn2) -> conv2, plus the block's
    input or ``shortcut`` (a 1x1 conv) of it; with ``activated_shortcut`` (RobustBench's
    PreActBlockV2) the shortcut convolution takes the activated input instead."""

    def __init__(self, in_planes: int, planes: int, stride: int, act: type[nn.Module], activated_shortcut: bool):
        super().__init__()
        self.activated_shortcut = activated_shortcut
        self.bn1, self.act1 = nn.BatchNorm2d(in_planes), act()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(planes), act()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.act1(self.bn1(x))
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(activated if self.activated_shortcut else x)
        else:
            shortcut = x
        return self.conv2(self.act2(self.bn2(self.conv1(activated)))) + shortcut


class PreActResNet(nn.Module):
    """PreActResNet-18: a 3x3 stem without BN, four stages of two pre-activation blocks,
    optionally act(``bn``) before the pool (``bn_before_fc``), then ``linear``."""

    def __init__(self, num_classes: int, width_div: int = 1, act: type[nn.Module] = nn.ReLU,
                 activated_shortcut: bool = False, bn_before_fc: bool = False):
        super().__init__()
        width = max(1, 64 // width_div)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        stages, in_planes = [], width
        for i in range(4):
            planes = width * 2 ** i
            stages.append(nn.Sequential(*[PreActBlock(in_planes if j == 0 else planes, planes,
                                                      2 if i > 0 and j == 0 else 1, act, activated_shortcut)
                                          for j in range(2)]))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(in_planes)
        self.final_act = act()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if hasattr(self, "bn"):
            x = self.final_act(self.bn(x))
        return self.linear(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------- VGG

VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with batch norm; global average pool + one linear layer (the CIFAR convention)."""

    def __init__(self, config: Sequence, num_classes: int, width_div: int = 1, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        layers, in_ch = [], 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(1, item // width_div)
                layers += [nn.Conv2d(in_ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), act()]
                in_ch = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ----------------------------------------------------------------------------- MobileViT

def _mobilevit(variant: str, num_classes: int, input_size: int, width_div: int) -> nn.Module:
    import timm

    if width_div != 1:
        raise MrpfError(f"model.arch: width division is not supported for {variant}")
    net = timm.create_model(variant, pretrained=False, num_classes=num_classes)
    if input_size <= 32:
        # Five stride-2 stages would leave a 1x1 map at 32x32; a stride-1 stem keeps 2x2 (CIFAR practice).
        net.stem.conv.stride = (1, 1)
    return net


# ----------------------------------------------------------------------------- registry

def _resnet18(num_classes: int, input_size: int, width_div: int, act: type[nn.Module]) -> nn.Module:
    return CifarResNet([2, 2, 2, 2], num_classes, width=max(1, 64 // width_div), act=act)


def _vgg(config: str) -> Callable[..., nn.Module]:
    return lambda num_classes, input_size, width_div, act: VGG(VGG_CONFIGS[config], num_classes, width_div, act)


def _mv(variant: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, input_size: int, width_div: int, act: type[nn.Module]) -> nn.Module:
        if act is not nn.ReLU:
            raise MrpfError(f"model.activation: {variant} keeps its own activations; leave model.activation=relu")
        return _mobilevit(variant, num_classes, input_size, width_div)
    return build


def _preact(activated_shortcut: bool, bn_before_fc: bool) -> Callable[..., nn.Module]:
    return lambda num_classes, input_size, width_div, act: PreActResNet(num_classes, width_div, act,
                                                                        activated_shortcut, bn_before_fc)


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet18,
    "preact_resnet18": _preact(activated_shortcut=False, bn_before_fc=False),    # RobustBench's PreActBlock
    "preact_resnet18_v2": _preact(activated_shortcut=True, bn_before_fc=True),   # PreActBlockV2 + bn_before_fc
    "vgg11": _vgg("vgg11"),
    "vgg16": _vgg("vgg16"),
    "mobilevit_xxs": _mv("mobilevit_xxs"),
    "mobilevit_xs": _mv("mobilevit_xs"),
    "mobilevit_s": _mv("mobilevit_s"),
}

_WIDTH = re.compile(r"^(?P<base>.+)_w(?P<div>\d+)$")
_WRN = re.compile(r"^wrn(?P<depth>\d+)_(?P<widen>\d+)$")


def available() -> list[str]:
    return sorted(REGISTRY) + ["wrnD_K", "<name>_wN", "tv:<torchvision name>", "timm:<timm name>"]


def _builder(base: str) -> Callable[..., nn.Module] | None:
    """The registry's builder for a name without its ``_wN`` suffix (None if it has none)."""
    if base in REGISTRY:
        return REGISTRY[base]
    m = _WRN.match(base)
    if not m:
        return None
    depth, widen = int(m.group("depth")), int(m.group("widen"))
    if depth < 10 or (depth - 4) % 6 or widen < 1:
        raise MrpfError(f"model.arch: {base}: a WideResNet's depth is 6n + 4 (10, 16, 22, 28, 34, 40, ...) and its "
                        f"widen factor at least 1, got depth {depth}, widen factor {widen}")
    return lambda num_classes, input_size, width_div, act: WideResNet(depth, widen, num_classes, width_div, act)


def robustbench_layout(name: str) -> bool:
    """Whether ``name`` is one of the architectures laid out as RobustBench's (WideResNet,
    PreActResNet), whose published checkpoints expect raw [0, 1] pixels unless they say otherwise."""
    base, _ = _split_width(name)
    return base.startswith("preact_resnet") or bool(_WRN.match(base))


def _split_width(name: str) -> tuple[str, int]:
    """``NAME_wN`` -> (NAME, N) where NAME is a registry name; else (name, 1)."""
    m = _WIDTH.match(name)
    if m and (m.group("base") in REGISTRY or _WRN.match(m.group("base"))):
        return m.group("base"), int(m.group("div"))
    return name, 1


def check_arch(name: str) -> None:
    """Raise a clear error for a name the registry cannot build (without building it)."""
    if not isinstance(name, str) or not name:
        raise MrpfError(f"model.arch: expected a model name, got {name!r}")
    source, sep, model_name = name.partition(":")
    if sep:
        if source == "tv":
            import torchvision.models as tvm
            known = model_name in tvm.list_models()
        elif source == "timm":
            import timm
            known = timm.is_model(model_name)
        else:
            known = False
        if not known:
            raise MrpfError(f"model.arch: unknown architecture {name!r} (tv:NAME for torchvision, timm:NAME for timm)")
        return
    base, div = _split_width(name)
    if _builder(base) is None:
        raise MrpfError(f"model.arch: unknown architecture {name!r} (choose from {', '.join(available())})")
    if div < 1:
        raise MrpfError(f"model.arch: width divisor must be >= 1 in {name!r}")


def _external(name: str, num_classes: int) -> nn.Module:
    source, _, model_name = name.partition(":")
    try:
        if source == "tv":
            import torchvision.models as tvm
            return tvm.get_model(model_name, weights=None, num_classes=num_classes)
        import timm
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    except (ValueError, RuntimeError, KeyError) as e:
        raise MrpfError(f"model.arch: cannot build {name!r} ({str(e).splitlines()[0]})") from None


def build_model(name: str, num_classes: int, input_size: int,
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                activation: str = "relu") -> Classifier:
    """Build the named classifier (random initialisation) wrapped with its input normalisation.

    ``activation`` (relu, silu, gelu) applies to the registry's ResNet and VGG; smooth
    activations can help adversarial training (Xie et al., 2020, "Smooth Adversarial Training").
    """
    check_arch(name)
    if activation not in ACTIVATIONS:
        raise MrpfError(f"model.activation: unknown activation {activation!r} (choose from {', '.join(ACTIVATIONS)})")
    if name.startswith(("tv:", "timm:")):
        if activation != "relu":
            raise MrpfError(f"model.activation: {name} keeps its own activations; leave model.activation=relu")
        net = _external(name, num_classes)
    else:
        base, div = _split_width(name)
        net = _builder(base)(num_classes, input_size, div, ACTIVATIONS[activation])
    return Classifier(net, mean, std)


def arch_description(name: str, num_classes: int, input_size: int, mean, std, activation: str = "relu") -> dict:
    """The plain-data description that ``instantiate(description)`` turns back into the model."""
    return {"name": name, "num_classes": int(num_classes), "input_size": int(input_size),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "activation": activation}


def instantiate(arch: dict) -> Classifier:
    """Build the model an architecture description names, pruned as its ``pruning_history`` says."""
    from .groups import replay

    keys = ("name", "num_classes", "input_size", "mean", "std", "activation")
    model = build_model(**{k: arch[k] for k in keys if k in arch})
    return replay(model, arch.get("pruning_history", []), arch["input_size"])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_ops(model: nn.Module, input_size: int) -> dict:
    """MACs and parameters of one forward pass (torch-pruning's counter): the one MACs count."""
    import torch_pruning as tp

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, input_size, input_size, device=device))
    model.train(was_training)
    return {"macs": int(macs), "params": int(params)}


def load_model(checkpoint, runtime) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes, load its weights (``weights_only=True``) and
    put it on ``runtime``'s device and memory format, in eval mode."""
    from .io import load_checkpoint

    state = load_checkpoint(checkpoint)
    model = instantiate(state["arch"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        lines = str(e).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(e)
        raise MrpfError(f"checkpoint {checkpoint}: weights do not fit architecture "
                        f"{state['arch'].get('name')!r} ({detail})") from None
    return runtime.prepare(model).eval(), state
