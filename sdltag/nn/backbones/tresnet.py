"""TResNet-M (Ridnik et al., WACV 2021), the backbone of the official SDL release.

Written here to match the official ZS_SDL architecture exactly: the backbone's
``state_dict`` keys and shapes are the official checkpoint's keys minus the head's
``embedding.weight`` (372 tensors), so the official weights load strictly.

What makes TResNet differ from a ResNet (all reproduced as the official code does):

- SpaceToDepth stem: (B, 3, H, W) -> (B, 48, H/4, W/4), then one 3x3 conv.
- InPlaceABN: batch-norm whose scale is ``|w| + 1e-5``, fused with a leaky ReLU
  (slope 0.01 in the stem, 0.001 in the blocks) or no activation.
- Anti-aliased stride 2: a stride-1 conv followed by a fixed [1,2,1]x[1,2,1]/16
  depthwise blur with stride 2 (reflect padding); not stored in the state dict.
- Squeeze-and-excitation in stages 1-3; BasicBlocks in stages 1-2, Bottlenecks in 3-4.
- Shortcut downsampling: AvgPool2d(2, 2, ceil_mode) then a 1x1 conv + ABN.

Output: the stage-4 feature map (B, 2048, H/32, W/32); the SDL head pools it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdltag.nn.backbones import register_backbone

ABN_EPS = 1e-5


class InPlaceABN(nn.Module):
    """Batch-norm with scale ``|weight| + eps`` followed by a leaky ReLU (or identity).

    Eval mode uses the running statistics:
    ``y = (x - running_mean) / sqrt(running_var + eps) * (|weight| + eps) + bias``.
    Train mode normalises with the batch statistics and updates the running ones,
    like ``nn.BatchNorm2d`` (the official CUDA kernel's in-place trick is a memory
    optimisation only). Keys: weight, bias, running_mean, running_var (no
    ``num_batches_tracked``, as in the official checkpoint).
    """

    def __init__(
        self, num_features: int, activation: str = "leaky_relu", slope: float = 0.01, momentum: float = 0.1
    ) -> None:
        super().__init__()
        if activation not in ("leaky_relu", "identity"):
            raise ValueError(f"InPlaceABN activation must be 'leaky_relu' or 'identity', not {activation!r}")
        self.num_features, self.activation, self.slope, self.momentum = num_features, activation, slope, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.running_mean: Tensor
        self.running_var: Tensor
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        # |weight| + eps, written so that a weight at exactly 0 (the zero-initialised last norm of
        # each residual branch) still gets a gradient: abs() has gradient 0 there and would freeze it.
        scale = torch.where(self.weight >= 0, self.weight, -self.weight) + ABN_EPS
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            scale,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=ABN_EPS,
        )
        if self.activation == "leaky_relu":
            x = F.leaky_relu(x, self.slope)
        return x

    def extra_repr(self) -> str:
        act = f"leaky_relu({self.slope})" if self.activation == "leaky_relu" else "identity"
        return f"{self.num_features}, activation={act}"


def conv_abn(
    in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, activation: str = "leaky_relu", slope: float = 0.01
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + InPlaceABN: keys ``0.weight`` and ``1.*`` as in the official model."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        InPlaceABN(out_ch, activation=activation, slope=slope),
    )


def _norm_of(conv: nn.Sequential) -> InPlaceABN:
    """The InPlaceABN of a ``conv_abn`` pair."""
    norm = conv[1]
    assert isinstance(norm, InPlaceABN)
    return norm


class SpaceToDepth(nn.Module):
    """(B, C, H, W) -> (B, 16C, H/4, W/4), channel order as the official stem."""

    block = 4

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        s = self.block
        x = x.view(b, c, h // s, s, w // s, s)  # (B, C, H/4, 4, W/4, 4)
        x = x.permute(0, 3, 5, 1, 2, 4).contiguous()  # (B, 4, 4, C, H/4, W/4)
        return x.view(b, c * s * s, h // s, w // s)  # (B, 16C, H/4, W/4)


class AntiAliasDownsample(nn.Module):
    """Fixed blur-then-subsample: reflect-pad 1, depthwise [1,2,1]x[1,2,1]/16 conv, stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        filt = a[:, None] * a[None, :]
        filt = filt / filt.sum()  # (3, 3), sums to 1
        # Not part of the state dict: the official checkpoint does not store it.
        self.filt: Tensor
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1), persistent=False)  # (C, 1, 3, 3)
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.channels)


