"""Feeding one encoder run from its backfill, so the GPU stays busy while downloads continue.

A backfill requests `code_parquets` partitions only once their tars are materialized, a few at each daemon
tick, so without feeding it cuts the encoder into many small runs, each paying process start, imports and the
model load. A fed run encodes its own partitions, then keeps its model loaded and takes the backfill's other
`code_parquets` partitions as their tars land and pass `image_tars_complete`, recording each on its own
partition, until none is left to come, the backfill ends, or no tar landed for `idle_seconds`. Runs the
backfill daemon queued meanwhile for shards this run already encoded end successfully without starting, their
log naming this run, tagged `ENCODED_BY_TAG` (`close_covered_runs`); a queued run keeps any shard this run did
not take (a failed tar check, an excluded shard) and fails or skips it visibly, as before. A tar whose check
only warned (a low success rate) is fed like any other.

What the backfill sees: it counts a partition materialized by any run carrying its tag, so it never requests a
fed partition again, and a covered run that ended without work is no failure.

A fed run lives as long as its backfill's downloads (days at 10,000 shards), but run monitoring fails any run
older than its maximum runtime (`max_runtime_seconds`, 12 h, or the run's `dagster/max_runtime` tag), and
RabbitMQ's `consumer_timeout` ends a Celery step at the same age. So feeding hands over: past
`handover` × that limit the run takes no new shard, ends successfully, and the backfill's next encoder run
(already queued for the shards that landed, or requested at the next tick) loads the model and is fed in turn.
One model load per 9 h instead of a red FAILURE and a retry that `run_retries` allows only twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import dagster as dg

from laion_vq.dagster_internals import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    BACKFILL_ID_TAG,
    MAX_RUNTIME_SECONDS_TAG,
    PARTITION_NAME_TAG,
    BulkActionStatus,
)
from laion_vq.defs.check_state import IMAGES_CHECK, latest_results
from laion_vq.defs.partitions import shard_partitions
from laion_vq.shards.numbering import parse_shard_key

#: On a queued run ended without work because a fed run encoded all its shards: that run's id.
ENCODED_BY_TAG = "laion_vq/encoded_by"
#: On a fed run, once it goes beyond its own shards: then how many it encoded, own and fed (the Runs table).
FED_TAG = "laion_vq/fed"

IMAGES_KEY = IMAGES_CHECK.asset_key
CODES_KEY = dg.AssetKey("code_parquets")


def backfill_of(context: dg.AssetExecutionContext) -> str | None:
    """The backfill a run belongs to, when it runs `code_parquets` alone (nothing downstream waits for its
    output in the run): such a run records each shard as it is published, and may be fed."""
    backfill_id = context.run.tags.get(BACKFILL_ID_TAG)
    selection = context.run.asset_selection
    if backfill_id is None or selection is None or set(selection) != {CODES_KEY}:
        return None
    return backfill_id


class BackfillFeed:
    """The shards one encoder run works on, in order: its own, then (when feeding) its backfill's others as
    they become ready. Iterated lazily by the encode pipeline's reader thread; `done`/`failed` are told by the
    caller's thread as results come back."""

    def __init__(
        self,
        context: dg.AssetExecutionContext,
        backfill_id: str,
        *,
        feed: bool,
        excluded: set[str],
        poll_seconds: float = 2.0,
        idle_seconds: float = 900.0,
        handover: float = 0.75,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.instance = context.instance
        self.run_id = context.run_id
        self.backfill_id = backfill_id
        self.asset_graph = context.repository_def.asset_graph
        self.own = [str(k) for k in context.partition_keys]
        self.feeding = feed
        self.excluded = excluded
        self.poll_seconds, self.idle_seconds = poll_seconds, idle_seconds
        self.log = log or (lambda _message: None)
        self._lock = threading.Lock()
        self._cursor: dict[dg.AssetKey, int | None] = {IMAGES_KEY: None, CODES_KEY: None}
        self._tar_latest: dict[str, int] = {}  # partition → storage id of its newest tar, any run
        self._tar_in_backfill: set[str] = set()  # tars this backfill materialized
        self._code_in_backfill: dict[str, int] = {}  # partition → newest code storage id by this backfill
        self._code_latest: dict[str, int] = {}  # partition → storage id of its newest codes, any run
        self._runs_in_backfill: dict[str, bool] = {}
        self._taken: set[str] = set()
        self._given_up: set[str] = set()
        self._target: set[str] = set()
        self._failed_upstream: set[str] = set()
        self._backfill_live = True
        self._backfill_read_at = 0.0
        self.fed: list[str] = []
        self.corrupt: dict[str, str] = {}  # shard → why its tar check failed: not fed, its own run reports it
        self.excluded_seen: set[str] = set()  # excluded shards that landed: their own run records the exclusion
        self.closed_runs: list[str] = []
        self.handover_share = handover
        self.max_runtime, self.handover_at = handover_time(self.instance, self.run_id, handover)
        self.handed_over = False
        self.refresh()

    # -- what the instance says -------------------------------------------------------------------------------

    def _in_backfill(self, run_ids: Sequence[str]) -> None:
        unknown = sorted({r for r in run_ids if r and r not in self._runs_in_backfill})
        if unknown:
            for record in self.instance.get_run_records(filters=dg.RunsFilter(run_ids=unknown)):
                run = record.dagster_run
                self._runs_in_backfill[run.run_id] = run.tags.get(BACKFILL_ID_TAG) == self.backfill_id
            for run_id in unknown:
                self._runs_in_backfill.setdefault(run_id, False)

    def _new_materializations(self, key: dg.AssetKey) -> list[dg.EventLogRecord]:
        records: list[dg.EventLogRecord] = []
        while True:
            page = self.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, after_storage_id=self._cursor[key]), limit=1000, ascending=True
            )
            records += page.records
            if page.records:
                self._cursor[key] = page.records[-1].storage_id
            if not page.has_more:
                return records

    def refresh(self) -> None:
        """Read the tars and codes materialized since the last look, and (every 10 s) the backfill itself."""
        tars, codes = self._new_materializations(IMAGES_KEY), self._new_materializations(CODES_KEY)
        self._in_backfill([r.run_id for r in tars + codes])
        with self._lock:
            for record in tars:
                if record.partition_key is not None:
                    self._tar_latest[record.partition_key] = record.storage_id
                    if self._runs_in_backfill.get(record.run_id):
                        self._tar_in_backfill.add(record.partition_key)
            for record in codes:
                if record.partition_key is not None:
                    self._code_latest[record.partition_key] = record.storage_id
                    if self._runs_in_backfill.get(record.run_id):
                        self._code_in_backfill[record.partition_key] = record.storage_id
        if time.monotonic() - self._backfill_read_at >= 10.0:
            self._read_backfill()

    def _read_backfill(self) -> None:
        self._backfill_read_at = time.monotonic()
        backfill = self.instance.get_backfill(self.backfill_id)
        if backfill is None or not backfill.is_asset_backfill:
            self._backfill_live = False
            return
        self._backfill_live = backfill.status == BulkActionStatus.REQUESTED
        data = backfill.get_asset_backfill_data(self.asset_graph)
        if not self._target:
            keys = data.target_subset.asset_keys
            # feeding needs tars to come from this backfill: a codes-only backfill is requested all at once
            if CODES_KEY in keys and IMAGES_KEY in keys:
                self._target = set(data.target_subset.get_partitions_subset(CODES_KEY).get_partition_keys())
        failed = data.failed_and_downstream_subset
        if CODES_KEY in failed.asset_keys:
            self._failed_upstream = set(failed.get_partitions_subset(CODES_KEY).get_partition_keys())

    def is_done(self, key: str) -> bool:
        """Encoded by a run of this backfill (e.g. before a retry), and its codes are newer than its tar: a
        re-downloaded tar makes it to do again; a removal, which rewrites the tar and then the codes of a shard
        (`apply_removals`), does not."""
        if key not in self._code_in_backfill:
            return False
        return self._code_latest[key] > self._tar_latest.get(key, -1)

    # -- told by the caller -------------------------------------------------------------------------------------

    def failed(self, key: str) -> None:
        with self._lock:
            self._given_up.add(key)

    # -- the shards, in order -----------------------------------------------------------------------------------

    def _pending(self) -> set[str]:
        """Target partitions that may still come: not done, not failed upstream, not given up, not this run's."""
        with self._lock:
            done = {k for k in self._code_in_backfill if self.is_done(k)}
            return self._target - set(self.own) - done - self._failed_upstream - self._given_up - self._taken

    def _ready(self, pending: set[str]) -> list[str]:
        """Pending shards whose tar this backfill made and whose latest tar check passed on that tar."""
        landed = sorted(k for k in pending if k in self._tar_in_backfill)
        for key in [k for k in landed if k in self.excluded]:  # left to the backfill's own run to record
            self._given_up.add(key)
            self.excluded_seen.add(key)
        landed = [k for k in landed if k not in self.excluded]
        if not landed:
            return []
        results = {r.shard: r for r in latest_results(self.instance, IMAGES_CHECK, landed)}
        ready = []
        for key in landed:
            result = results.get(key)
            if result is None or not result.current:
                continue  # its check has not run on this tar yet
            if result.passed or result.severity != "ERROR":  # a WARN (a low success rate) is no corruption
                ready.append(key)
            else:
                self._given_up.add(key)  # the backfill's own run for it reports the failure
                self.corrupt[key] = f"{result.reason}: {result.detail}"
        return ready

    def shards(self, own: Sequence[str]) -> Iterator[int]:
        """`own` (this run's shards to encode), then, when feeding, each ready shard of the backfill."""
        for key in own:
            yield parse_shard_key(key)
        if not self.feeding:
            return
        idle_since = time.monotonic()
        announced = False
        while True:
            self.refresh()
            pending = self._pending()
            if not self._target or not self._backfill_live or not pending:
                return
            if self.handover_at is not None and time.time() >= self.handover_at:
                self.handed_over = True
                self.log(
                    f"feeding: handing over to a fresh encoder run of backfill {self.backfill_id} with "
                    f"{len(pending)} shard(s) still to come: this run has run {self.handover_share:.0%} of its "
                    f"maximum runtime ({self.max_runtime:.0f} s, after which run monitoring would fail it)"
                )
                return
            if not announced:
                self.log(f"feeding: {len(pending)} shard(s) of backfill {self.backfill_id} may still come")
                announced = True
            ready = self._ready(pending)
            if ready:
                idle_since = time.monotonic()
                for key in ready:
                    with self._lock:
                        self._taken.add(key)
                    self.fed.append(key)
                    if len(self.fed) == 1:
                        self.tag_progress()
                    yield parse_shard_key(key)
                continue
            if time.monotonic() - idle_since >= self.idle_seconds:
                self.log(
                    f"feeding: no tar ready for {self.idle_seconds:.0f}s; ending with {len(pending)} shard(s) still "
                    "to come (the backfill requests them in runs of their own)"
                )
                return
            time.sleep(self.poll_seconds)

    # -- the backfill's duplicate runs ---------------------------------------------------------------------------

    def close_covered_runs(self) -> list[str]:
        """End, successfully and without starting, the backfill's queued encoder runs whose every shard this
        backfill has encoded (by this run, fed); returns those runs' shards.

        Cancelled instead, each would be a red bar on the backfill's timeline and, as the latest run planned
        for its partitions, an orange "was canceled, and did not materialize this asset" banner on partitions
        that are materialized. Ended successfully, its log says which run encoded its shards and it is tagged
        `ENCODED_BY_TAG`; Dagster's own cancel has the same window against the queue's dequeuer, and a run
        dequeued in it finds its shards done (`is_done`) and encodes nothing."""
        self.refresh()
        queued = self.instance.get_runs(
            filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: self.backfill_id}, statuses=[dg.DagsterRunStatus.QUEUED])
        )
        closed, covered = [], []
        for run in queued:
            if run.asset_selection is None or set(run.asset_selection) != {CODES_KEY}:
                continue
            keys = run_partition_keys(run.tags)
            if not keys or not all(self.is_done(k) for k in keys):
                continue
            if not self._close(run, keys):
                continue
            closed.append(run.run_id)
            covered += keys
            if run.parent_run_id:  # a killed run's retry: the shards its parent fed may be unchecked too
                covered += recorded_by(self.instance, run.parent_run_id)
        if closed:
            self.log(f"ended {len(closed)} queued encoder run(s) without work, their shards encoded here: {closed}")
        self.closed_runs += closed
        self.tag_progress()
        return covered

    def _close(self, run: dg.DagsterRun, keys: list[str]) -> bool:
        """A queued run whose shards are all encoded ends SUCCESS with a log line saying by which run."""
        current = self.instance.get_run_by_id(run.run_id)
        if current is None or current.status != dg.DagsterRunStatus.QUEUED:  # the queue took it meanwhile
            return False
        self.instance.add_run_tags(run.run_id, {ENCODED_BY_TAG: self.run_id})
        shards = ", ".join(keys) if len(keys) <= 8 else f"{keys[0]}…{keys[-1]} ({len(keys)})"
        message = (
            f"Nothing left to do: shard(s) {shards} were encoded by run {self.run_id} of backfill {self.backfill_id}, "
            "which takes the backfill's shards as their tars land (one model load for many shards). This run "
            "ends successfully without starting; each partition's page shows the materialization by that run."
        )
        self.instance.report_engine_event(message, current)
        done = f"Finished without work: its shards were encoded by run {self.run_id}."
        self.instance.report_dagster_event(
            dg.DagsterEvent(
                event_type_value=dg.DagsterEventType.RUN_SUCCESS.value, job_name=current.job_name, message=done
            ),
            run_id=run.run_id,
        )
        return True

    def tag_progress(self) -> None:
        """The run's `FED_TAG`: what it encoded beyond the partition range it was launched for (the range tags
        Dagster shows stay the run's own; run retries re-plan from them)."""
        if not self.fed:
            return
        keys = sorted({*self.own, *self.fed})
        self.instance.add_run_tags(
            self.run_id,
            {FED_TAG: f"{len(keys)} shards {keys[0]}–{keys[-1]}: {len(self.own)} own + {len(self.fed)} fed"},
        )


