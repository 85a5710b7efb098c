"""Helpers shared by the assets: run granularity and per-shard failure handling."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import dagster as dg

from laion_vq.dagster_internals import BACKFILL_ID_TAG
from laion_vq.defs.metadata_keys import excluded_metadata
from laion_vq.deploy.retry_backfill import COMMAND as RETRY_BACKFILL
from laion_vq.shards.disk_full import DiskFullError
from laion_vq.shards.numbering import parse_shard_key

T = TypeVar("T")


def for_each_shard(
    context: dg.AssetExecutionContext,
    work: Callable[[int], T],
    metadata: Callable[[T], dict],
    excluded: Mapping[str, str] | None = None,
    checks: Callable[[list[str]], Iterable[dg.AssetCheckEvaluation]] | None = None,
) -> list[T]:
    """Run `work` for every partition of this run, recording each shard's metadata on its own partition.

    Shards on the operator's exclusion list (`excluded`: key → reason) are not worked on; their partition
    records `excluded: <reason>` instead, so a backfill over all 10,000 shards skips them visibly.

    One bad shard does not stop the others. If any failed, the shards that succeeded are still recorded
    as materialized (their files are published), `checks` evaluates their checks here (the failed step skips
    the run's check steps, which would leave them unchecked and, for tars, never fed to the encoder), and the
    step then fails naming every failed shard and its error, so a backfill shows exactly which shards to look
    at and retries only those.
    """
    keys = list(context.partition_keys)
    results: list[T] = []
    done: dict[str, dict] = {}
    failures: dict[str, str] = {}
    disk_full: list[str] = []  # where: a fault only an operator can clear
    excluded = excluded or {}
    for index, key in enumerate(keys, start=1):
        if key in excluded:
            context.log.warning(f"shard {key} skipped: on the exclusion list ({excluded[key]})")
            done[key] = excluded_metadata(excluded[key])
            continue
        try:
            result = work(parse_shard_key(key))
        except Exception as err:  # reported below, per shard, never swallowed
            context.log.error(f"shard {key} failed: {type(err).__name__}: {err}")
            failures[key] = f"{type(err).__name__}: {err}"
            if isinstance(err, DiskFullError):
                disk_full.append(err.path)
            continue
        results.append(result)
        done[key] = metadata(result)
        context.log.info(f"shard {key} done ({index}/{len(keys)})")
    if failures:
        for key, meta in done.items():
            context.log_event(dg.AssetMaterialization(asset_key=context.asset_key, partition=key, metadata=meta))
        if checks is not None:
            for evaluation in checks(sorted(k for k in done if k not in excluded)):
                context.log_event(evaluation)
        raise dg.Failure(
            description=f"{len(failures)} of {len(keys)} shard(s) failed: "
            + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5])
            + (resume_after_disk_full(context, disk_full) if disk_full else ""),
            metadata={
                "failed_shards": dg.MetadataValue.json(failures),
                "succeeded_shards": dg.MetadataValue.json(sorted(done)),
            },
        )
    for key, meta in done.items():
        context.add_asset_metadata(meta, partition_key=key)
    return results


def resume_after_disk_full(context: dg.AssetExecutionContext, paths: list[str]) -> str:
    """What the operator does after a full disk failed shards: the platform cannot free space itself."""
    backfill_id = context.run.tags.get(BACKFILL_ID_TAG)
    then = (
        f"`{RETRY_BACKFILL} {backfill_id}` (the backfill page's *Retry failed*)"
        if backfill_id
        else "re-execute this run from failure"
    )
    return f". A disk is full ({paths[0]}): free space there, then {then}."


def throttled(log: Callable[[str], None], every_seconds: float = 30.0) -> Callable[[str], None]:
    """A progress logger that writes at most once per `every_seconds` (long shards, few events)."""
    last = [0.0]

    def emit(message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= every_seconds:
            last[0] = now
            log(message)

    return emit
