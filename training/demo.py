"""`make demo`: the whole product end to end on a synthetic shop, in a few minutes on a laptop CPU.

It runs the same commands a user would, in order, and prints what each one did:
1. `recsvc-synth` writes a synthetic catalogue + interaction log (canonical folder);
2. `recsvc-train` validates it, fine-tunes the encoder, builds the index and ranker, evaluates
   everything beside the baselines and publishes a versioned bundle;
3. `recsvc-serve` starts the gRPC service on a free loopback port;
4. the Python client asks for recommendations (a known user, a new user with session items,
   a free-text query, similar items), records an event, and shows the answer change;
5. the server is stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import polars as pl

log = logging.getLogger("recsvc.demo")


def _run(cmd: list[str]) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def _bin(name: str) -> str:
    """Console script next to this interpreter (the venv), so the demo runs the installed CLIs."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _show(title: str, response: object, titles: dict[str, str]) -> None:
    items = response.items  # type: ignore[attr-defined]
    print(f"\n--- {title}")
    print(
        f"model {response.model_version}  personalised={response.personalised}"  # type: ignore[attr-defined]
        + (f"  unknown={list(response.unknown_item_ids)}" if response.unknown_item_ids else "")  # type: ignore[attr-defined]
    )
    for rank, item in enumerate(items, 1):
        why = ""
        if item.explanation:  # e.g. "similar to item0389": name the item the shopper knows
            words = [titles.get(w, w) for w in item.explanation.split()]
            why = f"   ({' '.join(words)})"
        print(
            f"{rank:2d}. {item.score:7.3f}  {titles.get(item.item_id, item.item_id)[:60]:60s} "
            f"[{','.join(item.sources)}]{why}"
        )


def query_server(workdir: Path, data_dir: Path, bundles: Path) -> None:
    from recsvc.client import RecsvcClient, event
    from recsvc.server import free_port

    items = pl.read_parquet(data_dir / "items.parquet")
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    inter = pl.read_parquet(data_dir / "interactions.parquet")
    known_user = (
        inter.group_by("user_id").len().sort(["len", "user_id"], descending=[True, False])["user_id"][0]
    )
    history = inter.filter(pl.col("user_id") == known_user).sort("timestamp")["item_id"].to_list()

    port = free_port()
    cmd = [
        _bin("recsvc-serve"),
        "--bundles",
        str(bundles),
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--events-db",
        str(workdir / "events.sqlite"),
    ]
    print(f"\n$ {' '.join(cmd)} &", flush=True)
    proc = subprocess.Popen(cmd)
    try:
        with RecsvcClient(f"127.0.0.1:{port}", timeout=30.0) as client:
            try:
                client.wait_until_serving(timeout=180.0, alive=lambda: proc.poll() is None)
            except (RuntimeError, TimeoutError) as exc:
                raise SystemExit(f"recsvc-serve did not start (exit status {proc.poll()}): {exc}") from None
            info = client.model_info()
            print(f"\nserving bundle {info.version} with {info.item_count} items")
            print(f"\nknown user {known_user}: last items bought/viewed:")
            for item_id in history[-5:]:
                print(f"    {titles.get(item_id, item_id)}")
            _show(f"Recommend(user={known_user})", client.recommend(known_user, 8, explain=True), titles)
            session = [*history[-2:], "no-such-item"]
            _show(
                "Recommend(new user, session items + one unknown id)",
                client.recommend("brand-new-visitor", 8, session_items=session),
                titles,
            )
            _show(
                'Recommend(new user, query="running shoes for trail")',
                client.recommend("another-visitor", 8, query="running shoes for trail"),
                titles,
            )
            _show(
                f"SimilarItems({titles.get(history[-1], history[-1])})",
                client.similar(history[-1], 5),
                titles,
            )
            target = client.recommend(known_user, 1).items[0].item_id
            accepted = client.record_events([event(known_user, target, "purchase")])
            print(f"\nRecordEvents: {accepted} event durably stored (user bought '{titles.get(target)}')")
            _show(
                f"Recommend(user={known_user}, repeat_policy=exclude) after the purchase",
                client.recommend(known_user, 5, filters=_exclude_repeats()),
                titles,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("\nserver stopped")


def _exclude_repeats() -> object:
    from recsvc.client import filters

    return filters(repeat_policy="exclude")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("demo"), help="where data, bundles and logs go")
    parser.add_argument("--users", type=int, default=2_000, help="synthetic users (default 2000)")
    parser.add_argument("--items", type=int, default=1_200, help="synthetic catalogue size (default 1200)")
    parser.add_argument("--interactions", type=int, default=60_000, help="synthetic events (default 60000)")
    parser.add_argument("--days", type=int, default=30, help="days the log spans (default 30)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--max-steps", type=int, default=150, help="fine-tuning steps (small so the demo takes minutes)"
    )
    parser.add_argument("--model-dir", default=None, help="local BERT directory (default: bundled MiniLM)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    workdir: Path = args.workdir
    data_dir = workdir / "data"
    bundles = workdir / "bundles"
    workdir.mkdir(parents=True, exist_ok=True)

    print("=== 1. synthetic shop ===")
    _run(
        [
            _bin("recsvc-synth"),
            "--out",
            str(data_dir),
            "--users",
            str(args.users),
            "--items",
            str(args.items),
            "--interactions",
            str(args.interactions),
            "--days",
            str(args.days),
            "--seed",
            str(args.seed),
        ]
    )
    print("\n=== 2. train, evaluate against baselines, publish a bundle ===")
    train_cmd = [
        _bin("recsvc-train"),
        "--data",
        str(data_dir),
        "--out",
        str(bundles),
        "--max-steps",
        str(args.max_steps),
    ]
    if args.model_dir:
        train_cmd += ["--model-dir", args.model_dir]
    _run(train_cmd)
    print("\n=== 3-5. serve, query over gRPC, stop ===")
    query_server(workdir, data_dir, bundles)
    print(f"\ndemo finished; data, bundles and reports are under {workdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
