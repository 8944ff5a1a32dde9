"""Downloading image bytes safely: deadlines, byte caps, opt-out headers, address guard.

img2dataset's `download_image` reads the whole body with no cap, follows redirects without
looking at where they lead and has no overall deadline (a server trickling one byte a second
never times out). Importing it also pulls in torch, OpenCV, albumentations and wandb (about 3 s
per worker process, and torch on the data side), so `opt_out` re-states its X-Robots-Tag rule
(tests check the two agree), and `Fetcher` makes each request with:

- connections from `connections.ConnectionPool`: kept alive, every new one through the address
  guard (private/loopback/link-local refused unless allowed, checked on the address actually
  connected to); a kept connection the server closed is replaced, and a request that finds it
  closed goes once more on a new one;
- one deadline per request, DNS lookup to last byte, redirects included (the watchdog of
  `connections` ends a trickle), and a byte cap while reading;
- redirects followed here, one checked hop at a time; credentials only to their own host;
- an optional cap on requests in flight per host (`max_per_host`);
- retries with exponential backoff for timeouts, connection errors, 5xx and 429 only.

Every failure becomes a `FetchError` with a machine-readable `reason` (`http_404`, `timeout`...).
Paths, local files and object stores are read by `fileread.FileReader`; which is which, and
which schemes exist at all, is the one table in `schemes` (ftp, sftp, smb... would bypass the
address guard and are refused).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from .connections import ANSWER_TIMEOUT, DEADLINES, AddressGuard, ConnectionPool, FetchError
from .fileread import FileReader
from .schemes import family_of, scheme_of
from mmae.schemas.config import DownloadConfig

CHUNK_BYTES = 64 * 1024
USER_AGENT = "Mozilla/5.0 (compatible; mmae-build; +https://github.com/mmae/mmae)"
TRANSIENT = ("timeout", "connection_error", "http_429")


def is_transient(reason: str) -> bool:
    """Failures worth trying again later: timeouts, connection errors, 5xx and 429 (rate limited)."""
    return reason in TRANSIENT or reason.startswith("http_5")


def opt_out(header_values: list[str], user_agent_token: Optional[str], directives: set[str]) -> bool:
    """img2dataset's X-Robots-Tag rule: a listed directive, either for every agent
    (`noai`) or for our token (`mmae: noai`), opts the image out."""
    for value in header_values:
        agent: Optional[str] = None
        rest = value
        if ":" in value:
            agent, rest = value.split(":", 1)
            agent = agent.strip().lower()
        if agent is not None and agent != user_agent_token:
            continue
        if any(item.strip().lower() in directives for item in rest.split(",")):
            return True
    return False


@dataclass
class FetchResult:
    data: bytes
    content_type: str = ""
    final_url: str = ""
    attempts: int = 1


def request_target(url: str) -> tuple[str, dict[str, str]]:
    """(URL to send, extra headers): credentials in the URL become a Basic Authorization header
    (as curl and requests do), a non-ASCII host is IDNA-encoded, and a non-ASCII or space in the
    path or query is percent-encoded (what a browser sends for the same link)."""
    if url.isascii() and "@" not in url and " " not in url:
        return url, {}  # nearly every URL of a corpus: nothing to encode, no credentials
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError as error:
        raise FetchError("bad_url", str(error)) from None
    headers = {}
    if parts.username is not None or parts.password is not None:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    if not host:
        raise FetchError("bad_url", "no host in the url")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as error:
            raise FetchError("bad_url", f"host is not a valid international name: {error}") from None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    safe = "/%!$&'()*+,;=:@~-._"
    path = quote(parts.path, safe=safe) or "/"
    query = quote(parts.query, safe=safe + "?")
    return urlunsplit((parts.scheme.lower(), netloc, path, query, "")), headers


def _read_body(response: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    """The whole body under the byte cap. With a Content-Length it is one read (the deadline's
    watchdog ends a trickle); chunked or close-delimited bodies are read piece by piece."""
    if response.length is not None:
        if response.length > max_bytes:
            raise FetchError("too_large", f"Content-Length {response.length} > {max_bytes}")
        return response.read()  # IncompleteRead if the server stops short
    parts = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise FetchError("timeout", ANSWER_TIMEOUT)
        chunk = response.read1(CHUNK_BYTES)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > max_bytes:
            raise FetchError("too_large", f"more than {max_bytes} bytes")
        parts.append(chunk)


def _classify(error: BaseException) -> FetchError:
    if isinstance(error, FetchError):
        return error
    # Timeout details say which step timed out, never how long it had left: rejects are part of
    # the build's output and must come out byte-identical on a rebuild.
    if isinstance(error, (socket.timeout, TimeoutError)):
        return FetchError("timeout", ANSWER_TIMEOUT)
    return FetchError("connection_error", f"{type(error).__name__}: {error}")


class _Discard(Exception):
    """Leave the response unread and close its connection."""


# A keep-alive connection the server closed while it sat idle fails like this on its next
# request (or answers with leftovers of a previous response: a bad status line); the request
# goes once more on a new connection (GET is idempotent).
_STALE = (http.client.BadStatusLine, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class Fetcher:
    """Fetches one URL (http/https or any fsspec path) under the download policy. Thread-safe."""

    def __init__(self, config: DownloadConfig) -> None:
        self.config = config
        self.pool = ConnectionPool(AddressGuard.from_config(config), per_host=config.threads)
        self.files = FileReader(config.max_bytes)
        self.user_agent_token = (config.user_agent_token or "").strip().lower() or None
        self.directives = {d.strip().lower() for d in config.disallowed_header_directives}
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._host_lock = threading.Lock()

    def _host_slot(self, url: str):
        """A per-host semaphore when download.max_per_host is set (else a no-op context)."""
        if not self.config.max_per_host:
            return contextlib.nullcontext()
        host = (urlsplit(url).hostname or "").lower()
        with self._host_lock:
            slot = self._host_slots.get(host)
            if slot is None:
                slot = self._host_slots[host] = threading.BoundedSemaphore(self.config.max_per_host)
        return slot

    def fetch(self, url: str) -> FetchResult:
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._host_slot(url):
                    result = self._fetch_once(url)
                result.attempts = attempt
                return result
            except FetchError as error:
                if not is_transient(error.reason) or attempt > self.config.retries:
                    raise
                time.sleep(self.config.backoff_s * (2 ** (attempt - 1)))

    def _fetch_once(self, url: str) -> FetchResult:
        """HTTP here; paths, local files and object stores through `fileread` (by `schemes`)."""
        scheme = scheme_of(url)
        family = family_of(scheme)
        if family == "http":
            return self._fetch_http(url)
        if scheme == "" or family is not None:
            return FetchResult(data=self.files.read(url), final_url=url)
        raise FetchError("bad_url", f"unsupported scheme {scheme!r}")

    def _fetch_http(self, url: str) -> FetchResult:
        deadline = time.monotonic() + self.config.timeout_s
        try:
            return self._follow(url, deadline)
        except FetchError as error:
            if time.monotonic() >= deadline and error.reason == "connection_error":
                raise FetchError("timeout", ANSWER_TIMEOUT) from None
            raise

    def _follow(self, url: str, deadline: float) -> FetchResult:
        visited = {url}
        url, headers = request_target(url)
        for _ in range(self.config.max_redirects + 1):
            with self._exchange(url, headers, deadline) as response:
                if response.status in (301, 302, 303, 307, 308):
                    target = self._redirect_target(url, response, visited)
                    same_host = urlsplit(target).netloc == urlsplit(url).netloc
                    url, redirect_headers = request_target(target)
                    # Credentials go only to the host they were written for.
                    headers = redirect_headers or (headers if same_host else {})
                    if response.length is None or response.length > CHUNK_BYTES:
                        raise _Discard  # not worth reading to keep the connection
                    response.read()
                    continue
                if response.status >= 400:
                    if response.length is not None and response.length <= CHUNK_BYTES:
                        response.read()  # a small error page: read, so the connection stays usable
                    raise FetchError(f"http_{response.status}", response.reason or "")
                robots = response.headers.get_all("X-Robots-Tag") or []
                if self.directives and opt_out(robots, self.user_agent_token, self.directives):
                    raise FetchError("opt_out", ", ".join(robots))
                data = _read_body(response, self.config.max_bytes, deadline)
                content_type = response.headers.get("Content-Type", "")
                return FetchResult(data=data, content_type=content_type, final_url=url)
        raise FetchError("redirect_loop", f"more than {self.config.max_redirects} redirects")

    @staticmethod
    def _redirect_target(url: str, response: http.client.HTTPResponse, visited: set[str]) -> str:
        location = response.headers.get("Location")
        if not location:
            raise FetchError(f"http_{response.status}", "redirect without a Location")
        try:
            target = urljoin(url, location)
            scheme = urlsplit(target).scheme.lower()
        except ValueError as error:
            raise FetchError("bad_url", f"redirect to an unparsable location: {error}") from None
        if scheme not in ("http", "https"):
            raise FetchError("bad_url", f"redirect to unsupported scheme {scheme!r}")
        if target in visited:
            raise FetchError("redirect_loop", f"{target} again")
        visited.add(target)
        return target

    @contextlib.contextmanager
    def _exchange(self, url: str, headers: dict[str, str],
                  deadline: float) -> Iterator[http.client.HTTPResponse]:
        """One GET on a pooled connection, watched until the deadline: yields the response with
        its status and headers read. The connection goes back to the pool only when the body
        was read to its end without an error, and the server did not ask to close."""
        try:
            parts = urlsplit(url)
            scheme, host = parts.scheme.lower(), parts.hostname or ""
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as error:
            raise FetchError("bad_url", str(error)) from None
        if not host:
            raise FetchError("bad_url", "no host in the url")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": USER_AGENT, **headers}
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("timeout", ANSWER_TIMEOUT)
            connection, reused = self.pool.get(scheme, host, port, remaining)
            token = DEADLINES.watch(connection, deadline)
            try:
                connection.request("GET", target, headers=headers)
                response = connection.getresponse()
                break
            except BaseException as error:
                DEADLINES.unwatch(token)
                connection.close()
                if reused and attempt == 1 and isinstance(error, _STALE):
                    continue  # a kept connection the server had closed: once more on a new one
                if isinstance(error, (http.client.HTTPException, OSError, ValueError)):
                    raise _classify(error) from None
                raise
        try:
            yield response
        except _Discard:
            DEADLINES.unwatch(token)
            connection.close()
        except BaseException as error:
            DEADLINES.unwatch(token)
            if isinstance(error, FetchError) and response.isclosed() and not response.will_close:
                self.pool.put(scheme, host, port, connection)  # answered in full (an error page)
            else:
                connection.close()  # a connection left mid-body is not reused
            if isinstance(error, (http.client.HTTPException, OSError, ValueError)):
                raise _classify(error) from None
            raise
        else:
            DEADLINES.unwatch(token)  # before the connection goes back to the pool
            if response.isclosed() and not response.will_close:
                self.pool.put(scheme, host, port, connection)
            else:
                connection.close()
