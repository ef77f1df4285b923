"""Evaluation report: a console table, `report.md` and PNG plots written into the bundle.

Input is the pipeline's metrics dict (see `training.pipeline`):
    {"final": {mode: {system: {metric: value}}},        mode in ("all", "novel")
     "retrieval": {system: {"recall@50": v, ...}},       raw vs fine-tuned encoder
     "cold_start": {system: recall},
     "ann_recall": float | None}
The report only formats; every number comes from the same run's evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PIPELINE_SYSTEM = "full_pipeline"
# Systems that are ours, not baselines; the headline compares the pipeline with the best other one.
OWN_SYSTEMS = frozenset({PIPELINE_SYSTEM})
HEADLINE_METRICS = ("ndcg@12", "map@12", "recall@12")
MODES = ("all", "novel")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return float(num) / float(den)


def best_baseline(
    final_mode: Mapping[str, Mapping[str, float]], metric: str
) -> tuple[str | None, float | None]:
    """The strongest non-pipeline system on `metric` (name, value); (None, None) if none."""
    scored = [(name, vals.get(metric)) for name, vals in final_mode.items() if name not in OWN_SYSTEMS]
    scored = [(n, v) for n, v in scored if v is not None and not math.isnan(v)]
    if not scored:
        return None, None
    return max(scored, key=lambda nv: nv[1])


def headline_ratios(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers a reader wants first: how much the full pipeline beats the best baseline, etc."""
    out: dict[str, Any] = {}
    final = metrics.get("final", {})
    for mode in MODES:
        table = final.get(mode, {})
        ours = table.get(PIPELINE_SYSTEM, {}).get("ndcg@12")
        name, best = best_baseline(table, "ndcg@12")
        out[f"ndcg@12_{mode}_pipeline"] = ours
        out[f"ndcg@12_{mode}_best_baseline"] = best
        out[f"ndcg@12_{mode}_best_baseline_name"] = name
        out[f"ndcg@12_{mode}_ratio"] = _ratio(ours, best)
    retrieval = metrics.get("retrieval", {})
    raw = retrieval.get("raw_encoder", {}).get("recall@100")
    tuned = retrieval.get("finetuned_encoder", {}).get("recall@100")
    out["retrieval_recall@100_raw"] = raw
    out["retrieval_recall@100_finetuned"] = tuned
    out["retrieval_recall@100_ratio"] = _ratio(tuned, raw)
    cold = metrics.get("cold_start", {})
    out["cold_start_recall_pipeline"] = cold.get(PIPELINE_SYSTEM)
    out["cold_start_recall_finetuned_encoder"] = cold.get("finetuned_encoder")
    return out


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _final_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    final = metrics.get("final", {})
    systems: list[str] = []
    for mode in MODES:
        for name in final.get(mode, {}):
            if name not in systems:
                systems.append(name)
    header = (
        ["system"]
        + [f"{m.upper()} {mode}" for mode in MODES for m in HEADLINE_METRICS]
        + ["cold-start recall"]
    )
    cold = metrics.get("cold_start", {})
    rows = []
    for name in systems:
        row = [name]
        for mode in MODES:
            vals = final.get(mode, {}).get(name, {})
            row += [_fmt(vals.get(m)) for m in HEADLINE_METRICS]
        row.append(_fmt(cold.get(name)))
        rows.append(row)
    return header, rows


def _retrieval_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    retrieval = metrics.get("retrieval", {})
    ks = sorted({k for vals in retrieval.values() for k in vals}, key=lambda s: (len(s), s))
    header = ["encoder", *ks]
    rows = [[name] + [_fmt(vals.get(k)) for k in ks] for name, vals in retrieval.items()]
    return header, rows


def console_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text tables for logs and the benchmark's stdout."""
    parts = [_text_table(*_final_rows(metrics))]
    if metrics.get("retrieval"):
        parts.append(
            "Retrieval recall (ANN over the full catalogue):\n" + _text_table(*_retrieval_rows(metrics))
        )
    ratios = headline_ratios(metrics)
    parts.append(
        "\n".join(
            [
                f"NDCG@12 all:   pipeline {_fmt(ratios['ndcg@12_all_pipeline'])} vs best baseline "
                f"{ratios['ndcg@12_all_best_baseline_name']} {_fmt(ratios['ndcg@12_all_best_baseline'])} "
                f"-> x{_fmt(ratios['ndcg@12_all_ratio'], 2)}",
                f"NDCG@12 novel: pipeline {_fmt(ratios['ndcg@12_novel_pipeline'])} vs best baseline "
                f"{ratios['ndcg@12_novel_best_baseline_name']} {_fmt(ratios['ndcg@12_novel_best_baseline'])} "
                f"-> x{_fmt(ratios['ndcg@12_novel_ratio'], 2)}",
                f"Recall@100 fine-tuned vs raw encoder: {_fmt(ratios['retrieval_recall@100_finetuned'])} vs "
                f"{_fmt(ratios['retrieval_recall@100_raw'])} -> x{_fmt(ratios['retrieval_recall@100_ratio'], 2)}",
                f"Cold-start item recall (pipeline): {_fmt(ratios['cold_start_recall_pipeline'])}",
            ]
        )
    )
    return "\n\n".join(parts)


