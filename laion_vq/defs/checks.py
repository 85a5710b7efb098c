"""Asset checks: prove every shard on storage keeps its contract, and name the shards that don't."""

import dagster as dg

from laion_vq import settings
from laion_vq.audit import AuditReport, audit_code_shards, audit_image_shards
from laion_vq.defs.assets import code_parquets, image_tars
from laion_vq.defs.resources import StorageResource, VQGANEncoderResource

#: Below this a shard's download is flagged (WARN) as worth a retry; LAION-400M tars kept ~50–90%.
MIN_SUCCESS_RATE = 0.3


def _scope(context: dg.AssetCheckExecutionContext) -> list[str] | None:
    """The shards of the run the check executes in, or None (all of storage) when it runs on its own.

    Backfills and jobs run these checks after every batch of shards; auditing all 10,000 shards there
    would re-read the whole dataset per run, so inside a partitioned run only that run's shards count.
    """
    try:
        return list(context.partition_keys)
    except Exception:  # noqa: BLE001 - an unpartitioned run raises: it audits everything
        return None


def _result(report: AuditReport, empty_message: str, scope: list[str] | None) -> dg.AssetCheckResult:
    corrupted = sorted(report.corrupted)
    return dg.AssetCheckResult(
        passed=report.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        description=None if report.shards_checked else empty_message,
        metadata={
            "scope": "all shards on storage" if scope is None else f"this run's {len(scope)} shard(s)",
            "shards_checked": report.shards_checked,
            "rows_checked": report.rows_checked,
            "corrupted_shards": len(corrupted),
            "corrupted_shard_list": dg.MetadataValue.text(", ".join(corrupted) or "none"),
            "corrupted": dg.MetadataValue.json({k: report.corrupted[k] for k in corrupted[:200]}),
            "warnings": dg.MetadataValue.json({k: v for k, v in list(report.warnings.items())[:200]}),
        },
    )


@dg.asset_check(
    asset=code_parquets,
    description="Every code parquet on storage: 32×32 int16 codes in [0, n_embed), unique sorted keys of its "
    "shard, and rows = downloaded − undecodable. Lists each corrupted shard and why.",
)
def code_parquets_contract(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, encoder: VQGANEncoderResource
) -> dg.AssetCheckResult:
    config = encoder.vqgan_config()
    scope = _scope(context)
    grid = config.code_grid(settings.IMAGE_SIZE)
    report = audit_code_shards(storage.layout, encoder.codes_folder, grid, config.n_embed, only=scope)
    return _result(report, "no code parquets found on storage", scope)


@dg.asset_check(
    asset=image_tars,
    description="Every downloaded shard: one status row per metadata row, img2dataset's stats agree, tar present. "
    f"Success rates below {MIN_SUCCESS_RATE:.0%} are listed as warnings.",
)
def image_tars_complete(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    scope = _scope(context)
    report = audit_image_shards(storage.layout, MIN_SUCCESS_RATE, only=scope)
    return _result(report, "no downloaded shards found on storage", scope)
