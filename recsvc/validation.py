"""Wire messages -> domain objects, rejecting every invalid field with a message naming it.

Pure functions, no gRPC context: the servicer turns `RequestValidationError` into
INVALID_ARGUMENT. Checking everything here means the Recommender only ever sees well-formed,
bounded requests (a client cannot ask for 10^9 results or send a megabyte query).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from recsvc.config import DAY, ServeConfig
from recsvc.history import Event
from recsvc.recommender import RecommendRequest
from recsvc.v1 import recommender_pb2 as pb

_REPEAT_POLICIES = {
    pb.REPEAT_POLICY_UNSPECIFIED: "allow",
    pb.REPEAT_POLICY_ALLOW: "allow",
    pb.REPEAT_POLICY_EXCLUDE: "exclude",
}
_MAX_LISTED = 5  # unknown ids quoted in one message


class RequestValidationError(ValueError):
    """One request field is invalid; `field` is its path in the request (e.g. `events[2].item_id`)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Limits:
    """The bounds a request must respect (from ServeConfig)."""

    max_k: int = 200
    default_k: int = 10
    max_context_items: int = 200
    max_query_chars: int = 2_000
    max_batch_events: int = 10_000
    max_id_chars: int = 256
    max_filter_values: int = 1_000
    future_tolerance_s: int = DAY

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> Limits:
        return cls(
            max_k=cfg.max_k,
            default_k=cfg.default_k,
            max_context_items=cfg.max_context_items,
            max_query_chars=cfg.max_query_chars,
            max_batch_events=cfg.max_batch_events,
            max_id_chars=cfg.max_id_chars,
            max_filter_values=cfg.max_filter_values,
        )


@dataclass(frozen=True)
class ExperimentHints:
    experiment: str | None
    forced_variant: str | None


@dataclass(frozen=True)
class SimilarQuery:
    """A validated SimilarItems request."""

    item_id: str
    k: int
    exclude_items: frozenset[str]
    include_attributes: Mapping[str, frozenset[str]]
    exclude_attributes: Mapping[str, frozenset[str]]
    explain: bool
    request_id: str


# ----------------------------------------------------------------------------- field checks


