"""Removal lists in Dagster, thin over `laion_vq.removals`: the `removal_lists` asset (each list, its sha256,
items, matches, applied or pending) with its check `removal_lists_parse` (fails naming each list that does not
parse: such a list is applied nowhere, the others in full), the `apply_removals` job (rewrites just the shards
holding listed items and records each one's new state, counted from its files, on its `image_tars` and
`code_parquets` partitions, then refreshes `removal_lists` and its check), and the `removal_lists_sensor`
that launches it when a list under `removals/` is new or changed."""

import hashlib
import io
import time
from collections import Counter
from dataclasses import dataclass

import dagster as dg
import pyarrow.parquet as pq

from laion_vq.audit import audit_code_shard, audit_image_shard
from laion_vq.defs import metadata_keys as keys
from laion_vq.defs.assets.images import image_tars
from laion_vq.defs.check_state import (
    CODES_CHECK,
    IMAGES_CHECK,
    LISTS_PARSE_CHECK,
    REMOVED_CODES_CHECK,
    REMOVED_IMAGES_CHECK,
    latest_materializations,
)
from laion_vq.defs.checks import audit_removals, evaluate_shards
from laion_vq.defs.resources import StorageResource, VQGANEncoderResource
from laion_vq.removals import RemovalList, RemovalPlan, apply_shard, plan_removals, read_ledger, removed_keys
from laion_vq.removals.lists import lists_dir
from laion_vq.report.usage import unpack_code_usage
from laion_vq.shards.codes import codes_provenance
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.schema import FILTERED_STATUS, REMOVED_STATUS, success_rate
from laion_vq.shards.storage import StorageLayout, exists, filesystem, read_bytes, size

#: Pictures of a shard's images: dropped from the partition's new materialization when items left it, since
#: a sample shown there may be the removed one.
PICTURE_METADATA = ("samples_vs_reconstructions", "code_usage", "top_codes")
#: Entries a new materialization after a removal writes afresh when they apply: an old one must not outlive them.
RECOUNTED_METADATA = (keys.SUCCESS_RATE, keys.REMOVED_ITEMS, keys.REMOVAL_LISTS, "removed_by_reason", keys.FILTERED)

LISTS_DESCRIPTION = """Every removal list under `removals/` (CSV or parquet: url, domain, sample_id, key or \
image_sha256, with reason and date), what it matches in the status parquets, and whether it is applied or \
pending. Reads the `image_tars` status parquets. A list that does not parse is applied nowhere (the others \
are, in full) and fails the check `removal_lists_parse`, naming the file and line.

Counts: `list_count` lists that parse, `broken_lists` those that do not; `listed_items` rows in the lists that \
parse; `pending_keys` shard keys still holding a listed item, in `pending_shards` shards; \
`listed_items_already_removed` items whose every row is removed; `listed_items_matching_nothing` items no \
status row matches (not downloaded yet, or not in this dataset); `keys_removed_after_download` shard keys \
`apply_removals` took out of files already made (the ledger `removals/applied.parquet`; rows withheld at \
download are on their `image_tars` partitions)."""


def _plan(layout: StorageLayout) -> RemovalPlan:
    """Every list that parses, planned; the others are the plan's `broken` (reported, applied nowhere)."""
    return plan_removals(layout)


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
    rows += [f"| `{b.name}` | — | — | — | — | **does not parse**: applied nowhere |" for b in plan.broken]
    return "\n".join(rows) if plan.lists or plan.broken else "(no lists under `removals/`)"


def _parse_check(plan: RemovalPlan) -> dg.AssetCheckEvaluation:
    """`removal_lists_parse`: fails naming each list that does not parse, file and line, in one message."""
    names = [b.name for b in plan.broken]
    description = (
        "; ".join(b.error for b in plan.broken)
        + f". Nothing from {', '.join(names)} is applied until it parses; the other lists are applied."
        if plan.broken
        else None
    )
    return dg.AssetCheckEvaluation(
        asset_key=LISTS_PARSE_CHECK.asset_key,
        check_name=LISTS_PARSE_CHECK.name,
        passed=not plan.broken,
        description=description,
        metadata={"broken_lists": names, "lists_parsed": len(plan.lists)},
    )


