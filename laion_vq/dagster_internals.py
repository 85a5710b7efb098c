"""Every name laion_vq takes from Dagster's private modules (`dagster._…`), in one place.

Dagster 1.13 exports none of these from `dagster`; each is here because the code that needs it has no public
way to say it. Private means unversioned: any Dagster release may move or change them, and an import error
from this module after an upgrade is the expected symptom — fix it here, for every user at once. Nothing else
in `laion_vq` imports `dagster._` (bar the test infrastructure, `laion_vq/testing/`); use `import dagster as dg`
for everything `dagster` exports.
"""

# The materialization a partitioned check result targets, which makes the result *current* in the check's
# partition status (checks): `dg.AssetCheckEvaluation(target_materialization_data=…)` takes it, unexported.
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

# What `dg.define_asset_job` returns: the type of the jobs the schedule factories take (schedules).
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

# A shard's check history (check_state): `event_log_storage.get_asset_check_execution_history` filters by
# partition only through it.
from dagster._core.event_api import PartitionKeyFilter

# How a run whose worker died is failed (recover_dead_runs): the reason Dagster itself gives such runs
# (`UNEXPECTED_TERMINATION`, a run tag the UI shows and run retries read); `report_run_failed` takes it only
# in this type.
from dagster._core.events import JobFailureData, RunFailureReason

# A backfill's state (feeding stops when its backfill is no longer REQUESTED); no public API reads it.
from dagster._core.execution.backfill import BulkActionStatus

# The step retry mode dagster-celery's `CeleryExecutor` takes, read from the executor's `retries` config.
from dagster._core.execution.retries import RetryMode

# The run launcher's `launch_run`/`resume_run` arguments (the ECS launcher overrides both).
from dagster._core.launcher.base import LaunchRunContext, ResumeRunContext

# The state of a check execution (check_state): what the check history and partition-status queries return.
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

# The finished run states (`recover_dead_runs` frees the pool slots finished runs still hold); no public list.
from dagster._core.storage.dagster_run import FINISHED_STATUSES

# The embedded SQLite run storage: an instance on one machine, whose launched runs `recover_dead_runs` may judge.
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage

# Run tags Dagster writes and reads (the values are its `dagster/…` tag names): the schedules ask for partition
# ranges with them; the schedules, the encoder's feeding and `recover_dead_runs` read which shards a run targets.
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,  # "dagster/asset_partition_range_end": last partition of a run's range
    ASSET_PARTITION_RANGE_START_TAG,  # "dagster/asset_partition_range_start": first partition of the range
    BACKFILL_ID_TAG,  # "dagster/backfill": the backfill that created a run (feeding)
    GRPC_INFO_TAG,  # ".dagster/grpc_info": on runs a run launcher started (recover_dead_runs)
    MAX_RUNTIME_SECONDS_TAG,  # "dagster/max_runtime": a run's own limit for run monitoring (feeding hands over)
    PARTITION_NAME_TAG,  # "dagster/partition": a single-partition run's partition
)

__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "BACKFILL_ID_TAG",
    "FINISHED_STATUSES",
    "GRPC_INFO_TAG",
    "JobFailureData",
    "MAX_RUNTIME_SECONDS_TAG",
    "PARTITION_NAME_TAG",
    "AssetCheckEvaluationTargetMaterializationData",
    "AssetCheckExecutionRecordStatus",
    "BulkActionStatus",
    "LaunchRunContext",
    "PartitionKeyFilter",
    "ResumeRunContext",
    "RetryMode",
    "RunFailureReason",
    "SqliteRunStorage",
    "UnresolvedAssetJobDefinition",
]
