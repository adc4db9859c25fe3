"""Fetching image URLs without becoming an SSRF proxy (no Ray).

Off unless enabled. Each hop (the first URL and every redirect) is vetted the same way:
scheme http(s), no credentials in the URL, host on the allow-list, and *every* address the name
resolves to public (not private, loopback, link-local, multicast, reserved, unspecified, shared
CGNAT or a cloud-metadata address; IPv4 embedded in IPv6 is unwrapped). The request then goes to
the vetted IP itself (Host header and TLS SNI/certificate check keep the name), so a second DNS
answer cannot swap in an internal address (DNS rebinding). Proxies from the environment are
ignored for the same reason. Size, total time and redirect count are bounded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import httpx

from serve_app.errors import ServeAppError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Always refused, even inside allowed_networks.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",   # AWS, GCP, Azure, OpenStack...
    "169.254.170.2",     # AWS ECS task metadata
    "100.100.100.200",   # Alibaba Cloud
    "192.0.0.192",       # Oracle Cloud
    "fd00:ec2::254",     # AWS IPv6
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class FetchPolicy:
    """What may be fetched. ``allowed_hosts``: exact names, ``*.suffix`` (subdomains) or ``*``.
    ``allowed_networks``: CIDRs exempted from the non-public refusal (e.g. tests on 127.0.0.0/8)."""

    enabled: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    timeout_s: float = 5.0
    max_redirects: int = 3
    max_bytes: int = 20 * 1024 * 1024
    user_agent: str = "serve_app-image-fetcher/1"


def _refused(msg: str) -> ServeAppError:
    return ServeAppError(msg, 400, "url_not_allowed")


def host_allowed(host: str, allowed_hosts: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed_hosts:
        entry = entry.lower().strip().rstrip(".")
        if entry == "*" or entry == host:
            return True
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
    return False


def _unwrap(ip: IPAddress) -> IPAddress:
    """IPv4 hidden in IPv6 (mapped, NAT64, 6to4, Teredo) is judged as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return ip


def address_refusal(ip: IPAddress, allowed_networks: tuple[str, ...] = ()) -> str | None:
    """Why ``ip`` may not be fetched from, or None when it may."""
    inner = _unwrap(ip)
    if ip in METADATA_ADDRESSES or inner in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for net in allowed_networks:
        network = ipaddress.ip_network(net, strict=False)
        if ip in network or inner in network:
            return None
    for candidate in {ip, inner}:
        for attr, why in (("is_loopback", "a loopback address"), ("is_link_local", "a link-local address"),
                          ("is_multicast", "a multicast address"), ("is_unspecified", "an unspecified address"),
                          ("is_reserved", "a reserved address"), ("is_private", "a private address")):
            if getattr(candidate, attr):
                return why
        if not candidate.is_global:
            return "a non-public address"
    return None


async def resolve_public(host: str, port: int, policy: FetchPolicy) -> IPAddress:
    """Resolve ``host`` and return an address, refusing if ANY answer is non-public."""
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ServeAppError(f"could not resolve image host {host!r}: {e.strerror}", 400,
                                "image_fetch_failed") from None
        addrs = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addrs:
        raise ServeAppError(f"image host {host!r} has no addresses", 400, "image_fetch_failed")
    for ip in addrs:
        why = address_refusal(ip, policy.allowed_networks)
        if why:
            raise _refused(f"image host {host!r} resolves to {why} ({ip}); refused")
    return addrs[0]


def vet_url(url: str, policy: FetchPolicy) -> httpx.URL:
    """Scheme, credentials and allow-list checks (before any DNS)."""
    try:
        u = httpx.URL(url)
    except Exception as e:
        raise ServeAppError(f"malformed image URL: {e}", 400, "invalid_image_url") from None
    if u.scheme not in ("http", "https"):
        raise _refused(f"URL scheme {u.scheme!r} is not allowed for images")
    if u.userinfo:
        raise _refused("credentials in image URLs are not allowed")
    if not u.host:
        raise ServeAppError("image URL has no host", 400, "invalid_image_url")
    ascii_host = u.raw_host.decode("ascii")
    if not (host_allowed(u.host, policy.allowed_hosts) or host_allowed(ascii_host, policy.allowed_hosts)):
        raise _refused(f"image host {u.host!r} is not on this server's allow-list")
    return u


async def fetch_image(url: str, policy: FetchPolicy, transport: httpx.AsyncBaseTransport | None = None
                      ) -> bytes:
    """GET an image within the policy; returns the body bytes (decoding is the caller's job)."""
    if not policy.enabled:
        raise _refused("fetching image URLs is disabled on this server; send a data: URL or upload "
                       "with POST /v1/images")
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch(url, policy, transport)
    except TimeoutError:
        raise ServeAppError(f"fetching the image timed out after {policy.timeout_s:g} s", 400,
                            "image_fetch_failed") from None


async def _fetch(url: str, policy: FetchPolicy, transport: httpx.AsyncBaseTransport | None) -> bytes:
    # One client per fetch: pooled connections are keyed by IP, and must not be shared across names.
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, transport=transport,
                                 timeout=policy.timeout_s) as client:
        for _hop in range(policy.max_redirects + 1):
            u = vet_url(url, policy)
            port = u.port or (443 if u.scheme == "https" else 80)
            host = u.raw_host.decode("ascii")  # IDNA (punycode) form for DNS and TLS
            ip = await resolve_public(host, port, policy)
            pinned = u.copy_with(host=str(ip))
            headers = {"Host": u.netloc.decode("ascii"), "User-Agent": policy.user_agent,
                       "Accept": "image/*", "Accept-Encoding": "identity"}
            extensions = {"sni_hostname": host} if u.scheme == "https" else {}
            try:
                async with client.stream("GET", pinned, headers=headers, extensions=extensions) as r:
                    if r.status_code in _REDIRECTS:
                        location = r.headers.get("location")
                        if not location:
                            raise ServeAppError(f"image URL redirected (HTTP {r.status_code}) without a "
                                                "Location", 400, "image_fetch_failed")
                        url = str(u.join(location))
                        continue
                    if r.status_code != 200:
                        raise ServeAppError(f"fetching the image failed: HTTP {r.status_code}", 400,
                                            "image_fetch_failed")
                    return await _read_limited(r, policy.max_bytes)
            except httpx.HTTPError as e:
                raise ServeAppError(f"fetching the image failed: {type(e).__name__}: {e}", 400,
                                    "image_fetch_failed") from None
        raise ServeAppError(f"image URL redirected more than {policy.max_redirects} times", 400,
                            "image_fetch_failed")


async def _read_limited(r: httpx.Response, max_bytes: int) -> bytes:
    declared = r.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ServeAppError(f"image is too large: {declared} bytes, limit {max_bytes}", 413,
                            "image_too_large")
    if r.is_stream_consumed:  # already in memory (e.g. a mock transport)
        body = r.content
        if len(body) > max_bytes:
            raise ServeAppError(f"image is too large: over {max_bytes} bytes", 413, "image_too_large")
        return body
    buf = bytearray()
    async for chunk in r.aiter_raw():  # no transparent gunzip: that would be a bomb vector
        buf += chunk
        if len(buf) > max_bytes:
            raise ServeAppError(f"image is too large: over {max_bytes} bytes", 413, "image_too_large")
    return bytes(buf)
