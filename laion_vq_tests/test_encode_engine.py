"""The encoder engine: exact mode equals the reference path, fixed-shape padding changes nothing, OOM backoff
loses and duplicates nothing, `sample` codes depend only on the key, fast mode's compiled kernels are cached.

No GPU on this machine: the CUDA out-of-memory error is injected (a real `torch.OutOfMemoryError`, raised by
an engine whose forward pass refuses batches above a size), which is the code path a GPU takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from laion_vq.encode.engine import CPU_BATCH_SIZE, CallableEngine, ModelEngine, batch_size_for
from laion_vq.vqgan.model import VQGANEncoder
from laion_vq.vqgan.reference import sample_photos

from .conftest import TINY_VQ


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return sample_photos(7)


def test_exact_mode_equals_the_reference_path_at_any_batch_size(tiny_encoder, photos):
    _config, model = tiny_encoder
    reference = model.encode_uint8(photos, batch_size=7)
    for batch_size in (1, 3, 4, 16):
        engine = ModelEngine(model, mode="exact", batch_size=batch_size)
        codes = engine.encode(photos)
        assert codes.dtype == np.int16 and codes.shape == (7, 32, 32)
        np.testing.assert_array_equal(codes, reference)
    # batch 4 over 7 images: the second batch ran padded to 4 rows, the padding never reached the output
    assert engine.stats.images == 7


def test_batch_size_from_free_memory():
    """The arithmetic behind LAION_VQ_ENCODE_BATCH_SIZE=0 on CUDA (the probe itself needs a GPU)."""
    gib, mib = 2**30, 2**20
    assert batch_size_for(70 * gib, 120 * mib) == 256  # 70 GiB free x 0.7 / 120 MiB = 418 -> 256
    assert batch_size_for(200 * gib, 120 * mib) == 512  # capped
    assert batch_size_for(1 * gib, 2 * gib) == 1  # never 0
    assert batch_size_for(10 * gib, 0) == 512


def test_cpu_batch_size_when_unset(tiny_encoder):
    _config, model = tiny_encoder
    assert ModelEngine(model).batch_size == CPU_BATCH_SIZE


def test_padding_keeps_the_shape_fixed(tiny_encoder, photos):
    _config, model = tiny_encoder
    seen: list[int] = []

    class Recording(ModelEngine):
        def _codes(self, batch, seeds, *, eager=False):
            seen.append(batch.shape[0])
            return super()._codes(batch, seeds, eager=eager)

    engine = Recording(model, mode="exact", batch_size=4)
    engine.encode(photos[:5])
    engine.encode(photos[:1])
    assert seen == [4, 4, 4] and engine.stats.padded_images == 3 + 3


class InjectedOOM(ModelEngine):
    """Refuses forward passes above `limit` rows with the error CUDA raises, `times` times at most."""

    def __init__(self, *args, limit: int, fail_from_call: int = 0, **kwargs) -> None:
        self.limit, self.fail_from_call, self.calls = limit, fail_from_call, 0
        super().__init__(*args, **kwargs)

    def _codes(self, batch, seeds, *, eager=False):
        self.calls += 1
        if self.calls > self.fail_from_call and batch.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (injected by the test)")
        return super()._codes(batch, seeds, eager=eager)


def test_out_of_memory_halves_the_batch_and_loses_nothing(tiny_encoder, photos):
    _config, model = tiny_encoder
    reference = model.encode_uint8(photos, batch_size=7)
    logs: list[str] = []
    # the first batch of 8 goes through; from the second call on, anything above 2 rows is out of memory
    engine = InjectedOOM(model, mode="exact", batch_size=8, limit=2, fail_from_call=1, log=logs.append)
    first = engine.encode(photos[:3])
    rest = engine.encode(photos[3:])
    np.testing.assert_array_equal(np.concatenate([first, rest]), reference)
    assert engine.stats.oom_retries == 2 and engine.batch_size == 2
    assert engine.stats.batch_sizes == [8, 4, 2] and engine.stats.images == 7
    assert "out of memory at batch 8" in logs[0] and "retrying at 4" in logs[0]


def test_out_of_memory_at_batch_one_is_raised(tiny_encoder, photos):
    _config, model = tiny_encoder
    engine = InjectedOOM(model, mode="exact", batch_size=2, limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        engine.encode(photos[:2])


def test_other_errors_are_not_retried(tiny_encoder, photos):
    _config, model = tiny_encoder

    class Broken(ModelEngine):
        def _codes(self, batch, seeds, *, eager=False):
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")

    engine = Broken(model, mode="exact", batch_size=4)
    with pytest.raises(RuntimeError, match="CUDNN"):
        engine.encode(photos[:2])
    assert engine.stats.oom_retries == 0


def test_sample_codes_depend_only_on_the_key(tiny_encoder, photos):
    _config, model = tiny_encoder
    keys = [f"00000{i:04d}" for i in range(len(photos))]
    base = ModelEngine(model, mode="exact", batch_size=7, index_rule="sample").encode(photos, keys)
    order = np.array([5, 2, 6, 0, 3, 1, 4])
    for batch_size in (1, 3):
        engine = ModelEngine(model, mode="exact", batch_size=batch_size, index_rule="sample")
        shuffled = engine.encode(photos[order], [keys[i] for i in order])
        np.testing.assert_array_equal(shuffled, base[order])
    with pytest.raises(ValueError, match="one key per image"):
        engine.encode(photos[:2], keys[:1])


def test_fast_mode_without_compile_agrees_mostly_and_keeps_the_head_fp32(tiny_encoder, photos):
    _config, model = tiny_encoder
    exact = ModelEngine(model, mode="exact", batch_size=4).encode(photos)
    engine = ModelEngine(model, mode="fast", batch_size=4, compile=False)
    fast = engine.encode(photos)
    agreement = float((fast == exact).mean())
    # random weights make near-ties common, so this is a pessimistic figure; bf16 still agrees on most codes
    assert 0.8 < agreement < 1.0
    assert next(engine._body.parameters()).dtype == torch.bfloat16
    assert model.quant_conv.weight.dtype == torch.float32  # the shared model is untouched
    assert next(model.encoder.parameters()).dtype == torch.float32


def test_fast_mode_runs_a_nearest_codebook_head(photos):
    """fast mode calls the quantizer itself; a VQ head has `indices` but no `sample` (Gumbel only)."""
    torch.manual_seed(0)
    model = VQGANEncoder(TINY_VQ).eval()
    exact = ModelEngine(model, mode="exact", batch_size=4).encode(photos)
    fast = ModelEngine(model, mode="fast", batch_size=4, compile=False).encode(photos)
    assert fast.dtype == np.int16 and fast.shape == exact.shape == (7, 32, 32)
    assert fast.min() >= 0 and fast.max() < TINY_VQ.n_embed


def test_bad_inputs_are_refused(tiny_encoder):
    _config, model = tiny_encoder
    with pytest.raises(ValueError, match="encode mode"):
        ModelEngine(model, mode="turbo")
    with pytest.raises(ValueError, match="uint8 images of shape"):
        ModelEngine(model, batch_size=2).encode(np.zeros((1, 128, 128, 3), np.uint8))
    engine = CallableEngine(lambda b, _k: np.zeros((len(b), 31, 31), np.int16), batch_size=2, grid=32)
    with pytest.raises(RuntimeError, match="expected"):
        engine.encode(np.zeros((1, 256, 256, 3), np.uint8))


_COMPILE_TWICE = """
import json, sys, torch
from laion_vq.encode.engine import ModelEngine
from laion_vq.vqgan import load_encoder, get_model_config
from laion_vq.vqgan.reference import sample_photos
model = load_encoder(get_model_config("vqgan_gumbel_f8_tiny"), sys.argv[1])
engine = ModelEngine(model, mode="fast", batch_size=2, compile_cache_dir=sys.argv[2])
codes = engine.encode(sample_photos(2))
print(json.dumps({"compile_seconds": engine.stats.compile_seconds, "codes": codes.astype(int).sum().item()}))
"""


def test_fast_mode_compiles_once_per_machine(tiny_checkpoint, tmp_path):
    """torch.compile's kernels land in the cache folder; a second process loads them instead of compiling."""
    cache = tmp_path / "inductor"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)

    def run() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _COMPILE_TWICE, tiny_checkpoint, str(cache)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = run()
    assert any(cache.rglob("*")), "nothing was cached"
    warm = run()
    assert warm["codes"] == cold["codes"]
    assert warm["compile_seconds"] < cold["compile_seconds"] / 3, (cold, warm)
