"""Downloading image bytes safely: deadlines, byte caps, opt-out headers, address guard.

img2dataset's `download_image` reads the whole body with no cap, follows redirects without
looking at where they lead and has no overall deadline (a server trickling one byte a second
never times out). Importing it also pulls in torch, OpenCV, albumentations and wandb (about 3 s
per worker process, and torch on the data side), so `opt_out` re-states its X-Robots-Tag rule
(tests check the two agree) and urllib3's keep-alive pool is wrapped with:

- a connection class that resolves the host itself (cached for `dns_cache_s`), refuses
  private/loopback/link-local addresses (unless allowed), and connects to the address it
  checked (no DNS-rebinding gap); every new connection goes through it, redirect hops included
  (redirects are followed here, one checked hop at a time, never by the pool);
- one deadline per request, connect to last byte, redirects included: a watchdog thread shuts
  the socket of a request still running at its deadline (a server trickling its status line
  or headers one byte at a time defeats per-read socket timeouts), and a byte cap while reading;
- an optional cap on requests in flight per host (`max_per_host`);
- retries with exponential backoff for timeouts, connection errors, 5xx and 429 only.

Every failure becomes a `FetchError` with a machine-readable `reason` (`http_404`, `timeout`...).
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import ipaddress
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

import fsspec
import urllib3
from mmae.pipelines.builder.localfiles import NotARegularFile, read_regular_file
from mmae.schemas.config import DownloadConfig

CHUNK_BYTES = 64 * 1024
USER_AGENT = "Mozilla/5.0 (compatible; mmae-build; +https://github.com/mmae/mmae)"
TRANSIENT = ("timeout", "connection_error", "http_429")
# One detail for every timeout after connecting: which of the socket's own timeout, the
# watchdog or a check between reads notices the deadline first is a race, and rejects must come
# out byte-identical on a rebuild.
ANSWER_TIMEOUT = "no complete answer before the deadline (download.timeout_s)"


def is_transient(reason: str) -> bool:
    """Failures worth trying again later: timeouts, connection errors, 5xx and 429 (rate limited)."""
    return reason in TRANSIENT or reason.startswith("http_5")

# Object stores and local files are read through fsspec. Network protocols that would bypass the
# address guard (ftp, sftp, smb, webdav...) are refused.
FSSPEC_SCHEMES = ("file", "local", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hdfs")


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


class FetchError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class FetchResult:
    data: bytes
    content_type: str = ""
    final_url: str = ""
    attempts: int = 1


@dataclass
class AddressGuard:
    """Decides whether an IP may be contacted."""

    allow_private: bool = False
    allowed_networks: list = field(default_factory=list)
    dns_cache_s: float = 0.0
    _resolved: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(cls, config: DownloadConfig) -> "AddressGuard":
        return cls(
            allow_private=config.allow_private_addresses,
            allowed_networks=[ipaddress.ip_network(n, strict=False) for n in config.allowed_networks],
            dns_cache_s=config.dns_cache_s,
        )

    def resolve(self, host: str, port: int) -> list:
        """getaddrinfo, remembered for dns_cache_s: a corpus hits the same CDN hosts millions of times."""
        now = time.monotonic()
        key = (host, port)
        with self._lock:
            cached = self._resolved.get(key)
        if cached is not None and now - cached[0] < self.dns_cache_s:
            return cached[1]
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if self.dns_cache_s > 0:
            with self._lock:
                if len(self._resolved) > 100_000:
                    self._resolved.clear()
                self._resolved[key] = (now, infos)
        return infos

    def is_allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.allow_private:
            return True
        if any(ip in network for network in self.allowed_networks):
            return True
        return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)

    def connect(self, host: str, port: int, timeout: Optional[float]) -> socket.socket:
        """Resolve, check every candidate address, connect to an allowed one."""
        try:
            infos = self.resolve(host, port)
        except socket.gaierror as error:
            raise FetchError("connection_error", f"cannot resolve {host}: {error}") from None
        refused = [info[4][0] for info in infos if not self.is_allowed(info[4][0])]
        if refused:
            # Refuse if *any* address is non-public: a mixed answer is a classic rebinding trick.
            raise FetchError("private_address", f"{host} resolves to {', '.join(sorted(set(refused)))}")
        last_error: Optional[OSError] = None
        for family, socktype, proto, _, address in infos:
            sock = socket.socket(family, socktype, proto)
            sock.settimeout(timeout)
            try:
                sock.connect(address)
                return sock
            except OSError as error:
                sock.close()
                last_error = error
        raise last_error or OSError(f"cannot connect to {host}:{port}")


class _Deadlines:
    """One watchdog thread per process: shuts the socket of any request still running at its
    deadline, which wakes a thread blocked reading a status line, headers or body."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._watched: dict[int, urllib3.connection.HTTPConnection] = {}
        self._counter = itertools.count()
        self._wake = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def watch(self, connection, deadline: float) -> int:
        token = next(self._counter)
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mmae-deadlines", daemon=True)
                self._thread.start()
            self._watched[token] = connection
            heapq.heappush(self._heap, (deadline, token))
            if self._heap[0][1] == token:
                self._wake.notify()
        return token

    def unwatch(self, token: int) -> None:
        with self._wake:
            self._watched.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0][1] not in self._watched:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._wake.wait()
                    continue
                deadline, token = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._heap)
                connection = self._watched.pop(token)
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


