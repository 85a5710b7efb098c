"""Fetching untrusted image URLs: which addresses may be reached, how many bytes, for how long.

LAION URLs are attacker-controlled input. In a cloud deployment any of them can point at the instance
metadata service (`169.254.169.254`) or a private address: server-side request forgery. `fetch`:

- connects only to addresses `AddressPolicy` allows, decided on the IP actually connected to, after
  DNS: we resolve, check each address, then connect to that very address, so a hostname that resolves
  to `127.0.0.1` is refused and a DNS answer cannot change between check and connect. Refused:
  loopback, private, link-local (the metadata service), multicast, unspecified, reserved and any
  other non-global address, IPv4 or IPv6, IPv4 embedded in IPv6 (mapped, 6to4, NAT64) included;
  an operator opens exceptions with CIDRs (`LAION_VQ_DOWNLOAD_ALLOW_NETWORKS`);
- speaks http and https only (no `file://`, `ftp://`);
- follows at most `max_redirects` redirects, each hop checked like the first request;
- refuses a `Content-Length` above `max_bytes` before reading and cuts off a body that grows past it;
- gives up after `deadline` seconds per image in all, on top of the per-socket-operation `timeout`,
  so a server that drips a byte a second cannot hold a download thread for hours;
- takes the bytes it reads from a shard's `ByteBudget`, so a shard of huge bodies holds bounded memory;
- honours `X-Robots-Tag` opt-outs on the final response, as img2dataset does.

Every refusal is a `FetchError` whose message starts with a reason a person recognises
(`blocked address 10.0.0.5 (private)`, `too large: …`, `deadline: …`); `reasons.normalise` maps
them, and img2dataset's own messages, to the short labels the UI counts. No img2dataset here.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import itertools
import math
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote, urljoin, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: img2dataset's own User-Agent, so servers see the same crawler (and its opt-out token) as before.
BASE_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
#: img2dataset's message for an X-Robots-Tag opt-out, kept so counts stay comparable with its logs.
ROBOTS_MESSAGE = "Use of image disallowed by X-Robots-Tag directive"

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: Checked in this order, so an address is named by its most specific rule (127.0.0.1 is "loopback",
#: though Python also calls it private).
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_RULES = (
    ("loopback", lambda a: a.is_loopback),
    ("unspecified", lambda a: a.is_unspecified),
    ("link-local", lambda a: a.is_link_local),
    ("multicast", lambda a: a.is_multicast),
    ("broadcast", lambda a: a == _BROADCAST),
    ("reserved", lambda a: a.is_reserved),
    ("site-local", lambda a: getattr(a, "is_site_local", False)),  # fec0::/10: deprecated, still private
    ("private", lambda a: a.is_private),
    ("not globally routable", lambda a: not a.is_global),
)


class FetchError(Exception):
    """A URL that was not (completely) fetched; the message starts with the reason."""


def parse_networks(text: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """`"127.0.0.1/32, ::1"` (or a list of CIDRs) → networks; a bad entry is a clear error."""
    items = text.split(",") if isinstance(text, str) else list(text)
    networks = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as err:
            raise ValueError(f"not a CIDR network: {item!r} ({err})") from err
    return tuple(networks)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, Teredo client), if any: a request
    to it reaches that IPv4 host, so the IPv4 rules apply."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a download may connect to: global unicast only, plus the `allow` networks."""

    allow: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: str | Iterable[str]) -> AddressPolicy:
        return cls(parse_networks(cidrs))

    def _allowed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.allow)

    def blocked_reason(self, address: IPAddress) -> str | None:
        """Why `address` may not be connected to (the rule's name), or None when it may."""
        if self._allowed(address):
            return None
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            assert isinstance(address, ipaddress.IPv6Address)  # only an IPv6 address embeds an IPv4 one
            inner = None if self._allowed(embedded) else self._rule(embedded)
            if inner is not None:
                return f"{inner}, IPv4 {embedded} embedded in IPv6"
            if address.ipv4_mapped is not None or address in _NAT64:
                return None  # mapped and NAT64 addresses reach exactly their IPv4 host, which passed
        return self._rule(address)

    @staticmethod
    def _rule(address: IPAddress) -> str | None:
        return next((name for name, test in _RULES if test(address)), None)


@dataclass(frozen=True)
class FetchLimits:
    """Per-image limits: seconds per socket operation, seconds in all, bytes, redirect hops, opt-outs."""

    timeout: float = 10.0
    deadline: float = 30.0
    max_bytes: int = 20_000_000
    max_redirects: int = 3
    policy: AddressPolicy = field(default_factory=AddressPolicy)
    user_agent_token: str | None = "img2dataset"
    disallowed_directives: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.deadline <= 0:
            raise ValueError(f"timeout and deadline must be > 0 seconds, got {self.timeout} and {self.deadline}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")

    @property
    def user_agent(self) -> str:
        if not self.user_agent_token:
            return BASE_USER_AGENT
        return f"{BASE_USER_AGENT} (compatible; {self.user_agent_token}; +https://github.com/rom1504/img2dataset)"


