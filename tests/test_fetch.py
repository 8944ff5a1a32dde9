"""The downloader against every bad answer the loopback server can give."""

from __future__ import annotations

import time

import pytest
from mmae.pipelines.builder.connections import ANSWER_TIMEOUT, AddressGuard
from mmae.pipelines.builder.fetch import Fetcher, FetchError
from mmae.schemas.config import DownloadConfig

from tests.conftest import BadInputHandler


def fetcher(**overrides) -> Fetcher:
    settings = {"timeout_s": 1.0, "retries": 0, "backoff_s": 0.01, "max_bytes": 200_000,
                "allowed_networks": ["127.0.0.1/32"]}
    settings.update(overrides)
    return Fetcher(DownloadConfig(**settings))


def reason_of(fetch: Fetcher, url: str) -> str:
    with pytest.raises(FetchError) as caught:
        fetch.fetch(url)
    return caught.value.reason


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "172.16.5.4", "192.168.1.1", "127.0.0.1", "127.0.0.2", "169.254.169.254", "0.0.0.0",
     "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "224.0.0.1", "100.64.0.1",
     # IPv6 forms that carry a private IPv4 address, and deprecated site-local addresses
     "2002:c0a8:101::1", "2002:7f00:1::", "64:ff9b::10.0.0.1", "64:ff9b:1::a00:1", "::10.0.0.1",
     "2001:0:4136:e378:8000:63bf:3fff:fdd2", "fec0::1", "fec0:1::2"],
)
def test_guard_refuses_non_public_addresses(address):
    assert not AddressGuard().is_allowed(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::8.8.8.8",
                                     "2002:808:808::1"])
def test_guard_allows_public_addresses(address):
    assert AddressGuard().is_allowed(address)


def test_guard_exemptions():
    assert AddressGuard(allow_private=True).is_allowed("10.0.0.1")
    guard = AddressGuard.from_config(DownloadConfig(allowed_networks=["127.0.0.1/32"]))
    assert guard.is_allowed("127.0.0.1")
    assert not guard.is_allowed("127.0.0.2")


def test_good_image_and_good_redirect(http_server):
    fetch = fetcher()
    result = fetch.fetch(f"{http_server}/img/red.jpg")
    assert result.data[:2] == b"\xff\xd8"
    redirected = fetch.fetch(f"{http_server}/redirect-good")
    assert redirected.data == result.data
    assert redirected.final_url.endswith("/img/red.jpg")


def test_loopback_refused_with_guard_on(http_server):
    assert reason_of(fetcher(allowed_networks=[]), f"{http_server}/img/red.jpg") == "private_address"


def test_localhost_name_is_resolved_then_refused(http_server):
    port = http_server.rsplit(":", 1)[1]
    assert reason_of(fetcher(allowed_networks=[]), f"http://localhost:{port}/img/red.jpg") == "private_address"


def test_redirect_to_private_address_refused(http_server):
    assert reason_of(fetcher(), f"{http_server}/redirect-private") == "private_address"


@pytest.mark.parametrize(
    "route, reason",
    [
        ("/status/404", "http_404"),
        ("/status/500", "http_500"),
        ("/status/403", "http_403"),
        ("/loop", "redirect_loop"),
        ("/loop-a", "redirect_loop"),
        ("/big", "too_large"),
        ("/big-chunked", "too_large"),
        ("/optout", "opt_out"),
        ("/no-such-route", "http_404"),
    ],
)
def test_bad_answers_have_reasons(http_server, route, reason):
    assert reason_of(fetcher(), f"{http_server}{route}") == reason


def test_opt_out_for_another_agent_is_ignored(http_server):
    assert fetcher().fetch(f"{http_server}/optout-other-agent").data[:2] == b"\xff\xd8"


def test_slow_server_times_out(http_server):
    assert reason_of(fetcher(timeout_s=0.5), f"{http_server}/slow?t=slow") == "timeout"
    assert BadInputHandler.requests["slow"] == 1  # a timeout is not retried by default


def cut_after(token: str) -> int:
    """Bytes the server had written when the client hung up (it notices at its next write)."""
    for _ in range(100):
        if token in BadInputHandler.cut_after:
            return BadInputHandler.cut_after[token]
        time.sleep(0.05)
    raise AssertionError(f"the server never saw the client of {token} hang up")


def test_trickling_server_hits_the_whole_request_deadline(http_server):
    # Each byte arrives well inside the socket timeout; only a whole-request deadline stops it.
    # At one byte per 0.1 s a 1 s deadline cuts the 40-byte body at about byte 10.
    assert reason_of(fetcher(timeout_s=1.0), f"{http_server}/trickle?t=trickle") == "timeout"
    assert cut_after("trickle") < 20


