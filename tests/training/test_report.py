from __future__ import annotations

from pathlib import Path

import pytest

from training import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics() -> dict:
    return {
        "final": {
            "all": {
                "popularity": {"ndcg@12": 0.010, "map@12": 0.005, "recall@12": 0.02},
                "repeat_pop": {"ndcg@12": 0.030, "map@12": 0.015, "recall@12": 0.04},
                "full_pipeline": {"ndcg@12": 0.045, "map@12": 0.020, "recall@12": 0.05},
            },
            "novel": {
                "popularity": {"ndcg@12": 0.008, "map@12": 0.004, "recall@12": 0.02},
                "repeat_pop": {"ndcg@12": 0.004, "map@12": 0.002, "recall@12": 0.01},
                "full_pipeline": {"ndcg@12": 0.012, "map@12": 0.006, "recall@12": 0.03},
            },
        },
        "retrieval": {
            "raw_encoder": {"recall@50": 0.05, "recall@100": 0.08, "recall@200": 0.12},
            "finetuned_encoder": {"recall@50": 0.09, "recall@100": 0.16, "recall@200": 0.20},
        },
        "cold_start": {"full_pipeline": 0.03, "popularity": 0.0},
        "ann_recall": 0.98,
    }


def test_best_baseline_ignores_the_pipeline_itself() -> None:
    name, value = report.best_baseline(_metrics()["final"]["all"], "ndcg@12")
    assert (name, value) == ("repeat_pop", 0.030)


def test_headline_ratios_divide_pipeline_by_best_baseline_per_mode() -> None:
    ratios = report.headline_ratios(_metrics())
    assert ratios["ndcg@12_all_ratio"] == pytest.approx(0.045 / 0.030)
    assert ratios["ndcg@12_novel_best_baseline_name"] == "popularity"
    assert ratios["ndcg@12_novel_ratio"] == pytest.approx(0.012 / 0.008)
    assert ratios["retrieval_recall@100_ratio"] == pytest.approx(0.16 / 0.08)


def test_headline_ratio_is_none_when_the_baseline_scores_zero() -> None:
    metrics = _metrics()
    for vals in metrics["final"]["all"].values():
        vals["ndcg@12"] = 0.0
    assert report.headline_ratios(metrics)["ndcg@12_all_ratio"] is None


def test_console_table_lists_every_system_and_both_modes() -> None:
    text = report.console_table(_metrics())
    for name in ("popularity", "repeat_pop", "full_pipeline", "raw_encoder", "finetuned_encoder"):
        assert name in text
    assert "NDCG@12 all" in text and "NDCG@12 novel" in text
    assert "x1.50" in text


def test_write_report_writes_markdown_and_real_png_plots(tmp_path: Path) -> None:
    curve = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(10)] + [{"step": 9, "val_loss": 2.5}]
    importance = {f"f{i}": float(i) for i in range(30)}
    path = report.write_report(
        tmp_path / "report",
        _metrics(),
        loss_curve=curve,
        feature_importance=importance,
        timings={"finetune": {"wall_s": 12.3, "cpu_s": 20.5, "peak_rss_mb": 800.0}},
        facts={"version": "20260101T000000Z"},
    )
    text = path.read_text()
    assert "full_pipeline" in text and "finetune" in text and "20260101T000000Z" in text
    for png in ("metrics.png", "finetune_loss.png", "feature_importance.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == PNG_MAGIC
        assert f"({png})" in text
    assert "| f29 |" in text and "| f9 |" not in text  # only the top 20 features are tabulated


def test_write_report_without_optional_parts_writes_no_plots(tmp_path: Path) -> None:
    report.write_report(tmp_path, {"retrieval": _metrics()["retrieval"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_timings_table_totals_wall_and_cpu_time_and_marks_cached_stages() -> None:
    text = report.timings_table(
        {
            "load": {"wall_s": 1.0, "cpu_s": 0.5, "peak_rss_mb": 100.0, "cached": True},
            "ranker": {"wall_s": 2.5, "cpu_s": 4.0, "peak_rss_mb": 300.0},
        }
    )
    lines = text.splitlines()
    assert "cached" in lines[2] and "cached" not in lines[3]
    assert lines[-1].split() == ["total", "3.5", "4.5"]
