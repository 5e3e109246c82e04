"""Data-parallel training on several processes or machines: ``torchrun ... -m sdltag train``.

sdltag does not launch processes itself: ``torchrun`` (PyTorch's launcher) starts them and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``setup``
reads them and joins ``torch.distributed`` (gloo on CPUs, NCCL on GPUs, one GPU per
process: ``cuda:LOCAL_RANK``). Without ``WORLD_SIZE`` > 1 training runs in one process as
before.

What makes N processes the same training as one:

- **Batches.** The global batch stays ``--batch-size``. Each epoch's global batches are
  drawn from (seed, epoch) exactly as in one process; every process takes its contiguous
  share of each global batch (``shard``): per-process batch = global batch / world size.
- **Loss and gradients.** Each process's loss is weighted by its share of the batch's
  labelled images, so DistributedDataParallel's gradient average is the gradient of the
  global batch's mean loss.
- **Batch norm.** ``GlobalBatchNorm2d`` normalises with the statistics of the whole global
  batch (summed over the processes, gradients included), as one process with that batch
  would; the running statistics match too. (torch's ``SyncBatchNorm`` does the same but only
  on GPUs; this one runs on gloo and NCCL alike.)
- **Randomness.** Augmentation draws come from a generator per process seeded from
  (seed, rank); rank 0's is the one-process generator. With augmentation the runs are the
  same procedure with other random draws; without it they give the same weights up to
  floating-point summation order (``tests/test_distributed.py``).

Per step the processes agree on the batch's size, its labelled images and whether to stop
(Ctrl-C or SIGTERM on any of them) with one small all-reduce, so they always stop at the
same step and save one consistent checkpoint. Every collective has a timeout
(``--dist-timeout``): a process that died or stopped answering ends the others with one
clear line instead of a hang, and rank 0 saves the last consistent state as ``last.pt``.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sdltag.errors import SdltagError

DEFAULT_TIMEOUT_S = 300.0
BACKENDS = ("auto", "gloo", "nccl")
FAILED_EXIT = 1  # the run started and failed (a launch problem is a usage error, 2)


@dataclass
class DistContext:
    """This process's place in the run; ``world_size`` 1 means no torch.distributed at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}: backend {self.backend}, device {self.device}"


