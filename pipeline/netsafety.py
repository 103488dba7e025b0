"""Outbound HTTP that refuses private addresses: URL fetching and webhook delivery.

A URL is refused when its host resolves to any loopback, private, link-local,
multicast, reserved or unspecified address. The check runs before every request,
redirects included (each hop is a new request), so a public page that redirects
to ``http://127.0.0.1/`` or ``http://169.254.169.254/`` is refused at that hop.
``fetch_allow_private`` (``MORAG_FETCH_ALLOW_PRIVATE=true``) lifts the check, for
tests and intranets; ``fetch_allow_hosts`` lifts it for the host names it lists only.

What this does not cover: an answer that changes between the check and the
connection (DNS rebinding with a zero TTL). The window is one request long.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pipeline.errors import BadInput

if TYPE_CHECKING:  # httpx is loaded by whoever fetches: routing checks URLs without it
    import httpx

ALLOWED_SCHEMES = ("http", "https")


class UnsafeURL(BadInput):
    """A URL that may not be fetched: its scheme, or an address it resolves to. Never retried."""


def is_public(address: str) -> bool:
    """Whether an IP address is one the open internet routes (not private, loopback, link-local…)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to; a name that does not resolve is an :class:`UnsafeURL`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"cannot resolve {host}: {exc.strerror}") from exc
    return sorted({str(info[4][0]) for info in infos})


def check_url(url: str, *, allow_private: bool = False, allow_hosts: tuple[str, ...] = ()) -> list[str]:
    """Refuse ``url`` unless it is http(s) and, unless allowed, every address of its host is public.
    Returns the addresses it checked (empty when the host is allowed unchecked), for a caller
    that connects itself to connect to those and not to a second DNS answer.

    Parameters:
      allow_private: Allow every private address.
      allow_hosts: Host names (as written in the URL) allowed whatever they resolve to.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a broken IPv6 host, a port that is not a number or out of range
        raise UnsafeURL(f"{url!r} is not a URL: {exc}") from None
    if parts.scheme not in ALLOWED_SCHEMES:
        raise UnsafeURL(f"{url!r}: only http and https URLs are fetched")
    if not parts.hostname:
        raise UnsafeURL(f"{url!r}: no host in the URL")
    if allow_private or parts.hostname.lower() in {h.lower() for h in allow_hosts}:
        return []
    addresses = resolve(parts.hostname, port)
    private = [a for a in addresses if not is_public(a)]
    if private:
        raise UnsafeURL(
            f"{parts.hostname} resolves to a private address ({', '.join(private)}): refused;"
            " set MORAG_FETCH_ALLOW_PRIVATE=true to allow private addresses"
        )
    return addresses


def safe_client(
    *,
    allow_private: bool = False,
    allow_hosts: tuple[str, ...] = (),
    timeout_s: float = 30.0,
    max_redirects: int = 5,
    **kwargs: object,
) -> httpx.Client:
    """An ``httpx.Client`` that checks every request it sends with :func:`check_url`, redirects included."""
    import httpx

    def _check(request: httpx.Request) -> None:
        check_url(str(request.url), allow_private=allow_private, allow_hosts=allow_hosts)

    return httpx.Client(
        timeout=timeout_s,
        follow_redirects=True,
        max_redirects=max_redirects,
        event_hooks={"request": [_check]},
        **kwargs,  # type: ignore[arg-type]
    )
