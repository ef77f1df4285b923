"""A/B experiments through the real server: assignment, forced variants, pinned bundle versions,
exposure records and team-draft interleaving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from recsvc.exposures import pseudonymise
from tests.helpers.running_server import (
    FIRST_VERSION,
    RunningServer,
    add_version,
    copy_root,
    rpc_error,
    serve_config,
)

SECOND_VERSION = "20240102T000000Z"
KEY = "test-pseudonym-key"

SPLIT_YAML = f"""
experiments:
  - name: ranker
    salt: ranker-salt
    variants:
      - {{name: control, share: 0.5, policy: {{use_ranker: false}}}}
      - {{name: treatment, share: 0.5, bundle_version: "{SECOND_VERSION}", policy: {{use_ranker: true}}}}
"""

INTERLEAVE_YAML = """
experiments:
  - name: mix
    salt: mix-salt
    variants:
      - {name: control, share: 0.5, policy: {use_ranker: false}}
      - {name: treatment, share: 0.5, policy: {use_ranker: true}}
    interleave: [control, treatment]
"""


def _start(bundle_root: Path, work: Path, yaml_text: str) -> RunningServer:
    root = copy_root(bundle_root, work / "bundles")
    add_version(root, SECOND_VERSION)
    experiments = work / "experiments.yaml"
    experiments.write_text(yaml_text, encoding="utf-8")
    config = serve_config(root, work, experiments=str(experiments), pseudonym_key=KEY)
    return RunningServer(config).start()


@pytest.fixture(scope="module")
def split(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = _start(bundle_root, tmp_path_factory.mktemp("split"), SPLIT_YAML)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mixed(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = _start(bundle_root, tmp_path_factory.mktemp("mix"), INTERLEAVE_YAML)
    yield server
    server.stop()


def test_response_names_the_experiment_and_a_stable_variant(split: RunningServer) -> None:
    with split.client() as c:
        first = c.recommend("ab-user-1", 5)
        again = c.recommend("ab-user-1", 5)
    assert first.experiment == "ranker"
    assert first.variant in {"control", "treatment"}
    assert again.variant == first.variant


def test_users_are_spread_over_both_variants(split: RunningServer) -> None:
    with split.client() as c:
        variants = {c.recommend(f"spread-{i}", 2).variant for i in range(40)}
    assert variants == {"control", "treatment"}


def test_variant_naming_a_bundle_version_is_served_by_that_version(split: RunningServer) -> None:
    with split.client() as c:
        treated = c.recommend("pin-user", 5, forced_variant="treatment")
        control = c.recommend("pin-user", 5, forced_variant="control")
        info = c.model_info()
    assert treated.model_version == SECOND_VERSION
    assert control.model_version == FIRST_VERSION
    assert sorted(info.loaded_versions) == [FIRST_VERSION, SECOND_VERSION]


def test_forced_variant_may_be_qualified_by_the_experiment_hint(split: RunningServer) -> None:
    with split.client() as c:
        resp = c.recommend("qualified-user", 3, forced_variant="control", experiment="ranker")
    assert (resp.experiment, resp.variant) == ("ranker", "control")


def test_unknown_forced_variant_is_invalid_argument_naming_the_field(split: RunningServer) -> None:
    with split.client() as c:
        err = rpc_error(c.recommend, "u", 3, forced_variant="nonexistent")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("experiment.forced_variant")
    assert "ranker/control" in err.details()


def test_unknown_experiment_hint_is_invalid_argument_naming_the_field(split: RunningServer) -> None:
    with split.client() as c:
        err = rpc_error(c.recommend, "u", 3, experiment="colour-test")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("experiment.experiment")


def test_each_served_list_is_logged_as_a_pseudonymised_exposure(split: RunningServer) -> None:
    with split.client() as c:
        resp = c.recommend("exposed-user", 4, forced_variant="control", request_id="exp-req-1")
    (exposure,) = [e for e in split.server.exposures.read("ranker") if e.request_id == "exp-req-1"]
    assert exposure.user_key == pseudonymise("exposed-user", KEY)
    assert "exposed-user" not in exposure.user_key
    assert exposure.variant == "control"
    assert exposure.model_version == FIRST_VERSION
    assert [(i.item_id, i.position) for i in exposure.items] == [
        (it.item_id, p) for p, it in enumerate(resp.items, 1)
    ]


def test_interleaved_lists_tag_every_item_with_the_variant_that_drafted_it(mixed: RunningServer) -> None:
    with mixed.client() as c:
        resp = c.recommend("mix-user", 10, request_id="mix-req-1")
    assert resp.experiment == "mix"
    assert len(resp.items) == 10
    assert {it.origin for it in resp.items} <= {"control", "treatment"}
    assert all(it.origin for it in resp.items)
    (exposure,) = [e for e in mixed.server.exposures.read("mix") if e.request_id == "mix-req-1"]
    assert [i.origin for i in exposure.items] == [it.origin for it in resp.items]


def test_interleaving_draws_from_both_variants_over_many_users(mixed: RunningServer) -> None:
    origins: set[str] = set()
    with mixed.client() as c:
        for i in range(10):
            origins |= {it.origin for it in c.recommend(f"mix-{i}", 6).items}
    assert origins == {"control", "treatment"}


def test_a_failing_exposure_log_is_counted_and_the_answer_still_served(
    bundle_root: Path, tmp_path: Path
) -> None:
    server = _start(bundle_root, tmp_path, SPLIT_YAML)
    try:
        # The database turns read-only under the server (as on a full or remounted disk).
        server.server.exposures._conn.execute("PRAGMA query_only = ON")
        with server.client() as c:
            resp = c.recommend("unlogged-user", 3, forced_variant="control")
        assert len(resp.items) == 3
        assert server.server.metrics.registry.get_sample_value("recsvc_exposure_failures_total") == 1.0
    finally:
        server.stop()
