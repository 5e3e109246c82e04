"""Training throughput of the default backbone and its share of the CPU's float32 peak.

What is timed: the real training step of ``sdltag.nn.train`` (batched augmentation from
uint8 pixels, normalisation, forward, SDL loss against 1,000 seen labels, backward,
gradient clipping, Adam step, OneCycle step) on random images held in RAM, so image
decoding (done once, before training, for cached datasets) is not included.

FLOPs: forward multiply-accumulates of every Conv2d and Linear are counted with forward
hooks (2 FLOPs per MAC); a training step costs about 3x the forward pass (forward +
backward w.r.t. activations and weights). The share is taken against the nominal
520 GFLOP/s float32 peak of the 2-core machine and, as a baseline measured in the same
run, against a large float32 matrix multiply (what this machine reaches right now,
with whatever else is running). Because the machine is shared, each rate is also given
per CPU-second of this process (``time.process_time``): FLOPs per CPU-second against the
per-core peak (260 GFLOP/s) say how well the code uses the cores it actually got.

    .venv/bin/python benchmarks/bench_train.py [--steps 20] [--batch-size 64] [--threads 2]

Writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sdltag.modelfolder import InputSpec
from sdltag.nn.augment import AugmentConfig, augment_batch
from sdltag.nn.data import normalise
from sdltag.nn.loss import sdl_loss
from sdltag.nn.model import ModelConfig, SDLModel
from sdltag.nn.train import DEFAULT_IMAGE_SIZE, DEFAULT_MEAN, DEFAULT_STD, TrainConfig, _param_groups

NOMINAL_PEAK = 520e9  # float32 FLOP/s of the 2-core machine (AVX-512 FMA)
CORE_PEAK = NOMINAL_PEAK / 2
RESULTS = Path(__file__).parent / "results" / "train.json"


def forward_macs(model: torch.nn.Module, size: int) -> int:
    """Multiply-accumulates of one image's forward pass through Conv2d and Linear layers."""
    total = 0

    def conv_hook(module: torch.nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        total += output.numel() * kernel

    def linear_hook(module: torch.nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return total


def matmul_gflops(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Float32 GEMM throughput right now (best wall-clock GFLOP/s, GFLOP per CPU-second)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    cpu_start = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    cpu = time.process_time() - cpu_start
    return 2 * n**3 / best / 1e9, repeats * 2 * n**3 / cpu / 1e9


def train_throughput(
    batch_size: int, steps: int, channels_last: bool, labels: int = 1000, compile: bool = False
) -> tuple[float, float]:
    """Images per second and per CPU-second of full training steps of the default model (after 3 warm-ups)."""
    config = TrainConfig(data="", out="")
    size = DEFAULT_IMAGE_SIZE[config.backbone]
    spec = InputSpec(size, size, mean=DEFAULT_MEAN, std=DEFAULT_STD)
    torch.manual_seed(0)
    model = SDLModel(ModelConfig(config.backbone, {}, rows=config.rows, dim=384))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    step_model = torch.compile(model) if compile else model  # what `sdltag train --compile` does
    optimizer = torch.optim.Adam(_param_groups(model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps + 10)
    label_vectors = torch.nn.functional.normalize(torch.randn(labels, 384), dim=1)
    pixels = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    targets = (torch.rand(batch_size, labels) < 3 / labels).float()
    targets[:, 0] = 1
    generator = torch.Generator().manual_seed(0)
    augment = AugmentConfig()

    def step() -> None:
        x = normalise(augment_batch(pixels, (size, size), augment, generator), spec)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = sdl_loss(step_model(x), label_vectors, targets, lam=config.lam).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()

    for _ in range(3):
        step()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return batch_size * steps / wall, batch_size * steps / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step (~1 min compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(data="", out="")
    size = DEFAULT_IMAGE_SIZE[config.backbone]
    macs = forward_macs(SDLModel(ModelConfig(config.backbone, {}, rows=config.rows, dim=384)), size)
    train_flops_per_image = 3 * 2 * macs
    results = {}
    gemms = []
    variants = [("contiguous", False, False), ("channels_last", True, False)]
    if args.compile:
        variants.append(("compiled", False, True))
    for layout, channels_last, compiled in variants:
        gemm, gemm_cpu = matmul_gflops()  # measured right before, under the same load
        gemms.append(gemm)
        rate, rate_cpu = train_throughput(args.batch_size, args.steps, channels_last, compile=compiled)
        achieved, achieved_cpu = rate * train_flops_per_image, rate_cpu * train_flops_per_image
        results[layout] = {
            "images_per_s": round(rate, 1),
            "gflops": round(achieved / 1e9, 1),
            "share_of_520_gflops": round(achieved / NOMINAL_PEAK, 3),
            "gemm_gflops_same_moment": round(gemm, 1),
            "share_of_measured_gemm": round(achieved / (gemm * 1e9), 3),
            "images_per_cpu_s": round(rate_cpu, 1),
            "gflops_per_cpu_s": round(achieved_cpu / 1e9, 1),
            "share_of_core_peak_per_cpu_s": round(achieved_cpu / CORE_PEAK, 3),
            "gemm_share_of_core_peak_per_cpu_s": round(gemm_cpu * 1e9 / CORE_PEAK, 3),
        }
        print(
            f"{layout:>14}: {rate:6.1f} img/s  {achieved / 1e9:5.1f} GFLOP/s = {100 * achieved / NOMINAL_PEAK:4.1f}% "
            f"of 520, {100 * achieved / (gemm * 1e9):4.1f}% of GEMM ({gemm:.0f} GFLOP/s now); per CPU-second "
            f"{achieved_cpu / 1e9:5.1f} GFLOP = {100 * achieved_cpu / CORE_PEAK:4.1f}% of a core's peak "
            f"(GEMM {100 * gemm_cpu * 1e9 / CORE_PEAK:4.1f}%)"
        )
    gemm = sum(gemms) / len(gemms)
    report = {
        "backbone": config.backbone,
        "image_size": size,
        "batch_size": args.batch_size,
        "rows": config.rows,
        "dim": 384,
        "labels": 1000,
        "threads": args.threads,
        "forward_gflop_per_image": round(2 * macs / 1e9, 4),
        "train_gflop_per_image": round(train_flops_per_image / 1e9, 4),
        "measured_gemm_gflops": round(gemm, 1),
        "layouts": results,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"GEMM baseline {gemm:.1f} GFLOP/s; forward {2 * macs / 1e9:.3f} GFLOP/image; wrote {RESULTS}")


if __name__ == "__main__":
    main()
