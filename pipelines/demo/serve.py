"""A static file server on 127.0.0.1 for the demo and benchmarks (threaded, quiet)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from typing import Iterator


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
