"""``sdltag eval --report``: the evaluation as one self-contained HTML page.

The paper's table (ZSL, GZSL, seen), per-label AP as a sorted bar chart (best and worst
labels named, every label in a table), precision-recall curves of ZSL and GZSL, the
calibration reliability diagram when the model is calibrated, and the worst-ranked
images with their ground truth and top tags. Plots are drawn by matplotlib (the optional
extra ``sdltag[report]``, never imported when tagging) as SVG, embedded as ``data:``
images, so the page needs no network, font or script (its Content-Security-Policy allows
none). Every name on the page goes through ``html.escape``; label text in the plots is
drawn as text, never parsed as math.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import time
from pathlib import Path

import numpy as np

from sdltag.contact_sheet import display_path, file_thumbnail, file_url
from sdltag.errors import SdltagError
from sdltag.evaluation import KS, EvalReport
from sdltag.metrics import average_precision

INSTALL_HINT = "pip install 'sdltag[report]'"
WORST_IMAGES = 12  # images shown in "worst-ranked"
TOP_TAGS = 5  # predicted tags shown for each of them
CHART_LABELS = 30  # per-label AP chart: all labels up to twice this, else the best and the worst this many
RELIABILITY_BINS = 15  # as the ECE of `sdltag eval`
SEEN_COLOUR, UNSEEN_COLOUR = "#2f6f9f", "#b0561b"


def require_matplotlib() -> None:
    """Raise one clear line when the plotting library is missing (checked before a long evaluation)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SdltagError(
            f"--report draws its charts with matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _svg_data_uri(fig) -> str:
    """A figure as an SVG ``data:`` URI (glyphs as paths: no font needed; no date, fixed ids: reproducible)."""
    import matplotlib

    out = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "sdltag"}):
        fig.savefig(out, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _style():
    import matplotlib

    return matplotlib.rc_context(
        {
            "text.parse_math": False,  # a label such as "$5 lunch" is text, not TeX
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )


# ---------------------------------------------------------------------------------------------
# Numbers


def _per_image(report: EvalReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The report's (N, L) scores and targets and its (L,) unseen mask; refuses an evaluation without them."""
    if report.scores is None or report.targets is None or report.unseen_mask is None:
        raise SdltagError("this evaluation carries no per-image scores to draw a report from.")
    return report.scores, report.targets, report.unseen_mask


def per_label_ap(report: EvalReport) -> list[tuple[str, bool, float, int]]:
    """(label, unseen, AP %, positives) for every ranked label over the GZSL images; AP is NaN without a positive."""
    scores, targets = _gzsl(report)
    unseen_mask = _per_image(report)[2]
    rows = []
    for j, name in enumerate(report.label_names):
        positives = int(targets[:, j].sum())
        ap = average_precision(scores[:, j], targets[:, j]) * 100 if positives else float("nan")
        rows.append((name, bool(unseen_mask[j]), ap, positives))
    return rows


def _gzsl(report: EvalReport) -> tuple[np.ndarray, np.ndarray]:
    scores, targets, _ = _per_image(report)
    keep = targets.any(axis=1)
    return scores[keep], targets[keep]


def pr_curve(scores: np.ndarray, targets: np.ndarray, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Micro-averaged precision-recall over every (image, label) pair, one point per distinct score.

    A library's millions of pairs are thinned to ``max_points`` thresholds (the SVG stays small).
    """
    flat_scores, flat_targets = scores.ravel().astype(np.float64), targets.ravel().astype(bool)
    if not flat_targets.any():
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-flat_scores, kind="stable")
    sorted_scores, hits = flat_scores[order], flat_targets[order]
    ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])  # tied scores: one threshold
    true_positives = np.cumsum(hits)[ends]
    precision = true_positives / (ends + 1)
    recall = true_positives / flat_targets.sum()
    if len(recall) > max_points:  # a chart, not a table: evenly spaced thresholds, first and last kept
        keep = np.unique(np.linspace(0, len(recall) - 1, max_points).round().astype(np.int64))
        recall, precision = recall[keep], precision[keep]
    return recall, precision


def reliability(confidences: np.ndarray, targets: np.ndarray, bins: int = RELIABILITY_BINS):
    """Per equal-width confidence bin: (mean confidence, positive rate, pairs); empty bins are left out."""
    c, y = confidences.ravel().astype(np.float64), targets.ravel().astype(np.float64)
    which = np.minimum((c * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    filled = count > 0
    mean_conf = np.bincount(which, weights=c, minlength=bins)[filled] / count[filled]
    rate = np.bincount(which, weights=y, minlength=bins)[filled] / count[filled]
    return mean_conf, rate, count[filled]


def worst_ranked(report: EvalReport, n: int = WORST_IMAGES) -> list[dict]:
    """The ``n`` images whose true labels the model ranks lowest (by their best true label's rank, then the mean)."""
    scores, targets, unseen_mask = _per_image(report)
    rows = []
    names = report.label_names
    for image in np.flatnonzero(targets.any(axis=1)):
        order = np.argsort(-scores[image], kind="stable")  # equal scores: label order, as the metrics
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        truth = np.flatnonzero(targets[image])
        rows.append((int(rank[truth].min()), float(rank[truth].mean()), int(image), order, rank, truth))
    rows.sort(key=lambda r: (-r[0], -r[1], r[2]))
    shown = []
    for best, mean, i, order, rank, truth in rows[:n]:
        confidences = _confidences(report, i)
        shown.append(
            {
                "path": report.paths[i],
                "best_rank": best,
                "mean_rank": mean,
                "truth": sorted(((names[j], int(rank[j]), bool(unseen_mask[j])) for j in truth), key=lambda t: t[1]),
                "top": [
                    (names[j], float(confidences[j]), bool(targets[i, j]), bool(unseen_mask[j]))
                    for j in order[:TOP_TAGS]
                ],
            }
        )
    return shown


def _confidences(report: EvalReport, i: int) -> np.ndarray:
    scores, _, unseen_mask = _per_image(report)
    if not report.calibration:
        return scores[i]
    from sdltag.scoring import calibrate

    return calibrate(scores[i : i + 1], unseen_mask, report.calibration)[0]


# ---------------------------------------------------------------------------------------------
# Charts


def ap_chart(rows: list[tuple[str, bool, float, int]]) -> str:
    """Sorted horizontal bars of per-label AP (best on top); past 2 x CHART_LABELS, the best and worst only."""
    plt = _pyplot()
    ranked = sorted((r for r in rows if not np.isnan(r[2])), key=lambda r: (-r[2], r[0]))
    cut = len(ranked) > 2 * CHART_LABELS
    shown = ranked[:CHART_LABELS] + ranked[-CHART_LABELS:] if cut else ranked
    with _style():
        fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.2 * (len(shown) + (1 if cut else 0))))
        y = np.arange(len(shown), dtype=float)
        if cut:
            y[CHART_LABELS:] += 1  # a gap where the middle labels are left out
        ax.barh(y, [r[2] for r in shown], color=[UNSEEN_COLOUR if r[1] else SEEN_COLOUR for r in shown], height=0.75)
        ax.set_yticks(y, [r[0] for r in shown])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("AP (%)")
        if cut:
            ax.text(
                50,
                CHART_LABELS,
                f"... {len(ranked) - 2 * CHART_LABELS} labels in between ...",
                ha="center",
                va="center",
            )
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (SEEN_COLOUR, UNSEEN_COLOUR)]
        ax.legend(handles, ["seen", "zero-shot (unseen)"], loc="lower right", frameon=False)
        uri = _svg_data_uri(fig)
        plt.close(fig)
    return uri


def pr_chart(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    plt = _pyplot()
    with _style():
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for name, (recall, precision) in curves.items():
            if recall.size:
                colour = UNSEEN_COLOUR if name.startswith("ZSL") else SEEN_COLOUR
                recall, precision = np.r_[0.0, recall], np.r_[precision[0], precision]  # from recall 0
                marker = "o" if recall.size < 40 else None  # a handful of pairs: show each point
                ax.plot(recall, precision, label=name, color=colour, drawstyle="steps-post", marker=marker)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.legend(frameon=False)
        ax.grid(alpha=0.3)
        uri = _svg_data_uri(fig)
        plt.close(fig)
    return uri


def reliability_chart(groups: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> str:
    plt = _pyplot()
    with _style():
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="perfectly calibrated")
        for name, (conf, rate, count) in groups.items():
            colour = UNSEEN_COLOUR if name.startswith("unseen") else SEEN_COLOUR
            sizes = 12 + 80 * np.sqrt(count / max(count.max(), 1))
            ax.plot(conf, rate, color=colour, linewidth=1.2)
            ax.scatter(conf, rate, s=sizes, color=colour, label=name, zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (mean in the bin)")
        ax.set_ylabel("share of pairs with the label")
        ax.legend(frameon=False, loc="upper left")
        ax.grid(alpha=0.3)
        uri = _svg_data_uri(fig)
        plt.close(fig)
    return uri


# ---------------------------------------------------------------------------------------------
# The page

STYLE = """
body{margin:0 auto;max-width:1100px;padding:16px 20px 40px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
sans-serif;color:#1d1d1b;background:#fafaf8}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.meta{color:#6b6b66;font-size:12.5px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:3px 10px;border-bottom:1px solid #e4e4e0;text-align:right}
th:first-child,td:first-child{text-align:left}
img.chart{max-width:100%;height:auto;background:#fff;border:1px solid #e4e4e0}
.zs{color:#b0561b}.seen{color:#2f6f9f}
.worst{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
.worst figure{margin:0;background:#fff;border:1px solid #e4e4e0;border-radius:6px;padding:8px}
.worst img{display:block;max-width:100%;max-height:160px;margin:0 auto 6px}
.worst .name{font-weight:600;word-break:break-all}
.worst ul{margin:2px 0 4px;padding-left:18px}
.ok{font-weight:600}
details{margin-top:8px}
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(STYLE.encode("utf-8")).digest()).decode("ascii")
    return f"default-src 'none'; img-src data:; style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"


def _metrics_table(report: EvalReport) -> str:
    esc = html.escape
    head = ["protocol", "images", "labels", "mAP"] + [f"{m}@{k}" for k in KS for m in ("P", "R", "F1")]
    rows = []
    for name in ("zsl", "gzsl", "seen"):
        if name not in report.results:
            continue
        m = report.results[name]
        cells = [name.upper(), str(m.images), str(m.labels), f"{m.map:.2f}"] + [
            f"{getattr(m, key)[k]:.2f}" for k in KS for key in ("precision", "recall", "f1")
        ]
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    return (
        "<table><thead><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _kind(unseen: bool) -> str:
    return '<span class="zs">zero-shot</span>' if unseen else '<span class="seen">seen</span>'


def render_report(report: EvalReport, *, thumbnails: bool = True, max_megapixels: float = 100.0) -> str:
    """The report page (needs the per-image fields ``evaluate`` fills: paths, scores, targets)."""
    scores, targets, unseen_mask = _per_image(report)
    esc = html.escape
    parts = [
        *_summary_section(report),
        *_metrics_section(report),
        *_ap_section(report),
        *_pr_section(report, scores, targets, unseen_mask),
        *_calibration_section(report, scores, targets, unseen_mask),
        *_worst_section(report, thumbnails, max_megapixels),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(_csp())}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>sdltag eval: {esc(display_path(os.path.basename(os.fspath(report.model))))}</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def _summary_section(report: EvalReport) -> list[str]:
    """The title and what was evaluated."""
    esc = html.escape
    evaluated = report.images_listed - report.images_failed
    return [
        f"<h1>sdltag eval: {esc(display_path(report.model))}</h1>"
        f'<div class="meta">data {esc(display_path(report.data))} ({esc(report.data_format)} layout); '
        f"{evaluated} images evaluated, {report.images_failed} could not be decoded; "
        f"{report.seen_labels} seen and {report.unseen_labels} unseen labels"
        + (
            f"; {len(report.ignored_labels)} labels of the folder unknown to the model, ignored"
            if report.ignored_labels
            else ""
        )
        + f"; made by sdltag on {time.strftime('%Y-%m-%d %H:%M', time.localtime())}</div>"
    ]


def _metrics_section(report: EvalReport) -> list[str]:
    """The paper's table, its rules and the calibration error."""
    esc = html.escape
    rule = (
        "labels without a positive image are skipped from the mean"
        if report.empty_rule == "skip"
        else "labels without a positive image count as 0 (the official SDL code's rule)"
    )
    return [
        "<h2>The paper's metrics</h2>"
        + _metrics_table(report)
        + f'<p class="meta">Percentages. An image counts when it has a label among the ranked ones (ZSL: the '
        f"unseen labels; GZSL: all); P/R/F1 at K are micro; mAP averages per-label AP; {esc(rule)}."
        + (
            " Calibration error (ECE, 15 bins): "
            + ", ".join(f"{esc(g)} {v:.4f}" for g, v in report.ece.items() if v is not None)
            + "."
            if report.ece
            else ""
        )
        + "</p>"
    ]


def _ap_section(report: EvalReport) -> list[str]:
    """Per-label AP: best and worst, the sorted chart and every label's row."""
    esc = html.escape
    rows = per_label_ap(report)
    ranked = sorted((r for r in rows if not np.isnan(r[2])), key=lambda r: (-r[2], r[0]))
    empty = [r for r in rows if np.isnan(r[2])]
    parts = ["<h2>Average precision per label (GZSL images)</h2>"]
    if not ranked:
        return parts + ["<p>No label has a positive image among the evaluated ones.</p>"]
    best, worst = ranked[0], ranked[-1]
    parts.append(
        f"<p>Best: <b>{esc(best[0])}</b> ({_kind(best[1])}, AP {best[2]:.1f}); worst: <b>{esc(worst[0])}</b> "
        f"({_kind(worst[1])}, AP {worst[2]:.1f}); {len(ranked)} labels with a positive image"
        + (f", {len(empty)} without (no AP)" if empty else "")
        + ".</p>"
        f'<img class="chart" alt="per-label AP, sorted" src="{ap_chart(rows)}">'
    )
    table = "".join(
        f"<tr><td>{esc(name)}</td><td>{_kind(unseen)}</td><td>{ap:.2f}</td><td>{positives}</td></tr>"
        for name, unseen, ap, positives in ranked
    ) + "".join(
        f"<tr><td>{esc(name)}</td><td>{_kind(unseen)}</td><td>-</td><td>0</td></tr>" for name, unseen, _, _ in empty
    )
    parts.append(
        f"<details><summary>every label ({len(rows)})</summary><table><thead><tr><th>label</th><th>kind</th>"
        f"<th>AP</th><th>positive images</th></tr></thead><tbody>{table}</tbody></table></details>"
    )
    return parts


def _pr_section(report: EvalReport, scores: np.ndarray, targets: np.ndarray, unseen_mask: np.ndarray) -> list[str]:
    """Precision-recall curves of the ZSL and GZSL protocols."""
    curves = {}
    gzsl_scores, gzsl_targets = _gzsl(report)
    if unseen_mask.any():
        unseen = unseen_mask
        keep = targets[:, unseen].any(axis=1)
        if keep.any():
            curves[f"ZSL ({int(keep.sum())} images, {int(unseen.sum())} labels)"] = pr_curve(
                scores[keep][:, unseen], targets[keep][:, unseen]
            )
    if gzsl_targets.any():
        curves[f"GZSL ({len(gzsl_scores)} images, {len(report.label_names)} labels)"] = pr_curve(
            gzsl_scores, gzsl_targets
        )
    if not curves:
        return ["<h2>Precision and recall</h2>", "<p>No positive pair to draw a curve from.</p>"]
    return [
        "<h2>Precision and recall</h2>",
        f'<img class="chart" alt="precision-recall curves" src="{pr_chart(curves)}">'
        '<p class="meta">Micro-averaged over every (image, label) pair of the protocol, as a threshold on the '
        "raw SDL score goes down.</p>",
    ]


def _calibration_section(
    report: EvalReport, scores: np.ndarray, targets: np.ndarray, unseen_mask: np.ndarray
) -> list[str]:
    """The reliability diagram of a calibrated model (nothing for an uncalibrated one)."""
    if not report.calibration:
        return []
    from sdltag.scoring import calibrate

    confidences = calibrate(scores, unseen_mask, report.calibration)
    groups = {}
    for name, mask in (("seen", ~unseen_mask), ("unseen", unseen_mask)):
        if mask.any():
            ece = report.ece.get(name)
            label = name + (f" (ECE {ece:.4f})" if ece is not None else "")
            groups[label] = reliability(confidences[:, mask], targets[:, mask])
    return [
        "<h2>Calibration</h2>"
        f'<img class="chart" alt="reliability diagram" src="{reliability_chart(groups)}">'
        '<p class="meta">Each point is one of 15 confidence bins (its size: how many pairs): on the diagonal, '
        "a confidence of 0.7 means 70% of such pairs have the label.</p>"
    ]


def _worst_section(report: EvalReport, thumbnails: bool, max_megapixels: float) -> list[str]:
    """Cards of the images whose true labels rank lowest."""
    esc = html.escape
    cards = []
    for row in worst_ranked(report):
        path = row["path"]
        thumb = file_thumbnail(Path(path), max_megapixels=max_megapixels) if thumbnails else None
        image = f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(thumb).decode("ascii")}">' if thumb else ""
        truth = "".join(f"<li>{esc(name)} {_kind(unseen)}: rank {rank}</li>" for name, rank, unseen in row["truth"])
        top = "".join(
            f"<li{' class=ok' if hit else ''}>{esc(name)} {score:.2f}{' (true)' if hit else ''}"
            f"{' <span class=zs>zero-shot</span>' if unseen else ''}</li>"
            for name, score, hit, unseen in row["top"]
        )
        cards.append(
            f'<figure><a href="{esc(file_url(path))}">{image}</a>'
            f'<div class="name">{esc(display_path(path))}</div>'
            f"<div>ground truth:</div><ul>{truth}</ul><div>top {TOP_TAGS} tags"
            f"{' (calibrated)' if report.calibration else ' (raw scores)'}:</div><ul>{top}</ul></figure>"
        )
    if not cards:
        return ["<h2>Worst-ranked images</h2>", "<p>No image with a ground-truth label.</p>"]
    return [
        "<h2>Worst-ranked images</h2>",
        '<p class="meta">The images whose true labels rank lowest among all labels (by the best-ranked one).</p>'
        f'<div class="worst">{"".join(cards)}</div>',
    ]


def write_report(report: EvalReport, output: Path, **options) -> None:
    """Render the report and write it to ``output`` atomically."""
    from sdltag.paths import atomic_write

    page = render_report(report, **options)
    with atomic_write(Path(output), "w", encoding="utf-8") as handle:
        handle.write(page)
