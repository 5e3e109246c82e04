"""benchmarks.zsl_table: seeds grouped into rows, mean +/- std, ratios to M=1 and random."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.zsl_table import build_table, load_runs


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
    assert "SDL, 1 epoch(s): ZSL mAP 1.40x M=1; 5.0x random; GZSL mAP 1.50x M=1; 9.0x random" in table
