"""Removal lists in Dagster, thin over `laion_vq.removals`: the `removal_lists` asset (each list, its sha256,
items, matches, applied or pending), the `apply_removals` job (rewrites just the shards holding listed items
and records each one's new state on its `image_tars` and `code_parquets` partitions, then refreshes
`removal_lists`), and the `removal_lists_sensor` that launches it when a list under `removals/` is new or
changed."""

import hashlib
import io
import time

import dagster as dg
import pyarrow.parquet as pq

from laion_vq.audit import audit_code_shard, audit_image_shard
from laion_vq.defs.check_state import (
    CODES_CHECK,
    IMAGES_CHECK,
    REMOVED_CODES_CHECK,
    REMOVED_IMAGES_CHECK,
    latest_materializations,
)
from laion_vq.defs.checks import audit_removals, evaluate_shards
from laion_vq.defs.resources import StorageResource, VQGANEncoderResource
from laion_vq.removals import RemovalListError, RemovalPlan, apply_shard, plan_removals, read_ledger, read_removal_lists
from laion_vq.removals.lists import lists_dir
from laion_vq.removals.plan import REMOVED
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.storage import StorageLayout, filesystem, read_bytes, size

#: Pictures of a shard's images: dropped from the partition's new materialization when items left it, since
#: a sample shown there may be the removed one.
PICTURE_METADATA = ("samples_vs_reconstructions", "code_usage", "top_codes")


def _plan(layout: StorageLayout) -> RemovalPlan:
    try:
        return plan_removals(layout, read_removal_lists(layout))
    except RemovalListError as err:
        raise dg.Failure(description=f"{err}; nothing from this list is applied until it parses") from err


def _lists_markdown(plan: RemovalPlan) -> str:
    pending: dict[str, int] = {}
    for matches in plan.shards.values():
        for match in matches:
            pending[match.item.list_name] = pending.get(match.item.list_name, 0) + 1
    unmatched: dict[str, int] = {}
    for item in plan.unmatched:
        unmatched[item.list_name] = unmatched.get(item.list_name, 0) + 1
    rows = ["| list | sha256 | items | pending | matching nothing | state |", "| --- | --- | --- | --- | --- | --- |"]
    for lst in plan.lists:
        state = "pending" if pending.get(lst.name) else "applied"
        rows.append(
            f"| `{lst.name}` | `{lst.sha256[:12]}…` | {lst.count} | {pending.get(lst.name, 0)} | "
            f"{unmatched.get(lst.name, 0)} | {state} |"
        )
    return "\n".join(rows) if plan.lists else "(no lists under `removals/`)"


@dg.asset(
    group_name="removals",
    kinds={"polars"},
    description="Every removal list under `removals/` (CSV or parquet: url, domain, sample_id, key or image_sha256, "
    "with reason and date), what it matches in the status parquets, and whether it is applied or pending. "
    "A list that does not parse fails here, naming the file and line.",
)
def removal_lists(storage: StorageResource) -> dg.MaterializeResult:
    layout = storage.existing_layout()
    started = time.perf_counter()
    return dg.MaterializeResult(metadata=lists_metadata(layout, _plan(layout), started))


def lists_metadata(layout: StorageLayout, plan: RemovalPlan, started: float) -> dict:
    """What the `removal_lists` asset shows: each list and its state, counts, what matched nothing."""
    ledger = read_ledger(layout)
    return {
        "lists": dg.MetadataValue.md(_lists_markdown(plan)),
        "list_count": len(plan.lists),
        "items": sum(lst.count for lst in plan.lists),
        "pending_shards": len(plan.shards),
        "pending_keys": plan.keys,
        "already_removed_items": len(plan.already_removed),
        "unmatched_items": len(plan.unmatched),
        "unmatched": dg.MetadataValue.json([f"{i.list_name}:{i.line} {i.kind}={i.value}" for i in plan.unmatched[:50]]),
        "removed_so_far": ledger.select("shard", "key").unique().height if ledger.height else 0,
        "planning_seconds": round(time.perf_counter() - started, 2),
        "path": dg.MetadataValue.path(lists_dir(layout)),
    }


def _removed_metadata(previous: dict, *, removed: int, lists: list[str]) -> dict:
    """The partition's last metadata (what the report reads) with the removal recorded and its pictures gone."""
    meta = {k: v for k, v in previous.items() if k not in PICTURE_METADATA}
    meta["removed"] = removed
    meta["removal_lists"] = dg.MetadataValue.json(lists)
    return meta