_DEADLINES = _Deadlines()
_CURRENT = threading.local()  # the deadline of the request this thread is making


def _stop_watching() -> None:
    for token in getattr(_CURRENT, "tokens", ()):
        _DEADLINES.unwatch(token)
    _CURRENT.tokens = []


class _GuardedHTTPConnection(urllib3.connection.HTTPConnection):
    """Every new socket (first request, redirect hop, reconnect) goes through the guard, and
    every request on it is watched until the thread's deadline."""

    guard: AddressGuard

    def request(self, *args, **kwargs):
        deadline = getattr(_CURRENT, "deadline", None)
        if deadline is not None:
            _CURRENT.tokens.append(_DEADLINES.watch(self, deadline))
        return super().request(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
        try:
            return self.guard.connect(self._dns_host, self.port, timeout)
        except (socket.timeout, TimeoutError):
            raise FetchError("timeout", "connecting timed out") from None
        except FetchError:
            raise
        except OSError as error:
            raise FetchError("connection_error", f"{type(error).__name__}: {error}") from None


class _GuardedHTTPSConnection(_GuardedHTTPConnection, urllib3.connection.HTTPSConnection):
    pass


def build_pool(config: DownloadConfig) -> urllib3.PoolManager:
    """A keep-alive connection pool whose every connection goes through the address guard.

    Reusing connections matters on real corpora: most URLs of a web dataset live on a few
    hundred CDN hosts, and a fresh TCP (and TLS) handshake per image costs both sides."""
    guard = AddressGuard.from_config(config)
    http_connection = type("GuardedHTTPConnection", (_GuardedHTTPConnection,), {"guard": guard})
    https_connection = type("GuardedHTTPSConnection", (_GuardedHTTPSConnection,), {"guard": guard})
    http_pool = type("GuardedHTTPPool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": http_connection})
    https_pool = type("GuardedHTTPSPool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": https_connection})
    pool = urllib3.PoolManager(num_pools=256, maxsize=config.threads, block=False, retries=False,
                               headers={"User-Agent": USER_AGENT})
    pool.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}
    return pool


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


def _read_capped(stream, max_bytes: int, deadline: float) -> bytes:
    parts = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise FetchError("timeout", ANSWER_TIMEOUT)
        chunk = stream.read1(CHUNK_BYTES) if hasattr(stream, "read1") else stream.read(CHUNK_BYTES)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > max_bytes:
            raise FetchError("too_large", f"more than {max_bytes} bytes")
        parts.append(chunk)


def _classify(error: BaseException) -> FetchError:
    if isinstance(error, FetchError):
        return error
    reason = getattr(error, "reason", None)
    if isinstance(reason, FetchError):
        return reason
    # Timeout details say which step timed out, never how long it had left: rejects are part of
    # the build's output and must come out byte-identical on a rebuild.
    if isinstance(error, urllib3.exceptions.ConnectTimeoutError):
        return FetchError("timeout", "connecting timed out")
    if isinstance(error, (urllib3.exceptions.TimeoutError, socket.timeout, TimeoutError)):
        return FetchError("timeout", ANSWER_TIMEOUT)
    return FetchError("connection_error", f"{type(error).__name__}: {error}")


