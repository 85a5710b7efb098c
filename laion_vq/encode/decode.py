"""Image bytes → uint8 RGB batches: PIL on every core, or batched nvJPEG on CUDA with a per-image PIL fallback.

On CPU every image goes through `safe_decode` (PIL, exactly what the codes stage always did, so pixels are
bit-identical to it), fanned out over a thread pool (PIL and hashlib release the GIL; threads beat
processes, see benchmarks/bench_jpeg_decode.py) or, on request, a process pool.

On CUDA the JPEGs that nvJPEG decodes like libjpeg would go in ONE batched
``torchvision.io.decode_jpeg(..., device=cuda)`` call; the rest go to PIL, recognised from the header before
the batch (`gpu_refusal`), so that one odd image does not fail the batch:

- not a JPEG (PNG/WebP/GIF left by other writers, empty or random bytes): nvJPEG decodes JPEG only;
- CMYK/YCCK (4 components): nvJPEG needs an opt-in it is not given and converts CMYK unlike PIL;
- grayscale (1 component): PIL's L→RGB is exact; kept on the path every other reader uses;
- RGB-coded JPEGs (Adobe APP14 transform 0, or 'R','G','B' component ids): nvJPEG would treat them as YCbCr;
- arithmetic, lossless, hierarchical coding or 12-bit samples: not supported by nvJPEG (PIL refuses most too);
- chroma sampling other than 4:4:4/4:2:2/4:4:0/4:2:0 with 1x1 chroma: nvJPEG raises on "unknown" ones;
- a frame size other than ``image_size``: PIL gives today's "image is WxH, expected SxS" reason;
- no end-of-image marker (truncated): nvJPEG may return a grey-filled image where PIL raises "truncated".

What still makes the batch raise is retried image by image on the device; what fails alone goes to PIL; what
PIL cannot decode is ``failed`` with today's reason. EXIF orientation is ignored on both paths
(``decode_jpeg``'s default, and PIL's ``Image.open`` never applies it; img2dataset already applied it).
nvJPEG is not bit-identical to libjpeg-turbo (IDCT and chroma upsampling differ; torchvision's own test allows a
mean abs difference below 2): the benchmark measures the pixel and code differences.

No Dagster here: the codes stage and the encode pipeline both call this module.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DecodedBatch",
    "ImageDecoder",
    "JpegHeader",
    "decode_rgb",
    "gpu_refusal",
    "parse_jpeg_header",
    "safe_decode",
    "sha256_hex",
    "torchvision_decode",
]

JPEG_MAGIC = b"\xff\xd8\xff"

GpuDecode = Callable[[list[torch.Tensor]], list[torch.Tensor]]

# Fallback reasons (keys of DecodedBatch.cpu_fallbacks). Routed before the batch:
NOT_JPEG = "not jpeg"
UNPARSED_HEADER = "unparsed jpeg header"
CMYK = "cmyk/ycck"
GRAYSCALE = "grayscale"
RGB_CODED = "rgb-coded jpeg"
CODING = "not baseline/progressive huffman"
PRECISION = "not 8-bit"
COMPONENTS = "unusual component count"
SUBSAMPLING = "unusual chroma subsampling"
WRONG_SIZE = "wrong size"
NO_EOI = "no end-of-image marker"
# ...and after the device refused them (a batch call that raises is retried image by image first):
GPU_IMAGE_ERROR = "gpu image error"  # the image alone made the device decode raise
GPU_BAD_OUTPUT = "gpu bad output"  # the device returned another shape/dtype than (3, S, S) uint8


# --------------------------------------------------------------------------- the CPU path (today's)


def decode_rgb(data: bytes, image_size: int) -> np.ndarray:
    """Image bytes → HxWx3 uint8 RGB with PIL; wrong size or undecodable is a ValueError/OSError with the reason."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    if rgb.size != (image_size, image_size):
        raise ValueError(f"image is {rgb.size[0]}x{rgb.size[1]}, expected {image_size}x{image_size}")
    return np.asarray(rgb, dtype=np.uint8)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def failure_reason(err: BaseException) -> str:
    """The counted reason of a decode failure: exception type and message, without addresses or ``<...>`` reprs.

    (``\b`` before ``0x``: the stage's old pattern also ate "0x128" out of "image is 100x128".)
    """
    reason = re.sub(r"\s*<[^>]*>|\b0x[0-9a-fA-F]+", "", str(err)).strip()[:120]
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def safe_decode(item: tuple[str, bytes], image_size: int) -> tuple[str, np.ndarray | None, str, str]:
    """(key, image or None, failure reason, sha256 hex of the very bytes decoded)."""
    key, data = item
    digest = sha256_hex(data)
    try:
        return key, decode_rgb(data, image_size), "", digest
    except Exception as err:  # noqa: BLE001 - every decode failure is counted by its reason
        return key, None, failure_reason(err), digest


