"""Python client for recsvc and the `recsvc-client` CLI.

`RecsvcClient` wraps the generated stub with keyword arguments and per-call deadlines, so
callers never build protobuf messages by hand. The CLI prints responses as JSON and exits 2 with
the server's message (no traceback) when the server rejects a request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
_REPEAT = {"allow": pb.REPEAT_POLICY_ALLOW, "exclude": pb.REPEAT_POLICY_EXCLUDE}


def filters(
    exclude_items: Sequence[str] = (),
    include: Mapping[str, Sequence[str]] | None = None,
    exclude: Mapping[str, Sequence[str]] | None = None,
    repeat_policy: str = "allow",
) -> pb.Filters:
    """Build a Filters message; `repeat_policy` is "allow" or "exclude"."""
    if repeat_policy not in _REPEAT:
        raise ValueError(f"repeat_policy must be 'allow' or 'exclude', got {repeat_policy!r}")
    return pb.Filters(
        exclude_item_ids=list(exclude_items),
        include_attributes={k: pb.StringList(values=list(v)) for k, v in (include or {}).items()},
        exclude_attributes={k: pb.StringList(values=list(v)) for k, v in (exclude or {}).items()},
        repeat_policy=_REPEAT[repeat_policy],
    )


def recommend_request(
    user_id: str,
    k: int = 0,
    session_items: Sequence[str] = (),
    query: str = "",
    filters: pb.Filters | None = None,
    forced_variant: str = "",
    experiment: str = "",
    request_id: str = "",
    explain: bool = False,
) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        user_id=user_id,
        num_results=k,
        context=pb.Context(session_item_ids=list(session_items), query=query),
        filters=filters,
        experiment=pb.ExperimentHints(experiment=experiment, forced_variant=forced_variant),
        request_id=request_id,
        explain=explain,
    )


def event(
    user_id: str,
    item_id: str,
    event_type: str,
    timestamp: int = 0,
    value: float | None = None,
    request_id: str = "",
) -> pb.Event:
    """One event; timestamp 0 lets the server stamp it with its clock."""
    msg = pb.Event(
        user_id=user_id, item_id=item_id, event_type=event_type, timestamp=timestamp, request_id=request_id
    )
    if value is not None:
        msg.value = value
    return msg


class RecsvcClient:
    """Blocking client; one channel, reused. Use as a context manager or call `close()`.

    `own_connection`: grpc shares one TCP connection between channels to the same target, so
    several clients in one process all reach the same server process. A server run with
    `--processes N` spreads connections, not requests, over its processes: give each client its
    own connection (a local subchannel pool) to spread the load.
    """

    def __init__(
        self, target: str = DEFAULT_TARGET, timeout: float | None = 5.0, *, own_connection: bool = False
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        self._channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.RecommenderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RecsvcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _t(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def recommend(
        self,
        user_id: str,
        k: int = 0,
        *,
        session_items: Sequence[str] = (),
        query: str = "",
        filters: pb.Filters | None = None,
        forced_variant: str = "",
        experiment: str = "",
        request_id: str = "",
        explain: bool = False,
        timeout: float | None = None,
    ) -> pb.RecommendResponse:
        req = recommend_request(
            user_id, k, session_items, query, filters, forced_variant, experiment, request_id, explain
        )
        return self.stub.Recommend(req, timeout=self._t(timeout))

    def similar(
        self,
        item_id: str,
        k: int = 0,
        *,
        filters: pb.Filters | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> pb.RecommendResponse:
        req = pb.SimilarItemsRequest(item_id=item_id, num_results=k, filters=filters, request_id=request_id)
        return self.stub.SimilarItems(req, timeout=self._t(timeout))

    def record_events(self, events: Iterable[pb.Event], *, timeout: float | None = None) -> int:
        """Returns how many events the server durably accepted (all or none)."""
        resp = self.stub.RecordEvents(pb.RecordEventsRequest(events=list(events)), timeout=self._t(timeout))
        return int(resp.accepted)

    def batch_recommend(
        self, requests: Iterable[pb.RecommendRequest], *, timeout: float | None = None
    ) -> Iterator[pb.RecommendResponse]:
        """Stream requests, get responses back in the same order."""
        return self.stub.BatchRecommend(iter(requests), timeout=self._t(timeout))

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._t(timeout))

    def reload(
        self, version: str = "", *, rollback: bool = False, timeout: float | None = 120.0
    ) -> pb.ReloadModelResponse:
        return self.stub.ReloadModel(
            pb.ReloadModelRequest(version=version, rollback=rollback), timeout=timeout
        )

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """SERVING / NOT_SERVING / SERVICE_UNKNOWN for `service` ("" = the whole server)."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._t(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, timeout: float = 30.0, alive: Callable[[], bool] | None = None) -> None:
        """Poll health until SERVING; TimeoutError otherwise (used by scripts and tests).

        `alive` (e.g. `lambda: proc.poll() is None` for a server the caller started) is checked
        before each poll, so a server that died while starting fails at once with RuntimeError
        instead of after the whole timeout.
        """
        deadline = time.monotonic() + timeout
        last = "UNKNOWN"
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"the server for {self.target} exited before it was SERVING")
            try:
                last = self.health(timeout=1.0)
                if last == "SERVING":
                    return
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.05)
        raise TimeoutError(f"{self.target} not SERVING after {timeout:.0f} s (last status: {last})")


