"""Fetching image URLs with guards (issue 18): a timeout, a byte cap, and no requests to internal addresses.

:func:`fetch_url` GETs an ``http(s)`` URL and returns its body, or raises :class:`FetchError` naming the URL
and the reason. Under the default :class:`FetchPolicy` (:meth:`FetchPolicy.from_env`):

* **timeouts**: name resolution and the connection get ``timeout`` seconds, every read ``timeout`` seconds,
  and the whole fetch (redirects included) ``total_timeout``, so a silent or slowly dripping server cannot
  hang an encode;
* **a byte cap**: a declared ``Content-Length`` over ``max_bytes`` is refused before the body is read; the
  body is streamed and the fetch stops as soon as it passes the cap;
* **no internal addresses**: the host name is resolved here and every address it resolves to must be public
  (not private, loopback, link-local, shared, reserved, multicast or unspecified; IPv4-mapped IPv6
  addresses by their IPv4 address); the connection goes to the address that was checked, so a second DNS
  answer cannot swap it. Redirects are followed here, at most ``max_redirects``, and every hop is checked
  the same way. Proxy settings (``HTTP(S)_PROXY``) are not used: the check needs the direct connection.

Switches (environment variables, read at each fetch):

* ``TTE_FLASH_ALLOW_PRIVATE_URLS=1``: allow internal addresses (an intranet image server, a local test);
* ``TTE_FLASH_OFFLINE=1``: no URL is fetched (an error naming the URL). When it is unset, ``HF_HUB_OFFLINE=1``
  or ``TRANSFORMERS_OFFLINE=1`` count as offline too; ``TTE_FLASH_OFFLINE=0`` fetches in spite of them;
* ``TTE_FLASH_URL_TIMEOUT`` (seconds, default 10), ``TTE_FLASH_URL_MAX_BYTES`` (default 64 MiB).
"""
from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK_BYTES = 64 * 1024


class FetchError(ValueError):
    """A URL that was not fetched: the message names the URL and the reason."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot fetch {url}: {reason}")
        self.url, self.reason = url, reason


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0  # seconds for resolving + connecting, and for each read
    total_timeout: float = 60.0  # seconds for the whole fetch, redirects included
    max_bytes: int = 64 * 2**20  # largest body accepted
    max_redirects: int = 5  # redirects followed (each hop checked like the first request)
    allow_private: bool = False  # allow private, loopback, link-local ... addresses
    offline: bool = False  # fetch nothing

    @classmethod
    def from_env(cls) -> FetchPolicy:
        """The policy the environment variables of the module docstring set (read now, not at import)."""
        own = os.environ.get("TTE_FLASH_OFFLINE", "").strip()
        if own:
            offline = _flag("TTE_FLASH_OFFLINE")
        else:
            offline = _flag("HF_HUB_OFFLINE") or _flag("TRANSFORMERS_OFFLINE")
        return cls(timeout=_positive("TTE_FLASH_URL_TIMEOUT", cls.timeout, float),
                   max_bytes=_positive("TTE_FLASH_URL_MAX_BYTES", cls.max_bytes, int),
                   allow_private=_flag("TTE_FLASH_ALLOW_PRIVATE_URLS"), offline=offline)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _positive(name: str, default, kind):
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name}={text!r}: expected a positive {kind.__name__}")
    return value


def fetch_url(url: str, policy: FetchPolicy | None = None) -> bytes:
    """The body of ``url`` (http or https) under ``policy`` (default: :meth:`FetchPolicy.from_env`)."""
    policy = policy or FetchPolicy.from_env()
    if policy.offline:
        raise FetchError(url, "URL fetching is off (TTE_FLASH_OFFLINE=1, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE "
                              "without TTE_FLASH_OFFLINE=0); use a local file")
    deadline = time.monotonic() + policy.total_timeout
    current = url
    for _ in range(policy.max_redirects + 1):
        where = url if current == url else f"{url} (redirected to {current})"
        response, connection = _get(current, where, policy, deadline)
        try:
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchError(where, f"HTTP {response.status} redirect without a Location header")
                current = urljoin(current, location)
                continue
            if response.status != 200:
                raise FetchError(where, f"HTTP {response.status} {response.reason}".rstrip())
            return _read_capped(response, connection, where, policy, deadline)
        finally:
            response.close()
            connection.close()
    raise FetchError(url, f"more than {policy.max_redirects} redirects (last to {current})")


def _get(url: str, where: str, policy: FetchPolicy, deadline: float):
    """Send GET ``url`` to a checked address; (response with its headers read, connection)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(where, "only http:// and https:// URLs with a host are fetched")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise FetchError(where, f"bad port ({err})") from None
    address = _checked_address(parts.hostname, port, where, policy, _remaining(deadline, policy.timeout, where))
    timeout = _remaining(deadline, policy.timeout, where)
    if parts.scheme == "https":
        connection = _PinnedHTTPSConnection(parts.hostname, port, address, timeout=timeout,
                                            context=ssl.create_default_context())
    else:
        connection = _PinnedHTTPConnection(parts.hostname, port, address, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", target, headers={"User-Agent": "tte-flash", "Accept": "image/*,*/*;q=0.5",
                                                   "Accept-Encoding": "identity"})
        connection.socket.settimeout(_remaining(deadline, policy.timeout, where))
        return connection.getresponse(), connection
    except FetchError:
        connection.close()
        raise
    except (TimeoutError, socket.timeout):
        connection.close()
        raise FetchError(where, f"timed out (no answer within {policy.timeout:g} s)") from None
    except (OSError, http.client.HTTPException) as err:
        connection.close()
        raise FetchError(where, f"connection failed ({type(err).__name__}: {err or 'no detail'})") from None


