"""Training: the loss goes down, resume is exact, the export matches the checkpoint, bad images are skipped.

Tiny runs: 16-24 px generated images, a width-8 smallcnn, a few steps, and fixed random
label vectors (``HashEmbedder``) so no text model loads; tests/test_train_cli.py runs the
real command with the real MiniLM.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdltag import log
from sdltag.errors import SdltagError
from sdltag.modelfolder import EmbedderSpec
from sdltag.nn.augment import AugmentConfig
from sdltag.nn.checkpoint import load_checkpoint
from sdltag.nn.train import RuntimeOptions, TrainConfig, TrainingInterrupted, TrainReporter, train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
NO_AUGMENT = AugmentConfig.off().to_dict()


class HashEmbedder:
    """Fixed random unit vectors per text (seeded by its hash): a stand-in for a text model."""

    def __init__(self, dim: int = 16, name: str = "hash") -> None:
        self.spec = EmbedderSpec("sentence-transformers", name, f"{name}@sha256:0", dim)

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            rng = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
            vector = rng.normal(size=self.spec.dim)
            rows.append(vector / np.linalg.norm(vector))
        return np.asarray(rows, dtype=np.float32)


class Recorder(TrainReporter):
    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.epochs: list[tuple[int, dict | None, bool]] = []
        self.stop_at = stop_at

    def step(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
        self.losses.append(loss)
        if self.stop_at is not None and step == self.stop_at:
            raise KeyboardInterrupt  # what Ctrl-C does between two steps

    def epoch_end(self, epoch: int, train_loss: float, metrics: dict | None, best: bool) -> None:
        self.epochs.append((epoch, metrics, best))


def make_scenes(root: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    """``n`` images with 1-2 coloured squares on grey; labels = the colours (labels.csv)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = np.full((size, size, 3), 128, np.uint8)
        names = list(rng.choice(list(COLOURS), size=int(rng.integers(1, 3)), replace=False))
        for name in names:
            x, y = rng.integers(0, size // 2, 2)
            pixels[y : y + size // 2, x : x + size // 2] = COLOURS[name]
        Image.fromarray(pixels).save(root / f"img{i:03d}.png")
        rows.append(f"img{i:03d}.png,{';'.join(names)}")
    (root / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=str(data), out=str(out), width=8, image_size=16, rows=3, epochs=2, batch_size=8, lr=3e-3, val_split=0.25
    )
    settings.update(overrides)
    return TrainConfig(**settings)


OPTIONS = dict(workers=0, threads=1)


def test_a_few_steps_lower_the_loss(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 16)
    recorder = Recorder()
    # Every step sees the same 16 images without augmentation, so the loss must fall.
    config = tiny_config(
        data, tmp_path / "model", epochs=12, batch_size=16, val_split=0.0, lr=1e-2, warmup=0.01, augment=NO_AUGMENT
    )
    result = train(config, RuntimeOptions(**OPTIONS), embedder=HashEmbedder(), reporter=recorder)
    assert len(recorder.losses) == 12
    assert np.isfinite(recorder.losses).all()
    assert np.mean(recorder.losses[-3:]) < 0.8 * np.mean(recorder.losses[:3])
    assert result.model_folder.manifest.seen_labels == sorted(COLOURS)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_after_interrupt_gives_the_same_weights(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 40)
    config = dict(epochs=3, batch_size=8, unseen=None)  # 30 training images -> 3 steps per epoch
    straight = train(
        tiny_config(data, tmp_path / "a", **config),
        RuntimeOptions(**OPTIONS),
        embedder=HashEmbedder(),
        reporter=Recorder(),
    )

    recorder = Recorder(stop_at=5)  # mid-way through the second epoch
    with pytest.raises(TrainingInterrupted) as caught:
        train(
            tiny_config(data, tmp_path / "b", **config),
            RuntimeOptions(**OPTIONS),
            embedder=HashEmbedder(),
            reporter=recorder,
        )
    saved = load_checkpoint(caught.value.checkpoint)
    assert (saved["epoch"], saved["step"], saved["step_in_epoch"]) == (1, 5, 2)
    assert not (tmp_path / "b").exists()  # nothing exported yet

    with pytest.raises(SdltagError, match="--resume"):  # a fresh start would clobber the run
        train(tiny_config(data, tmp_path / "b", **config), RuntimeOptions(**OPTIONS), embedder=HashEmbedder())
    labels_csv = data / "labels.csv"
    original = labels_csv.read_text(encoding="utf-8")
    labels_csv.write_text(original.replace("img000.png,", "img000.png,purple;"), encoding="utf-8")
    with pytest.raises(SdltagError, match="changed"):  # other data: an exact resume is impossible
        train(
            tiny_config(data, tmp_path / "b", **config), RuntimeOptions(resume=True, **OPTIONS), embedder=HashEmbedder()
        )
    labels_csv.write_text(original, encoding="utf-8")
    resumed_recorder = Recorder()
    resumed = train(
        tiny_config(data, tmp_path / "b", **config),
        RuntimeOptions(resume=True, **OPTIONS),
        embedder=HashEmbedder(),
        reporter=resumed_recorder,
    )
    assert len(resumed_recorder.losses) == 9 - 5

    a, b = _weights(straight.run_dir / "last.pt"), _weights(resumed.run_dir / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert straight.best_epoch == resumed.best_epoch
    assert straight.history == resumed.history


def test_export_agrees_with_the_checkpoint(tmp_path: Path) -> None:
    from sdltag.nn.export import model_from_checkpoint
    from sdltag.runtime import ImageModel

    data = make_scenes(tmp_path / "data", 24)
    (tmp_path / "unseen.txt").write_text("yellow\n", encoding="utf-8")
    result = train(
        tiny_config(data, tmp_path / "model", unseen=str(tmp_path / "unseen.txt")),
        RuntimeOptions(**OPTIONS),
        embedder=HashEmbedder(),
        reporter=Recorder(),
    )
    folder = result.model_folder
    manifest = folder.manifest
    assert manifest.seen_labels == ["blue", "green", "red"]
    assert manifest.unseen_labels == ["yellow"]
    assert manifest.calibration["method"] == "platt" and "a" in manifest.calibration["seen"]
    card = manifest.model_card
    assert {"data", "labels", "settings", "metrics", "calibration"} <= set(card)
    assert card["labels"] == {**card["labels"], "seen": 3, "unseen": 1}
    assert "zsl" in card["metrics"] and "gzsl" in card["metrics"]
    assert "## Metrics" in (folder.path / "MODEL_CARD.md").read_text(encoding="utf-8")

    checkpoint = load_checkpoint(folder.path / "checkpoint.pt")
    best = load_checkpoint(result.run_dir / "best.pt")
    for key, value in best["model"].items():
        torch.testing.assert_close(checkpoint["model"][key], value, rtol=0, atol=0)
    model = model_from_checkpoint(checkpoint)
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model(images).numpy()
    actual = ImageModel(folder, device="cpu").run(images.numpy())
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(folder.label_vectors, checkpoint["label_vectors"].numpy(), atol=0)


def test_fine_tuning_starts_from_the_given_model(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 16)
    first = train(
        tiny_config(data, tmp_path / "first", epochs=1, val_split=0.0),
        RuntimeOptions(**OPTIONS),
        embedder=HashEmbedder(),
        reporter=Recorder(),
    )
    # A vanishing learning rate: the fine-tuned weights stay those of --init.
    second = train(
        tiny_config(
            data,
            tmp_path / "second",
            epochs=1,
            val_split=0.0,
            lr=1e-12,
            width=4,
            rows=5,
            init=str(first.model_folder.path),
        ),
        RuntimeOptions(**OPTIONS),
        embedder=HashEmbedder(),
        reporter=Recorder(),
    )
    assert second.model_folder.manifest.rows == 3  # the architecture comes from --init
    before, after = _weights(first.model_folder.path / "checkpoint.pt"), _weights(second.run_dir / "last.pt")
    for key in before:
        if before[key].is_floating_point() and "running" not in key:
            torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=1e-6, msg=key)
    with pytest.raises(SdltagError, match="same embedder"):
        train(
            tiny_config(data, tmp_path / "third", init=str(first.model_folder.path)),
            RuntimeOptions(**OPTIONS),
            embedder=HashEmbedder(name="other"),
        )


def test_undecodable_images_are_reported_and_skipped(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 12)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "empty.png").write_bytes(b"")
    with open(data / "labels.csv", "a", encoding="utf-8") as handle:
        handle.write("broken.png,red\nempty.png,blue\n")
    with log.collect() as warnings:  # the sdltag logger's warnings (the CLI prints them as `sdltag: warning:`)
        result = train(
            tiny_config(data, tmp_path / "model", epochs=1, val_split=0.0),
            RuntimeOptions(**OPTIONS),
            embedder=HashEmbedder(),
            reporter=Recorder(),
        )
    assert result.model_folder.path.is_dir()
    assert sum("broken.png" in w for w in warnings) == 1
    assert sum("empty.png" in w for w in warnings) == 1


def test_bad_settings_and_data_are_refused(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 8)
    with pytest.raises(SdltagError, match="--lambda"):
        train(tiny_config(data, tmp_path / "m", lam=2.0), RuntimeOptions(**OPTIONS), embedder=HashEmbedder())
    with pytest.raises(SdltagError, match="nothing to resume"):
        train(tiny_config(data, tmp_path / "m"), RuntimeOptions(resume=True, **OPTIONS), embedder=HashEmbedder())
    (tmp_path / "all.txt").write_text("red\ngreen\nblue\n", encoding="utf-8")
    with pytest.raises(SdltagError, match="at least 2"):
        train(
            tiny_config(data, tmp_path / "m", unseen=str(tmp_path / "all.txt")),
            RuntimeOptions(**OPTIONS),
            embedder=HashEmbedder(),
        )


def test_cached_and_streamed_images_train_the_same(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 16)
    runs = []
    for name, cache_mb in (("cached", 64), ("streamed", 0)):
        result = train(
            tiny_config(data, tmp_path / name, epochs=1, val_split=0.0),
            RuntimeOptions(cache_mb=cache_mb, workers=0, threads=1),
            embedder=HashEmbedder(),
            reporter=Recorder(),
        )
        runs.append(_weights(result.run_dir / "last.pt"))
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], rtol=0, atol=0, msg=key)


