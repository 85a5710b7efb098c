"""Where a backfill run's time goes inside the Dagster daemon: its backfill iteration under cProfile.

`benchmarks/bench_backfill.py` measures the enqueue rate from outside; this script says what one run costs by
part, to know which lever moves it. The webserver takes the launch (`launchPartitionBackfill` of the three
assets over every shard, as the UI sends it); no daemon runs. This process then calls the backfill daemon's own
iteration function on the same workspace and instance (PostgreSQL, the production `deploy/dagster.yaml` with
runs kept queued), for `--seconds`, and prints per run the calls and milliseconds of each part: run creation,
the planned events (one per asset partition), the queued coordinator's submit, the backfill row rewrites,
PostgreSQL connections and statements.

What it found (10,000 partitions, a 2-core machine): ~180 ms per download run, of which ~85 ms are the planned
events (8 per 4-shard run, plus the check's), ~57 ms the queued coordinator's submit, ~20 ms the backfill row
rewritten every 25 runs with the runs still to submit; across all of it, 37 new PostgreSQL connections per run
(dagster-postgres opens one per operation: ~40% of the time) and ~60 statements. The daemon's backfill loop
submits one backfill's runs one after another in one thread.

    .venv/bin/python benchmarks/bench_backfill_profile.py --seconds 60
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_backfill import ASSETS, count_runs, prepare_environment, wait_for_location

#: What one run costs inside the daemon's iteration, by the functions that do it (file suffix, function).
PROFILE_PARTS = [
    ("submit_asset_runs.py", "submit_asset_run", "create + submit one run (all of it)"),
    ("run_domain.py", "create_run", "  create_run: the run row, snapshots, planned events"),
    ("run_domain.py", "_log_asset_planned_events", "    one planned event per asset partition (+ check)"),
    ("run_launcher_methods.py", "submit_run", "  submit_run: QueuedRunCoordinator → RUN_ENQUEUED"),
    ("asset_backfill.py", "_write_updated_backfill_data", "rewrite the backfill row (every chunk of runs)"),
    ("~", "<built-in method psycopg2._psycopg._connect>", "opening PostgreSQL connections (NullPool)"),
    ("~", "<method 'execute' of 'psycopg2.extensions.cursor' objects>", "executing SQL"),
    ("sql_run_storage.py", "has_run_stats_index_cols", "table reflection on run reads"),
]


def profile_iteration(args: argparse.Namespace, workdir: Path) -> None:
    """The daemon's backfill iteration, run in this process under cProfile for `--seconds` seconds.

    The webserver takes the launch; no daemon runs. This process then calls the backfill daemon's own
    iteration function (`dagster._daemon.backfill.execute_backfill_iteration`) on the same workspace, which
    plans the backfill and submits its runs one by one; after `--seconds` seconds the backfill is marked
    CANCELING, which the iteration sees at its next chunk boundary. Prints what a run costs, by part.
    """
    import cProfile
    import logging
    import pstats
    import threading

    from dagster._core.execution.backfill import BulkActionStatus
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster._daemon.backfill import execute_backfill_iteration

    from laion_vq.shards.numbering import shard_keys
    from laion_vq.testing.dagster_services import PRODUCTION_YAML, WORKSPACE, dagster_services, postgres_database

    concurrency = copy.deepcopy(yaml.safe_load(PRODUCTION_YAML.read_text())["concurrency"])
    concurrency["runs"]["max_concurrent_runs"] = 0
    env = {"LAION_VQ_NUM_SHARDS": str(args.partitions), "LAION_VQ_STORAGE": str(workdir / "data")}
    print(f"\n=== profile of the daemon's backfill iteration: {args.partitions} partitions, {args.seconds:.0f} s")
    with (
        postgres_database("laion_vq_bench") as pg_url,
        dagster_services(
            workdir / "dagster_home", pg_url, env=env, overrides={"concurrency": concurrency}, daemon=False
        ) as services,
        services.instance() as instance,
    ):
        wait_for_location(services)
        backfill_id = services.launch_backfill(ASSETS, shard_keys(args.partitions))
        saved = os.environ.get("DAGSTER_PG_URL")
        os.environ["DAGSTER_PG_URL"] = pg_url  # the code server this process starts reads the instance too

        def cancel_later() -> None:
            time.sleep(args.seconds)
            instance.update_backfill(instance.get_backfill(backfill_id).with_status(BulkActionStatus.CANCELING))

        try:
            with WorkspaceProcessContext(instance, WorkspaceFileTarget([str(WORKSPACE)])) as context:
                threading.Thread(target=cancel_later, daemon=True).start()
                profiler = cProfile.Profile()
                t0 = time.perf_counter()
                profiler.enable()
                list(execute_backfill_iteration(context, logging.getLogger("bench_backfill_profile")))
                profiler.disable()
                wall = time.perf_counter() - t0
        finally:
            if saved is None:
                os.environ.pop("DAGSTER_PG_URL", None)
            else:
                os.environ["DAGSTER_PG_URL"] = saved
        runs = count_runs(instance, backfill_id)
    # typeshed's Stats leaves out `stats`, the dict of raw timings every Stats holds (what print_stats reads)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    print(
        f"iteration ran {wall:.1f} s under the profiler and created {runs} runs ({runs / wall:.2f} runs/s; "
        "the profiler slows Python, not PostgreSQL)"
    )
    print(f"{'part':<58}{'calls/run':>10}{'ms/run':>9}{'share':>8}")
    for suffix, name, label in PROFILE_PARTS:
        calls = cumulative = 0.0
        for (filename, _, function), (_, ncalls, _, cum, _) in stats.items():
            if function == name and (suffix == "~" or filename.endswith(suffix)):
                calls, cumulative = calls + ncalls, cumulative + cum
        if runs:
            print(f"{label:<58}{calls / runs:>10.1f}{1000 * cumulative / runs:>9.0f}{cumulative / wall:>8.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the iteration runs under cProfile")
    parser.add_argument("--workdir", help="where DAGSTER_HOME goes (default: a temp folder)")
    args = parser.parse_args(argv)
    prepare_environment(args.partitions)
    with tempfile.TemporaryDirectory(prefix="bench_backfill_profile_") as tmp:
        profile_iteration(args, Path(args.workdir or tmp) / "profile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
