"""The results table of RESULTS.md, from the JSON files the recipes and baselines wrote.

Every ``results/{zsl,xs}-<variant>-lam<lambda>[-e<epochs>]-s<seed>.json`` (written by
``recipe_emoji_zsl``) is one trained model's ``sdltag eval`` output; runs that differ
only in the seed form one row, reported as mean +/- sample standard deviation over the
seeds (n given). ``results/baselines-*.json`` (written by ``zsl_baselines``) add the
random and label-frequency-prior rows of the test set they name. Ratios of each
learned row's mean to the M=1 row of the same protocol and budget, and to random, are
printed under the table: the issue's aim is >= 1.25x M=1 (ZSL and GZSL mAP) and >= 5x random.

    python -m benchmarks.zsl_table                      # print the markdown table
    python -m benchmarks.zsl_table --out results/zsl-table.md
    python -m benchmarks.zsl_table --check RESULTS.md   # fresh results vs the committed table

``--check`` is how a rerun (``make bench-zsl``) is judged: in every column, the mean of
each learned row of the fresh results must lie within the committed row's spread,
the 95% prediction interval of a mean of that many new seeds given the committed
seeds (``t(0.975, n-1) * std * sqrt(1/n + 1/n_new)``, at least ``CHECK_FLOOR`` points,
which is also the tolerance of a one-seed row); it exits 1 naming each row and column
that does not.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
NAME = re.compile(
    r"^(?P<protocol>zsl|xs)-(?P<variant>[a-z0-9]+)-lam(?P<lam>[0-9.e-]+?)(?:-e(?P<epochs>\d+))?-s(?P<seed>\d+)$"
)
VARIANTS = {
    "sdl": "SDL (M=7, sigma weighting, lambda {lam})",
    "nosigma": "SDL without sigma weighting (M=7, lambda {lam})",
    "m1": "M=1 (one principal vector, Fast0Tag-style)",
}
COLUMNS = [("zsl", "map"), ("zsl", "3"), ("zsl", "5"), ("gzsl", "map"), ("gzsl", "3"), ("gzsl", "5")]
SEEN_COLUMNS = [("seen", "map"), ("seen", "3"), ("seen", "5")]
DEFAULT_EPOCHS = 3
CHECK_FLOOR = 0.25  # points: the tolerance of a one-seed row or one whose seeds agree closely
# Student's t, two-sided 95%, by degrees of freedom (more than 10: 2.0)
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def _value(metrics: dict, protocol: str, what: str) -> float | None:
    block = metrics.get(protocol)
    if not block:
        return None
    return float(block["map"]) if what == "map" else float(block["f1"][what])


def load_runs(folder: Path) -> dict[tuple[str, str, str, int], list[dict]]:
    """Runs grouped by (protocol, variant, lambda, epochs), each with its seed and metrics."""
    groups: dict[tuple[str, str, str, int], list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*.json")):
        match = NAME.match(path.stem)
        if not match:
            continue
        record = json.loads(path.read_text())
        epochs = int(match["epochs"] or record.get("epochs") or DEFAULT_EPOCHS)
        key = (match["protocol"], match["variant"], match["lam"], epochs)
        groups[key].append({"seed": int(match["seed"]), "metrics": record["metrics"], "file": path.name})
    return groups


def _stats(values: list[float]) -> tuple[float, float, int]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std, len(values)


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std, n = _stats(values)
    return f"{mean:.2f}" if n == 1 else f"{mean:.2f} +/- {std:.2f}"


def build_table(folder: Path = RESULTS) -> str:
    groups = load_runs(folder)
    lines = []
    means: dict[tuple[str, str, str, int], dict[tuple[str, str], float]] = {}
    titles = {"zsl": "main (in-domain) protocol, test `zsl-test`", "xs": "cross-style protocol, test `xs-test` (Noto)"}
    for protocol, title in titles.items():
        keys = sorted((k for k in groups if k[0] == protocol), key=lambda k: (k[3], k[1], k[2]))
        baselines = _baselines(folder, "zsl-test" if protocol == "zsl" else "xs-test")
        if not keys and not baselines:
            continue
        lines += [f"### {title}", ""]
        header = (
            "| row | budget | seeds | ZSL mAP | ZSL F1@3 | ZSL F1@5 | GZSL mAP | GZSL F1@3 | GZSL F1@5 "
            "| seen-only mAP | seen-only F1@3 |"
        )
        lines += [header, "|" + " --- |" * (header.count("|") - 1)]
        for key in keys:
            runs = sorted(groups[key], key=lambda r: r["seed"])
            cells, row_means = [], {}
            for column in COLUMNS + SEEN_COLUMNS[:2]:
                values = [v for r in runs if (v := _value(r["metrics"], *column)) is not None]
                cells.append(_cell(values))
                if values:
                    row_means[column] = statistics.fmean(values)
            means[key] = row_means
            name = VARIANTS.get(key[1], key[1]).format(lam=key[2])
            seeds = ",".join(str(r["seed"]) for r in runs)
            lines.append(
                f"| {name} | {key[3]} epoch{'s' if key[3] != 1 else ''} | {seeds} | " + " | ".join(cells) + " |"
            )
        for row_name, row in baselines.items():
            cells = []
            for protocol_name, what in COLUMNS:
                stat = row.get(f"{protocol_name} {'map' if what == 'map' else 'f1@' + what}")
                if stat is None:
                    cells.append("-")
                elif stat["n"] > 1:
                    cells.append(f"{stat['mean']:.2f} +/- {stat['std']:.2f}")
                else:
                    cells.append(f"{stat['mean']:.2f}")
            n = max((s["n"] for s in row.values()), default=1)
            lines.append(f"| {row_name} | - | {n} draw{'s' if n != 1 else ''} | " + " | ".join(cells) + " | - | - |")
        lines.append("")
        ratio_lines = []
        random_row = baselines.get("random", {})
        for key in keys:
            if key[1] == "m1":
                continue
            base = means.get((key[0], "m1", key[2], key[3])) or next(
                (means[k] for k in keys if k[1] == "m1" and k[3] == key[3]), None
            )
            parts = []
            for column, label in ((("zsl", "map"), "ZSL mAP"), (("gzsl", "map"), "GZSL mAP")):
                mine = means[key].get(column)
                if mine is None:
                    continue
                if base and base.get(column):
                    parts.append(f"{label} {mine / base[column]:.2f}x M=1")
                rnd = random_row.get(f"{column[0]} map")
                if rnd:
                    parts.append(f"{mine / rnd['mean']:.1f}x random")
            if parts:
                label = VARIANTS.get(key[1], key[1]).format(lam=key[2]).split(" (")[0]
                ratio_lines.append(f"- {label}, lambda {key[2]}, {key[3]} epoch(s): " + "; ".join(parts))
        if ratio_lines:
            lines += ["Ratios of means:", "", *ratio_lines, ""]
    return "\n".join(lines)


def sweep_table(folder: Path = RESULTS) -> str:
    """The lambda sweep (SDL, seed 0, 3 epochs): validation figures, which choose lambda, and test figures.

    Reads ``results/lambda-sweep/`` and ``results/`` (a lambda's seed-0 run that is also a
    table row lives in ``results/``); only runs that recorded their validation figures count.
    """
    runs: dict[float, dict] = {}
    for path in sorted((folder / "lambda-sweep").glob("*.json")) + sorted(folder.glob("*.json")):
        match = NAME.match(path.stem)
        if not match or match["protocol"] != "zsl" or match["variant"] != "sdl" or match["seed"] != "0":
            continue
        record = json.loads(path.read_text())
        if int(match["epochs"] or record.get("epochs") or DEFAULT_EPOCHS) != DEFAULT_EPOCHS:
            continue
        validation = (record.get("validation") or {}).get("metrics") or {}
        if "zsl" in validation and "gzsl" in validation:
            runs.setdefault(float(match["lam"]), {"validation": validation, "test": record["metrics"]})
    if not runs:
        return ""
    choice = max(runs, key=lambda lam: runs[lam]["validation"]["zsl"]["map"] + runs[lam]["validation"]["gzsl"]["map"])
    lines = [
        "| lambda | val ZSL mAP | val GZSL mAP | val mean | test ZSL mAP | test GZSL mAP |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for lam in sorted(runs):
        val, test = runs[lam]["validation"], runs[lam]["test"]
        mean = (val["zsl"]["map"] + val["gzsl"]["map"]) / 2
        mark = " (chosen)" if lam == choice else ""
        lines.append(
            f"| {lam:g}{mark} | {val['zsl']['map']:.2f} | {val['gzsl']['map']:.2f} | {mean:.2f} | "
            f"{test['zsl']['map']:.2f} | {test['gzsl']['map']:.2f} |"
        )
    return "\n".join(lines)


def _baselines(folder: Path, test_name: str) -> dict[str, dict]:
    path = folder / f"baselines-{test_name}.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["rows"]


START, END = "<!-- zsl_table: start -->", "<!-- zsl_table: end -->"


def _between_markers(text: str) -> tuple[str, str, str]:
    """(before START, between the markers, after END)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"the file needs one {START} line followed by one {END} line")
    head, rest = text.split(START)
    inside, tail = rest.split(END)
    return head, inside, tail


