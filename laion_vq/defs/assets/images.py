"""image_tars: the shard downloaded by img2dataset (webdataset tar, status parquet, stats json)."""

import dagster as dg

from laion_vq.audit import ShardVerdict, audit_image_shard
from laion_vq.defs import metadata_keys as keys
from laion_vq.defs.assets._runs import for_each_shard
from laion_vq.defs.assets.metadata import DOWNLOAD_BACKFILL_POLICY, raw_metadata_shards
from laion_vq.defs.check_state import IMAGES_CHECK, REMOVED_IMAGES_CHECK
from laion_vq.defs.partitions import shard_partitions
from laion_vq.defs.resources import DownloaderResource, LaionMetadataResource, StorageResource
from laion_vq.removals import RemovalList, RemovalListError, read_removal_lists, removed_keys
from laion_vq.shards.exclusions import read_exclusions
from laion_vq.shards.numbering import shard_key
from laion_vq.shards.storage import StorageLayout
from laion_vq.stages import ImageShardResult, download_image_shard


def _metadata(result: ImageShardResult) -> dict:
    return {
        "tar": dg.MetadataValue.path(result.tar_path),
        "status_parquet": dg.MetadataValue.path(result.status_path),
        keys.ROW_COUNT: result.rows,
        keys.SUCCESSES: result.successes,
        "failed_to_download": result.failed_to_download,
        "failed_to_resize": result.failed_to_resize,
        **({keys.SUCCESS_RATE: round(result.success_rate, 4)} if result.success_rate is not None else {}),
        keys.REMOVED: result.removed,
        **({"removed_by_reason": dg.MetadataValue.json(result.removed_by_reason)} if result.removed else {}),
        **({keys.FILTERED: result.filtered} if result.filtered else {}),
        "failures_by_reason": dg.MetadataValue.json(dict(list(result.failures_by_reason.items())[:20])),
        "failure_examples": dg.MetadataValue.json(result.failure_examples),
        keys.TAR_BYTES: result.bytes_tar,
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.successes / result.seconds, 2) if result.seconds else 0.0,
        **(
            {"replaced_success_rate": round(result.previous_success_rate, 4)}
            if result.previous_success_rate is not None
            else {}
        ),
    }


def _with_removed_items(layout: StorageLayout, result: ImageShardResult, lists: list[RemovalList]) -> dict:
    """The partition's metadata, with each row a list withheld named beside its list and reason."""
    meta = _metadata(result)
    if result.removed:
        meta.update(keys.removed_items_metadata(removed_keys(layout, shard_key(result.shard_id), lists)))
    return meta


@dg.asset(
    partitions_def=shard_partitions,
    deps=[raw_metadata_shards],
    backfill_policy=DOWNLOAD_BACKFILL_POLICY,
    pool="download",
    automation_condition=dg.AutomationCondition.eager(),  # acted on by the `shard_automation` sensor
    group_name="laion",
    kinds={"webdataset"},
    description=__doc__,
)
def image_tars(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    metadata: LaionMetadataResource,
    downloader: DownloaderResource,
) -> None:
    layout = storage.existing_layout()
    options = downloader.options()
    try:  # listed items are never requested again (README: Removal lists)
        lists = read_removal_lists(layout)
    except RemovalListError as err:
        # one readable message: the chained parse error would repeat it under a stack trace
        raise dg.Failure(description=f"{err}; no download runs against a removal list that does not parse") from None

    def work(shard: int) -> ImageShardResult:
        context.log.info(f"downloading shard {shard:05d} with {options.thread_count} threads")
        return download_image_shard(
            layout,
            shard,
            metadata.samples_per_shard,
            options,
            progress=context.log.info,
            min_rate_ratio=downloader.min_rate_ratio,
            replace_worse=downloader.replace_worse,
            removal_lists=lists,
        )

    def checks(recorded: list[str]) -> list[dg.AssetCheckEvaluation]:
        """The tar checks of the shards this failing step recorded: its check steps will be skipped."""
        from laion_vq.defs.checks import audit_removals, evaluate_shards  # the checks module imports the assets

        def audit(key: str) -> ShardVerdict:
            return audit_image_shard(layout, key)

        return [
            *evaluate_shards(context.op_execution_context, IMAGES_CHECK, layout, recorded, audit, blocking=True),
            *audit_removals(context, layout, "", [REMOVED_IMAGES_CHECK], lambda _check: recorded),
        ]

    for_each_shard(
        context, work, lambda result: _with_removed_items(layout, result, lists), read_exclusions(layout), checks
    )
