from __future__ import annotations

import pytest

from recsvc import validation
from recsvc.config import ServeConfig
from recsvc.v1 import recommender_pb2 as pb
from recsvc.validation import Limits, RequestValidationError

LIMITS = Limits(
    max_k=50, default_k=10, max_context_items=3, max_query_chars=20, max_batch_events=3, max_id_chars=12
)
ATTRS = frozenset({"category", "colour"})
KNOWN_ITEMS = {"i1", "i2", "i3"}
EVENT_TYPES = frozenset({"view", "purchase"})
NOW = 1_700_000_000


def _rec(**kw: object) -> pb.RecommendRequest:
    base: dict[str, object] = {"user_id": "u1"}
    base.update(kw)
    return pb.RecommendRequest(**base)


def test_full_request_converts_to_domain_request() -> None:
    msg = _rec(
        num_results=5,
        context=pb.Context(session_item_ids=["i1", "i2"], query="red dress"),
        filters=pb.Filters(
            exclude_item_ids=["i3"],
            include_attributes={"category": pb.StringList(values=["dress", "skirt"])},
            exclude_attributes={"colour": pb.StringList(values=["black"])},
            repeat_policy=pb.REPEAT_POLICY_EXCLUDE,
        ),
        explain=True,
    )
    req = validation.recommend_request(msg, LIMITS, ATTRS)
    assert req.user_id == "u1"
    assert req.k == 5
    assert req.session_items == ("i1", "i2")
    assert req.query == "red dress"
    assert req.exclude_items == frozenset({"i3"})
    assert req.include_attributes == {"category": frozenset({"dress", "skirt"})}
    assert req.exclude_attributes == {"colour": frozenset({"black"})}
    assert req.repeat_policy == "exclude"
    assert req.explain is True


def test_zero_num_results_means_the_default_k() -> None:
    assert validation.recommend_request(_rec(), LIMITS, ATTRS).k == 10


def test_blank_query_becomes_no_query() -> None:
    assert validation.recommend_request(_rec(context=pb.Context(query="  ")), LIMITS, ATTRS).query is None


def test_unspecified_repeat_policy_allows_repeats() -> None:
    assert validation.recommend_request(_rec(), LIMITS, ATTRS).repeat_policy == "allow"


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (_rec(user_id=""), "user_id"),
        (_rec(user_id="x" * 13), "user_id"),
        (_rec(user_id="a\nb"), "user_id"),
        (_rec(num_results=51), "num_results"),
        (_rec(num_results=-1), "num_results"),
        (_rec(context=pb.Context(session_item_ids=["a", "b", "c", "d"])), "context.session_item_ids"),
        (_rec(context=pb.Context(session_item_ids=["a", ""])), "context.session_item_ids[1]"),
        (_rec(context=pb.Context(query="q" * 21)), "context.query"),
        (_rec(filters=pb.Filters(exclude_item_ids=[""])), "filters.exclude_item_ids[0]"),
        (
            _rec(filters=pb.Filters(include_attributes={"size": pb.StringList(values=["m"])})),
            "filters.include_attributes['size']",
        ),
        (
            _rec(filters=pb.Filters(exclude_attributes={"colour": pb.StringList(values=[])})),
            "filters.exclude_attributes['colour']",
        ),
        (_rec(filters=pb.Filters(repeat_policy=7)), "filters.repeat_policy"),
        (_rec(request_id="r" * 13), "request_id"),
        (_rec(experiment=pb.ExperimentHints(forced_variant="v\x00")), "experiment.forced_variant"),
    ],
)
def test_invalid_recommend_field_is_named(msg: pb.RecommendRequest, field: str) -> None:
    with pytest.raises(RequestValidationError) as exc:
        validation.recommend_request(msg, LIMITS, ATTRS)
    assert exc.value.field == field
    assert str(exc.value).startswith(field + ":")


def test_batch_prefix_names_the_request_index() -> None:
    with pytest.raises(RequestValidationError) as exc:
        validation.recommend_request(_rec(num_results=99), LIMITS, ATTRS, field="requests[3]")
    assert exc.value.field == "requests[3].num_results"


