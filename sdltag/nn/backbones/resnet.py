"""ResNet-50 (bottleneck ResNet, He et al. 2016), for photo-scale training on a GPU.

Written here (no torchvision); the module names follow the common layout
(conv1/bn1/layer1..4) so the structure is familiar. ``width`` scales every stage for
tiny test models.
"""

from __future__ import annotations

from torch import Tensor, nn

from sdltag.nn.backbones import register_backbone


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, stride: int) -> None:
        super().__init__()
        out_ch = mid_ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        nn.init.zeros_(self.bn3.weight)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = width
        stages = []
        for i, count in enumerate(layers):
            mid = width * 2**i
            blocks = [Bottleneck(in_ch, mid, 1 if i == 0 else 2)]
            in_ch = mid * Bottleneck.expansion
            blocks += [Bottleneck(in_ch, mid, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_ch
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32*width, H/32, W/32)


@register_backbone("resnet50", "ResNet-50 (2048-d features), for photo-scale training on a GPU")
def resnet50(width: int = 64, layers: tuple[int, ...] | list[int] = (3, 4, 6, 3)) -> nn.Module:
    """ResNet-50 (2048-d features), for photo-scale training on a GPU."""
    first, second, third, fourth = layers
    return ResNet(layers=(first, second, third, fourth), width=width)