@dg.asset(
    group_name="removals",
    deps=[image_tars],  # reads their status parquets; a lineage edge only (no automation on this asset)
    kinds={"polars"},
    description=LISTS_DESCRIPTION,
    check_specs=[
        dg.AssetCheckSpec(
            LISTS_PARSE_CHECK.name,
            asset=LISTS_PARSE_CHECK.asset_key,
            description="Every list under `removals/` parses; fails naming each one that does not (file and line): "
            "it is applied nowhere until fixed, the other lists are applied in full.",
        )
    ],
)
def removal_lists(storage: StorageResource) -> dg.MaterializeResult:
    layout = storage.existing_layout()
    started = time.perf_counter()
    plan = _plan(layout)
    check = _parse_check(plan)
    result = dg.AssetCheckResult(
        check_name=check.check_name, passed=check.passed, description=check.description, metadata=check.metadata
    )
    return dg.MaterializeResult(metadata=lists_metadata(layout, plan, started), check_results=[result])


def lists_metadata(layout: StorageLayout, plan: RemovalPlan, started: float) -> dict:
    """What the `removal_lists` asset shows: each list and its state, counts (named in LISTS_DESCRIPTION)."""
    ledger = read_ledger(layout)
    return {
        "lists": dg.MetadataValue.md(_lists_markdown(plan)),
        "list_count": len(plan.lists),
        "broken_lists": dg.MetadataValue.json([{"list": b.name, "error": b.error} for b in plan.broken]),
        "listed_items": sum(lst.count for lst in plan.lists),
        "pending_shards": len(plan.shards),
        "pending_keys": plan.keys,
        "listed_items_already_removed": len(plan.already_removed),
        "listed_items_matching_nothing": len(plan.unmatched),
        "matching_nothing": dg.MetadataValue.json(
            [f"{i.list_name}:{i.line} {i.kind}={i.value}" for i in plan.unmatched[:50]]
        ),
        "keys_removed_after_download": ledger.select("shard", "key").unique().height if ledger.height else 0,
        "planning_seconds": round(time.perf_counter() - started, 2),
        "path": dg.MetadataValue.path(lists_dir(layout)),
    }


@dataclass(frozen=True)
class _CodeFile:
    """A code parquet as its footer tells it: rows, bytes, distinct codes (None without a usage histogram)."""

    rows: int
    bytes: int
    distinct_codes: int | None


def _code_file(layout: StorageLayout, folder: str, shard_id: int) -> _CodeFile | None:
    url = layout.code_shard(folder, shard_id)
    if not exists(url):
        return None
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:  # one footer read: rows and provenance
        parquet = pq.ParquetFile(f)
        rows, provenance = parquet.metadata.num_rows, codes_provenance(parquet)
    usage = provenance.get("code_usage")
    distinct = None if usage is None else int((unpack_code_usage(usage, int(provenance["n_embed"])) > 0).sum())
    return _CodeFile(rows, size(url), distinct)


