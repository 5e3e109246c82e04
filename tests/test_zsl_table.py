"""benchmarks.zsl_table: seeds grouped into rows, mean +/- std, ratios to M=1 and random."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.zsl_table import (
    CHECK_FLOOR,
    build_table,
    check_against,
    load_runs,
    main,
    replace_between_markers,
    sweep_table,
)


def _result(folder: Path, name: str, zsl_map: float, gzsl_map: float, epochs: int = 1) -> None:
    block = lambda m: {"map": m, "f1": {"3": m / 2, "5": m / 3}}  # noqa: E731
    metrics = {"zsl": block(zsl_map), "gzsl": block(gzsl_map), "seen": block(gzsl_map + 1)}
    (folder / f"{name}.json").write_text(json.dumps({"epochs": epochs, "metrics": metrics}))


def test_rows_group_seeds_and_ratios_use_the_same_budget(tmp_path: Path) -> None:
    for seed, (z, g) in enumerate([(6.0, 8.0), (7.0, 9.0), (8.0, 10.0)]):
        _result(tmp_path, f"zsl-sdl-lam0.1-e1-s{seed}", z, g)
    for seed, (z, g) in enumerate([(5.0, 6.0), (5.0, 7.0), (5.0, 5.0)]):
        _result(tmp_path, f"zsl-m1-lam0.1-e1-s{seed}", z, g)
    _result(tmp_path, "zsl-sdl-lam0.1-s0", 100.0, 100.0, epochs=3)  # another budget: its own row
    (tmp_path / "notes.json").write_text("{}")  # not a run: ignored
    groups = load_runs(tmp_path)
    assert sorted(groups) == [("zsl", "m1", "0.1", 1), ("zsl", "sdl", "0.1", 1), ("zsl", "sdl", "0.1", 3)]
    rows = {"random": {"zsl map": {"mean": 1.4, "std": 0.1, "n": 5}, "gzsl map": {"mean": 1.0, "std": 0.0, "n": 5}}}
    (tmp_path / "baselines-zsl-test.json").write_text(json.dumps({"rows": rows}))
    table = build_table(tmp_path)
    sdl_row = next(line for line in table.splitlines() if line.startswith("| SDL (M=7") and "| 1 epoch |" in line)
    assert "| 0,1,2 | 7.00 +/- 1.00 |" in sdl_row and "| 9.00 +/- 1.00 |" in sdl_row
    assert "| 10.00 +/- 1.00 |" in sdl_row  # seen-only mAP
    assert "| random | - | 5 draws | 1.40 +/- 0.10 |" in table
    # 7 / 5 = 1.40x M=1 of the same (1-epoch) budget, never the 3-epoch row's 100
    assert "SDL, lambda 0.1, 1 epoch(s): ZSL mAP 1.40x M=1; 5.0x random; GZSL mAP 1.50x M=1; 9.0x random" in table


def test_lambda_sweep_is_chosen_on_validation_never_on_test(tmp_path: Path) -> None:
    (tmp_path / "lambda-sweep").mkdir()
    block = lambda m: {"map": m, "f1": {"3": m, "5": m}}  # noqa: E731
    # lambda 0.3: best on validation (mean 9), worst on test; lambda 1: best on test only
    for lam, val, test in ((0.1, (7.0, 8.0), 5.0), (0.3, (9.0, 9.0), 4.0), (1.0, (2.0, 2.0), 50.0)):
        record = {
            "epochs": 3,
            "metrics": {"zsl": block(test), "gzsl": block(test)},
            "validation": {"metrics": {"zsl": block(val[0]), "gzsl": block(val[1])}},
        }
        folder = tmp_path if lam == 0.3 else tmp_path / "lambda-sweep"  # a tuned row's seed 0 lives in results/
        (folder / f"zsl-sdl-lam{lam:g}-s0.json").write_text(json.dumps(record))
    _result(tmp_path, "zsl-sdl-lam0.01-s0", 99.0, 99.0, epochs=3)  # no validation figures: not in the sweep
    _result(tmp_path / "lambda-sweep", "zsl-sdl-lam0.1-e10-s0", 99.0, 99.0, epochs=10)  # another budget
    table = sweep_table(tmp_path)
    lines = [line for line in table.splitlines() if line.startswith("| 0") or line.startswith("| 1")]
    assert [line.split(" |")[0] for line in lines] == ["| 0.1", "| 0.3 (chosen)", "| 1"]
    assert "| 0.3 (chosen) | 9.00 | 9.00 | 9.00 | 4.00 | 4.00 |" in table


def test_update_replaces_only_the_marked_table() -> None:
    text = "intro\n<!-- zsl_table: start -->\nold table\n<!-- zsl_table: end -->\nverdict\n"
    assert replace_between_markers(text, "| new |\n") == (
        "intro\n<!-- zsl_table: start -->\n| new |\n<!-- zsl_table: end -->\nverdict\n"
    )
    with pytest.raises(SystemExit, match="needs one"):
        replace_between_markers("no markers here", "| new |")


def test_check_passes_a_rerun_within_the_spread_and_names_a_row_outside_it(tmp_path: Path) -> None:
    committed_dir, fresh_dir = tmp_path / "committed", tmp_path / "fresh"
    committed_dir.mkdir()
    fresh_dir.mkdir()
    for seed, (z, g) in enumerate([(6.0, 8.0), (7.0, 9.0), (8.0, 10.0)]):  # std 1.0
        _result(committed_dir, f"zsl-sdl-lam0.1-e1-s{seed}", z, g)
    _result(committed_dir, "zsl-m1-lam0.1-e1-s0", 5.0, 6.0)  # one seed: tolerance CHECK_FLOOR
    committed = "# Results\n<!-- zsl_table: start -->\n" + build_table(committed_dir) + "\n<!-- zsl_table: end -->\n"
    (tmp_path / "RESULTS.md").write_text(committed)

    # a rerun of seed 0 only: SDL 8.5 is within 7 +/- 4.97 (t(2) 4.30 x std 1 x sqrt(1/3 + 1));
    # M=1 5.2 within 5 +/- 0.25 (one committed seed: the floor)
    _result(fresh_dir, "zsl-sdl-lam0.1-e1-s0", 8.5, 9.5)
    _result(fresh_dir, "zsl-m1-lam0.1-e1-s0", 5.2, 6.1)
    problems, summary = check_against(committed, build_table(fresh_dir))
    assert problems == []
    assert any("SDL (M=7" in line and "1 seed: within" in line for line in summary)
    assert main(["--results", str(fresh_dir), "--check", str(tmp_path / "RESULTS.md")]) == 0

    # M=1 drifts by 0.75 points in ZSL mAP (and its F1s with it): outside a one-seed row's floor
    _result(fresh_dir, "zsl-m1-lam0.1-e1-s0", 5.5 + CHECK_FLOOR, 6.1)
    problems, _ = check_against(committed, build_table(fresh_dir))
    assert len(problems) == 1 and problems[0].startswith("[main] M=1")
    assert "ZSL mAP 5.75 vs 5.00 +/- 0.25" in problems[0] and "GZSL mAP" not in problems[0]
    assert main(["--results", str(fresh_dir), "--check", str(tmp_path / "RESULTS.md")]) == 1

    # SDL 3.6 points up: within the interval of one new seed, outside that of three (3.51)
    _result(fresh_dir, "zsl-m1-lam0.1-e1-s0", 5.0, 6.0)
    _result(fresh_dir, "zsl-sdl-lam0.1-e1-s0", 10.6, 9.0)
    assert check_against(committed, build_table(fresh_dir))[0] == []
    for seed in (1, 2):
        _result(fresh_dir, f"zsl-sdl-lam0.1-e1-s{seed}", 10.6, 9.0)
    problems, _ = check_against(committed, build_table(fresh_dir))
    assert len(problems) == 1 and "ZSL mAP 10.60 vs 7.00 +/- 3.51" in problems[0]
    for seed in (1, 2):
        (fresh_dir / f"zsl-sdl-lam0.1-e1-s{seed}.json").unlink()

    # a row the committed table does not have is reported, not judged
    _result(fresh_dir, "zsl-nosigma-lam0.1-e1-s0", 50.0, 50.0)
    _result(fresh_dir, "zsl-m1-lam0.1-e1-s0", 5.0, 6.0)
    problems, summary = check_against(committed, build_table(fresh_dir))
    assert problems == [] and any("without sigma" in line and "not in the committed" in line for line in summary)
