from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from scipy import stats

from recsvc.experiments import (
    NO_EXPERIMENT,
    ExperimentConfigError,
    ExperimentRouter,
    load_experiments,
    parse_experiments,
    unit_hash,
)
from recsvc.recommender import RankingPolicy

REPO = Path(__file__).resolve().parents[2]
USERS = [f"user-{i}" for i in range(20_000)]


def _config(salt: str = "s1", shares=(0.5, 0.5), **extra) -> dict:
    names = ["control", "treatment", "third"][: len(shares)]
    return {
        "experiments": [
            {
                "name": "exp",
                "salt": salt,
                "variants": [{"name": n, "share": s} for n, s in zip(names, shares)],
                **extra,
            }
        ]
    }


def _router(**kw) -> ExperimentRouter:
    return ExperimentRouter(parse_experiments(_config(**kw)))


def test_assignment_is_stable_across_calls() -> None:
    router = _router()
    first = [router.assign(u).variant for u in USERS[:500]]
    assert [router.assign(u).variant for u in USERS[:500]] == first
    assert [_router().assign(u).variant for u in USERS[:500]] == first


def test_assignment_is_stable_across_processes(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(json.dumps(_config()))  # JSON is valid YAML
    code = (
        "import json, sys\n"
        "from recsvc.experiments import ExperimentRouter\n"
        f"r = ExperimentRouter.from_file({str(cfg)!r})\n"
        "print(json.dumps([r.assign(f'user-{i}').variant for i in range(300)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    router = ExperimentRouter.from_file(cfg)
    assert json.loads(out.stdout) == [router.assign(f"user-{i}").variant for i in range(300)]


def test_split_matches_configured_shares_within_chi_square_tolerance() -> None:
    shares = (0.5, 0.3, 0.2)
    router = _router(shares=shares)
    counts = Counter(router.assign(u).variant for u in USERS)
    observed = [counts["control"], counts["treatment"], counts["third"]]
    expected = [s * len(USERS) for s in shares]
    assert stats.chisquare(observed, expected).pvalue > 0.001


def test_unit_hash_is_uniform_on_unit_interval() -> None:
    values = [unit_hash("salt", u) for u in USERS]
    assert all(0.0 <= v < 1.0 for v in values)
    assert stats.kstest(values, "uniform").pvalue > 0.001


def test_different_salts_give_independent_assignments() -> None:
    a, b = _router(salt="first"), _router(salt="second")
    table = Counter((a.assign(u).variant, b.assign(u).variant) for u in USERS)
    contingency = [
        [table[("control", "control")], table[("control", "treatment")]],
        [table[("treatment", "control")], table[("treatment", "treatment")]],
    ]
    assert stats.chi2_contingency(contingency).pvalue > 0.001
    agree = table[("control", "control")] + table[("treatment", "treatment")]
    assert abs(agree / len(USERS) - 0.5) < 0.02


def test_variant_policy_and_bundle_version_come_from_config() -> None:
    cfg = _config()
    cfg["experiments"][0]["variants"][1].update(
        bundle_version="20260101T000000Z", policy={"use_ranker": False, "max_per_category": 2}
    )
    router = ExperimentRouter(parse_experiments(cfg))
    a = router.assign("anyone", forced_variant="treatment")
    assert a.policy == RankingPolicy(use_ranker=False, max_per_category=2)
    assert a.bundle_version == "20260101T000000Z"
    assert a.forced
    assert router.assign("anyone", forced_variant="exp/control").policy == RankingPolicy()


def test_unknown_forced_variant_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"exp/control, exp/treatment"):
        _router().assign("u", forced_variant="nope")


def test_interleaved_variants_name_their_partner() -> None:
    router = _router(shares=(0.4, 0.4, 0.2), interleave=["control", "treatment"])
    assert router.assign("u", "control").interleave_with == "treatment"
    assert router.assign("u", "treatment").interleave_with == "control"
    assert router.assign("u", "third").interleave_with is None
    assert router.assignment_for("exp", "treatment").variant == "treatment"


def test_traffic_splits_users_between_exclusive_experiments() -> None:
    cfg = {
        "salt": "layer",
        "experiments": [
            {"name": "e1", "salt": "a", "traffic": 0.3, "variants": [{"name": "v", "share": 1.0}]},
            {"name": "e2", "salt": "b", "traffic": 0.2, "variants": [{"name": "v", "share": 1.0}]},
        ],
    }
    router = ExperimentRouter(parse_experiments(cfg))
    counts = Counter(router.assign(u).experiment for u in USERS)
    observed = [counts["e1"], counts["e2"], counts[NO_EXPERIMENT]]
    assert stats.chisquare(observed, [6000, 4000, 10000]).pvalue > 0.001
    with pytest.raises(ValueError, match="ambiguous"):
        router.assign("u", "v")


def test_without_experiments_everyone_gets_the_default_policy() -> None:
    a = ExperimentRouter(parse_experiments({"experiments": []})).assign("u")
    assert (a.experiment, a.policy, a.interleave_with) == (NO_EXPERIMENT, RankingPolicy(), None)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["experiments"][0]["variants"][0].update(share=0.6), "shares must sum to 1"),
        (lambda c: c["experiments"][0]["variants"][1].update(name="control"), "repeated: control"),
        (
            lambda c: c["experiments"][0]["variants"][0].update(policy={"use_rankr": True}),
            r"experiments\[0\].variants\[0\].policy.use_rankr: unknown key \(policy keys: use_ranker",
        ),
        (lambda c: c["experiments"][0].update(interleave=["control", "x"]), "unknown variant"),
        (lambda c: c["experiments"][0]["variants"][0].update(share=-1), r"variants\[0\].share"),
        (lambda c: c["experiments"].append(dict(c["experiments"][0])), "experiment names must be unique"),
    ],
)
def test_invalid_config_is_rejected_with_the_field_named(mutate, message: str) -> None:
    cfg = _config()
    mutate(cfg)
    with pytest.raises(ExperimentConfigError, match=message):
        parse_experiments(cfg, "exp.yaml")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments: [unclosed")
    with pytest.raises(ExperimentConfigError, match=r"bad\.yaml: not valid YAML"):
        load_experiments(bad)
    with pytest.raises(ExperimentConfigError, match=r"missing\.yaml"):
        load_experiments(tmp_path / "missing.yaml")


def test_example_config_is_valid() -> None:
    router = ExperimentRouter.from_file(REPO / "examples" / "experiments.yaml")
    assert router.experiments


def test_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments:\n  - name: a\n    variants: [ {name: x, share: 0.5\n")
    with pytest.raises(ExperimentConfigError) as info:
        load_experiments(bad)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{bad}: not valid YAML at line 4, column 1: expected ',' or '}}'")
    assert message.endswith("(while parsing a flow mapping at line 3, column 17)")
    assert "<unicode string>" not in message


def test_an_empty_experiments_file_is_an_error_not_zero_experiments(tmp_path: Path) -> None:
    # Serving with an empty file would run no A/B test while the operator believes one is on.
    empty = tmp_path / "exp.yaml"
    empty.write_text("# experiments to come\n")
    with pytest.raises(ExperimentConfigError, match=r"exp\.yaml: file is empty.*experiments: \[\]"):
        load_experiments(empty)
    explicit = tmp_path / "none.yaml"
    explicit.write_text("experiments: []\n")
    assert load_experiments(explicit).experiments == []