def _read_capped(response, connection, where: str, policy: FetchPolicy, deadline: float) -> bytes:
    """The body, streamed, refused as soon as it passes ``policy.max_bytes`` or the deadline."""
    declared = response.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(where, f"too large: Content-Length {int(declared)} bytes is over the cap of "
                                f"{policy.max_bytes} bytes (TTE_FLASH_URL_MAX_BYTES)")
    chunks, size = [], 0
    try:
        while True:
            connection.socket.settimeout(_remaining(deadline, policy.timeout, where))
            chunk = response.read1(CHUNK_BYTES)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > policy.max_bytes:
                raise FetchError(where, f"too large: the body passed the cap of {policy.max_bytes} bytes "
                                        "(TTE_FLASH_URL_MAX_BYTES)")
            chunks.append(chunk)
    except (TimeoutError, socket.timeout):
        raise FetchError(where, f"timed out reading the body (no data within {policy.timeout:g} s, or over "
                                f"{policy.total_timeout:g} s in all; {size} bytes read)") from None
    except (OSError, http.client.HTTPException) as err:
        raise FetchError(where, f"reading the body failed after {size} bytes ({type(err).__name__}: "
                                f"{err or 'no detail'})") from None


def _remaining(deadline: float, timeout: float, where: str) -> float:
    """Seconds the next step may take: ``timeout``, cut to what is left of the whole fetch's deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(where, "timed out (the whole fetch took longer than its total timeout)")
    return min(timeout, left)


def address_problem(address: str) -> str | None:
    """Why a request must not go to ``address`` (an IP address, as text), or None for a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):  # most specific first
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address ({ip})"
    if not ip.is_global:
        return f"a non-public address ({ip})"
    return None


def _checked_address(host: str, port: int, where: str, policy: FetchPolicy, timeout: float) -> str:
    """The address to connect to: ``host`` resolved (within ``timeout``) and, unless ``allow_private``,
    every address it resolves to public."""
    addresses = _resolve(host, port, where, timeout)
    if not policy.allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem is not None:
                raise FetchError(where, f"{host} resolves to {problem}; requests to private, loopback and "
                                        "link-local addresses are refused (TTE_FLASH_ALLOW_PRIVATE_URLS=1 allows "
                                        "them)")
    return addresses[0]


def _resolve(host: str, port: int, where: str, timeout: float) -> list[str]:
    """``host``'s addresses; resolution runs in a daemon thread so that a stuck resolver times out too."""
    result = {}

    def lookup():
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            result["error"] = err
    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise FetchError(where, f"timed out resolving {host} ({timeout:g} s)")
    if "error" in result:
        raise FetchError(where, f"cannot resolve {host} ({result['error']})")
    addresses = list(dict.fromkeys(info[4][0] for info in result["infos"]))
    if not addresses:
        raise FetchError(where, f"{host} resolves to no address")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a checked address; the Host header still names the host. ``socket`` stays set
    after http.client hands a closing connection's socket to its response (read timeouts are set on it)."""

    def __init__(self, host, port, address, **kwargs):
        super().__init__(host, port, **kwargs)
        self._address, self.socket = address, None

    def connect(self):
        self.sock = self.socket = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate is checked against the host name."""

    def __init__(self, host, port, address, *, context, **kwargs):
        super().__init__(host, port, context=context, **kwargs)
        self._address, self._ssl_context, self.socket = address, context, None

    def connect(self):
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self.socket = self._ssl_context.wrap_socket(raw, server_hostname=self.host)
