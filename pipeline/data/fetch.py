"""Safe dataset downloads: https only, checksummed, retried, atomic, extracted without escapes.

`download` streams one URL to a file; `fetch` downloads and leaves the images (or a
folder inside an archive, unpacked by pipeline.data.archives) at a target path.
Every failure raises one `FetchError` whose one-line message names the URL or file and
says what to do (without the URL's query values, where presigned URLs keep their
signature; URLs with user:password@ are refused). Nothing half-written is ever left at a
destination: downloads and extractions go to hidden temporary siblings first and are
renamed into place.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import re
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image
from tqdm import tqdm

from idm.files import file_sha256
from pipeline.data.archives import (
    DamagedFile,
    FetchError,
    extract,
    one_line,
    remove_path,
    replace_path,
    sibling_path,
)
from pipeline.data.images import IMAGE_SUFFIXES

_CHUNK = 1 << 20
_USER_AGENT = "idm-pipeline-fetch/0.1 (+python urllib)"
_RETRYABLE_4XX = (408, 429)  # request timeout, too many requests: worth another try
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Transient(Exception):
    """A failure worth retrying: connection error, timeout, 5xx, truncated body."""


# ---------------------------------------------------------------------------- urls


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> None:
    """Accept https:// URLs, and http:// only for loopback hosts; raise FetchError otherwise.

    Plain http to a remote host can be tampered with in transit; file:// is refused
    because local folders are a separate dataset source. A URL carrying a user name or
    password is refused too: params are logged, so credentials do not belong in them.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError:
        raise FetchError(f"refusing to download {redact_url(url)!r}: malformed URL or port") from None
    if parts.username is not None or parts.password is not None:
        raise FetchError(
            f"refusing to download {redact_url(url)!r}: it carries credentials (user:password@), which would end up "
            "in params, logs and MLflow; use a URL without them, or fetch the file by hand into a folder source"
        )
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise FetchError(
        f"refusing to download {redact_url(url)!r}: only https:// URLs are allowed (http:// only for 127.0.0.1, "
        "localhost, ::1); use https, or a local folder source for files on disk"
    )


