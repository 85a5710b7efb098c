"""`celery_pool_executor`: dagster-celery's executor, routing each step to the queue of its pool.

dagster-celery sends a step to the queue named by its `dagster-celery/queue` op tag, else to `dagster`.
Our steps already say where they belong through their pool (`gpu` on `code_parquets`, `download` on
`image_tars`), so this executor routes by pool and needs no tag of its own: queue = `queue_prefix` +
(the step's `dagster-celery/queue` tag, else its pool, else `default_queue`). Steps without a pool (the
metadata slice, checks) go to `download`, the cheap CPU hosts.

Delivery is at-least-once, never at-most-once (`CELERY_SETTINGS`): a worker acknowledges a step only
when it has finished it, so a worker killed mid-step (SIGKILL, OOM, a lost machine) gives its step back
to the broker, which hands it to another worker of the queue, or to the same one restarted. Our steps
may safely run again: every file is published atomically (temp name + rename, or one PUT), a killed
download leaves only a scratch folder, removed by the next download.

Workers must use the same broker, backend and settings (`deploy/celery/celery.yaml`).
"""

from __future__ import annotations

from dagster import Field, StringSource, executor, multiple_process_executor_requirements
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor, _submit_task
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

from laion_vq.dagster_internals import RetryMode

#: Celery settings the executor and every worker share (the worker reads them from celery.yaml).
CELERY_SETTINGS = {
    # acknowledge after the step, and give it back when the worker process dies: at-least-once
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    # a worker holds one step at a time beyond the one it runs: idle workers take the queue's next step
    "worker_prefetch_multiplier": 1,
}

POOL_EXECUTOR_CONFIG = {
    **CELERY_CONFIG,
    "queue_prefix": Field(
        StringSource,
        is_required=False,
        default_value="",
        description="Prefix of every queue name (one deployment's workers apart from another's on a broker).",
    ),
    "default_queue": Field(
        StringSource,
        is_required=False,
        default_value="download",
        description="Queue of steps without a pool or a dagster-celery/queue tag.",
    ),
}


def step_queue(step, prefix: str = "", default_queue: str = "download") -> str:
    """The queue a step goes to: its `dagster-celery/queue` tag, else its pool, else `default_queue`."""
    return prefix + (step.tags.get(DAGSTER_CELERY_QUEUE_TAG) or step.pool or default_queue)


class CeleryPoolExecutor(CeleryExecutor):
    def __init__(self, *, queue_prefix: str = "", default_queue: str = "download", **kwargs):
        super().__init__(**kwargs)
        self.queue_prefix = queue_prefix
        self.default_queue = default_queue

    def execute(self, plan_context, execution_plan):
        from dagster_celery.core_execution_loop import core_celery_execution_loop

        def submit(app, context, step, _queue, priority, known_state):
            queue = step_queue(step, self.queue_prefix, self.default_queue)
            # dagster-celery's own "Submitting celery task … to queue" event names the queue it would have
            # used (tag or `dagster`); this one names the queue the step really goes to
            context.log.info(f'step "{step.key}" sent to Celery queue "{queue}" (pool {step.pool or "none"})')
            return _submit_task(app, context, step, queue, priority, known_state)

        return core_celery_execution_loop(plan_context, execution_plan, step_execution_fn=submit)


@executor(name="celery_pool", config_schema=POOL_EXECUTOR_CONFIG, requirements=multiple_process_executor_requirements())
def celery_pool_executor(init_context):
    """dagster-celery's executor, each step sent to the queue of its pool (module docstring)."""
    config = init_context.executor_config
    return CeleryPoolExecutor(
        broker=config.get("broker"),
        backend=config.get("backend"),
        include=config.get("include"),
        config_source={**CELERY_SETTINGS, **(config.get("config_source") or {})},
        retries=RetryMode.from_config(config["retries"]),
        queue_prefix=config["queue_prefix"],
        default_queue=config["default_queue"],
    )