# ----------------------------------------------------------------------------- CLI


def _attr_pairs(values: Sequence[str] | None, flag: str) -> dict[str, list[str]]:
    """`attr=value` pairs -> {attr: [values]} (repeat the flag for several values)."""
    out: dict[str, list[str]] = {}
    for raw in values or ():
        name, sep, value = raw.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} expects ATTRIBUTE=VALUE, got {raw!r}")
        out.setdefault(name, []).append(value)
    return out


def _positive_seconds(text: str) -> float:
    """argparse type for --timeout: a deadline of 0 or less makes every call fail at once."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsvc-client",
        description="Query a running recsvc-serve and print each answer as JSON. Exit status: 0 ok, "
        "2 when the server rejects the request or cannot be reached, or on bad input (one line on "
        "stderr); `health` exits 1 when the server answers but is not SERVING.",
    )
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"server host:port (default {DEFAULT_TARGET})"
    )
    parser.add_argument(
        "--timeout", type=_positive_seconds, default=10.0, help="deadline per call in seconds (default 10)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("recommend", help="ranked items for a user")
    rec.add_argument("--user", required=True, help="user id (unknown users get a non-personalised answer)")
    rec.add_argument(
        "--session-items", nargs="*", default=[], help="item ids seen in this session, oldest first"
    )
    rec.add_argument("--query", default="", help="free-text query steering the results")
    rec.add_argument("--k", type=int, default=0, help="number of results (0 = server default)")
    _add_filter_flags(rec)
    rec.add_argument("--forced-variant", default="", help="experiment variant to force (QA)")
    rec.add_argument("--explain", action="store_true", help="ask for a short explanation per item")

    sim = sub.add_parser("similar", help="items similar to one item")
    sim.add_argument("--item", required=True, help="catalogue item id")
    sim.add_argument("--k", type=int, default=0, help="number of results (0 = server default)")
    _add_filter_flags(sim)

    ev = sub.add_parser(
        "events", help="record events: a JSON-lines file (or '-' for stdin) or one --user/--item"
    )
    ev.add_argument(
        "--file", help="JSON lines with user_id, item_id, event_type, [timestamp, value, request_id]"
    )
    ev.add_argument("--user", help="user id of a single event")
    ev.add_argument("--item", help="item id of a single event")
    ev.add_argument("--type", default="click", help="event type of a single event (default click)")
    ev.add_argument("--value", type=float, help="optional value (e.g. a rating)")

    sub.add_parser("info", help="model version, item count, metrics and loaded versions")
    sub.add_parser(
        "health",
        help="health status of the server (exit 1 if it answers but is not SERVING, 2 if unreachable)",
    )
    rl = sub.add_parser("reload", help="admin: load a bundle version (default: CURRENT) or roll back")
    which = rl.add_mutually_exclusive_group()
    which.add_argument(
        "--version", default="", help="bundle version to load (default: the one CURRENT names)"
    )
    which.add_argument("--rollback", action="store_true", help="go back to the previously active version")
    return parser


def _add_filter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exclude-items", nargs="*", default=[], help="item ids never to return")
    p.add_argument(
        "--include",
        action="append",
        metavar="ATTR=VALUE",
        help="only items with this attribute value (repeatable; a value no item has matches "
        "nothing and is listed in the answer's unknown_filter_values)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="ATTR=VALUE",
        help="drop items with this attribute value (repeatable; values no item has are listed "
        "in unknown_filter_values)",
    )
    if p.prog.endswith("recommend"):
        p.add_argument("--exclude-seen", action="store_true", help="never return items the user already has")


def _filters_from(args: argparse.Namespace) -> pb.Filters:
    return filters(
        exclude_items=args.exclude_items,
        include=_attr_pairs(args.include, "--include"),
        exclude=_attr_pairs(args.exclude, "--exclude"),
        repeat_policy="exclude" if getattr(args, "exclude_seen", False) else "allow",
    )


_EVENT_FIELDS = ("user_id", "item_id", "event_type")


def _event_from_line(text: str, where: str) -> pb.Event:
    """One JSON-lines event; `where` ("FILE line N") starts every error message."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [f for f in _EVENT_FIELDS if row.get(f) in (None, "")]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (need {', '.join(_EVENT_FIELDS)})")
    timestamp, value = row.get("timestamp", 0), row.get("value")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise ValueError(f"{where}: timestamp must be epoch seconds (an integer), got {timestamp!r}")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{where}: value must be a number, got {value!r}")
    return event(
        str(row["user_id"]),
        str(row["item_id"]),
        str(row["event_type"]),
        timestamp,
        value,
        str(row.get("request_id", "")),
    )


