"""`recsvc-train`: train, evaluate and publish a bundle; verify, list and roll back bundles.

    recsvc-train --data DIR --out BUNDLES            # defaults give a good model
    recsvc-train rollback --bundles BUNDLES [--to VERSION]
    recsvc-train verify --bundles BUNDLES_OR_BUNDLE
    recsvc-train list --bundles BUNDLES

User mistakes (bad data, bad config, corrupted bundle) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from recsvc import bundle
from recsvc.bundle import BundleError
from recsvc.config import TrainConfig, from_dict
from recsvc.config_checks import ConfigValueError, check_train_config
from recsvc.config_files import ConfigFileError, read_mapping
from training.argtypes import positive_int

log = logging.getLogger("recsvc-train")

EXIT_USAGE = 2
SUBCOMMANDS = ("train", "rollback", "verify", "list")


# ----------------------------------------------------------------------------- config


def config_from_file(path: str | Path) -> TrainConfig:
    """TrainConfig defaults overridden by a YAML/JSON file, every value range-checked;
    ConfigFileError names the file and the field."""
    try:
        cfg = from_dict(TrainConfig, _moved_eval_k(read_mapping(path, "config file")))
        check_train_config(cfg)
        return cfg
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigFileError):
            raise
        raise ConfigFileError(f"config file {path}: {exc}") from exc


def _moved_eval_k(data: dict[str, Any]) -> dict[str, Any]:
    """A file's top-level `eval_k` (the older name, which the pipeline no longer reads) as `eval.ks`,
    so it is not silently ignored; both given and different is an error."""
    if "eval_k" not in data:
        return data
    data = dict(data)
    ks = data.pop("eval_k")
    section = dict(data.get("eval") or {})
    if "ks" in section and list(section["ks"]) != list(ks):
        raise ConfigValueError(f"eval_k {ks} and eval.ks {section['ks']} disagree; set eval.ks only")
    log.warning("config: eval_k is the older name of eval.ks; using it as eval.ks")
    section["ks"] = ks
    data["eval"] = section
    return data


def build_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig defaults <- --config file <- individual flags; ConfigValueError names a bad field."""
    cfg = config_from_file(args.config) if args.config else TrainConfig()
    enc = cfg.encoder
    if args.model_dir is not None:
        enc = replace(enc, model_dir=str(args.model_dir))
    if args.epochs is not None:
        enc = replace(enc, epochs=args.epochs)
    if args.max_steps is not None:
        enc = replace(enc, max_steps=args.max_steps)
    if args.seed is not None:
        enc = replace(enc, seed=args.seed)
        cfg = replace(cfg, ranker=replace(cfg.ranker, seed=args.seed))
    cfg = replace(cfg, encoder=enc)
    check_train_config(cfg)  # the flags' values too, so every user value is checked before any work
    return cfg


# ----------------------------------------------------------------------------- parsers


def train_parser() -> argparse.ArgumentParser:
    from training.pipeline import STAGES

    parser = argparse.ArgumentParser(
        prog="recsvc-train",
        description=(
            "Train the text-aware recommender on a canonical data folder (interactions + items), "
            "evaluate it against baselines on a held-out period, and publish a versioned bundle "
            "that recsvc-serve and recsvc-batch load. Defaults give a good model with no extra flags."
        ),
        epilog=(
            "other commands: 'recsvc-train rollback --bundles DIR [--to VERSION]' points CURRENT at an "
            "older bundle; 'recsvc-train verify --bundles DIR' checks checksums; 'recsvc-train list "
            "--bundles DIR' lists versions. Run any of them with --help."
        ),
    )
    parser.add_argument(
        "--data", required=True, help="folder with interactions.{parquet,csv} and items.{parquet,csv}"
    )
    parser.add_argument(
        "--out", required=True, help="bundles root: the new bundle goes to OUT/<version>, OUT/CURRENT"
    )
    parser.add_argument(
        "--config", help="YAML or JSON file overriding TrainConfig fields, e.g. {encoder: {epochs: 2}}"
    )
    parser.add_argument(
        "--model-dir", help="local BERT directory to fine-tune (default: bundled all-MiniLM-L6-v2)"
    )
    parser.add_argument("--epochs", type=positive_int, help="fine-tuning epochs (overrides encoder.epochs)")
    parser.add_argument(
        "--max-steps", type=positive_int, help="cap on fine-tuning optimizer steps (encoder.max_steps)"
    )
    parser.add_argument(
        "--no-eval",
        action="store_true",
        help="production mode: no held-out test period, train on all data (T = end of data), skip baselines",
    )
    parser.add_argument(
        "--stage",
        choices=STAGES,
        help="run only this stage, reusing earlier stages' outputs cached in --work-dir (requires --work-dir)",
    )
    parser.add_argument(
        "--work-dir",
        help="cache for stage outputs; re-running with the same dir skips stages whose inputs did not change",
    )
    parser.add_argument("--seed", type=int, help="random seed for fine-tuning and the ranker")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device for BERT fine-tuning/embedding and FAISS (auto: CUDA when available)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (logs only)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    return parser


