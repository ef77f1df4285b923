"""A/B and interleaving report from an exposure log and an event log (CLI `recsvc-ab report`).

Unit of analysis is the exposure (one served list): CTR = share of exposures with at least one
click on a shown item, conversion = share with at least one conversion event, revenue per
exposure = sum of conversion values (reported only when events carry values). Each treatment is
compared with the control variant (two-proportion z-test, Welch t-test). Interleaved exposures
(items drafted by two teams) are left out of the split comparison and scored by team-draft
credit with an exact sign test instead.

Caveat: exposures of the same user are treated as independent; with many requests per user
the intervals are too narrow. Replays (training/simulate_ab.py) use one request per user.

    recsvc-ab report --exposures exposures.sqlite --events events.sqlite \\
        --out report.md --plot report.png
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsvc import ab_stats
from recsvc.config import ExperimentsConfig, ServeConfig
from recsvc.exposures import EXPOSURE_SCHEMA, ExposureLog, ExposureLogError, attribute, pseudonymise
from recsvc.interleaving import Credit, credit, preference_test, total_credit

log = logging.getLogger(__name__)


class ABReportError(Exception):
    """Input to the report is missing or malformed; the message names the file and column."""


@dataclass(frozen=True)
class VariantResult:
    variant: str
    exposures: int
    users: int
    ctr: ab_stats.Proportion
    conversion: ab_stats.Proportion
    revenue: tuple[float, float, float] | None  # mean, ci_low, ci_high per exposure; None without values
    ctr_test: ab_stats.ProportionTest | None  # vs control; None for the control itself
    conversion_test: ab_stats.ProportionTest | None
    revenue_test: ab_stats.MeanTest | None


@dataclass(frozen=True)
class InterleavingResult:
    team_a: str
    team_b: str
    impressions: int
    test: ab_stats.PreferenceTest  # preference > 0 favours team_a


@dataclass(frozen=True)
class ExperimentReport:
    experiment: str
    control: str | None
    variants: list[VariantResult]
    interleaving: list[InterleavingResult]


@dataclass(frozen=True)
class ABReport:
    experiments: list[ExperimentReport]
    confidence: float
    attributed_events: int
    total_events: int

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence


# ---------------------------------------------------------------------------------------------
# input


def read_exposures(path: str | Path) -> pl.DataFrame:
    """Long exposure frame from an `ExposureLog` SQLite file or its parquet export."""
    p = Path(path)
    if not p.exists():
        raise ABReportError(f"exposures file not found: {p}")
    if p.suffix == ".parquet":
        try:
            frame = pl.read_parquet(p)
        except Exception as exc:
            raise ABReportError(f"cannot read exposures parquet {p}: {exc}") from None
        missing = [c for c in EXPOSURE_SCHEMA if c not in frame.columns]
        if missing:
            raise ABReportError(f"exposures file {p} lacks column(s): {', '.join(missing)}")
        return frame.select(list(EXPOSURE_SCHEMA)).cast(EXPOSURE_SCHEMA)  # type: ignore[arg-type]
    try:
        with ExposureLog(p) as exposure_log:
            return exposure_log.to_frame()
    except (ExposureLogError, sqlite3.Error) as exc:
        raise ABReportError(
            f"cannot read exposures from {p} (expected .parquet or an exposure SQLite log): {exc}"
        ) from None


def read_events(path: str | Path, pseudonym_key: str | None) -> pl.DataFrame:
    """Events from the service's SQLite event store (`events` table), parquet or CSV.

    Needs `item_id, event, timestamp`; `request_id` and `value` are used when present. Raw
    `user_id`s are pseudonymised with `pseudonym_key` (the server's key) so that events without
    a request id can be matched to exposures by user.
    """
    p = Path(path)
    if not p.exists():
        raise ABReportError(f"events file not found: {p}")
    try:
        if p.suffix == ".parquet":
            frame = pl.read_parquet(p)
        elif p.suffix == ".csv":
            frame = pl.read_csv(
                p, schema_overrides={"user_id": pl.Utf8, "item_id": pl.Utf8, "request_id": pl.Utf8}
            )
        else:
            conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                cur = conn.execute("SELECT * FROM events")
                names = [d[0] for d in cur.description]
                rows = cur.fetchall()
            finally:
                conn.close()
            frame = pl.DataFrame(rows, schema=names, orient="row", infer_schema_length=None)
    except sqlite3.Error as exc:
        raise ABReportError(
            f"cannot read events from {p} (expected .parquet, .csv or a SQLite file with an 'events' table): {exc}"
        ) from None
    except Exception as exc:
        raise ABReportError(f"cannot read events file {p}: {exc}") from None
    missing = [c for c in ("item_id", "event", "timestamp") if c not in frame.columns]
    if missing:
        raise ABReportError(f"events file {p} lacks column(s): {', '.join(missing)}")
    if "user_key" not in frame.columns and "user_id" in frame.columns and pseudonym_key:
        keys = [pseudonymise(str(u), pseudonym_key) for u in frame["user_id"].to_list()]
        frame = frame.with_columns(pl.Series("user_key", keys, dtype=pl.Utf8))
    return frame


# ---------------------------------------------------------------------------------------------
# computation


def per_exposure_outcomes(
    exposures: pl.DataFrame, attributed: pl.DataFrame, config: ExperimentsConfig
) -> pl.DataFrame:
    """One row per exposure: variant, interleaved flag, clicked, converted, revenue."""
    clicks = list(config.click_events)
    convs = list(config.conversion_events)
    outcome = attributed.group_by("request_id").agg(
        pl.col("event").is_in(clicks).any().alias("clicked"),
        pl.col("event").is_in(convs).any().alias("converted"),
        pl.when(pl.col("event").is_in(convs)).then(pl.col("value")).otherwise(None).sum().alias("revenue"),
        pl.when(pl.col("event").is_in(convs)).then(pl.col("value")).otherwise(None).count().alias("n_values"),
    )
    per_exp = exposures.group_by("request_id", maintain_order=True).agg(
        pl.col("experiment").first(),
        pl.col("variant").first(),
        pl.col("user_key").first(),
        pl.col("origin").drop_nulls().unique().sort().alias("teams"),
    )
    return per_exp.join(outcome, on="request_id", how="left").with_columns(
        pl.col("clicked").fill_null(False),
        pl.col("converted").fill_null(False),
        pl.col("revenue").fill_null(0.0),
        pl.col("n_values").fill_null(0),
        (pl.col("teams").list.len() >= 2).alias("interleaved"),
    )


def _variant_results(
    rows: pl.DataFrame, control: str | None, confidence: float, with_revenue: bool
) -> list[VariantResult]:
    stats_by_variant: dict[str, tuple[int, int, int, int, np.ndarray]] = {}
    for variant in sorted(rows["variant"].unique().to_list()):
        part = rows.filter(pl.col("variant") == variant)
        stats_by_variant[variant] = (
            part.height,
            part["user_key"].n_unique(),
            int(part["clicked"].sum()),
            int(part["converted"].sum()),
            part["revenue"].to_numpy().astype(np.float64),
        )
    base = stats_by_variant.get(control) if control else None
    results = []
    for variant, (n, users, clicked, converted, revenue) in stats_by_variant.items():
        ctr_test = conv_test = rev_test = None
        if base is not None and variant != control:
            ctr_test = ab_stats.two_proportion_ztest(base[2], base[0], clicked, n, confidence)
            conv_test = ab_stats.two_proportion_ztest(base[3], base[0], converted, n, confidence)
            if with_revenue and base[0] >= 2 and n >= 2:
                rev_test = ab_stats.welch_ttest(base[4], revenue, confidence)
        results.append(
            VariantResult(
                variant,
                n,
                users,
                ab_stats.proportion(clicked, n, confidence),
                ab_stats.proportion(converted, n, confidence),
                ab_stats.mean_interval(revenue, confidence) if with_revenue else None,
                ctr_test,
                conv_test,
                rev_test,
            )
        )
    return results


def _interleaving_results(
    exposures: pl.DataFrame, attributed: pl.DataFrame, interleaved_ids: set[str], config: ExperimentsConfig
) -> list[InterleavingResult]:
    engaged = set(config.click_events) | set(config.conversion_events)
    clicked_by_request: dict[str, set[str]] = {}
    for rid, item, event in attributed.select("request_id", "item_id", "event").iter_rows():
        if event in engaged and rid in interleaved_ids:
            clicked_by_request.setdefault(rid, set()).add(item)
    lists: dict[str, list[tuple[str, str]]] = {}
    for rid, item, origin in (
        exposures.filter(pl.col("request_id").is_in(list(interleaved_ids)) & pl.col("item_id").is_not_null())
        .sort(["request_id", "position"])
        .select("request_id", "item_id", "origin")
        .iter_rows()
    ):
        lists.setdefault(rid, []).append((item, origin))
    by_pair: dict[tuple[str, str], list[Credit]] = {}
    for rid, shown in lists.items():
        teams = sorted({o for _, o in shown})
        if len(teams) != 2:
            continue
        pair = (teams[0], teams[1])
        by_pair.setdefault(pair, []).append(credit(shown, clicked_by_request.get(rid, ()), origins=pair))
    return [
        InterleavingResult(a, b, len(credits), preference_test(total_credit(credits)))
        for (a, b), credits in sorted(by_pair.items())
    ]


def build_report(
    exposures: pl.DataFrame,
    events: pl.DataFrame,
    config: ExperimentsConfig | None = None,
    control: str | None = None,
) -> ABReport:
    """Attribute events to exposures and compute every metric and test (no I/O)."""
    config = config or ExperimentsConfig()
    if exposures.is_empty():
        raise ABReportError("no exposures to report on")
    attributed = attribute(exposures, events, config.attribution_window_s)
    log.info("attributed %d of %d events to exposures", attributed.height, events.height)
    outcomes = per_exposure_outcomes(exposures, attributed, config)
    with_revenue = bool(
        events.filter(pl.col("event").is_in(list(config.conversion_events)))
        .select(pl.col("value").is_not_null().any() if "value" in events.columns else pl.lit(False))
        .item()
        if not events.is_empty()
        else False
    )
    reports = []
    for experiment in sorted(outcomes["experiment"].unique().to_list()):
        rows = outcomes.filter(pl.col("experiment") == experiment)
        split = rows.filter(~pl.col("interleaved"))
        names = sorted(split["variant"].unique().to_list())
        if control is not None and names and control not in names:
            raise ABReportError(
                f"--control {control!r} is not a variant of experiment {experiment!r} "
                f"(variants: {', '.join(names)}); pick one, or --experiment to report one experiment"
            )
        wanted = control or config.control_variant
        chosen = wanted if wanted in names else (names[0] if names else None)
        interleaved_ids = set(rows.filter(pl.col("interleaved"))["request_id"].to_list())
        reports.append(
            ExperimentReport(
                experiment,
                chosen,
                _variant_results(split, chosen, config.confidence, with_revenue),
                _interleaving_results(exposures, attributed, interleaved_ids, config)
                if interleaved_ids
                else [],
            )
        )
    return ABReport(reports, config.confidence, attributed.height, events.height)


# ---------------------------------------------------------------------------------------------
# output


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _points(x: float) -> str:
    """A difference of two rates, in percentage points: 10% -> 30% is +20 pp, not +20% (which
    reads as relative, i.e. 10% -> 12%)."""
    return f"{100 * x:.2f} pp"


def _test_cell(
    test: ab_stats.ProportionTest | ab_stats.MeanTest | None, alpha: float, pct: bool = True
) -> str:
    if test is None:
        return "—"
    fmt = _points if pct else (lambda v: f"{v:.4g}")
    star = " *" if test.p_value < alpha else ""
    return f"{'+' if test.diff >= 0 else ''}{fmt(test.diff)} [{fmt(test.ci_low)}, {fmt(test.ci_high)}] p={test.p_value:.3g}{star}"


def report_rows(report: ABReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-variant table (shared by stdout, markdown and HTML)."""
    header = ["experiment", "variant", "exposures", "users", "CTR [CI]", "Δ CTR vs control"]
    header += ["conversion [CI]", "Δ conversion vs control", "revenue/exposure [CI]", "Δ revenue vs control"]
    rows = []
    for exp in report.experiments:
        for v in exp.variants:
            name = v.variant + (" (control)" if v.variant == exp.control else "")
            rev = "—" if v.revenue is None else f"{v.revenue[0]:.4g} [{v.revenue[1]:.4g}, {v.revenue[2]:.4g}]"
            rows.append(
                [
                    exp.experiment,
                    name,
                    str(v.exposures),
                    str(v.users),
                    f"{_pct(v.ctr.rate)} [{_pct(v.ctr.ci_low)}, {_pct(v.ctr.ci_high)}]",
                    _test_cell(v.ctr_test, report.alpha),
                    f"{_pct(v.conversion.rate)} [{_pct(v.conversion.ci_low)}, {_pct(v.conversion.ci_high)}]",
                    _test_cell(v.conversion_test, report.alpha),
                    rev,
                    _test_cell(v.revenue_test, report.alpha, pct=False),
                ]
            )
    return header, rows


def interleaving_rows(report: ABReport) -> tuple[list[str], list[list[str]]]:
    header = [
        "experiment",
        "team A",
        "team B",
        "impressions",
        "wins A",
        "wins B",
        "ties",
        "Δ_AB",
        "p (sign test)",
    ]
    rows = []
    for exp in report.experiments:
        for r in exp.interleaving:
            t = r.test
            star = " *" if t.p_value < report.alpha else ""
            rows.append(
                [
                    exp.experiment,
                    r.team_a,
                    r.team_b,
                    str(r.impressions),
                    str(t.wins_a),
                    str(t.wins_b),
                    str(t.ties),
                    f"{t.preference:+.4f}",
                    f"{t.p_value:.3g}{star}",
                ]
            )
    return header, rows


def _plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _footer(report: ABReport) -> str:
    return (
        f"{report.attributed_events} of {report.total_events} events attributed to exposures; "
        f"intervals at {100 * report.confidence:g}%; pp = percentage points; "
        f"* = significant at p < {report.alpha:.3g}"
    )


def format_text(report: ABReport) -> str:
    parts: list[str] = []
    header, rows = report_rows(report)
    if rows:
        parts += [_plain_table(header, rows), ""]
    header, rows = interleaving_rows(report)
    if rows:
        parts += ["Interleaving (Δ_AB > 0 favours team A):", _plain_table(header, rows), ""]
    parts.append(_footer(report))
    return "\n".join(parts)


def format_markdown(report: ABReport) -> str:
    def table(header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(lines)

    parts = ["# A/B test report"]
    header, rows = report_rows(report)
    if rows:
        parts += ["", "## Variants vs control", "", table(header, rows)]
    header, rows = interleaving_rows(report)
    if rows:
        parts += ["", "## Interleaving", "", "Δ_AB > 0 favours team A.", "", table(header, rows)]
    parts += ["", _footer(report), ""]
    return "\n".join(parts)


def format_html(report: ABReport, plot_name: str | None = None) -> str:
    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>A/B test report</title>",
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>",
        "<h1>A/B test report</h1>",
    ]
    header, rows = report_rows(report)
    if rows:
        parts += ["<h2>Variants vs control</h2>", table(header, rows)]
    header, rows = interleaving_rows(report)
    if rows:
        parts += ["<h2>Interleaving</h2><p>Δ<sub>AB</sub> &gt; 0 favours team A.</p>", table(header, rows)]
    if plot_name:
        parts.append(f"<p><img src='{html.escape(plot_name)}' alt='metrics per variant'></p>")
    parts += [f"<p>{html.escape(_footer(report))}</p></body></html>"]
    return "\n".join(parts)


def plot_report(report: ABReport, path: str | Path) -> None:
    """CTR, conversion and revenue per variant with interval error bars (+ interleaving Δ_AB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, metrics = [], {"CTR": [], "conversion": [], "revenue / exposure": []}
    for exp in report.experiments:
        for v in exp.variants:
            labels.append(f"{exp.experiment}\n{v.variant}")
            metrics["CTR"].append((v.ctr.rate, v.ctr.ci_low, v.ctr.ci_high))
            metrics["conversion"].append((v.conversion.rate, v.conversion.ci_low, v.conversion.ci_high))
            metrics["revenue / exposure"].append(
                v.revenue if v.revenue is not None else (np.nan, np.nan, np.nan)
            )
    panels = [name for name, vals in metrics.items() if vals and not all(np.isnan(x[0]) for x in vals)]
    pairs = [(exp.experiment, r) for exp in report.experiments for r in exp.interleaving]
    n_panels = max(1, len(panels) + (1 if pairs else 0))
    fig, axes = plt.subplots(1, n_panels, figsize=(4.5 * n_panels, 4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        vals = np.array(metrics[name], dtype=np.float64)
        err = np.nan_to_num(np.abs(np.stack([vals[:, 0] - vals[:, 1], vals[:, 2] - vals[:, 0]])))
        ax.bar(range(len(labels)), vals[:, 0], yerr=err, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(name)
    if pairs:
        ax = axes[0][len(panels)]
        ax.barh(range(len(pairs)), [r.test.preference for _, r in pairs], color="tab:orange")
        ax.set_yticks(range(len(pairs)), [f"{e}\n{r.team_a} vs {r.team_b}" for e, r in pairs], fontsize=8)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title("interleaving Δ_AB (> 0: team A)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


def run_report(
    exposures_path: str | Path,
    events_path: str | Path,
    *,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    config: ExperimentsConfig | None = None,
    control: str | None = None,
    experiment: str | None = None,
    pseudonym_key: str | None = None,
) -> ABReport:
    """Read both logs, build the report, write the requested files; returns the report."""
    config = config or ExperimentsConfig()
    _check_output(plot, "--plot", PLOT_SUFFIXES)
    _check_output(out, "--out")
    exposures = read_exposures(exposures_path)
    if experiment is not None:
        exposures = exposures.filter(pl.col("experiment") == experiment)
        if exposures.is_empty():
            raise ABReportError(f"no exposures for experiment {experiment!r} in {exposures_path}")
    events = read_events(events_path, pseudonym_key)
    _warn_absent_event_types(events, config, events_path)
    report = build_report(exposures, events, config, control)
    try:
        if plot is not None:
            plot_report(report, plot)
            log.info("wrote plot %s", plot)
        if out is not None:
            out_path = Path(out)
            if out_path.suffix.lower() in (".html", ".htm"):
                rel = os.path.relpath(plot, out_path.parent) if plot is not None else None
                out_path.write_text(format_html(report, rel))
            else:
                out_path.write_text(format_markdown(report))
            log.info("wrote report %s", out_path)
    except OSError as exc:
        raise ABReportError(f"cannot write the report: {exc}") from None
    return report


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _check_output(path: str | Path | None, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse an output that cannot be written before any work, so no half set of files is left."""
    if path is None:
        return
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}"
        raise ABReportError(f"{flag} {path}: expected a {names} file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ABReportError(f"{flag} {path}: folder {parent} does not exist")
    if p.is_dir():
        raise ABReportError(f"{flag} {path} is a folder; give a file name")


def _warn_absent_event_types(events: pl.DataFrame, config: ExperimentsConfig, path: str | Path) -> None:
    """A misspelt --click-events type silently makes every CTR 0%: say so."""
    present = set(events["event"].unique().to_list()) if events.height else set()
    for flag, types in (
        ("--click-events", config.click_events),
        ("--conversion-events", config.conversion_events),
    ):
        absent = [t for t in types if t not in present]
        if absent:
            log.warning(
                "%s: no events of type %s in %s (types there: %s)",
                flag,
                ", ".join(repr(t) for t in absent),
                path,
                ", ".join(sorted(present)) or "none",
            )


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    defaults = ExperimentsConfig()
    parser = argparse.ArgumentParser(
        prog="recsvc-ab", description="A/B test analysis for recsvc experiments."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report",
        help="per-variant CTR / conversion / revenue with intervals and significance vs control",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument(
        "--exposures", required=True, help="exposure log: the server's SQLite file or its parquet export"
    )
    rep.add_argument(
        "--events", required=True, help="events: the server's SQLite event store, parquet or CSV"
    )
    rep.add_argument("--out", help="also write the report here: .html for HTML, anything else for markdown")
    rep.add_argument("--plot", help="also write a chart of the metrics per variant here (.png, .svg or .pdf)")
    rep.add_argument("--experiment", help="report only this experiment (default: all in the log)")
    rep.add_argument(
        "--control",
        help=f"variant the others are compared with (default: {defaults.control_variant!r}, "
        "else the first variant by name); a name that is not a variant is an error",
    )
    rep.add_argument(
        "--window-s",
        type=int,
        default=defaults.attribution_window_s,
        help="events without request_id count for an exposure of the same user and item shown at most this "
        "many seconds earlier (default: %(default)s)",
    )
    rep.add_argument(
        "--click-events",
        default=",".join(defaults.click_events),
        help="comma-separated event types counted as clicks (default: %(default)s)",
    )
    rep.add_argument(
        "--conversion-events",
        default=",".join(defaults.conversion_events),
        help="comma-separated event types counted as conversions; their value is revenue (default: %(default)s)",
    )
    rep.add_argument(
        "--confidence", type=float, default=defaults.confidence, help="interval level (default: %(default)s)"
    )
    rep.add_argument(
        "--pseudonym-key",
        default=os.environ.get("RECSVC_PSEUDONYM_KEY", ServeConfig().pseudonym_key),
        help="the server's pseudonym key, to match events without request_id to exposures by user "
        "(default: $RECSVC_PSEUDONYM_KEY or the ServeConfig default)",
    )
    return parser


def _option_problem(args: argparse.Namespace) -> str | None:
    """The first option value that makes no sense, as a message naming the flag; None if all do."""
    if not 0.0 < args.confidence < 1.0:
        return f"--confidence must be in (0, 1), got {args.confidence}"
    if args.window_s < 0:
        return f"--window-s must be >= 0, got {args.window_s}"
    for flag, value in (
        ("--click-events", args.click_events),
        ("--conversion-events", args.conversion_events),
    ):
        if not _csv(value):
            return f"{flag} needs at least one event type, got {value!r}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problem = _option_problem(args)
    if problem:
        print(f"recsvc-ab: error: {problem}", file=sys.stderr)
        return 2
    config = ExperimentsConfig(
        attribution_window_s=args.window_s,
        click_events=_csv(args.click_events),
        conversion_events=_csv(args.conversion_events),
        confidence=args.confidence,
    )
    try:
        report = run_report(
            args.exposures,
            args.events,
            out=args.out,
            plot=args.plot,
            config=config,
            control=args.control,
            experiment=args.experiment,
            pseudonym_key=args.pseudonym_key,
        )
    except ABReportError as exc:
        print(f"recsvc-ab: error: {exc}", file=sys.stderr)
        return 2
    print(format_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
