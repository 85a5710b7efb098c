"""One shard of the open web's worst: every hostile or unusual input in one real img2dataset download.

Each bad row must end with the right status and a reason a person recognises, and every other row of
the shard must come through intact. The shard is downloaded once per module (real img2dataset, real
guard, loopback servers only: `HostileServer` on 127.0.0.1, a "secret" server on 127.0.0.2 and one on
::1 that the address guard must never let a request reach).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable, Iterator
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_vq.download import DownloadOptions, ShardDownloadResult, download_shard, expected_key
from laion_vq.testing.hostile_server import HostileServer, closed_port
from laion_vq.testing.loopback import ipv6_loopback_available

SHARD = 7
SAMPLES = 100
OPTIONS = DownloadOptions(timeout=1.0, deadline=2.5, thread_count=16, max_redirects=3, allow_networks=("127.0.0.1/32",))


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, HostileServer]]:
    """The web (127.0.0.1) and the addresses it must not reach (127.0.0.2, ::1)."""
    started = {"web": HostileServer(drip_interval_s=0.4, stall_s=20), "secret": HostileServer(host="127.0.0.2")}
    if ipv6_loopback_available():
        started["secret6"] = HostileServer(host="::1")
    for server in started.values():
        server.start()
    yield started
    for server in started.values():
        server.stop()


Url = Callable[[dict[str, HostileServer]], str]


def web(path: str) -> Url:
    return lambda s: s["web"].url(path)


def secret_as(host_form: str) -> Url:
    """The secret server's port behind another spelling of 127.0.0.2."""
    return lambda s: f"http://{host_form}:{s['secret'].port}/img/photo.jpg"


#: (row name, URL, status, failure_reason); failure_reason None means success.
CASES: list[tuple[str, Url, str, str | None]] = [
    # valid images of every kind a LAION URL serves
    ("jpeg", web("/img/photo.jpg"), "success", None),
    ("large jpeg", web("/img/large.jpg"), "success", None),
    ("grayscale", web("/img/gray.jpg"), "success", None),
    ("cmyk jpeg", web("/img/cmyk.jpg"), "success", None),
    ("rgba png", web("/img/rgba.png"), "success", None),
    ("16-bit png", web("/img/gray16.png"), "success", None),
    ("animated gif", web("/img/anim.gif"), "success", None),
    ("webp", web("/img/photo.webp"), "success", None),
    ("progressive jpeg", web("/img/progressive.jpg"), "success", None),
    ("exif-rotated jpeg", web("/img/exif-rotated.jpg"), "success", None),
    ("rgb png", web("/img/photo.png"), "success", None),
    ("redirect within limit", web("/redirect/2/img/photo.jpg"), "success", None),
    ("duplicate url a", web("/img/photo.png"), "success", None),
    # HTTP and network failures
    ("404", web("/status/404"), "failed_to_download", "404"),
    ("410", web("/status/410"), "failed_to_download", "410"),
    ("500", web("/status/500"), "failed_to_download", "500"),
    (
        "connection refused",
        lambda s: f"http://127.0.0.1:{closed_port()}/x.jpg",
        "failed_to_download",
        "connection refused",
    ),
    ("reset mid-body", web("/reset.jpg"), "failed_to_download", "connection reset"),
    ("stall", web("/stall.jpg"), "failed_to_download", "timeout"),
    ("drip under the timeout", web("/drip.jpg"), "failed_to_download", "deadline"),
    ("dripped headers", web("/drip-headers.jpg"), "failed_to_download", "deadline"),
    ("50 MB with Content-Length", web("/big.jpg?length=1"), "failed_to_download", "too large"),
    ("50 MB without Content-Length", web("/big.jpg?length=0"), "failed_to_download", "too large"),
    ("redirect chain too long", web("/redirect/5/img/photo.jpg"), "failed_to_download", "too many redirects"),
    ("robots noai", web("/robots-noai.jpg"), "failed_to_download", "robots opt-out"),
    ("file url", lambda s: "file:///etc/passwd", "failed_to_download", "not http(s)"),
    ("ftp url", lambda s: "ftp://127.0.0.1/photo.jpg", "failed_to_download", "not http(s)"),
    # the address guard: loopback 127.0.0.2 and ::1 in every spelling, directly and through a redirect
    ("loopback dotted", secret_as("127.0.0.2"), "failed_to_download", "blocked address"),
    ("loopback decimal", secret_as("2130706434"), "failed_to_download", "blocked address"),
    ("loopback hex", secret_as("0x7f000002"), "failed_to_download", "blocked address"),
    ("loopback short", secret_as("127.2"), "failed_to_download", "blocked address"),
    ("loopback ipv4-mapped ipv6", secret_as("[::ffff:127.0.0.2]"), "failed_to_download", "blocked address"),
    (
        "redirect to a blocked address",
        lambda s: s["web"].url("/redirect-to?url=" + quote(s["secret"].url("/img/photo.jpg"), safe="")),
        "failed_to_download",
        "blocked address",
    ),
    ("metadata service", lambda s: "http://169.254.169.254/latest/meta-data/", "failed_to_download", "blocked address"),
    (
        "ipv6 loopback",
        lambda s: f"http://[::1]:{s['secret6'].port if 'secret6' in s else 9}/img/photo.jpg",
        "failed_to_download",
        "blocked address",
    ),
    # bodies that are not (whole) images
    ("html as jpg", web("/html.jpg"), "failed_to_resize", "not an image"),
    ("zero bytes", web("/empty.jpg"), "failed_to_resize", "empty response"),
    ("truncated jpeg", web("/truncated.jpg"), "failed_to_resize", "truncated image"),
    ("truncated then zeros", web("/truncated-zeros.jpg"), "failed_to_resize", "truncated image"),
    ("30000x30000 png bomb", web("/bomb.png"), "failed_to_resize", "decompression bomb"),
    ("duplicate url b", web("/img/photo.png"), "success", None),
]
NAMES = [name for name, *_ in CASES]
CAPTIONS = {"jpeg": "caf\ufffd au lait", "webp": "雪の朝 ❄️", "grayscale": 'tab\tnewline\nquote"nul\x00'}


