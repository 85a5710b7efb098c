"""The laion_vq code location: `dg dev` (or `dagster dev -m laion_vq.definitions`, `workspace.yaml`).

Only assembles: every definition lives in `laion_vq.defs` (assets, checks, jobs, schedules, the
automation sensor, resources), over the Dagster-free core (`vqgan`, `shards`, `download`, `stages`).
"""

import dagster as dg

from laion_vq.defs.assets import code_parquets, corrupted_shards_report, image_tars, raw_metadata_shards
from laion_vq.defs.automation import shard_automation
from laion_vq.defs.checks import SHARD_CHECKS
from laion_vq.defs.dead_runs import dead_run_watch
from laion_vq.defs.jobs import check_job, download_job, encode_job, pipeline_job, report_job
from laion_vq.defs.removals import apply_removals, removal_lists, removal_lists_sensor
from laion_vq.defs.resources import default_resources
from laion_vq.defs.schedules import daily_report, download_missing_shards, nightly_audit


def build_definitions(executor: dg.ExecutorDefinition) -> dg.Definitions:
    """Every definition, with `executor` running the steps of every run: the jobs name no executor, so
    Dagster gives them this one, and so do the schedules' targets and the asset runs that backfills, the
    automation sensor and the Materialize button create. This location and the Celery one
    (`laion_vq.deploy.distributed.definitions`) differ only by it. `apply_removals` pins its own."""
    return dg.Definitions(
        assets=[raw_metadata_shards, image_tars, code_parquets, corrupted_shards_report, removal_lists],
        asset_checks=SHARD_CHECKS,
        jobs=[download_job, encode_job, pipeline_job, check_job, report_job, apply_removals],
        schedules=[nightly_audit(check_job), download_missing_shards(download_job), daily_report(report_job)],
        sensors=[shard_automation, removal_lists_sensor, dead_run_watch],
        resources=default_resources(),
        executor=executor,
    )


#: One machine: every step in the run's own process (steps are long, process start-up is not).
defs = build_definitions(dg.in_process_executor)
