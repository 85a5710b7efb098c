"""The backfill, measured: all partitions of the whole graph through the UI's own mutation, on the real
webserver and daemon over PostgreSQL, with the production instance (`deploy/dagster.yaml`).

What it does, per daemon setting tried (`--variants`), each on a fresh database and `DAGSTER_HOME`:

1. starts `dagster-daemon` and `dagster-webserver` on this project's workspace
   (`laion_vq.testing.dagster_services`) with `LAION_VQ_NUM_SHARDS=--partitions`;
2. times the partition-status query the UI sends for an asset's partition bar (`PartitionHealthQuery`,
   copied from the UI's `usePartitionHealthData.tsx`) for each of the three assets (median of a few);
3. launches the backfill as the UI's "Materialize all" → "Launch backfill" does for a graph whose assets
   share one partitions definition: `launchPartitionBackfill` with `assetSelection` = the three assets and
   `partitionNames` = every shard key (`LaunchAssetChoosePartitionsDialog.tsx`), and times the mutation;
4. counts what the backfill needs: Dagster's own planner (`build_run_requests_with_backfill_policies`,
   the function the backfill daemon calls) over the backfill's stored target — one run per shard batch
   (the download and encoder backfill policies), never one per shard;
5. samples the runs the daemon has created for the backfill every `--sample-every` s for `--minutes`
   (or until every run it can request now is queued), then reads every run's creation time to give the
   latency to the first run (the daemon's 30 s tick, then its planning), the steady enqueue rate and the
   extrapolated time to enqueue every run the backfill needs; with the daemon's CPU time per run and this
   database's PostgreSQL counters per run (connections, statement time, transactions), which the
   machine's other load does not blur the way it blurs wall-clock rates;
6. times the status queries again with the runs queued, measures the instance database's growth
   (`pg_database_size`, and the tables that grew) per 1,000 shards of runs created;
7. cancels through `cancelPartitionBackfill` and waits for CANCELED with no queued run of the backfill
   left, and counts the runs created after the cancel request.

Runs never execute: the yaml's `concurrency.runs.max_concurrent_runs` is overridden to 0, so only the
orchestration is measured. The backfill daemon still creates every run and submits it to the
QueuedRunCoordinator, which puts it in the queue (status QUEUED, what the counts show); the queue
daemon sees 0 free run slots and returns before reading the queue, so it neither launches anything nor
competes for the CPU. The encoder runs depend on their downloads, so the daemon requests them only when
those finish: here only the download runs can be enqueued, and the time to enqueue every run is
extrapolated from the measured rate two ways — every run priced like a download run, and every run
priced by the asset partitions it covers (Dagster writes one planned event per asset partition, so an
encoder run of many shards costs more) — the enqueue work, not the waiting on downloads.

Where a run's time goes inside the daemon: `benchmarks/bench_backfill_profile.py`.

Daemon settings compared (`--variants`, each a fresh deployment; yaml keys replace the production yaml's):

- `production`: `deploy/dagster.yaml` as is;
- `backfill-threads`: `backfills: {use_threads: true, num_workers: 4, num_submit_workers: 4}` —
  `num_workers` runs several backfills at once, `num_submit_workers` parallelises job (partition-set)
  backfills only (dagster/_daemon/backfill.py): one asset backfill is unchanged;
- `dequeue-threads`: the queued coordinator's `dequeue_use_threads: true, dequeue_num_workers: 4` —
  launches queued runs in parallel, does not create them;
- `chunk-250`: env `DAGSTER_ASSET_BACKFILL_RUN_CHUNK_SIZE=250` on the daemon (runs submitted between two
  rewrites of the backfill row, Dagster's default 25): less database growth, the cancel seen later;
- `planned-subset`: env `DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=1` on the daemon: one planned
  event per asset per run instead of one per asset partition — fewer writes, but queued partitions no
  longer show as in progress in the UI, and (Dagster's comment on the flag) a failed run's partitions are
  not marked failed.

    .venv/bin/python benchmarks/bench_backfill.py --partitions 10000 --minutes 10
    .venv/bin/python benchmarks/bench_backfill.py --minutes 2 --variants production,chunk-250,production

Targets printed at the end: backfill created < 5 s, partition status < 1 s, every run enqueued < 10 min.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]
TARGET_CREATE_S = 5.0
TARGET_STATUS_S = 1.0
TARGET_ENQUEUE_S = 600.0

#: (yaml overrides on top of the no-execution override, extra env for the services)
VARIANTS: dict[str, tuple[dict, dict[str, str]]] = {
    "production": ({}, {}),
    "backfill-threads": ({"backfills": {"use_threads": True, "num_workers": 4, "num_submit_workers": 4}}, {}),
    "dequeue-threads": (
        {
            "run_coordinator": {
                "module": "dagster.core.run_coordinator",
                "class": "QueuedRunCoordinator",
                "config": {"dequeue_use_threads": True, "dequeue_num_workers": 4},
            }
        },
        {},
    ),
    "chunk-250": ({}, {"DAGSTER_ASSET_BACKFILL_RUN_CHUNK_SIZE": "250"}),
    "planned-subset": ({}, {"DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "1"}),
}

CANCEL_BACKFILL = """
mutation CancelBackfill($backfillId: String!) {
  cancelPartitionBackfill(backfillId: $backfillId) {
    __typename
    ... on CancelBackfillSuccess { backfillId }
    ... on Error { message }
  }
}
"""

#: The UI's partition bar query (ui-core/src/assets/usePartitionHealthData.tsx, PARTITION_HEALTH_QUERY).
PARTITION_HEALTH = """
query PartitionHealthQuery($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id
      partitionKeysByDimension { name type partitionKeys }
      assetPartitionStatuses {
        ... on TimePartitionStatuses { ranges { status startTime endTime startKey endKey } }
        ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
        ... on MultiPartitionStatuses {
          primaryDimensionName
          ranges {
            primaryDimStartKey
            primaryDimEndKey
            primaryDimStartTime
            primaryDimEndTime
            secondaryDim {
              ... on TimePartitionStatuses { ranges { status startTime endTime startKey endKey } }
              ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
            }
          }
        }
      }
    }
  }
}
"""

WORKSPACE = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries { name loadStatus locationOrLoadError { __typename ... on PythonError { message } } }
    }
  }
}
"""


