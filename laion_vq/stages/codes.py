"""Stage 3: encode shard N's downloaded images with the VQGAN and publish `codes/<model>/NNNNN.parquet`.

The work is done by the overlapped pipeline in `laion_vq.encode`. This module is the stage's plain face:
`encode_code_shard` for one shard (tests, scripts), and `CodeRun` for one loaded model through many shards,
which the `code_parquets` asset drives and records in Dagster (`laion_vq.defs.encoding`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np

from laion_vq.encode.decode import ImageDecoder
from laion_vq.encode.engine import CallableEngine, ModelEngine
from laion_vq.encode.pipeline import EncodePipeline, PipelineStats
from laion_vq.encode.shard import (
    VERSION_KEYS,
    CodeShardResult,
    CodeSpec,
    CodesVersionError,
    refuse_other_version,
    status_rows,
)
from laion_vq.shards.storage import StorageLayout
from laion_vq.vqgan.registry import VQGANConfig

__all__ = [
    "VERSION_KEYS",
    "CodeRun",
    "CodeShardResult",
    "CodeSpec",
    "CodesVersionError",
    "code_spec",
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


def code_spec(
    config: VQGANConfig,
    image_size: int,
    *,
    provenance: dict,
    codes_name: str | None = None,
    replace_other_versions: bool = False,
) -> CodeSpec:
    """What a model's code parquets are: its code grid at ``image_size`` and codebook size (the contract each
    parquet is checked against), their folder, and the provenance each stores (what makes a version)."""
    return CodeSpec(
        model_name=config.name,
        grid=config.code_grid(image_size),
        n_embed=config.n_embed,
        image_size=image_size,
        codes_name=codes_name,
        provenance=provenance,
        replace_other_versions=replace_other_versions,
    )


class FirstShardSamples(dict):
    """``keep_samples`` for `EncodePipeline.run` keeping ``samples`` images of the first shard opened, whichever
    it is: with a lazily fed list of shards, which comes first is known only then."""

    def __init__(self, samples: int) -> None:
        super().__init__()
        self.samples = samples

    def get(self, shard, default=0):  # dict.get's signature
        samples, self.samples = self.samples, 0
        return samples


class CodeRun:
    """One loaded encoder through the shards of one run, on one overlapped pipeline (one model load, GPU busy).

    Callers differ only in how they record the shards: all in order when the run ends (`in_order`), or each as
    soon as it is published (`as_published`). ``preview_samples`` images are kept for previews, on the first and
    last shard in order, or on the first one published.
    """

    def __init__(
        self,
        layout: StorageLayout,
        spec: CodeSpec,
        engine: ModelEngine | CallableEngine,
        decoder: ImageDecoder,
        *,
        preview_samples: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.preview_samples = preview_samples
        self.pipeline = EncodePipeline(layout, spec, engine, decoder, progress=progress)

    @property
    def layout(self) -> StorageLayout:
        return self.pipeline.layout

    @property
    def codes_folder(self) -> str:
        """`codes/<this>/`, where the run's parquets go."""
        return self.spec.codes_name or self.spec.model_name

    @property
    def stats(self) -> PipelineStats:
        """The run's pipeline so far: throughput, how long the encoder waited for input, OOM retries."""
        return self.pipeline.stats

    @contextmanager
    def in_order(
        self, shards: Sequence[int], refused: Mapping[int, BaseException] | None = None
    ) -> Iterator[Callable[[int], CodeShardResult]]:
        """Encode ``shards`` but the ``refused`` ones, as a function to call once per shard of ``shards``, in
        that order: it returns the shard's result or raises its error (``refused[shard]``, never encoded)."""
        refused = refused or {}
        to_encode = [shard for shard in shards if shard not in refused]
        keep = {shard: self.preview_samples for shard in {to_encode[0], to_encode[-1]}} if to_encode else {}
        outcomes = self.pipeline.run(to_encode, keep)

        def result(shard: int) -> CodeShardResult:
            if shard in refused:
                raise refused[shard]
            try:
                done, outcome = next(outcomes)  # the pipeline yields the shards of `to_encode`, in this order
            except StopIteration:
                raise RuntimeError("the encode pipeline stopped before this shard (see the first failure)") from None
            assert done == shard, f"pipeline yielded shard {done} for {shard}"
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        try:
            yield result
        finally:
            outcomes.close()

    def as_published(self, shards: Iterable[int]) -> Iterator[tuple[int, CodeShardResult | BaseException]]:
        """Encode ``shards`` (read lazily: a feed may add shards as they become ready) and yield each shard's
        result, or its error, as soon as it is published."""
        return self.pipeline.run(shards, FirstShardSamples(self.preview_samples))

    def summary(self, seconds: float) -> str:
        """The run's last log line: images, end-to-end throughput, encoder idle share, time waiting for tars."""
        stats = self.stats.as_metadata()
        return (
            f"encoded {self.stats.images} images in {seconds:.1f}s ({stats['images_per_second']} images/s end to "
            f"end, encoder idle {stats['encoder_idle_share']:.0%}, {stats['waiting_for_shards_seconds']}s waiting "
            "for tars to land)"
        )
