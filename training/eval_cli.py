"""recsvc-eval: compare systems on a time split of a canonical data folder.

Loads the folder (training/data.py), holds out the last `--test-days`, tunes each baseline on
the last `--valid-days` of the remaining train data (never on test), evaluates every system
under the protocol of training/evaluate.py, prints a table and writes the JSON results.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from recsvc.config import BaselineConfig, DataConfig, EvalConfig, SplitConfig, TrainConfig
from recsvc.config_files import ConfigFileError
from training.baselines import BASELINES, CandidateGenerator, make_baseline, tune
from training.data import DataValidationError, load_dataset
from training.evaluate import MODES, EvaluationError, EvaluationTable, evaluate_system
from training.split import holdout_cutoff, time_split

log = logging.getLogger("recsvc.eval")

RAW_ENCODER = "raw_encoder"
SYSTEM_NAMES = (*BASELINES, RAW_ENCODER)


class UsageError(ValueError):
    """A bad command-line value, reported without a traceback."""


def parse_systems(text: str) -> list[str]:
    """Comma-separated system names, validated against the known ones (order kept, no repeats)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError(f"--systems needs at least one system; choose from {', '.join(SYSTEM_NAMES)}")
    unknown = [n for n in names if n not in SYSTEM_NAMES]
    if unknown:
        raise UsageError(f"--systems: unknown system(s) {unknown}; choose from {', '.join(SYSTEM_NAMES)}")
    return names


def load_raw_encoder(
    popularity_window_days: float, encoder_dir: str | None = None
) -> CandidateGenerator | None:
    """The BERT retrieval baseline (the shipped MiniLM unless `encoder_dir`) when
    training/text_baseline.py is importable; None, with a warning, otherwise."""
    try:
        from training.text_baseline import EncoderRetrieval
    except ImportError as err:
        log.warning(
            "raw_encoder skipped: training.text_baseline.EncoderRetrieval is not importable (%s)", err
        )
        return None
    return EncoderRetrieval(
        model_dir=encoder_dir, name=RAW_ENCODER, popularity_window_days=popularity_window_days
    )


def _is_encoder_error(exc: BaseException) -> bool:
    """A bad --encoder-dir (no config, no weights), raised when the raw encoder first loads.

    Imported here, not at the top: recsvc.encoder imports torch, which only raw_encoder needs."""
    from recsvc.encoder import EncoderError

    return isinstance(exc, EncoderError)


def _tune_record(
    name: str,
    config: BaselineConfig,
    grid: dict[str, list[Any]],
    train: Any,
    items: Any,
    eval_config: EvalConfig,
    valid_days: float,
) -> dict[str, Any]:
    started = time.perf_counter()
    result = tune(
        functools.partial(make_baseline, name, config),
        grid,
        train,
        items,
        valid_days,
        metric=eval_config.tune_metric,
        mode=eval_config.tune_mode,
        max_users=eval_config.tune_max_users,
        seed=eval_config.seed,
    )
    log.info("%s tuned on validation: %s (%s=%.4f)", name, result.params, result.metric, result.score)
    return {
        "params": result.params,
        "metric": result.metric,
        "mode": result.mode,
        "score": result.score,
        "cutoff": result.cutoff,
        "trials": [{"params": p, "score": s} for p, s in result.trials],
        "seconds": time.perf_counter() - started,
    }


def build_systems(
    names: Sequence[str],
    train: Any,
    items: Any,
    *,
    baseline_config: BaselineConfig,
    eval_config: EvalConfig,
    valid_days: float,
    do_tune: bool,
    encoder_dir: str | None = None,
) -> tuple[list[CandidateGenerator], dict[str, Any]]:
    """Instantiate each named system, tuned on the validation window when `do_tune`.

    The popularity window is tuned first and shared by every system, because popularity fills
    every list and is all that new users get: comparing systems with different fills would
    measure the fill, not the method.
    """
    systems: list[CandidateGenerator] = []
    tuning: dict[str, Any] = {}
    pop_grid = baseline_config.grids.get("popularity", {})
    if do_tune and pop_grid:
        tuning["popularity"] = _tune_record(
            "popularity", baseline_config, pop_grid, train, items, eval_config, valid_days
        )
        baseline_config = dataclasses.replace(baseline_config, **tuning["popularity"]["params"])
    for name in names:
        if name == RAW_ENCODER:
            system = load_raw_encoder(baseline_config.popularity_window_days, encoder_dir)
            if system is not None:
                systems.append(system)
            continue
        grid = baseline_config.grids.get(name, {})
        if do_tune and grid and name != "popularity":
            tuning[name] = _tune_record(name, baseline_config, grid, train, items, eval_config, valid_days)
        params = tuning[name]["params"] if name in tuning else {}
        systems.append(make_baseline(name, baseline_config, **params))
    return systems, tuning