# --------------------------------------------------------------------------- JPEG header sniffing

# SOFn markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Baseline, extended sequential and progressive DCT, Huffman-coded: what nvJPEG decodes.
_GPU_SOF = frozenset({0xC0, 0xC1, 0xC2})
# (H, V) of the luma component, with both chroma components 1x1: 4:4:4, 4:2:2, 4:4:0, 4:2:0.
_GPU_LUMA_SAMPLING = frozenset({(1, 1), (2, 1), (1, 2), (2, 2)})
_RGB_COMPONENT_IDS = (ord("R"), ord("G"), ord("B"))


@dataclass(frozen=True)
class JpegHeader:
    """What the markers before the first scan say about a JPEG."""

    sof: int  #: the frame marker's second byte (0xC0 baseline, 0xC2 progressive, ...)
    precision: int
    height: int
    width: int
    components: tuple[tuple[int, int, int], ...]  #: (component id, H sampling, V sampling)
    adobe_transform: int | None  #: APP14 "Adobe" colour transform (0 = none/RGB or CMYK, 1 = YCbCr, 2 = YCCK)
    jfif: bool  #: an APP0 "JFIF" segment was seen


def parse_jpeg_header(data: bytes) -> JpegHeader | None:
    """Walk the marker segments from SOI to the first SOS; None when there is no complete frame header."""
    if not data.startswith(JPEG_MAGIC):
        return None
    n, i = len(data), 2
    sof: tuple[int, int, int, int, tuple[tuple[int, int, int], ...]] | None = None
    adobe: int | None = None
    jfif = False
    while i + 1 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS: the header is over
            break
        if i + 4 > n:
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        end = i + 2 + length
        if length < 2 or end > n:
            return None
        payload = data[i + 4 : end]
        if marker == 0xE0 and payload.startswith(b"JFIF\x00"):
            jfif = True
        elif marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe = payload[11]
        elif marker in _SOF_MARKERS and sof is None:
            if len(payload) < 6:
                return None
            count = payload[5]
            if len(payload) < 6 + 3 * count:
                return None
            comps = tuple(
                (payload[6 + 3 * c], payload[7 + 3 * c] >> 4, payload[7 + 3 * c] & 0x0F) for c in range(count)
            )
            sof = (
                marker,
                payload[0],
                int.from_bytes(payload[1:3], "big"),
                int.from_bytes(payload[3:5], "big"),
                comps,
            )
        i = end
    if sof is None:
        return None
    return JpegHeader(*sof, adobe_transform=adobe, jfif=jfif)


def gpu_refusal(data: bytes, image_size: int) -> str | None:
    """Why these bytes should not go to nvJPEG (a fallback reason), or None when they can."""
    if not data.startswith(JPEG_MAGIC):
        return NOT_JPEG
    header = parse_jpeg_header(data)
    if header is None:
        return UNPARSED_HEADER
    ncomp = len(header.components)
    if ncomp == 4:
        return CMYK
    if header.sof not in _GPU_SOF:
        return CODING
    if header.precision != 8:
        return PRECISION
    if ncomp == 1:
        return GRAYSCALE
    if ncomp != 3:
        return COMPONENTS
    # libjpeg's rule for 3 components: JFIF or Adobe transform 1 means YCbCr; Adobe 0, or ids R,G,B, means RGB
    rgb_ids = tuple(c[0] for c in header.components) == _RGB_COMPONENT_IDS
    if header.adobe_transform == 0 or (header.adobe_transform is None and not header.jfif and rgb_ids):
        return RGB_CODED
    (_, lh, lv), *chroma = header.components
    if (lh, lv) not in _GPU_LUMA_SAMPLING or any((h, v) != (1, 1) for _, h, v in chroma):
        return SUBSAMPLING
    if (header.width, header.height) != (image_size, image_size):
        return WRONG_SIZE
    # Padding after EOI is allowed; a stream that stops before it is truncated (or has trailing junk).
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return NO_EOI
    return None


