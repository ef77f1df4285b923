from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recsvc import bundle
from recsvc.bundle import BundleError


def _stage(root: Path, payload: bytes = b"weights") -> Path:
    staging = bundle.new_staging_dir(root)
    (staging / "ranker").mkdir()
    (staging / "ranker" / "model.txt").write_bytes(payload)
    (staging / "catalog.parquet").write_bytes(b"catalog")
    return staging


def _publish(root: Path, payload: bytes = b"weights", **manifest: object) -> str:
    return bundle.publish(_stage(root, payload), root, {"item_count": 2, **manifest})


def test_publish_writes_manifest_with_checksum_of_every_file(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    manifest = json.loads((tmp_path / version / "manifest.json").read_text())
    assert set(manifest["files"]) == {"ranker/model.txt", "catalog.parquet"}
    assert manifest["files"]["ranker/model.txt"] == bundle.sha256_file(
        tmp_path / version / "ranker" / "model.txt"
    )
    assert manifest["format_version"] == bundle.FORMAT_VERSION
    assert manifest["item_count"] == 2


def test_publish_records_code_and_package_versions(tmp_path: Path) -> None:
    manifest = bundle.verify(tmp_path / _publish(tmp_path))
    assert "numpy" in manifest["packages"]
    assert manifest["code_version"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", manifest["code_version"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created_at"])


def test_publish_names_version_by_utc_time_and_points_current_at_it(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    assert re.fullmatch(r"\d{8}T\d{6}Z(-\d+)?", version)
    assert (tmp_path / "CURRENT").read_text().strip() == version
    assert bundle.resolve(tmp_path) == tmp_path / version


def test_publish_twice_in_the_same_second_gives_distinct_versions(tmp_path: Path) -> None:
    versions = [_publish(tmp_path, payload=bytes([i])) for i in range(3)]
    assert len(set(versions)) == 3
    assert bundle.list_versions(tmp_path) == versions
    assert bundle.current_version(tmp_path) == versions[-1]


def test_publish_leaves_no_staging_directory_behind(tmp_path: Path) -> None:
    _publish(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(bundle.STAGING_PREFIX)]


def test_publish_copies_a_staging_dir_outside_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "ranker").mkdir(parents=True)
    (outside / "ranker" / "model.txt").write_text("m")
    root = tmp_path / "bundles"
    version = bundle.publish(outside, root, {})
    assert bundle.verify(root / version)["files"].keys() == {"ranker/model.txt"}


def test_publish_without_make_current_keeps_the_old_current(tmp_path: Path) -> None:
    first = _publish(tmp_path)
    bundle.publish(_stage(tmp_path, b"other"), tmp_path, {}, make_current=False)
    assert bundle.current_version(tmp_path) == first