def test_separate_validation_folder(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 16, seed=1)
    val = make_scenes(tmp_path / "val", 6, seed=2)
    with open(val / "labels.csv", "a", encoding="utf-8") as handle:  # a label never seen in training: ignored
        handle.write("img000.png,purple\n")
    recorder = Recorder()
    result = train(
        tiny_config(data, tmp_path / "model", epochs=1, val=str(val)),
        RuntimeOptions(**OPTIONS),
        embedder=HashEmbedder(),
        reporter=recorder,
    )
    card = result.model_folder.manifest.model_card
    assert (card["data"]["train_images"], card["data"]["validation_images"]) == (16, 6)
    assert recorder.epochs[0][1]["gzsl"]["images"] == 6
    assert card["calibration"]["fitted_on"] == "validation images"


def test_eval_reproduces_the_validation_metrics(tmp_path: Path) -> None:
    """`sdltag eval` (ONNX, tagging decode path) on the validation folder gives the model card's metrics."""
    from sdltag.evaluation import evaluate

    data = make_scenes(tmp_path / "data", 16, seed=3)
    val = make_scenes(tmp_path / "val", 10, seed=4)
    (tmp_path / "unseen.txt").write_text("blue\n", encoding="utf-8")
    result = train(
        # Trained enough that scores differ by far more than torch-vs-onnxruntime rounding (no near-ties).
        tiny_config(data, tmp_path / "model", epochs=10, lr=1e-2, val=str(val), unseen=str(tmp_path / "unseen.txt")),
        RuntimeOptions(**OPTIONS),
        embedder=HashEmbedder(),
        reporter=Recorder(),
    )
    card = result.model_folder.manifest.model_card["metrics"]
    report = evaluate(result.model_folder, val, threads=1).to_json()
    for protocol in ("gzsl", "zsl"):
        assert report[protocol]["images"] == card[protocol]["images"]
        assert report[protocol]["map"] == pytest.approx(card[protocol]["map"], abs=1e-3)
        assert report[protocol]["f1"] == pytest.approx(card[protocol]["f1"], abs=1e-3)


