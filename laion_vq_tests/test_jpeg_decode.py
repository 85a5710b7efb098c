"""ImageDecoder: PIL on CPU (bit-identical to the codes stage's decode), and the batched device path with its
per-image PIL fallback.

There is no GPU on the machines these tests run on, so the CUDA structure is exercised with an injected
``gpu_decode``: a stand-in built on ``torchvision.io.decode_jpeg`` on CPU (libjpeg-turbo, not nvJPEG) that also
fails like nvJPEG does (the whole batch raises for one image it refuses). The nvJPEG-vs-PIL pixel and code
differences are measured by benchmarks/bench_jpeg_decode.py on a CUDA machine; `test_nvjpeg_on_cuda` runs only there.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from laion_vq.encode.decode import (
    GPU_BAD_OUTPUT,
    GPU_IMAGE_ERROR,
    ImageDecoder,
    decode_rgb,
    safe_decode,
    torchvision_decode,
)
from laion_vq.encode.jpeg_header import (
    CMYK,
    CODING,
    GRAYSCALE,
    NO_EOI,
    NOT_JPEG,
    PRECISION,
    RGB_CODED,
    SUBSAMPLING,
    UNPARSED_HEADER,
    WRONG_SIZE,
    gpu_refusal,
    parse_jpeg_header,
)
from laion_vq.vqgan.reference import sample_photos

S = 64  # small images keep the test fast; routing and merging do not depend on the size


def _encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return sample_photos(8, S)


@pytest.fixture(scope="module")
def mixed(photos: np.ndarray) -> list[tuple[str, bytes]]:
    """Real photos as q95 JPEGs (as img2dataset writes them) among everything else a tar may hold."""
    rng = np.random.default_rng(0)
    jpeg = [(f"photo{i}", _encode(photos[i], quality=95)) for i in range(4)]
    return [
        jpeg[0],
        ("gray", _encode(photos[4], mode="L", quality=95)),
        ("cmyk", _encode(photos[5], mode="CMYK", quality=95)),
        jpeg[1],
        ("png", _encode(photos[6], "PNG")),
        ("webp", _encode(photos[7], "WEBP", quality=90)),
        ("progressive", _encode(photos[2], quality=95, progressive=True)),
        ("truncated", _encode(photos[3], quality=95)[:1500]),
        ("random", rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()),
        jpeg[2],
        ("wrong-size", _encode(photos[0][: S // 2, : S - 4], quality=95)),
        ("empty", b""),
        ("rgb-coded", _encode(photos[1], quality=95, keep_rgb=True)),
        jpeg[3],
    ]


def _standin(*, fail_in_batch: set[bytes] = frozenset(), fail_always: set[bytes] = frozenset(), calls=None):
    """torchvision's CPU decode_jpeg standing in for nvJPEG (no GPU here), failing like nvJPEG fails: the whole
    batch raises when one image is refused; CMYK is refused (nvJPEG is not asked to allow it)."""
    decode = torchvision_decode("cpu")

    def gpu_decode(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if calls is not None:
            calls.append(len(tensors))
        for t in tensors:
            data = t.numpy().tobytes()
            header = parse_jpeg_header(data)
            if header is None or len(header.components) == 4:
                raise RuntimeError("nvjpeg stand-in: unsupported bitstream")
            if data in fail_always or (len(tensors) > 1 and data in fail_in_batch):
                raise RuntimeError("nvjpeg stand-in: Failed to decode batch: 6")
        return decode(tensors)

    return gpu_decode


def _check_accounting(items: list[tuple[str, bytes]], batch) -> None:
    """Every input once, in ``keys`` or ``failed``, in input order; the right sha256; images match keys."""
    order = [k for k, _ in items]
    sha = {k: hashlib.sha256(d).hexdigest() for k, d in items}
    failed_keys = [k for k, _, _ in batch.failed]
    assert sorted(batch.keys + failed_keys) == sorted(order)
    assert batch.keys == [k for k in order if k in set(batch.keys)]
    assert failed_keys == [k for k in order if k in set(failed_keys)]
    assert batch.sha256 == [sha[k] for k in batch.keys]
    assert [s for _, _, s in batch.failed] == [sha[k] for k in failed_keys]
    assert all(reason for _, reason, _ in batch.failed)
    assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (len(batch.keys), S, S, 3)


def test_cpu_decoder_is_the_stage_decode(mixed):
    """device cpu: PIL over the pool, bit-identical to safe_decode one by one, same reasons."""
    expected = [safe_decode(item, S) for item in mixed]
    with ImageDecoder(S, cpu_workers=3) as decoder:
        assert not decoder.batched
        batch = decoder.decode(mixed)
    _check_accounting(mixed, batch)
    assert batch.keys == [k for k, img, _, _ in expected if img is not None]
    assert batch.failed == [(k, r, d) for k, img, r, d in expected if img is None]
    want = np.stack([img for _, img, _, _ in expected if img is not None])
    assert np.array_equal(batch.images.numpy(), want)
    assert batch.gpu_decoded == 0 and batch.cpu_fallbacks == {}
    reasons = dict(batch.undecodable)
    assert {k for k, _, _ in batch.failed} == {"truncated", "random", "wrong-size", "empty"}
    assert reasons[f"ValueError: image is {S - 4}x{S // 2}, expected {S}x{S}"] == 1
    assert reasons["UnidentifiedImageError: cannot identify image file"] == 2
    assert any(r.startswith("OSError: image file is truncated") for r in reasons)


def test_batched_path_routes_falls_back_and_merges_in_order(mixed):
    """The CUDA structure with a CPU stand-in: JPEGs the device takes in one call, the rest through PIL."""
    data = dict(mixed)
    calls: list[int] = []
    with ImageDecoder(S, cpu_workers=2, gpu_decode=_standin(calls=calls)) as decoder:
        assert decoder.batched
        batch = decoder.decode(mixed)
    _check_accounting(mixed, batch)
    assert calls == [5]  # one batched call: 4 baseline photos + the progressive one
    assert batch.gpu_decoded == 5 and batch.gpu_batch_errors == 0
    assert batch.cpu_fallbacks == {
        GRAYSCALE: 1,
        CMYK: 1,
        NOT_JPEG: 4,  # png, webp, random, empty
        NO_EOI: 1,
        WRONG_SIZE: 1,
        RGB_CODED: 1,
    }
    # what the CPU path decodes and fails on, the batched path decodes and fails on the same way
    cpu = [safe_decode(item, S) for item in mixed]
    assert batch.failed == [(k, r, d) for k, img, r, d in cpu if img is None]
    got = dict(zip(batch.keys, batch.images.numpy(), strict=True))
    for key in ("gray", "cmyk", "png", "webp", "rgb-coded"):  # went to PIL: exactly PIL's pixels
        assert np.array_equal(got[key], decode_rgb(data[key], S)), key
    # decoded by the stand-in (libjpeg-turbo in torchvision): measured against PIL, not assumed equal
    device_keys = ["photo0", "photo1", "photo2", "photo3", "progressive"]
    diffs = [np.abs(got[k].astype(int) - decode_rgb(data[k], S)).max() for k in device_keys]
    print(f"stand-in (torchvision CPU) vs PIL, max abs diff per image: {diffs}")
    assert max(diffs) <= 2


def test_batch_error_retries_alone_then_pil(mixed):
    """One image fails the batch: the rest are retried one by one on the device, the culprit goes to PIL."""
    data = dict(mixed)
    calls: list[int] = []
    flaky, broken = data["photo1"], data["photo3"]
    gpu_decode = _standin(fail_in_batch={flaky}, fail_always={broken}, calls=calls)
    with ImageDecoder(S, cpu_workers=2, gpu_decode=gpu_decode) as decoder:
        batch = decoder.decode(mixed)
    _check_accounting(mixed, batch)
    assert calls == [5, 1, 1, 1, 1, 1]
    assert batch.gpu_batch_errors == 1
    assert batch.gpu_decoded == 4  # photo0, photo1 (fine alone), photo2, progressive
    assert batch.cpu_fallbacks[GPU_IMAGE_ERROR] == 1
    got = dict(zip(batch.keys, batch.images.numpy(), strict=True))
    assert np.array_equal(got["photo3"], decode_rgb(broken, S))
    assert len(batch.keys) == 10


def test_bad_device_output_falls_back(photos):
    items = [(f"p{i}", _encode(photos[i], quality=95)) for i in range(3)]
    good = torchvision_decode("cpu")

    def half_wrong(tensors):
        out = good(tensors)
        return [o[:, :-1] if i == 1 else o for i, o in enumerate(out)]

    with ImageDecoder(S, cpu_workers=1, gpu_decode=half_wrong) as decoder:
        batch = decoder.decode(items)
    _check_accounting(items, batch)
    assert batch.keys == ["p0", "p1", "p2"] and batch.gpu_decoded == 2
    assert batch.cpu_fallbacks == {GPU_BAD_OUTPUT: 1}
    assert np.array_equal(batch.images[1].numpy(), decode_rgb(items[1][1], S))


def test_empty_and_all_failed():
    for gpu_decode in (None, torchvision_decode("cpu")):
        with ImageDecoder(S, cpu_workers=2, gpu_decode=gpu_decode) as decoder:
            assert tuple(decoder.decode([]).images.shape) == (0, S, S, 3)
            batch = decoder.decode([("a", b""), ("b", b"\xff\xd8\xff\xe0junk")])
        assert batch.keys == [] and [k for k, _, _ in batch.failed] == ["a", "b"]
        assert tuple(batch.images.shape) == (0, S, S, 3)


def _patch(data: bytes, marker: int, offset: int, value: int) -> bytes:
    """Set byte ``offset`` of the first ``marker`` segment's payload (after the 2 length bytes)."""
    i = data.index(bytes([0xFF, marker]))
    out = bytearray(data)
    out[i + 4 + offset] = value
    return bytes(out)