def redact_url(url: str) -> str:
    """`url` fit for messages and logs: a password (or a token alone) before @ and every
    query value replaced by *** (presigned URLs carry their signature there)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url.split("?")[0]
    shown = url  # edited in place: rebuilding it would drop the empty host of sqlite:////abs/path
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        shown = shown.replace(f"{userinfo}@", f"{user}:***@" if colon else "***@", 1)
    if parts.query:
        query = "&".join(f"{k}=***" if sep else k for k, sep, _ in (q.partition("=") for q in parts.query.split("&")))
        shown = shown.replace(f"?{parts.query}", f"?{query}", 1)
    return shown


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs that pass `check_url` (no https -> http downgrade)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        try:
            check_url(newurl)
        except FetchError:
            fp.close()
            raise FetchError(f"{redact_url(req.full_url)} redirects to {redact_url(newurl)!r}, which is not https; "
                             "use an https URL") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(url: str) -> urllib.request.OpenerDirector:
    # Loopback never goes through a proxy; other hosts use urllib's usual proxy settings.
    host = urllib.parse.urlsplit(url).hostname or ""
    handlers: list[urllib.request.BaseHandler] = [_CheckedRedirects()]
    if _is_loopback(host):
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _SHA256.fullmatch(value):
        raise FetchError(f"sha256 {sha256!r} is not 64 hex digits; fix or remove it")
    return value


# ------------------------------------------------------------------------ download


def _stream(
    response: http.client.HTTPResponse, out: BinaryIO, total: int | None, label: str, progress: bool
) -> tuple[str, int]:
    """Copy the body into `out`; return (sha256 hex, bytes received)."""
    digest, received = hashlib.sha256(), 0
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress, leave=False)
    with bar:
        while chunk := response.read(_CHUNK):
            try:
                out.write(chunk)
            except OSError as err:  # a full disk is not worth retrying
                raise FetchError(f"cannot write {out.name} ({one_line(err)}); free some disk space and retry") from err
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return digest.hexdigest(), received


def _attempt(url: str, out: BinaryIO, label: str, *, timeout: float, progress: bool, by_hand: str) -> str:
    """One GET of `url` streamed into `out`; return its sha256. Raises _Transient if retryable."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with _opener(url).open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            digest, received = _stream(response, out, total, label, progress)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code >= 500 or err.code in _RETRYABLE_4XX:
            raise _Transient(f"HTTP {err.code} {err.reason}") from err
        raise FetchError(f"cannot download {redact_url(url)} (HTTP {err.code} {err.reason}); check the URL, or {by_hand}") from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, socket.gaierror):  # no DNS answer: offline, or a typo; retrying won't help
            raise FetchError(f"cannot download {redact_url(url)} (cannot resolve its host: {one_line(err.reason)}); "
                             f"{by_hand}") from err
        raise _Transient(one_line(err)) from err
    except (http.client.HTTPException, OSError) as err:
        raise _Transient(one_line(err)) from err
    # http.client returns a short body without complaint when the server hangs up early.
    if total is not None and received < total:
        raise _Transient(f"truncated: got {received} of {total} bytes")
    return digest


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
    by_hand: str | None = None,
    hash_prefix: str | None = None,
) -> Path:
    """Download `url` to `dest` atomically and return `dest`.

    The body is streamed to a hidden temporary file beside `dest`, checked against
    `sha256` (64 hex digits, when given) or `hash_prefix` (the first 8 or more hex digits of
    its sha256, torch.hub's convention for checkpoints named `<name>-<prefix>.pth`) and
    renamed onto `dest`, so `dest` is never partial.
    Connection errors, timeouts (`timeout` seconds per socket operation), HTTP 5xx/408/429
    and truncated bodies are retried `retries` more times, waiting `backoff * 2**k` s;
    other 4xx errors and checksum mismatches fail at once. `by_hand` is the advice the
    error gives when the host cannot be reached (default: put the file at `dest` by hand).
    """
    check_url(url)
    expected = _normalise_sha256(sha256)
    prefix = (hash_prefix or "").strip().lower()
    if hash_prefix is not None and not re.fullmatch(r"[0-9a-f]{8,64}", prefix):
        raise FetchError(f"hash prefix {hash_prefix!r} is not 8 to 64 hex digits; fix or remove it")
    if retries < 0 or backoff < 0 or timeout <= 0:
        raise FetchError(f"need retries >= 0, backoff >= 0, timeout > 0; got {retries}, {backoff}, {timeout}")
    dest = Path(dest)
    if dest.is_dir():
        raise FetchError(f"cannot download {redact_url(url)} to {dest}: it is a folder; give a file path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    by_hand = by_hand or f"download it by hand and put it at {dest}"
    tmp = sibling_path(dest, "part")
    try:
        with open(tmp, "xb") as out:
            actual = _download_to(
                out, url, dest.name,
                retries=retries, backoff=backoff, timeout=timeout, progress=progress, by_hand=by_hand,
            )
        if expected is not None and actual != expected:
            raise FetchError(
                f"checksum mismatch for {redact_url(url)}: expected sha256 {expected}, got {actual}; "
                "the file is corrupt or changed upstream, fix the URL or the sha256"
            )
        if prefix and not actual.startswith(prefix):
            raise FetchError(
                f"checksum mismatch for {redact_url(url)}: expected a sha256 starting {prefix}, got {actual}; "
                "the file is corrupt or changed upstream, fix the URL or the hash"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _download_to(
    out: BinaryIO, url: str, label: str, *, retries: int, backoff: float, timeout: float, progress: bool, by_hand: str
) -> str:
    """Try `_attempt` up to `retries + 1` times, waiting `backoff * 2**k` s between; return the sha256."""
    for k in range(retries + 1):
        if k:
            time.sleep(backoff * 2 ** (k - 1))
        out.seek(0)
        out.truncate()  # a retry starts from scratch: servers need not support ranges
        try:
            return _attempt(url, out, label, timeout=timeout, progress=progress, by_hand=by_hand)
        except _Transient as err:
            reason = str(err)
    raise FetchError(f"cannot download {redact_url(url)} ({reason}; {retries + 1} attempts); {by_hand}")


# --------------------------------------------------------------------------- fetch


def _url_filename(url: str) -> str:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if name in ("", ".", ".."):
        raise FetchError(f"cannot tell a file name from {redact_url(url)}; use a URL that ends in the file name")
    return name


def _is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


def _folders(root: Path, depth: int = 3, limit: int = 12) -> list[str]:
    """Up to `limit` folders under `root`, `depth` levels deep, as relative paths."""
    found = (p.relative_to(root) for p in root.rglob("*") if p.is_dir())
    return sorted(p.as_posix() for p in found if len(p.parts) <= depth)[:limit]


def _place_archive(archive: Path, target: Path, subdir: str | None, work: Path) -> None:
    """Extract `archive` and move `subdir` of it (or all of it) onto `target`."""
    tree = extract(archive, work / "tree")
    source = tree
    if subdir:
        if subdir.startswith("/") or ".." in subdir.replace("\\", "/").split("/"):
            raise FetchError(f"subdir {subdir!r} must be a relative path inside the archive, without '..'")
        source = tree / subdir
        if not source.is_dir() or source.is_symlink():
            raise FetchError(f"{archive} has no folder {subdir!r}; folders found: {_folders(tree)}; fix subdir")
    replace_path(source, target)


def _place_image(image: Path, target: Path, work: Path) -> None:
    """Copy the single image file to target/<name>; other files in `target` are kept."""
    try:
        with Image.open(image) as img:
            img.verify()
    except Exception as err:  # Pillow raises many types for bad data
        raise DamagedFile(f"{image} is not a readable image ({one_line(err)})") from err
    if target.exists() and not target.is_dir():
        raise FetchError(f"{target} exists and is not a folder; remove it or choose another target")
    staged = work / "single"
    staged.mkdir()
    shutil.copyfile(image, staged / image.name)
    if target.is_dir():
        os.replace(staged / image.name, target / image.name)
    else:
        os.rename(staged, target)


_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tbz2", ".txz", ".tar.gz", ".tar.bz2", ".tar.xz")


def _place(file: Path, url: str, target: Path, subdir: str | None, work: Path) -> None:
    """Put the images of the downloaded `file` at `target` (see `fetch`)."""
    if _is_archive(file):
        _place_archive(file, target, subdir, work)
    elif file.name.lower().endswith(_ARCHIVE_SUFFIXES):
        raise DamagedFile(f"{file} (from {redact_url(url)}) is not a readable zip or tar archive (truncated or corrupt?)")
    elif subdir:
        raise FetchError(f"{redact_url(url)} is not an archive, so subdir {subdir!r} cannot apply; remove subdir")
    elif file.suffix.lower() in IMAGE_SUFFIXES:
        _place_image(file, target, work)
    else:
        kinds = ", ".join(IMAGE_SUFFIXES)
        raise FetchError(f"{redact_url(url)} is neither a zip/tar archive nor an image ({kinds}); check the URL")


def fetch(
    url: str,
    target: Path,
    *,
    sha256: str | None = None,
    subdir: str | None = None,
    cache_dir: Path | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `url` and leave its images at the folder `target`; return `target`.

    An archive is extracted and its folder `subdir` (or the whole tree) becomes `target`,
    replacing what was there. A single image becomes target/<file name>. With
    `cache_dir`, the download is kept at cache_dir/<file name> and reused next time when
    its sha256 matches or, with no `sha256` given, when it came from the same URL or was
    put there by hand (downloads are atomic, so a cached file is complete; a file of the
    same name from another URL is downloaded again). On failure `target` is left
    unchanged, and a cached download that turns out truncated or corrupt is deleted so
    the next call downloads it again.
    """
    check_url(url)
    target = Path(target)
    name = _url_filename(url)
    expected = _normalise_sha256(sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = sibling_path(target, "fetch")
    work.mkdir()
    try:
        file = Path(cache_dir or work) / name
        source = file.parent / f".{name}.source"  # which URL a cached file came from (absent: put there by hand)
        url_id = hashlib.sha256(url.encode()).hexdigest()  # not the URL itself, which may hold a signature
        cached = file.is_file() and (file_sha256(file) == expected if expected is not None
                                     else not source.exists() or source.read_text().strip() == url_id)
        if not cached:
            # Without a cache the download lands in a temporary folder: no use telling the user to put it there.
            by_hand = None if cache_dir else f"download it by hand and pass a cache_dir holding {name}"
            download(url, file, sha256=expected, retries=retries, backoff=backoff, timeout=timeout,
                     progress=progress, by_hand=by_hand)
            source.write_text(url_id + "\n")
        try:
            _place(file, url, target, subdir, work)
        except DamagedFile as err:
            if cache_dir is None:  # the file was in `work`, removed below
                raise FetchError(f"{err.problem}; rerun to download it again") from None
            file.unlink(missing_ok=True)  # a damaged download is never reused
            source.unlink(missing_ok=True)
            raise FetchError(f"{err.problem}; removed it from the cache, so the next run downloads it again") from None
    finally:
        remove_path(work)
    return target
