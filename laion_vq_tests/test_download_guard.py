"""Unit tests of the download guard's contracts, one function at a time: `AddressPolicy`, `parse_networks`,
`FetchLimits`, `fetch`, `is_disallowed` (guard.py), `reasons.normalise` and `image_checks`.

`test_download_hostile.py` runs the same hostile inputs through a whole img2dataset shard; these are the
fast per-function checks behind it. Real `fetch` calls reach loopback servers only (`HostileServer` on
127.0.0.1, "secret" ones on 127.0.0.2 and ::1 that must never be contacted unless a test allows them);
every non-loopback address (10.0.0.5, 169.254.169.254, …) is tested through `blocked_reason` alone, so a
broken guard can never make these tests connect outside the machine.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import struct
import time
import tracemalloc
from collections.abc import Iterator
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageOps

from laion_vq.download.guard import (
    ROBOTS_MESSAGE,
    AddressPolicy,
    FetchError,
    FetchLimits,
    fetch,
    is_disallowed,
    parse_networks,
)
from laion_vq.download.image_checks import prepare_image, sniff_format
from laion_vq.download.reasons import REASONS, normalise
from laion_vq.testing.hostile_server import HostileServer, _bomb_png, closed_port
from laion_vq.testing.loopback import ipv6_loopback_available

DRIP_S = 0.1
ALLOW_WEB = AddressPolicy.from_cidrs("127.0.0.1/32")
PHOTO = "/img/photo.jpg"


IPV6 = ipv6_loopback_available()
needs_ipv6 = pytest.mark.skipif(not IPV6, reason="no IPv6 loopback on this machine")


def limits(**kwargs: object) -> FetchLimits:
    """Short limits for tests; the web server (127.0.0.1) allowed unless `policy` says otherwise."""
    values: dict[str, object] = {"timeout": 0.5, "deadline": 1.0, "policy": ALLOW_WEB}
    values.update(kwargs)
    return FetchLimits(**values)  # type: ignore[arg-type]


def error_of(url: str, lim: FetchLimits) -> str:
    with pytest.raises(FetchError) as info:
        fetch(url, lim)
    return str(info.value)


# --------------------------------------------------------------------------- AddressPolicy

BLOCKED = object()  # blocked, whatever the rule is called

POLICY_TABLE: list[tuple[str, object]] = [
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.5", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.0.1", "link-local"),
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", BLOCKED),  # reserved (class E)
    ("100.64.0.1", BLOCKED),  # shared address space (CGNAT)
    ("255.255.255.255", BLOCKED),  # limited broadcast
    ("192.0.2.1", BLOCKED),  # TEST-NET-1
    ("198.18.0.1", BLOCKED),  # benchmarking
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", BLOCKED),  # documentation
    ("2606:4700:4700::1111", None),
    # IPv4 embedded in IPv6: the IPv4 rules apply, and the rule names the IPv4 address
    ("::ffff:127.0.0.1", "loopback, IPv4 127.0.0.1 embedded in IPv6"),
    ("::ffff:10.0.0.1", "private, IPv4 10.0.0.1 embedded in IPv6"),
    ("::ffff:169.254.169.254", "link-local, IPv4 169.254.169.254 embedded in IPv6"),
    ("::ffff:0.0.0.0", "unspecified, IPv4 0.0.0.0 embedded in IPv6"),
    ("::ffff:8.8.8.8", None),
    ("2002:7f00:0001::", "loopback, IPv4 127.0.0.1 embedded in IPv6"),  # 6to4
    ("2002:a9fe:a9fe::", "link-local, IPv4 169.254.169.254 embedded in IPv6"),  # 6to4 to the metadata service
    ("64:ff9b::a00:1", "private, IPv4 10.0.0.1 embedded in IPv6"),  # NAT64
    ("64:ff9b::7f00:1", "loopback, IPv4 127.0.0.1 embedded in IPv6"),  # NAT64
    ("::127.0.0.1", BLOCKED),  # deprecated IPv4-compatible form
]


@pytest.mark.parametrize(("text", "expected"), POLICY_TABLE, ids=[t for t, _ in POLICY_TABLE])
def test_blocked_reason_table(text: str, expected: object) -> None:
    reason = AddressPolicy().blocked_reason(ipaddress.ip_address(text))
    if expected is BLOCKED:
        assert reason is not None
    else:
        assert reason == expected


def test_ipv6_site_local_is_blocked() -> None:
    assert AddressPolicy().blocked_reason(ipaddress.ip_address("fec0::1")) is not None


def test_allow_networks_open_exactly_what_they_name() -> None:
    policy = AddressPolicy.from_cidrs("127.0.0.1/32, 10.0.0.0/8")
    assert policy.allow == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    for allowed in ("127.0.0.1", "10.1.2.3", "::ffff:127.0.0.1", "::ffff:10.1.2.3"):
        assert policy.blocked_reason(ipaddress.ip_address(allowed)) is None, allowed
    assert policy.blocked_reason(ipaddress.ip_address("127.0.0.2")) == "loopback"
    assert policy.blocked_reason(ipaddress.ip_address("::1")) == "loopback"
    assert (
        policy.blocked_reason(ipaddress.ip_address("::ffff:127.0.0.2")) == "loopback, IPv4 127.0.0.2 embedded in IPv6"
    )
    assert policy.blocked_reason(ipaddress.ip_address("192.168.1.1")) == "private"
    assert policy.blocked_reason(ipaddress.ip_address("8.8.8.8")) is None


def test_ipv6_allow_network_does_not_open_ipv4() -> None:
    policy = AddressPolicy.from_cidrs(["::/0"])  # every IPv6 address, and no IPv4 one
    assert policy.blocked_reason(ipaddress.ip_address("::1")) is None
    assert policy.blocked_reason(ipaddress.ip_address("127.0.0.1")) == "loopback"


def test_parse_networks() -> None:
    assert parse_networks("") == ()
    assert parse_networks(" , ,") == ()
    assert parse_networks([]) == ()
    assert parse_networks("10.0.0.1/8") == (ipaddress.ip_network("10.0.0.0/8"),)  # host bits allowed
    assert parse_networks(["::1", " 127.0.0.1/32 "]) == (
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("127.0.0.1/32"),
    )
    with pytest.raises(ValueError, match="not a CIDR network: 'not-a-cidr'"):
        parse_networks("127.0.0.1/32, not-a-cidr")
    with pytest.raises(ValueError, match="10.0.0.0/33"):
        AddressPolicy.from_cidrs(["10.0.0.0/33"])


@pytest.mark.parametrize(
    "bad",
    [{"timeout": 0}, {"deadline": -1}, {"max_bytes": 0}, {"max_redirects": -1}],
    ids=["timeout", "deadline", "max_bytes", "max_redirects"],
)
def test_fetch_limits_refuse_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FetchLimits(**bad)  # type: ignore[arg-type]


def test_user_agent_carries_the_opt_out_token() -> None:
    assert "(compatible; img2dataset;" in FetchLimits().user_agent
    assert "compatible" not in FetchLimits(user_agent_token=None).user_agent


# --------------------------------------------------------------------------- loopback servers


@pytest.fixture(scope="module")
def web() -> Iterator[HostileServer]:
    with HostileServer(drip_interval_s=DRIP_S, stall_s=5.0) as server:
        yield server


@pytest.fixture(scope="module")
def secret() -> Iterator[HostileServer]:
    """127.0.0.2: no test allows it, so it must never see a request."""
    with HostileServer(host="127.0.0.2") as server:
        yield server
        assert server.hits == []


@pytest.fixture(scope="module")
def control() -> Iterator[HostileServer]:
    """Also 127.0.0.2, for the positive controls that do allow it."""
    with HostileServer(host="127.0.0.2") as server:
        yield server


@pytest.fixture(scope="module")
def secret6() -> Iterator[HostileServer]:
    if not IPV6:
        pytest.skip("no IPv6 loopback on this machine")
    with HostileServer(host="::1") as server:
        yield server
        assert server.hits == []


@pytest.fixture(scope="module")
def control6() -> Iterator[HostileServer]:
    if not IPV6:
        pytest.skip("no IPv6 loopback on this machine")
    with HostileServer(host="::1") as server:
        yield server


def tagged_hits(server: HostileServer, tag: str) -> list[str]:
    return [hit for hit in server.hits if tag in hit]


SPELLINGS = ["127.0.0.2", "2130706434", "0x7f000002", "0177.0.0.2", "127.2", "[::ffff:127.0.0.2]"]


def _resolves(spelling: str) -> bool:
    try:
        infos = socket.getaddrinfo(spelling.strip("[]"), 80, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return bool({str(info[4][0]) for info in infos} & {"127.0.0.2", "::ffff:127.0.0.2"})


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_of_a_blocked_address_is_refused(secret: HostileServer, spelling: str) -> None:
    if not _resolves(spelling):
        pytest.skip(f"getaddrinfo does not read {spelling} as 127.0.0.2 here")
    message = error_of(f"http://{spelling}:{secret.port}{PHOTO}", limits())
    if spelling.startswith("["):
        assert message.startswith("blocked address ") and message.endswith(
            "(loopback, IPv4 127.0.0.2 embedded in IPv6)"
        ), message
    else:
        assert message == "blocked address 127.0.0.2 (loopback)"
    assert normalise(message) == "blocked address"
    assert secret.hits == []


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_reaches_127_0_0_2_once_allowed(control: HostileServer, spelling: str) -> None:
    """Positive control: the refusals above come from the policy, not from a spelling that fails to resolve."""
    if not _resolves(spelling):
        pytest.skip(f"getaddrinfo does not read {spelling} as 127.0.0.2 here")
    if spelling.startswith("[") and not IPV6:
        pytest.skip("no IPv6 sockets on this machine")
    tag = f"spelling={quote(spelling, safe='')}"
    body = fetch(
        f"http://{spelling}:{control.port}{PHOTO}?{tag}", limits(policy=AddressPolicy.from_cidrs("127.0.0.2/32"))
    )
    assert body == HostileServer.images()[PHOTO]
    assert tagged_hits(control, tag) == [f"{PHOTO}?{tag}"]


def test_localhost_is_blocked_after_dns(web: HostileServer) -> None:
    try:
        socket.getaddrinfo("localhost", web.port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        pytest.skip("localhost does not resolve here")
    message = error_of(f"http://localhost:{web.port}{PHOTO}?localhost", limits(policy=AddressPolicy()))
    assert message.startswith("blocked address ") and "(loopback" in message, message
    assert tagged_hits(web, "localhost") == []


def test_ipv6_loopback_is_blocked(secret6: HostileServer) -> None:
    assert error_of(secret6.url(PHOTO), limits()) == "blocked address ::1 (loopback)"
    assert secret6.hits == []


def test_ipv6_loopback_is_reached_once_allowed(control6: HostileServer) -> None:
    assert (
        fetch(control6.url(PHOTO), limits(policy=AddressPolicy.from_cidrs("::1/128"))) == HostileServer.images()[PHOTO]
    )
    assert control6.hits == [PHOTO]


@pytest.mark.parametrize(
    ("url", "prefix"),
    [
        ("file:///etc/passwd", "not http(s): unsupported scheme 'file'"),
        ("ftp://127.0.0.1/photo.jpg", "not http(s): unsupported scheme 'ftp'"),
        ("//127.0.0.1/photo.jpg", "not http(s): unsupported scheme '(none)'"),
        ("http://127.0.0.1:99999/photo.jpg", "invalid url: "),
        ("http:///photo.jpg", "invalid url: no host"),
    ],
)
def test_urls_refused_before_connecting(url: str, prefix: str) -> None:
    message = error_of(url, limits())
    assert message.startswith(prefix), message


def test_malformed_ipv6_url_is_a_fetch_error() -> None:
    message = error_of("http://[::1/x", limits())
    assert normalise(message) == "invalid url"


# --------------------------------------------------------------------------- redirects


def test_redirects_within_the_limit_are_followed(web: HostileServer) -> None:
    body = fetch(web.url(f"/redirect/2{PHOTO}?q=hops3"), limits(max_redirects=3))
    assert body == HostileServer.images()[PHOTO]
    assert tagged_hits(web, "q=hops3") == [
        f"/redirect/2{PHOTO}?q=hops3",
        f"/redirect/1{PHOTO}?q=hops3",
        f"/redirect/0{PHOTO}?q=hops3",
        f"{PHOTO}?q=hops3",
    ]


def test_one_redirect_too_many_is_refused_before_following_it(web: HostileServer) -> None:
    assert error_of(web.url(f"/redirect/3{PHOTO}?q=hops4"), limits(max_redirects=3)) == (
        "too many redirects: more than 3"
    )
    assert f"{PHOTO}?q=hops4" not in web.hits and len(tagged_hits(web, "q=hops4")) == 4


def test_max_redirects_zero_refuses_the_first(web: HostileServer) -> None:
    assert error_of(web.url(f"/redirect/0{PHOTO}?q=hops1"), limits(max_redirects=0)) == (
        "too many redirects: more than 0"
    )
    assert tagged_hits(web, "q=hops1") == [f"/redirect/0{PHOTO}?q=hops1"]


def test_redirect_to_a_blocked_address_is_refused(web: HostileServer, secret: HostileServer) -> None:
    url = web.url("/redirect-to?url=" + quote(secret.url(PHOTO), safe=""))
    assert error_of(url, limits()) == "blocked address 127.0.0.2 (loopback)"
    assert secret.hits == []


def test_redirect_to_a_file_url_is_refused(web: HostileServer) -> None:
    message = error_of(web.url("/redirect-to?url=" + quote("file:///etc/passwd", safe="")), limits())
    assert message.startswith("not http(s): unsupported scheme 'file'"), message


# --------------------------------------------------------------------------- size, time and other limits


def test_content_length_above_the_cap_is_refused_before_reading(web: HostileServer) -> None:
    message = error_of(web.url("/big.jpg?length=1&mb=2"), limits(max_bytes=1_000_000))
    assert message == "too large: Content-Length 2097152 > 1000000 bytes"


def test_body_growing_past_the_cap_is_cut_off(web: HostileServer) -> None:
    message = error_of(web.url("/big.jpg?length=0&mb=2"), limits(max_bytes=1_000_000))
    assert message == "too large: body exceeds 1000000 bytes"


def test_cap_boundary_with_content_length(web: HostileServer) -> None:
    photo = HostileServer.images()[PHOTO]
    assert fetch(web.url(PHOTO), limits(max_bytes=len(photo))) == photo
    message = error_of(web.url(PHOTO), limits(max_bytes=len(photo) - 1))
    assert message == f"too large: Content-Length {len(photo)} > {len(photo) - 1} bytes"


def test_cap_boundary_without_content_length(web: HostileServer) -> None:
    size = 2**20  # /big.jpg?mb=1
    body = fetch(web.url("/big.jpg?length=0&mb=1"), limits(max_bytes=size))
    assert len(body) == size and body.startswith(HostileServer.real_jpeg()[:1024])
    assert error_of(web.url("/big.jpg?length=0&mb=1"), limits(max_bytes=size - 1)) == (
        f"too large: body exceeds {size - 1} bytes"
    )


@pytest.mark.parametrize("path", ["/drip.jpg", "/drip-headers.jpg"])
def test_a_drip_under_the_timeout_hits_the_deadline(web: HostileServer, path: str) -> None:
    start = time.monotonic()
    message = error_of(web.url(path), limits(timeout=0.5, deadline=1.0))
    elapsed = time.monotonic() - start
    assert message == "deadline: not done after 1 s"
    assert normalise(message) == "deadline"
    assert 0.9 <= elapsed < 3.0, elapsed


def test_a_stall_hits_the_timeout(web: HostileServer) -> None:
    start = time.monotonic()
    message = error_of(web.url("/stall.jpg"), limits(timeout=0.3, deadline=5.0))
    assert time.monotonic() - start < 2.0
    assert message == "timeout: no data for 0.3 s"
    assert normalise(message) == "timeout"


def test_a_reset_mid_body(web: HostileServer) -> None:
    message = error_of(web.url("/reset.jpg"), limits())
    assert message == "connection reset by the server" or message.startswith("truncated body"), message
    assert normalise(message) in ("connection reset", "truncated body")


def test_connection_refused() -> None:
    url = f"http://127.0.0.1:{closed_port()}/x.jpg"
    assert error_of(url, limits()) == "connection refused"


def test_http_error_status(web: HostileServer) -> None:
    message = error_of(web.url("/status/404"), limits())
    assert message == "HTTP Error 404: Not Found"
    assert normalise(message) == "404"


def test_x_robots_tag_opt_out(web: HostileServer) -> None:
    assert error_of(web.url("/robots-noai.jpg"), limits(disallowed_directives=frozenset({"noai"}))) == ROBOTS_MESSAGE
    # checked on the final response of a redirect chain too
    assert error_of(web.url("/redirect/1/robots-noai.jpg"), limits(disallowed_directives=frozenset({"noai"}))) == (
        ROBOTS_MESSAGE
    )
    assert fetch(web.url("/robots-noai.jpg"), limits(disallowed_directives=frozenset())) == HostileServer.real_jpeg()
    assert fetch(web.url("/robots-noai.jpg"), limits(disallowed_directives=frozenset({"noimageindex"}))) == (
        HostileServer.real_jpeg()
    )


# --------------------------------------------------------------------------- is_disallowed

NOAI = frozenset({"noai"})


@pytest.mark.parametrize(
    ("values", "token", "directives", "expected"),
    [
        (["noai"], "img2dataset", NOAI, True),
        (["img2dataset: noai"], "img2dataset", NOAI, True),
        (["otherbot: noai"], "img2dataset", NOAI, False),
        (["noindex, nofollow"], "img2dataset", NOAI, False),
        (["noindex, noai"], "img2dataset", NOAI, True),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], "img2dataset", NOAI, False),
        (["NOAI"], "img2dataset", NOAI, True),
        (["IMG2DATASET:  NoAI , noindex"], "img2dataset", NOAI, True),
        (["otherbot: noai", "noindex"], "img2dataset", NOAI, False),
        (["otherbot: noai", "img2dataset: noimageai"], "img2dataset", frozenset({"noai", "noimageai"}), True),
        (["img2dataset: noai"], None, NOAI, False),  # no token: only directives for everyone count
        (["noai"], None, NOAI, True),
        ([], "img2dataset", NOAI, False),
        (["noai"], "img2dataset", frozenset(), False),
    ],
)
def test_is_disallowed(values: list[str], token: str | None, directives: frozenset[str], expected: bool) -> None:
    assert is_disallowed(values, token, directives) is expected


# --------------------------------------------------------------------------- reasons.normalise

NORMALISE_TABLE: list[tuple[str, str]] = [
    # img2dataset / urllib / OpenCV messages
    ("HTTP Error 404: Not Found", "404"),
    ("HTTP Error 503: Service Unavailable", "503"),
    ("<urlopen error [Errno 111] Connection refused>", "connection refused"),
    ("timed out", "timeout"),
    ("<urlopen error timed out>", "timeout"),
    ("The read operation timed out", "timeout"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns failure"),
    ("<urlopen error [Errno -3] Temporary failure in name resolution>", "dns failure"),
    ("[Errno 104] Connection reset by peer", "connection reset"),
    ("RemoteDisconnected('Remote end closed connection without response')", "connection reset"),
    ("('Connection aborted.', RemoteDisconnected('Remote end closed connection'))", "connection reset"),
    ("IncompleteRead(2000 bytes read, 66000 more expected)", "truncated body"),
    ("Image decoding error", "undecodable image"),
    ("image area too large", "decompression bomb"),
    ("Use of image disallowed by X-Robots-Tag directive", "robots opt-out"),
    ("hash mismatch", "hash mismatch"),
    ("image too small", "image too small"),
    ("aspect ratio too large", "aspect ratio too large"),
    ("<urlopen error unknown url type: ftp>", "not http(s)"),
    ("<urlopen error no host given>", "invalid url"),
    ("<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>", "tls error"),
    ("Premature end of JPEG file", "truncated image"),
    ("cannot identify image file <_io.BytesIO object at 0x7f>", "not an image"),
    # the guard's and image checks' own messages
    ("blocked address 10.0.0.5 (private)", "blocked address"),
    ("blocked address ::ffff:7f00:2 (loopback, IPv4 127.0.0.2 embedded in IPv6)", "blocked address"),
    ("not http(s): unsupported scheme 'file' in file:///etc/passwd", "not http(s)"),
    ("invalid url: no host in http:///x", "invalid url"),
    ("deadline: not done after 30 s", "deadline"),
    ("timeout: no data for 10 s", "timeout"),
    ("too large: Content-Length 52428800 > 20000000 bytes", "too large"),
    ("too large: body exceeds 20000000 bytes", "too large"),
    ("too many redirects: more than 3", "too many redirects"),
    ("connection refused: http://127.0.0.1:9/x.jpg", "connection refused"),
    ("connection reset by the server", "connection reset"),
    ("dns failure: img.example.com: [Errno -2] Name or service not known", "dns failure"),
    ("tls error: [SSL: WRONG_VERSION_NUMBER] wrong version number", "tls error"),
    ("truncated body: got 2000 bytes, 66052 more were promised", "truncated body"),
    ("truncated image: JPEG ends without an end-of-image marker", "truncated image"),
    ("not an image: looks like HTML", "not an image"),
    ("empty body: 0 bytes", "empty response"),
    ("decompression bomb: 30000x30000 = 900 Mpx > 100 Mpx allowed", "decompression bomb"),
    ("undecodable image: webp: could not create decoder object", "undecodable image"),
    ("network error: [Errno 101] Network is unreachable", "network error"),
    ("bad response: BadStatusLine: xyz", "bad response"),
    ("something nobody has seen before", "other"),
]


@pytest.mark.parametrize(("message", "label"), NORMALISE_TABLE, ids=[m[:50] for m, _ in NORMALISE_TABLE])
def test_normalise(message: str, label: str) -> None:
    assert normalise(message) == label


def test_normalise_none_is_none() -> None:
    assert normalise(None) is None


def test_the_table_reaches_every_reason() -> None:
    reached = {label for _, label in NORMALISE_TABLE}
    assert set(REASONS) <= reached, set(REASONS) - reached


def test_normalise_remote_end_closed() -> None:
    assert normalise("Remote end closed connection without response") == "connection reset"


def test_normalise_urllib_redirect_loop() -> None:
    message = (
        "HTTP Error 301: The HTTP server returned a redirect error that would lead to an infinite loop.\n"
        "The last 30x error message was:\nMoved Permanently"
    )
    assert normalise(message) == "too many redirects"


@pytest.mark.parametrize(
    ("message", "label"),
    [
        ("connection refused: http://example.com/img/timeout.jpg", "connection refused"),
        ("dns failure: timeout.example.com: [Errno -2] Name or service not known", "dns failure"),
    ],
)
def test_normalise_is_not_fooled_by_the_url_in_a_message(message: str, label: str) -> None:
    assert normalise(message) == label


@pytest.mark.parametrize(
    "message",
    [
        "network error: [Errno 101] Network is unreachable",
        "bad response: BadStatusLine: xyz",
        "bad response: InvalidURL: URL can't contain control characters. '/a b.jpg' (found at least ' ')",
    ],
)
def test_normalise_knows_every_fetch_fallback(message: str) -> None:
    assert normalise(message) != "other"


# --------------------------------------------------------------------------- image_checks


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return HostileServer.images()


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "png"),
        (b"GIF87a\x01\x00", "gif"),
        (b"GIF89a\x01\x00", "gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"BM\x36\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00", "bmp"),
        (b"BMW drivers club: see you on Sunday", None),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"<!DOCTYPE html>", None),
        (b"\xff\xd8", None),
        (b"", None),
    ],
)
def test_sniff_format(data: bytes, fmt: str | None) -> None:
    assert sniff_format(data) == fmt


def test_sniff_format_of_real_files(images: dict[str, bytes]) -> None:
    photo = Image.open(io.BytesIO(images[PHOTO]))
    assert sniff_format(images[PHOTO]) == "jpeg"
    assert sniff_format(images["/img/photo.png"]) == "png"
    assert sniff_format(images["/img/anim.gif"]) == "gif"
    assert sniff_format(images["/img/photo.webp"]) == "webp"
    assert sniff_format(_encode(photo, "BMP")) == "bmp"
    assert sniff_format(_encode(photo, "TIFF")) == "tiff"


def test_valid_images_pass_unchanged(images: dict[str, bytes]) -> None:
    for path in (
        "/img/photo.jpg",
        "/img/progressive.jpg",
        "/img/cmyk.jpg",
        "/img/rgba.png",
        "/img/anim.gif",
        "/img/photo.webp",
    ):
        prepared, problem = prepare_image(images[path], 100e6)
        assert problem is None, (path, problem)
        assert prepared is images[path], path


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty body: 0 bytes"),
        (b"<!DOCTYPE html>\n<html><body>nope</body></html>", "not an image: looks like HTML"),
        (b"  <html><head></head></html>", "not an image: looks like HTML"),
        (b'{"error": "not found"}', "not an image: looks like JSON"),
        (b"hello world", "not an image: unknown format starting 68656c6c6f20776f"),
    ],
)
def test_non_images(data: bytes, expected: str) -> None:
    assert prepare_image(data, 100e6) == (None, expected)


@pytest.mark.parametrize(
    "svg",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>',
    ],
)
def test_svg_is_named(svg: bytes) -> None:
    prepared, problem = prepare_image(svg, 100e6)
    assert prepared is None and problem is not None
    assert problem.startswith("not an image: ") and "SVG" in problem


def test_truncated_jpegs(images: dict[str, bytes]) -> None:
    jpeg = images[PHOTO]
    assert prepare_image(jpeg[: len(jpeg) // 2], 100e6) == (
        None,
        "truncated image: JPEG ends without an end-of-image marker",
    )
    zero_filled = jpeg[:1000] + bytes(len(jpeg) - 1000)
    prepared, problem = prepare_image(zero_filled, 100e6)
    assert prepared is None and problem is not None and problem.startswith("truncated image: "), problem
    assert normalise(problem) == "truncated image"
    progressive = images["/img/progressive.jpg"]
    assert prepare_image(progressive[: len(progressive) * 3 // 4], 100e6)[1] == (
        "truncated image: JPEG ends without an end-of-image marker"
    )


def test_truncated_png(images: dict[str, bytes]) -> None:
    png = images["/img/photo.png"]
    for cut in (png[:-12], png[: len(png) // 2]):  # without IEND; cut mid-IDAT
        assert prepare_image(cut, 100e6) == (None, "truncated image: PNG ends without its IEND chunk")


def test_truncated_webp_is_refused(images: dict[str, bytes]) -> None:
    webp = images["/img/photo.webp"]
    for cut in (webp[: len(webp) // 2], webp[:-1]):
        prepared, problem = prepare_image(cut, 100e6)
        assert prepared is None and problem is not None


def test_truncated_webp_is_named_truncated(images: dict[str, bytes]) -> None:
    webp = images["/img/photo.webp"]
    problem = prepare_image(webp[: len(webp) // 2], 100e6)[1]
    assert problem is not None and problem.startswith("truncated image: "), problem


def _with_exif_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    """`jpeg` with an APP1 EXIF segment whose IFD1 carries `thumbnail` (its own SOI, scan and EOI)."""
    ifd0, ifd1 = 8, 8 + 2 + 12 + 4
    data_offset = ifd1 + 2 + 2 * 12 + 4
    tiff = b"II*\x00" + struct.pack("<I", ifd0)
    tiff += struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 1, 0) + struct.pack("<I", ifd1)
    tiff += struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, data_offset)
    tiff += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff + thumbnail
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.fixture(scope="module")
def thumbnailed(images: dict[str, bytes]) -> bytes:
    photo = Image.open(io.BytesIO(images[PHOTO]))
    return _with_exif_thumbnail(images[PHOTO], _encode(photo.resize((64, 64)), "JPEG"))


def test_jpeg_with_exif_thumbnail(thumbnailed: bytes) -> None:
    assert thumbnailed.count(b"\xff\xd9") >= 2 and thumbnailed.count(b"\xff\xda") >= 2
    prepared, problem = prepare_image(thumbnailed, 100e6)
    assert problem is None and prepared is thumbnailed
    main_scan = thumbnailed.rfind(b"\xff\xda")
    cut = thumbnailed[: (main_scan + len(thumbnailed)) // 2]  # the thumbnail's EOI is still there
    assert prepare_image(cut, 100e6) == (None, "truncated image: JPEG ends without an end-of-image marker")


def test_jpeg_cut_before_its_main_scan_is_refused(thumbnailed: bytes) -> None:
    cut = thumbnailed[: thumbnailed.rfind(b"\xff\xda")]
    prepared, problem = prepare_image(cut, 100e6)
    assert prepared is None and problem is not None and problem.startswith("truncated image"), problem


def test_decompression_bomb_from_the_header() -> None:
    png = _encode(Image.new("1", (12000, 12000)), "PNG")
    assert prepare_image(png, 100e6) == (None, "decompression bomb: 12000x12000 = 144 Mpx > 100 Mpx allowed")
    assert prepare_image(png, 200e6)[1] is None  # under the cap: accepted


def test_the_30000_square_bomb_is_refused_without_decoding() -> None:
    bomb = _bomb_png()
    tracemalloc.start()
    try:
        start = time.monotonic()
        prepared, problem = prepare_image(bomb, 100e6)
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prepared is None and problem is not None and problem.startswith("decompression bomb"), problem
    assert normalise(problem) == "decompression bomb"
    assert elapsed < 1.0
    assert peak < 50e6, peak


def test_16_bit_png_is_rewritten_as_8_bit(images: dict[str, bytes]) -> None:
    source = images["/img/gray16.png"]
    prepared, problem = prepare_image(source, 100e6)
    assert problem is None and prepared is not None and prepared is not source
    rewritten = Image.open(io.BytesIO(prepared))
    assert (rewritten.format, rewritten.mode, rewritten.size) == ("PNG", "L", (512, 512))
    original = np.asarray(Image.open(io.BytesIO(source)), dtype=np.uint16)
    assert np.array_equal(np.asarray(rewritten), (original >> 8).astype(np.uint8))
    assert prepare_image(prepared, 100e6) == (prepared, None)  # already 8-bit: left alone


def test_exif_orientation_is_applied(images: dict[str, bytes]) -> None:
    source = images["/img/exif-rotated.jpg"]
    assert Image.open(io.BytesIO(source)).size == (300, 200)
    prepared, problem = prepare_image(source, 100e6)
    assert problem is None and prepared is not None
    rewritten = Image.open(io.BytesIO(prepared))
    assert (rewritten.format, rewritten.size) == ("PNG", (200, 300))
    assert rewritten.getexif().get(0x0112, 1) == 1
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(source)))
    assert np.array_equal(np.asarray(rewritten), np.asarray(upright))
    assert prepare_image(prepared, 100e6) == (prepared, None)


def test_exif_orientation_1_leaves_the_bytes_alone(images: dict[str, bytes]) -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    jpeg = _encode(Image.open(io.BytesIO(images[PHOTO])), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(jpeg)).getexif()[0x0112] == 1
    prepared, problem = prepare_image(jpeg, 100e6)
    assert problem is None and prepared is jpeg


def test_cmyk_jpeg_with_orientation_is_rewritten(images: dict[str, bytes]) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = _encode(Image.open(io.BytesIO(images["/img/cmyk.jpg"])), "JPEG", exif=exif)
    prepared, problem = prepare_image(jpeg, 100e6)
    assert problem is None, problem
    assert prepared is not None and Image.open(io.BytesIO(prepared)).size == (512, 512)
