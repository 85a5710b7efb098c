"""The device side of encoding: fixed-shape batches through a VQGAN in `exact` or `fast` mode, with OOM backoff.

Modes (`LAION_VQ_ENCODE_MODE`):

exact
    fp32 everywhere, TF32 off. On CPU the codes equal the taming reference bit for bit; they do not
    depend on batch size, threads or load (`laion_vq_tests/test_encode_engine.py`).
fast
    The encoder body in bf16 (channels-last on CUDA), compiled with `torch.compile` (kernels cached on
    disk, see :func:`use_compile_cache`); `quant_conv` and the quantizer head stay fp32, so near-ties
    between thousands of logits or distances are not made exact by rounding. Codes agree with `exact` on
    most positions, not all (README: "Encode modes").

Every batch is padded to the engine's batch size, so compiled kernels and cuDNN plans are reused; padding
rows are dropped from the result. On CUDA the uint8 batch travels from pinned host memory on a copy stream
of its own and is normalised on the device; codes come back asynchronously (``Pending.result`` waits).
A CUDA out-of-memory error halves the batch size and re-runs the same images: nothing is lost, nothing
is encoded twice into the output.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from laion_vq.vqgan.model import VQGANEncoder, preprocess
from laion_vq.vqgan.quantizers import GumbelQuantizeHead
from laion_vq.vqgan.sampling import check_index_rule, key_seeds

__all__ = [
    "ENCODE_MODES",
    "CallableEngine",
    "EngineStats",
    "ModelEngine",
    "Pending",
    "choose_batch_size",
    "use_compile_cache",
]

ENCODE_MODES = ("exact", "fast")
#: the precision each mode records in the parquet's provenance (`dtype`)
MODE_DTYPE = {"exact": "fp32", "fast": "bf16"}
#: batch size when not set and not on CUDA (the f8 encoder holds ~0.4 GB of activations per image on CPU)
CPU_BATCH_SIZE = 8
MAX_AUTO_BATCH = 512
#: share of the free GPU memory an automatically sized batch may take
GPU_MEMORY_SHARE = 0.7


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError)


@dataclass
class EngineStats:
    """What a run's encoder did: shown on the asset and printed by the benchmarks."""

    images: int = 0
    batches: int = 0
    padded_images: int = 0
    oom_retries: int = 0
    busy_seconds: float = 0.0
    compile_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


class Pending:
    """Codes of one submitted batch; ``result()`` waits for the device copy only when asked."""

    def __init__(self, codes: torch.Tensor, n: int, event: torch.cuda.Event | None = None) -> None:
        self._codes, self._n, self._event = codes, n, event

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._codes[: self._n].numpy()