def timings_table(timings: Mapping[str, Mapping[str, float]]) -> str:
    """Stage wall time and peak RSS, one row per stage."""
    rows = [_timing_row(stage, t) for stage, t in timings.items()]
    total = [
        "total",
        _fmt(sum(t.get("wall_s", 0.0) for t in timings.values()), 1),
        _fmt(sum(t.get("cpu_s", 0.0) for t in timings.values()), 1),
        "",
        "",
    ]
    return _text_table(TIMING_HEADER, [*rows, total])


TIMING_HEADER = ["stage", "wall s", "CPU s", "peak RSS MB", "note"]


def _timing_row(stage: str, t: Mapping[str, Any]) -> list[str]:
    return [
        stage,
        _fmt(t.get("wall_s"), 1),
        _fmt(t.get("cpu_s"), 1),
        _fmt(t.get("peak_rss_mb"), 0),
        "cached from an earlier run" if t.get("cached") else "",
    ]


# ----------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(metrics: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: one panel per mode, one group per metric, one bar per system."""
    plt = _pyplot()
    final = metrics.get("final", {})
    fig, axes = plt.subplots(1, len(MODES), figsize=(12, 4.5), squeeze=False)
    for ax, mode in zip(axes[0], MODES):
        table = final.get(mode, {})
        systems = list(table)
        width = 0.8 / max(len(systems), 1)
        for i, name in enumerate(systems):
            vals = [table[name].get(m, 0.0) or 0.0 for m in HEADLINE_METRICS]
            xs = [j + i * width for j in range(len(HEADLINE_METRICS))]
            ax.bar(xs, vals, width=width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(HEADLINE_METRICS))])
        ax.set_xticklabels([m.upper() for m in HEADLINE_METRICS])
        ax.set_title(f"{mode} items")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # below the panels, so it never hides a bar
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_loss_curve(loss_curve: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Fine-tuning loss per step (and validation points when present)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(p["step"], p["loss"]) for p in loss_curve if "loss" in p]
    valid = [(p["step"], p["val_loss"]) for p in loss_curve if "val_loss" in p]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if valid:
        ax.plot(*zip(*valid), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("in-batch softmax loss")
    ax.set_title("Encoder fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_feature_importance(importance: Mapping[str, float], path: Path, top: int = 20) -> Path:
    """Horizontal bars of the ranker's `top` most important features (gain)."""
    plt = _pyplot()
    items = sorted(importance.items(), key=lambda kv: kv[1], reverse=True)[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * max(len(items), 1) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel("total gain")
    ax.set_title(f"Ranker feature importance (top {len(items)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report.md


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    *,
    loss_curve: Sequence[Mapping[str, float]] | None = None,
    feature_importance: Mapping[str, float] | None = None,
    timings: Mapping[str, Mapping[str, float]] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> Path:
    """Write `report.md` and its PNG plots into `out_dir` (usually `<bundle>/report/`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# recsvc training report", ""]
    if facts:
        lines += [f"- **{k}**: {_fmt(v)}" for k, v in facts.items()] + [""]

    if metrics.get("final"):
        lines += ["## Final ranking (test period)", "", _markdown_table(*_final_rows(metrics)), ""]
        lines += ["`all`: every test purchase counts (repurchases included); "]
        lines += [
            "`novel`: only items the user never had before the test period; seen items are excluded.",
            "",
        ]
        plot_metric_bars(metrics, out / "metrics.png")
        lines += ["![metrics](metrics.png)", ""]
        ratios = headline_ratios(metrics)
        lines += ["## Headline", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in ratios.items()] + [""]
    if metrics.get("retrieval"):
        lines += [
            "## Retrieval recall: raw vs fine-tuned encoder",
            "",
            _markdown_table(*_retrieval_rows(metrics)),
            "",
        ]
    if metrics.get("ann_recall") is not None:
        lines += [f"ANN recall vs exact search on real user vectors: {_fmt(metrics['ann_recall'])}", ""]
    if loss_curve:
        plot_loss_curve(loss_curve, out / "finetune_loss.png")
        lines += ["## Encoder fine-tuning", "", "![loss](finetune_loss.png)", ""]
    if feature_importance:
        plot_feature_importance(feature_importance, out / "feature_importance.png")
        top = sorted(feature_importance.items(), key=lambda kv: kv[1], reverse=True)[:20]
        lines += ["## Ranker feature importance", "", "![importance](feature_importance.png)", ""]
        lines += [_markdown_table(["feature", "gain"], [[k, _fmt(float(v), 1)] for k, v in top]), ""]
    if timings:
        rows = [_timing_row(stage, t) for stage, t in timings.items()]
        lines += ["## Stage timings", "", _markdown_table(TIMING_HEADER, rows), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