def test_deadline_covers_the_status_line_and_headers(http_server):
    # 250 bytes of status line and headers at one per 0.1 s: cut at about byte 10, not 250.
    assert reason_of(fetcher(timeout_s=1.0), f"{http_server}/trickle-headers?t=head") == "timeout"
    assert cut_after("head") < 20


@pytest.mark.parametrize("route", ["/slow", "/trickle", "/trickle-headers"])
def test_every_timeout_after_connecting_reads_the_same(http_server, route):
    """Which check notices the deadline first is a race; a rebuild's rejects must not differ."""
    with pytest.raises(FetchError) as caught:
        fetcher(timeout_s=0.5).fetch(f"{http_server}{route}")
    assert (caught.value.reason, caught.value.detail) == ("timeout", ANSWER_TIMEOUT)


@pytest.mark.parametrize("scheme", ["file", "ftp", "javascript", "data"])
def test_redirect_to_another_scheme_is_a_bad_url(http_server, scheme):
    assert reason_of(fetcher(), f"{http_server}/to-scheme/{scheme}") == "bad_url"


def test_credentials_in_the_url_are_sent(http_server):
    host = http_server.removeprefix("http://")
    assert fetcher().fetch(f"http://user:secret@{host}/auth").data[:2] == b"\xff\xd8"


def test_non_ascii_urls_are_encoded(http_server):
    assert fetcher().fetch(f"{http_server}/img/über größe.jpg").data[:2] == b"\xff\xd8"


def test_retries_on_5xx(http_server):
    assert reason_of(fetcher(retries=2, backoff_s=0.05), f"{http_server}/status/503?t=503") == "http_503"
    assert BadInputHandler.requests["503"] == 3  # the request and two retries


def test_no_retry_on_404(http_server):
    assert reason_of(fetcher(retries=3, backoff_s=0.05), f"{http_server}/status/404?t=404") == "http_404"
    assert BadInputHandler.requests["404"] == 1


def test_connection_refused(http_server):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert reason_of(fetcher(), f"http://127.0.0.1:{free_port}/x.jpg") == "connection_error"


def test_local_files(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8data")
    assert fetcher().fetch(str(image)).data == b"\xff\xd8data"
    assert fetcher().fetch(image.as_uri()).data == b"\xff\xd8data"
    assert reason_of(fetcher(), str(tmp_path / "missing.jpg")) == "not_found"
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 300_000)
    assert reason_of(fetcher(), str(big)) == "too_large"


@pytest.mark.parametrize("url", ["ftp://10.0.0.1/x.jpg", "sftp://10.0.0.1/x.jpg", "gopher://10.0.0.1/"])
def test_protocols_that_would_bypass_the_guard_are_refused(url):
    assert reason_of(fetcher(), url) == "bad_url"


def test_memory_filesystem():
    import fsspec

    with fsspec.open("memory://images/a.jpg", "wb") as handle:
        handle.write(b"abc")
    assert fetcher().fetch("memory://images/a.jpg").data == b"abc"


@pytest.mark.parametrize(
    "headers",
    [[], ["noai"], ["NoAI"], ["noindex, nofollow"], ["nofollow"], ["mmae: noai"], ["otherbot: noai"],
     ["otherbot: noai", "noimageai"], ["mmae: nofollow"], ["all"], ["MMAE:noimageindex"]],
)
def test_opt_out_agrees_with_img2dataset(headers):
    from email.message import Message

    from img2dataset.downloader import is_disallowed
    from mmae.pipelines.builder.fetch import opt_out

    directives = {"noai", "noimageai", "noindex", "noimageindex"}
    message = Message()
    for value in headers:
        message["X-Robots-Tag"] = value
    assert opt_out(headers, "mmae", directives) == is_disallowed(message, "mmae", directives)


def test_https_goes_through_the_guard(http_server):
    port = http_server.rsplit(":", 1)[1]
    assert reason_of(fetcher(allowed_networks=[]), f"https://127.0.0.1:{port}/img/red.jpg") == "private_address"


def test_connections_are_kept_alive(http_server):
    fetch = fetcher()
    for _ in range(10):
        assert fetch.fetch(f"{http_server}/img/red.jpg?t=alive").data[:2] == b"\xff\xd8"
        with pytest.raises(FetchError):  # a small error page is read, the connection kept
            fetch.fetch(f"{http_server}/status/404?t=alive")
    assert BadInputHandler.requests["alive"] == 20 and len(BadInputHandler.connections["alive"]) == 1


def test_a_kept_connection_the_server_closed_is_replaced(http_server):
    # The server answers keep-alive, then closes the connection when the next request arrives:
    # that request goes once more on a new connection instead of becoming a connection_error.
    fetch = fetcher()
    assert fetch.fetch(f"{http_server}/keep-then-hang-up/red.jpg?t=stale").data[:2] == b"\xff\xd8"
    assert fetch.fetch(f"{http_server}/img/blue.jpg?t=stale").data[:2] == b"\xff\xd8"
    assert BadInputHandler.hung_up["stale"] == 1
    assert BadInputHandler.requests["stale"] == 3 and len(BadInputHandler.connections["stale"]) == 2


