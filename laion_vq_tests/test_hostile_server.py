"""Self-tests of the hostile fixture server: fault tests of the downloader trust it to misbehave exactly as
documented, so each path's misbehaviour is checked here with stdlib clients only (no requests, no retries)."""

from __future__ import annotations

import http.client
import io
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import pytest
from PIL import Image

from laion_vq.testing.hostile_server import (
    BOMB_SIDE,
    RESET_AFTER,
    ZEROS_AFTER,
    HostileServer,
    _zero_png,
    closed_port,
)


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with HostileServer(drip_interval_s=0.05, stall_s=30.0) as srv:
        yield srv


def _get(server: HostileServer, path: str, timeout: float = 10.0) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def _raw(server: HostileServer, path: str, timeout: float) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    return sock


@pytest.mark.parametrize("code", [403, 404, 410, 500, 503])
def test_status_codes(server: HostileServer, code: int) -> None:
    status, headers, body = _get(server, f"/status/{code}")
    assert status == code
    assert headers["Content-Type"].startswith("text/html") and str(code).encode() in body


def test_unknown_path_is_404(server: HostileServer) -> None:
    assert _get(server, "/nope.jpg")[0] == 404


def test_redirect_chain_takes_n_plus_one_relative_hops(server: HostileServer) -> None:
    path, hops = "/redirect/3/img/photo.jpg", 0
    while True:
        status, headers, body = _get(server, path)
        if status != 302:
            break
        path, hops = headers["Location"], hops + 1
        assert path.startswith("/")  # relative: the client must resolve it against the request URL
    assert (hops, path, status) == (4, "/img/photo.jpg", 200)
    assert body == HostileServer.images()["/img/photo.jpg"]
    assert _get(server, "/redirect/0/big.jpg?length=0&mb=1")[1]["Location"] == "/big.jpg?length=0&mb=1"


def test_redirect_to_absolute_url(server: HostileServer) -> None:
    status, headers, _ = _get(server, "/redirect-to?url=http%3A%2F%2F10.0.0.1%2Fa.jpg%3Fx%3D1")
    assert (status, headers["Location"]) == (302, "http://10.0.0.1/a.jpg?x=1")
    assert _get(server, "/redirect-to")[0] == 400


