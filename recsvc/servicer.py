"""gRPC handlers: admission, deadlines, validation, then one call into the Recommender.

The servicer is thin on purpose. Every RPC goes through `_run`, which
- answers RESOURCE_EXHAUSTED at once when `max_in_flight` requests are already admitted
  (so overload queues nowhere and latency stays bounded),
- answers DEADLINE_EXCEEDED without computing if the caller's deadline has passed (checked on
  arrival and again when a worker thread picks the request up),
- runs the CPU-heavy part in the ThreadPoolExecutor, off the event loop,
- maps domain errors to precise status codes and anything unexpected to INTERNAL with a generic
  message (the details go to the log, keyed by request id),
- records metrics and one structured log line without the raw user id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import grpc

from recsvc import validation
from recsvc.bundle import BundleError
from recsvc.config import ServeConfig
from recsvc.exposures import Exposure, ExposureLog, ExposureLogError, pseudonymise, shown_items
from recsvc.interleaving import team_draft
from recsvc.model_manager import LoadedModel, ModelManager, NoModelError, UnknownVersionError
from recsvc.recommender import STAGES, RankingPolicy, RecommendRequest, RecommendResult, UnknownItemError
from recsvc.serving_metrics import ServingMetrics
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger("recsvc.access")

# The stages a Recommend answer reports, for Echo to answer as many.
ECHO_TIMINGS = ("validate", "queue", *STAGES, "respond")
SERVER_PID_METADATA = "recsvc-server-pid"  # GetModelInfo trailing metadata: the answering process

T = TypeVar("T")


class Assignment(Protocol):
    """What `recsvc.experiments.ExperimentRouter.assign` returns (docs/ARCHITECTURE.md)."""

    experiment: str
    variant: str
    bundle_version: str | None
    policy: RankingPolicy
    interleave_with: str | None


class _Named(Protocol):
    name: str


class Router(Protocol):
    """`recsvc.experiments.ExperimentRouter`, as the servicer uses it."""

    @property
    def experiments(self) -> Sequence[_Named]: ...

    def assign(self, user_id: str, forced_variant: str | None = None) -> Assignment: ...

    def assignment_for(self, experiment: str, variant: str) -> Assignment: ...


class RpcAbort(Exception):
    """Answer the RPC with this status and message (raised anywhere below `_run`)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class RecommendPlan:
    """A validated, routed Recommend request waiting for its Recommender call."""

    request: pb.RecommendRequest
    rid: str
    model: LoadedModel
    req: RecommendRequest
    policy: RankingPolicy
    assignment: Assignment | None
    timings: dict[str, float]


@dataclass
class _Job:
    plan: RecommendPlan
    deadline: float | None
    enqueued: float
    future: asyncio.Future[pb.RecommendResponse]