# --------------------------------------------------------------------------- sockets with a deadline


# The mixin only ever sits before a socket class in the MRO; type-check it as one (at runtime it is a plain mixin).
if TYPE_CHECKING:
    _SocketBase = socket.socket
else:
    _SocketBase = object


class _DeadlineMixin(_SocketBase):
    """Every receive and send first shortens the socket timeout to what is left of the deadline.

    http.client reads a header line or a body with many `recv` calls; a per-call timeout alone lets a
    server that sends one byte per call hold us forever. Checking the deadline on each call bounds it.
    """

    deadline: float = math.inf
    io_timeout: float | None = None

    def _arm(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self.settimeout(remaining if self.io_timeout is None else min(self.io_timeout, remaining))

    def recv(self, *args, **kwargs):
        self._arm()
        return super().recv(*args, **kwargs)

    def recv_into(self, *args, **kwargs):
        self._arm()
        return super().recv_into(*args, **kwargs)

    def sendall(self, *args, **kwargs):
        self._arm()
        return super().sendall(*args, **kwargs)


class _DeadlineSocket(_DeadlineMixin, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    pass


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """urllib's default (certificates verified), creating sockets that keep the deadline."""
    context = ssl.create_default_context()
    context.sslsocket_class = _DeadlineSSLSocket
    return context


def _connect(host: str, port: int, limits: FetchLimits, deadline: float) -> socket.socket:
    """Resolve `host`, keep the addresses the policy allows, connect to the first that answers."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise FetchError(f"dns failure: {host}: {err}") from err
    blocked: str | None = None
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        rule = limits.policy.blocked_reason(address)
        if rule is not None:
            blocked = blocked or f"blocked address {address} ({rule})"
            continue
        sock = _DeadlineSocket(family, kind, proto)
        sock.deadline, sock.io_timeout = deadline, limits.timeout
        try:
            sock._arm()
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    if last_error is not None:
        raise last_error
    raise FetchError(blocked or f"dns failure: {host}: no address")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, limits: FetchLimits, deadline: float) -> None:
        super().__init__(host, port, timeout=limits.timeout)
        self._limits, self._deadline = limits, deadline

    def connect(self) -> None:
        self.sock = _connect(self.host, self.port, self._limits, self._deadline)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, limits: FetchLimits, deadline: float) -> None:
        super().__init__(host, port, timeout=limits.timeout, context=_tls_context())
        self._limits, self._deadline = limits, deadline

    def connect(self) -> None:
        raw = _connect(self.host, self.port, self._limits, self._deadline)
        try:
            sock = _tls_context().wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        assert isinstance(sock, _DeadlineSSLSocket)  # _tls_context() makes its sockets of that class
        sock.deadline, sock.io_timeout = self._deadline, self._limits.timeout
        self.sock = sock


# --------------------------------------------------------------------------- memory


class ByteBudget:
    """Bytes of image bodies one shard may hold at once (downloaded, not yet resized and written).

    img2dataset keeps up to 2 × threads bodies in flight; with `max_bytes` each that is gigabytes per
    shard for a hostile shard. Readers take bytes chunk by chunk and wait (until their deadline) while
    the shard is over budget; whoever consumes a body gives its bytes back. The oldest reader may
    overdraw by up to `overdraft` bytes (one `max_bytes` body), so readers that each hold part of a body
    cannot starve one another: a shard holds at most `capacity + overdraft` bytes of bodies.
    """

    def __init__(self, capacity: int, overdraft: int = 0) -> None:
        if capacity < 1 or overdraft < 0:
            raise ValueError(f"capacity must be >= 1 and overdraft >= 0 bytes, got {capacity} and {overdraft}")
        self.capacity = capacity
        self.overdraft = overdraft
        self.used = 0
        self.peak = 0
        self._changed = threading.Condition()
        self._tickets = itertools.count()
        self._readers: set[int] = set()

    def enter(self) -> int:
        """A ticket for a reader about to read a body; `leave` it when the read ends."""
        with self._changed:
            ticket = next(self._tickets)
            self._readers.add(ticket)
            return ticket

    def leave(self, ticket: int) -> None:
        with self._changed:
            self._readers.discard(ticket)
            self._changed.notify_all()

    def take(self, n: int, deadline: float, ticket: int) -> None:
        with self._changed:
            while self.used + n > self.capacity and (
                ticket != min(self._readers, default=ticket) or self.used + n > self.capacity + self.overdraft
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FetchError(f"deadline: waited for memory ({self.used} of {self.capacity} bytes held)")
                self._changed.wait(remaining)
            self.used += n
            self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        with self._changed:
            self.used -= n
            self._changed.notify_all()


# --------------------------------------------------------------------------- fetching


def is_disallowed(values: Iterable[str], user_agent_token: str | None, directives: frozenset[str]) -> bool:
    """True if an `X-Robots-Tag` value opts out of `directives`, for everyone or for our token
    (img2dataset's rule: `noai`, or `img2dataset: noai`)."""
    directives = frozenset(d.lower() for d in directives)
    user_agent_token = user_agent_token.lower() if user_agent_token else None
    for value in values:
        parts = value.split(":", 1)
        token = parts[0].strip().lower() if len(parts) == 2 else None
        listed = parts[-1]
        if token is not None and token != user_agent_token:
            continue
        if any(d.strip().lower() in directives for d in listed.split(",")):
            return True
    return False


def _read_body(response: http.client.HTTPResponse, max_bytes: int, budget: ByteBudget | None, deadline: float) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise FetchError(f"too large: Content-Length {int(length)} > {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    ticket = budget.enter() if budget is not None else 0
    try:
        while chunk := response.read1(65536):  # one receive at most: the deadline is checked in between
            total += len(chunk)
            if total > max_bytes:
                raise FetchError(f"too large: body exceeds {max_bytes} bytes")
            if budget is not None:
                budget.take(len(chunk), deadline, ticket)
            chunks.append(chunk)
        if response.length:  # the server closed before sending what Content-Length promised
            raise FetchError(f"truncated body: got {total} bytes, {response.length} more were promised")
    except BaseException:
        if budget is not None:
            budget.give(sum(map(len, chunks)))
        raise
    finally:
        if budget is not None:
            budget.leave(ticket)
    return b"".join(chunks)


#: Characters left as they are when a URL's path and query are percent-encoded the way browsers do.
_URL_SAFE = "/?&=:;@!$'()*+,~%#[]-._"


def _request_parts(url: str) -> tuple[str, str, int, str]:
    """(scheme, ASCII host, port, request target) of `url`; anything malformed is a FetchError.

    Browsers send a URL with spaces or non-ASCII characters percent-encoded (UTF-8) and an
    internationalised host name in IDNA; LAION holds many such URLs, so we do the same instead of
    failing them as urllib does.
    """
    try:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https"):
            raise FetchError(f"not http(s): unsupported scheme {parts.scheme or '(none)'!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if not parts.hostname:
            raise FetchError("invalid url: no host")
        host = parts.hostname if parts.hostname.isascii() else parts.hostname.encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as err:
        raise FetchError(f"invalid url: {str(err)[:100]}") from err
    target = quote(parts.path or "/", safe=_URL_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_URL_SAFE)
    return parts.scheme, host, port, target


def _fetch_once(
    url: str, limits: FetchLimits, deadline: float, budget: ByteBudget | None
) -> tuple[bytes | None, str | None]:
    """One request: (body, None), or (None, next URL) for a redirect."""
    scheme, host, port, target = _request_parts(url)
    connection_class = _GuardedHTTPSConnection if scheme == "https" else _GuardedHTTPConnection
    connection = connection_class(host, port, limits, deadline)
    try:
        connection.request("GET", target, headers={"User-Agent": limits.user_agent, "Connection": "close"})
        response = connection.getresponse()
        location = response.getheader("Location")
        if response.status in _REDIRECTS and location:
            return None, urljoin(url, location.strip())
        if not 200 <= response.status < 300:
            raise FetchError(f"HTTP Error {response.status}: {response.reason}")
        if limits.disallowed_directives and is_disallowed(
            response.headers.get_all("X-Robots-Tag") or [], limits.user_agent_token, limits.disallowed_directives
        ):
            raise FetchError(ROBOTS_MESSAGE)
        return _read_body(response, limits.max_bytes, budget, deadline), None
    finally:
        connection.close()


def fetch(url: str, limits: FetchLimits, budget: ByteBudget | None = None) -> bytes:
    """The body of `url`, fetched within `limits`; any failure is a FetchError naming its reason.

    With a `budget`, the returned body's bytes stay taken from it: the consumer gives them back.
    """
    deadline = time.monotonic() + limits.deadline
    hops = 0
    try:
        while True:
            body, url_next = _fetch_once(url, limits, deadline, budget)
            if body is not None:
                return body
            hops += 1
            if hops > limits.max_redirects:
                raise FetchError(f"too many redirects: more than {limits.max_redirects}")
            assert url_next is not None  # _fetch_once returns a redirect target whenever it returns no body
            url = url_next
    except FetchError:
        raise
    except TimeoutError as err:
        if time.monotonic() >= deadline:
            raise FetchError(f"deadline: not done after {limits.deadline:g} s") from err
        raise FetchError(f"timeout: no data for {limits.timeout:g} s") from err
    except ConnectionRefusedError as err:
        raise FetchError("connection refused") from err
    except ConnectionResetError as err:
        raise FetchError("connection reset by the server") from err
    except ssl.SSLError as err:
        raise FetchError(f"tls error: {err}") from err
    except http.client.IncompleteRead as err:
        raise FetchError(f"truncated body: {err!r}") from err
    except http.client.RemoteDisconnected as err:
        raise FetchError("connection reset: the server closed the connection without a response") from err
    except http.client.InvalidURL as err:
        raise FetchError(f"invalid url: {str(err)[:100]}") from err
    except http.client.HTTPException as err:
        raise FetchError(f"bad response: {type(err).__name__}: {str(err)[:100]}") from err
    except OSError as err:
        raise FetchError(f"network error: {err}") from err
