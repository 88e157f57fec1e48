"""pipeline.data.fetch against a scripted HTTP server on 127.0.0.1 (no internet needed).

Each test registers routes (path -> handler function) on a fresh server and checks
request counts, file contents and that nothing partial or unsafe is left on disk.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from pipeline.data.fetch import FetchError, check_url, download, fetch
from pipeline.data.presets import PRESETS

Route = Callable[[http.server.BaseHTTPRequestHandler, int], None]
FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0, "progress": False}


@dataclass
class Server:
    base: str
    routes: dict[str, Route]
    hits: Counter

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def server():
    routes: dict[str, Route] = {}
    hits: Counter = Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[self.path] += 1
            route = routes.get(self.path)
            try:
                if route is None:
                    self.send_error(404)
                else:
                    route(self, hits[self.path])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout tests)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield Server(f"http://127.0.0.1:{httpd.server_port}", routes, hits)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


# ----------------------------------------------------------------- route helpers


def send(data: bytes, *, announce: int | None = None) -> Route:
    """Serve `data` with status 200, announcing `announce` bytes (default: the true length)."""

    def route(h: http.server.BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data) if announce is None else announce))
        h.end_headers()
        h.wfile.write(data)

    return route


def status(code: int) -> Route:
    return lambda h, n: h.send_error(code)


def first_fail(k: int, then: Route, *, fail: Route = status(500)) -> Route:
    """The first `k` requests get `fail`, later ones `then`."""
    return lambda h, n: (fail if n <= k else then)(h, n)


def redirect(location: str) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def slow(seconds: float, then: Route) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler, n: int) -> None:
        time.sleep(seconds)
        then(h, n)

    return route


# --------------------------------------------------------------- fixture files


def png(color: tuple[int, int, int], size: tuple[int, int] = (4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


RED, BLUE = png((255, 0, 0)), png((0, 0, 255), (5, 2))


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    """A tar archive of (name, data) files and raw TarInfo entries (links, devices, ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buf.getvalue()


def entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` as {relative posix path: bytes}."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Leftover temporary siblings (fetch names them .<name>.<tag>-<hex>)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------- check_url


@pytest.mark.parametrize(
    "url",
    ["https://example.com/a.zip", "http://127.0.0.1:8000/x.tar", "http://127.9.9.9/x", "http://localhost/x", "http://[::1]:80/x"],
)
def test_check_url_accepts_https_and_loopback_http(url):
    check_url(url)


@pytest.mark.parametrize(
    "url",
    ["http://example.com/a.zip", "ftp://example.com/a.zip", "file:///etc/passwd", "https:///nohost", "example.com/a.zip"],
)
def test_check_url_rejects_everything_else(url):
    with pytest.raises(FetchError, match="use https"):
        check_url(url)


# -------------------------------------------------------------------- download


def test_download_writes_file_and_checks_sha256(server, tmp_path):
    server.routes["/a.png"] = send(RED)
    dest = tmp_path / "sub" / "a.png"
    out = download(server.url("/a.png"), dest, sha256=sha(RED).upper(), retries=0, progress=True)
    assert out == dest and dest.read_bytes() == RED
    assert server.hits["/a.png"] == 1 and hidden(dest.parent) == []


def test_download_retries_5xx_then_succeeds(server, tmp_path):
    server.routes["/flaky"] = first_fail(2, send(RED))
    dest = download(server.url("/flaky"), tmp_path / "a.png", **FAST)
    assert dest.read_bytes() == RED and server.hits["/flaky"] == 3


def test_download_gives_up_on_persistent_5xx_without_partial_file(server, tmp_path):
    server.routes["/down"] = status(500)
    dest = tmp_path / "a.png"
    with pytest.raises(FetchError, match="HTTP 500") as err:
        download(server.url("/down"), dest, **FAST)
    assert server.hits["/down"] == 3  # 1 + retries
    assert f"put it at {dest}" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_download_fails_fast_on_404(server, tmp_path):
    with pytest.raises(FetchError, match="404") as err:
        download(server.url("/missing.zip"), tmp_path / "m.zip", **FAST)
    assert server.hits["/missing.zip"] == 1 and server.url("/missing.zip") in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_download_retries_truncated_body(server, tmp_path):
    server.routes["/t"] = first_fail(1, send(RED), fail=send(RED[:20], announce=len(RED)))
    dest = download(server.url("/t"), tmp_path / "a.png", **FAST)
    assert dest.read_bytes() == RED and server.hits["/t"] == 2


def test_download_always_truncated_fails(server, tmp_path):
    server.routes["/t"] = send(RED, announce=len(RED) + 1000)
    with pytest.raises(FetchError, match=f"truncated: got {len(RED)} of {len(RED) + 1000} bytes"):
        download(server.url("/t"), tmp_path / "a.png", **FAST)
    assert server.hits["/t"] == 3 and list(tmp_path.iterdir()) == []


def test_download_retries_timeouts(server, tmp_path):
    server.routes["/slow"] = slow(1.0, send(RED))
    with pytest.raises(FetchError, match="timed out"):
        download(server.url("/slow"), tmp_path / "a.png", **{**FAST, "retries": 1, "timeout": 0.2})
    assert server.hits["/slow"] == 2 and list(tmp_path.iterdir()) == []


def test_download_checksum_mismatch_removes_file(server, tmp_path):
    server.routes["/a.png"] = send(RED)
    wrong = "0" * 64
    with pytest.raises(FetchError, match=f"expected sha256 {wrong}, got {sha(RED)}"):
        download(server.url("/a.png"), tmp_path / "a.png", sha256=wrong, **FAST)
    assert server.hits["/a.png"] == 1 and list(tmp_path.iterdir()) == []


def test_download_rejects_malformed_sha256_before_connecting(server, tmp_path):
    with pytest.raises(FetchError, match="64 hex digits"):
        download(server.url("/a.png"), tmp_path / "a.png", sha256="abc", **FAST)
    assert sum(server.hits.values()) == 0


def test_download_unreachable_host_says_where_to_put_the_file(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "DIV2K_train_HR.zip"
    with pytest.raises(FetchError, match="put it at") as err:
        download(f"http://127.0.0.1:{port}/DIV2K_train_HR.zip", dest, **FAST)
    assert str(dest) in str(err.value) and "3 attempts" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_download_does_not_retry_a_host_that_does_not_resolve(tmp_path, monkeypatch):
    calls = []

    def no_dns(*args, **kwargs):
        calls.append(args[0])
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(FetchError, match="cannot resolve its host") as err:
        download("https://weights.invalid/a.pth", tmp_path / "a.pth", **FAST)
    assert calls == ["weights.invalid"] and str(tmp_path / "a.pth") in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_download_keeps_old_dest_on_failure_and_replaces_it_on_success(server, tmp_path):
    dest = tmp_path / "a.png"
    dest.write_bytes(b"old")
    server.routes["/a.png"] = first_fail(3, send(RED))
    with pytest.raises(FetchError):
        download(server.url("/a.png"), dest, **FAST)
    assert dest.read_bytes() == b"old"
    download(server.url("/a.png"), dest, **FAST)
    assert dest.read_bytes() == RED and hidden(tmp_path) == []


def test_download_follows_loopback_redirect_but_not_to_plain_http(server, tmp_path):
    server.routes["/a.png"] = send(RED)
    server.routes["/moved"] = redirect(server.url("/a.png"))
    server.routes["/evil"] = redirect("http://example.com/a.png")
    assert download(server.url("/moved"), tmp_path / "a.png", **FAST).read_bytes() == RED
    with pytest.raises(FetchError, match="not https"):
        download(server.url("/evil"), tmp_path / "b.png", **FAST)
    assert server.hits["/evil"] == 1 and not (tmp_path / "b.png").exists()


# ----------------------------------------------------------------------- fetch


def test_fetch_zip_places_subdir_at_target(server, tmp_path):
    server.routes["/DIV2K_train_HR.zip"] = send(
        make_zip({"DIV2K_train_HR/0001.png": RED, "DIV2K_train_HR/0002.png": BLUE, "readme.txt": b"hi"})
    )
    target = tmp_path / "raw" / "div2k"
    assert fetch(server.url("/DIV2K_train_HR.zip"), target, subdir="DIV2K_train_HR", **FAST) == target
    assert tree(target) == {"0001.png": RED, "0002.png": BLUE}
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["div2k"]


def test_fetch_tar_gz_nested_subdir_and_whole_tree(server, tmp_path):
    files = {"benchmark/Set5/HR/baby.png": RED, "benchmark/Set5/LR_bicubic/X2/baby.png": BLUE}
    server.routes["/benchmark.tar.gz"] = send(make_tar(list(files.items())))
    fetch(server.url("/benchmark.tar.gz"), tmp_path / "set5", subdir="benchmark/Set5/HR", **FAST)
    fetch(server.url("/benchmark.tar.gz"), tmp_path / "all", **FAST)
    assert tree(tmp_path / "set5") == {"baby.png": RED}
    assert tree(tmp_path / "all") == files


def test_fetch_single_images_land_in_target(server, tmp_path):
    server.routes["/img/red.png"] = send(RED)
    server.routes["/img/blue%20sky.png"] = send(BLUE)
    target = tmp_path / "imgs"
    fetch(server.url("/img/red.png"), target, **FAST)
    fetch(server.url("/img/blue%20sky.png"), target, **FAST)
    assert tree(target) == {"red.png": RED, "blue sky.png": BLUE} and hidden(tmp_path) == []


def test_fetch_reuses_cache_when_sha256_matches(server, tmp_path):
    data = make_zip({"HR/a.png": RED})
    server.routes["/d.zip"] = send(data)
    cache = tmp_path / "cache"
    fetch(server.url("/d.zip"), tmp_path / "one", sha256=sha(data), subdir="HR", cache_dir=cache, **FAST)
    fetch(server.url("/d.zip"), tmp_path / "two", sha256=sha(data), subdir="HR", cache_dir=cache, **FAST)
    assert server.hits["/d.zip"] == 1 and tree(tmp_path / "two") == {"a.png": RED}
    (cache / "d.zip").write_bytes(b"corrupted")
    fetch(server.url("/d.zip"), tmp_path / "three", sha256=sha(data), subdir="HR", cache_dir=cache, **FAST)
    assert server.hits["/d.zip"] == 2 and (cache / "d.zip").read_bytes() == data


def test_fetch_missing_subdir_lists_folders_and_keeps_target(server, tmp_path):
    server.routes["/d.zip"] = send(make_zip({"DIV2K_valid_HR/0801.png": RED}))
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.png").write_bytes(BLUE)
    with pytest.raises(FetchError, match=r"has no folder 'DIV2K_train_HR'; folders found: \['DIV2K_valid_HR'\]"):
        fetch(server.url("/d.zip"), target, subdir="DIV2K_train_HR", **FAST)
    assert tree(target) == {"old.png": BLUE} and hidden(tmp_path) == []


def test_fetch_download_failure_keeps_target_and_advises_cache(server, tmp_path):
    server.routes["/d.zip"] = status(503)
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.png").write_bytes(BLUE)
    with pytest.raises(FetchError, match="HTTP 503.*pass a cache_dir holding d.zip"):
        fetch(server.url("/d.zip"), target, **FAST)
    with pytest.raises(FetchError, match=f"put it at {tmp_path / 'cache' / 'd.zip'}"):
        fetch(server.url("/d.zip"), target, cache_dir=tmp_path / "cache", **FAST)
    assert server.hits["/d.zip"] == 6 and tree(target) == {"old.png": BLUE} and hidden(tmp_path) == []


def test_fetch_refuses_unsafe_archive_and_unknown_files(server, tmp_path):
    server.routes["/evil.zip"] = send(make_zip({"../evil.txt": b"x"}))
    server.routes["/notes.txt"] = send(b"just text")
    with pytest.raises(FetchError, match="refusing to extract"):
        fetch(server.url("/evil.zip"), tmp_path / "t", **FAST)
    with pytest.raises(FetchError, match="neither a zip/tar archive nor an image"):
        fetch(server.url("/notes.txt"), tmp_path / "t", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_presets_are_https_and_point_at_hr_folders():
    assert {"div2k-train-hr", "div2k-valid-hr", "set5", "set14", "b100", "urban100"} <= set(PRESETS)
    for preset in PRESETS.values():
        check_url(preset.url)
        assert preset.sha256 is None or len(preset.sha256) == 64
    assert PRESETS["div2k-train-hr"].subdir == "DIV2K_train_HR"
    assert PRESETS["set5"].subdir == "benchmark/Set5/HR" and PRESETS["set5"].url.endswith("/EDSR/benchmark.tar")
