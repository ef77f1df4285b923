"""Prometheus metrics for the online service, in a registry owned by one server instance.

A private `CollectorRegistry` (not the global default) lets several servers live in one
process (tests, benchmarks) without duplicate-metric errors.

Several server processes (ServeConfig.processes > 1): prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor) writes every value to shared files and the
supervisor serves the aggregate. Counters and histograms sum over processes; each gauge says how
it combines (`multiprocess_mode`, ignored in a single process): in-flight requests sum over live
processes, the bundle gauges keep one series per process (`pid` label).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

log = logging.getLogger(__name__)

# Milliseconds: the request path targets single-digit ms, with a tail up to seconds.
_LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 25, 50, 100, 250, 500, 1000, 2500, 10000)
_CANDIDATE_BUCKETS = (0, 10, 25, 50, 100, 200, 300, 400, 500, 750, 1000, 2000)


class ServingMetrics:
    """Requests, errors by status code, per-stage latency, candidate counts, bundle version."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "recsvc_requests", "RPCs answered, by method and gRPC status", ["method", "code"], registry=r
        )
        self.errors = Counter(
            "recsvc_errors", "RPCs answered with a non-OK status", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "recsvc_request_latency_ms",
            "End-to-end server time per RPC",
            ["method"],
            buckets=_LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "recsvc_stage_latency_ms",
            "Server time per request stage (validate, queue, recommender stages, ...)",
            ["stage"],
            buckets=_LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.candidates = Histogram(
            "recsvc_candidates",
            "Candidates scored per Recommend request",
            buckets=_CANDIDATE_BUCKETS,
            registry=r,
        )
        self.results = Histogram(
            "recsvc_results", "Items returned per request", buckets=_CANDIDATE_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "recsvc_in_flight",
            "Requests admitted and not yet answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.events = Counter("recsvc_events_recorded", "Events durably recorded", registry=r)
        self.bundle = Gauge(
            "recsvc_bundle_info",
            "1 for the active bundle version",
            ["version"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.loaded_bundles = Gauge(
            "recsvc_loaded_bundles", "Bundle versions held in memory", registry=r, multiprocess_mode="liveall"
        )
        self.reloads = Counter("recsvc_reloads", "Bundle reload attempts by outcome", ["outcome"], registry=r)
        self.exposures = Counter(
            "recsvc_exposures",
            "Exposure records written, by experiment and variant",
            ["experiment", "variant"],
            registry=r,
        )
        self.exposure_failures = Counter(
            "recsvc_exposure_failures",
            "Exposures that could not be written (answer still served)",
            registry=r,
        )
        self.batch_size = Histogram(
            "recsvc_batch_size",
            "Recommend requests answered by one recommend_many call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self._active_version: str | None = None
        # Labelled children by label values: `labels()` takes a lock and builds a key on every
        # call, and a Recommend observes a dozen series (measured: a third of the metrics cost).
        self._request_series: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._stage_series: dict[str, Any] = {}

    def observe_request(self, method: str, code: str, latency_ms: float) -> None:
        series = self._request_series.get((method, code))
        if series is None:
            errors = self.errors.labels(method, code) if code != "OK" else None
            series = (self.requests.labels(method, code), errors, self.latency.labels(method))
            self._request_series[(method, code)] = series
        requests, errors, latency = series
        requests.inc()
        if errors is not None:
            errors.inc()
        latency.observe(latency_ms)

    def observe_stages(self, timings_ms: Mapping[str, float]) -> None:
        children = self._stage_series
        for stage, ms in timings_ms.items():
            child = children.get(stage)
            if child is None:
                child = children[stage] = self.stage_latency.labels(stage)
            child.observe(ms)

    def set_bundle(self, version: str, loaded_count: int) -> None:
        """Mark `version` active (the previous one drops to 0)."""
        if self._active_version is not None and self._active_version != version:
            self.bundle.labels(self._active_version).set(0)
        self.bundle.labels(version).set(1)
        self._active_version = version
        self.loaded_bundles.set(loaded_count)

    def exposition(self) -> bytes:
        """The text format a Prometheus scrape receives."""
        return generate_latest(self.registry)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics endpoint on a daemon thread; returns the bound port (0 -> any free)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_port)
        log.info("metrics endpoint listening on http://%s:%d/metrics", host, bound)
        self._http_server = server
        return bound

    def stop_http(self) -> None:
        server = getattr(self, "_http_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
            self._http_server = None
