"""raw_metadata_shards: shard N = rows [N*S, (N+1)*S) of the LAION parts, numbered like img2dataset."""

import dagster as dg

from laion_vq import settings
from laion_vq.defs import metadata_keys as keys
from laion_vq.defs.assets._runs import for_each_shard
from laion_vq.defs.partitions import shard_partitions
from laion_vq.defs.resources import LaionMetadataResource, StorageResource
from laion_vq.shards.exclusions import read_exclusions
from laion_vq.stages import MetadataShardResult, write_metadata_shard

#: Metadata and download share one policy so a backfill runs both for a batch of shards in one run.
DOWNLOAD_BACKFILL_POLICY = dg.BackfillPolicy.multi_run(settings.DOWNLOAD_SHARDS_PER_RUN.get_int())


def _metadata(result: MetadataShardResult) -> dict:
    return {
        "path": dg.MetadataValue.path(result.path),
        keys.ROW_COUNT: result.rows,
        "source_file": dg.MetadataValue.path(result.source_file),
        "source_rows": f"[{result.source_rows[0]}, {result.source_rows[1]})",
        "bytes": result.bytes,
        "seconds": round(result.seconds, 3),
        **({keys.FILTERED: result.filtered} if result.filtered else {}),
    }


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=DOWNLOAD_BACKFILL_POLICY,
    # The first step of every download run: in the `download` pool, the queue holds a download run back while
    # the pool is full. Without a pool here, its runs were never held (a run with one pool-free first step
    # is always dequeued), filled every run slot while waiting for `download` slots, and an encoder run
    # queued behind them waited for the last download (README, "How a backfill feeds the encoder").
    pool="download",
    group_name="laion",
    kinds={"parquet"},
    description=__doc__,
)
def raw_metadata_shards(
    context: dg.AssetExecutionContext, storage: StorageResource, metadata: LaionMetadataResource
) -> None:
    layout = storage.layout
    laion = metadata.open(layout)
    row_filter = metadata.checked_filter(laion)
    excluded = read_exclusions(layout)
    for_each_shard(context, lambda shard: write_metadata_shard(laion, layout, shard, row_filter), _metadata, excluded)