@pytest.fixture(scope="module")
def shard(
    servers: dict[str, HostileServer], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ShardDownloadResult, dict[str, dict], dict[str, bytes]]:
    """(result, case name → status row, key → stored JPEG) for the one hostile shard."""
    captions = [CAPTIONS.get(name, f"caption of {name}").encode() for name in NAMES]
    captions[NAMES.index("jpeg")] = b"caf\xe9 au lait"  # Latin-1 bytes in a binary caption column
    rows = pa.table(
        {
            "SAMPLE_ID": pa.array(range(len(CASES)), pa.int64()),
            "URL": [url(servers) for _, url, *_ in CASES],
            "TEXT": pa.array(captions, pa.binary()),
            "NSFW": ["UNLIKELY"] * len(CASES),
        }
    )
    result = download_shard(
        rows, SHARD, str(tmp_path_factory.mktemp("hostile")), samples_per_shard=SAMPLES, options=OPTIONS
    )
    by_key = {row["key"]: row for row in pq.read_table(result.parquet_path).to_pylist()}
    status = {name: by_key[expected_key(SHARD, i, SAMPLES)] for i, name in enumerate(NAMES)}
    with tarfile.open(result.tar_path) as tar:
        jpegs = {m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}  # type: ignore[union-attr]
    return result, status, jpegs


@pytest.mark.parametrize(("name", "expected_status", "reason"), [(n, st, r) for n, _, st, r in CASES], ids=NAMES)
def test_each_input_ends_with_its_status_and_reason(
    shard: tuple[ShardDownloadResult, dict[str, dict], dict[str, bytes]],
    name: str,
    expected_status: str,
    reason: str | None,
) -> None:
    _, status, jpegs = shard
    row = status[name]
    assert (row["status"], row["failure_reason"]) == (expected_status, reason), row["error_message"]
    if reason is None:
        assert row["error_message"] is None
        assert hashlib.sha256(jpegs[row["key"]]).hexdigest() == row["jpg_sha256"]
        assert Image.open(io.BytesIO(jpegs[row["key"]])).size == (256, 256)
    else:
        assert row["key"] not in jpegs and row["jpg_sha256"] is None


def test_the_blocked_servers_were_never_contacted(
    shard: tuple[ShardDownloadResult, dict[str, dict], dict[str, bytes]], servers: dict[str, HostileServer]
) -> None:
    assert servers["secret"].hits == []
    if "secret6" in servers:
        assert servers["secret6"].hits == []
    else:
        pytest.skip("no IPv6 loopback on this machine")
    assert shard[1]["loopback hex"]["error_message"] == "blocked address 127.0.0.2 (loopback)"
    assert "::1 (loopback)" in shard[1]["ipv6 loopback"]["error_message"]
    assert "169.254.169.254 (link-local)" in shard[1]["metadata service"]["error_message"]