def test_verify_detects_a_flipped_byte(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    target = tmp_path / version / "ranker" / "model.txt"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch in ranker/model\.txt"):
        bundle.verify(tmp_path / version)


def test_verify_detects_a_deleted_file(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    (tmp_path / version / "catalog.parquet").unlink()
    with pytest.raises(BundleError, match=r"missing file catalog\.parquet"):
        bundle.verify(tmp_path / version)


def test_verify_detects_an_extra_file(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    (tmp_path / version / "ranker" / "sneaky.txt").write_text("x")
    with pytest.raises(BundleError, match=r"unexpected file ranker/sneaky\.txt"):
        bundle.verify(tmp_path / version)


def test_verify_refuses_a_newer_format_version(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    manifest_path = tmp_path / version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = bundle.FORMAT_VERSION + 2
    manifest_path.write_text(json.dumps(manifest))
    expected = f"bundle format {bundle.FORMAT_VERSION + 2} is newer than this recsvc supports \\({bundle.FORMAT_VERSION}\\)"
    with pytest.raises(BundleError, match=expected):
        bundle.verify(tmp_path / version)


def test_verify_refuses_a_missing_manifest(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    (tmp_path / version / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"missing file manifest\.json"):
        bundle.verify(tmp_path / version)


def test_resolve_without_current_names_the_root(tmp_path: Path) -> None:
    _publish(tmp_path)
    (tmp_path / "CURRENT").unlink()
    with pytest.raises(BundleError, match=f"no CURRENT in {re.escape(str(tmp_path))}"):
        bundle.resolve(tmp_path)


def test_resolve_of_a_missing_path_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        bundle.resolve(tmp_path / "nope")


def test_resolve_of_a_dangling_current_is_a_bundle_error(tmp_path: Path) -> None:
    _publish(tmp_path)
    (tmp_path / "CURRENT").write_text("20000101T000000Z\n")
    with pytest.raises(BundleError, match="20000101T000000Z"):
        bundle.resolve(tmp_path)


def test_leftover_staging_dir_is_ignored_by_listing_and_resolve(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    crashed = _stage(tmp_path, b"half-written")
    (crashed / "manifest.json").write_text("{}")
    assert bundle.list_versions(tmp_path) == [version]
    assert bundle.resolve(tmp_path) == tmp_path / version


def test_set_current_switches_and_rollback_returns_to_the_previous_version(tmp_path: Path) -> None:
    old = _publish(tmp_path, b"old")
    new = _publish(tmp_path, b"new")
    assert bundle.current_version(tmp_path) == new
    assert bundle.rollback(tmp_path) == old
    assert bundle.current_version(tmp_path) == old
    bundle.set_current(tmp_path, new)
    assert bundle.resolve(tmp_path) == tmp_path / new


def test_rollback_to_a_named_version(tmp_path: Path) -> None:
    versions = [_publish(tmp_path, bytes([i])) for i in range(3)]
    assert bundle.rollback(tmp_path, to=versions[0]) == versions[0]
    assert bundle.current_version(tmp_path) == versions[0]


def test_rollback_from_the_oldest_version_is_refused(tmp_path: Path) -> None:
    _publish(tmp_path)
    with pytest.raises(BundleError, match="nothing to roll back to"):
        bundle.rollback(tmp_path)


def test_rollback_refuses_a_corrupted_target_and_keeps_current(tmp_path: Path) -> None:
    old = _publish(tmp_path, b"old")
    new = _publish(tmp_path, b"new")
    (tmp_path / old / "ranker" / "model.txt").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="checksum mismatch"):
        bundle.rollback(tmp_path)
    assert bundle.current_version(tmp_path) == new


def test_set_current_to_an_unknown_version_lists_the_known_ones(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    with pytest.raises(BundleError, match=f"versions: {version}"):
        bundle.set_current(tmp_path, "20990101T000000Z")


def test_load_of_a_corrupted_bundle_is_refused_before_reading_parts(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    (tmp_path / version / "catalog.parquet").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"checksum mismatch in catalog\.parquet"):
        bundle.load(tmp_path)


def test_load_assembles_every_part_of_a_real_bundle(synth_loaded, tmp_path: Path) -> None:
    import numpy as np

    from recsvc.config import TrainConfig
    from tests.helpers.bundle_builder import write_bundle

    root = write_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path / "bundles")
    loaded = bundle.load(root)
    assert loaded.version == bundle.current_version(root)
    assert loaded.path == root / loaded.version
    assert len(loaded.catalog) == synth_loaded.items.height == loaded.manifest["item_count"]
    assert np.array_equal(loaded.item_embeddings, np.load(loaded.path / "item_embeddings.npy"))
    assert loaded.index.n == len(loaded.catalog)
    assert isinstance(loaded.config, TrainConfig)
    assert loaded.data_end_ts == loaded.manifest["data_end_ts"]
    assert (loaded.encoder_dir / "config.json").is_file()
    assert len(loaded.history) > 0


def test_load_refuses_embeddings_that_do_not_match_the_catalogue(synth_loaded, tmp_path: Path) -> None:
    import numpy as np

    from tests.helpers.bundle_builder import write_bundle

    root = write_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path / "bundles")
    path = bundle.resolve(root)
    np.save(path / "item_embeddings.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(BundleError, match=r"item_embeddings\.npy has 3 rows"):
        bundle.load(root, verify=False)


def test_collaborative_factors_are_checksummed_and_loaded(synth_loaded, tmp_path: Path) -> None:
    from tests.helpers.bundle_builder import write_bundle

    root = write_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path / "bundles")
    loaded = bundle.load(root)
    assert bundle.CF_FILE in loaded.manifest["files"]
    assert loaded.cf is not None and loaded.cf.item_factors.shape[0] == len(loaded.catalog)
    assert len(loaded.cf.active) > 0
    with open(loaded.path / bundle.CF_FILE, "r+b") as fh:
        fh.seek(-3, 2)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match=r"checksum mismatch in collaborative\.npz"):
        bundle.load(root)


def test_a_bundle_without_factors_loads_and_serves_without_cf(synth_loaded, tmp_path: Path) -> None:
    from recsvc.config import CollaborativeConfig, TrainConfig
    from recsvc.recommender import Recommender, RecommendRequest
    from tests.helpers.bundle_builder import write_bundle

    cfg = TrainConfig(collaborative=CollaborativeConfig(enabled=False))
    root = write_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path / "bundles", cfg)
    loaded = bundle.load(root)
    assert loaded.cf is None and loaded.novel_ranker is None
    user = loaded.history.users()[0]
    result = Recommender(loaded).recommend(RecommendRequest(user_id=user, k=30))
    assert len(result.items) == 30 and not any("cf" in i.sources for i in result.items)


def test_a_ranker_trained_on_an_older_feature_set_is_refused_by_name(synth_loaded, tmp_path: Path) -> None:
    import numpy as np

    from recsvc.features import FEATURE_NAMES
    from recsvc.ranker import Ranker
    from tests.helpers.bundle_builder import write_bundle

    root = write_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path / "bundles")
    old_names = [n for n in FEATURE_NAMES if not n.startswith("cf_") and n != "src_cf"]
    rng = np.random.default_rng(0)
    old = Ranker.train(
        rng.random((40, len(old_names))), rng.integers(0, 2, 40), np.array([20, 20]), None, None, None,
        feature_names=old_names,
    )  # fmt: skip
    old.save(bundle.resolve(root) / "ranker")
    with pytest.raises(BundleError, match=r"missing: cf_score, cf_rank, cf_score_rel, src_cf"):
        bundle.load(root, verify=False)


def test_a_novel_ranker_in_the_bundle_is_loaded(synth_loaded, tmp_path: Path) -> None:
    import shutil

    from tests.helpers.bundle_builder import write_bundle

    root = write_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path / "bundles")
    path = bundle.resolve(root)
    shutil.copytree(path / "ranker", path / bundle.NOVEL_RANKER_DIR)
    loaded = bundle.load(root, verify=False)
    assert loaded.novel_ranker is not None
    assert loaded.novel_ranker.feature_names == loaded.ranker.feature_names