def launched() -> bool:
    """Whether torchrun (or a launcher setting the same variables) started more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return True  # setup reports the bad value


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)  # type: ignore[arg-type]  # an unset variable (None) is the TypeError below
    except (TypeError, ValueError):
        raise SdltagError(
            f"{name}={value!r}: not a number. Launch with `torchrun --nproc_per_node N -m sdltag train ...`, "
            "which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."
        ) from None


def setup(device: str = "auto", backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext | None:
    """Join the process group torchrun describes in the environment; None when not launched that way.

    Raises ``SdltagError`` (one line, exit code 2) for a bad launch: missing or inconsistent
    variables, a backend this torch lacks or that does not fit the device, more local
    processes than GPUs, or a rendezvous that cannot be reached (or not all processes
    arriving) within ``timeout_s``.
    """
    if not launched():
        return None
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise SdltagError(f"--dist-backend {backend}: choose {', '.join(BACKENDS)}.")
    if timeout_s <= 0:
        raise SdltagError(f"--dist-timeout {timeout_s:g}: must be positive (seconds).")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    world = _env_int("WORLD_SIZE")
    if missing:
        raise SdltagError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with "
            "`torchrun --nproc_per_node N -m sdltag train ...` (it sets them all)."
        )
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK") if os.environ.get("LOCAL_RANK") else rank
    if not 0 <= rank < world:
        raise SdltagError(f"RANK={rank} with WORLD_SIZE={world}: the rank must be 0 to {world - 1}.")
    if not dist.is_available():
        raise SdltagError("this torch build has no torch.distributed: install the standard torch wheel.")
    if device not in ("auto", "cpu", "cuda"):
        raise SdltagError(f"--device {device}: choose auto, cpu or cuda.")
    use_cuda = device == "cuda" or (device == "auto" and backend != "gloo" and torch.cuda.is_available())
    if backend == "nccl":
        use_cuda = True
    if use_cuda and not torch.cuda.is_available():
        raise SdltagError(
            f"--dist-backend {backend} --device {device}: torch sees no CUDA GPU, and NCCL needs one. "
            "Use --device cpu (gloo)."
        )
    name = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
    if name == "nccl" and not dist.is_nccl_available():
        raise SdltagError("--dist-backend nccl: this torch build has no NCCL. Use --dist-backend gloo.")
    if name == "gloo" and not dist.is_gloo_available():
        raise SdltagError("--dist-backend gloo: this torch build has no gloo. Use --dist-backend nccl on GPUs.")
    if use_cuda:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise SdltagError(
                f"LOCAL_RANK={local_rank} but this machine has {count} visible GPU(s): start at most {count} "
                "process(es) per machine (torchrun --nproc_per_node)."
            )
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(
            name, init_method="env://", rank=rank, world_size=world, timeout=_dt.timedelta(seconds=timeout_s)
        )
    except Exception as exc:  # noqa: BLE001 - DistStoreError, DistNetworkError, RuntimeError, ValueError ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SdltagError(
            f"rank {rank} of {world} could not join the other processes at {address} within {timeout_s:g} s "
            f"({reason}). Check that all {world} processes were started (torchrun --nnodes and --nproc_per_node "
            "on every machine), that the rendezvous address is reachable from here, or raise --dist-timeout."
        ) from None
    context = DistContext(rank, world, local_rank, name, where, timeout_s)
    print(f"sdltag: {context.describe()}", file=sys.stderr, flush=True)
    return context


def teardown(context: DistContext | None) -> None:
    import torch.distributed as dist

    if context is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001,S110 - a broken group cannot be torn down cleanly; the process ends anyway
            pass


def check_batch(context: DistContext, batch_size: int, resumed_from: int | None = None) -> None:
    """The global batch must split evenly over the processes (per-process batch = global / world)."""
    if batch_size % context.world_size:
        sizes = [n for n in range(1, batch_size + 1) if batch_size % n == 0 and n <= 64]
        origin = f" (the run being resumed started with {resumed_from})" if resumed_from else ""
        raise SdltagError(
            f"--batch-size {batch_size} does not split evenly over {context.world_size} processes{origin}: "
            f"start a number of processes that divides it ({', '.join(map(str, sizes))})."
        )


def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank's contiguous share of one global batch (shares differ by at most one image)."""
    n = len(batch)
    return batch[rank * n // world_size : (rank + 1) * n // world_size]


def rank_seed(seed: int, rank: int) -> int:
    """The augmentation generator's seed of ``rank``; rank 0 keeps ``seed`` (the one-process run's)."""
    return seed if rank == 0 else seed * 1_000_003 + 7_919 * rank


def _device_for(context: DistContext) -> torch.device:
    return context.device if context.backend == "nccl" else torch.device("cpu")


def sync_step(context: DistContext, images: int, labelled: int, stop: bool) -> tuple[int, int, bool]:
    """One all-reduce per step: the global batch's images and labelled images, and whether any process stops."""
    values = torch.tensor([images, labelled, int(stop)], dtype=torch.float64, device=_device_for(context))
    import torch.distributed as dist

    dist.all_reduce(values)
    total, kept, stops = (int(v) for v in values.tolist())
    return total, kept, stops > 0


def any_true(context: DistContext, flag: bool) -> bool:
    import torch.distributed as dist

    value = torch.tensor([int(flag)], dtype=torch.int64, device=_device_for(context))
    dist.all_reduce(value)
    return bool(value.item())


def mean_loss(context: DistContext, weighted: float) -> float:
    """The global batch's loss from each process's weighted share (the shares sum to world_size x loss)."""
    import torch.distributed as dist

    value = torch.tensor([weighted], dtype=torch.float64, device=_device_for(context))
    dist.all_reduce(value)
    return float(value.item()) / context.world_size


def gather_states(context: DistContext, state: Tensor) -> list[Tensor]:
    """Every process's generator state (uint8 tensors of one size) -> a list by rank."""
    import torch.distributed as dist

    local = state.to(_device_for(context))
    parts = [torch.empty_like(local) for _ in range(context.world_size)]
    dist.all_gather(parts, local)
    return [p.cpu() for p in parts]


def barrier(context: DistContext) -> None:
    import torch.distributed as dist

    if context.backend == "nccl":
        dist.barrier(device_ids=[context.local_rank])
    else:
        dist.barrier()


def is_collective_failure(exc: BaseException) -> bool:
    """An error of torch.distributed itself: a peer that died, a timeout, a broken connection."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "process group", "peer")
    )


def failure_message(context: DistContext, exc: BaseException, checkpoint: str | None) -> str:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(reason) > 200:
        reason = reason[:200] + "..."
    where = (
        f"a resumable checkpoint is in {checkpoint}; run the same command with --resume (any number of processes "
        "that divides --batch-size)"
        if checkpoint
        else "rank 0 keeps the checkpoints: if it wrote one, run the same command with --resume"
    )
    return (
        f"rank {context.rank} of {context.world_size}: another training process stopped or did not answer within "
        f"{context.timeout_s:g} s ({reason}); {where}."
    )


# -- batch norm over the global batch ----------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # noqa: ANN401
        import torch.distributed as dist

        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: ANN401
        return _AllReduceSum.apply(grad)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch (all processes).

    Same parameters and buffers as ``nn.BatchNorm2d`` (the class of a module is swapped in
    place by ``convert_batchnorm``), so checkpoints and exports do not change. Mean and
    variance are computed in two passes (sum, then sum of squared deviations), each
    all-reduced with autograd, so gradients flow through the statistics as in one process.
    """

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        channels = x.shape[1]
        shape = (1, channels, 1, 1)
        xf = x.float()
        count = torch.full((1,), x.numel() / max(channels, 1), dtype=torch.float32, device=x.device)
        totals = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), count]))
        n = totals[-1].detach()
        mean = totals[:channels] / n
        centered = xf - mean.view(shape)
        var = all_reduce((centered * centered).sum(dim=(0, 2, 3))) / n  # biased, as batch norm normalises
        tracked = self.num_batches_tracked
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            assert tracked is not None  # batch norm keeps the count whenever it tracks running statistics
            with torch.no_grad():
                tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(model: nn.Module) -> int:
    """Make every plain ``nn.BatchNorm2d`` of ``model`` a ``GlobalBatchNorm2d``; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
            count += 1
    return count


def revert_batchnorm(model: nn.Module) -> None:
    """Undo ``convert_batchnorm`` (before exporting)."""
    for module in model.modules():
        if type(module) is GlobalBatchNorm2d:
            module.__class__ = nn.BatchNorm2d  # type: ignore[assignment]  # mypy refuses any change of class


def wrap(module: nn.Module, context: DistContext) -> nn.Module:
    """DistributedDataParallel around ``module`` (gradients averaged over the processes)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [context.local_rank] if context.device.type == "cuda" else None
    # Buffers (batch-norm running statistics) are identical on every process: GlobalBatchNorm2d computes them
    # from the global batch, so there is nothing to broadcast at each forward.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


@contextmanager
def stop_on_sigterm(flag: Any) -> Iterator[None]:
    """SIGTERM (torchrun stopping its workers, a cluster's scheduler) sets ``flag.raised`` like a first Ctrl-C."""
    import signal
    import threading

    if flag is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        flag.raised = True

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
