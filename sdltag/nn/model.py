"""The SDL model: backbone -> global average pool -> Linear(feat, M*d, bias=False) -> (B, M, d).

Head layout. The head's flat output (B, M*d) is turned into the principal-vector
matrix A (B, M, d) in one of two ways, recorded in the manifest as ``head_layout``:

- ``contiguous`` (sdltag's default): row m of A is ``out[:, m*d:(m+1)*d]``,
  i.e. ``out.view(B, M, d)``.
- ``interleaved`` (the official SDL release): the flat output is viewed as
  (B, d, M), so row m is ``out[:, m::M]``; used when importing official weights.

The exported ONNX graph always outputs A as (B, M, d), so tagging never needs to
know the layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sdltag.nn.backbones import create_backbone

LAYOUTS = ("contiguous", "interleaved")


@dataclass
class ModelConfig:
    """Everything needed to rebuild an SDL model's architecture (saved in checkpoints)."""

    backbone: str = "smallcnn"
    backbone_config: dict[str, Any] = field(default_factory=dict)
    rows: int = 7
    dim: int = 384
    head_layout: str = "contiguous"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


class SDLHead(nn.Module):
    """Global average pool + bias-free linear map to M principal vectors of dimension d."""

    def __init__(self, num_features: int, rows: int, dim: int, layout: str = "contiguous") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"head layout must be one of {LAYOUTS}, not {layout!r}")
        self.rows, self.dim, self.layout = rows, dim, layout
        self.embedding = nn.Linear(num_features, rows * dim, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        pooled = features.mean(dim=(2, 3))  # (B, C)
        flat = self.embedding(pooled)  # (B, M*d)
        if self.layout == "contiguous":
            return flat.view(-1, self.rows, self.dim)  # (B, M, d)
        return flat.view(-1, self.dim, self.rows).transpose(1, 2)  # (B, d, M) -> (B, M, d)


class SDLModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, **config.backbone_config)
        num_features = self.backbone.num_features
        assert isinstance(num_features, int)  # create_backbone checks it
        self.head = SDLHead(num_features, config.rows, config.dim, config.head_layout)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W), normalised as the manifest says -> principal vectors (B, M, d)."""
        return self.head(self.backbone(images))


def sdl_scores(principal_vectors: Tensor, label_vectors: Tensor) -> Tensor:
    """Raw SDL scores in torch: (B, M, d) x (L, d) -> (B, L), max over rows of <A_m, w>.

    The numpy twin used for tagging is ``sdltag.scoring.sdl_scores``.
    """
    return torch.einsum("bmd,ld->bml", principal_vectors, label_vectors).amax(dim=1)
