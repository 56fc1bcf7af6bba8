"""The SSRF guard for webhook URLs: http or https only, no credentials in the URL, and no address a
receiver on the public internet cannot have (loopback, private, link-local, CGNAT, multicast,
reserved, unspecified) unless the operator allows private ones; cloud metadata addresses never.

A URL is checked when a job is submitted (a literal address, the scheme) and again when each delivery
is sent: the name is resolved once, every address it resolves to must pass, and the connection is
pinned to the address that was checked (so a second lookup cannot rebind it elsewhere).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from kiln.errors import InvalidRequest

MAX_URL_CHARS = 2048
CGNAT = ipaddress.ip_network("100.64.0.0/10")
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
"""Cloud instance metadata (AWS, GCP, Azure, Oracle; AWS's IPv6 one): refused even when private
addresses are allowed — no webhook receiver lives there, and credentials do."""

Resolver = Callable[..., list[tuple[Any, ...]]]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _refused(why: str) -> InvalidRequest:
    return InvalidRequest(f"webhook_url is not allowed: {why}.", param="webhook_url")


def address_problem(address: IpAddress, allow_private: bool = False) -> str | None:
    """Why a receiver may not be at `address` (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA:
        return f"{address} is a cloud metadata address"
    if allow_private:
        return None
    for kind, hit in (("loopback", address.is_loopback), ("link-local", address.is_link_local),
                      ("multicast", address.is_multicast), ("unspecified", address.is_unspecified),
                      ("carrier-grade NAT", address in CGNAT), ("private", address.is_private),
                      ("reserved", address.is_reserved)):
        if hit:
            return f"{address} is a {kind} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def _literal(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_url(url: str, allow_private: bool = False) -> httpx.URL:
    """The URL parsed, or InvalidRequest (param `webhook_url`) for a bad scheme, credentials, a
    missing host or a literal address that is not allowed. Names are not resolved here."""
    if len(url) > MAX_URL_CHARS:
        raise _refused(f"longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise _refused("it is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise _refused("only http and https URLs are accepted")
    if not parsed.host:
        raise _refused("it has no host")
    if parsed.userinfo:
        raise _refused("credentials in the URL are not accepted (authenticate by the signature)")
    address = _literal(parsed.host)
    if address is not None:
        problem = address_problem(address, allow_private)
        if problem:
            raise _refused(problem)
    elif not allow_private and (parsed.host == "localhost" or parsed.host.endswith(".localhost")):
        raise _refused("localhost is a loopback address")
    return parsed


@dataclass(frozen=True)
class PinnedTarget:
    """Where to send: the URL with its host replaced by the checked address, the Host header, and
    the TLS server name (so certificates are still checked against the name)."""

    url: httpx.URL
    host_header: str
    address: str
    extensions: dict[str, Any] = field(default_factory=dict)


def pin(url: str, allow_private: bool = False, resolve: Resolver = socket.getaddrinfo) -> PinnedTarget:
    """Check `url`, resolve its host once and pin it: InvalidRequest if any address it resolves to
    is not allowed (a name that resolves to a private address now is refused), OSError if the
    name does not resolve (worth another try later)."""
    parsed = check_url(url, allow_private)
    host = parsed.host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if not addresses:
            raise OSError(f"{host} did not resolve")
    for address in addresses:
        problem = address_problem(address, allow_private)
        if problem:
            raise _refused(problem if literal is not None else f"{host} resolves to {address} ({problem})")
    chosen = addresses[0]
    extensions = {"sni_hostname": host} if parsed.scheme == "https" and literal is None else {}
    return PinnedTarget(
        url=parsed.copy_with(host=str(chosen)),
        host_header=parsed.netloc.decode("ascii"),
        address=str(chosen),
        extensions=extensions,
    )
