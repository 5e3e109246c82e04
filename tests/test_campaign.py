"""benchmarks.campaign: jobs that cannot finish in time are not started; lambda "auto" is chosen on validation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import benchmarks.campaign as campaign
from benchmarks.campaign import Campaign, Job, _zsl


def _args(tmp_path: Path, deadline_s: float = 100.0, unit_s: float = 60.0) -> argparse.Namespace:
    return argparse.Namespace(
        campaign="test", data=tmp_path / "emoji", work=tmp_path / "work", out=tmp_path / "out", label_vectors=None,
        deadline_s=deadline_s, parallel=2, threads=1, job_workers=0, device="cpu", unit_s=unit_s,
    )  # fmt: skip


def _record(folder: Path, name: str, lam: float, val_zsl: float, val_gzsl: float) -> None:
    block = lambda m: {"map": m, "f1": {"3": m, "5": m}}  # noqa: E731
    record = {"lam": lam, "metrics": {}, "validation": {"metrics": {"zsl": block(val_zsl), "gzsl": block(val_gzsl)}}}
    (folder / f"{name}.json").write_text(json.dumps(record))


def test_a_job_that_cannot_finish_before_the_deadline_is_not_started(tmp_path: Path) -> None:
    short, long = _zsl("sdl", 0, epochs=1), _zsl("sdl", 0, epochs=9)  # 1/3 and 3 units
    run = Campaign(_args(tmp_path, deadline_s=100.0, unit_s=60.0), [short, long])
    run.data_ready["main"] = True
    assert run.try_start(long) is False and long.state == "not-started"  # ~180 s > 100 s left
    done = Job("done", 1.0, "main", "m", [], state="done", started=0.0, ended=200.0)
    run.jobs.append(done)
    assert run.seconds_per_unit() == 200.0  # measured pace replaces the guess (the slowest job counts)


def test_lambda_auto_waits_for_the_sweep_then_takes_the_best_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(campaign, "RESULTS", tmp_path)
    sweep = [_zsl("sdl", 0, lam=lam) for lam in (0.1, 0.3, 1.0)]
    for job in sweep:
        job.group = "lam-sweep"
    auto = _zsl("sdl", 1, lam="auto")
    auto.skip_lam = 0.1
    run = Campaign(_args(tmp_path), [*sweep, auto])
    assert run._resolve_lam(auto) == "wait"
    # validation means: 0.1 -> 7.5, 0.3 -> 8.0 (best), 1.0 -> 2.0; the test figures play no part
    for job, (vz, vg) in zip(sweep, [(7.0, 8.0), (9.0, 7.0), (2.0, 2.0)], strict=True):
        job.state = "done"
        _record(tmp_path, job.name, float(job.args[job.args.index("--lam") + 1]), vz, vg)
    assert run._resolve_lam(auto) == 0.3
    _record(tmp_path, sweep[0].name, 0.1, 20.0, 20.0)  # now 0.1 is best: already in the table, so skipped
    run.data_ready["main"] = True
    assert run.try_start(auto) is False and auto.state == "skipped"
