"""Data-parallel training (``sdltag.nn.distributed``): real gloo processes on the CPU.

- 2 processes train the same weights as 1 with the same global batch and seed (no augmentation:
  the processes' augmentation draws differ by design). Batch norm runs over the global batch
  (``GlobalBatchNorm2d``), so the only difference is floating-point summation order: max abs
  difference of every weight and batch-norm statistic < ``TOLERANCE``.
- A killed process ends the other one with one clear line (no hang) and rank 0 leaves a resumable
  ``last.pt``; resuming it with 1 process ends with the weights of the uninterrupted run.
- Bad launches: an unreachable rendezvous, a missing backend, a batch that does not split.

The processes are started with the environment torchrun gives them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); ``torchrun`` itself only adds its agent around them. They are forked from a
server that imported torch once (see ``PRELOAD``), so the test spends its time training, not importing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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

# The worker processes are forked from a multiprocessing forkserver that has imported torch (and the
# torch._dynamo that torch's optimizers import on first use) once: a fresh interpreter per rank spent
# most of this test's time importing them, twice per launch. Each rank is still its own process with
# its own gloo connection, environment (what torchrun sets) and stdout/stderr, and is killed for real.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "sdltag.nn.train", "sdltag.nn.distributed"]


def _forkserver():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _worker(settings: dict, env: dict[str, str], log: str) -> None:
    """One rank: the environment torchrun gives it, its output to ``log``, then ``train`` as the command runs it."""
    import signal

    from tests.test_train import HashEmbedder

    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    kill_at = settings.pop("kill_rank1_at_step", None)
    options = RuntimeOptions(workers=0, threads=1, dist_timeout=settings.pop("dist_timeout", 20.0))
    options.resume = settings.pop("resume", False)
    if kill_at is not None and env.get("RANK") == "1":
        original, calls = distributed.sync_step, [0]

        def sync_step(*args):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args)

        distributed.sync_step = sync_step
    try:
        train(TrainConfig(**settings), options, embedder=HashEmbedder())
    except SdltagError as exc:
        print(f"sdltag: error: {exc}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(exc.exit_code)
    sys.stdout.flush()
    sys.stderr.flush()


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
    """Start ``world`` worker processes with the environment torchrun gives them, wait for all of them
    (``world`` 0: one process not launched by torchrun, as ``sdltag train`` runs alone)."""
    context = _forkserver()
    port = _free_port()
    procs = []
    for rank in range(max(world, 1)):
        env = {"OMP_NUM_THREADS": "1"}
        if world:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = tmp_path / f"rank{rank}.log"
        proc = context.Process(target=_worker, args=(dict(settings), env, str(log)), daemon=True)
        proc.start()
        procs.append((proc, log))
    results = []
    for proc, log in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
            proc.join()
        text = log.read_text(encoding="utf-8", errors="replace")
        results.append(subprocess.CompletedProcess([str(proc.pid)], proc.exitcode, "", text))
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
    """The reference: one process, global batch 8, 2 epochs (as ``sdltag train`` runs without torchrun)."""
    out = tmp_path_factory.mktemp("one") / "model"
    (result,) = _launch(out.parent, _settings(scenes, out), world=0)
    assert result.returncode == 0, result.stderr
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
    (result,) = _launch(tmp_path, _settings(scenes, out, resume=True), world=0)
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").is_file()
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