# --------------------------------------------------------------------------- the device path


def torchvision_decode(device: str | torch.device) -> GpuDecode:
    """``torchvision.io.decode_jpeg(list, mode=RGB, device=device)``: nvJPEG on CUDA, libjpeg-turbo on CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    dev = torch.device(device)

    def decode(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; the API still works
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=dev)

    return decode


@dataclass
class DecodedBatch:
    keys: list[str]  #: decoded images' keys, input order
    images: torch.Tensor  #: (len(keys), S, S, 3) uint8 RGB NHWC, on the decoder's device
    sha256: list[str]  #: hex sha256 of the exact bytes each decoded image came from
    failed: list[tuple[str, str, str]]  #: (key, reason, sha256) per undecodable input, input order
    gpu_decoded: int = 0  #: how many went through the batched device path
    cpu_fallbacks: dict[str, int] = field(default_factory=dict)  #: why images went to PIL instead -> count
    gpu_batch_errors: int = 0  #: batched device calls that raised (their images were retried one by one)

    @property
    def undecodable(self) -> Counter[str]:
        """Failure reason -> count, as the codes stage counts them."""
        return Counter(reason for _, reason, _ in self.failed)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork after torch (threads, maybe CUDA) is unsafe; forkserver where there is one, else spawn
    return multiprocessing.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")


class ImageDecoder:
    """Decodes ``(key, bytes)`` lists into `DecodedBatch`es of ``image_size``² RGB images on ``device``.

    ``device`` cpu (default): PIL for every image over ``cpu_workers`` (default ``os.cpu_count()``) threads, or
    processes with ``cpu_pool="process"``. ``device`` cuda: batched nvJPEG for the JPEGs `gpu_refusal` lets
    through, PIL for the rest (and for what the device fails on), merged back in input order.
    Processes need the ``if __name__ == "__main__":`` guard in the main script (they start by forkserver or
    spawn, never fork: torch may hold threads or CUDA) and pickle every image back; threads are the default.
    ``gpu_decode`` replaces nvJPEG (list of 1-D uint8 CPU tensors -> list of (3, S, S) uint8 tensors); given on
    a CPU device it runs the same batched path there (tests, or ``torchvision_decode("cpu")``).
    """

    def __init__(
        self,
        image_size: int,
        device: str | torch.device = "cpu",
        *,
        cpu_workers: int | None = None,
        gpu_decode: GpuDecode | None = None,
        cpu_pool: Literal["thread", "process"] = "thread",
    ) -> None:
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"ImageDecoder(device={str(dev)!r}): CUDA is not available on this machine "
                    "(torch.cuda.is_available() is False); decode on device='cpu' instead"
                )
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise RuntimeError(
                    f"ImageDecoder(device={str(dev)!r}): only {torch.cuda.device_count()} CUDA device(s) here"
                )
        elif dev.type != "cpu":
            raise ValueError(f"ImageDecoder decodes on cpu or cuda, not {str(dev)!r}")
        if cpu_pool not in ("thread", "process"):
            raise ValueError(f"cpu_pool is 'thread' or 'process', not {cpu_pool!r}")
        workers = (os.cpu_count() or 1) if cpu_workers is None else cpu_workers
        if workers < 1:
            raise ValueError(f"cpu_workers must be >= 1, got {cpu_workers}")
        self.image_size = image_size
        self.device = dev
        self.cpu_workers = workers
        self.cpu_pool = cpu_pool
        self.gpu_decode: GpuDecode | None = gpu_decode
        if self.gpu_decode is None and dev.type == "cuda":
            self.gpu_decode = torchvision_decode(dev)
        self._pool: Executor | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def batched(self) -> bool:
        """Whether JPEGs go through the batched device decode (CUDA, or an injected ``gpu_decode``)."""
        return self.gpu_decode is not None

    # -- pool

    def _executor(self) -> Executor | None:
        if self.cpu_workers == 1:
            return None
        with self._lock:
            if self._closed:
                raise RuntimeError("ImageDecoder is closed")
            if self._pool is None:
                if self.cpu_pool == "process":
                    self._pool = ProcessPoolExecutor(self.cpu_workers, mp_context=_pool_context())
                else:
                    self._pool = ThreadPoolExecutor(self.cpu_workers, thread_name_prefix="image-decode")
            return self._pool

    def _map(self, fn: Callable, items: list) -> list:
        pool = self._executor()
        if pool is None or len(items) <= 1:
            return [fn(item) for item in items]
        if isinstance(pool, ProcessPoolExecutor):
            return list(pool.map(fn, items, chunksize=max(1, len(items) // (4 * self.cpu_workers))))
        return list(pool.map(fn, items))

    def _pil(self, items: list[tuple[str, bytes]]) -> list[tuple[str, np.ndarray | None, str, str]]:
        return self._map(partial(safe_decode, image_size=self.image_size), items)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ImageDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decoding

    def _empty(self) -> torch.Tensor:
        s = self.image_size
        return torch.empty((0, s, s, 3), dtype=torch.uint8, device=self.device)

    def decode(self, items: list[tuple[str, bytes]]) -> DecodedBatch:
        """Decode ``items`` (key, image bytes); every input ends in ``keys`` or ``failed``, in input order."""
        if not self.batched:
            return self._decode_cpu(items)
        return self._decode_batched(items)

    def _decode_cpu(self, items: list[tuple[str, bytes]]) -> DecodedBatch:
        keys, images, digests, failed = [], [], [], []
        for key, img, reason, digest in self._pil(items):
            if img is None:
                failed.append((key, reason, digest))
            else:
                keys.append(key)
                images.append(img)
                digests.append(digest)
        batch = torch.from_numpy(np.stack(images)) if images else self._empty()
        return DecodedBatch(keys, batch.to(self.device), digests, failed)

    def _device_decode(self, tensors: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """Decode on the device; per image its (S, S, 3) tensor or the fallback reason."""
        assert self.gpu_decode is not None
        s = self.image_size

        def check(out: object) -> torch.Tensor | str:
            if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or tuple(out.shape) != (3, s, s):
                return GPU_BAD_OUTPUT
            return out.to(self.device).permute(1, 2, 0)

        outs = self.gpu_decode(tensors)
        if len(outs) != len(tensors):
            raise RuntimeError(f"device decode returned {len(outs)} images for {len(tensors)} inputs")
        return [check(out) for out in outs]

    def _decode_batched(self, items: list[tuple[str, bytes]]) -> DecodedBatch:
        n = len(items)
        digests = [sha256_hex(data) for _, data in items]
        routes = [gpu_refusal(data, self.image_size) for _, data in items]
        fallbacks: Counter[str] = Counter(r for r in routes if r is not None)
        results: list[torch.Tensor | None] = [None] * n
        reasons: list[str] = [""] * n
        to_cpu = [i for i in range(n) if routes[i] is not None]

        on_gpu = [i for i in range(n) if routes[i] is None]
        batch_errors = 0
        if on_gpu:
            tensors = [torch.frombuffer(bytearray(items[i][1]), dtype=torch.uint8) for i in on_gpu]
            try:
                outs = self._device_decode(tensors)
            except Exception:  # noqa: BLE001 - nvJPEG fails the whole batch for one bad image: retry alone
                batch_errors = 1
                outs = []
                for t in tensors:
                    try:
                        outs.extend(self._device_decode([t]))
                    except Exception:  # noqa: BLE001 - this image goes to PIL, which decides
                        outs.append(GPU_IMAGE_ERROR)
            for i, out in zip(on_gpu, outs, strict=True):
                if isinstance(out, str):
                    fallbacks[out] += 1
                    to_cpu.append(i)
                else:
                    results[i] = out
        gpu_decoded = sum(r is not None for r in results)

        if to_cpu:
            to_cpu.sort()
            decoded = self._pil([items[i] for i in to_cpu])
            ok = [(i, img) for i, (_, img, _, _) in zip(to_cpu, decoded, strict=True) if img is not None]
            if ok:
                moved = torch.from_numpy(np.stack([img for _, img in ok])).to(self.device)
                for j, (i, _) in enumerate(ok):
                    results[i] = moved[j]
            for i, (_, img, reason, _) in zip(to_cpu, decoded, strict=True):
                if img is None:
                    reasons[i] = reason

        keep = [i for i in range(n) if results[i] is not None]
        images = torch.stack([results[i] for i in keep]) if keep else self._empty()
        return DecodedBatch(
            keys=[items[i][0] for i in keep],
            images=images,
            sha256=[digests[i] for i in keep],
            failed=[(items[i][0], reasons[i], digests[i]) for i in range(n) if results[i] is None],
            gpu_decoded=gpu_decoded,
            cpu_fallbacks=dict(fallbacks),
            gpu_batch_errors=batch_errors,
        )