@pytest.mark.parametrize("images", [8, 9, 17])  # 1, 1 and 2 steps per epoch with batch 8
def test_any_number_of_steps_trains(tmp_path: Path, images: int) -> None:
    data = make_scenes(tmp_path / "data", images)
    recorder = Recorder()
    train(
        tiny_config(data, tmp_path / "model", epochs=10, val_split=0.0, augment=NO_AUGMENT),
        RuntimeOptions(**OPTIONS),
        embedder=HashEmbedder(),
        reporter=recorder,
    )
    assert len(recorder.losses) == 10 * max(1, images // 8)
    assert np.isfinite(recorder.losses).all()


@pytest.mark.slow
def test_compiled_training_step(tmp_path: Path) -> None:
    """--compile (torch.compile, about a minute to compile on 2 cores) trains and exports like eager mode."""
    data = make_scenes(tmp_path / "data", 16)
    recorder = Recorder()
    result = train(
        tiny_config(data, tmp_path / "model", epochs=2, val_split=0.25),
        RuntimeOptions(compile=True, **OPTIONS),
        embedder=HashEmbedder(),
        reporter=recorder,
    )
    assert np.isfinite(recorder.losses).all()
    checkpoint = load_checkpoint(result.run_dir / "last.pt")
    assert not any(key.startswith("_orig_mod") for key in checkpoint["model"])


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 10, 12, 30, 200])
@pytest.mark.parametrize("warmup", [0.0, 0.01, 0.1, 0.25, 0.5, 0.9])
def test_one_cycle_gives_torchs_onecycle_values(total_steps: int, warmup: float) -> None:
    """The explicit schedule equals torch's OneCycleLR (its defaults; earlier versions trained with it) exactly:
    learning rate and Adam beta1 at every step, so results and checkpoints of those versions stay the same."""
    from sdltag.nn.train import one_cycle

    pct_start = warmup
    if abs(warmup * total_steps - 1) < 1e-6 and total_steps > 1:
        pct_start = 1.5 / total_steps  # the peak half a step later: OneCycleLR divides 0 by 0 at step 0 otherwise
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=total_steps, pct_start=pct_start
    )
    for step in range(total_steps):
        group = optimizer.param_groups[0]
        assert one_cycle(step, total_steps, 3e-3, warmup) == (group["lr"], group["betas"][0]), step
        optimizer.step()
        scheduler.step()


def test_one_cycle_warms_up_then_decays() -> None:
    from sdltag.nn.train import one_cycle

    lrs = [one_cycle(step, 100, 1e-3, 0.1)[0] for step in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 9  # the peak at step 0.1 * 100 - 1
    assert (np.diff(lrs[:10]) > 0).all() and (np.diff(lrs[9:]) < 0).all()
    assert lrs[-1] == pytest.approx(1e-3 / 25 / 1e4)
    assert one_cycle(0, 4, 1e-3, 0.25)[0] == pytest.approx(1e-3 / 25)  # one warm-up step: no division by zero