@dataclass
class Result:
    variant: str
    partitions: int
    create_s: float = math.nan
    planned: dict[str, int] = field(default_factory=dict)  # job kind → runs the planner makes
    targeted: dict[str, int] = field(default_factory=dict)  # asset → partitions the backfill targets
    status_before: dict[str, float] = field(default_factory=dict)
    status_after: dict[str, float] = field(default_factory=dict)
    status_after_cancel: dict[str, float] = field(default_factory=dict)
    materializing_after: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s since launch, runs created)
    runs_created: int = 0
    runs_by_status: dict[str, int] = field(default_factory=dict)
    runs_by_kind: dict[str, int] = field(default_factory=dict)
    shards_in_runs: int = 0
    asset_partitions: int = 0  # asset partitions the backfill targets (assets × shards)
    asset_partitions_in_runs: int = 0  # asset partitions the created runs cover
    max_shards_per_run: int = 0
    first_run_s: float = math.nan
    last_run_s: float = math.nan
    steady_rate: float = math.nan
    elapsed_s: float = math.nan
    db_before: int = 0
    db_after: int = 0
    table_growth: dict[str, int] = field(default_factory=dict)
    cancel_request_s: float = math.nan
    cancel_done_s: float = math.nan
    cancel_status: str = ""
    queued_left: int = -1
    runs_after_cancel_seen: int = 0
    runs_canceled: int = 0
    daemon_errors: list[str] = field(default_factory=list)
    evaluations: list[float] = field(default_factory=list)  # s since launch the daemon began each iteration
    daemon_cpu_s: float = math.nan  # CPU seconds of the daemon's process group while it enqueued
    pg_stats: dict[str, float] = field(default_factory=dict)  # pg_stat_database deltas while it enqueued

    @property
    def needed(self) -> int:
        return sum(self.planned.values())

    @property
    def enqueueable(self) -> int:
        """Runs the daemon can request before any run executes: the roots' (download) runs."""
        return self.planned.get("download", 0)

    def extrapolated_s(self, runs: int) -> float:
        """Launch → the `runs`-th run queued: measured when that many were, else latency + rest / rate."""
        if self.runs_created >= runs:
            return self.last_run_s
        if not self.steady_rate or math.isnan(self.steady_rate) or self.runs_created == 0:
            return math.inf
        return self.last_run_s + (runs - self.runs_created) / self.steady_rate

    def extrapolated_by_partitions_s(self) -> float:
        """Launch → every run queued, if a run's cost grows with the asset partitions it covers (Dagster
        writes one planned event per asset partition): the encoder runs' 32 shards then cost 8× a
        download run's 4. An upper bound to `extrapolated_s(needed)`, which prices every run alike."""
        if not self.steady_rate or math.isnan(self.steady_rate) or self.asset_partitions_in_runs == 0:
            return math.inf
        per_second = self.steady_rate * self.asset_partitions_in_runs / self.runs_created
        return self.last_run_s + (self.asset_partitions - self.asset_partitions_in_runs) / per_second