class SEModule(nn.Module):
    """Squeeze-and-excitation: mean pool, 1x1 conv, ReLU, 1x1 conv, sigmoid, multiply."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1, bias=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        se = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        se = torch.sigmoid(self.fc2(F.relu(self.fc1(se))))
        return x * se


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    layers: list[nn.Module] = []
    if stride == 2:
        layers.append(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False))
    layers.append(conv_abn(in_ch, out_ch, kernel_size=1, activation="identity"))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, use_se: bool = True) -> None:
        super().__init__()
        if stride == 1:
            self.conv1: nn.Module = conv_abn(in_ch, planes, slope=1e-3)
        else:
            self.conv1 = nn.Sequential(conv_abn(in_ch, planes, slope=1e-3), AntiAliasDownsample(planes))
        self.conv2 = conv_abn(planes, planes, activation="identity")
        self.downsample = _downsample(in_ch, planes * self.expansion, stride)
        self.se = SEModule(planes * self.expansion, max(planes * self.expansion // 4, 64)) if use_se else None

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, use_se: bool = True) -> None:
        super().__init__()
        self.conv1 = conv_abn(in_ch, planes, kernel_size=1, slope=1e-3)
        if stride == 1:
            self.conv2: nn.Module = conv_abn(planes, planes, slope=1e-3)
        else:
            self.conv2 = nn.Sequential(conv_abn(planes, planes, slope=1e-3), AntiAliasDownsample(planes))
        self.conv3 = conv_abn(planes, planes * self.expansion, kernel_size=1, activation="identity")
        self.downsample = _downsample(in_ch, planes * self.expansion, stride)
        # The official model squeezes the bottleneck's inner width (planes), not its output.
        self.se = SEModule(planes, max(planes * self.expansion // 8, 64)) if use_se else None

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        out = self.conv3(out)
        return F.relu(out + residual)


class TResNet(nn.Module):
    """TResNet body: SpaceToDepth, conv1, layer1..layer4 -> feature map (B, 16*planes*2, H/32, W/32)."""

    def __init__(
        self, layers: tuple[int, int, int, int] = (3, 4, 11, 3), width_factor: float = 1.0, in_chans: int = 3
    ) -> None:
        super().__init__()
        planes = int(64 * width_factor)
        self.space_to_depth = SpaceToDepth()
        self.conv1 = conv_abn(in_chans * 16, planes, kernel_size=3, slope=0.01)
        self._in_ch = planes
        self.layer1 = self._make_layer(BasicBlock, planes, layers[0], stride=1, use_se=True)  # H/4
        self.layer2 = self._make_layer(BasicBlock, planes * 2, layers[1], stride=2, use_se=True)  # H/8
        self.layer3 = self._make_layer(Bottleneck, planes * 4, layers[2], stride=2, use_se=True)  # H/16
        self.layer4 = self._make_layer(Bottleneck, planes * 8, layers[3], stride=2, use_se=False)  # H/32
        self.num_features = self._in_ch
        self._init_weights()

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, count: int, stride: int, use_se: bool
    ) -> nn.Sequential:
        blocks = [block(self._in_ch, planes, stride=stride, use_se=use_se)]
        self._in_ch = planes * block.expansion
        blocks += [block(self._in_ch, planes, stride=1, use_se=use_se) for _ in range(count - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # As the official code: He init for convs; the last ABN of each residual branch starts at zero.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(_norm_of(module.conv2).weight)
            elif isinstance(module, Bottleneck):
                nn.init.zeros_(_norm_of(module.conv3).weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(self.space_to_depth(x))  # (B, 64w, H/4, W/4)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048w, H/32, W/32)


@register_backbone("tresnet_m", "TResNet-M (2048-d features), the official SDL backbone; imports its checkpoint")
def tresnet_m(width_factor: float = 1.0, layers: tuple[int, ...] | list[int] = (3, 4, 11, 3)) -> nn.Module:
    """TResNet-M (2048-d features), the official SDL backbone; imports its checkpoint."""
    if len(layers) != 4:
        raise ValueError(f"tresnet_m needs 4 stage depths, got {list(layers)}")
    first, second, third, fourth = layers
    return TResNet(layers=(first, second, third, fourth), width_factor=width_factor)
