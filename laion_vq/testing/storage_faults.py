"""An S3 endpoint that misbehaves on purpose: a loopback HTTP proxy in front of moto's server
(`laion_vq.testing.aws.moto_aws`) that answers chosen requests with the faults a long backfill meets on a real
object store, and forwards the rest untouched.

Faults (`FAULTS`): `internal_error` (HTTP 500, S3's `InternalError` XML body), `slow_down` (HTTP 503, S3's
`SlowDown` body), `close` (the socket closed without an answer), `reset` (a TCP RST: SO_LINGER 0, then close) and
`stall` (no answer for `stall_s`, longer than the client's read timeout, then close). A fault hits reads
(GET/HEAD), writes (PUT/POST/DELETE) or both, for "the next N matching requests" or with a seeded probability,
and the schedule can change while the proxy runs (`inject`, `clear`). A faulted request never reaches moto, so a
retried write is never applied twice. The proxy counts what it injected and what it forwarded: a test asserts
the faults really happened, and cannot pass by injecting nothing.

HTTP/1.1 keep-alive both ways; a request body is read whole (Content-Length, or decoded from chunked transfer
encoding; `Expect: 100-continue` answered), so s3fs/aiobotocore and boto3 PUTs and multipart uploads pass.
Bounded: loopback only, at most `max_connections` client connections at once, an idle keep-alive connection is
closed after `idle_timeout_s`, bodies above `max_body_bytes` are refused, stalls end when the proxy stops, and
leaving the context stops the server and closes every connection.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import random
import socket
import socketserver
import struct
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

Fault = Literal["internal_error", "slow_down", "close", "reset", "stall"]
Target = Literal["read", "write", "any"]
FAULTS: tuple[Fault, ...] = ("internal_error", "slow_down", "close", "reset", "stall")

READ_METHODS = frozenset({"GET", "HEAD"})
WRITE_METHODS = frozenset({"PUT", "POST", "DELETE"})
#: headers that describe one hop, not the request: never forwarded as they came
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
)
_ERRORS: dict[str, tuple[int, str, str]] = {
    "internal_error": (500, "InternalError", "We encountered an internal error. Please try again."),
    "slow_down": (503, "SlowDown", "Please reduce your request rate."),
}


def s3_error_body(code: str, message: str, resource: str) -> bytes:
    """The XML body S3 sends with an error status (what botocore parses the error code from)."""
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
        f"<RequestId>{request_id}</RequestId><HostId>laion-vq-fault-proxy</HostId></Error>"
    ).encode()


@dataclass
class Rule:
    """One scheduled fault: `kind` on requests matching `on` (and `path_contains`, when given), for the next
    `times` of them, or each with `probability` (a `seed`ed draw, so a run is repeatable)."""

    kind: Fault
    on: Target = "any"
    times: int | None = None
    probability: float | None = None
    path_contains: str | None = None
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"unknown fault {self.kind!r}: one of {', '.join(FAULTS)}")
        if (self.times is None) == (self.probability is None):
            raise ValueError("a fault rule takes either `times` or `probability`")
        self._rng = random.Random(self.seed)

    def matches(self, method: str, path: str) -> bool:
        if self.on == "read" and method not in READ_METHODS:
            return False
        if self.on == "write" and method not in WRITE_METHODS:
            return False
        return self.path_contains is None or self.path_contains in path

    def fire(self) -> bool:
        """Whether this matching request gets the fault (uses up one of `times`)."""
        if self.times is not None:
            if self.times <= 0:
                return False
            self.times -= 1
            return True
        assert self.probability is not None
        return self._rng.random() < self.probability


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: StorageFaultProxy


class StorageFaultProxy:
    """The proxy; a context manager. `url` is what to point AWS clients at (`AWS_ENDPOINT_URL`)."""

    def __init__(
        self,
        upstream: str,
        stall_s: float = 5.0,
        max_connections: int = 64,
        idle_timeout_s: float = 30.0,
        max_body_bytes: int = 512 << 20,
    ) -> None:
        target = urlsplit(upstream)
        if target.scheme != "http" or target.hostname is None or target.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (target.hostname, target.port)
        self.stall_s = stall_s
        self.idle_timeout_s = idle_timeout_s
        self.max_body_bytes = max_body_bytes
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        #: faults answered, by (fault, method)
        self.injected: Counter[tuple[str, str]] = Counter()
        #: requests passed on to the upstream, by method
        self.forwarded: Counter[str] = Counter()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- schedule --------------------------------------------------------------------------------------------

    def inject(
        self,
        kind: Fault,
        on: Target = "any",
        times: int | None = None,
        probability: float | None = None,
        path_contains: str | None = None,
        seed: int = 0,
    ) -> Rule:
        """Add a fault to the schedule (rules are tried in the order added; the first that fires answers)."""
        rule = Rule(kind, on, times, probability, path_contains, seed)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Forward everything from now on."""
        with self._lock:
            self._rules.clear()

    def injected_count(self, kind: Fault | None = None, on: Target = "any") -> int:
        """Faults injected, of one kind (None: all) on reads, writes or any request."""
        methods = {"read": READ_METHODS, "write": WRITE_METHODS, "any": READ_METHODS | WRITE_METHODS}[on]
        with self._lock:
            return sum(n for (k, m), n in self.injected.items() if (kind is None or k == kind) and m in methods)

    def reset_counts(self) -> None:
        with self._lock:
            self.injected.clear()
            self.forwarded.clear()

    def _choose(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path) and rule.fire():
                    self.injected[(rule.kind, method)] += 1
                    return rule.kind
            self.forwarded[method] += 1
            return None

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "the proxy is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> StorageFaultProxy:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end stalls and close every open connection."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> StorageFaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    """One client connection (keep-alive: many requests), with its own keep-alive connection upstream."""

    protocol_version = "HTTP/1.1"
    server: _Server
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the counts say what happened

    def setup(self) -> None:
        proxy = self.server.proxy
        self._slot = proxy._slots.acquire(timeout=proxy.idle_timeout_s)
        super().setup()
        self.connection.settimeout(proxy.idle_timeout_s)
        with proxy._lock:
            proxy._sockets.add(self.connection)
        if not self._slot:  # too many connections: refuse this one
            self.close_connection = True

    def handle(self) -> None:
        if self._slot:
            super().handle()

    def finish(self) -> None:
        proxy = self.server.proxy
        with proxy._lock:
            proxy._sockets.discard(self.connection)
        if self._upstream is not None:
            self._upstream.close()
        with contextlib.suppress(OSError):
            super().finish()
        if self._slot:
            proxy._slots.release()

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _body(self) -> bytes | None:
        """The request body (chunked transfer encoding decoded); None when it is too large to take."""
        limit = self.server.proxy.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline(1 << 16).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1 << 16) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > limit:
                    return None
                parts.append(self.rfile.read(size))
                self.rfile.readline(1 << 16)  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return None if length > limit else self.rfile.read(length)

    def _serve(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        if body is None:
            self._answer(413, b"", {})
            self.close_connection = True
            return
        fault = proxy._choose(self.command, self.path)
        if fault is None:
            self._forward(body)
        elif fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            resource = self.path.split("?", 1)[0]
            self._answer(status, s3_error_body(code, message, resource), {"Content-Type": "application/xml"})
        elif fault == "stall":
            proxy._stopping.wait(proxy.stall_s)  # past the client's read timeout; over at once when stopping
            self.close_connection = True
        elif fault == "reset":
            # SO_LINGER on with a zero timeout: close() sends RST instead of FIN (ECONNRESET at the client)
            # (closed here: the usual shutdown(SHUT_WR) at the end of a connection would send a FIN first)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the socket closes for real only once its file objects are closed
            self.connection.close()
            self.close_connection = True
        else:  # "close": FIN without a word (the client sees the server disconnect)
            self.close_connection = True

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response_only(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16].upper())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _forward(self, body: bytes) -> None:
        proxy = self.server.proxy
        for attempt in (0, 1):  # a pooled upstream connection moto closed meanwhile: reconnect once
            upstream = self._upstream or http.client.HTTPConnection(*proxy.upstream, timeout=60)
            self._upstream = upstream
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        upstream.putheader(name, value)
                if body or self.command in WRITE_METHODS:
                    upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body or None)
                response = upstream.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, ConnectionError):
                upstream.close()
                self._upstream = None
                if attempt:
                    raise
        headers = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
        self.send_response_only(response.status, response.reason)
        for name, value in headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        # HEAD answers with the object's length and no body; any other answer with the body it carries
        length = headers.get("Content-Length", headers.get("content-length", "0")) if self.command == "HEAD" else None
        self.send_header("Content-Length", length if length is not None else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()
        if response.will_close:
            upstream.close()
            self._upstream = None