def test_header_routing(photos):
    base = _encode(photos[0], quality=95)  # 4:2:0, JFIF, baseline
    assert gpu_refusal(base, S) is None
    h = parse_jpeg_header(base)
    assert (h.sof, h.precision, h.width, h.height, h.jfif) == (0xC0, 8, S, S, True)
    assert [c[1:] for c in h.components] == [(2, 2), (1, 1), (1, 1)]
    assert gpu_refusal(_encode(photos[0], quality=95, subsampling=0), S) is None  # 4:4:4
    assert gpu_refusal(_encode(photos[0], quality=95, subsampling=1), S) is None  # 4:2:2
    assert gpu_refusal(_encode(photos[0], quality=95, progressive=True), S) is None
    assert gpu_refusal(base + b"\x00\x00", S) is None  # padding after EOI
    assert gpu_refusal(base[:-2], S) == NO_EOI
    assert gpu_refusal(base[:100], S) == UNPARSED_HEADER
    assert gpu_refusal(b"\xff\xd8\xff", S) == UNPARSED_HEADER
    assert gpu_refusal(_patch(base, 0xC0, 0, 12), S) == PRECISION  # 12-bit samples
    assert gpu_refusal(base.replace(b"\xff\xc0", b"\xff\xc9", 1), S) == CODING  # arithmetic coding
    assert gpu_refusal(base.replace(b"\xff\xc0", b"\xff\xc3", 1), S) == CODING  # lossless
    assert gpu_refusal(_patch(base, 0xC0, 7, 0x41), S) == SUBSAMPLING  # luma 4x1 (4:1:1)
    assert gpu_refusal(_patch(base, 0xC0, 10, 0x21), S) == SUBSAMPLING  # chroma not 1x1
    assert gpu_refusal(_encode(photos[0], mode="CMYK", quality=95), S) == CMYK
    assert gpu_refusal(_encode(photos[0], mode="L", quality=95), S) == GRAYSCALE
    assert gpu_refusal(_encode(photos[0], quality=95, keep_rgb=True), S) == RGB_CODED
    assert gpu_refusal(_encode(photos[0], quality=95), S * 2) == WRONG_SIZE
    assert gpu_refusal(_encode(photos[0], "PNG"), S) == NOT_JPEG