def run_evaluation(
    data_dir: str | Path,
    *,
    systems: Sequence[str],
    test_days: float = SplitConfig.test_days,
    valid_days: float = SplitConfig.valid_days,
    eval_config: EvalConfig | None = None,
    baseline_config: BaselineConfig | None = None,
    checkpoint: str | Path | None = None,
    encoder_dir: str | None = None,
    data_config: DataConfig | None = None,
) -> EvaluationTable:
    """Load, split, tune, evaluate: the whole comparison, shared by the CLI and the benchmark.

    With `checkpoint`, the table so far is written there as JSON after each system, so a slow
    system at the end (the raw encoder embeds the whole catalogue) cannot lose the others.
    """
    eval_config = eval_config or EvalConfig()
    baseline_config = baseline_config or BaselineConfig()
    dataset = load_dataset(data_dir, data_config or DataConfig())
    try:
        cutoff = holdout_cutoff(dataset.interactions, test_days)
    except ValueError as exc:
        raise EvaluationError(f"--test-days {test_days:g}: {exc}") from None
    split = time_split(dataset.interactions, cutoff)
    if split.train.height == 0 or split.test.height == 0:
        raise EvaluationError(
            f"holding out {test_days} day(s) leaves {split.train.height} train and {split.test.height} "
            "test rows; both must be non-empty"
        )
    log.info("split at %d: %d train rows, %d test rows", cutoff, split.train.height, split.test.height)
    built, tuning = build_systems(
        systems,
        split.train,
        dataset.items,
        baseline_config=baseline_config,
        eval_config=eval_config,
        valid_days=valid_days,
        do_tune=eval_config.tune,
        encoder_dir=encoder_dir,
    )
    protocol = {
        "data": str(data_dir),
        "cutoff": cutoff,
        "test_days": test_days,
        "valid_days": valid_days,
        "train_rows": split.train.height,
        "test_rows": split.test.height,
        "catalogue_items": dataset.items.height,
        "max_users": eval_config.max_users,
        "tuned": eval_config.tune,
        "tune_metric": eval_config.tune_metric,
        "tune_mode": eval_config.tune_mode,
        "seed": eval_config.seed,
        "encoder_dir": encoder_dir,
        "tuning": tuning,
    }
    table = EvaluationTable(
        results=[], ks=tuple(sorted(eval_config.ks)), modes=tuple(eval_config.modes), protocol=protocol
    )
    for system in tqdm(built, desc="evaluating systems", unit="system"):
        try:
            result = evaluate_system(
                system,
                split.train,
                split.test,
                dataset.items,
                eval_config.ks,
                eval_config.modes,
                max_users=eval_config.max_users,
                seed=eval_config.seed,
            )
        except ValueError as exc:
            if system.name != RAW_ENCODER or not _is_encoder_error(exc):
                raise
            kept = (
                f"; the systems evaluated before it are in {checkpoint}"
                if checkpoint and table.results
                else ""
            )
            raise EvaluationError(f"raw_encoder: {exc}{kept}") from None
        if system.name in tuning:
            result["tuning"] = tuning[system.name]
        table.results.append(result)
        if checkpoint is not None:
            table.to_json(checkpoint)
    return table


def report_text(table: EvaluationTable) -> str:
    """Console report: every test user, then known users only (new users can only get popularity)."""
    return (
        "all test users\n"
        + table.to_console()
        + "\n\nknown users (with train history)\n"
        + table.to_console("known_users")
    )


def report_markdown(table: EvaluationTable) -> str:
    return (
        "### All test users\n\n"
        + table.to_markdown()
        + "\n\n### Known users (with train history)\n\n"
        + table.to_markdown("known_users")
        + "\n"
    )