def _record(context: dg.OpExecutionContext, layout: StorageLayout, shard: str, lists: list[str]) -> None:
    """New materializations of the shard's `image_tars` and `code_parquets` partitions: the files changed."""
    shard_id = parse_shard_key(shard)
    status = pq.read_table(io.BytesIO(read_bytes(layout.image_status(shard_id))), columns=["status"])
    statuses = status.column("status").to_pylist()
    removed = statuses.count(REMOVED)
    for asset in ("image_tars", "code_parquets"):
        key = dg.AssetKey(asset)
        record = latest_materializations(context.instance, key, [shard]).get(shard)
        if record is None:
            continue
        assert record.asset_materialization is not None  # a record fetched as a materialization
        previous = dict(record.asset_materialization.metadata)
        meta = _removed_metadata(previous, removed=removed, lists=lists)
        if asset == "image_tars":
            meta.update(successes=statuses.count("success"), tar_bytes=size(layout.image_tar(shard_id)))
            rows = len(statuses)
            meta["success_rate"] = round(statuses.count("success") / rows, 4) if rows else 0.0
        context.log_event(dg.AssetMaterialization(asset_key=key, partition=shard, metadata=meta))


def _code_rows(layout: StorageLayout, folder: str, shard: str) -> int | None:
    url = layout.code_shard(folder, parse_shard_key(shard))
    fs, path = filesystem(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


class ApplyRemovalsConfig(dg.Config):
    """`shards`: only these (empty: every shard the lists still name)."""

    shards: list[str] = []


# pool `removals` (one slot, the default limit): two runs (the sensor's and a hand-launched one) never rewrite a
# shard at the same time; the second finds the work done.
@dg.op(
    pool="removals",
    description="Apply the removal lists to every shard that still holds a listed item, one shard at a time.",
)
def apply_removals_op(
    context: dg.OpExecutionContext, config: ApplyRemovalsConfig, storage: StorageResource, encoder: VQGANEncoderResource
) -> None:
    layout = storage.existing_layout()
    plan = _plan(layout)
    shards = sorted(s for s in plan.shards if not config.shards or s in config.shards)
    context.log.info(
        f"{len(plan.lists)} list(s), {plan.keys} listed key(s) in {len(plan.shards)} shard(s); applying {len(shards)}"
        + (f"; {len(plan.unmatched)} item(s) match nothing" if plan.unmatched else "")
    )
    for index, shard in enumerate(shards, start=1):
        done = apply_shard(layout, shard, plan.shards[shard], plan.lists)
        lists = sorted({m.item.list_name for m in plan.shards[shard]})
        _record(context, layout, shard, lists)
        rows = _code_rows(layout, encoder.codes_folder, shard)
        context.log.info(
            f"shard {shard} ({index}/{len(shards)}): removed {len(done.keys)} item(s) in {done.seconds:.2f}s, "
            f"files {', '.join(done.files_changed)}" + ("" if rows is None else f"; {rows} code rows left")
        )
    # the shards' checks, current again on their new materializations: the tar and codes checks, and no item left
    audited = [IMAGES_CHECK, REMOVED_IMAGES_CHECK, CODES_CHECK, REMOVED_CODES_CHECK]
    folder = encoder.codes_folder
    if shards:
        grid, n_embed = encoder.vqgan_config().code_grid(encoder.image_size), encoder.vqgan_config().n_embed
        audits = {
            IMAGES_CHECK: lambda key: audit_image_shard(layout, key),
            CODES_CHECK: lambda key: audit_code_shard(layout, folder, key, grid, n_embed),
        }
        for check in (IMAGES_CHECK, CODES_CHECK):
            # log_event's annotation leaves out AssetCheckEvaluation, which it records (an op's way to report checks)
            for evaluation in evaluate_shards(context, check, layout, shards, audits[check]):
                context.log_event(evaluation)  # type: ignore[arg-type]
        for evaluation in audit_removals(context, layout, folder, audited[1::2], lambda _check: shards):
            context.log_event(evaluation)  # type: ignore[arg-type]
    started = time.perf_counter()
    after = _plan(layout)
    context.log_event(dg.AssetMaterialization("removal_lists", metadata=lists_metadata(layout, after, started)))


@dg.job(
    executor_def=dg.in_process_executor,
    description="Remove the listed items from every shard already made (tars, status, every code version, the "
    "ledger), record each shard's new state on its partitions, audit those shards, refresh `removal_lists`.",
)
def apply_removals() -> None:
    apply_removals_op()


def lists_fingerprint(layout: StorageLayout) -> str:
    """Names and bytes of every list: changes when a list is added, edited or removed."""
    fs, path = filesystem(lists_dir(layout))
    if not fs.exists(path):
        return ""
    digest = hashlib.sha256()
    for name in sorted(fs.ls(path, detail=False)):
        if name.endswith((".csv", ".parquet")) and not name.endswith("applied.parquet"):
            digest.update(name.encode() + b"\0")
            digest.update(hashlib.sha256(fs.cat_file(name)).digest())
    return digest.hexdigest()


@dg.sensor(
    job=apply_removals,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When a list under `removals/` is new or changed: apply the lists (the run also refreshes "
    "`removal_lists`).",
)
def removal_lists_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    fingerprint = lists_fingerprint(storage.layout)
    if not fingerprint or fingerprint == context.cursor:
        return dg.SkipReason("no removal list is new or changed")
    context.update_cursor(fingerprint)
    return dg.RunRequest(run_key=f"apply-{fingerprint[:16]}")
