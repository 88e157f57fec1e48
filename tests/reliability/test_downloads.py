"""The download stage against a scripted HTTP server on 127.0.0.1: transfer faults and hostile archives.

Every case first downloads a good archive into data/raw (and the cache), then runs the
stage again with the fault. A fault that retrying cures must end with the right files; any
other must end with one `error:` line, data/raw exactly as before, and no partial file in
the cache or beside the output. The stage runs in this process (tests.reliability.harness),
with the retry back-off sleeps skipped.
"""

from __future__ import annotations

import http.server
from pathlib import Path

import pytest

from tests.pipeline.data.test_archives import malicious
from tests.pipeline.data.test_fetch import (  # noqa: F401
    BLUE,
    RED,
    first_fail,
    make_tar,
    make_zip,
    redirect,
    send,
    server,
    status,
)
from tests.reliability.harness import (
    assert_one_line_error,
    leftovers,
    run_stage,
    snapshot,
    write_params,
)

pytestmark = pytest.mark.reliability

GOOD = make_zip({"HR/a.png": RED, "HR/b.png": BLUE})
TAR = make_tar([("HR/a.png", bytes(range(256)) * 256), ("HR/b.png", RED)])  # large enough to cut inside a member


def chunked_then_cut(data: bytes):
    """A chunked body that stops half way, without the terminating chunk."""

    def route(h: http.server.BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        half = data[: len(data) // 2]
        h.wfile.write(f"{len(data):x}\r\n".encode() + half)
        h.wfile.flush()
        h.close_connection = True

    return route


@pytest.fixture
def web(server, tmp_path, monkeypatch):
    """Paths and a `download(url, sha256=None)` that runs the stage; data/raw starts with a good download."""
    monkeypatch.setattr("pipeline.data.fetch.time.sleep", lambda seconds: None)  # retry back-off
    server.routes["/good/data.zip"] = send(GOOD)
    paths = {"raw": tmp_path / "data" / "raw", "cache": tmp_path / "data" / "cache", "params": tmp_path / "params.yaml"}

    def download(url: str, sha256: str | None = None) -> tuple[int, str]:
        dataset = {"name": "web", "source": "url", "url": url, "subdir": "HR", **({"sha256": sha256} if sha256 else {})}
        write_params(paths["params"], {"datasets": [dataset]})
        return run_stage("download", "--params", paths["params"], "--out", paths["raw"], "--cache", paths["cache"])

    code, err = download(server.url("/good/data.zip"))
    assert code == 0, err
    paths["before"] = snapshot(paths["raw"])
    assert paths["before"] == {"web/a.png": RED, "web/b.png": BLUE}
    return server, paths, download


def _untouched(paths: dict) -> None:
    assert snapshot(paths["raw"]) == paths["before"], "data/raw changed"
    assert leftovers(paths["raw"].parent) == [], "temporary folders left beside data/raw"
    assert [n for n in leftovers(paths["cache"]) if ".part-" in n] == [], "a partial download was left in the cache"
    cached = paths["cache"] / "data.zip"
    assert not cached.exists() or cached.read_bytes() == GOOD, "a damaged download was kept in the cache"


# Faults that retrying cures: route -> requests the server should have seen.
CURED = {
    "cut mid-transfer once": (first_fail(1, send(GOOD), fail=send(GOOD[: len(GOOD) // 2], announce=len(GOOD))), 2),
    "HTTP 500 then 200": (first_fail(1, send(GOOD)), 2),
    "HTTP 503 twice then 200": (first_fail(2, send(GOOD), fail=status(503)), 3),
    "chunked body cut once": (first_fail(1, send(GOOD), fail=chunked_then_cut(GOOD)), 2),
}


@pytest.mark.parametrize("case", sorted(CURED))
def test_transient_faults_are_retried_until_the_file_is_whole(web, case):
    server, paths, download = web
    route, hits = CURED[case]
    server.routes["/v2/data.zip"] = route
    code, err = download(server.url("/v2/data.zip"))
    assert code == 0, err
    assert server.hits["/v2/data.zip"] == hits
    assert snapshot(paths["raw"]) == paths["before"] and leftovers(paths["raw"].parent) == []
    assert (paths["cache"] / "data.zip").read_bytes() == GOOD


# Faults that stay: route, sha256 to ask for, fragments of the one-line error.
FAILING = {
    "cut mid-transfer every time": (send(GOOD[: len(GOOD) // 2], announce=len(GOOD)), None,
                                    ["truncated: got", "4 attempts", "put it at"]),
    "chunked body cut every time": (chunked_then_cut(GOOD), None, ["4 attempts", "put it at"]),
    "HTTP 500 every time": (status(500), None, ["HTTP 500", "4 attempts"]),
    "HTTP 404": (status(404), None, ["HTTP 404", "check the URL"]),
    "checksum mismatch": (send(GOOD), "0" * 64, ["checksum mismatch", "expected sha256 " + "0" * 64]),
    "truncated zip served whole": (send(GOOD[:-40]), None, ["not a readable zip or tar archive",
                                                            "removed it from the cache"]),
    "truncated tar.gz served whole": (send(TAR[: len(TAR) // 2]), None, ["cannot extract", "truncated or corrupt",
                                                                         "removed it from the cache"]),
    "not an archive": (send(b"<html>maintenance</html>"), None, ["not a readable zip or tar archive"]),
}


@pytest.mark.parametrize("case", sorted(FAILING))
def test_lasting_faults_fail_in_one_line_and_leave_the_previous_download(web, case):
    server, paths, download = web
    route, sha256, fragments = FAILING[case]
    server.routes["/v2/data.zip"] = route
    code, err = download(server.url("/v2/data.zip"), sha256)
    assert_one_line_error(code, err, *fragments)
    _untouched(paths)


def test_a_damaged_download_is_not_reused_from_the_cache(web):
    server, paths, download = web
    server.routes["/v2/data.zip"] = first_fail(1, send(GOOD), fail=send(GOOD[:-40]))  # corrupt once, then fixed
    assert download(server.url("/v2/data.zip"))[0] == 2
    code, err = download(server.url("/v2/data.zip"))
    assert code == 0, err
    assert server.hits["/v2/data.zip"] == 2 and (paths["cache"] / "data.zip").read_bytes() == GOOD


@pytest.mark.parametrize("case", sorted(malicious(Path("/x"))))
def test_hostile_archives_are_refused_whole(web, tmp_path, case):
    server, paths, download = web
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    server.routes["/evil/data.tar"] = send(malicious(outside)[case])
    code, err = download(server.url("/evil/data.tar"))
    assert_one_line_error(code, err)
    assert "refusing to extract" in err or "outside the archive" in err, err
    assert snapshot(outside) == {"secret": b"secret"}
    assert snapshot(paths["raw"]) == paths["before"] and leftovers(paths["raw"].parent) == []


@pytest.mark.parametrize("url, fragment", [
    ("http://example.com/data.zip", "only https:// URLs are allowed"),
    ("ftp://example.com/data.zip", "only https:// URLs are allowed"),
    ("file:///etc/passwd", "only https:// URLs are allowed"),
    ("http://127.0.0.1.example.com/data.zip", "only https:// URLs are allowed"),
    ("https://alice:hunter2@example.com/data.zip", "carries credentials"),
])
def test_only_https_or_loopback_is_downloaded_and_nothing_is_fetched_otherwise(web, monkeypatch, url, fragment):
    server, paths, download = web

    def no_network(*args, **kwargs):
        raise AssertionError("a refused URL must not be fetched")

    monkeypatch.setattr("urllib.request.OpenerDirector.open", no_network)
    code, err = download(url)
    line = assert_one_line_error(code, err, fragment)
    assert "hunter2" not in line
    _untouched(paths)


def test_a_redirect_to_plain_http_is_refused(web):
    server, paths, download = web
    server.routes["/moved/data.zip"] = redirect("http://example.com/data.zip")
    assert_one_line_error(*download(server.url("/moved/data.zip")), "which is not https")
    _untouched(paths)


def test_secrets_in_a_presigned_url_stay_out_of_the_error(web):
    server, paths, download = web
    server.routes["/signed/data.zip?X-Amz-Signature=s3cr3t"] = status(403)
    code, err = download(server.url("/signed/data.zip?X-Amz-Signature=s3cr3t"))
    assert_one_line_error(code, err, "HTTP 403", "X-Amz-Signature=***")
    assert "s3cr3t" not in err
