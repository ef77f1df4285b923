"""Fixtures shared by the serving tests: one published bundle root per session, copied per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.running_server import copy_root, shared_bundle_root


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory: pytest.TempPathFactory, synth_loaded) -> Path:
    """A bundles root with one published bundle, built once (read-only: copy it to change it)."""
    return shared_bundle_root(tmp_path_factory, synth_loaded.interactions, synth_loaded.items)


@pytest.fixture()
def root(bundle_root: Path, tmp_path: Path) -> Path:
    """This test's own copy of `bundle_root` (publish, corrupt or roll back freely)."""
    return copy_root(bundle_root, tmp_path / "bundles")
