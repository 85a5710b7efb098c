"""This project's code location with simulated costs, for `benchmarks/bench_feeding.py` (never for real data).

- The encoder is a stand-in priced like an H100 in the README's cost model: `SIM_ENGINE_START_S` (15 s: process
  start on the GPU, model load, warm compile) once per run, `SIM_PER_IMAGE_S` (1/3,000 s) per image of a
  `SIM_SHARD_IMAGES`-image shard (10,000), spread over the tiny shard's real images; it returns valid codes.
- A download is the real one (img2dataset over loopback, tiny shards), then padded to `SIM_DOWNLOAD_S` (100 s:
  a latency-bound shard at ~100 images/s).
Every simulated duration is divided by `SIM_SCALE`; Dagster's own costs (queue, run start, daemon ticks,
PostgreSQL) are not simulated. Everything else (assets, checks, feeding, storage) is the real code location.
"""

from __future__ import annotations

import os
import time

import dagster as dg
import numpy as np

import laion_vq.defs.assets.images as image_assets
from laion_vq import definitions as real
from laion_vq.defs.resources import VQGANEncoderResource, default_resources
from laion_vq.encode.engine import CallableEngine

SCALE = float(os.environ.get("SIM_SCALE", "1"))
ENGINE_START_S = float(os.environ.get("SIM_ENGINE_START_S", "15"))
PER_IMAGE_S = float(os.environ.get("SIM_PER_IMAGE_S", str(1 / 3000)))
SHARD_IMAGES = int(os.environ.get("SIM_SHARD_IMAGES", "10000"))
DOWNLOAD_S = float(os.environ.get("SIM_DOWNLOAD_S", "100"))

_real_download = image_assets.download_image_shard


def _download_priced_like_the_web(*args, **kwargs):  # the stage function's signature
    started = time.monotonic()
    result = _real_download(*args, **kwargs)
    time.sleep(max(0.0, DOWNLOAD_S / SCALE - (time.monotonic() - started)))
    return result


image_assets.download_image_shard = _download_priced_like_the_web


class SimulatedEncoderResource(VQGANEncoderResource):
    """The encoder resource with a stand-in engine: starts in ENGINE_START_S, encodes a shard in
    SHARD_IMAGES × PER_IMAGE_S (both / SCALE)."""

    def engine(self, log=None):  # the base class's signature
        if self._engine is None:
            time.sleep(ENGINE_START_S / SCALE)
            config = self.vqgan_config()
            grid = config.code_grid(256)
            shard_images = max(int(os.environ.get("LAION_VQ_SAMPLES_PER_SHARD", "1")), 1)

            def encode(batch: np.ndarray, keys: list[str]) -> np.ndarray:
                time.sleep(len(keys) * PER_IMAGE_S * SHARD_IMAGES / shard_images / SCALE)
                return np.zeros((len(keys), grid, grid), np.int16)

            self._engine = CallableEngine(encode, 64, grid)
        return self._engine


_resources = default_resources()
_encoder = _resources["encoder"]
_resources["encoder"] = SimulatedEncoderResource(**{k: getattr(_encoder, k) for k in type(_encoder).model_fields})

defs = dg.Definitions(
    assets=real.defs.assets,
    asset_checks=real.defs.asset_checks,
    jobs=real.defs.jobs,
    schedules=real.defs.schedules,
    sensors=real.defs.sensors,
    resources=_resources,
    executor=dg.in_process_executor,
)