def run_kind(asset_selection) -> str:
    keys = {k.to_user_string() for k in asset_selection or []}
    return "encode" if "code_parquets" in keys else "download"


def db_size(pg_url: str) -> tuple[int, dict[str, int]]:
    import psycopg2

    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_database_size(current_database())")
        total = int(cur.fetchone()[0])
        cur.execute("SELECT relname, pg_total_relation_size(relid) FROM pg_catalog.pg_statio_user_tables")
        tables = {name: int(size) for name, size in cur.fetchall()}
    conn.close()
    return total, tables


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU seconds of every live process in a process group (Linux /proc), with their reaped
    children: the daemon and its code server, unaffected by other work on the machine."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


PG_STATS = ("sessions", "active_time", "xact_commit", "tup_inserted", "tup_updated")


def pg_database_stats(pg_url: str) -> dict[str, float]:
    """This database's cumulative counters (pg_stat_database): connections opened, milliseconds spent
    executing statements, transactions, rows written. Per database, so other work on the server (and
    the machine's load, for the counts) does not blur them."""
    import psycopg2

    conn = psycopg2.connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute(f"SELECT {', '.join(PG_STATS)} FROM pg_stat_database WHERE datname = current_database()")
            row = cur.fetchone()
    finally:
        conn.close()
    return {name: float(value or 0) for name, value in zip(PG_STATS, row, strict=True)}


def time_status(services, repeats: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds of the UI's partition-status query per asset, and its materializing count."""
    medians, materializing = {}, {}
    for asset in ASSETS:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            data = services.graphql(PARTITION_HEALTH, {"assetKey": {"path": [asset]}})
            times.append(time.perf_counter() - t0)
        node = data["assetNodeOrError"]
        assert len(node["partitionKeysByDimension"][0]["partitionKeys"]) > 0, node
        medians[asset] = statistics.median(times)
        materializing[asset] = len(node["assetPartitionStatuses"].get("materializingPartitions") or [])
    return medians, materializing


def wait_for_location(services, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = services.graphql(WORKSPACE)["workspaceOrError"]
        entries = last.get("locationEntries") or []
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            errors = [e for e in entries if e["locationOrLoadError"]["__typename"] != "RepositoryLocation"]
            if errors:
                raise RuntimeError(f"code location failed to load: {errors}")
            return
        time.sleep(1)
    raise TimeoutError(f"code location not loaded after {timeout:.0f} s: {last}")


def planned_runs(instance, backfill_id: str) -> tuple[dict[str, int], int]:
    """Runs Dagster's planner makes for the backfill's whole stored target, by kind; asset partitions targeted."""
    from dagster._core.definitions.automation_tick_evaluation_context import (
        build_run_requests_with_backfill_policies,
    )

    from laion_vq.definitions import defs

    graph = defs.resolve_asset_graph()
    data = instance.get_backfill(backfill_id).get_asset_backfill_data(graph)
    requested = list(data.target_subset.iterate_asset_partitions())
    requests = build_run_requests_with_backfill_policies(requested, graph, instance)
    return dict(Counter(run_kind(r.asset_selection) for r in requests)), len(requested)


def backfill_runs(instance, backfill_id: str):
    import dagster as dg
    from dagster._core.storage.tags import BACKFILL_ID_TAG

    return instance.get_run_records(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))


def count_runs(instance, backfill_id: str, statuses=None) -> int:
    import dagster as dg
    from dagster._core.storage.tags import BACKFILL_ID_TAG

    return instance.get_runs_count(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}, statuses=statuses))


