"""Official-weights download path, exercised against a loopback HTTP server (never the real network).

The server serves a small fake file under the official name; tests cover success (+ cache reuse without network),
checksum mismatch, HTTP 404, a transfer that breaks off, a server that is gone, and trust-on-first-use records.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.sources.official_weights import (
    OFFICIAL_WEIGHTS,
    cached_official,
    fetch_official,
    official_name,
    official_path_hint,
    resolve_cache_dir,
    resolve_checkpoint,
)

NAME = "DiT-XL-2-256x256.pt"
PAYLOAD = os.urandom(300_000)  # stands in for the 2.7 GB file
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """A bounded loopback HTTP server on a random port; ``routes`` maps a path to (status, body, declared length)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, int | None]] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                outer.requests.append(self.path)
                status, body, length = outer.routes.get(self.path, (404, b"not found", None))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)  # with a larger declared length the client sees a short transfer

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "DITDEPLOY_WEIGHTS_URL", "DITDEPLOY_CACHE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    try:
        yield s
    finally:
        s.stop()


def _listing(d) -> list[str]:
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _fetch(server_url: str, cache, **kw):
    return fetch_official(NAME, cache_dir=cache, base_url=server_url, progress=kw.pop("progress", False),
                          timeout=10, **kw)


def test_download_verifies_records_and_reuses_cache(server, tmp_path, capsys):
    server.routes[f"/{NAME}"] = (200, PAYLOAD, None)
    cache = tmp_path / "cache"
    path = _fetch(server.url, cache, progress=True)
    assert path == cache / NAME and path.read_bytes() == PAYLOAD
    assert _listing(cache) == [NAME, NAME + ".sha256"]  # no temp file left
    assert (cache / (NAME + ".sha256")).read_text().split()[0] == SHA
    assert server.requests == [f"/{NAME}"]
    server.stop()  # the cached, verified file needs no network
    assert _fetch(server.url, cache) == path
    assert fetch_official(NAME.removesuffix(".pt"), cache_dir=cache, base_url=server.url, expected_sha256=SHA) == path
    assert cached_official(NAME, cache) == path


def test_download_with_pinned_sha256(server, tmp_path):
    server.routes[f"/{NAME}"] = (200, PAYLOAD, None)
    path = _fetch(server.url, tmp_path, expected_sha256=SHA.upper())
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    server.routes[f"/{NAME}"] = (200, PAYLOAD[:-1] + b"x", None)
    with pytest.raises(ArtifactError) as e:
        _fetch(server.url, tmp_path / "c", expected_sha256=SHA)
    msg = str(e.value)
    assert "sha256" in msg and SHA[:12] in msg and "\n" not in msg
    assert _listing(tmp_path / "c") == []


def test_http_404_is_one_line_with_manual_hint(server, tmp_path):
    with pytest.raises(ArtifactError) as e:
        _fetch(server.url, tmp_path / "c")
    msg = str(e.value)
    assert "HTTP 404" in msg and "\n" not in msg
    assert f"put it at {tmp_path / 'c' / NAME}" in msg and "--checkpoint" in msg
    assert _listing(tmp_path / "c") == []


def test_short_transfer_leaves_nothing(server, tmp_path):
    server.routes[f"/{NAME}"] = (200, PAYLOAD[:1000], len(PAYLOAD))
    with pytest.raises(ArtifactError) as e:
        _fetch(server.url, tmp_path / "c")
    assert "broke off" in str(e.value) and "\n" not in str(e.value)
    assert _listing(tmp_path / "c") == []


def test_server_gone_is_one_line(tmp_path):
    s = _Server()
    url = s.url
    s.stop()
    with pytest.raises(ArtifactError) as e:
        _fetch(url, tmp_path / "c")
    msg = str(e.value)
    assert msg.startswith(f"cannot download {NAME} from {url}/{NAME}") and "\n" not in msg
    assert "put it at" in msg
    assert _listing(tmp_path / "c") == []


def test_trust_on_first_use_detects_later_corruption(server, tmp_path):
    server.routes[f"/{NAME}"] = (200, PAYLOAD, None)
    path = _fetch(server.url, tmp_path)
    path.write_bytes(PAYLOAD[:-10])  # e.g. a partial copy over the cached file
    with pytest.raises(ArtifactError) as e:
        _fetch(server.url, tmp_path)
    assert "recorded sha256" in str(e.value) and "delete it" in str(e.value)


def test_manually_placed_file_is_recorded_without_network(tmp_path):
    (tmp_path / NAME).write_bytes(PAYLOAD)
    path = fetch_official(NAME, cache_dir=tmp_path, base_url="http://127.0.0.1:9", progress=False)
    assert path == tmp_path / NAME
    assert (tmp_path / (NAME + ".sha256")).read_text().split()[0] == SHA
    with pytest.raises(ArtifactError):  # a pinned value that disagrees is refused
        fetch_official(NAME, cache_dir=tmp_path, expected_sha256="0" * 64, progress=False)


def test_registry_names_hints_and_cache_location(tmp_path, monkeypatch):
    assert set(OFFICIAL_WEIGHTS) == {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}
    assert OFFICIAL_WEIGHTS[NAME].url == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    assert official_name("XL/2", 512) == "DiT-XL-2-512x512.pt" and official_name("DiT-XL/2") == NAME
    assert official_name("S/2", 256) is None
    monkeypatch.setenv("DITDEPLOY_CACHE", str(tmp_path / "env-cache"))
    assert resolve_cache_dir() == tmp_path / "env-cache"
    hint = official_path_hint(NAME)
    assert OFFICIAL_WEIGHTS[NAME].url in hint and "CC-BY-NC" in hint and str(tmp_path / "env-cache" / NAME) in hint
    assert cached_official(NAME) is None
    with pytest.raises(DitDeployError):
        fetch_official("DiT-XL-4-256x256.pt", cache_dir=tmp_path)
    with pytest.raises(DitDeployError):
        fetch_official(NAME, cache_dir=tmp_path, expected_sha256="abc")


def test_resolve_checkpoint(server, tmp_path):
    own = tmp_path / "mine.pt"
    own.write_bytes(b"x")
    assert resolve_checkpoint(own) == own
    with pytest.raises(ArtifactError) as e:
        resolve_checkpoint(tmp_path / "missing.pt")
    assert "does not exist" in str(e.value)
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactError) as e:  # offline mode: say where to put it
        resolve_checkpoint(NAME, download=False, cache_dir=cache)
    assert "put it at" in str(e.value) and _listing(cache) == []
    server.routes[f"/{NAME}"] = (200, PAYLOAD, None)
    got = resolve_checkpoint("DiT-XL-2-256x256", cache_dir=cache, base_url=server.url, progress=False)
    assert got == cache / NAME and got.read_bytes() == PAYLOAD
    assert resolve_checkpoint(NAME, download=False, cache_dir=cache, progress=False) == got