def replace_between_markers(text: str, table: str) -> str:
    """``text`` with everything between the START and END markers replaced by ``table``."""
    head, _, tail = _between_markers(text)
    return f"{head}{START}\n{table.strip()}\n{END}{tail}"


Row = tuple[str, str, str]  # (section, row name, budget)


def parse_table(text: str) -> dict[Row, tuple[int, dict[str, tuple[float, float]]]]:
    """The learned rows of a table ``build_table`` wrote: {(section, row, budget): (seeds, {column: (mean, std)})}."""
    rows: dict[Row, tuple[int, dict[str, tuple[float, float]]]] = {}
    section, header = "", []
    for line in text.splitlines():
        if line.startswith("### "):
            section, header = line[4:].strip(), []
            continue
        if not line.startswith("| "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "row":
            header = cells
            continue
        if not header or set(cells[0]) <= {"-", " "} or cells[1] == "-":  # separator, random/prior rows
            continue
        values = {}
        for column, cell in zip(header[3:], cells[3:], strict=False):
            match = re.fullmatch(r"(-?[0-9.]+)(?: \+/- ([0-9.]+))?", cell)
            if match:
                values[column] = (float(match[1]), float(match[2] or 0.0))
        rows[(section, cells[0], cells[1])] = (len(cells[2].split(",")), values)
    return rows


def check_tolerance(ref_std: float, ref_n: int, new_n: int) -> float:
    """How far a mean of ``new_n`` new seeds may lie from a committed mean of ``ref_n`` seeds (std ``ref_std``)."""
    if ref_n < 2:
        return CHECK_FLOOR
    t = T975.get(ref_n - 1, 2.0)
    return max(t * ref_std * (1 / ref_n + 1 / max(new_n, 1)) ** 0.5, CHECK_FLOOR)


def _row_label(key: Row) -> str:
    return f"[{key[0].split(' ')[0]}] {key[1]}, {key[2]}"


def check_against(committed_text: str, fresh_table: str) -> tuple[list[str], list[str]]:
    """(problems, summary lines): each fresh learned row against the committed row of the same name and budget."""
    if START in committed_text:
        committed_text = _between_markers(committed_text)[1]
    committed, fresh = parse_table(committed_text), parse_table(fresh_table)
    problems, summary = [], []
    for key, (n, values) in fresh.items():
        label = _row_label(key)
        if key not in committed:
            summary.append(f"{label}: not in the committed table (nothing to compare)")
            continue
        ref_n, reference = committed[key]
        off = []
        for column, (mean, _) in values.items():
            if column not in reference:
                continue
            ref_mean, ref_std = reference[column]
            tolerance = check_tolerance(ref_std, ref_n, n)
            if abs(mean - ref_mean) > tolerance:
                off.append(f"{column} {mean:.2f} vs {ref_mean:.2f} +/- {tolerance:.2f}")
        seeds = f"{n} seed{'s' if n != 1 else ''}"
        if off:
            problems.append(f"{label}: outside the committed spread: " + "; ".join(off))
            summary.append(f"{label}, {seeds}: DIFFERS in {len(off)} column(s)")
        else:
            summary.append(f"{label}, {seeds}: within the committed spread in all {len(values)} columns")
    for key in sorted(committed.keys() - fresh.keys()):
        summary.append(f"{_row_label(key)}: not rerun")
    return problems, summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the emoji-scenes results table from benchmarks/results/.")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Folder of result JSON files.")
    parser.add_argument("--out", type=Path, help="Also write the table to this file.")
    parser.add_argument(
        "--update",
        type=Path,
        help="Replace the text between the table markers of this markdown file (RESULTS.md) with the table.",
    )
    parser.add_argument(
        "--check",
        type=Path,
        metavar="RESULTS_MD",
        help="Compare the results with the table committed in this file; exit 1 if a row is outside its spread.",
    )
    args = parser.parse_args(argv)
    if args.check and args.update and args.check.resolve() == args.update.resolve():
        parser.error("--check and --update name the same file: check first, then update")
    table = build_table(args.results)
    sweep = sweep_table(args.results)
    if sweep:
        table += "\n### Lambda, chosen on the validation scenes (SDL, seed 0, 3 epochs)\n\n" + sweep + "\n"
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")
    if args.update:
        updated = replace_between_markers(args.update.read_text(encoding="utf-8"), table)
        args.update.write_text(updated, encoding="utf-8")
    print(table)
    if args.check:
        try:
            committed_text = args.check.read_text(encoding="utf-8")
        except OSError as exc:
            parser.error(f"--check {args.check}: cannot read it ({exc.strerror}); name the committed RESULTS.md")
        problems, summary = check_against(committed_text, table)
        print(f"\nAgainst the table in {args.check}:")
        for line in summary:
            print(f"- {line}")
        for line in problems:
            print(f"zsl_table: {line}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