def test_bomb_png_header_and_stream(server: HostileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    status, headers, body = _get(server, "/bomb.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and len(body) < 2_000_000
    with pytest.raises(Image.DecompressionBombError):  # PIL refuses > 2 × MAX_IMAGE_PIXELS at open()
        Image.open(io.BytesIO(body))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    img = Image.open(io.BytesIO(body))  # lazy: reads the header only
    assert (img.size, img.mode) == ((BOMB_SIDE, BOMB_SIDE), "L")
    # the repeated-block IDAT must inflate to exactly side × (1 + side) zeros with a valid Adler-32
    (idat_len,) = struct.unpack(">I", body[33:37])
    assert body[37:41] == b"IDAT"
    inflater, pending, total = zlib.decompressobj(), body[41 : 41 + idat_len], 0
    while pending and not inflater.eof:
        out = inflater.decompress(pending, 1 << 22)
        assert out.count(0) == len(out)
        total, pending = total + len(out), inflater.unconsumed_tail
    assert inflater.eof and total == BOMB_SIDE * (BOMB_SIDE + 1)


@pytest.mark.parametrize("side", [1, 64, 129, 301])
def test_zero_png_decodes_fully(side: int) -> None:
    img = Image.open(io.BytesIO(_zero_png(side, rows_per_block=64)))
    img.load()
    assert img.size == (side, side) and img.getextrema() == (0, 0)


@pytest.mark.parametrize("with_length", [True, False])
def test_big_jpg_streams_50_mib(server: HostileServer, with_length: bool) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", f"/big.jpg?length={int(with_length)}")
    resp = conn.getresponse()
    expected = 50 * 2**20
    assert resp.headers.get("Content-Length") == (str(expected) if with_length else None)
    first, total = resp.read(4), 4
    while chunk := resp.read(1 << 20):
        total += len(chunk)
    conn.close()
    assert first == b"\xff\xd8\xff\xe0" and total == expected


def test_big_jpg_mb_param(server: HostileServer) -> None:
    status, headers, body = _get(server, "/big.jpg?mb=0.5")
    assert int(headers["Content-Length"]) == len(body) == 2**19


@pytest.mark.parametrize(
    ("path", "content_type", "mode", "size"),
    [
        ("/img/cmyk.jpg", "image/jpeg", "CMYK", (512, 512)),
        ("/img/gray16.png", "image/png", "I;16", (512, 512)),
        ("/img/anim.gif", "image/gif", "P", (200, 200)),
        ("/img/photo.webp", "image/webp", "RGB", (512, 512)),
        ("/img/rgba.png", "image/png", "RGBA", (256, 256)),
        ("/img/gray.jpg", "image/jpeg", "L", (512, 512)),
        ("/img/large.jpg", "image/jpeg", "RGB", (1600, 1200)),
        ("/img/exif-rotated.jpg", "image/jpeg", "RGB", (300, 200)),
    ],
)
def test_real_images(server: HostileServer, path: str, content_type: str, mode: str, size: tuple[int, int]) -> None:
    status, headers, body = _get(server, path)
    assert (status, headers["Content-Type"], body) == (200, content_type, HostileServer.images()[path])
    img = Image.open(io.BytesIO(body))
    assert (img.mode, img.size) == (mode, size)
    if path.endswith(".gif"):
        assert img.is_animated and img.n_frames == 3
    if path.endswith("rgba.png"):
        assert img.getchannel("A").getextrema() == (0, 255)
    if path.endswith("exif-rotated.jpg"):
        assert img.getexif()[0x0112] == 6


def test_progressive_jpeg_is_progressive() -> None:
    assert Image.open(io.BytesIO(HostileServer.images()["/img/progressive.jpg"])).info.get("progressive")


def test_broken_bodies(server: HostileServer) -> None:
    jpeg = HostileServer.real_jpeg()
    status, headers, body = _get(server, "/html.jpg")
    assert headers["Content-Type"] == "image/jpeg" and body.startswith(b"<!DOCTYPE html>")
    status, headers, body = _get(server, "/empty.jpg")
    assert (status, headers["Content-Length"], body) == (200, "0", b"")
    assert _get(server, "/truncated.jpg")[2] == jpeg[: int(len(jpeg) * 0.3)]
    status, headers, body = _get(server, "/truncated-zeros.jpg")
    assert int(headers["Content-Length"]) == len(body) == len(jpeg)
    assert body[:ZEROS_AFTER] == jpeg[:ZEROS_AFTER] and body[ZEROS_AFTER:].count(0) == len(jpeg) - ZEROS_AFTER
    status, headers, body = _get(server, "/robots-noai.jpg")
    assert headers["X-Robots-Tag"] == "noai" and body == jpeg


def test_reset_after_2000_bytes(server: HostileServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    conn.request("GET", "/reset.jpg")
    resp = conn.getresponse()
    assert int(resp.headers["Content-Length"]) == len(HostileServer.real_jpeg())
    assert len(resp.read(RESET_AFTER)) == RESET_AFTER
    with pytest.raises(ConnectionResetError):
        resp.read()
    conn.close()


def test_stall_sends_nothing(server: HostileServer) -> None:
    with _raw(server, "/stall.jpg", timeout=0.3) as sock, pytest.raises(TimeoutError):
        sock.recv(1)


def test_drip_body_and_headers(server: HostileServer) -> None:
    with _raw(server, "/drip.jpg", timeout=2) as sock:  # headers at once, then ~1 byte per 0.05 s
        time.sleep(0.3)
        data = sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and 1 <= len(body) <= 10
    with _raw(server, "/drip-headers.jpg", timeout=2) as sock:
        time.sleep(0.3)
        assert 1 <= len(sock.recv(65536)) <= 10  # a partial status line


def test_hits_record_paths(server: HostileServer) -> None:
    _get(server, "/status/418?unique=1")
    assert "/status/418?unique=1" in server.hits
    assert HostileServer().hits == []


def test_stop_wakes_stalled_and_dripping_handlers() -> None:
    srv = HostileServer(drip_interval_s=0.5, stall_s=60.0).start()
    socks = [_raw(srv, path, timeout=3) for path in ("/stall.jpg", "/drip.jpg", "/drip-headers.jpg")]
    deadline = time.monotonic() + 2
    while len(srv.hits) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(srv.hits) == 3
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 2
    for sock in socks:  # the woken handlers close their connections
        with sock:
            while sock.recv(65536):
                pass


def test_closed_port_refuses() -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", closed_port()), timeout=2)


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("IPv6 loopback unavailable")
    with HostileServer(host="::1") as srv:
        assert srv.base_url == f"http://[::1]:{srv.port}"
        status, _, body = _get(srv, "/img/photo.jpg")
        assert status == 200 and body == HostileServer.images()["/img/photo.jpg"]
        assert srv.hits == ["/img/photo.jpg"]