def test_unknown_attribute_message_lists_the_catalogue_attributes() -> None:
    msg = _rec(filters=pb.Filters(include_attributes={"size": pb.StringList(values=["m"])}))
    with pytest.raises(RequestValidationError, match="category, colour"):
        validation.recommend_request(msg, LIMITS, ATTRS)


def test_similar_request_converts_filters_and_k() -> None:
    msg = pb.SimilarItemsRequest(
        item_id="i1", num_results=3, filters=pb.Filters(exclude_item_ids=["i2"]), request_id="r1"
    )
    q = validation.similar_request(msg, LIMITS, ATTRS)
    assert (q.item_id, q.k, q.exclude_items, q.request_id) == ("i1", 3, frozenset({"i2"}), "r1")


def test_similar_request_without_item_id_is_rejected() -> None:
    with pytest.raises(RequestValidationError) as exc:
        validation.similar_request(pb.SimilarItemsRequest(), LIMITS, ATTRS)
    assert exc.value.field == "item_id"


def _events(*events: pb.Event) -> pb.RecordEventsRequest:
    return pb.RecordEventsRequest(events=list(events))


def _convert(msg: pb.RecordEventsRequest) -> list:
    return validation.events(msg, LIMITS, EVENT_TYPES, KNOWN_ITEMS.__contains__, NOW)


def test_events_convert_with_zero_timestamp_meaning_now() -> None:
    out = _convert(
        _events(
            pb.Event(user_id="u", item_id="i1", event_type="view"),
            pb.Event(
                user_id="u", item_id="i2", event_type="purchase", timestamp=NOW - 5, value=2.0, request_id="r"
            ),
        )
    )
    assert [(e.item_id, e.event, e.timestamp, e.value, e.request_id) for e in out] == [
        ("i1", "view", NOW, None, None),
        ("i2", "purchase", NOW - 5, 2.0, "r"),
    ]


def test_unknown_items_are_all_named_in_one_error() -> None:
    msg = _events(
        pb.Event(user_id="u", item_id="i1", event_type="view"),
        pb.Event(user_id="u", item_id="nope", event_type="view"),
        pb.Event(user_id="u", item_id="gone", event_type="view"),
    )
    with pytest.raises(RequestValidationError) as exc:
        _convert(msg)
    assert exc.value.field == "events[1].item_id"
    assert "'nope'" in str(exc.value) and "'gone'" in str(exc.value)


def test_unknown_event_type_is_named_with_the_known_ones() -> None:
    with pytest.raises(RequestValidationError) as exc:
        _convert(_events(pb.Event(user_id="u", item_id="i1", event_type="like")))
    assert exc.value.field == "events[0].event_type"
    assert "'like'" in str(exc.value) and "purchase, view" in str(exc.value)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (pb.Event(user_id="", item_id="i1", event_type="view"), "events[0].user_id"),
        (pb.Event(user_id="u", item_id="", event_type="view"), "events[0].item_id"),
        (pb.Event(user_id="u", item_id="i1", event_type=""), "events[0].event_type"),
        (pb.Event(user_id="u", item_id="i1", event_type="view", timestamp=-1), "events[0].timestamp"),
        (
            pb.Event(user_id="u", item_id="i1", event_type="view", timestamp=NOW + 2 * 86_400),
            "events[0].timestamp",
        ),
        (pb.Event(user_id="u", item_id="i1", event_type="view", value=float("nan")), "events[0].value"),
    ],
)
def test_invalid_event_field_is_named(event: pb.Event, field: str) -> None:
    with pytest.raises(RequestValidationError) as exc:
        _convert(_events(event))
    assert exc.value.field == field


def test_empty_and_oversized_event_batches_are_rejected() -> None:
    with pytest.raises(RequestValidationError, match="at least one"):
        _convert(_events())
    too_many = [pb.Event(user_id="u", item_id="i1", event_type="view")] * 4
    with pytest.raises(RequestValidationError, match="limit is 3"):
        _convert(_events(*too_many))


def test_limits_follow_the_serve_config() -> None:
    limits = Limits.from_config(ServeConfig(max_k=7, max_query_chars=9))
    assert (limits.max_k, limits.max_query_chars) == (7, 9)
