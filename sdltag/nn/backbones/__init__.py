"""Backbone registry: every image backbone sdltag can train or import, written here.

A backbone is an ``nn.Module`` whose ``forward`` maps images (B, 3, H, W) to a
feature map (B, C, h, w) and which has an integer attribute ``num_features`` (C).
The SDL head does the global average pooling.

    create_backbone("smallcnn", width=32)  # config keys are the factory's kwargs
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_backbone(
    name: str, description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a factory ``f(**config) -> nn.Module`` under ``name``."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        _DESCRIPTIONS[name] = description or (factory.__doc__ or "").strip().splitlines()[0]
        return factory

    return decorate


def _load_builtin() -> None:
    # Importing the modules registers their backbones.
    from sdltag.nn.backbones import efficientnet_lite, resnet, smallcnn  # noqa: F401

    try:
        from sdltag.nn.backbones import tresnet  # noqa: F401
    except ImportError:  # pragma: no cover - added by a later change
        pass


def available_backbones() -> dict[str, str]:
    """Registered names and a one-line description each."""
    _load_builtin()
    return dict(sorted(_DESCRIPTIONS.items()))


def pretrained_source(name: str) -> Any:
    """The module that provides ImageNet weights for backbone ``name``, or None when it has none.

    The module offers ``input_spec(name)`` (the input the weights expect), ``read_weights(name)``
    (the verified state dict), ``load_state_strict(module, state, source)`` and
    ``weights_provenance(name)`` (source, licence, sha256 for the manifest).
    """
    _load_builtin()
    from sdltag.nn.backbones import efficientnet_lite

    return efficientnet_lite if name in efficientnet_lite.VARIANTS else None


def create_backbone(name: str, **config: Any) -> nn.Module:
    _load_builtin()
    if name not in _REGISTRY:
        from sdltag.errors import SdltagError

        raise SdltagError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](**config)
    if not isinstance(getattr(model, "num_features", None), int):
        raise TypeError(f"backbone {name!r} does not set an integer num_features")
    return model