def steady_rate(create_times: list[float]) -> float:
    """Runs per second from a least-squares line through (creation time, index), past the first chunk."""
    times = sorted(create_times)[25:] if len(create_times) > 60 else sorted(create_times)
    if len(times) < 2 or times[-1] == times[0]:
        return math.nan
    n = len(times)
    mean_t, mean_i = sum(times) / n, (n - 1) / 2
    cov = sum((t - mean_t) * (i - mean_i) for i, t in enumerate(times))
    var = sum((t - mean_t) ** 2 for t in times)
    return cov / var if var else math.nan


def measure(variant: str, args: argparse.Namespace, workdir: Path) -> Result:
    """One fresh deployment (database, DAGSTER_HOME under `workdir`) with `variant`'s settings, measured."""
    import dagster as dg

    from laion_vq.shards.numbering import shard_keys
    from laion_vq.testing.dagster_services import PRODUCTION_YAML, dagster_services, postgres_database

    overrides_extra, env_extra = VARIANTS[variant]
    production = yaml.safe_load(PRODUCTION_YAML.read_text())
    concurrency = copy.deepcopy(production["concurrency"])
    concurrency["runs"]["max_concurrent_runs"] = 0  # queue only: nothing executes
    overrides = {"concurrency": concurrency, **overrides_extra}
    home = workdir / variant / "dagster_home"
    env = {
        "LAION_VQ_NUM_SHARDS": str(args.partitions),
        "LAION_VQ_STORAGE": str(workdir / variant / "data"),
        "LAION_VQ_METADATA": str(workdir / variant / "laion-metadata"),
        **env_extra,
    }
    result = Result(variant=variant, partitions=args.partitions)
    keys = shard_keys(args.partitions)
    print(f"\n=== {variant}: {args.partitions} partitions, overrides {overrides_extra or '-'}, env {env_extra or '-'}")

    with postgres_database("laion_vq_bench") as pg_url:
        started = time.perf_counter()
        with dagster_services(home, pg_url, env=env, overrides=overrides) as services, services.instance() as inst:
            wait_for_location(services)
            print(f"services up in {time.perf_counter() - started:.1f} s ({services.url})")
            result.status_before, _ = time_status(services, args.status_repeats)
            print("status query before: " + ", ".join(f"{a} {s:.3f} s" for a, s in result.status_before.items()))
            result.db_before, tables_before = db_size(pg_url)

            daemon_pgid = services.processes["daemon"].pid  # its own session: pgid == pid
            cpu_before = group_cpu_seconds(daemon_pgid)
            pg_before = pg_database_stats(pg_url)
            t0 = time.perf_counter()
            launched_wall = time.time()
            # launchPartitionBackfill with the three assets and every shard key, as the UI sends it
            backfill_id = services.launch_backfill(ASSETS, keys)
            result.create_s = time.perf_counter() - t0
            print(f"backfill {backfill_id} created in {result.create_s:.2f} s")

            status = services.backfill(backfill_id)
            result.targeted = {
                "/".join(s["assetKey"]["path"]): s["numPartitionsTargeted"]
                for s in status["assetBackfillData"]["assetBackfillStatuses"]
            }
            t_plan = time.perf_counter()
            result.planned, result.asset_partitions = planned_runs(inst, backfill_id)
            print(
                f"targets {result.targeted} ({result.asset_partitions} asset partitions); Dagster's planner makes "
                f"{result.needed} runs: {result.planned} (planned here in {time.perf_counter() - t_plan:.1f} s)"
            )

            deadline = t0 + args.minutes * 60
            next_sample = t0
            while True:
                now = time.perf_counter()
                if now >= next_sample:
                    created = count_runs(inst, backfill_id)
                    result.samples.append((now - t0, created))
                    rate = created / (now - t0) if now > t0 else 0.0
                    print(f"  t={now - t0:7.1f} s  runs created {created:5d}  ({rate:.2f}/s since launch)")
                    next_sample += args.sample_every
                    if created >= result.enqueueable:
                        break
                    if services.processes["daemon"].poll() is not None:
                        raise RuntimeError(f"dagster-daemon exited:\n{services.log('daemon')[-3000:]}")
                if now >= deadline:
                    break
                time.sleep(min(1.0, max(0.0, next_sample - time.perf_counter())))
            result.elapsed_s = time.perf_counter() - t0
            result.daemon_cpu_s = group_cpu_seconds(daemon_pgid) - cpu_before
            time.sleep(1.5)  # backends report their counters within a second
            pg_after = pg_database_stats(pg_url)
            result.pg_stats = {k: pg_after[k] - pg_before[k] for k in PG_STATS}

            records = backfill_runs(inst, backfill_id)
            created_at = [r.create_timestamp.timestamp() - launched_wall for r in records]
            result.runs_created = len(records)
            result.runs_by_status = dict(Counter(r.dagster_run.status.value for r in records))
            result.runs_by_kind = dict(Counter(run_kind(r.dagster_run.asset_selection) for r in records))
            widths = [_width(r.dagster_run.tags) for r in records]
            result.shards_in_runs = sum(
                w for w, r in zip(widths, records, strict=True) if run_kind(r.dagster_run.asset_selection) == "download"
            )
            result.max_shards_per_run = max(widths, default=0)
            result.asset_partitions_in_runs = sum(
                w * len(r.dagster_run.asset_selection or ()) for w, r in zip(widths, records, strict=True)
            )
            if created_at:
                result.first_run_s, result.last_run_s = min(created_at), max(created_at)
                result.steady_rate = steady_rate(created_at)

            result.status_after, result.materializing_after = time_status(services, args.status_repeats)
            print("status query after:  " + ", ".join(f"{a} {s:.3f} s" for a, s in result.status_after.items()))
            result.db_after, tables_after = db_size(pg_url)
            result.table_growth = {
                t: tables_after.get(t, 0) - tables_before.get(t, 0)
                for t in sorted(tables_after, key=lambda t: tables_before.get(t, 0) - tables_after[t])[:6]
            }

            # cancel as the UI's "Cancel backfill" does, then wait for CANCELED and an empty queue
            t_cancel = time.perf_counter()
            cancel_wall = time.time()
            reply = services.graphql(CANCEL_BACKFILL, {"backfillId": backfill_id})["cancelPartitionBackfill"]
            result.cancel_request_s = time.perf_counter() - t_cancel
            if reply["__typename"] != "CancelBackfillSuccess":
                raise RuntimeError(f"cancelPartitionBackfill: {reply}")
            cancel_deadline = t_cancel + args.cancel_timeout
            while time.perf_counter() < cancel_deadline:
                state = services.backfill(backfill_id)
                result.cancel_status = state.get("status", "")
                queued = count_runs(inst, backfill_id, [dg.DagsterRunStatus.QUEUED])
                if result.cancel_status == "CANCELED" and queued == 0:
                    break
                time.sleep(2)
            result.cancel_done_s = time.perf_counter() - t_cancel
            result.queued_left = count_runs(inst, backfill_id, [dg.DagsterRunStatus.QUEUED])
            records = backfill_runs(inst, backfill_id)
            result.runs_canceled = sum(r.dagster_run.status == dg.DagsterRunStatus.CANCELED for r in records)
            # runs created after the daemon could see the cancel (it checks between chunks of runs)
            result.runs_after_cancel_seen = sum(r.create_timestamp.timestamp() > cancel_wall for r in records)
            print(
                f"cancel: {result.cancel_status} after {result.cancel_done_s:.1f} s, {result.runs_canceled} runs "
                f"canceled, {result.queued_left} still queued, {result.runs_after_cancel_seen} runs created after "
                f"the cancel request, {len(records)} runs in all"
            )
            result.status_after_cancel, _ = time_status(services, args.status_repeats)
            log = services.log("daemon")
            result.daemon_errors = [line for line in log.splitlines() if " - ERROR - " in line][:5]
            result.evaluations = iteration_starts(log, backfill_id, launched_wall)
    return result


