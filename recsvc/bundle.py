"""Versioned model bundles: atomic publish, integrity check, CURRENT pointer and rollback.

A bundle is a directory `BUNDLES/<version>/` whose `manifest.json` lists the sha256 of every
other file. It is assembled in a hidden staging directory inside BUNDLES (same filesystem), so
the final `os.rename` is atomic and a crashed run leaves only an unreferenced `.staging-*`
directory that readers ignore. `BUNDLES/CURRENT` names the served version and is swapped with
write-temp + `os.replace`, so a reader always sees either the old or the new version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsvc.config import TrainConfig, from_dict

if TYPE_CHECKING:
    from recsvc.behaviour import CoOccurrence, ItemStats
    from recsvc.catalog import Catalog
    from recsvc.collaborative import CFModel
    from recsvc.history import HistoryStore
    from recsvc.ranker import Ranker
    from recsvc.retrieval import ItemIndex
    from recsvc.user_tower import TowerParams

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Optional part: ALS item factors (recsvc.collaborative.CFModel); without it requests get no cf
# candidates and nan cf features.
CF_FILE = "collaborative.npz"
# Optional part: the ranker for repeat_policy=exclude requests (else the main ranker serves them).
NOVEL_RANKER_DIR = "ranker_novel"
MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "CURRENT"
STAGING_PREFIX = ".staging-"
_VERSION_RE = re.compile(r"^(\d{8}T\d{6}Z)(?:-(\d+))?$")
_HASH_CHUNK = 1 << 20
# Packages whose versions decide whether a bundle reproduces; recorded in every manifest.
RECORDED_PACKAGES = (
    "recsvc",
    "torch",
    "transformers",
    "faiss-cpu",
    "faiss-gpu",
    "lightgbm",
    "polars",
    "numpy",
)


class BundleError(Exception):
    """A bundle (or bundles root) is missing, incomplete, corrupted or from a newer recsvc."""


# ----------------------------------------------------------------------------- hashing / fsync


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so multi-GB weights don't need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(directory: Path) -> list[str]:
    """Relative POSIX paths of every regular file under `directory` except the manifest."""
    out = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            rel = path.relative_to(directory).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return out


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """fsync every file and directory so a power cut after rename never exposes empty files."""
    for path in sorted(directory.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(directory)


# ----------------------------------------------------------------------------- manifest facts


def code_version() -> str:
    """Git commit of the running code, or "unknown" outside a checkout / without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha) else "unknown"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a model (absent ones are left out)."""
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def new_version_name(now: float | None = None) -> str:
    """UTC timestamp version name; uniqueness is settled at rename time by `publish`."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


def _version_key(name: str) -> tuple[str, int]:
    match = _VERSION_RE.match(name)
    if match is None:
        return (name, -1)
    return (match.group(1), int(match.group(2) or 0))


# ----------------------------------------------------------------------------- publish


def new_staging_dir(bundles_root: str | Path) -> Path:
    """A fresh hidden directory inside `bundles_root` to write a bundle's files into."""
    root = Path(bundles_root)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))


