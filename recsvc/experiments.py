"""Experiment configuration (YAML) and deterministic assignment of users to variants.

Assignment hashes `salt + user_id` (BLAKE2b → uniform [0, 1)) instead of storing it, so every
server replica and every batch job puts a user in the same variant with no shared state, and
changing an experiment's salt reshuffles users independently of any earlier experiment.

Several experiments can run at once; they are mutually exclusive: a top-level hash (the
config's `salt`) splits users between experiments by their `traffic` fraction (equal split when
omitted), users left over get the default policy (`experiment="none"`, `variant="default"`).

```yaml
salt: layer-1                  # optional: splits traffic between experiments
experiments:
  - name: ranker
    salt: ranker-2026-11       # per-experiment: splits users between its variants
    traffic: 1.0               # optional fraction of all users in this experiment
    variants:
      - {name: control, share: 0.5, policy: {use_ranker: false}}
      - {name: treatment, share: 0.5, bundle_version: null,
         policy: {use_ranker: true, max_per_category: 3, diversity_attribute: category}}
    interleave: [control, treatment]   # optional: users of either variant see a team-draft mix
```
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recsvc.config_files import parse_problem
from recsvc.recommender import RankingPolicy

NO_EXPERIMENT = "none"
DEFAULT_VARIANT = "default"
SHARE_TOLERANCE = 1e-6


class ExperimentConfigError(ValueError):
    """The experiments file is invalid; the message names the file and the offending field."""


class PolicySpec(BaseModel):
    """What a variant changes in ranking; maps 1:1 onto `recommender.RankingPolicy`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    use_ranker: bool = True
    max_per_category: int | None = Field(default=None, ge=1)
    diversity_attribute: str = "category"

    def to_policy(self) -> RankingPolicy:
        return RankingPolicy(
            use_ranker=self.use_ranker,
            max_per_category=self.max_per_category,
            diversity_attribute=self.diversity_attribute,
        )


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    share: float = Field(gt=0.0, le=1.0)
    bundle_version: str | None = None
    policy: PolicySpec = PolicySpec()

    @field_validator("name")
    @classmethod
    def _no_slash(cls, v: str) -> str:
        if "/" in v:
            raise ValueError("must not contain '/' (used for experiment/variant in forced assignments)")
        return v


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    salt: str = Field(min_length=1)
    traffic: float | None = Field(default=None, gt=0.0, le=1.0)
    variants: list[VariantSpec] = Field(min_length=1)
    interleave: tuple[str, str] | None = None

    @model_validator(mode="after")
    def _check(self) -> ExperimentSpec:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        total = sum(v.share for v in self.variants)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"variant shares must sum to 1, got {total:.6g} ({', '.join(names)})")
        if self.interleave is not None:
            a, b = self.interleave
            if a == b:
                raise ValueError(f"interleave needs two different variants, got [{a}, {b}]")
            unknown = [n for n in (a, b) if n not in names]
            if unknown:
                raise ValueError(
                    f"interleave names unknown variant(s) {', '.join(unknown)}; known: {', '.join(names)}"
                )
        return self


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    salt: str = "recsvc-experiments"
    experiments: list[ExperimentSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [e.name for e in self.experiments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"experiment names must be unique; repeated: {', '.join(dupes)}")
        salts = [e.salt for e in self.experiments] + [self.salt]
        reused = sorted({s for s in salts if salts.count(s) > 1})
        if reused:
            raise ValueError(
                f"salts must differ between experiments (else assignments correlate): {', '.join(reused)}"
            )
        if sum(self.traffic_shares()) > 1.0 + SHARE_TOLERANCE:
            raise ValueError(
                f"experiment traffic must sum to at most 1, got {sum(self.traffic_shares()):.6g}"
            )
        return self

    def traffic_shares(self) -> list[float]:
        """Each experiment's fraction of users; omitted ones share what the explicit ones leave."""
        explicit = sum(e.traffic for e in self.experiments if e.traffic is not None)
        implicit = [e for e in self.experiments if e.traffic is None]
        rest = max(0.0, 1.0 - explicit) / len(implicit) if implicit else 0.0
        return [e.traffic if e.traffic is not None else rest for e in self.experiments]


def _describe(err: dict[str, Any]) -> str:
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    return f"{loc or 'config'}: {err['msg'].removeprefix('Value error, ')}"


def parse_experiments(data: Any, source: str = "<config>") -> ExperimentConfig:
    """Validate a decoded YAML/JSON document; errors name `source` and every bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ExperimentConfigError(f"{source}: top level must be a mapping with an 'experiments' list")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        known = ", ".join(PolicySpec.model_fields)
        hint = f" (policy keys: {known})" if ".policy." in problems else ""
        raise ExperimentConfigError(f"{source}: {problems}{hint}") from None


def load_experiments(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiments YAML file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ExperimentConfigError(f"cannot read experiments file {p}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ExperimentConfigError(f"{p}: not valid YAML{parse_problem(exc)}") from None
    if data is None:
        raise ExperimentConfigError(
            f"{p}: file is empty (no experiments); write 'experiments: []' to run none on purpose"
        )
    return parse_experiments(data, str(p))


def unit_hash(salt: str, user_id: str) -> float:
    """Uniform [0, 1) from BLAKE2b(salt, user_id); stable across processes and machines."""
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class Assignment:
    """Which variant serves this user and how (contract in docs/ARCHITECTURE.md "Experiments")."""

    experiment: str
    variant: str
    bundle_version: str | None
    policy: RankingPolicy
    interleave_with: str | None
    forced: bool = False


def _pick(cumulative: list[float], u: float) -> int:
    for i, edge in enumerate(cumulative):
        if u < edge:
            return i
    return len(cumulative) - 1  # float rounding at the top edge


class ExperimentRouter:
    """Deterministic user → variant assignment for a validated `ExperimentConfig`."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self._experiments = {e.name: e for e in config.experiments}
        self._traffic_edges: list[float] = []
        acc = 0.0
        for share in config.traffic_shares():
            acc += share
            self._traffic_edges.append(acc)

    @classmethod
    def from_file(cls, path: str | Path) -> ExperimentRouter:
        return cls(load_experiments(path))

    @property
    def experiments(self) -> list[ExperimentSpec]:
        return list(self.config.experiments)

    def variant_names(self) -> list[str]:
        """Every valid forced-variant name, as `experiment/variant`."""
        return [f"{e.name}/{v.name}" for e in self.config.experiments for v in e.variants]

    def assign(self, user_id: str, forced_variant: str | None = None) -> Assignment:
        """The user's variant; `forced_variant` ("variant" or "experiment/variant") overrides for QA."""
        if forced_variant is not None:
            exp, var = self._find(forced_variant)
            return self._assignment(exp, var, forced=True)
        experiment = self._experiment_for(user_id)
        if experiment is None:
            return Assignment(NO_EXPERIMENT, DEFAULT_VARIANT, None, RankingPolicy(), None)
        edges: list[float] = []
        acc = 0.0
        for v in experiment.variants:
            acc += v.share
            edges.append(acc)
        variant = experiment.variants[_pick(edges, unit_hash(experiment.salt, user_id))]
        return self._assignment(experiment, variant)

    def assignment_for(self, experiment: str, variant: str) -> Assignment:
        """The assignment a user of `experiment/variant` gets (e.g. the interleaving partner)."""
        exp, var = self._find(f"{experiment}/{variant}")
        return self._assignment(exp, var)

    def _experiment_for(self, user_id: str) -> ExperimentSpec | None:
        if not self.config.experiments:
            return None
        if len(self.config.experiments) == 1 and self._traffic_edges[0] >= 1.0 - SHARE_TOLERANCE:
            return self.config.experiments[0]
        u = unit_hash(self.config.salt, user_id)
        for experiment, edge in zip(self.config.experiments, self._traffic_edges):
            if u < edge:
                return experiment
        return None

    def _find(self, name: str) -> tuple[ExperimentSpec, VariantSpec]:
        exp_name, _, var_name = name.rpartition("/")
        matches = [
            (e, v)
            for e in self.config.experiments
            if not exp_name or e.name == exp_name
            for v in e.variants
            if v.name == var_name
        ]
        if len(matches) != 1:
            why = "ambiguous" if matches else "unknown"
            raise ValueError(
                f"{why} variant {name!r}; valid: {', '.join(self.variant_names()) or '(none configured)'}"
            )
        return matches[0]

    @staticmethod
    def _assignment(experiment: ExperimentSpec, variant: VariantSpec, forced: bool = False) -> Assignment:
        partner = None
        if experiment.interleave is not None and variant.name in experiment.interleave:
            a, b = experiment.interleave
            partner = b if variant.name == a else a
        return Assignment(
            experiment.name, variant.name, variant.bundle_version, variant.policy.to_policy(), partner, forced
        )