def test_the_accounting_adds_up_with_examples(
    shard: tuple[ShardDownloadResult, dict[str, dict], dict[str, bytes]],
) -> None:
    result, status, _ = shard
    expected: dict[str, int] = {}
    for _, _, _, reason in CASES:
        if reason is not None:
            expected[reason] = expected.get(reason, 0) + 1
    assert result.failures_by_reason == expected
    assert list(result.failures_by_reason.values()) == sorted(result.failures_by_reason.values(), reverse=True)
    assert result.failure_examples["blocked address"][:3] == [
        status[n]["url"] for n in ("loopback dotted", "loopback decimal", "loopback hex")
    ]
    assert all(1 <= len(urls) <= 3 for urls in result.failure_examples.values())
    assert result.successes + sum(expected.values()) == result.count == len(CASES)


def test_other_rows_are_intact(shard: tuple[ShardDownloadResult, dict[str, dict], dict[str, bytes]]) -> None:
    _, status, jpegs = shard
    assert status["jpeg"]["caption"] == "caf\ufffd au lait"  # undecodable byte marked, the rest kept
    assert status["webp"]["caption"] == CAPTIONS["webp"]
    assert status["grayscale"]["caption"] == CAPTIONS["grayscale"]
    for i, name in enumerate(NAMES):
        assert status[name]["SAMPLE_ID"] == i and status[name]["NSFW"] == "UNLIKELY"
    a, b = status["duplicate url a"], status["duplicate url b"]
    assert a["key"] != b["key"] and a["jpg_sha256"] == b["jpg_sha256"] == status["rgb png"]["jpg_sha256"]


def _pixels(jpegs: dict[str, bytes], row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpegs[row["key"]])).convert("L"), dtype=np.float64)


def test_16_bit_png_keeps_its_picture(shard: tuple[ShardDownloadResult, dict[str, dict], dict[str, bytes]]) -> None:
    """OpenCV alone turns a 16-bit PNG into an all-white JPEG; ours matches the 8-bit grayscale photo."""
    _, status, jpegs = shard
    sixteen, eight = _pixels(jpegs, status["16-bit png"]), _pixels(jpegs, status["grayscale"])
    assert sixteen.std() > 30
    assert np.abs(sixteen - eight).mean() < 8


def test_exif_rotation_is_applied(shard: tuple[ShardDownloadResult, dict[str, dict], dict[str, bytes]]) -> None:
    """A 300×200 JPEG tagged "rotate 90°" is a 200×300 portrait: white bars left and right, not above."""
    _, status, jpegs = shard
    row = status["exif-rotated jpeg"]
    assert (row["original_width"], row["original_height"]) == (200, 300)
    pixels = _pixels(jpegs, row)
    assert pixels[:, :30].min() > 245 and pixels[:, -30:].min() > 245  # border padding at the sides
    assert pixels[:30, 100:156].min() < 200  # picture reaches the top


def test_a_shard_of_huge_bodies_stays_within_its_memory_budget(
    servers: dict[str, HostileServer], tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 bodies of 6 MiB, 8 threads, a 16 MB budget: readers wait for memory instead of holding 72 MiB,
    none starves (every row ends with its real reason, no deadline), and every byte taken is given back."""
    from laion_vq.download import img2dataset_shard
    from laion_vq.download.guard import ByteBudget

    budgets: list[ByteBudget] = []

    class ObservedBudget(ByteBudget):  # the real budget, remembered so the test can read its peak
        def __init__(self, capacity: int, overdraft: int) -> None:
            super().__init__(capacity, overdraft)
            budgets.append(self)

    monkeypatch.setattr(img2dataset_shard, "ByteBudget", ObservedBudget)
    urls = [servers["web"].url(f"/big.jpg?length={i % 2}&mb=6&n={i}") for i in range(12)]
    rows = pa.table({"URL": urls, "TEXT": [f"big {i}" for i in range(12)]})
    options = DownloadOptions(
        timeout=5,
        deadline=30,
        thread_count=8,
        max_bytes=8_000_000,
        buffer_bytes=16_000_000,
        allow_networks=("127.0.0.1/32",),
    )
    result = download_shard(rows, 1, str(tmp_path_factory.mktemp("budget")), samples_per_shard=100, options=options)
    assert result.failures_by_reason == {"truncated image": 12}  # a JPEG head, then zeros, no end marker
    (budget,) = budgets
    assert 6 * 2**20 <= budget.peak <= 16_000_000 + 8_000_000  # capacity + one max_bytes body, at most
    assert budget.used == 0