def _is_inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def publish(
    staging_dir: str | Path,
    bundles_root: str | Path,
    manifest: dict[str, Any] | None = None,
    *,
    make_current: bool = True,
) -> str:
    """Seal `staging_dir` into `bundles_root/<version>` and (by default) point CURRENT at it.

    `manifest` holds the run's facts (config, metrics, ...); format version, creation time,
    code and package versions and the per-file sha256 are added here. A staging dir outside
    `bundles_root` is first copied into a hidden one inside it so the rename stays atomic.
    Returns the version name.
    """
    root = Path(bundles_root)
    staging = Path(staging_dir)
    if not staging.is_dir():
        raise BundleError(f"staging directory {staging} does not exist")
    root.mkdir(parents=True, exist_ok=True)
    if not _is_inside(staging, root) or staging.resolve().parent != root.resolve():
        copy = new_staging_dir(root)
        shutil.copytree(staging, copy, dirs_exist_ok=True)
        staging = copy
    full = write_manifest(staging, manifest or {})
    _fsync_tree(staging)

    version = _rename_to_version(staging, root)
    _fsync_path(root)
    log.info("published bundle %s (%d files) in %s", version, len(full["files"]), root)
    if make_current:
        set_current(root, version, verify_bundle=False)
    return version


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Complete `manifest` (format, time, code/package versions, sha256 of every file) and
    write it as `directory/manifest.json`; returns the full manifest. Used by `publish`, and by
    the pipeline to load a staged bundle through the same `load` path before publishing it."""
    directory = Path(directory)
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    full = dict(manifest)
    full["format_version"] = FORMAT_VERSION
    full.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    full.setdefault("code_version", code_version())
    full.setdefault("packages", package_versions())
    full["files"] = {rel: sha256_file(directory / rel) for rel in _bundle_files(directory)}
    with open(directory / MANIFEST_NAME, "w", encoding="utf-8") as fh:
        json.dump(full, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")
    return full


def _rename_to_version(staging: Path, root: Path) -> str:
    base = new_version_name()
    for attempt in range(10_000):
        version = base if attempt == 0 else f"{base}-{attempt}"
        target = root / version
        if target.exists():
            continue
        try:
            os.rename(staging, target)
        except OSError:
            if target.exists():  # another publisher took the name between check and rename
                continue
            raise
        return version
    raise BundleError(f"could not find a free version name for {base} in {root}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"manifest value of type {type(value).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------- CURRENT / versions


def list_versions(bundles_root: str | Path) -> list[str]:
    """Published versions, oldest first. Staging leftovers and foreign folders are ignored."""
    root = Path(bundles_root)
    if not root.is_dir():
        return []
    names = [
        p.name
        for p in root.iterdir()
        if p.is_dir() and _VERSION_RE.match(p.name) and (p / MANIFEST_NAME).is_file()
    ]
    return sorted(names, key=_version_key)


def current_version(bundles_root: str | Path) -> str:
    """The version CURRENT points at; BundleError if there is none or it is dangling."""
    root = Path(bundles_root)
    pointer = root / CURRENT_NAME
    if not pointer.is_file():
        raise BundleError(f"no {CURRENT_NAME} in {root}: publish a bundle first (recsvc-train)")
    version = pointer.read_text(encoding="utf-8").strip()
    if not version or not (root / version / MANIFEST_NAME).is_file():
        raise BundleError(f"{pointer} points at {version!r}, which is not a published bundle in {root}")
    return version


def set_current(bundles_root: str | Path, version: str, *, verify_bundle: bool = True) -> None:
    """Atomically point CURRENT at `version` (after verifying it, unless told not to)."""
    root = Path(bundles_root)
    target = root / version
    if not _VERSION_RE.match(version) or not (target / MANIFEST_NAME).is_file():
        known = ", ".join(list_versions(root)) or "none"
        raise BundleError(f"no published bundle {version!r} in {root} (versions: {known})")
    if verify_bundle:
        verify(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{CURRENT_NAME}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(version + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, root / CURRENT_NAME)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_path(root)
    log.info("CURRENT -> %s in %s", version, root)


def rollback(bundles_root: str | Path, to: str | None = None) -> str:
    """Point CURRENT at `to`, or at the newest version older than the current one.

    Returns the version now current. The target is verified first, so a rollback never
    switches serving onto a corrupted bundle.
    """
    root = Path(bundles_root)
    if to is None:
        current = current_version(root)
        older = [v for v in list_versions(root) if _version_key(v) < _version_key(current)]
        if not older:
            raise BundleError(f"nothing to roll back to: {current} is the oldest bundle in {root}")
        to = older[-1]
    set_current(root, to, verify_bundle=True)
    return to


def resolve(path_or_root: str | Path) -> Path:
    """A bundle directory itself, or a bundles root resolved through its CURRENT pointer."""
    path = Path(path_or_root)
    if not path.exists():
        raise BundleError(f"bundle path {path} does not exist")
    if (path / MANIFEST_NAME).is_file():
        return path
    if path.is_dir() and ((path / CURRENT_NAME).exists() or list_versions(path)):
        return path / current_version(path)
    raise BundleError(
        f"{path} is neither a bundle (no {MANIFEST_NAME}) nor a bundles root (no {CURRENT_NAME})"
    )


# ----------------------------------------------------------------------------- verify


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Parse manifest.json and check it is a format this code can read."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"missing file {MANIFEST_NAME} in bundle {bundle_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} must hold a JSON object")
    fmt = manifest.get("format_version")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise BundleError(f"{path} has no integer format_version")
    if fmt > FORMAT_VERSION:
        raise BundleError(
            f"bundle format {fmt} is newer than this recsvc supports ({FORMAT_VERSION}); upgrade recsvc to load {bundle_dir}"
        )
    if fmt < 1:
        raise BundleError(f"bundle format {fmt} in {path} is not a valid format version")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"{path} has no 'files' table of sha256 checksums")
    return manifest


def verify(bundle_dir: str | Path) -> dict[str, Any]:
    """Check format version, that every listed file exists with its sha256, and no extras.

    Returns the manifest. Raises BundleError naming the first offending file.
    """
    directory = Path(bundle_dir)
    manifest = read_manifest(directory)
    expected: dict[str, str] = manifest["files"]
    for rel in sorted(expected):
        path = directory / rel
        if not path.is_file():
            raise BundleError(f"missing file {rel} in bundle {directory}")
        if sha256_file(path) != expected[rel]:
            raise BundleError(
                f"checksum mismatch in {rel} (bundle {directory}): the file was modified or corrupted"
            )
    extra = sorted(set(_bundle_files(directory)) - set(expected))
    if extra:
        raise BundleError(f"unexpected file {extra[0]} in bundle {directory} (not in its manifest)")
    return manifest


_verify_bundle = verify  # `load` takes a `verify` flag that shadows the function


# ----------------------------------------------------------------------------- load


@dataclass
class LoadedBundle:
    """Everything the request path needs, assembled through each part's own loader."""

    path: Path
    version: str
    manifest: dict[str, Any]
    config: TrainConfig
    catalog: Catalog
    item_embeddings: np.ndarray
    index: ItemIndex
    tower: TowerParams
    ranker: Ranker
    history: HistoryStore
    item_stats: ItemStats
    cooccurrence: CoOccurrence
    encoder_dir: Path
    data_end_ts: int
    cf: CFModel | None = None  # ALS item factors (collaborative.npz); None in bundles without them
    novel_ranker: Ranker | None = None  # ranker_novel/, for repeat_policy=exclude; None = use `ranker`