def check_id(value: str, field: str, limits: Limits, *, required: bool = True) -> str:
    """An identifier: non-blank when required, bounded length, no control characters."""
    if not value.strip():
        if required:
            raise RequestValidationError(field, "must not be empty")
        return value
    if len(value) > limits.max_id_chars:
        raise RequestValidationError(
            field, f"is {len(value)} characters long; the limit is {limits.max_id_chars}"
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise RequestValidationError(field, "must not contain control characters")
    return value


def check_k(value: int, field: str, limits: Limits) -> int:
    """0 means the server default; otherwise 1..max_k."""
    if value == 0:
        return min(limits.default_k, limits.max_k)
    if value < 0 or value > limits.max_k:
        raise RequestValidationError(
            field, f"must be between 1 and {limits.max_k} (0 = default {limits.default_k}), got {value}"
        )
    return int(value)


def check_filters(
    msg: pb.Filters, field: str, limits: Limits, attributes: Collection[str]
) -> tuple[frozenset[str], dict[str, frozenset[str]], dict[str, frozenset[str]], str]:
    """(exclude_items, include_attributes, exclude_attributes, repeat_policy)."""
    if len(msg.exclude_item_ids) > limits.max_filter_values:
        raise RequestValidationError(
            f"{field}.exclude_item_ids",
            f"has {len(msg.exclude_item_ids)} ids; the limit is {limits.max_filter_values}",
        )
    for i, item in enumerate(msg.exclude_item_ids):
        check_id(item, f"{field}.exclude_item_ids[{i}]", limits)
    include = _attribute_filter(msg.include_attributes, f"{field}.include_attributes", limits, attributes)
    exclude = _attribute_filter(msg.exclude_attributes, f"{field}.exclude_attributes", limits, attributes)
    if msg.repeat_policy not in _REPEAT_POLICIES:
        raise RequestValidationError(
            f"{field}.repeat_policy",
            f"unknown value {msg.repeat_policy}; use REPEAT_POLICY_ALLOW or REPEAT_POLICY_EXCLUDE",
        )
    return frozenset(msg.exclude_item_ids), include, exclude, _REPEAT_POLICIES[msg.repeat_policy]


def _attribute_filter(
    entries: Mapping[str, pb.StringList], field: str, limits: Limits, attributes: Collection[str]
) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for name, values in entries.items():
        where = f"{field}[{name!r}]"
        if name not in attributes:
            known = ", ".join(sorted(attributes)) or "none"
            raise RequestValidationError(where, f"unknown attribute {name!r} (catalogue attributes: {known})")
        if not values.values:
            raise RequestValidationError(where, "needs at least one value")
        if len(values.values) > limits.max_filter_values:
            raise RequestValidationError(
                where, f"has {len(values.values)} values; the limit is {limits.max_filter_values}"
            )
        out[name] = frozenset(values.values)
    return out


# ----------------------------------------------------------------------------- requests


def recommend_request(
    msg: pb.RecommendRequest, limits: Limits, attributes: Collection[str], field: str = ""
) -> RecommendRequest:
    """Validate a RecommendRequest; `attributes` are the catalogue's filterable attribute names."""
    prefix = f"{field}." if field else ""
    user_id = check_id(msg.user_id, f"{prefix}user_id", limits)
    k = check_k(msg.num_results, f"{prefix}num_results", limits)
    session = msg.context.session_item_ids
    if len(session) > limits.max_context_items:
        raise RequestValidationError(
            f"{prefix}context.session_item_ids",
            f"has {len(session)} items; the limit is {limits.max_context_items}",
        )
    for i, item in enumerate(session):
        check_id(item, f"{prefix}context.session_item_ids[{i}]", limits)
    query = msg.context.query
    if len(query) > limits.max_query_chars:
        raise RequestValidationError(
            f"{prefix}context.query",
            f"is {len(query)} characters long; the limit is {limits.max_query_chars}",
        )
    exclude_items, include, exclude, repeat = check_filters(
        msg.filters, f"{prefix}filters", limits, attributes
    )
    check_id(msg.request_id, f"{prefix}request_id", limits, required=False)
    experiment_hints(msg, limits, field)
    return RecommendRequest(
        user_id=user_id,
        k=k,
        session_items=tuple(session),
        query=query if query.strip() else None,
        exclude_items=exclude_items,
        include_attributes=include,
        exclude_attributes=exclude,
        repeat_policy=repeat,
        explain=bool(msg.explain),
    )


def experiment_hints(msg: pb.RecommendRequest, limits: Limits, field: str = "") -> ExperimentHints:
    prefix = f"{field}." if field else ""
    check_id(msg.experiment.experiment, f"{prefix}experiment.experiment", limits, required=False)
    check_id(msg.experiment.forced_variant, f"{prefix}experiment.forced_variant", limits, required=False)
    return ExperimentHints(
        experiment=msg.experiment.experiment or None,
        forced_variant=msg.experiment.forced_variant or None,
    )


def similar_request(msg: pb.SimilarItemsRequest, limits: Limits, attributes: Collection[str]) -> SimilarQuery:
    item_id = check_id(msg.item_id, "item_id", limits)
    k = check_k(msg.num_results, "num_results", limits)
    exclude_items, include, exclude, _ = check_filters(msg.filters, "filters", limits, attributes)
    request_id = check_id(msg.request_id, "request_id", limits, required=False)
    return SimilarQuery(
        item_id=item_id,
        k=k,
        exclude_items=exclude_items,
        include_attributes=include,
        exclude_attributes=exclude,
        explain=bool(msg.explain),
        request_id=request_id,
    )


def events(
    msg: pb.RecordEventsRequest,
    limits: Limits,
    event_types: Collection[str],
    is_known_item: Callable[[str], bool],
    now: int,
) -> list[Event]:
    """Validate a whole batch; any invalid event rejects the batch (nothing gets written).

    Unknown item ids and event types are collected over the whole batch so one error names
    all of them, not just the first.
    """
    if not msg.events:
        raise RequestValidationError("events", "must contain at least one event")
    if len(msg.events) > limits.max_batch_events:
        raise RequestValidationError(
            "events", f"has {len(msg.events)} events; the limit is {limits.max_batch_events}"
        )
    out: list[Event] = []
    unknown_items: dict[str, int] = {}
    unknown_types: dict[str, int] = {}
    for i, ev in enumerate(msg.events):
        where = f"events[{i}]"
        check_id(ev.user_id, f"{where}.user_id", limits)
        check_id(ev.item_id, f"{where}.item_id", limits)
        if not ev.event_type:
            raise RequestValidationError(f"{where}.event_type", "must not be empty")
        if ev.timestamp < 0:
            raise RequestValidationError(
                f"{where}.timestamp", f"must be epoch seconds >= 0 (0 = now), got {ev.timestamp}"
            )
        if ev.timestamp > now + limits.future_tolerance_s:
            raise RequestValidationError(
                f"{where}.timestamp",
                f"{ev.timestamp} is more than {limits.future_tolerance_s} s in the future",
            )
        value = ev.value if ev.HasField("value") else None
        if value is not None and not math.isfinite(value):
            raise RequestValidationError(f"{where}.value", f"must be a finite number, got {value}")
        check_id(ev.request_id, f"{where}.request_id", limits, required=False)
        if ev.event_type not in event_types:
            unknown_types.setdefault(ev.event_type, i)
        if not is_known_item(ev.item_id):
            unknown_items.setdefault(ev.item_id, i)
        out.append(
            Event(
                user_id=ev.user_id,
                item_id=ev.item_id,
                event=ev.event_type,
                timestamp=int(ev.timestamp) if ev.timestamp else now,
                value=value,
                request_id=ev.request_id or None,
            )
        )
    if unknown_types:
        first = next(iter(unknown_types.values()))
        raise RequestValidationError(
            f"events[{first}].event_type",
            f"unknown event type(s) {_quote(unknown_types)}; known: {', '.join(sorted(event_types))}",
        )
    if unknown_items:
        first = next(iter(unknown_items.values()))
        raise RequestValidationError(
            f"events[{first}].item_id", f"unknown item id(s) {_quote(unknown_items)} (not in the catalogue)"
        )
    return out


def _quote(values: Mapping[str, int]) -> str:
    names = list(values)
    shown = ", ".join(repr(v) for v in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")