def recorded_by(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The `code_parquets` partitions a run recorded (its own and those it was fed)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return sorted(
        {
            r.event_log_entry.dagster_event.partition
            for r in records
            if r.event_log_entry.dagster_event
            and r.event_log_entry.dagster_event.asset_key == CODES_KEY
            and r.event_log_entry.dagster_event.partition
        }
    )


def max_runtime(instance: dg.DagsterInstance, tags: dict[str, str]) -> float | None:
    """The age at which run monitoring fails a run (seconds), as its daemon reads it; None: never."""
    if not instance.run_monitoring_enabled:
        return None
    value = tags.get(MAX_RUNTIME_SECONDS_TAG, tags.get("dagster/max_runtime_seconds"))
    try:
        limit = float(value) if value else float(instance.run_monitoring_max_runtime_seconds or 0)
    except ValueError:
        return None
    return limit or None


def handover_time(instance: dg.DagsterInstance, run_id: str, share: float) -> tuple[float, float | None]:
    """The run's maximum runtime (0: none) and when (epoch seconds) a fed run stops taking shards: `share` of
    it after the run started; None: never."""
    record = instance.get_run_record_by_id(run_id)
    limit = max_runtime(instance, dict(record.dagster_run.tags)) if record else None
    if record is None or limit is None or not 0 < share < 1:
        return 0.0, None
    return limit, (record.start_time or time.time()) + share * limit


def run_partition_keys(tags: dict[str, str]) -> list[str]:
    """The partitions a run targets, from its partition or partition-range tags."""
    if PARTITION_NAME_TAG in tags:
        return [tags[PARTITION_NAME_TAG]]
    start, end = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if start is None or end is None:
        return []
    return list(shard_partitions.get_partition_keys_in_range(dg.PartitionKeyRange(start, end)))
