"""Frozen-backbone features for ``sdltag train --freeze-backbone``: computed once, cached on disk.

With the backbone frozen, an image's pooled feature vector (B, C) never changes, so it is
computed once and only the SDL head trains on it. Each vector is stored as one ``.npy``
file under ``<run folder>/features/``, named by a key over everything that determines it:
the image file's content hash (XXH3-128), the backbone name, a hash of the backbone's
weights, the input spec and the view (0: the image as tagging sees it; 1, 2, ...: random
resized crop, flip, colour jitter and cutout, drawn from a seed derived from the image's
content). A re-run, a ``--resume`` or a renamed file reuses the stored vectors; changing
weights, input size or augmentation computes new ones.

With ``blocks`` > 0 (``sdltag train --train-blocks K``) the cache holds, per image and view, the
feature map at the input of the backbone's last K blocks (C, h, w): everything before them stays
frozen and runs once, and training runs only those K blocks, the head convolution and the SDL
head. The same pass also stores the pooled vectors (what ``--freeze-backbone`` reads), so a
frozen run on the same images and folder finds them computed.

The cache folder is ``<run folder>/features/`` unless ``sdltag train --feature-cache DIR``
names another: several runs over the same images (seeds, M, lambda) then share one feature
pass. Files are written atomically (a temporary name, then a rename), so runs writing the same
folder at once do not corrupt each other's entries.

The vectors are computed with onnxruntime on the CPU (the backbone exported once to a
temporary ONNX graph: about 3x faster than torch on a 2-core CPU, and the very arithmetic
tagging uses) and with torch on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn

from sdltag.hashing import file_xxh3
from sdltag.modelfolder import InputSpec
from sdltag.nn.augment import AugmentConfig, augment_batch
from sdltag.nn.data import ImageStore, normalise

FEATURES_DIR = "features"
EXTRACT_BATCH = 32
Progress = Callable[[int, int], None]


def weights_hash(module: nn.Module, skip: Sequence[nn.Module] = ()) -> str:
    """sha256 over a module's state (names, shapes, dtypes and values), first 16 hex digits.

    ``skip``: sub-modules left out (the trained blocks, when hashing what stays frozen).
    """
    prefixes = tuple(f"{name}." for name, sub in module.named_modules() if any(sub is m for m in skip))
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if prefixes and name.startswith(prefixes):
            continue
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}\n".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def content_hash(path: Path) -> str | None:
    """XXH3-128 of the file's bytes (hex, ``sdltag.hashing.file_xxh3``), or None when it cannot be read."""
    try:
        return file_xxh3(path)
    except OSError:
        return None


class _Pooled(nn.Module):
    """backbone -> global average pool, the graph exported for extraction."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images).mean(dim=(2, 3))


class SplitBackbone(Protocol):
    """A backbone ``--train-blocks`` can split: ``tail(trunk(x, k), k)`` is its forward pass."""

    @property
    def num_blocks(self) -> int: ...

    def trunk(self, x: Tensor, blocks: int) -> Tensor: ...

    def tail(self, x: Tensor, blocks: int) -> Tensor: ...

    def tail_modules(self, blocks: int) -> list[nn.Module]: ...


class _Split(nn.Module):
    """backbone -> (input of its last ``blocks`` blocks, pooled features): the graph of a ``--train-blocks`` pass."""

    def __init__(self, backbone: nn.Module, blocks: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.blocks = blocks

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        backbone = cast(SplitBackbone, self.backbone)
        maps = backbone.trunk(images, self.blocks)
        return maps, backbone.tail(maps, self.blocks).mean(dim=(2, 3))


def trainable_blocks(backbone: nn.Module) -> int:
    """How many of its last blocks ``--train-blocks`` can train on ``backbone`` (0: it cannot be split)."""
    if not all(hasattr(backbone, name) for name in ("trunk", "tail", "tail_modules", "num_blocks")):
        return 0
    return cast(SplitBackbone, backbone).num_blocks


class CachedHead(nn.Module):
    """What trains on cached features: the SDL head, after the backbone's last ``blocks`` blocks when > 0.

    ``forward``: pooled features (B, C) (``blocks`` 0) or feature maps at the input of block -``blocks``
    (B, C, h, w) -> principal vectors (B, M, d), as the whole model gives them from the images.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, blocks: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.blocks = blocks

    def forward(self, features: Tensor) -> Tensor:
        if self.blocks:
            return self.head(cast(SplitBackbone, self.backbone).tail(features, self.blocks))
        return self.head(features[:, :, None, None])


