"""Image bytes → uint8 RGB batches: PIL on every core, or batched nvJPEG on CUDA with a per-image PIL fallback.

On CPU every image goes through `safe_decode`, PIL as the codes stage always decoded, so pixels are
bit-identical to it; a thread pool spreads it over the cores (PIL and hashlib release the GIL), a process
pool on request. On CUDA the JPEGs `gpu_refusal` (`laion_vq.encode.jpeg_header`) lets through go in ONE
batched ``torchvision.io.decode_jpeg(..., device=cuda)`` call, so that the decode keeps up with the GPU encoder;
the rest go to PIL, so that one odd image never fails the batch.

What still makes the batch raise is retried image by image on the device; what fails alone goes to PIL; what
PIL cannot decode is ``failed`` with its reason. EXIF orientation is ignored on both paths (img2dataset already
applied it). nvJPEG is not bit-identical to libjpeg-turbo (IDCT and chroma upsampling differ):
``benchmarks/bench_jpeg_decode.py`` measures the speeds and the pixel and code differences.

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

from laion_vq.encode.jpeg_header import gpu_refusal

__all__ = [
    "DecodedBatch",
    "ImageDecoder",
    "decode_rgb",
    "safe_decode",
    "sha256_hex",
    "torchvision_decode",
]

GpuDecode = Callable[[list[torch.Tensor]], list[torch.Tensor]]

# Fallback reasons beside the header's (`laion_vq.encode.jpeg_header`), after the device refused an image
# (a batch call that raises is retried image by image first):
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
    except Exception as err:  # every decode failure is counted by its reason
        return key, None, failure_reason(err), digest


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
            except Exception:  # nvJPEG fails the whole batch for one bad image: retry alone
                batch_errors = 1
                outs = []
                for t in tensors:
                    try:
                        outs.extend(self._device_decode([t]))
                    except Exception:  # this image goes to PIL, which decides
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
        images = torch.stack([r for r in results if r is not None]) if keep else self._empty()
        return DecodedBatch(
            keys=[items[i][0] for i in keep],
            images=images,
            sha256=[digests[i] for i in keep],
            failed=[(items[i][0], reasons[i], digests[i]) for i in range(n) if results[i] is None],
            gpu_decoded=gpu_decoded,
            cpu_fallbacks=dict(fallbacks),
            gpu_batch_errors=batch_errors,
        )
