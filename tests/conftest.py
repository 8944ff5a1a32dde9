"""Shared fixtures: a loopback HTTP server with good images and every kind of bad answer."""

from __future__ import annotations

import http.server
import io
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

# Caches mmae keeps for the user (the unpacked language model) go to a folder of this run's own;
# Beam's worker processes inherit it.
if "MMAE_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["MMAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmae-test-cache-")


def jpeg_bytes(width: int = 96, height: int = 96, colour=(200, 30, 30), quality: int = 90) -> bytes:
    image = Image.new("RGB", (width, height), colour)
    # A little structure so different colours give different bytes after resizing.
    for x in range(0, width, 7):
        image.putpixel((x, x % height), (255 - colour[0], colour[1], 255 - colour[2]))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of side x side pixels: ~100 KB on the wire, 2.7 GB once decoded to RGB."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(compressor.compress(row * (side % 1000)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


class BadInputHandler(http.server.BaseHTTPRequestHandler):
    """Routes: /img/<n>.jpg good images; everything else is a named failure mode."""

    protocol_version = "HTTP/1.1"
    images: dict[str, bytes] = {}
    bomb: bytes = b""
    # What the server saw, by the `?t=TOKEN` a test adds: requests made, and how many bytes a
    # trickling answer had written when the client hung up (what completed, not how long it took).
    requests: dict[str, int] = {}
    cut_after: dict[str, int] = {}
    connections: dict[str, set] = {}  # token -> client (address, port) pairs: one per TCP connection
    hung_up: dict[str, int] = {}  # token -> requests answered by closing a kept-alive connection

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes, token) -> None:
        """One byte every 0.1 s; notes how many were written when the client hung up."""
        written = 0
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                written += 1
                time.sleep(0.1)
            # The client is still reading: keep the connection open and silent until it leaves.
            while self.connection.recv(1):
                pass
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        if token:
            self.cut_after[token] = written

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        path, _, query = self.path.partition("?")
        token = query[2:] if query.startswith("t=") else None
        if token:
            self.requests[token] = self.requests.get(token, 0) + 1
            self.connections.setdefault(token, set()).add(self.client_address)
        if getattr(self, "hang_up_next", False):
            # /keep-then-hang-up/ said keep-alive; the next request on this connection finds it
            # closed without an answer (what a server that drops idle connections looks like).
            self.hung_up[token] = self.hung_up.get(token, 0) + 1
            self.close_connection = True
            return
        port = self.server.server_address[1]
        if path.startswith("/img/"):
            body = self.images.get(path[len("/img/"):])
            if body is None:
                self._send(404, b"not found", "text/plain")
            else:
                self._send(200, body)
        elif path.startswith("/keep-then-hang-up/"):
            self._send(200, self.images[path.rsplit("/", 1)[1]])
            self.hang_up_next = True
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"error page", "text/html")
        elif path == "/slow":
            time.sleep(3)
            self._send(200, self.images["red.jpg"])
        elif path == "/trickle":
            body = self.images["red.jpg"]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self._trickle(body[:40], token)
        elif path == "/trickle-headers":
            # The status line and headers one byte at a time: only a whole-request deadline ends it.
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: " + b"x" * 200 + b"\r\n\r\n"
            self._trickle(head, token)
            self.close_connection = True
        elif path.startswith("/to-scheme/"):
            self._redirect(path[len("/to-scheme/"):] + ":///etc/passwd")
        elif path == "/auth":
            if self.headers.get("Authorization", "").startswith("Basic "):
                self._send(200, self.images["red.jpg"])
            else:
                self._send(401, b"who are you", "text/plain")
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/loop-a":
            self._redirect("/loop-b")
        elif path == "/loop-b":
            self._redirect("/loop-a")
        elif path == "/redirect-good":
            self._redirect("/img/red.jpg")
        elif path == "/redirect-private":
            # 127.0.0.2 is loopback but outside the test's allowed network (127.0.0.1/32).
            self._redirect(f"http://127.0.0.2:{port}/img/red.jpg")
        elif path == "/big":
            self._send(200, b"\xff" * 300_000)
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\xff" * 65536
            try:
                for _ in range(8):
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif path == "/html":
            self._send(200, b"<html><body>not an image</body></html>", "text/html; charset=utf-8")
        elif path == "/empty":
            self._send(200, b"")
        elif path == "/truncated":
            body = self.images["large.jpg"]
            self._send(200, body[: len(body) // 2])
        elif path == "/bomb":
            self._send(200, self.bomb, "image/png")
        elif path == "/optout":
            self._send(200, self.images["red.jpg"], headers={"X-Robots-Tag": "noai"})
        elif path == "/optout-other-agent":
            self._send(200, self.images["blue.jpg"], headers={"X-Robots-Tag": "otherbot: noai"})
        else:
            self._send(404, b"no such route", "text/plain")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops SYNs under a burst of concurrent downloads, and the
    # client's 1 s retransmit then looks like a server timeout.
    request_queue_size = 128

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-body (timeouts, byte caps) are expected here


@pytest.fixture(scope="session")
def bomb() -> bytes:
    return bomb_png()


@pytest.fixture(scope="session")
def http_server(bomb):
    """Base URL of the bad-input server (127.0.0.1, ephemeral port)."""
    BadInputHandler.images = {
        "red.jpg": jpeg_bytes(colour=(200, 30, 30)),
        "blue.jpg": jpeg_bytes(colour=(30, 30, 200)),
        "green.jpg": jpeg_bytes(colour=(30, 200, 30)),
        "large.jpg": jpeg_bytes(640, 480, colour=(120, 60, 200)),
        "tiny.jpg": jpeg_bytes(8, 8),
        "wide.jpg": jpeg_bytes(400, 50),
        "%C3%BCber%20gr%C3%B6%C3%9Fe.jpg": jpeg_bytes(colour=(30, 30, 200)),  # "über größe.jpg" as sent
    }
    BadInputHandler.bomb = bomb
    server = _Server(("127.0.0.1", 0), BadInputHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (JSON-encoded) or raw bytes lines (written as they are)."""
    import json

    with open(path, "wb") as handle:
        for row in rows:
            handle.write(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n")
    return path


def pytest_sessionfinish(session, exitstatus):
    """Release Arrow readers while Arrow is still alive: its thread pools can abort the process
    if they are first torn down during interpreter exit (apache/arrow#34314)."""
    import gc

    gc.collect()