class Fetcher:
    """Fetches one URL (http/https or any fsspec path) under the download policy. Thread-safe."""

    def __init__(self, config: DownloadConfig) -> None:
        self.config = config
        self.pool = build_pool(config)
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
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_http(url)
        if scheme == "" or len(scheme) == 1 or scheme in FSSPEC_SCHEMES:
            return self._fetch_fsspec(url)
        raise FetchError("bad_url", f"unsupported scheme {scheme!r}")

    def _fetch_http(self, url: str) -> FetchResult:
        deadline = time.monotonic() + self.config.timeout_s
        _CURRENT.deadline, _CURRENT.tokens = deadline, []
        try:
            return self._follow(url, deadline)
        except FetchError as error:
            if time.monotonic() >= deadline and error.reason == "connection_error":
                raise FetchError("timeout", ANSWER_TIMEOUT) from None
            raise
        finally:
            _stop_watching()
            _CURRENT.deadline = None

    def _follow(self, url: str, deadline: float) -> FetchResult:
        visited = {url}
        url, headers = request_target(url)
        for _ in range(self.config.max_redirects + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("timeout", ANSWER_TIMEOUT)
            try:
                response = self.pool.request(
                    "GET", url, headers=headers, preload_content=False, redirect=False, retries=False,
                    decode_content=False, timeout=urllib3.Timeout(connect=remaining, read=remaining))
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
                raise _classify(error) from None
            try:
                if response.status in (301, 302, 303, 307, 308):
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
                    same_host = urlsplit(target).netloc == urlsplit(url).netloc
                    url, redirect_headers = request_target(target)
                    # Credentials go only to the host they were written for.
                    headers = redirect_headers or (headers if same_host else {})
                    _stop_watching()  # before the connection goes back to the pool
                    response.drain_conn()
                    continue
                if response.status >= 400:
                    raise FetchError(f"http_{response.status}", response.reason or "")
                robots = response.headers.getlist("X-Robots-Tag")
                if self.directives and opt_out(robots, self.user_agent_token, self.directives):
                    raise FetchError("opt_out", ", ".join(robots))
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.config.max_bytes:
                    raise FetchError("too_large", f"Content-Length {length} > {self.config.max_bytes}")
                data = _read_capped(response, self.config.max_bytes, deadline)
                content_type = response.headers.get("Content-Type", "")
                _stop_watching()  # before the connection goes back to the pool
                response.release_conn()
                return FetchResult(data=data, content_type=content_type, final_url=url)
            except FetchError:
                response.close()  # a connection left mid-body is not reused
                raise
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
                response.close()
                raise _classify(error) from None
        raise FetchError("redirect_loop", f"more than {self.config.max_redirects} redirects")

    def _fetch_local(self, path: str) -> FetchResult:
        """Regular files only: a FIFO or device is never waited on or read (`read_regular_file`)."""
        try:
            data, size = read_regular_file(path, self.config.max_bytes)
        except FileNotFoundError:
            raise FetchError("not_found", "no such file") from None
        except NotARegularFile:
            raise FetchError("not_a_file", "not a regular file (FIFO, device or folder)") from None
        except (PermissionError, IsADirectoryError) as error:
            raise FetchError("not_found", type(error).__name__) from None
        except (OSError, ValueError) as error:
            raise FetchError("bad_url", f"{type(error).__name__}: {error}") from None
        if size > self.config.max_bytes or len(data) > self.config.max_bytes:
            raise FetchError("too_large", f"{size} bytes > {self.config.max_bytes}")
        return FetchResult(data=data, final_url=path)

    def _fetch_fsspec(self, url: str) -> FetchResult:
        scheme = urlsplit(url).scheme.lower()
        if len(scheme) <= 1:
            return self._fetch_local(url)
        if scheme in ("file", "local"):
            return self._fetch_local(urlsplit(url).path)
        try:
            fs, path = fsspec.core.url_to_fs(scheme + url[len(scheme):])
        except ImportError as error:
            raise FetchError("bad_url", f"no file system for {scheme}:// here ({error})") from None
        except ValueError as error:
            raise FetchError("bad_url", str(error)) from None
        try:
            size = fs.size(path)
            if size is not None and size > self.config.max_bytes:
                raise FetchError("too_large", f"{size} bytes > {self.config.max_bytes}")
            with fs.open(path, "rb") as handle:
                data = handle.read(self.config.max_bytes + 1)
        except FileNotFoundError as error:
            raise FetchError("not_found", str(error)) from None
        except FetchError:
            raise
        except OSError as error:
            raise FetchError("connection_error", f"{type(error).__name__}: {error}") from None
        if len(data) > self.config.max_bytes:
            raise FetchError("too_large", f"more than {self.config.max_bytes} bytes")
        return FetchResult(data=data, final_url=url)