def shard_counts(layout: StorageLayout, folder: str, shard: str, lists: list[RemovalList]) -> dict[str, dict]:
    """Each shard asset's counts as its files hold them now (status parquet, tar, code parquet footer), with
    each removed key's list and reason: what a materialization after a removal records."""
    shard_id = parse_shard_key(shard)
    status = pq.read_table(io.BytesIO(read_bytes(layout.image_status(shard_id))))
    statuses = status.column("status").to_pylist()
    reasons = status.column("failure_reason").to_pylist() if "failure_reason" in status.column_names else []
    states = Counter(statuses)
    rows, successes, removed = status.num_rows, states["success"], states[REMOVED_STATUS]
    listed = keys.removed_items_metadata(removed_keys(layout, shard, lists))
    rate = success_rate(successes, rows, removed, states[FILTERED_STATUS])
    by_reason = Counter(
        reason or REMOVED_STATUS
        for reason, state in zip(reasons or [None] * rows, statuses, strict=True)
        if state == REMOVED_STATUS
    )
    images = {
        keys.ROW_COUNT: rows,
        keys.SUCCESSES: successes,
        "failed_to_download": states["failed_to_download"],
        "failed_to_resize": states["failed_to_resize"],
        keys.REMOVED: removed,
        **({"removed_by_reason": dg.MetadataValue.json(dict(by_reason.most_common()))} if removed else {}),
        **({keys.FILTERED: states[FILTERED_STATUS]} if states[FILTERED_STATUS] else {}),
        **({keys.SUCCESS_RATE: round(rate, 4)} if rate is not None else {}),
        keys.TAR_BYTES: size(layout.image_tar(shard_id)),
        **listed,
    }
    code = _code_file(layout, folder, shard_id)
    codes = (
        {}
        if code is None
        else {
            keys.ROW_COUNT: code.rows,
            keys.ENCODED: code.rows,
            keys.DOWNLOADED: successes,
            keys.STATUS_ROWS: rows,
            keys.REMOVED: removed,
            "bytes": code.bytes,
            **({keys.DISTINCT_CODES: code.distinct_codes} if code.distinct_codes is not None else {}),
            **listed,
        }
    )
    return {"image_tars": images, "code_parquets": codes}


def _record(
    context: dg.OpExecutionContext, layout: StorageLayout, folder: str, shard: str, lists: list[RemovalList]
) -> dict[str, dict]:
    """New materializations of the shard's `image_tars` and `code_parquets` partitions: the files changed, so
    every count is read from them again; the rest of the last materialization (provenance, timings) stays."""
    counts = shard_counts(layout, folder, shard, lists)
    for asset, fresh in counts.items():
        key = dg.AssetKey(asset)
        record = latest_materializations(context.instance, key, [shard]).get(shard)
        if record is None or not fresh:
            continue
        assert record.asset_materialization is not None  # a record fetched as a materialization
        previous = dict(record.asset_materialization.metadata)
        if keys.EXCLUDED in previous:
            continue  # the exclusion list speaks for the shard; its page keeps saying so
        stale = (*PICTURE_METADATA, *RECOUNTED_METADATA)
        meta = {**{k: v for k, v in previous.items() if k not in stale}, **fresh}
        context.log_event(dg.AssetMaterialization(asset_key=key, partition=shard, metadata=meta))
    return counts


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
    for broken in plan.broken:  # one line each, no trace: the check `removal_lists_parse` fails with it too
        context.log.error(f"{broken.error}; nothing from {broken.name} is applied until it parses")
    shards = sorted(s for s in plan.shards if not config.shards or s in config.shards)
    context.log.info(
        f"{len(plan.lists)} list(s), {plan.keys} listed key(s) in {len(plan.shards)} shard(s); applying {len(shards)}"
        + (f"; {len(plan.unmatched)} item(s) match nothing" if plan.unmatched else "")
        + (f"; {len(plan.broken)} list(s) do not parse and are left out" if plan.broken else "")
    )
    for index, shard in enumerate(shards, start=1):
        done = apply_shard(layout, shard, plan.shards[shard], plan.lists)
        codes = _record(context, layout, encoder.codes_folder, shard, list(plan.lists))["code_parquets"]
        context.log.info(
            f"shard {shard} ({index}/{len(shards)}): removed {len(done.keys)} item(s) in {done.seconds:.2f}s, "
            f"files {', '.join(done.files_changed)}" + (f"; {codes[keys.ENCODED]} code rows left" if codes else "")
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
    context.log_event(_parse_check(after))  # type: ignore[arg-type]


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
