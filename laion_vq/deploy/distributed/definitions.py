"""The code location of a Celery deployment: `laion_vq.definitions`, every run's steps on Celery workers.

The same assets, checks, schedules, sensor and resources; every job, and the asset runs that backfills,
the automation sensor and the Materialize button create, use `celery_pool_executor` instead of the
in-process executor, so a run's steps execute on the workers of their pool's queue (`gpu`, `download`).
The executor's broker is `LAION_VQ_CELERY_BROKER` (the only secret: `amqp://USER:PASSWORD@HOST:5672//`),
its results come back over the broker (`rpc://`), `LAION_VQ_CELERY_QUEUE_PREFIX` prefixes the queue names.

    # deploy/celery/workspace.yaml
    load_from:
      - python_module: {module_name: laion_vq.deploy.distributed.definitions, working_directory: .}
"""

from __future__ import annotations

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from dagster._record import copy

from laion_vq import definitions as single_machine
from laion_vq import settings
from laion_vq.deploy.distributed.executor import celery_pool_executor

executor = celery_pool_executor.configured(
    {
        "broker": {"env": settings.CELERY_BROKER.env},
        "backend": "rpc://",
        "queue_prefix": settings.CELERY_QUEUE_PREFIX.get_str() or "",
    },
    name="celery_pool",
)


def on_executor(definitions: dg.Definitions, executor_def: dg.ExecutorDefinition) -> dg.Definitions:
    """`definitions` with every job, schedule target and asset run on `executor_def`."""
    # asset jobs are records (copied with the executor); the op job `apply_removals` (one op, no pool step to
    # route; its sensor names it) stays in process
    jobs = {
        job.name: copy(job, executor_def=executor_def) if isinstance(job, UnresolvedAssetJobDefinition) else job
        for job in definitions.jobs or []
    }
    schedules = [s.with_updated_job(jobs[s.job_name]) if s.job_name in jobs else s for s in definitions.schedules or []]
    return dg.Definitions(
        assets=definitions.assets,
        asset_checks=definitions.asset_checks,
        jobs=list(jobs.values()),
        schedules=schedules,
        sensors=definitions.sensors,
        resources=definitions.resources,
        executor=executor_def,
    )


defs = on_executor(single_machine.defs, executor)
