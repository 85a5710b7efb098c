"""The loopback image server that stands in for the web in the download tests and the offline demo."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from PIL import Image

from laion_vq.testing.image_server import BROKEN_KINDS, HUGE_SIDE, ImageServer


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(slow_delay_s=2.0) as s:
        yield s


def get(url: str, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_binds_loopback_only(server: ImageServer) -> None:
    assert server.base_url == f"http://127.0.0.1:{server.port}"
    assert server._server is not None and server._server.server_address[0] == "127.0.0.1"
    assert server.url("/img/astronaut.jpg") == f"http://127.0.0.1:{server.port}/img/astronaut.jpg"
    with pytest.raises(ValueError):
        server.url("img/astronaut.jpg")


def test_photos_are_real_and_varied(server: ImageServer) -> None:
    paths = ImageServer.photo_paths()
    assert paths == ImageServer.photo_paths()  # deterministic
    assert len(paths) == len(set(paths)) >= 10
    photos = server.photos()
    assert list(photos) == paths
    sizes = [(p.width, p.height) for p in photos.values()]
    assert any(max(s) > 256 for s in sizes) and any(max(s) < 256 for s in sizes)
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(w == h for w, h in sizes)
    assert {p.mode for p in photos.values()} == {"RGB", "L", "RGBA"}
    for path in paths:
        status, headers, body = get(server.url(path))
        assert status == 200 and body == photos[path].data
        img = Image.open(io.BytesIO(body))
        img.load()
        assert img.size == (photos[path].width, photos[path].height)
        assert headers["Content-Type"] == ("image/png" if path.endswith(".png") else "image/jpeg")


def test_broken_paths(server: ImageServer) -> None:
    broken = ImageServer.broken_paths()
    assert {ImageServer.broken_kind(p) for p in broken} == set(BROKEN_KINDS)
    assert "/slow/0.jpg" not in ImageServer.broken_paths(include_slow=False)
    with pytest.raises(ValueError):
        ImageServer.broken_kind("/img/astronaut.jpg")

    assert get(server.url("/missing/whatever.jpg"))[0] == 404
    assert get(server.url("/img/not-a-photo.jpg"))[0] == 404
    assert get(server.url("/robots-noai/not-a-photo.jpg"))[0] == 404

    status, headers, body = get(server.url("/garbage/1.jpg"))
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and len(body) > 1000
    with pytest.raises(Exception):  # noqa: B017 - PIL raises UnidentifiedImageError
        Image.open(io.BytesIO(body))

    astronaut = server.photos()["/img/astronaut.jpg"].data
    status, _, body = get(server.url("/truncated/1.jpg"))
    assert status == 200 and astronaut.startswith(body) and 0.2 < len(body) / len(astronaut) < 0.4

    status, headers, body = get(server.url("/huge/1.png"))
    assert status == 200 and headers["Content-Type"] == "image/png" and len(body) < 200_000
    width, height = struct.unpack(">II", body[16:24])  # the PNG IHDR chunk
    assert width == height == HUGE_SIDE

    status, headers, body = get(server.url("/robots-noai/chelsea.jpg"))
    assert status == 200 and headers["X-Robots-Tag"] == "noai"
    assert body == server.photos()["/img/chelsea.jpg"].data


def test_slow_path_times_out_then_serves(server: ImageServer) -> None:
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        get(server.url("/slow/1.jpg"), timeout=0.5)
    started = time.monotonic()
    status, _, body = get(server.url("/slow/2.jpg"), timeout=10)
    assert status == 200 and body == server.photos()["/img/astronaut.jpg"].data
    assert time.monotonic() - started >= 1.9


def test_stop_is_prompt_with_a_sleeping_handler() -> None:
    server = ImageServer(slow_delay_s=60).start()
    url = server.url("/slow/1.jpg")
    errors: list[BaseException] = []

    def client() -> None:
        try:
            get(url, timeout=30)
        except BaseException as err:  # the dropped connection is the point
            errors.append(err)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(0.3)  # the handler is now sleeping
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    t.join(timeout=5)
    assert not t.is_alive() and errors  # the client saw the connection drop, not a 60 s wait
    server.stop()  # idempotent
    with pytest.raises(OSError):
        get(url, timeout=2)


def test_start_twice_is_an_error() -> None:
    with ImageServer() as server, pytest.raises(RuntimeError):
        server.start()
