"""Where a run goes: the placement tags its steps carry, lifted to the run.

Dagster's run launchers (ECS, Kubernetes) start one task or pod per run and read its placement from the
*run's* tags only: `ecs/cpu`, `ecs/memory`, `ecs/container_overrides`, … (dagster-aws) and
`dagster-k8s/config` (dagster-k8s). Our assets state placement where it belongs, as op tags on the step
that needs it (`GPU_TAGS` on `code_parquets`), and the `encode_shards` job repeats them as run tags.
A run of `code_parquets` made by the backfill daemon, the automation sensor, a schedule or the UI's
*Materialize* button is an `__ASSET_JOB` run with no job tags, so a stock launcher would start it on a
CPU host, where the encoder waits forever for CUDA or crawls on the CPU.

`placement_tags(instance, run)` closes that gap with what Dagster already records: the run's execution
plan snapshot lists every step to execute with its op tags. A placement key a step carries and the run
does not is added to the run's tags; a key the run carries itself always wins (an operator's per-run
override, the job's own tags). Runs of steps without placement tags (downloads, audits) are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

#: Run-tag keys the launchers read (dagster-aws 0.29 `EcsRunLauncher`, dagster-k8s 0.29 `K8sRunLauncher`)
#: plus our own marker, `laion_vq/accelerator`.
PLACEMENT_TAG_KEYS = (
    "laion_vq/accelerator",
    "dagster-k8s/config",
    "ecs/cpu",
    "ecs/memory",
    "ecs/ephemeral_storage",
    "ecs/task_overrides",
    "ecs/container_overrides",
    "ecs/run_task_kwargs",
)
ACCELERATOR_TAG = "laion_vq/accelerator"


def step_placement_tags(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dict[str, str]:
    """The placement tags of the steps this run executes (first step in plan order wins a key)."""
    if not run.execution_plan_snapshot_id:
        return {}
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    to_execute = set(plan.step_keys_to_execute or [step.key for step in plan.steps])
    found: dict[str, str] = {}
    for step in plan.steps:
        if step.key not in to_execute:
            continue
        for key, value in (step.tags or {}).items():
            if key in PLACEMENT_TAG_KEYS:
                found.setdefault(key, value)
    return found


def placement_tags(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dict[str, str]:
    """The placement tags the run lacks and its steps ask for (empty when the run already has them all)."""
    return {k: v for k, v in step_placement_tags(instance, run).items() if k not in run.tags}


def placed_run(instance: dg.DagsterInstance, run: dg.DagsterRun, *, record: bool = True) -> dg.DagsterRun:
    """`run` with its steps' placement tags added; with `record`, also stored on the run, so the run's
    page in the UI shows where it was placed and why."""
    missing = placement_tags(instance, run)
    if not missing:
        return run
    if record:
        instance.add_run_tags(run.run_id, missing)
    return run.with_tags({**run.tags, **missing})


def wants_gpu(tags: Mapping[str, str]) -> bool:
    return tags.get(ACCELERATOR_TAG) == "gpu"