def test_process_pool_matches_threads(mixed):
    with ImageDecoder(S, cpu_workers=2, cpu_pool="process") as procs, ImageDecoder(S, cpu_workers=2) as threads:
        a, b = procs.decode(mixed), threads.decode(mixed)
    assert a.keys == b.keys and a.failed == b.failed and a.sha256 == b.sha256
    assert torch.equal(a.images, b.images)


def test_constructor_checks():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            ImageDecoder(S, "cuda")
    with pytest.raises(ValueError, match="cpu or cuda"):
        ImageDecoder(S, "meta")
    with pytest.raises(ValueError, match="cpu_workers"):
        ImageDecoder(S, cpu_workers=0)
    decoder = ImageDecoder(S, cpu_workers=2)
    decoder.close()
    with pytest.raises(RuntimeError, match="closed"):
        decoder.decode([("a", b"")] * 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_on_cuda(mixed):
    data = dict(mixed)
    with ImageDecoder(S, "cuda", cpu_workers=2) as decoder:
        batch = decoder.decode(mixed)
    assert batch.images.device.type == "cuda"
    _check_accounting(mixed, batch.__class__(**{**batch.__dict__, "images": batch.images.cpu()}))
    assert batch.gpu_decoded == 5
    got = dict(zip(batch.keys, batch.images.cpu().numpy(), strict=True))
    for key in ("gray", "cmyk", "png", "webp", "rgb-coded"):
        assert np.array_equal(got[key], decode_rgb(data[key], S)), key
    for key in ("photo0", "photo1", "photo2", "photo3", "progressive"):
        diff = np.abs(got[key].astype(int) - decode_rgb(data[key], S))
        assert diff.mean() < 2, key  # torchvision's own nvJPEG test tolerance