@pytest.fixture(scope="module")
def https_server():
    """A TLS server on 127.0.0.1 with a certificate from a throw-away CA; yields (url, CA)."""
    import ssl
    import threading

    import trustme
    from tests.conftest import _Server

    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    server = _Server(("127.0.0.1", 0), BadInputHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", authority
    server.shutdown()
    server.server_close()


def test_https_checks_the_certificate(http_server, https_server):
    url, authority = https_server
    trusting = fetcher()
    authority.configure_trust(trusting.pool.tls)
    for _ in range(3):
        assert trusting.fetch(f"{url}/img/green.jpg?t=tls").data[:2] == b"\xff\xd8"
    assert len(BadInputHandler.connections["tls"]) == 1  # kept alive under TLS too
    with pytest.raises(FetchError) as caught:
        fetcher().fetch(f"{url}/img/green.jpg")  # the system's CAs do not know this one
    assert caught.value.reason == "connection_error" and "CERTIFICATE_VERIFY_FAILED" in caught.value.detail


def test_a_hanging_dns_lookup_ends_at_the_deadline(monkeypatch):
    import socket
    import threading

    release, asked = threading.Event(), []
    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        if host == "hangs.example":
            asked.append(host)
            release.wait(10)
            raise socket.gaierror("released")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    fetch = fetcher(timeout_s=0.5)
    try:
        for _ in range(3):
            with pytest.raises(FetchError) as caught:
                fetch.fetch("http://hangs.example/a.jpg")
            assert caught.value.reason == "timeout" and "resolving" in caught.value.detail
        assert not release.is_set() and asked == ["hangs.example"]  # one lookup, still hanging
    finally:
        release.set()


@pytest.mark.parametrize("scheme", sorted(__import__("mmae.pipelines.builder.schemes", fromlist=["x"]).SCHEMES))
def test_every_scheme_is_judged_and_routed_by_the_one_table(scheme, tmp_path):
    """The source's policy and the fetcher route by `schemes.SCHEMES`: a scheme a source may
    name is never an `unsupported scheme` when it is fetched (oss://, r2://... once were)."""
    from mmae.pipelines.builder.connections import FetchError
    from mmae.pipelines.builder.fetch import Fetcher
    from mmae.pipelines.builder.records import RowProblem
    from mmae.pipelines.builder.schemes import family_of
    from mmae.pipelines.builder.sources import SourceFile, resolve_url
    from mmae.schemas.config import DownloadConfig, SourceConfig

    source_file = SourceFile(path=str(tmp_path / "x.jsonl"), relative="x.jsonl", format="jsonl")
    url = f"{scheme}://127.0.0.1:9/no/such/file.jpg" if family_of(scheme) == "http" else f"{scheme}://bucket/a.jpg"
    closed = SourceConfig(name="s", kind="image", path="x.jsonl")
    opened = SourceConfig(name="s", kind="image", path="x.jsonl", allow_object_stores=True, allow_local_files=True)
    if family_of(scheme) == "http":
        assert resolve_url(url, closed, source_file) == url
    else:
        with pytest.raises(RowProblem) as refused:
            resolve_url(url, closed, source_file)
        assert refused.value.reason == "url_not_allowed"
    resolved = resolve_url(url, opened, source_file)
    fetcher = Fetcher(DownloadConfig(timeout_s=2, retries=0, allow_private_addresses=True))
    with pytest.raises(FetchError) as failure:
        fetcher.fetch(resolved)
    assert "unsupported scheme" not in failure.value.detail


def test_a_scheme_outside_the_table_is_bad_url_on_both_sides(tmp_path):
    from mmae.pipelines.builder.connections import FetchError
    from mmae.pipelines.builder.fetch import Fetcher
    from mmae.pipelines.builder.records import RowProblem
    from mmae.pipelines.builder.sources import SourceFile, resolve_url
    from mmae.schemas.config import DownloadConfig, SourceConfig

    source_file = SourceFile(path=str(tmp_path / "x.jsonl"), relative="x.jsonl", format="jsonl")
    opened = SourceConfig(name="s", kind="image", path="x.jsonl", allow_object_stores=True, allow_local_files=True)
    with pytest.raises(RowProblem, match="unsupported scheme 'ftp'"):
        resolve_url("ftp://host/a.jpg", opened, source_file)
    with pytest.raises(FetchError, match="unsupported scheme 'ftp'"):
        Fetcher(DownloadConfig()).fetch("ftp://host/a.jpg")
