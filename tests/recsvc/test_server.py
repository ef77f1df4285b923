"""Every RPC of the real server over loopback gRPC, with a small real bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recsvc import bundle as bundle_store
from recsvc.bundle import LoadedBundle
from recsvc.client import RecsvcClient, event, filters, recommend_request
from recsvc.server import SERVICE_NAME
from recsvc.v1 import recommender_pb2 as pb
from tests.helpers.running_server import (
    FIRST_VERSION,
    RunningServer,
    copy_root,
    rpc_error,
    serve_config,
)


@pytest.fixture(scope="module")
def bundle(bundle_root: Path) -> LoadedBundle:
    """The same bundle loaded here, to pick known users/items and check attributes."""
    return bundle_store.load(bundle_root)


@pytest.fixture(scope="module")
def running(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("server")
    root = copy_root(bundle_root, work / "bundles")
    with RunningServer(serve_config(root, work, max_k=50)) as server:
        yield server


@pytest.fixture(scope="module")
def client(running: RunningServer) -> Iterator[RecsvcClient]:
    with running.client() as c:
        yield c


def _known_user(bundle: LoadedBundle) -> str:
    return max(bundle.history.users(), key=lambda u: len(bundle.history.get(u)))


def _item(bundle: LoadedBundle, i: int = 0) -> str:
    return str(bundle.catalog.item_ids[i])


# ----------------------------------------------------------------------------- Recommend


def test_known_user_gets_k_personalised_items_from_the_served_version(client: RecsvcClient, bundle) -> None:
    resp = client.recommend(_known_user(bundle), 7, request_id="req-1")
    assert len(resp.items) == 7
    assert resp.personalised is True
    assert resp.model_version == FIRST_VERSION
    assert resp.request_id == "req-1"
    assert all(it.item_id in bundle.catalog.index for it in resp.items)
    assert len({it.item_id for it in resp.items}) == 7
    assert [it.score for it in resp.items] == sorted((it.score for it in resp.items), reverse=True)
    assert all(it.sources for it in resp.items)


def test_response_carries_server_stage_timings(client: RecsvcClient, bundle) -> None:
    resp = client.recommend(_known_user(bundle), 3)
    assert {"queue", "validate", "total", "ranking"} <= set(resp.timings_ms)
    assert all(v >= 0 for v in resp.timings_ms.values())


def test_unknown_user_gets_a_valid_non_personalised_answer(client: RecsvcClient) -> None:
    resp = client.recommend("someone-never-seen", 5)
    assert len(resp.items) == 5
    assert resp.personalised is False


def test_unknown_session_items_are_reported_and_known_ones_personalise(client: RecsvcClient, bundle) -> None:
    resp = client.recommend("new-visitor", 5, session_items=[_item(bundle, 3), "no-such-item"])
    assert list(resp.unknown_item_ids) == ["no-such-item"]
    assert resp.personalised is True


def test_zero_num_results_returns_the_default_count(client: RecsvcClient, bundle) -> None:
    assert len(client.recommend(_known_user(bundle)).items) == 10


def test_include_attribute_filter_keeps_only_matching_items(client: RecsvcClient, bundle) -> None:
    codes = bundle.catalog.attributes["category"]
    values = bundle.catalog.attribute_values["category"]
    wanted = values[int(codes[0])]
    resp = client.recommend(_known_user(bundle), 5, filters=filters(include={"category": [wanted]}))
    assert resp.items
    for it in resp.items:
        assert values[int(codes[bundle.catalog.index[it.item_id]])] == wanted


def test_excluded_items_and_attribute_values_never_appear(client: RecsvcClient, bundle) -> None:
    user = _known_user(bundle)
    first = client.recommend(user, 5)
    banned = [it.item_id for it in first.items[:2]]
    codes = bundle.catalog.attributes["category"]
    values = bundle.catalog.attribute_values["category"]
    banned_value = values[int(codes[bundle.catalog.index[first.items[2].item_id]])]
    resp = client.recommend(
        user, 10, filters=filters(exclude_items=banned, exclude={"category": [banned_value]})
    )
    ids = [it.item_id for it in resp.items]
    assert not set(ids) & set(banned)
    assert all(values[int(codes[bundle.catalog.index[i]])] != banned_value for i in ids)


def _category_of(bundle: LoadedBundle, item_id: str) -> str:
    catalog = bundle.catalog
    return catalog.attribute_values["category"][int(catalog.attributes["category"][catalog.index[item_id]])]


def _ids(resp: pb.RecommendResponse) -> list[str]:
    return [it.item_id for it in resp.items]


def test_unknown_include_value_is_reported_and_the_known_one_still_filters(
    client: RecsvcClient, bundle
) -> None:
    user = _known_user(bundle)
    known = _category_of(bundle, _item(bundle, 0))
    mixed = client.recommend(user, 5, filters=filters(include={"category": [known, "jakcets"]}))
    alone = client.recommend(user, 5, filters=filters(include={"category": [known]}))
    assert list(mixed.unknown_filter_values) == ["category=jakcets"]
    assert list(alone.unknown_filter_values) == []
    assert _ids(mixed) and _ids(mixed) == _ids(alone)


def test_unknown_exclude_values_are_reported_and_remove_nothing(client: RecsvcClient, bundle) -> None:
    user = _known_user(bundle)
    banned = _category_of(bundle, client.recommend(user, 1).items[0].item_id)
    mixed = client.recommend(
        user, 8, filters=filters(exclude={"category": ["zz-typo", banned, "aa-typo", "zz-typo"]})
    )
    alone = client.recommend(user, 8, filters=filters(exclude={"category": [banned]}))
    assert list(mixed.unknown_filter_values) == ["category=aa-typo", "category=zz-typo"]
    assert _ids(mixed) == _ids(alone)


def test_only_known_filter_values_report_nothing(client: RecsvcClient, bundle) -> None:
    known = _category_of(bundle, _item(bundle, 0))
    resp = client.recommend(
        _known_user(bundle), 5, filters=filters(include={"category": [known]}, exclude={"category": [known]})
    )
    assert list(resp.unknown_filter_values) == []
    assert list(client.recommend(_known_user(bundle), 5).unknown_filter_values) == []


def test_similar_items_and_batch_report_unknown_filter_values_too(client: RecsvcClient, bundle) -> None:
    typo = filters(include={"category": ["jakcets"]}, exclude={"category": ["shirtz"]})
    similar = client.similar(_item(bundle, 5), 3, filters=typo)
    assert list(similar.unknown_filter_values) == ["category=jakcets", "category=shirtz"]
    reqs = [recommend_request("u-batch", 3, filters=typo), recommend_request("u-batch", 3)]
    first, second = client.batch_recommend(reqs)
    assert list(first.unknown_filter_values) == ["category=jakcets", "category=shirtz"]
    assert list(second.unknown_filter_values) == []


def test_repeat_policy_exclude_drops_items_the_user_already_has(client: RecsvcClient, bundle) -> None:
    user = _known_user(bundle)
    owned = {str(bundle.catalog.item_ids[i]) for i in bundle.history.get(user).items}
    resp = client.recommend(user, 20, filters=filters(repeat_policy="exclude"))
    assert resp.items
    assert not {it.item_id for it in resp.items} & owned


def test_explain_flag_returns_an_explanation_per_item(client: RecsvcClient, bundle) -> None:
    resp = client.recommend(_known_user(bundle), 3, explain=True)
    assert all(it.explanation for it in resp.items)


def test_free_text_query_runs_the_encoder_and_answers(client: RecsvcClient) -> None:
    resp = client.recommend("query-user", 4, query="red cotton dress")
    assert len(resp.items) == 4
    assert any("query" in it.sources for it in resp.items)


# ----------------------------------------------------------------------------- validation over the wire


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u", "k": 51}, "num_results"),
        ({"user_id": "u", "k": -3}, "num_results"),
        ({"user_id": "u", "query": "q" * 2001}, "context.query"),
        ({"user_id": "u", "session_items": [""]}, "context.session_item_ids[0]"),
        (
            {"user_id": "u", "filters": filters(include={"no_such_attribute": ["x"]})},
            "filters.include_attributes",
        ),
        ({"user_id": "u", "filters": pb.Filters(repeat_policy=9)}, "filters.repeat_policy"),
        ({"user_id": "u", "forced_variant": "treatment"}, "experiment.forced_variant"),
    ],
)
def test_invalid_recommend_field_is_invalid_argument_naming_it(
    client: RecsvcClient, request_kwargs, field
) -> None:
    err = rpc_error(client.stub.Recommend, recommend_request(**request_kwargs), timeout=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(field)


# ----------------------------------------------------------------------------- SimilarItems


def test_similar_items_returns_other_catalogue_items(client: RecsvcClient, bundle) -> None:
    item = _item(bundle, 5)
    resp = client.similar(item, 6)
    assert len(resp.items) == 6
    assert item not in {it.item_id for it in resp.items}
    assert resp.model_version == FIRST_VERSION


def test_similar_items_honours_exclusions(client: RecsvcClient, bundle) -> None:
    item = _item(bundle, 5)
    first = client.similar(item, 3)
    again = client.similar(item, 3, filters=filters(exclude_items=[first.items[0].item_id]))
    assert first.items[0].item_id not in {it.item_id for it in again.items}


def test_similar_to_an_unknown_item_is_not_found_naming_it(client: RecsvcClient) -> None:
    err = rpc_error(client.similar, "ghost-item", 3)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "ghost-item" in err.details()


def test_similar_without_item_id_is_invalid_argument(client: RecsvcClient) -> None:
    err = rpc_error(client.similar, "", 3)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("item_id")


# ----------------------------------------------------------------------------- RecordEvents


def test_recorded_event_changes_the_next_answer_for_that_user(client: RecsvcClient, bundle) -> None:
    user = "fresh-user-events"
    before = client.recommend(user, 5)
    assert before.personalised is False
    assert client.record_events([event(user, _item(bundle, 7), "purchase")]) == 1
    after = client.recommend(user, 5)
    assert after.personalised is True
    assert [it.item_id for it in after.items] != [it.item_id for it in before.items]


def test_events_with_unknown_items_are_rejected_and_nothing_is_written(
    client: RecsvcClient, running: RunningServer, bundle
) -> None:
    stored = running.server.events.count()
    err = rpc_error(
        client.record_events,
        [
            event("u-x", _item(bundle, 1), "click"),
            event("u-x", "missing-1", "click"),
            event("u-x", "missing-2", "view"),
        ],
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[1].item_id" in err.details()
    assert "'missing-1'" in err.details() and "'missing-2'" in err.details()
    assert running.server.events.count() == stored
    assert client.recommend("u-x", 3).personalised is False


def test_events_with_unknown_event_types_are_rejected_naming_them(client: RecsvcClient, bundle) -> None:
    err = rpc_error(client.record_events, [event("u-y", _item(bundle, 1), "teleport")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0].event_type" in err.details() and "'teleport'" in err.details()


def test_acknowledged_events_are_in_the_durable_store(
    client: RecsvcClient, running: RunningServer, bundle
) -> None:
    client.record_events([event("u-durable", _item(bundle, 2), "cart", timestamp=0, request_id="r-9")])
    stored = [e for e in running.server.events.all() if e.user_id == "u-durable"]
    assert len(stored) == 1
    assert (stored[0].item_id, stored[0].event, stored[0].request_id) == (_item(bundle, 2), "cart", "r-9")
    assert stored[0].timestamp > 0


# ----------------------------------------------------------------------------- BatchRecommend


def test_batch_answers_every_request_in_order(client: RecsvcClient, bundle) -> None:
    users = [*bundle.history.users()[:5], "unknown-in-batch"]
    reqs = [recommend_request(u, 3, request_id=f"b{i}") for i, u in enumerate(users)]
    responses = list(client.batch_recommend(reqs))
    assert [r.request_id for r in responses] == [f"b{i}" for i in range(len(users))]
    assert all(len(r.items) == 3 for r in responses)
    single = client.recommend(users[2], 3)
    assert [it.item_id for it in responses[2].items] == [it.item_id for it in single.items]


def test_batch_with_an_invalid_request_names_its_index(client: RecsvcClient) -> None:
    reqs = [recommend_request("u1", 3), recommend_request("u2", 3), recommend_request("", 3)]
    with pytest.raises(grpc.RpcError) as exc:
        list(client.batch_recommend(reqs))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("requests[2].user_id")


# ----------------------------------------------------------------------------- info, echo, health, reflection, metrics


def test_model_info_describes_the_active_bundle(client: RecsvcClient, bundle) -> None:
    info = client.model_info()
    assert info.version == FIRST_VERSION
    assert info.item_count == len(bundle.catalog)
    assert info.data_end_ts == bundle.data_end_ts
    assert list(info.loaded_versions) == [FIRST_VERSION]


def test_echo_returns_a_same_shaped_response_without_a_model(client: RecsvcClient) -> None:
    resp = client.stub.Echo(recommend_request("u", 12, request_id="e1"), timeout=5)
    assert len(resp.items) == 12
    assert resp.request_id == "e1"


def test_echo_answers_with_every_field_a_recommend_answer_carries(client: RecsvcClient, bundle) -> None:
    """The benchmark's floor is only a floor if its answer costs about as much to send (the
    benchmark reports both sizes; the sources per item vary with the bundle)."""
    request = recommend_request(bundle.history.users()[0], 12)
    echo = client.stub.Echo(request, timeout=5)
    real = client.stub.Recommend(request, timeout=5)
    assert sorted(echo.timings_ms) == sorted(real.timings_ms)
    assert echo.model_version == real.model_version
    assert len(echo.request_id) == len(real.request_id) == 32  # generated when none is sent
    assert [len(i.item_id) for i in echo.items] == [len(i.item_id) for i in real.items]


def test_health_reports_serving_for_server_and_service(client: RecsvcClient) -> None:
    assert client.health() == "SERVING"
    assert client.health(SERVICE_NAME) == "SERVING"


def test_reflection_lists_the_recommender_and_health_services(running: RunningServer) -> None:
    with grpc.insecure_channel(running.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_metrics_count_requests_and_errors_by_code(client: RecsvcClient, running: RunningServer) -> None:
    registry = running.server.metrics.registry

    def count(code: str) -> float:
        return (
            registry.get_sample_value("recsvc_requests_total", {"method": "Recommend", "code": code}) or 0.0
        )

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    client.recommend("metrics-user", 2)
    rpc_error(client.recommend, "", 2)
    assert count("OK") == ok + 1
    assert count("INVALID_ARGUMENT") == bad + 1
    assert b"recsvc_stage_latency_ms_bucket" in running.server.metrics.exposition()


def test_request_id_with_control_characters_is_rejected_and_never_logged(
    client: RecsvcClient, caplog
) -> None:
    err = rpc_error(client.recommend, "u", 2, request_id="evil\nrpc=Forged")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("request_id")
    assert "rpc=Forged" not in caplog.text
