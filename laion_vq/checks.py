"""Asset checks that prove the code parquets keep the seed dataset's contract, and name the shards that don't."""

import io

import dagster as dg
import pyarrow.parquet as pq

from laion_vq import settings
from laion_vq.assets import code_parquets
from laion_vq.resources import StorageResource, VQGANEncoderResource
from laion_vq.shards.codes import check_codes_table, read_codes_provenance
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.storage import exists, filesystem, read_bytes


def audit_code_shards(storage: StorageResource, encoder: VQGANEncoderResource) -> tuple[dict, dict[str, list[str]]]:
    """Validate every code parquet on storage; returns (totals, {shard: problems}) for the corrupted ones.

    Per shard: shape (grid×grid int16 = bytes per row), code range [0, n_embed), keys unique, sorted and
    of the shard, and counts reconcile with img2dataset's status parquet:
    code rows = downloaded successes − undecodable images recorded at encode time.
    """
    layout = storage.layout
    config = encoder.vqgan_config()
    grid = config.code_grid(settings.IMAGE_SIZE)
    fs, codes_dir = filesystem(layout.codes_dir(encoder.model))
    files = sorted(p for p in fs.glob(codes_dir.rstrip("/") + "/*.parquet")) if fs.exists(codes_dir) else []
    corrupted: dict[str, list[str]] = {}
    rows = 0
    for path in files:
        key = path.rsplit("/", 1)[-1].removesuffix(".parquet")
        try:
            shard = parse_shard_key(key)
        except ValueError:
            corrupted[key] = ["file name is not a shard key"]
            continue
        url = layout.code_shard(encoder.model, shard)
        try:
            table = pq.read_table(io.BytesIO(read_bytes(url)))
        except Exception as err:  # noqa: BLE001 - an unreadable file is a corrupted shard
            corrupted[key] = [f"unreadable parquet: {err}"]
            continue
        report = check_codes_table(table, shard, grid, config.n_embed)
        problems = list(report.problems)
        rows += report.rows
        status_url = layout.image_status(shard)
        if exists(status_url):
            status = pq.read_table(io.BytesIO(read_bytes(status_url)), columns=["status"])
            successes = status.column("status").to_pylist().count("success")
            undecodable = sum(read_codes_provenance(url).get("undecodable", {}).values())
            if report.rows != successes - undecodable:
                problems.append(
                    f"counts do not reconcile: {report.rows} code rows but {successes} downloaded − "
                    f"{undecodable} undecodable = {successes - undecodable}"
                )
        else:
            problems.append("no img2dataset status parquet to reconcile counts against")
        if problems:
            corrupted[key] = problems
    totals = {"shards_checked": len(files), "rows_checked": rows, "corrupted_shards": len(corrupted)}
    return totals, corrupted


@dg.asset_check(
    asset=code_parquets,
    description="Every code parquet on storage: 32×32 int16 codes in [0, n_embed), unique sorted keys of "
    "its shard, and rows = downloaded − undecodable. Lists each corrupted shard and why.",
)
def code_parquets_contract(storage: StorageResource, encoder: VQGANEncoderResource) -> dg.AssetCheckResult:
    totals, corrupted = audit_code_shards(storage, encoder)
    return dg.AssetCheckResult(
        passed=totals["shards_checked"] > 0 and not corrupted,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            **totals,
            "corrupted": dg.MetadataValue.json({k: v for k, v in list(corrupted.items())[:200]}),
            "corrupted_shard_list": dg.MetadataValue.text(", ".join(sorted(corrupted)) or "none"),
        },
        description=None if totals["shards_checked"] else "no code parquets found on storage",
    )