def build_parser() -> argparse.ArgumentParser:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(
        prog="recsvc-eval",
        description="Compare recommendation systems on a time split of a canonical data folder "
        "(interactions + items). Baselines are tuned on a validation window inside train.",
    )
    parser.add_argument(
        "--data", required=True, help="folder with interactions.{parquet,csv} and items.{parquet,csv}"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a recsvc-train config file (YAML/JSON): its data (event weights), split, baselines and eval "
        "sections replace the defaults below, so baselines are evaluated as the pipeline trains them; "
        "flags given here override the file",
    )
    parser.add_argument(
        "--test-days",
        type=float,
        default=None,
        help=f"hold out the last N days as test (default: {SplitConfig.test_days})",
    )
    parser.add_argument(
        "--valid-days",
        type=float,
        default=None,
        help=f"last N days of train used to tune baselines (default: {SplitConfig.valid_days})",
    )
    parser.add_argument(
        "--systems",
        default=None,
        help="comma-separated systems to evaluate: popularity (recent popularity), repeat_pop (user's own "
        "items then popular), itemknn (co-purchase item kNN), als (implicit ALS), raw_encoder (untuned BERT "
        "retrieval from training/text_baseline.py; skipped with a warning if unavailable). Default: "
        + ",".join(defaults.systems),
    )
    parser.add_argument(
        "--encoder-dir",
        default=None,
        help="encoder for raw_encoder (HF save_pretrained folder); default: the shipped all-MiniLM-L6-v2. "
        "Catalogue embeddings are cached under $RECSVC_CACHE_DIR (default ~/.cache/recsvc)",
    )
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=None,
        help=f"cut-offs K for every metric (default: {' '.join(map(str, defaults.ks))})",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help="comma-separated: all (repurchases count) and/or novel (only items new to the user). Default: "
        + ",".join(defaults.modes),
    )
    parser.add_argument(
        "--max-users",
        type=int,
        default=None,
        help="evaluate a seeded random sample of this many test users (default: all)",
    )
    parser.add_argument(
        "--tune-max-users",
        type=int,
        default=None,
        help=f"validation users per tuning trial (default: {defaults.tune_max_users})",
    )
    parser.add_argument("--no-tune", action="store_true", help="skip tuning; use BaselineConfig defaults")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed for user sampling and ALS (default: {defaults.seed})",
    )
    parser.add_argument(
        "--out",
        default="metrics.json",
        help="write all results as JSON here (default: %(default)s); rewritten after each system, so "
        "a run that fails part-way leaves the systems finished so far",
    )
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What one recsvc-eval run uses: defaults <- --config file <- flags."""

    eval: EvalConfig
    baselines: BaselineConfig
    data: DataConfig
    test_days: float
    valid_days: float


def config_from_args(args: argparse.Namespace) -> EvalSettings:
    """The run's settings from parsed flags (and --config), with values checked so errors name the flag."""
    base = TrainConfig()
    if args.config is not None:
        from training.cli import config_from_file

        try:
            base = config_from_file(args.config)
        except ConfigFileError as exc:
            raise UsageError(str(exc)) from None
    ev = base.eval
    ks = tuple(args.k) if args.k is not None else ev.ks
    if any(k <= 0 for k in ks):
        raise UsageError(f"--k: cut-offs must be positive, got {list(ks)}")
    modes = ev.modes
    if args.modes is not None:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        if not modes or any(m not in MODES for m in modes):
            raise UsageError(
                f"--modes: expected a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}"
            )
    test_days = args.test_days if args.test_days is not None else base.split.test_days
    valid_days = args.valid_days if args.valid_days is not None else base.split.valid_days
    for flag, value in (("--test-days", test_days), ("--valid-days", valid_days)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    max_users = args.max_users if args.max_users is not None else ev.max_users
    tune_max_users = args.tune_max_users if args.tune_max_users is not None else ev.tune_max_users
    for flag, value in (("--max-users", max_users), ("--tune-max-users", tune_max_users)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    if args.encoder_dir is not None and not Path(args.encoder_dir).is_dir():
        raise UsageError(f"--encoder-dir {args.encoder_dir} does not exist or is not a directory")
    systems = tuple(parse_systems(args.systems)) if args.systems is not None else ev.systems
    eval_config = dataclasses.replace(
        ev,
        ks=tuple(sorted(set(ks))),
        modes=modes,
        systems=systems,
        max_users=max_users,
        tune=ev.tune and not args.no_tune,
        tune_max_users=tune_max_users,
        seed=args.seed if args.seed is not None else ev.seed,
    )
    return EvalSettings(eval_config, base.baselines, base.data, test_days, valid_days)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = config_from_args(args)
        table = run_evaluation(
            args.data,
            systems=settings.eval.systems,
            test_days=settings.test_days,
            valid_days=settings.valid_days,
            eval_config=settings.eval,
            baseline_config=settings.baselines,
            data_config=settings.data,
            checkpoint=args.out,
            encoder_dir=args.encoder_dir,
        )
    except (UsageError, DataValidationError, EvaluationError) as err:
        print(f"recsvc-eval: error: {err}", file=sys.stderr)
        return 2
    print(report_text(table))
    path = table.to_json(args.out)
    log.info("wrote %s", path)
    if args.markdown:
        Path(args.markdown).write_text(report_markdown(table))
        log.info("wrote %s", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