def _read_events(args: argparse.Namespace) -> list[pb.Event]:
    if args.file and (args.user or args.item):
        raise ValueError("events takes either --file or --user/--item, not both")
    if args.file:
        name = "stdin" if args.file == "-" else args.file
        fh = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
        out: list[pb.Event] = []
        n = 0
        try:
            with fh:
                for n, line in enumerate(fh, start=1):
                    if line.strip():
                        out.append(_event_from_line(line, f"{name} line {n}"))
        except UnicodeDecodeError:
            raise ValueError(
                f"{name}: not UTF-8 text at or after line {n + 1}; expected JSON lines"
            ) from None
        if not out:
            raise ValueError(f"{name} has no events")
        return out
    if not args.user or not args.item:
        raise ValueError("events needs --file or both --user and --item")
    return [event(args.user, args.item, args.type, 0, args.value)]


def _print(msg: Any) -> None:
    # Every field, zero values included: an empty answer shows "items": [], not a missing key.
    body = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    ordered = {f.name: body[f.name] for f in msg.DESCRIPTOR.fields if f.name in body}  # .proto order
    print(json.dumps(ordered, indent=2))


def _unreachable(exc: grpc.RpcError) -> bool:
    """No server answered (refused, unresolvable host), as opposed to a server that answers
    UNAVAILABLE itself (no bundle loaded yet): only the first needs the --target hint."""
    details = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and ("connect" in details or "resolv" in details)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with RecsvcClient(args.target, timeout=args.timeout) as client:
            if args.command == "recommend":
                _print(
                    client.recommend(
                        args.user,
                        args.k,
                        session_items=args.session_items,
                        query=args.query,
                        filters=_filters_from(args),
                        forced_variant=args.forced_variant,
                        explain=args.explain,
                    )
                )
            elif args.command == "similar":
                _print(client.similar(args.item, args.k, filters=_filters_from(args)))
            elif args.command == "events":
                print(json.dumps({"accepted": client.record_events(_read_events(args))}))
            elif args.command == "info":
                _print(client.model_info())
            elif args.command == "reload":
                _print(client.reload(args.version, rollback=args.rollback, timeout=max(args.timeout, 120.0)))
            elif args.command == "health":
                status = client.health()
                print(status)
                return 0 if status == "SERVING" else 1
    except grpc.RpcError as exc:
        hint = ""
        if _unreachable(exc):
            hint = f"cannot reach recsvc-serve at {args.target} (is it running? is --target right?): "
        print(f"recsvc-client: {exc.code().name}: {hint}{exc.details()}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (`| head`) stopped early: not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:
        print(f"recsvc-client: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
