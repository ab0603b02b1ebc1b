"""Assets: download from a loopback server, checksum verification, mirror fallback, offline cache."""

import hashlib
import http.server
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fedrec.common import assets
from fedrec.common.assets import Asset, Member, Source, fetch_dataset, fetch_model, resolve_model
from fedrec.common.errors import AssetError

PAYLOAD = b"user_id:token\titem_id:token\ttimestamp:float\n1\t1\t5\n"


def _wheel(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.zip"


def _register(monkeypatch, base: str, root: Path, *, inner_sha: str | None = None) -> None:
    wheel = _wheel({"pkg/data/toy.inter": PAYLOAD, "pkg/other.py": b"x = 1\n"})
    (root / "toy.whl").write_bytes(wheel)
    mirror = Source("mirror", f"{base}/toy.whl", f"sha256:{_sha(wheel)}",
                    (Member("pkg/data/toy.inter", "toy.inter", inner_sha or _sha(PAYLOAD)),))
    original = Source("original", _closed_port_url(), "md5:" + "0" * 32)
    monkeypatch.setitem(assets.ASSETS, "toy", Asset("toy", "dataset", (original, mirror)))


def test_falls_back_to_the_mirror_and_verifies(server, tmp_path: Path, monkeypatch) -> None:
    base, root = server
    _register(monkeypatch, base, root)

    path = fetch_dataset("toy", cache_dir=tmp_path / "cache")

    assert (path / "toy.inter").read_bytes() == PAYLOAD
    assert not (path / "other.py").exists()  # only the pinned member is taken


def test_offline_works_from_the_cache(server, tmp_path: Path, monkeypatch) -> None:
    base, root = server
    _register(monkeypatch, base, root)
    first = fetch_dataset("toy", cache_dir=tmp_path / "cache")
    (root / "toy.whl").unlink()  # the network copy is gone

    again = fetch_dataset("toy", cache_dir=tmp_path / "cache", offline=True)

    assert again == first and (again / "toy.inter").read_bytes() == PAYLOAD


def test_checksum_mismatch_is_rejected_and_nothing_cached(server, tmp_path: Path, monkeypatch) -> None:
    base, root = server
    _register(monkeypatch, base, root, inner_sha="f" * 64)

    with pytest.raises(AssetError, match="checksum mismatch") as info:
        fetch_dataset("toy", cache_dir=tmp_path / "cache")

    assert "--data DIR" in str(info.value) and "original" in str(info.value)
    assert not list((tmp_path / "cache").rglob("toy.inter"))


def test_archive_digest_mismatch(server, tmp_path: Path, monkeypatch) -> None:
    base, root = server
    _register(monkeypatch, base, root)
    asset = assets.ASSETS["toy"]
    bad = replace(asset.sources[1], digest="sha256:" + "0" * 64)
    monkeypatch.setitem(assets.ASSETS, "toy", replace(asset, sources=(bad,)))

    with pytest.raises(AssetError, match="expected sha256 0000"):
        fetch_dataset("toy", cache_dir=tmp_path / "cache")


def test_offline_with_empty_cache_names_artefact_and_remedy(tmp_path: Path) -> None:
    with pytest.raises(AssetError) as info:
        fetch_dataset("ml-100k", cache_dir=tmp_path / "empty", offline=True)
    message = str(info.value)
    assert "ml-100k" in message and "offline" in message and "--data DIR" in message
    assert "grouplens" in message and "pypi-recbole" in message


def test_corrupted_cache_is_detected_and_refetched(server, tmp_path: Path, monkeypatch) -> None:
    base, root = server
    _register(monkeypatch, base, root)
    path = fetch_dataset("toy", cache_dir=tmp_path / "cache")
    (path / "toy.inter").write_bytes(b"tampered with!!" + PAYLOAD[15:])

    with pytest.raises(AssetError, match="offline"):
        fetch_dataset("toy", cache_dir=tmp_path / "cache", offline=True)
    again = fetch_dataset("toy", cache_dir=tmp_path / "cache")

    assert (again / "toy.inter").read_bytes() == PAYLOAD


def test_model_offline_names_model_flag(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(AssetError, match="--model PATH"):
        fetch_model(cache_dir=tmp_path / "empty", offline=True)


def test_resolve_model_local_paths(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "config.json").write_text("{}")

    assert resolve_model(str(gguf), cache_dir=tmp_path).gguf_file == "m.gguf"
    assert resolve_model(str(tmp_path / "dir"), cache_dir=tmp_path).path == tmp_path / "dir"
    with pytest.raises(AssetError, match="not a known name"):
        resolve_model(str(tmp_path / "missing"), cache_dir=tmp_path)