def iteration_starts(log: str, backfill_id: str, since: float) -> list[float]:
    """Seconds after `since` at which the daemon logged "Evaluating asset backfill <id>" (1 s resolution)."""
    from datetime import datetime

    starts = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines():  # the daemon's log is coloured
        if f"Evaluating asset backfill {backfill_id}" in line:
            stamp = line.split(" - ", 1)[0].strip()
            with contextlib.suppress(ValueError):
                starts.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S %z").timestamp() - since)
    return starts


def _width(tags) -> int:
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    start, end = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if start is None or end is None:
        return 1
    return int(end) - int(start) + 1


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def report(results: list[Result], args: argparse.Namespace) -> None:
    print("\n" + "=" * 100)
    print(
        f"backfill of {args.partitions} partitions × {len(ASSETS)} assets, budget {args.minutes} min per variant, "
        f"{os.cpu_count()} CPUs"
    )
    for r in results:
        per_k = 1000 / r.shards_in_runs if r.shards_in_runs else math.nan
        growth = r.db_after - r.db_before
        enqueue_all = r.extrapolated_s(r.needed)
        enqueue_all_hi = max(enqueue_all, r.extrapolated_by_partitions_s())
        enqueue_now = r.extrapolated_s(r.enqueueable)
        print(f"\n[{r.variant}]")
        print(f"  created (launchPartitionBackfill):   {r.create_s:.2f} s")
        print(f"  runs the backfill needs:             {r.needed} = {r.planned} (targets {r.targeted})")
        print(
            f"  runs created after {r.elapsed_s:.0f} s:            {r.runs_created} {r.runs_by_kind}, "
            f"statuses {r.runs_by_status}; widest run {r.max_shards_per_run} shards"
        )
        first_eval = r.evaluations[0] if r.evaluations else math.nan
        print(
            f"  first run queued after:              {r.first_run_s:.1f} s: the daemon's first iteration began at "
            f"{first_eval:.0f} s (its 30 s tick), planning it took {r.first_run_s - first_eval:.0f} s; "
            f"{len(r.evaluations)} iterations began"
        )
        print(
            f"  steady enqueue rate:                 {r.steady_rate:.2f} runs/s "
            f"(over the run lifetime incl. latency: {r.runs_created / r.elapsed_s:.2f} runs/s); daemon CPU "
            f"{1000 * r.daemon_cpu_s / max(1, r.runs_created):.0f} ms per run (PostgreSQL's own not counted)"
        )
        per_run = {k: v / max(1, r.runs_created) for k, v in r.pg_stats.items()}
        if per_run:
            print(
                f"  PostgreSQL per run created:          {per_run['sessions']:.0f} connections, "
                f"{per_run['active_time']:.0f} ms executing statements, {per_run['xact_commit']:.0f} transactions, "
                f"{per_run['tup_inserted']:.0f} rows inserted, {per_run['tup_updated']:.0f} updated "
                "(this database only, while the daemon enqueued)"
            )
        print(
            "  runs created over time (s, runs):    "
            + ", ".join(f"{t:.0f}:{n}" for t, n in r.samples[:: max(1, len(r.samples) // 12)])
        )
        print(
            f"  all {r.enqueueable} download runs queued:     "
            f"{_fmt_s(enqueue_now)} ({'measured' if r.runs_created >= r.enqueueable else 'extrapolated'})"
        )
        print(
            f"  all {r.needed} runs queued (enqueue work):  {_fmt_s(enqueue_all)} … {_fmt_s(enqueue_all_hi)} "
            "(every run priced as a download run … by the asset partitions it covers; the encoder runs also "
            "wait for their downloads)"
        )
        print(
            "  partition status (UI query), median: before "
            + ", ".join(f"{a} {s:.3f} s" for a, s in r.status_before.items())
        )
        print(
            "                                       after  "
            + ", ".join(f"{a} {s:.3f} s" for a, s in r.status_after.items())
            + f"  (materializing {r.materializing_after})"
        )
        print(
            "                                after cancel  "
            + ", ".join(f"{a} {s:.3f} s" for a, s in r.status_after_cancel.items())
        )
        print(
            f"  database: {mb(r.db_before)} → {mb(r.db_after)}, +{mb(growth)} for {r.shards_in_runs} shards in runs "
            f"= {mb(growth * per_k)} per 1,000 shards; grew most: "
            + ", ".join(f"{t} +{mb(g)}" for t, g in r.table_growth.items() if g > 0)
        )
        print(
            f"  cancel: mutation {r.cancel_request_s:.2f} s, backfill {r.cancel_status} "
            f"after {r.cancel_done_s:.1f} s, {r.runs_canceled} runs canceled, {r.queued_left} left queued, "
            f"{r.runs_after_cancel_seen} created after the request"
        )
        if r.daemon_errors:
            print("  daemon errors: " + " | ".join(r.daemon_errors))
        status_worst = max([*r.status_before.values(), *r.status_after.values()], default=math.nan)
        print("  targets:")
        print(
            f"    created < {TARGET_CREATE_S:.0f} s:              {r.create_s:.2f} s  "
            f"{_met(r.create_s < TARGET_CREATE_S)}"
        )
        print(
            f"    partition status < {TARGET_STATUS_S:.0f} s:     worst median {status_worst:.3f} s  "
            f"{_met(status_worst < TARGET_STATUS_S)}"
        )
        verdict = _met(enqueue_all < TARGET_ENQUEUE_S)
        if enqueue_all < TARGET_ENQUEUE_S <= enqueue_all_hi:
            verdict = "met only if encoder runs cost what download runs do"
        print(
            f"    every run enqueued < {TARGET_ENQUEUE_S / 60:.0f} min: {_fmt_s(enqueue_all)} … "
            f"{_fmt_s(enqueue_all_hi)}  {verdict}"
        )
        print(
            f"    cancels cleanly:            {r.cancel_status}, {r.queued_left} queued left  "
            f"{_met(r.cancel_status == 'CANCELED' and r.queued_left == 0)}"
        )
    if len(results) > 1:
        print("\nenqueue rate by daemon setting:")
        for r in results:
            print(
                f"  {r.variant:<18} first run {r.first_run_s:6.1f} s, {r.steady_rate:5.2f} runs/s, "
                f"daemon CPU {1000 * r.daemon_cpu_s / max(1, r.runs_created):4.0f} ms/run, "
                f"PG {r.pg_stats.get('sessions', 0) / max(1, r.runs_created):3.0f} conn/run "
                f"{r.pg_stats.get('active_time', 0) / max(1, r.runs_created):4.0f} ms/run, "
                f"{r.runs_created} runs in {r.elapsed_s:.0f} s, "
                f"all {r.enqueueable} download runs in {_fmt_s(r.extrapolated_s(r.enqueueable))}, all {r.needed} "
                f"in {_fmt_s(r.extrapolated_s(r.needed))} … {_fmt_s(r.extrapolated_by_partitions_s())}"
            )


def _fmt_s(s: float) -> str:
    return "never" if math.isinf(s) else f"{s:.0f} s ({s / 60:.1f} min)"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def prepare_environment(partitions: int) -> None:
    """This process's settings before anything imports the definitions: the partitions definition is read at
    import (settings.NUM_SHARDS), and the planner or iteration run here must see the daemon's."""
    os.environ["LAION_VQ_NUM_SHARDS"] = str(partitions)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    warnings.filterwarnings("ignore", message=".*backfill_policy.*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=10.0, help="enqueue budget per variant")
    parser.add_argument("--sample-every", type=float, default=15.0, help="seconds between run counts")
    parser.add_argument("--status-repeats", type=int, default=5, help="status queries per asset (median)")
    parser.add_argument("--cancel-timeout", type=float, default=600.0)
    parser.add_argument("--variants", default="production", help=f"comma-separated, from {sorted(VARIANTS)}")
    parser.add_argument("--workdir", help="where DAGSTER_HOME goes (default: a temp folder)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    prepare_environment(args.partitions)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_backfill_") as tmp:
        workdir = Path(args.workdir or tmp)
        for index, variant in enumerate(variants):  # a variant may repeat (to see the machine's noise)
            results.append(measure(variant, args, workdir / f"{index}"))
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
