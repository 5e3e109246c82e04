"""Run many recipe jobs side by side on one machine, within a deadline (the GPU runs of RESULTS.md).

One 3-epoch run of the benchmark takes about 25 minutes on this project's 2-core CPU;
on a machine with a GPU and 16 cores a run is mostly Python overhead, so several runs
share the GPU at once. This driver generates the scenes each job needs (in parallel
processes), then starts the jobs of ``CAMPAIGNS[name]`` in list order, ``--parallel`` at a
time, each as its own recipe process with its log in ``WORK/logs/NAME.log``. It never
starts a job that its cost estimate (``units`` x the slowest seconds-per-unit measured so
far) says cannot finish before ``--deadline-s``, and at the deadline interrupts what is
still running (the recipes save a resumable checkpoint on Ctrl-C). After every job it
rewrites ``OUT/results.tar.gz`` (the recipes' result files, every log, the scene
generators' summaries, the test splits' labels and ``campaign.json``, the schedule as
it ran), and packs the model folders of ``keep`` jobs into ``OUT/model-NAME.tar``, so a
run cut short still returns everything finished.

A job's ``lam="auto"`` is resolved when it starts: the lambda of the ``lam-sweep`` jobs
with the best mean of validation ZSL and GZSL mAP (validation scenes, never the test
scenes); a job whose resolved lambda is ``skip_lam`` (already in the table) is skipped::

    python -m benchmarks.campaign --campaign gpu --data DATA --work /tmp/w \\
        --label-vectors label-vectors.npz --out OUT --deadline-s 530
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._recipes import log

RESULTS = Path(__file__).with_name("results")
DEFAULT_LAM = 0.1


@dataclass
class Job:
    name: str
    units: float  # cost relative to one 3-epoch run of the main protocol
    data: str  # "main", "xs" or "default": the scenes it needs
    module: str
    args: list[str]
    keep: bool = False  # pack the model folder into OUT
    group: str = ""  # "lam-sweep": its validation figures choose lam="auto"
    lam: str | None = None  # "auto": resolved at start
    skip_lam: float | None = None
    # filled while running
    state: str = "waiting"  # waiting, running, done, failed, skipped, not-started, interrupted
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    resolved_lam: float | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)


def _zsl(variant: str, seed: int, *, epochs: int = 3, lam: float | str = DEFAULT_LAM, protocol: str = "main") -> Job:
    budget = "" if epochs == 3 else f"-e{epochs}"
    lam_name = "auto" if lam == "auto" else f"{lam:g}"
    prefix = "zsl" if protocol == "main" else "xs"
    name = f"{prefix}-{variant}-lam{lam_name}{budget}-s{seed}"
    args = ["--variant", variant, "--seed", str(seed), "--epochs", str(epochs), "--protocol", protocol]
    if lam != "auto":
        args += ["--lam", f"{lam:g}"]
    return Job(name, epochs / 3, protocol, "benchmarks.recipe_emoji_zsl", args, lam="auto" if lam == "auto" else None)


def gpu_campaign() -> list[Job]:
    """What the GPU run of 27 November 2026 queued, most wanted first (RESULTS.md).

    The default model (longest), the lambda sweep (the later ``auto`` jobs wait for it),
    the missing seeds of the no-sigma row, the cross-style rows, 10-epoch runs of SDL
    and M=1, the SDL seeds at the chosen lambda, then the other 10-epoch seeds.
    """
    default = Job("emoji-default-e12", 5.5, "default", "benchmarks.recipe_emoji", ["--final-epochs", "12"], keep=True)
    jobs = [default]
    for lam in (0.1, 0.01, 0.3, 1.0):
        job = _zsl("sdl", 0, lam=lam)
        job.group, job.keep = "lam-sweep", lam != DEFAULT_LAM  # lambda 0.1 seed 0 is committed already
        jobs.append(job)
    jobs += [_zsl("nosigma", 1), _zsl("nosigma", 2)]
    for seed in (0, 1, 2):
        jobs += [_zsl("sdl", seed, protocol="xs"), _zsl("m1", seed, protocol="xs")]
    long_sdl = _zsl("sdl", 0, epochs=10)
    long_sdl.keep = True
    jobs += [long_sdl, _zsl("m1", 0, epochs=10)]
    for seed in (1, 2):
        job = _zsl("sdl", seed, lam="auto")
        job.skip_lam = DEFAULT_LAM
        jobs.append(job)
    for seed in (1, 2):
        jobs += [_zsl("sdl", seed, epochs=10), _zsl("m1", seed, epochs=10)]
    return jobs


def smoke_campaign() -> list[Job]:
    """Two 1-epoch jobs (and a default-model job of 1 final epoch), to try the driver on tiny data."""
    sweep = [_zsl("sdl", 0, epochs=1, lam=lam) for lam in (0.1, 0.3)]
    for job in sweep:
        job.group = "lam-sweep"
    auto = _zsl("sdl", 1, epochs=1, lam="auto")
    auto.skip_lam = DEFAULT_LAM
    auto.keep = True
    default = Job("emoji-default-e1", 2, "default", "benchmarks.recipe_emoji", ["--final-epochs", "1"], keep=True)
    return [default, *sweep, auto, _zsl("m1", 0, epochs=1, protocol="xs")]


CAMPAIGNS = {"gpu": gpu_campaign, "smoke": smoke_campaign}


class Campaign:
    def __init__(self, args: argparse.Namespace, jobs: list[Job]) -> None:
        self.args = args
        self.jobs = jobs
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.deadline_s
        self.data_ready: dict[str, bool] = {}
        self.generators: dict[str, subprocess.Popen] = {}
        self.logs = args.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started_wall = time.time()

    # ---- scenes -------------------------------------------------------------------------
    def _data_command(self, data: str, workers: int) -> list[str]:
        base = [sys.executable, "-m"]
        common = ["--data", str(self.args.data), "--work", str(self.args.work), "--data-only"]
        common += ["--workers", str(workers)]
        if data == "default":
            return [*base, "benchmarks.recipe_emoji", *common]
        return [*base, "benchmarks.recipe_emoji_zsl", *common, "--protocol", data]

    def start_data(self, data: str, workers: int) -> None:
        if data in self.generators or self.data_ready.get(data):
            return
        handle = open(self.logs / f"data-{data}.log", "w")  # noqa: SIM115 - closed with the process
        log(f"generating the {data} scenes ({workers} workers)")
        self.generators[data] = subprocess.Popen(
            self._data_command(data, workers), stdout=handle, stderr=subprocess.STDOUT
        )

    def poll_data(self) -> None:
        for data, process in list(self.generators.items()):
            code = process.poll()
            if code is not None:
                del self.generators[data]
                self.data_ready[data] = code == 0
                log(f"{data} scenes: {'ready' if code == 0 else f'FAILED ({code})'}")

    # ---- jobs ---------------------------------------------------------------------------
    def seconds_per_unit(self) -> float:
        rates = [
            (j.ended - j.started) / j.units
            for j in self.jobs
            if j.state == "done" and j.started is not None and j.ended is not None
        ]
        return max(rates) if rates else self.args.unit_s

    def _resolve_lam(self, job: Job) -> float | None | str:
        """The sweep's best lambda, "wait" while the sweep runs, None if nothing to choose from."""
        sweep = [j for j in self.jobs if j.group == "lam-sweep"]
        if any(j.state in ("waiting", "running") for j in sweep):
            return "wait"
        best: tuple[float, float] | None = None
        for j in sweep:
            record = RESULTS / f"{j.name}.json"
            if j.state != "done" or not record.is_file():
                continue
            validation = json.loads(record.read_text()).get("validation") or {}
            metrics = validation.get("metrics") or {}
            if "zsl" not in metrics or "gzsl" not in metrics:
                continue
            value = (metrics["zsl"]["map"] + metrics["gzsl"]["map"]) / 2
            lam = float(json.loads(record.read_text())["lam"])
            if best is None or value > best[0]:
                best = (value, lam)
        return None if best is None else best[1]

    def command(self, job: Job) -> list[str]:
        out = self.args.work / "models" / job.name
        command = [sys.executable, "-m", job.module, "--data", str(self.args.data), "--work", str(self.args.work)]
        command += ["--out", str(out), *job.args]
        command += ["--device", self.args.device, "--threads", str(self.args.threads)]
        command += ["--workers", str(self.args.job_workers)]
        if self.args.label_vectors:
            command += ["--label-vectors", str(self.args.label_vectors)]
        if job.module.endswith("recipe_emoji_zsl"):
            command += ["--eval-threads", str(self.args.threads)]
        if job.resolved_lam is not None:
            command += ["--lam", f"{job.resolved_lam:g}"]
        return command

    def try_start(self, job: Job) -> bool:
        if not self.data_ready.get(job.data):
            return False
        if job.lam == "auto":
            lam = self._resolve_lam(job)
            if lam == "wait":
                return False
            if lam is None or lam == job.skip_lam:
                job.state = "skipped"
                log(f"{job.name}: skipped (the sweep chose lambda {lam})")
                return False
            job.resolved_lam = float(lam)
            job.name = job.name.replace("lamauto", f"lam{job.resolved_lam:g}")
        left = self.deadline - time.monotonic()
        need = job.units * self.seconds_per_unit()
        if need > left:
            job.state = "not-started"
            log(f"{job.name}: not started (needs ~{need:.0f} s, {left:.0f} s left)")
            return False
        handle = open(self.logs / f"{job.name}.log", "w")  # noqa: SIM115 - closed with the process
        job.process = subprocess.Popen(
            self.command(job), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        job.state, job.started = "running", time.monotonic()
        log(f"{job.name}: started ({job.units:g} units, ~{need:.0f} s estimated)")
        return True

    def poll_jobs(self) -> bool:
        changed = False
        for job in self.jobs:
            if job.state == "running" and job.process is not None and job.process.poll() is not None:
                job.returncode, job.ended = job.process.returncode, time.monotonic()
                job.state = "done" if job.returncode == 0 else "failed"
                log(f"{job.name}: {job.state} ({job.returncode}) after {job.ended - job.started:.0f} s")
                if job.state == "done" and job.keep:
                    self.pack_model(job)
                changed = True
        return changed

    def stop_all(self) -> None:
        running = [j for j in self.jobs if j.state == "running" and j.process is not None]
        for job in running:
            log(f"{job.name}: deadline, interrupting")
            os.killpg(job.process.pid, signal.SIGINT)
        end = time.monotonic() + 15
        for job in running:
            try:
                job.process.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()
            job.state, job.ended, job.returncode = "interrupted", time.monotonic(), job.process.returncode
        for job in self.jobs:
            if job.state == "waiting":
                job.state = "not-started"
        for process in self.generators.values():
            process.kill()

    # ---- what comes back ----------------------------------------------------------------
    def pack_model(self, job: Job) -> None:
        folder = self.args.work / "models" / job.name
        target = self.args.out / f"model-{job.name}.tar"
        tmp = target.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name != "checkpoint.pt":
                    tar.add(path, arcname=f"{job.name}/{path.name}")
        tmp.replace(target)
        log(f"packed {target.name} ({target.stat().st_size / 2**20:.1f} MB)")

    def write_summary(self) -> None:
        summary = {
            "campaign": self.args.campaign,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started_wall)),
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "deadline_s": self.args.deadline_s,
            "parallel": self.args.parallel,
            "device": self.args.device,
            "seconds_per_unit": round(self.seconds_per_unit(), 1),
            "machine": machine_description(),
            "jobs": [
                {
                    "name": j.name,
                    "state": j.state,
                    "units": j.units,
                    "returncode": j.returncode,
                    "start_s": None if j.started is None else round(j.started - self.t0, 1),
                    "seconds": None if j.started is None or j.ended is None else round(j.ended - j.started, 1),
                    "command": " ".join(self.command(j)),
                }
                for j in self.jobs
            ],
        }
        (self.args.work / "campaign.json").write_text(json.dumps(summary, indent=2) + "\n")
        target = self.args.out / "results.tar.gz"
        tmp = target.with_suffix(".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.args.work / "campaign.json", arcname="campaign.json")
            for path in sorted(RESULTS.glob("*.json")):
                if path.stat().st_mtime >= self.started_wall:
                    tar.add(path, arcname=f"results/{path.name}")
            for path in sorted(self.logs.glob("*.log")):
                tar.add(path, arcname=f"logs/{path.name}")
            for split in sorted((self.args.work / "data").glob("*")):
                for name in ("generator.json", "labels.csv"):
                    if (split / name).is_file() and (name == "generator.json" or split.name.endswith("-test")):
                        tar.add(split / name, arcname=f"data/{split.name}/{name}")
            for card in sorted((self.args.work / "models").glob("*/MODEL_CARD.md")):
                tar.add(card, arcname=f"cards/{card.parent.name}.md")
        tmp.replace(target)

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        self.args.out.mkdir(parents=True, exist_ok=True)
        # "default" first: its scenes include the main protocol's training and validation
        # splits, so "main" then only adds its test split and both are ready together.
        needed = [d for d in ("default", "main", "xs") if any(j.data == d for j in self.jobs)]
        cpus = os.cpu_count() or 2
        # The first split gets every core; the others are generated while the first jobs run.
        if needed:
            self.start_data(needed[0], cpus)
        last_write = 0.0
        while True:
            self.poll_data()
            if not self.generators:
                pending = [d for d in needed if d not in self.data_ready]
                if pending:
                    self.start_data(pending[0], max(cpus // 2, 1))
            changed = self.poll_jobs()
            running = sum(j.state == "running" for j in self.jobs)
            for job in self.jobs:
                if running >= self.args.parallel:
                    break
                if job.state == "waiting" and self.try_start(job):
                    running += 1
                    changed = True
            if changed or time.monotonic() - last_write > 30:
                self.write_summary()
                last_write = time.monotonic()
            waiting = [j for j in self.jobs if j.state in ("waiting", "running")]
            if not waiting:
                break
            blocked = {j.data for j in waiting if j.state == "waiting"}
            no_data = all(self.data_ready.get(d) is False for d in blocked)
            if no_data and not any(j.state == "running" for j in self.jobs):  # every scene generator failed
                for job in waiting:
                    job.state = "failed"
                break
            if time.monotonic() >= self.deadline:
                self.stop_all()
                break
            time.sleep(1)
        self.write_summary()
        states = {s: sum(j.state == s for j in self.jobs) for s in {j.state for j in self.jobs}}
        log(f"campaign over after {time.monotonic() - self.t0:.0f} s: {states}")
        return 0


def machine_description() -> dict[str, object]:
    info: dict[str, object] = {"cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - a description only
        info["torch"] = f"unavailable ({exc})"
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a campaign of recipe jobs side by side, within a deadline.")
    parser.add_argument("--campaign", choices=sorted(CAMPAIGNS), default="gpu")
    parser.add_argument("--data", type=Path, required=True, help="The emoji data folder.")
    parser.add_argument("--work", type=Path, required=True, help="Scratch folder (scenes, runs, models, logs).")
    parser.add_argument("--out", type=Path, required=True, help="Where results.tar.gz and model tars go.")
    parser.add_argument("--label-vectors", type=Path, default=None, help="From benchmarks.label_vectors.")
    parser.add_argument("--deadline-s", type=float, default=530.0, help="Interrupt everything after this.")
    parser.add_argument("--parallel", type=int, default=8, help="Jobs at once (default 8).")
    parser.add_argument("--threads", type=int, default=2, help="torch / eval threads per job (default 2).")
    parser.add_argument(
        "--job-workers", type=int, default=2, help="Decoding processes per job (0: in the job's own process)."
    )
    parser.add_argument("--device", default="auto", help="Training device of every job (default auto).")
    parser.add_argument(
        "--unit-s", type=float, default=150.0, help="Seconds per unit assumed until a job has finished."
    )
    parser.add_argument("--only", nargs="*", default=None, help="Run only the jobs with these names.")
    args = parser.parse_args(argv)
    args.work = args.work.absolute()
    args.out = args.out.absolute()
    jobs = CAMPAIGNS[args.campaign]()
    if args.only:
        jobs = [j for j in jobs if j.name in set(args.only)]
    return Campaign(args, jobs).run()


if __name__ == "__main__":
    sys.exit(main())