class RecommendBatcher:
    """Opportunistic micro-batching of concurrent Recommend calls.

    `dispatchers` (ServeConfig.batch_dispatchers) each take the next queued request plus whatever
    else is already waiting (up to `max_batch`) and answer them with one `Recommender.recommend_many` call per
    (model, policy) group: one FAISS search and one ranker call instead of one per request. An
    idle server therefore never waits to fill a batch (batch of 1, no added latency); a busy one
    amortises per-call overhead exactly when it matters. `recommend_many` gives the same answers
    as `recommend` (docs/ARCHITECTURE.md), so batching never changes a response.

    Saturated, though, the batch computing holds the GIL so the event loop barely receives the
    next requests; they land just after it ends, and a greedy dispatcher took them 1-3 at a time
    (measured: 2.8 requests per batch with 16 in flight, at ~2x the CPU per request of a batch of
    16). So when a batch is not full while the server is saturated (the previous batch held at
    least half of `max_batch` and ended less than `linger_s` ago), the dispatcher lets the loop run
    for `linger_s` first and then takes everything that arrived. A lightly loaded server (batches
    of 1-2) never lingers, so the requests that queued behind a batch are not delayed further.
    """

    def __init__(
        self,
        executor: Executor,
        dispatchers: int,
        max_batch: int,
        respond: Callable[[RecommendPlan, RecommendResult], pb.RecommendResponse],
        sizes: Any,
        linger_s: float = 0.0,
        before_batch: Callable[[], None] | None = None,
    ) -> None:
        """`before_batch` runs on the worker before each batch (catching up on other processes'
        events), so every answer reflects every event acknowledged before it was computed."""
        self._executor = executor
        self._n_dispatchers = dispatchers
        self._max_batch = max_batch
        self._respond = respond
        self._sizes = sizes  # histogram of batch sizes
        self._before_batch = before_batch
        self.linger_s = linger_s  # read per batch, so a benchmark may change it while serving
        self._last_done = -float("inf")  # perf_counter when the latest batch was answered
        self._last_size = 0  # requests in the latest batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._dispatchers: list[asyncio.Task[None]] = []

    async def submit(self, plan: RecommendPlan, deadline: float | None) -> pb.RecommendResponse:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._dispatchers = [
                asyncio.create_task(self._dispatch(), name=f"recsvc-batcher-{i}")
                for i in range(self._n_dispatchers)
            ]
        job = _Job(plan, deadline, time.perf_counter(), asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def close(self) -> None:
        for task in self._dispatchers:
            task.cancel()
        for task in self._dispatchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _dispatch(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            self._drain(jobs)
            if (
                len(jobs) < self._max_batch
                and self.linger_s > 0
                and 2 * self._last_size >= self._max_batch
                and time.perf_counter() - self._last_done < self.linger_s
            ):
                await asyncio.sleep(self.linger_s)  # saturated: let the loop receive the rest
                self._drain(jobs)
            jobs = [j for j in jobs if not j.future.done()]  # callers that gave up
            if not jobs:
                continue
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_batch, jobs)
            except BaseException as exc:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError("shutdown")
                        )
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            self._last_done, self._last_size = time.perf_counter(), len(jobs)
            for job, outcome in zip(jobs, outcomes):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _drain(self, jobs: list[_Job]) -> None:
        """Move what is queued into `jobs`, up to `max_batch`."""
        assert self._queue is not None
        while len(jobs) < self._max_batch and not self._queue.empty():
            jobs.append(self._queue.get_nowait())

    def _run_batch(self, jobs: list[_Job]) -> list[pb.RecommendResponse | BaseException]:
        """Worker thread: drop expired/abandoned jobs, one recommend_many per (model, policy)."""
        started = time.perf_counter()
        if self._before_batch is not None:
            self._before_batch()
        outcomes: list[pb.RecommendResponse | BaseException | None] = [None] * len(jobs)
        groups: dict[tuple[int, RankingPolicy], list[int]] = {}
        for i, job in enumerate(jobs):
            job.plan.timings["queue"] = (started - job.enqueued) * 1000.0
            if job.future.done():
                outcomes[i] = asyncio.CancelledError()
            elif job.deadline is not None and time.monotonic() >= job.deadline:
                outcomes[i] = RpcAbort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "deadline exceeded while queued; the request was not computed",
                )
            else:
                groups.setdefault((id(job.plan.model), job.plan.policy), []).append(i)
        for (_, policy), idxs in groups.items():
            self._sizes.observe(len(idxs))
            recommender = jobs[idxs[0]].plan.model.recommender
            try:
                results = recommender.recommend_many([jobs[i].plan.req for i in idxs], policy)
            except Exception:
                # Isolate the failure: answer each request on its own so only the bad one errors.
                results = []
                for i in idxs:
                    try:
                        results.append(recommender.recommend(jobs[i].plan.req, policy))
                    except Exception as exc:
                        results.append(exc)
            for i, result in zip(idxs, results):
                if isinstance(result, Exception):
                    outcomes[i] = result
                    continue
                try:
                    outcomes[i] = self._respond(jobs[i].plan, result)
                except Exception as exc:
                    outcomes[i] = exc
        return [o if o is not None else RuntimeError("request was not processed") for o in outcomes]


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(
        self,
        *,
        models: ModelManager,
        config: ServeConfig,
        metrics: ServingMetrics,
        executor: Executor,
        router: Router | None = None,
        exposures: ExposureLog | None = None,
    ) -> None:
        self._models = models
        self._config = config
        self._limits = validation.Limits.from_config(config)
        self._metrics = metrics
        self._executor = executor
        self._router = router
        self._exposures = exposures
        self._default_policy = RankingPolicy(
            max_per_category=config.max_per_category, diversity_attribute=config.diversity_attribute
        )
        self._in_flight = 0  # only touched on the event loop thread
        self._batcher = (
            RecommendBatcher(
                executor,
                config.batch_dispatchers,
                config.max_batch,
                self._respond,
                metrics.batch_size,
                linger_s=config.batch_linger_ms / 1000.0,
                before_batch=models.sync_events if models.shared_events else None,
            )
            if config.max_batch > 1
            else None
        )

    async def close(self) -> None:
        """Stop the batch dispatchers (after the gRPC server stopped taking requests)."""
        if self._batcher is not None:
            await self._batcher.close()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _request_id(self, given: str) -> str:
        """The caller's id when it is a safe log token; otherwise a fresh one (validation then
        rejects the bad field, but a raw newline-laden id never reaches the logs)."""
        if not given:
            return uuid.uuid4().hex  # the common case: no id sent, nothing to check or raise
        try:
            return validation.check_id(given, "request_id", self._limits)
        except validation.RequestValidationError:
            return uuid.uuid4().hex

    # ------------------------------------------------------------------ RPCs

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        rid = self._request_id(request.request_id)
        if self._batcher is not None:
            return await self._run(
                "Recommend",
                context,
                rid,
                lambda timings: self._plan(request, rid, timings),
                user_id=request.user_id,
                batched=True,
            )
        return await self._run(
            "Recommend",
            context,
            rid,
            lambda timings: self._recommend(request, rid, timings),
            user_id=request.user_id,
        )

    async def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        rid = self._request_id(request.request_id)
        return await self._run(
            "SimilarItems", context, rid, lambda timings: self._similar(request, rid, timings)
        )

    async def RecordEvents(
        self, request: pb.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEventsResponse:
        rid = uuid.uuid4().hex
        return await self._run("RecordEvents", context, rid, lambda _timings: self._record(request))

    async def BatchRecommend(
        self, request_iterator: AsyncIterator[pb.RecommendRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RecommendResponse]:
        i = 0
        async for request in request_iterator:
            if i >= self._config.max_batch_requests:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"requests: a BatchRecommend stream may carry at most {self._config.max_batch_requests} requests",
                )
            rid = self._request_id(request.request_id)
            field = f"requests[{i}]"

            def work(
                timings: dict[str, float],
                request: pb.RecommendRequest = request,
                rid: str = rid,
                field: str = field,
            ) -> pb.RecommendResponse:
                return self._recommend(request, rid, timings, field=field)

            yield await self._run("BatchRecommend", context, rid, work, user_id=request.user_id)
            i += 1

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        rid = uuid.uuid4().hex
        # Which process answered (several share the port): names the logs to read when one
        # process disagrees with the others.
        context.set_trailing_metadata(((SERVER_PID_METADATA, str(os.getpid())),))
        return await self._run("GetModelInfo", context, rid, lambda _t: self._model_info(), offload=False)

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadModelResponse:
        """Admin: loading takes seconds, so it runs on its own thread, not a request worker."""
        rid = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            if request.rollback:
                model = await asyncio.to_thread(self._models.rollback)
            else:
                model = await asyncio.to_thread(self._models.reload, request.version or None)
            if self._config.processes != 1 and (request.rollback or request.version):
                # Several processes: this one swapped; CURRENT makes the others follow within
                # reload_poll_s (each loads, verifies and warms it itself, or refuses it).
                await asyncio.to_thread(self._models.publish_current)
        except UnknownVersionError as exc:
            code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        except BundleError as exc:
            serving = self._models.active.version if self._models.ready else "nothing"
            code, message = (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"bundle refused: {exc}; still serving {serving}",
            )
        except Exception as exc:
            code, message = self._status_for(exc, "ReloadModel", rid)
        else:
            self._finish("ReloadModel", rid, grpc.StatusCode.OK, started, None)
            return pb.ReloadModelResponse(
                active_version=model.version, previous_version=self._models.previous_version or ""
            )
        self._finish("ReloadModel", rid, code, started, None)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # pragma: no cover

    async def Echo(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        """The benchmark's floor: same request and response shape, no admission, no compute.

        "Same shape" means the same wire size as a Recommend answer: catalogue item ids with one
        source each, the serving model's version, a request id (generated when none is sent, as
        Recommend does) and one timing per stage. Until 2026-11-24 Echo answered ~410 bytes where
        Recommend answered ~535 (no timings, no request id, a 4-character version).
        """
        k = request.num_results or self._config.default_k
        model = self._models.active if self._models.ready else None
        ids = model.bundle.catalog.item_ids[:k] if model is not None else [f"e{i:07d}" for i in range(k)]
        return pb.RecommendResponse(
            items=[
                pb.RecommendedItem(item_id=str(item), score=1.0 / (i + 1), sources=["ann"])
                for i, item in enumerate(ids)
            ],
            model_version=model.version if model is not None else "echo",
            personalised=True,
            request_id=self._request_id(request.request_id),
            timings_ms=dict.fromkeys(ECHO_TIMINGS, 0.125),  # proto3 would drop a 0.0 value
        )

    # ------------------------------------------------------------------ shared machinery

    async def _run(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        rid: str,
        work: Callable[[dict[str, float]], T],
        *,
        user_id: str = "",
        offload: bool = True,
        batched: bool = False,
    ) -> T:
        """`batched`: `work` only plans (on the loop); the batcher computes and answers."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            result = await self._admit_and_compute(context, work, timings, offload, batched)
        except asyncio.CancelledError:
            self._finish(method, rid, grpc.StatusCode.CANCELLED, started, timings, user_id)
            raise
        except Exception as exc:
            code, message = self._status_for(exc, method, rid)
            # Metrics and the log line come first: the caller may act on the status at once.
            self._finish(method, rid, code, started, timings, user_id)
            await context.abort(code, message)
        else:
            self._finish(method, rid, grpc.StatusCode.OK, started, timings, user_id)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _admit_and_compute(
        self,
        context: grpc.aio.ServicerContext,
        work: Callable[[dict[str, float]], T],
        timings: dict[str, float],
        offload: bool,
        batched: bool = False,
    ) -> T:
        if self._in_flight >= self._config.max_in_flight:
            raise RpcAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self._config.max_in_flight} concurrent requests; retry with backoff",
            )
        self._in_flight += 1
        self._metrics.in_flight.inc()
        try:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise RpcAbort(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the request was computed"
                )
            if not offload:
                return work(timings)
            deadline = None if remaining is None else time.monotonic() + remaining
            if batched and self._batcher is not None:
                plan = work(timings)
                assert isinstance(plan, RecommendPlan)
                return cast(T, await self._batcher.submit(plan, deadline))
            loop = asyncio.get_running_loop()
            enqueued = time.perf_counter()
            return await loop.run_in_executor(
                self._executor, self._in_worker, work, timings, deadline, enqueued
            )
        finally:
            self._in_flight -= 1
            self._metrics.in_flight.dec()

    @staticmethod
    def _status_for(exc: Exception, method: str, rid: str) -> tuple[grpc.StatusCode, str]:
        """The status and caller-facing message for an exception raised while serving."""
        if isinstance(exc, RpcAbort):
            return exc.code, exc.message
        if isinstance(exc, validation.RequestValidationError):
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        if isinstance(exc, UnknownItemError):
            return grpc.StatusCode.NOT_FOUND, f"item_id: {exc}"
        if isinstance(exc, NoModelError):
            return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry shortly"
        if isinstance(exc, UnknownVersionError):
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        log.error("rpc=%s request_id=%s unexpected error", method, rid, exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error (request_id={rid})"

    @staticmethod
    def _in_worker(
        work: Callable[[dict[str, float]], T],
        timings: dict[str, float],
        deadline: float | None,
        enqueued: float,
    ) -> T:
        timings["queue"] = (time.perf_counter() - enqueued) * 1000.0
        if deadline is not None and time.monotonic() >= deadline:
            raise RpcAbort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "deadline exceeded while queued; the request was not computed",
            )
        return work(timings)

    def _finish(
        self,
        method: str,
        rid: str,
        code: grpc.StatusCode,
        started: float,
        timings: Mapping[str, float] | None,
        user_id: str = "",
    ) -> None:
        total_ms = (time.perf_counter() - started) * 1000.0
        self._metrics.observe_request(method, code.name, total_ms)
        if timings:
            self._metrics.observe_stages(timings)
        level = logging.INFO if code == grpc.StatusCode.OK else logging.WARNING
        if log.isEnabledFor(level):
            user = pseudonymise(user_id, self._config.pseudonym_key)[:16] if user_id else "-"
            log.log(
                level, "rpc=%s request_id=%s user=%s code=%s ms=%.2f", method, rid, user, code.name, total_ms
            )

    # ------------------------------------------------------------------ work (worker threads)

    def _recommend(
        self, request: pb.RecommendRequest, rid: str, timings: dict[str, float], field: str = ""
    ) -> pb.RecommendResponse:
        plan = self._plan(request, rid, timings, field)
        self._models.sync_events()
        return self._respond(plan, plan.model.recommender.recommend(plan.req, plan.policy))

    def _plan(
        self, request: pb.RecommendRequest, rid: str, timings: dict[str, float], field: str = ""
    ) -> RecommendPlan:
        """Validate and route one request: which model, which domain request, which policy."""
        t0 = time.perf_counter()
        hints = validation.experiment_hints(request, self._limits, field)
        assignment = self._assign(request.user_id, hints, field)
        model = self._models.get(assignment.bundle_version if assignment else None)
        req = validation.recommend_request(request, self._limits, model.attributes, field)
        timings["validate"] = (time.perf_counter() - t0) * 1000.0
        policy = assignment.policy if assignment else self._default_policy
        return RecommendPlan(request, rid, model, req, policy, assignment, timings)

    def _respond(self, plan: RecommendPlan, result: RecommendResult) -> pb.RecommendResponse:
        """Interleaving, exposure record and the wire response for a computed result."""
        timings = plan.timings
        _merge_timings(timings, result)
        origins: list[str] | None = None
        assignment = plan.assignment
        if assignment is not None and assignment.interleave_with:
            result, origins = self._interleave(
                plan.request.user_id, plan.rid, plan.req, assignment, result, plan.model
            )
        t1 = time.perf_counter()
        response = _response(result, plan.rid, origins)
        response.unknown_filter_values.extend(
            plan.model.bundle.catalog.unknown_values(plan.req.include_attributes, plan.req.exclude_attributes)
        )
        if assignment is not None:
            response.experiment = assignment.experiment
            response.variant = assignment.variant
            self._log_exposure(plan.rid, plan.request.user_id, assignment, result, origins)
        self._metrics.results.observe(len(result.items))
        n_candidates = getattr(result, "candidate_count", None)  # reported when the Recommender provides it
        if n_candidates is not None:
            self._metrics.candidates.observe(n_candidates)
        timings["respond"] = (time.perf_counter() - t1) * 1000.0
        response.timings_ms.update(timings)
        return response

    def _assign(self, user_id: str, hints: validation.ExperimentHints, field: str) -> Assignment | None:
        """Experiment assignment; None when no experiment is configured or the user is in none.

        `experiment.forced_variant` (with `experiment.experiment` to qualify it) overrides the
        hash-based assignment, for QA; a name the router does not know is INVALID_ARGUMENT.
        """
        prefix = f"{field}." if field else ""
        if self._router is None:
            if hints.forced_variant or hints.experiment:
                name = "forced_variant" if hints.forced_variant else "experiment"
                raise validation.RequestValidationError(
                    f"{prefix}experiment.{name}", "no experiment is configured on this server"
                )
            return None
        running = {e.name for e in self._router.experiments}
        if hints.experiment and hints.experiment not in running:
            raise validation.RequestValidationError(
                f"{prefix}experiment.experiment",
                f"unknown experiment {hints.experiment!r}; running: {', '.join(sorted(running)) or 'none'}",
            )
        forced = hints.forced_variant
        if forced and hints.experiment and "/" not in forced:
            forced = f"{hints.experiment}/{forced}"
        try:
            assignment = self._router.assign(user_id, forced)
        except (KeyError, ValueError) as exc:
            raise validation.RequestValidationError(f"{prefix}experiment.forced_variant", str(exc)) from exc
        if assignment.experiment not in running:
            return None  # outside every experiment: default policy, no exposure record
        return assignment

    def _interleave(
        self,
        user_id: str,
        rid: str,
        req: RecommendRequest,
        assignment: Assignment,
        result_a: RecommendResult,
        model_a: LoadedModel,
    ) -> tuple[RecommendResult, list[str]]:
        """Team-draft the assigned variant's list with its partner's; items keep their origin."""
        assert self._router is not None and assignment.interleave_with is not None
        partner = self._router.assignment_for(assignment.experiment, assignment.interleave_with)
        model_b = self._models.get(partner.bundle_version) if partner.bundle_version else model_a
        result_b = model_b.recommender.recommend(req, partner.policy)
        by_id = {it.item_id: it for it in result_b.items}
        by_id.update({it.item_id: it for it in result_a.items})
        rng = random.Random(rid)  # str seeds are stable across processes, unlike hash()
        drafted = team_draft(
            [it.item_id for it in result_a.items],
            [it.item_id for it in result_b.items],
            req.k,
            rng,
            origins=(assignment.variant, partner.variant),
        )
        items = [by_id[item_id] for item_id, _ in drafted]
        merged = RecommendResult(
            items=items,
            model_version=result_a.model_version,
            unknown_items=result_a.unknown_items,
            personalised=result_a.personalised,
            timings_ms=result_a.timings_ms,
        )
        return merged, [origin for _, origin in drafted]

    def _log_exposure(
        self,
        rid: str,
        user_id: str,
        assignment: Assignment,
        result: RecommendResult,
        origins: list[str] | None,
    ) -> None:
        """Durably record what this variant showed. A failing log must not fail the answer:
        the error is logged and counted (`recsvc_exposure_failures_total`) so the analysis can
        discount the affected period."""
        if self._exposures is None:
            return
        ids = [it.item_id for it in result.items]
        exposure = Exposure(
            request_id=rid,
            user_key=pseudonymise(user_id, self._config.pseudonym_key),
            experiment=assignment.experiment,
            variant=assignment.variant,
            items=shown_items(ids, origins if origins is not None else assignment.variant),
            model_version=result.model_version,
            ts=int(time.time()),
        )
        try:
            self._exposures.append(exposure)
        except ExposureLogError as exc:
            self._metrics.exposure_failures.inc()
            log.error("rpc=Recommend request_id=%s exposure not logged: %s", rid, exc)
            return
        self._metrics.exposures.labels(assignment.experiment, assignment.variant).inc()

    def _similar(
        self, request: pb.SimilarItemsRequest, rid: str, timings: dict[str, float]
    ) -> pb.RecommendResponse:
        t0 = time.perf_counter()
        self._models.sync_events()
        model = self._models.active
        query = validation.similar_request(request, self._limits, model.attributes)
        timings["validate"] = (time.perf_counter() - t0) * 1000.0
        result = model.recommender.similar_items(
            query.item_id,
            query.k,
            exclude_items=query.exclude_items,
            include_attributes=query.include_attributes,
            exclude_attributes=query.exclude_attributes,
        )
        _merge_timings(timings, result)
        response = _response(result, rid, None)
        response.unknown_filter_values.extend(
            model.bundle.catalog.unknown_values(query.include_attributes, query.exclude_attributes)
        )
        response.timings_ms.update(timings)
        return response

    def _record(self, request: pb.RecordEventsRequest) -> pb.RecordEventsResponse:
        model = self._models.active
        events = validation.events(
            request, self._limits, model.event_types, model.knows_item, now=int(time.time())
        )
        self._models.record_events(events)
        self._metrics.events.inc(len(events))
        return pb.RecordEventsResponse(accepted=len(events))

    def _model_info(self) -> pb.ModelInfo:
        model = self._models.active
        manifest = model.bundle.manifest
        return pb.ModelInfo(
            version=model.version,
            created_at=str(manifest.get("created_at", "")),
            item_count=len(model.bundle.catalog.item_ids),
            metrics=_numeric_leaves(manifest.get("metrics", {})),
            loaded_versions=self._models.loaded_versions(),
            data_end_ts=int(model.bundle.data_end_ts),
            previous_version=self._models.previous_version or "",
        )


def _merge_timings(timings: dict[str, float], result: RecommendResult) -> None:
    for stage, ms in result.timings_ms.items():
        timings[stage] = timings.get(stage, 0.0) + float(ms)


def _response(result: RecommendResult, rid: str, origins: list[str] | None) -> pb.RecommendResponse:
    items = [
        pb.RecommendedItem(
            item_id=it.item_id,
            score=float(it.score),
            sources=list(it.sources),
            explanation=it.explanation or "",
            origin=origins[i] if origins is not None else "",
        )
        for i, it in enumerate(result.items)
    ]
    return pb.RecommendResponse(
        items=items,
        model_version=result.model_version,
        unknown_item_ids=list(result.unknown_items),
        personalised=bool(result.personalised),
        request_id=rid,
    )


def _numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """Flatten a manifest's nested metrics to `a.b.c -> number` (non-numbers dropped)."""
    out: dict[str, float] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(_numeric_leaves(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix.rstrip(".")] = float(tree)
    return out