def _bundles_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"recsvc-train {command}", description=description)
    parser.add_argument(
        "--bundles", required=True, help="bundles root (holds CURRENT and <version>/ folders)"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    return parser


def rollback_parser() -> argparse.ArgumentParser:
    parser = _bundles_parser(
        "rollback",
        "Point CURRENT at an older bundle (verified first). Running servers pick it up on their next reload poll.",
    )
    parser.add_argument(
        "--to", help="version to serve (default: the newest version older than the current one)"
    )
    return parser


def verify_parser() -> argparse.ArgumentParser:
    return _bundles_parser(
        "verify",
        "Check a bundle's format version and the sha256 of every file; --bundles may be a root (checks CURRENT) "
        "or a version folder.",
    )


def list_parser() -> argparse.ArgumentParser:
    return _bundles_parser("list", "List published bundle versions, oldest first, marking the CURRENT one.")


# ----------------------------------------------------------------------------- commands


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time, so main() can run repeatedly in one
    process (tests, notebooks) without logging into a stream an earlier caller closed."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity < 2 else logging.DEBUG
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _fail(message: str) -> int:
    print(f"recsvc-train: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_train(argv: Sequence[str]) -> int:
    from recsvc.encoder import EncoderError
    from training.data import DataValidationError
    from training.finetune import FinetuneError
    from training.pipeline import PipelineError, run_training

    args = train_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.stage and not args.work_dir:
        return _fail("--stage needs --work-dir (where earlier stages' outputs are cached)")
    if args.model_dir and not (Path(args.model_dir) / "config.json").is_file():
        return _fail(f"--model-dir {args.model_dir} is not a BERT checkpoint directory (no config.json)")
    try:
        cfg = build_config(args)
        model_dir = cfg.encoder.model_dir
        if model_dir and not args.model_dir and not (Path(model_dir) / "config.json").is_file():
            return _fail(f"encoder.model_dir {model_dir} is not a BERT checkpoint directory (no config.json)")
        result = run_training(
            args.data,
            args.out,
            cfg,
            evaluate=not args.no_eval,
            stages=[args.stage] if args.stage else None,
            work_dir=args.work_dir,
            progress=not args.no_progress,
            device=args.device,
        )
    except (
        DataValidationError,
        ConfigFileError,
        ConfigValueError,
        BundleError,
        PipelineError,
        EncoderError,
        FinetuneError,
    ) as exc:
        return _fail(str(exc))
    if result.version:
        print(f"published bundle {result.version} in {args.out} (CURRENT -> {result.version})")
    else:
        print(f"stage(s) done; outputs cached in {args.work_dir}")
    return 0


def cmd_rollback(argv: Sequence[str]) -> int:
    args = rollback_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        before = bundle.current_version(args.bundles)
        version = bundle.rollback(args.bundles, to=args.to)
    except BundleError as exc:
        return _fail(str(exc))
    print(f"CURRENT: {before} -> {version} in {args.bundles}")
    return 0


def cmd_verify(argv: Sequence[str]) -> int:
    args = verify_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        path = bundle.resolve(args.bundles)
        manifest = bundle.verify(path)
    except BundleError as exc:
        return _fail(str(exc))
    print(f"ok: bundle {path.name} ({len(manifest['files'])} files, format {manifest['format_version']})")
    return 0


def cmd_list(argv: Sequence[str]) -> int:
    args = list_parser().parse_args(argv)
    _setup_logging(args.verbose)
    versions = bundle.list_versions(args.bundles)
    if not versions:
        return _fail(f"no published bundles in {args.bundles}")
    try:
        current = bundle.current_version(args.bundles)
    except BundleError:
        current = None
    for version in versions:
        print(f"{'*' if version == current else ' '} {version}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "train"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    handlers = {"train": cmd_train, "rollback": cmd_rollback, "verify": cmd_verify, "list": cmd_list}
    try:
        return handlers[command](rest)
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
