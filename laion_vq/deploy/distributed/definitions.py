"""The code location of a Celery deployment: `laion_vq.definitions`, every run's steps on Celery workers.

The same assets, checks, jobs, schedules, sensors and resources (`build_definitions`), with
`celery_pool_executor` instead of the in-process executor: every job, schedule target and the asset runs that
backfills, the automation sensor and the Materialize button create run their steps on the workers of their
pool's queue (`gpu`, `download`). The executor's broker is `LAION_VQ_CELERY_BROKER` (the only secret:
`amqp://USER:PASSWORD@HOST:5672//`), its results come back over the broker (`rpc://`),
`LAION_VQ_CELERY_QUEUE_PREFIX` prefixes the queue names.

    # deploy/celery/workspace.yaml
    load_from:
      - python_module: {module_name: laion_vq.deploy.distributed.definitions, working_directory: .}
"""

from __future__ import annotations

from laion_vq import settings
from laion_vq.definitions import build_definitions
from laion_vq.deploy.distributed.executor import celery_pool_executor

executor = celery_pool_executor.configured(
    {
        "broker": {"env": settings.CELERY_BROKER.env},
        "backend": "rpc://",
        "queue_prefix": settings.CELERY_QUEUE_PREFIX.get_str() or "",
    },
    name="celery_pool",
)

# Dagster gives the location's executor to every job that names none (all asset jobs, the implicit asset job
# of backfills and the Materialize button, the schedules' targets). The op job `apply_removals` names
# `in_process_executor` itself (`laion_vq.defs.removals`), so it stays in process here too, as before: one op
# and no pool step to route, and its sensor launches it by name.
defs = build_definitions(executor)
