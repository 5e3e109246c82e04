"""A small residual CNN for training from scratch on a CPU (the default backbone here).

Stem conv (stride 2) then four stages of pre-activation-free basic residual blocks
(conv-BN-ReLU-conv-BN + shortcut), widths ``width * (1, 2, 4, 8)``, stride 2 at the
start of stages 2-4. With ``width=32`` it has about 2.8M parameters and costs about
0.3 GFLOP per 96x96 image.
"""

from __future__ import annotations

from torch import Tensor, nn

from sdltag.nn.backbones import register_backbone


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        # Zero-init the last BN scale so each block starts as identity: trains faster from scratch.
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class SmallCNN(nn.Module):
    def __init__(self, width: int = 32, blocks: tuple[int, ...] | list[int] = (1, 2, 2, 1)) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(len(blocks))]
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages = []
        in_ch = widths[0]
        for i, (out_ch, count) in enumerate(zip(widths, blocks, strict=True)):
            layers = [BasicBlock(in_ch, out_ch, 1 if i == 0 else 2)]
            layers += [BasicBlock(out_ch, out_ch, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))  # (B, C, H/16, W/16)


@register_backbone("smallcnn", "small residual CNN for CPU training from scratch (default)")
def smallcnn(width: int = 32, blocks: tuple[int, ...] | list[int] = (1, 2, 2, 1)) -> nn.Module:
    """Small residual CNN for CPU training from scratch (default)."""
    return SmallCNN(width=width, blocks=tuple(blocks))
