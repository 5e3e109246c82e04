"""Data-parallel training (``sdltag.nn.distributed``): real gloo processes on the CPU.

- 2 processes train the same weights as 1 with the same global batch and seed (no augmentation:
  the processes' augmentation draws differ by design). Batch norm runs over the global batch
  (``GlobalBatchNorm2d``), so the only difference is floating-point summation order: max abs
  difference of every weight and batch-norm statistic < ``TOLERANCE``.
- A killed process ends the other one with one clear line (no hang) and rank 0 leaves a resumable
  ``last.pt``; resuming it with 1 process ends with the weights of the uninterrupted run.
- Bad launches: an unreachable rendezvous, a missing backend, a batch that does not split.

The processes are started with the environment torchrun gives them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); ``torchrun`` itself only adds its agent around them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sdltag.errors import SdltagError
from sdltag.nn import distributed
from sdltag.nn.augment import AugmentConfig
from sdltag.nn.checkpoint import load_checkpoint
from sdltag.nn.train import RuntimeOptions, TrainConfig, _epoch_batches, train

# Measured: 4e-6 after 6 Adam steps. For scale: one process fed each batch in reverse order lands 2e-6 away
# (summation order), and 2 processes with per-process batch norm instead of GlobalBatchNorm2d 0.14 away. At
# 16x16 or lr 3e-3 this tiny net is chaotic (a reversed batch alone moves the weights by 0.03), hence 32x32, 1e-4.
TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import hashlib, json, os, signal, sys
    import numpy as np
    from sdltag.errors import SdltagError
    from sdltag.modelfolder import EmbedderSpec
    from sdltag.nn import distributed
    from sdltag.nn.train import RuntimeOptions, TrainConfig, train

    class HashEmbedder:
        def __init__(self, dim=16):
            self.spec = EmbedderSpec("sentence-transformers", "hash", "hash@sha256:0", dim)

        def embed(self, texts):
            rows = []
            for text in texts:
                rng = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
                v = rng.normal(size=self.spec.dim)
                rows.append(v / np.linalg.norm(v))
            return np.asarray(rows, dtype=np.float32)

    settings = json.loads(sys.argv[1])
    kill_at = settings.pop("kill_rank1_at_step", None)
    timeout = settings.pop("dist_timeout", 20.0)
    if kill_at is not None and os.environ["RANK"] == "1":
        original, calls = distributed.sync_step, [0]

        def sync_step(*args):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args)

        distributed.sync_step = sync_step
    try:
        train(
            TrainConfig(**settings),
            RuntimeOptions(workers=0, threads=1, dist_timeout=timeout),
            embedder=HashEmbedder(),
        )
    except SdltagError as exc:
        print(f"sdltag: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(data: Path, out: Path, **overrides) -> dict:
    settings = dict(
        data=str(data),
        out=str(out),
        width=8,
        image_size=32,
        rows=3,
        epochs=2,
        batch_size=8,
        lr=1e-4,
        val_split=0.0,
        augment=AugmentConfig.off().to_dict(),
    )
    settings.update(overrides)
    return settings


def _launch(tmp_path: Path, settings: dict, world: int = 2) -> list[subprocess.CompletedProcess]:
    """Start ``world`` worker processes as torchrun would, wait for all of them."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), json.dumps(settings)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_train import make_scenes

    return make_scenes(tmp_path_factory.mktemp("dist") / "data", 24)  # 24 images, batch 8: 3 steps per epoch