def use_compile_cache(cache_dir: str | None) -> str | None:
    """Point inductor's on-disk caches (FX graphs, kernels, autotuning) at ``cache_dir``, so a second process
    compiling the same model on the same machine loads kernels instead of compiling them again."""
    if not cache_dir:
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.makedirs(cache_dir, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        inductor_config.autotune_local_cache = True
    except (ImportError, AttributeError):  # pragma: no cover - older torch: the env var alone still works
        pass
    return cache_dir


class ModelEngine:
    """Runs a :class:`VQGANEncoder` on uint8 NHWC batches in one mode, on the model's device."""

    def __init__(
        self,
        model: VQGANEncoder,
        *,
        mode: str = "exact",
        batch_size: int = 0,
        index_rule: str = "argmax",
        compile: bool | None = None,
        compile_cache_dir: str | None = None,
        log: Callable[[str], None] | None = None,
        image_size: int | None = None,
    ) -> None:
        """`image_size`: the side of the images it is given (`LAION_VQ_IMAGE_SIZE`; default the model's training
        resolution). A convolutional encoder takes any multiple of its factor: 512 px with f16 gives 32×32."""
        if mode not in ENCODE_MODES:
            raise ValueError(f"encode mode must be one of {ENCODE_MODES}, got {mode!r}")
        check_index_rule(index_rule, model.config.quantizer, model.config.name)
        self.model = model.eval()
        self.mode = mode
        self.index_rule = index_rule
        self.device = next(model.parameters()).device
        self.image_size = image_size or model.config.resolution
        self.grid = model.config.code_grid(self.image_size)
        self.stats = EngineStats()
        self._log = log or (lambda _message: None)
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        if self._cuda:
            # exact: the reference codes. fast: bf16 does not use TF32 anyway; fp32 head stays IEEE.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        # the encoder, or torch.compile's wrapper around it (a Module at runtime, typed as a plain callable)
        self._body: Callable[..., torch.Tensor] = model.encoder
        self._eager_body: nn.Module = model.encoder
        if mode == "fast":
            body = copy.deepcopy(model.encoder).to(torch.bfloat16)
            if self._cuda:
                body = body.to(memory_format=torch.channels_last)
            self._body = self._eager_body = body
            if compile if compile is not None else True:
                use_compile_cache(compile_cache_dir)
                self._body = torch.compile(body, dynamic=False)
        self._compiled_shapes: set[int] = set()
        self.batch_size = batch_size if batch_size > 0 else choose_batch_size(self)
        self.stats.batch_sizes.append(self.batch_size)

    # -- the forward pass -------------------------------------------------------------------------------------

    def _codes(self, batch: torch.Tensor, seeds: torch.Tensor | None, *, eager: bool = False) -> torch.Tensor:
        """uint8 NHWC on the device → int16 codes (N, g, g) on the device."""
        x = preprocess(batch)  # exactly taming's x / 127.5 - 1, in fp32
        model = self.model
        if self.mode == "exact":
            codes = model(x, seeds)
        else:
            body: Callable[..., torch.Tensor] = self._eager_body if eager else self._body
            h = body(x.to(torch.bfloat16))
            z = model.quant_conv(h.float())
            if seeds is None:
                codes = model.quantize.indices(z)
            else:
                # check_index_rule (in __init__) lets only Gumbel heads take the `sample` rule
                assert isinstance(model.quantize, GumbelQuantizeHead)
                codes = model.quantize.sample(z, seeds)
        return codes.to(torch.int16)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if not self._cuda or batch.device == self.device:
            return batch.to(self.device)
        assert self._copy_stream is not None
        host = batch if batch.is_pinned() else batch.contiguous().pin_memory()
        with torch.cuda.stream(self._copy_stream):
            on_device = host.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        on_device.record_stream(torch.cuda.current_stream(self.device))
        return on_device

    def _run_padded(self, batch: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
        """One forward pass at exactly ``self.batch_size`` rows (the last ones repeat the final image)."""
        n = batch.shape[0]
        size = self.batch_size
        if n < size:
            batch = torch.cat([batch, batch[-1:].expand(size - n, *batch.shape[1:])])
            if seeds is not None:
                seeds = torch.cat([seeds, seeds[-1:].expand(size - n)])
            self.stats.padded_images += size - n
        first = size not in self._compiled_shapes
        start = time.perf_counter()
        codes = self._codes(batch, seeds)
        if first and self.mode == "fast":
            if self._cuda:
                torch.cuda.synchronize(self.device)
            self.stats.compile_seconds += time.perf_counter() - start
        self._compiled_shapes.add(size)
        return codes[:n]

    @torch.inference_mode()
    def submit(self, images: np.ndarray | torch.Tensor, keys: Sequence[str] | None = None) -> Pending:
        """Start encoding ``images`` (uint8 (N, S, S, 3), host or device); N may exceed the batch size."""
        batch = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        n = batch.shape[0]
        if (
            batch.dtype != torch.uint8
            or batch.ndim != 4
            or tuple(batch.shape[1:])
            != (
                self.image_size,
                self.image_size,
                3,
            )
        ):
            raise ValueError(
                f"expected uint8 images of shape (N, {self.image_size}, {self.image_size}, 3), "
                f"got {batch.dtype} {tuple(batch.shape)}"
            )
        seeds = None
        if self.index_rule == "sample":
            if keys is None or len(keys) != n:
                raise ValueError(f"index rule 'sample' needs one key per image: {n} images, {len(keys or [])} keys")
            seeds = key_seeds(list(keys)).to(self.device)
        start = time.perf_counter()
        out = torch.empty((n, self.grid, self.grid), dtype=torch.int16, device=self.device)
        if n:
            on_device = self._to_device(batch)
            done = 0
            while done < n:
                size = self.batch_size
                part = slice(done, min(n, done + size))
                try:
                    out[part] = self._run_padded(on_device[part], None if seeds is None else seeds[part])
                except Exception as err:  # only OOM is retried; the rest propagates
                    if not _is_oom(err) or size == 1:
                        raise
                    self._back_off(err)
                    continue  # the same images again, at half the batch size
                done = part.stop
                self.stats.batches += 1
        self.stats.images += n
        event = None
        if self._cuda:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            out = host
        self.stats.busy_seconds += time.perf_counter() - start
        return Pending(out, n, event)

    def _back_off(self, err: BaseException) -> None:
        old = self.batch_size
        self.batch_size = max(1, old // 2)
        self.stats.oom_retries += 1
        self.stats.batch_sizes.append(self.batch_size)
        if self._cuda:
            torch.cuda.empty_cache()
        self._log(f"out of memory at batch {old} ({str(err).splitlines()[0][:160]}); retrying at {self.batch_size}")

    def encode(self, images: np.ndarray | torch.Tensor, keys: Sequence[str] | None = None) -> np.ndarray:
        """Encode and wait: int16 codes (N, g, g) on the host."""
        return self.submit(images, keys).result()

    def release(self) -> None:
        """Drop the compiled body and give cached GPU memory back (between runs of one process)."""
        self._body = self._eager_body = self.model.encoder
        if self._cuda:
            import gc

            torch.cuda.synchronize(self.device)
            gc.collect()
            torch.cuda.empty_cache()


class CallableEngine:
    """Adapts an ``encode(batch, keys) -> codes`` function (tests, the spine's callers) to the engine API."""

    def __init__(self, encode: Callable[[np.ndarray, list[str]], np.ndarray], batch_size: int, grid: int) -> None:
        self._encode, self.batch_size, self.grid = encode, batch_size, grid
        self.mode = "callable"
        self.stats = EngineStats(batch_sizes=[batch_size])

    def submit(self, images: np.ndarray | torch.Tensor, keys: Sequence[str] | None = None) -> Pending:
        batch = images.numpy() if isinstance(images, torch.Tensor) else images
        start = time.perf_counter()
        codes = np.asarray(self._encode(batch, list(keys or [])))
        self.stats.busy_seconds += time.perf_counter() - start
        n = batch.shape[0]
        if codes.shape != (n, self.grid, self.grid):
            raise RuntimeError(f"encoder returned shape {codes.shape}, expected {(n, self.grid, self.grid)}")
        self.stats.images += n
        self.stats.batches += 1
        return Pending(torch.from_numpy(np.ascontiguousarray(codes)), n)

    def encode(self, images: np.ndarray | torch.Tensor, keys: Sequence[str] | None = None) -> np.ndarray:
        return self.submit(images, keys).result()

    def release(self) -> None:
        pass


def choose_batch_size(engine: ModelEngine, probe: int = 4) -> int:
    """The batch size for this device: on CUDA the largest power of two whose activations fit in
    ``GPU_MEMORY_SHARE`` of the free memory, measured with a probe batch; elsewhere ``CPU_BATCH_SIZE``."""
    if not engine._cuda:
        return CPU_BATCH_SIZE
    device = engine.device
    engine.batch_size = probe
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    images = torch.zeros((probe, engine.image_size, engine.image_size, 3), dtype=torch.uint8, device=device)
    with torch.inference_mode():
        engine._codes(images, None, eager=True)  # compiling here would compile a shape never used again
    torch.cuda.synchronize(device)
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe)
    free, _total = torch.cuda.mem_get_info(device)
    size = batch_size_for(free, per_image)
    engine._log(f"batch size {size}: {per_image / 2**20:.0f} MiB per image, {free / 2**30:.1f} GiB free")
    return size


def batch_size_for(free_bytes: int, per_image_bytes: int) -> int:
    """The largest power of two whose activations fit ``GPU_MEMORY_SHARE`` of the free memory (1 … MAX_AUTO_BATCH):
    powers of two keep compiled shapes few and halve cleanly on out-of-memory."""
    fit = int(free_bytes * GPU_MEMORY_SHARE // max(1, per_image_bytes))
    return 1 << max(0, min(fit, MAX_AUTO_BATCH).bit_length() - 1)