class FeatureStore:
    """Cached features of one split; ``ok`` marks images that decoded.

    ``features``: (N, V, C) float32 pooled vectors, or with ``blocks`` > 0 the (N, V, C, h, w) feature
    maps at the input of the backbone's last ``blocks`` blocks. Read by batches of indices like
    ``ImageStore``: ``iter_batches`` yields (indices, (B, V, ...)).
    """

    def __init__(self, paths: Sequence[Path], features: Tensor, ok: Tensor, blocks: int = 0) -> None:
        self.paths = list(paths)
        self.features = features
        self.ok = ok
        self.blocks = blocks

    @property
    def views(self) -> int:
        return int(self.features.shape[1])

    def iter_batches(self, batches: Sequence[Sequence[int]]) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in batches:
            indices = torch.as_tensor(list(batch), dtype=torch.long)
            indices = indices[self.ok[indices]]
            yield indices, self.features[indices]


class FeatureCache:
    """The on-disk cache of one (backbone, weights, input spec, augmentation, blocks) combination.

    ``blocks`` 0: pooled vectors (``--freeze-backbone``); K > 0: feature maps at the input of the last K
    blocks (``--train-blocks K``), with the pooled vectors stored alongside.
    """

    def __init__(
        self,
        folder: Path,
        backbone_name: str,
        backbone: nn.Module,
        spec: InputSpec,
        augment: AugmentConfig,
        device: torch.device,
        threads: int | None = None,
        blocks: int = 0,
    ) -> None:
        if blocks and not 0 < blocks <= trainable_blocks(backbone):
            raise ValueError(f"{backbone_name}: cannot cache the input of its last {blocks} blocks")
        self.folder = Path(folder)
        self.blocks = blocks
        self.backbone = backbone
        self.spec = spec
        self.augment = augment
        self.device = device
        self.threads = threads
        base = {"backbone": backbone_name, "weights": weights_hash(backbone), "input": spec.to_json()}
        self.identity = json.dumps(base, sort_keys=True)  # view 0 is never augmented
        self.augmented_identity = json.dumps({**base, "augment": augment.to_dict()}, sort_keys=True)
        if blocks:  # the maps' keys (they depend on the frozen part only); the pooled vectors keep the above
            tail = cast(SplitBackbone, backbone).tail_modules(blocks)
            trunk = {**base, "weights": weights_hash(backbone, skip=tail)}
            self.maps_identity = json.dumps({**trunk, "maps_at_block": -blocks}, sort_keys=True)
            self.maps_augmented_identity = json.dumps(
                {**trunk, "maps_at_block": -blocks, "augment": augment.to_dict()}, sort_keys=True
            )
        self._session: Any = None  # onnxruntime.InferenceSession, made on first use
        self._tmp: tempfile.TemporaryDirectory | None = None

    def key(self, content: str, view: int, pooled: bool = False) -> str:
        """The cache key of an image's view: its feature maps (``blocks`` > 0) or its pooled vector."""
        if self.blocks and not pooled:
            identity = self.maps_augmented_identity if view else self.maps_identity
        else:
            identity = self.augmented_identity if view else self.identity
        return hashlib.sha256(f"{content}|{view}|{identity}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def _read(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return value if value.ndim == (3 if self.blocks else 1) else None

    def _write(self, key: str, value: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, value.astype(np.float32, copy=False), allow_pickle=False)
        os.replace(tmp, path)

    # -- computing -------------------------------------------------------------------------------

    def _graph(self) -> nn.Module:
        return _Split(self.backbone, self.blocks) if self.blocks else _Pooled(self.backbone)

    def _run(self, images: Tensor) -> list[np.ndarray]:
        """Normalised images (B, 3, H, W) -> [pooled features (B, C)], or [maps (B, C, h, w), pooled (B, C)]."""
        if self.device.type == "cuda":
            graph = self._graph().eval().to(self.device)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                out = graph(images.to(self.device))
            return [t.float().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))]
        if self._session is None:
            self._session = self._onnx_session()
        return list(self._session.run(None, {"images": images.numpy()}))

    def _onnx_session(self):  # noqa: ANN202 - onnxruntime is imported lazily
        import onnxruntime as ort

        from sdltag.nn.export import OUTPUT_NAME, export_onnx

        self._tmp = tempfile.TemporaryDirectory(prefix="sdltag-features-")
        path = Path(self._tmp.name) / "backbone.onnx"
        graph = self._graph().cpu().float().eval()
        # with --train-blocks, two outputs: the maps at the split and the pooled vector
        export_onnx(graph, self.spec, path, output_names=("maps", "pooled") if self.blocks else (OUTPUT_NAME,))
        options = ort.SessionOptions()
        # Threads that sleep between operators instead of spinning: 1.3x the images/s on a busy 2-core CPU
        # (10.6 -> 13.8, medians of 5 interleaved batches of 32), where spinning threads compete for the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads:
            options.intra_op_num_threads = self.threads
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _views(self, pixels: Tensor, contents: list[str], views: int) -> list[Tensor]:
        """uint8 (B, 3, H, W) -> ``views`` normalised float batches: the plain images, then augmented ones."""
        size = (self.spec.height, self.spec.width)
        out = [normalise(pixels.float().div(255.0), self.spec)]
        for view in range(1, views):
            augmented = []
            for image, content in zip(pixels, contents, strict=True):
                seed = int(hashlib.sha256(f"{content}|{view}".encode()).hexdigest()[:15], 16)
                generator = torch.Generator().manual_seed(seed)
                augmented.append(augment_batch(image[None], size, self.augment, generator))
            out.append(normalise(torch.cat(augmented), self.spec))
        return out

    def _cached(self, contents: list[str | None], views: int) -> tuple[dict[int, list[np.ndarray]], list[int]]:
        """The images whose every view is cached (index -> values), and the others' indices."""
        found: dict[int, list[np.ndarray]] = {}
        missing: list[int] = []
        for i, content in enumerate(contents):
            if content is None:
                missing.append(i)  # unreadable: the decoder reports it
                continue
            values = [self._read(self.key(content, v)) for v in range(views)]
            present = [v for v in values if v is not None]
            if len(present) == views:
                found[i] = present
            else:
                missing.append(i)
        return found, missing

    def _compute(self, pixels: Tensor, contents: list[str], views: int) -> list[list[np.ndarray]]:
        """uint8 images (B, 3, H, W) -> per image, per view, the cached value (written to the cache too).

        With ``blocks`` > 0 the pooled vectors the same pass computed are written alongside the maps.
        """
        outputs = [self._run(images) for images in self._views(pixels, contents, views)]  # V x [main, (pooled)]
        rows = []
        for row, content in enumerate(contents):
            computed = [np.asarray(out[0][row], dtype=np.float32) for out in outputs]
            if content:
                for view, out in enumerate(outputs):
                    self._write(self.key(content, view), computed[view])
                    if self.blocks:
                        self._write(self.key(content, view, pooled=True), np.asarray(out[1][row], dtype=np.float32))
            rows.append(computed)
        return rows

    def store(self, image_store: ImageStore, views: int, progress: Progress | None = None) -> FeatureStore:
        """Features of every image of ``image_store`` (cached ones read, the rest computed and cached)."""
        paths = image_store.paths
        n = len(paths)
        contents = [content_hash(Path(p)) for p in paths]
        features: Tensor | None = None
        ok = torch.ones(n, dtype=torch.bool)
        found, missing = self._cached(contents, views)
        done = len(found)
        if progress:
            progress(done, n)

        def put(i: int, rows: list[np.ndarray]) -> None:
            nonlocal features
            if features is None:
                features = torch.zeros(n, views, *rows[0].shape, dtype=torch.float32)
            features[i] = torch.from_numpy(np.stack(rows))

        for i, rows in found.items():
            put(i, rows)
        batches = [missing[i : i + EXTRACT_BATCH] for i in range(0, len(missing), EXTRACT_BATCH)]
        for batch, (indices, pixels) in zip(batches, image_store.iter_batches(batches), strict=True):
            idx = indices.tolist()
            if idx:
                computed = self._compute(pixels, [contents[i] or "" for i in idx], views)
                for i, rows in zip(idx, computed, strict=True):
                    put(i, rows)
            done += len(batch)
            if progress:
                progress(done, n)
        ok &= image_store.ok
        for i in missing:
            if contents[i] is None:
                ok[i] = False
        if features is None:
            features = torch.zeros(n, views, *([1, 1, 1] if self.blocks else [1]), dtype=torch.float32)
        return FeatureStore(paths, features, ok, self.blocks)

    def close(self) -> None:
        self._session = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
