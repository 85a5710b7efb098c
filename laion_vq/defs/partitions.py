"""One static partition per shard, `00000` … N-1: N is `LAION_VQ_NUM_SHARDS`, or the metadata's own shard count
when a local metadata source holds fewer shards (so the UI never offers a shard that has no metadata)."""

from __future__ import annotations

import dagster as dg

from laion_vq import settings
from laion_vq.shards.metadata import LaionMetadata, NotIndexed
from laion_vq.shards.numbering import shard_keys
from laion_vq.shards.sources import DEFAULT_PRESET, preset
from laion_vq.shards.storage import StorageLayout, is_local


def partition_count() -> int:
    """`LAION_VQ_NUM_SHARDS`, capped at the shards a local metadata source makes (read from its parquet footers
    only, or a text source's stored index: a text file not indexed yet is not scanned at import). A remote
    source is not read at import (every run worker imports this); an unreadable one is the metadata step's
    error to report, not the code location's."""
    limit = settings.NUM_SHARDS.get_int()
    source = settings.METADATA.get_str() or ""
    if not is_local(source):
        return limit
    try:
        fmt = preset(settings.METADATA_FORMAT.get_str() or DEFAULT_PRESET).with_overrides(
            input_format=settings.INPUT_FORMAT.get_str()
        )
        index_dir = StorageLayout(settings.STORAGE.get_str() or ".").metadata_index_dir()
        laion = LaionMetadata(source, settings.SAMPLES_PER_SHARD.get_int(), fmt, index_dir, build_index=False)
        available = laion.num_shards
    except (OSError, ValueError, NotIndexed):
        return limit
    return min(limit, available) if available > 0 else limit


shard_partitions = dg.StaticPartitionsDefinition(shard_keys(partition_count()))
