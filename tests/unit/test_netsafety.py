"""Outbound fetches refuse private addresses, at every redirect hop, unless allowed."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import httpx
import pytest

from pipeline.config import Settings
from pipeline.errors import BadInput
from pipeline.netsafety import UnsafeURL, check_url, is_public, safe_client


class _Pages(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        port = self.server.server_address[1]
        if self.path == "/to-localhost":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/page")
            self.end_headers()
            return
        body = b"<html><title>fine</title></html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ],
)
def test_private_loopback_link_local_and_multicast_are_not_public(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "1.1.1.1"])
def test_internet_addresses_are_public(address: str) -> None:
    assert is_public(address)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost:8080/x",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
    ],
)
def test_a_private_url_is_refused_with_the_setting_that_allows_it(url: str) -> None:
    with pytest.raises(UnsafeURL, match="MORAG_FETCH_ALLOW_PRIVATE=true") as refused:
        check_url(url)
    assert isinstance(refused.value, BadInput)  # never retried: it stays private


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.org/x",
        "gopher://h/",
        "http:///nohost",
        "http://[abc/x",
        "http://h:99999/",
    ],
)
def test_other_schemes_and_hostless_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURL):
        check_url(url, allow_private=True)


def test_a_name_that_does_not_resolve_is_refused_clearly() -> None:
    with pytest.raises(UnsafeURL, match="cannot resolve"):
        check_url("http://no-such-host.invalid/")


def test_the_client_fetches_private_pages_only_when_allowed(local_site: str) -> None:
    with safe_client() as client, pytest.raises(UnsafeURL):
        client.get(f"{local_site}/page")
    with safe_client(allow_private=True) as client:
        assert client.get(f"{local_site}/page").status_code == 200


def test_a_redirect_hop_to_a_private_host_is_refused(local_site: str) -> None:
    """The first host is allowed by name; the redirect goes to another name for a private address."""
    with safe_client(allow_hosts=("127.0.0.1",)) as client:
        assert client.get(f"{local_site}/page").status_code == 200
        with pytest.raises(UnsafeURL, match="localhost resolves to a private address"):
            client.get(f"{local_site}/to-localhost")
    with safe_client(allow_private=True) as client:
        assert client.get(f"{local_site}/to-localhost").text.startswith("<html>")


def test_redirects_are_bounded(local_site: str) -> None:
    with safe_client(allow_private=True, max_redirects=0) as client, pytest.raises(httpx.TooManyRedirects):
        client.get(f"{local_site}/to-localhost")


def test_settings_read_the_fetch_policy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORAG_FETCH_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("MORAG_FETCH_ALLOW_HOSTS", "intranet.example, wiki.example")
    settings = Settings()
    assert settings.fetch_allow_private is True
    assert settings.fetch_allow_hosts == ["intranet.example", "wiki.example"]
