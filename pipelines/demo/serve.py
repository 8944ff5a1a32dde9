"""Loopback file servers for the demo, tests and benchmarks.

`serve_directory`: a static server that answers at once (the demo).
`serve_weblike`: one that behaves like the web. Per request path, a seeded hash decides (the
same for every client, every run): a latency uniform in [latency_min_s, latency_max_s]; whether
the path hangs (the connection stays open, unanswered, until the client gives up) or answers
404. It counts requests per path, so a test or benchmark can tell how often each URL was fetched.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import http.server
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


@contextlib.contextmanager
def serve_directory(directory: str, port: int = 0) -> Iterator[str]:
    """Serve `directory` on loopback; yield the base URL (with a trailing slash)."""
    handler = functools.partial(_QuietHandler, directory=directory)
    server = _Server(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, name="mmae-serve", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()



@dataclass
class WebBehaviour:
    latency_min_s: float = 0.02
    latency_max_s: float = 0.15
    hang_rate: float = 0.03
    not_found_rate: float = 0.05
    hang_s: float = 30.0  # longer than any client timeout used with it
    seed: int = 0
    instant: bool = False

    def _uniform(self, path: str, salt: str) -> float:
        digest = hashlib.blake2b(f"{self.seed}:{salt}:{path}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def decide(self, path: str) -> tuple[str, float]:
        """('ok' | 'hang' | '404', latency in seconds) for a path."""
        if self.instant:
            return "ok", 0.0
        latency = self.latency_min_s + (self.latency_max_s - self.latency_min_s) * self._uniform(path, "latency")
        fate = self._uniform(path, "fate")
        if fate < self.hang_rate:
            return "hang", latency
        if fate < self.hang_rate + self.not_found_rate:
            return "404", latency
        return "ok", latency


class _WebHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        server: _WebServer = self.server  # type: ignore[assignment]
        path = self.path.split("?", 1)[0]
        with server.lock:
            server.hits[path] += 1
            first_time = server.hits[path] == 1
        fate, latency = server.behaviour.decide(path)
        if first_time and path in server.fail_first:
            fate = "503"
        if latency:
            time.sleep(latency)
        if fate == "hang":
            server.stopping.wait(server.behaviour.hang_s)
            return
        file_path = os.path.join(server.directory, path.lstrip("/"))
        if fate == "503":
            body = b"try again later"
            self.send_response(503)
            self.send_header("Content-Type", "text/plain")
        elif fate == "404" or not os.path.isfile(file_path) or ".." in path:
            body = b"not found"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
        else:
            with open(file_path, "rb") as handle:
                body = handle.read()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


class _WebServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        pass  # clients that give up on a hanging request hang up


@contextlib.contextmanager
def serve_weblike(directory: str, behaviour: Optional[WebBehaviour] = None) -> Iterator["_WebServer"]:
    """Serve `directory` on 127.0.0.1; yields the server (`.base_url`, `.hits`)."""
    server = _WebServer(("127.0.0.1", 0), _WebHandler)
    server.directory = str(directory)
    server.behaviour = behaviour or WebBehaviour()
    server.hits = collections.Counter()
    server.fail_first = set()  # paths whose first request answers 503 (a transient failure)
    server.lock = threading.Lock()
    server.stopping = threading.Event()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, name="weblike", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