@pytest.fixture(scope="module")
def one_process(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The reference: one process, global batch 8, 2 epochs."""
    from tests.test_train import HashEmbedder

    out = tmp_path_factory.mktemp("one") / "model"
    train(TrainConfig(**_settings(scenes, out)), RuntimeOptions(workers=0, threads=1), embedder=HashEmbedder())
    return load_checkpoint(out.with_name("model.train") / "last.pt")["model"]


def test_two_processes_train_the_weights_of_one(
    scenes: Path, one_process: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    out = tmp_path / "model"
    results = _launch(tmp_path, _settings(scenes, out))
    for rank, result in enumerate(results):
        assert result.returncode == 0, result.stderr
        assert f"sdltag: rank {rank} of 2: backend gloo, device cpu" in result.stderr
    state = load_checkpoint(out.with_name("model.train") / "last.pt")
    assert state["world_size"] == 2 and state["step"] == 6
    assert len(state["rng"]["ranks"]) == 2
    assert _max_diff(state["model"], one_process) < TOLERANCE  # weights and batch-norm running statistics
    assert (out / "manifest.json").is_file()  # rank 0 exported the model folder


def test_a_killed_process_fails_the_run_with_a_resumable_checkpoint(
    scenes: Path, one_process: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    from tests.test_train import HashEmbedder

    out = tmp_path / "model"
    # rank 1 is killed (SIGKILL) as it starts step 5 of 6, in the second epoch
    results = _launch(tmp_path, _settings(scenes, out, kill_rank1_at_step=5))
    assert results[1].returncode == -9
    assert results[0].returncode == distributed.FAILED_EXIT, results[0].stderr
    lines = [line for line in results[0].stderr.splitlines() if line.startswith("sdltag: error:")]
    assert len(lines) == 1, results[0].stderr
    assert "another training process stopped" in lines[0] and "--resume" in lines[0]
    state = load_checkpoint(out.with_name("model.train") / "last.pt")
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, 4, 1)  # the last complete step
    assert not (out / "manifest.json").exists()

    # Resume with another world size (1 process): the same global batches, so the same weights.
    result = train(
        TrainConfig(**_settings(scenes, out)),
        RuntimeOptions(workers=0, threads=1, resume=True),
        embedder=HashEmbedder(),
    )
    assert result.model_folder is not None
    final = load_checkpoint(out.with_name("model.train") / "last.pt")
    assert final["step"] == 6 and final["world_size"] == 1
    assert _max_diff(final["model"], one_process) < TOLERANCE


def test_shards_split_each_global_batch_reproducibly() -> None:
    batches = _epoch_batches(50, 8, seed=3, epoch=2)
    assert batches == _epoch_batches(50, 8, seed=3, epoch=2)
    assert batches != _epoch_batches(50, 8, seed=3, epoch=1)
    for world in (1, 2, 4, 8):
        for batch in batches:
            shares = [distributed.shard(batch, rank, world) for rank in range(world)]
            assert sum(shares, []) == batch  # the processes together see exactly the global batch
            assert {len(s) for s in shares} == {8 // world}
    assert [len(distributed.shard(list(range(5)), r, 2)) for r in range(2)] == [2, 3]


def test_a_batch_that_does_not_split_is_refused() -> None:
    context = distributed.DistContext(rank=0, world_size=3)
    with pytest.raises(SdltagError, match=r"--batch-size 64 does not split evenly over 3 processes.*1, 2, 4, 8"):
        distributed.check_batch(context, 64)
    with pytest.raises(SdltagError, match="started with 2"):
        distributed.check_batch(context, 8, resumed_from=2)
    distributed.check_batch(context, 6)


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, port: int) -> None:
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world), ("MASTER_PORT", port)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")


def test_bad_launches_end_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.setup() is None  # not launched by torchrun: one process, as before
    _torchrun_env(monkeypatch, 0, 2, _free_port())
    if not torch.cuda.is_available():
        with pytest.raises(SdltagError, match="NCCL needs one"):
            distributed.setup("auto", "nccl")
    with pytest.raises(SdltagError, match="--dist-backend mpi: choose auto, gloo, nccl"):
        distributed.setup("cpu", "mpi")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(SdltagError, match="MASTER_PORT not set"):
        distributed.setup("cpu")
    _torchrun_env(monkeypatch, 2, 2, _free_port())
    with pytest.raises(SdltagError, match="RANK=2 with WORLD_SIZE=2"):
        distributed.setup("cpu")


def test_an_unreachable_rendezvous_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second machine whose rendezvous address answers nothing: refused within the timeout."""
    _torchrun_env(monkeypatch, 1, 2, _free_port())  # nobody listens there
    with pytest.raises(
        SdltagError, match=r"rank 1 of 2 could not join the other processes at 127\.0\.0\.1:\d+ within 1 s"
    ):
        distributed.setup("cpu", timeout_s=1)


@pytest.mark.slow
def test_an_unreachable_rendezvous_fails_the_command_in_one_line(tmp_path: Path, scenes: Path) -> None:
    """The real command, as a second machine whose rendezvous address answers nothing."""
    env = {
        **os.environ,
        "RANK": "1",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),  # nobody listens there
        "PYTHONPATH": str(REPO),
    }
    command = [sys.executable, "-m", "sdltag", "train", str(scenes), "--out", str(tmp_path / "m"), "--device", "cpu"]
    result = subprocess.run(command + ["--dist-timeout", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("sdltag:")]
    assert len(lines) == 1, result.stderr
    assert "rank 1 of 2 could not join the other processes at 127.0.0.1:" in lines[0]
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()
