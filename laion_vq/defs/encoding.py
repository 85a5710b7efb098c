"""Recording an encoder run's shards in Dagster, in the one of two ways the run calls for.

- **At the end** (a run outside a backfill, where a step downstream in the run may wait for this one): the
  run's own shards, in order, recorded when the step ends as its output, one failure per shard.
- **Each as published** (a backfill's encoder run, `backfill_of`): each shard's materialization and its two
  code checks are logged the moment it is published, so a killed run's retry skips what was done and the UI
  fills in shard by shard; fed (`laion_vq.defs.feeding`), the run then takes the backfill's other shards as
  their tars land, one model load for the whole download phase.

A shard whose tar check failed is never encoded, in either way (`refuse_failed_tars`). The encoding itself is
`laion_vq.stages.codes.CodeRun`, free of Dagster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import dagster as dg

from laion_vq import settings
from laion_vq.defs.check_state import (
    CODES_CHECK,
    IMAGES_CHECK,
    REMOVED_CODES_CHECK,
    failed_with_error,
    latest_results,
)
from laion_vq.defs.feeding import BackfillFeed, backfill_of, recorded_by
from laion_vq.defs.metadata_keys import excluded_metadata
from laion_vq.shards.disk_full import DiskFullError
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.tar_reader import CorruptShardError
from laion_vq.stages.codes import CodeRun, CodeShardResult

if TYPE_CHECKING:
    from laion_vq.defs.checks import InlineCodeChecks

__all__ = ["record_code_shards", "refuse_failed_tars"]

Metadata = Callable[[CodeShardResult], dict]


def refuse_failed_tars(context: dg.AssetExecutionContext) -> dict[str, str]:
    """Shards of this run whose tar check's latest, current result is an ERROR: never encoded (the check
    is blocking within a run; this covers encoder runs launched on their own)."""
    failed = failed_with_error(context.instance, IMAGES_CHECK, list(context.partition_keys))
    for key, result in sorted(failed.items()):
        context.log.error(f"shard {key}: {IMAGES_CHECK.name} failed ({result.detail}); not encoding it")
    return {key: f"{result.reason}: {result.detail}" for key, result in failed.items()}


def record_code_shards(
    context: dg.AssetExecutionContext,
    run: CodeRun,
    metadata: Metadata,
    *,
    excluded: dict[str, str],
    failed_tars: dict[str, str],
    checks: list[dg.AssetCheckKey],
) -> Iterator[dg.Output]:
    """Encode this run's shards with ``run`` and record them, at the end or each as published (module doc), each
    with its two code checks evaluated here (`codes.CODE_CHECK_SPECS`: the step's own).

    ``excluded`` (key → reason) are skipped visibly, ``failed_tars`` (key → reason) fail without being encoded;
    ``metadata`` gives a published shard's partition metadata. Yields the step's outputs: the asset's when
    recording at the end, and one per selected check in ``checks`` (the results are the per-shard evaluations).
    """
    from laion_vq.defs.checks import InlineCodeChecks, step_done  # the checks module imports the assets

    inline = InlineCodeChecks(context.instance, run.layout, run.codes_folder, run.spec.grid, run.spec.n_embed)
    backfill_id = backfill_of(context)
    if backfill_id is None:
        recorded = _record_at_end(context, run, metadata, excluded, failed_tars, inline)
        yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_key(context.asset_key))
        for key in recorded:  # now that Dagster has recorded their materializations, which the results target
            for evaluation in inline.evaluations(key):
                context.log_event(evaluation)
    else:
        _record_each(context, run, metadata, excluded, failed_tars, backfill_id, inline)
    for check in checks:
        yield step_done(context, check)


def _refused_tar(key: str, failed_tars: dict[str, str]) -> CorruptShardError:
    """The error a shard whose tar check failed is reported with, in either recording mode."""
    return CorruptShardError(
        f"{IMAGES_CHECK.name} failed on this shard ({failed_tars[key]}): fix or re-download its tar, "
        "then re-run the check"
    )


def fed_summary(feed: BackfillFeed, backfill_id: str, own: int) -> str:
    """What a fed run did beyond its own shards, naming the shards it left to their own runs and why."""
    text = f"fed {len(feed.fed)} shard(s) of backfill {backfill_id} beyond this run's own {own}"
    if feed.closed_runs:
        text += f"; {len(feed.closed_runs)} queued run(s) of those shards ended without work"
    if feed.corrupt:
        corrupt = "; ".join(f"{k} ({why})" for k, why in sorted(feed.corrupt.items())[:20])
        text += f"; not fed, their tar check failed (each fails in its own run): {corrupt}"
    if feed.excluded_seen:
        excluded = ", ".join(sorted(feed.excluded_seen))
        text += f"; not fed, on the exclusion list (each recorded by its own run): {excluded}"
    return text


def _record_at_end(
    context: dg.AssetExecutionContext,
    run: CodeRun,
    metadata: Metadata,
    excluded: dict[str, str],
    failed_tars: dict[str, str],
    inline: InlineCodeChecks,
) -> list[str]:
    """A run's own shards, recorded when the step ends (Dagster materializes the run's partitions from its
    output): runs outside backfills, where a step downstream in the run may wait for this one. Returns the
    shards encoded, whose checks are then evaluated (here already when some failed: the step fails)."""
    from laion_vq.defs.assets._runs import for_each_shard  # the assets package imports this module

    shards = [parse_shard_key(k) for k in context.partition_keys if k not in excluded]
    refused = {parse_shard_key(k): _refused_tar(k, failed_tars) for k in failed_tars if k not in excluded}

    def checks(keys: list[str]) -> Iterator[dg.AssetCheckEvaluation]:
        for key in keys:
            yield from inline.evaluations(key)

    with run.in_order(shards, refused) as result:
        for_each_shard(context, result, metadata, excluded, checks=checks)
    return [k for k in context.partition_keys if k not in excluded]


def _record_each(
    context: dg.AssetExecutionContext,
    run: CodeRun,
    metadata: Metadata,
    excluded: dict[str, str],
    failed_tars: dict[str, str],
    backfill_id: str,
    checks: InlineCodeChecks,
) -> None:
    """A backfill's run: each shard is recorded (materialization, then its two code checks) the moment it is
    published, so a killed run's retry skips what was done and the UI fills in shard by shard; fed, the run
    then takes the backfill's other shards as their tars land."""
    from laion_vq.defs.assets._runs import resume_after_disk_full  # the assets package imports this module

    feed = BackfillFeed(
        context,
        backfill_id,
        feed=settings.ENCODE_FEED.get_int() != 0,
        excluded=set(excluded),
        poll_seconds=settings.ENCODE_FEED_POLL_SECONDS.get_float(),
        idle_seconds=settings.ENCODE_FEED_IDLE_SECONDS.get_float(),
        handover=settings.ENCODE_FEED_HANDOVER.get_float(),
        log=context.log.info,
    )
    keys = list(context.partition_keys)

    def check_again(done: list[str]) -> None:
        """Evaluate the checks of encoded shards whose latest check execution is not a current result: a run
        killed between recording a shard and checking it, or a run planned after the shard was checked (a killed
        run's retry: Dagster plans its checks when the run is made) whose never-run plans now hide the result."""
        done = [k for k in done if feed.is_done(k)]  # not a shard whose tar changed since (it is encoded again)
        if not done:
            return
        results = [latest_results(context.instance, check, done) for check in (CODES_CHECK, REMOVED_CODES_CHECK)]
        checked = set.intersection(*({r.shard for r in rs if r.current} for rs in results))
        for key in [k for k in done if k not in checked]:
            for evaluation in checks.evaluations(key):
                context.log_event(evaluation)

    already = [k for k in keys if feed.is_done(k)]
    parent = context.run.parent_run_id  # a retry: what its parent recorded, fed shards included, may be unchecked
    if already:
        context.log.info(
            f"{len(already)} shard(s) of this run already encoded in this backfill"
            + (f" (this run retries {parent}, which recorded them)" if parent else " by another of its runs")
            + f", not encoded again: {', '.join(already[:20])}"
        )
    check_again(sorted({*already, *(recorded_by(context.instance, parent) if parent else [])}))
    failures: dict[str, str] = {}
    disk_full: list[str] = []  # where: a fault only an operator can clear
    for key in keys:
        if key in already:
            continue
        if key in excluded:
            context.log.warning(f"shard {key} skipped: on the exclusion list ({excluded[key]})")
            context.log_event(
                dg.AssetMaterialization(context.asset_key, partition=key, metadata=excluded_metadata(excluded[key]))
            )
        elif key in failed_tars:
            error = _refused_tar(key, failed_tars)
            failures[key] = f"{type(error).__name__}: {error}"
    own = [k for k in keys if k not in already and k not in excluded and k not in failed_tars]
    # Recording (the events, the two checks reading the parquet back, closing covered runs) happens on a
    # thread of its own: in this thread it would hold the next batch back from the GPU.
    recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="laion-vq-record")
    last_close = [time.monotonic()]
    recorded = [0]

    def record(key: str, meta: dict) -> None:
        context.log_event(dg.AssetMaterialization(context.asset_key, partition=key, metadata=meta))
        for evaluation in checks.evaluations(key):
            context.log_event(evaluation)
        recorded[0] += 1
        where = "fed" if key in feed.fed else f"{recorded[0]}/{len(own)}"
        context.log.info(f"shard {key} done ({where})")
        if time.monotonic() - last_close[0] >= 10.0:
            check_again(feed.close_covered_runs())
            last_close[0] = time.monotonic()

    pending: list[Future] = []
    try:
        for shard, outcome in run.as_published(feed.shards(own)):
            key = f"{shard:05d}"
            if isinstance(outcome, BaseException):
                context.log.error(f"shard {key} failed: {type(outcome).__name__}: {outcome}")
                failures[key] = f"{type(outcome).__name__}: {outcome}"
                if isinstance(outcome, DiskFullError):
                    disk_full.append(outcome.path)
                feed.failed(key)
                continue
            pending.append(recorder.submit(record, key, metadata(outcome)))
            for future in [f for f in pending if f.done()]:
                pending.remove(future)
                future.result()  # a recording error ends the run here, not silently
    finally:
        recorder.shutdown(wait=True)
    for future in pending:
        future.result()
    check_again(feed.close_covered_runs())
    if feed.fed or feed.corrupt or feed.excluded_seen:
        context.log.info(fed_summary(feed, backfill_id, len(own)))
    if failures:
        raise dg.Failure(
            description=f"{len(failures)} shard(s) failed: "
            + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5])
            + (resume_after_disk_full(context, disk_full) if disk_full else ""),
            metadata={"failed_shards": dg.MetadataValue.json(failures)},
        )
