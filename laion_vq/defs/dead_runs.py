"""Dead run workers noticed and their runs failed by the daemon, with nobody typing a command.

With the default run launcher (one machine, Celery hosts) Dagster cannot ask whether a run worker is alive
(`supports_check_run_worker_health` is False), and when the workers die *with* the code server that started
them — the daemon's process group killed by a service manager restarting its unit, a container restart — no
process is left to fail their runs: they stay STARTED, keep their `download`/`gpu` pool slots, and the queue
behind them waits until run monitoring's `max_runtime_seconds` (12 h). This sensor runs in the daemon's code
server, the process that starts those workers, so the pids their runs recorded are this machine's: every
`POLL_SECONDS` it looks for runs whose every recorded worker pid is gone, and fails a run found dead at two
looks in a row (a run that just finished is not mistaken for a dead one), freeing its slots. Run retries
then start it again (`dagster/retry_strategy` FROM_FAILURE), so the backfill goes on.

Elsewhere (the ECS and Kubernetes launchers) run monitoring asks the launcher about each worker, and this
sensor stands aside.
"""

from __future__ import annotations

import json

import dagster as dg

from laion_vq.deploy.recover_dead_runs import find_dead_runs, recover

POLL_SECONDS = 30
SENSOR_NAME = "dead_run_watch"


def watches_here(instance: dg.DagsterInstance) -> bool:
    """Whether this instance's runs are started by the default run launcher, whose workers only this
    process's machine can see."""
    return isinstance(instance.run_launcher, dg.DefaultRunLauncher)


@dg.sensor(
    name=SENSOR_NAME,
    minimum_interval_seconds=POLL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Fails runs whose worker process died with no one to report it (a daemon or machine restart) "
    "and frees their pool slots, so run retries start them again; the default run launcher only.",
)
def dead_run_watch(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    instance = context.instance
    if not watches_here(instance):
        return dg.SkipReason(
            f"runs are started by {type(instance.run_launcher).__name__}: run monitoring checks their workers"
        )
    suspects = find_dead_runs(instance)
    seen_before = set(json.loads(context.cursor)) if context.cursor else set()
    confirmed = [run_id for run_id in suspects if run_id in seen_before]
    items = recover(instance, confirmed, by=f"the `{SENSOR_NAME}` sensor") if confirmed else []
    context.update_cursor(json.dumps(sorted(set(suspects) - set(confirmed))))
    failed = [item for item in items if item.marked_failed]
    for item in failed:
        context.log.warning(
            f"run {item.run_id} ({item.job_name}, partitions {item.partitions}): worker pid(s) "
            f"{', '.join(map(str, item.pids))} gone; marked FAILURE, freed {len(item.slots)} slot(s) "
            f"{', '.join(item.slots)}; run retries start it again"
        )
    pending = len(suspects) - len(confirmed)
    parts = []
    if failed:
        parts.append(f"failed {len(failed)} dead run(s): {', '.join(i.run_id for i in failed)}")
    if pending:
        parts.append(f"{pending} run(s) without a live worker, to be failed if still so at the next look")
    return dg.SkipReason("; ".join(parts) or "every running run's worker is alive")