def load(path_or_root: str | Path, verify: bool = True) -> LoadedBundle:
    """Load a bundle (or the CURRENT one of a bundles root), verifying it first by default."""
    directory = resolve(path_or_root)
    manifest = _verify_bundle(directory) if verify else read_manifest(directory)

    # Imported here so verify/publish/rollback work without loading torch, faiss or lightgbm.
    from recsvc.behaviour import CoOccurrence, ItemStats
    from recsvc.catalog import Catalog
    from recsvc.collaborative import CFModel
    from recsvc.features import FEATURE_NAMES
    from recsvc.history import HistoryStore
    from recsvc.ranker import Ranker
    from recsvc.retrieval import ItemIndex
    from recsvc.user_tower import load_params

    try:
        config = from_dict(TrainConfig, manifest.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise BundleError(f"config in {directory / MANIFEST_NAME} is not a valid TrainConfig: {exc}") from exc

    def part(rel: str) -> Path:
        path = directory / rel
        if not path.exists():
            raise BundleError(f"missing file {rel} in bundle {directory}")
        return path

    catalog = Catalog.load(part("catalog.parquet"))
    item_embeddings = np.load(part("item_embeddings.npy"))
    if item_embeddings.shape[0] != len(catalog.item_ids):
        raise BundleError(
            f"item_embeddings.npy has {item_embeddings.shape[0]} rows but catalog.parquet has "
            f"{len(catalog.item_ids)} items (bundle {directory})"
        )
    part("index.faiss")
    ranker = Ranker.load(part("ranker"))
    novel_ranker = (
        Ranker.load(directory / NOVEL_RANKER_DIR) if (directory / NOVEL_RANKER_DIR).exists() else None
    )
    for name, model in (("ranker", ranker), (NOVEL_RANKER_DIR, novel_ranker)):
        if model is not None and model.feature_names != list(FEATURE_NAMES):
            missing = [n for n in FEATURE_NAMES if n not in model.feature_names]
            extra = [n for n in model.feature_names if n not in FEATURE_NAMES]
            raise BundleError(
                f"the ranker in {directory / name} was trained on another feature set than this recsvc "
                f"computes (missing: {', '.join(missing) or 'none'}; unknown: {', '.join(extra) or 'none'}); "
                "retrain the bundle with this version (recsvc-train)"
            )
    cf_path = directory / CF_FILE
    try:
        cf = CFModel.load(cf_path) if cf_path.exists() else None
    except (ValueError, KeyError, OSError) as exc:
        raise BundleError(f"{CF_FILE} in bundle {directory} cannot be read: {exc}") from exc
    if cf is not None and cf.item_factors.shape[0] != len(catalog.item_ids):
        raise BundleError(
            f"{CF_FILE} has {cf.item_factors.shape[0]} item rows but catalog.parquet has "
            f"{len(catalog.item_ids)} items (bundle {directory})"
        )
    bundle = LoadedBundle(
        path=directory,
        version=directory.name,
        manifest=manifest,
        config=config,
        catalog=catalog,
        item_embeddings=item_embeddings,
        index=ItemIndex.load(directory),
        tower=load_params(part("user_tower.npz")),
        ranker=ranker,
        history=HistoryStore.load(part("history.parquet"), catalog),
        item_stats=ItemStats.load(part("item_stats.npz")),
        cooccurrence=CoOccurrence.load(part("cooccurrence.npz")),
        encoder_dir=part("encoder"),
        data_end_ts=int(manifest.get("data_end_ts", 0)),
        cf=cf,
        novel_ranker=novel_ranker,
    )
    log.info("loaded bundle %s (%d items)", bundle.version, len(catalog.item_ids))
    return bundle
