from __future__ import annotations

from recsvc.serving_metrics import ServingMetrics


def _value(metrics: ServingMetrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_repeated_requests_are_all_counted_per_method_and_code() -> None:
    metrics = ServingMetrics()
    for _ in range(3):
        metrics.observe_request("Recommend", "OK", 2.0)
    metrics.observe_request("Recommend", "INVALID_ARGUMENT", 0.5)
    assert _value(metrics, "recsvc_requests_total", {"method": "Recommend", "code": "OK"}) == 3.0
    assert (
        _value(metrics, "recsvc_requests_total", {"method": "Recommend", "code": "INVALID_ARGUMENT"}) == 1.0
    )
    assert _value(metrics, "recsvc_request_latency_ms_count", {"method": "Recommend"}) == 4.0
    assert _value(metrics, "recsvc_request_latency_ms_sum", {"method": "Recommend"}) == 6.5


def test_only_non_ok_codes_count_as_errors() -> None:
    metrics = ServingMetrics()
    metrics.observe_request("Recommend", "OK", 1.0)
    metrics.observe_request("Recommend", "UNAVAILABLE", 1.0)
    metrics.observe_request("Recommend", "UNAVAILABLE", 1.0)
    assert _value(metrics, "recsvc_errors_total", {"method": "Recommend", "code": "OK"}) is None
    assert _value(metrics, "recsvc_errors_total", {"method": "Recommend", "code": "UNAVAILABLE"}) == 2.0


def test_stage_timings_land_in_their_own_stage_series_and_bucket() -> None:
    metrics = ServingMetrics()
    metrics.observe_stages({"ranking": 0.4, "total": 12.0})
    metrics.observe_stages({"ranking": 0.3})
    assert _value(metrics, "recsvc_stage_latency_ms_count", {"stage": "ranking"}) == 2.0
    assert _value(metrics, "recsvc_stage_latency_ms_count", {"stage": "total"}) == 1.0
    assert _value(metrics, "recsvc_stage_latency_ms_bucket", {"stage": "ranking", "le": "0.25"}) == 0.0
    assert _value(metrics, "recsvc_stage_latency_ms_bucket", {"stage": "ranking", "le": "0.5"}) == 2.0
    assert _value(metrics, "recsvc_stage_latency_ms_bucket", {"stage": "total", "le": "10.0"}) == 0.0


def test_two_instances_keep_separate_counts() -> None:
    a, b = ServingMetrics(), ServingMetrics()
    a.observe_request("Echo", "OK", 1.0)
    assert _value(b, "recsvc_requests_total", {"method": "Echo", "code": "OK"}) is None
