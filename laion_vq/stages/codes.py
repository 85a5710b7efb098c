"""Stage 3: encode shard N's downloaded images with the VQGAN and publish `codes/<model>/NNNNN.parquet`.

The work is done by the overlapped pipeline in `laion_vq.encode`; this module is the stage's plain-function
face for one shard (tests, scripts, the spine's callers), with the same contract as before.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from laion_vq.encode.decode import ImageDecoder
from laion_vq.encode.engine import CallableEngine
from laion_vq.encode.pipeline import EncodePipeline
from laion_vq.encode.shard import (
    VERSION_KEYS,
    CodeShardResult,
    CodeSpec,
    CodesVersionError,
    refuse_other_version,
    status_rows,
)
from laion_vq.shards.storage import StorageLayout

__all__ = [
    "VERSION_KEYS",
    "CodeShardResult",
    "CodeSpec",
    "CodesVersionError",
    "encode_code_shard",
    "refuse_other_version",
    "status_rows",
]


def encode_code_shard(
    layout: StorageLayout,
    shard_id: int,
    *,
    model_name: str,
    encode: Callable[[np.ndarray, list[str]], np.ndarray],
    grid: int,
    n_embed: int,
    image_size: int = 256,
    batch_size: int = 64,
    provenance: dict | None = None,
    progress: Callable[[str], None] | None = None,
    keep_samples: int = 0,
    codes_name: str | None = None,
    replace_other_versions: bool = False,
) -> CodeShardResult:
    """Encode every downloaded image of the shard and publish `codes/<codes_name>/NNNNN.parquet`
    (`codes_name` defaults to the model name).

    Each row's `image_sha256` is the sha256 of the JPEG bytes read from the tar, so identical bytes can be
    told to have given identical codes (in `exact` mode, whatever the threads, batch size or load).

    `encode(batch, keys)` maps an (N, S, S, 3) uint8 batch and its N sample keys to (N, grid, grid) integer
    codes (the keys seed the `sample` index rule; `argmax` ignores them). Images that fail to decode are
    counted by reason and listed, never dropped silently; so are the samples a truncated tar lost. A complete
    tar that disagrees with its status parquet, or output that breaks the contract, raises CorruptShardError
    and publishes nothing. A code parquet already made by another checkpoint, precision or index rule is not
    overwritten (`refuse_other_version`) unless `replace_other_versions`.
    """
    spec = CodeSpec(
        model_name=model_name,
        grid=grid,
        n_embed=n_embed,
        image_size=image_size,
        codes_name=codes_name,
        provenance=provenance or {},
        replace_other_versions=replace_other_versions,
    )
    with ImageDecoder(image_size) as decoder:
        pipeline = EncodePipeline(layout, spec, CallableEngine(encode, batch_size, grid), decoder, progress=progress)
        [(_, outcome)] = pipeline.run([shard_id], {shard_id: keep_samples})
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
