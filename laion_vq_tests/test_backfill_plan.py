"""How a UI backfill cuts our assets into runs: pinned through Dagster's own planner.

`build_run_requests_with_backfill_policies` is the function the asset-backfill daemon uses to turn
requested asset partitions into runs (dagster/_core/execution/asset_backfill.py); we call it on the
real code location's asset graph.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.definitions.automation_tick_evaluation_context import build_run_requests_with_backfill_policies
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from laion_vq.definitions import defs

ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]


def test_backfill_never_puts_the_encoder_in_a_download_run():
    graph = defs.resolve_asset_graph()
    shards = [f"{i:05d}" for i in range(1000)]
    requested = [AssetKeyPartitionKey(dg.AssetKey(a), s) for a in ASSETS for s in shards]
    with dg.instance_for_test() as instance:
        runs = build_run_requests_with_backfill_policies(requested, graph, instance)

    download_runs, encode_runs = [], []
    for run in runs:
        keys = {k.to_user_string() for k in run.asset_selection}
        start, end = run.tags[ASSET_PARTITION_RANGE_START_TAG], run.tags[ASSET_PARTITION_RANGE_END_TAG]
        width = int(end) - int(start) + 1
        checks = {k.name for k in run.asset_check_keys or []}
        if "code_parquets" in keys:
            assert keys == {"code_parquets"}, f"encoder shares a run with {keys - {'code_parquets'}}"
            encode_runs.append(width)
            # each run proves the contract for its own shards (the check scopes itself to the run)
            assert checks == {"code_parquets_contract", "no_removed_items"}
        else:
            assert keys == {"raw_metadata_shards", "image_tars"}
            download_runs.append(width)
            assert checks == {"raw_metadata_shards_valid", "image_tars_complete", "no_removed_items"}
    # 1,000 shards: 125 download runs of 8 shards, 4 encoder runs of ≤ 256 shards (one model load each)
    assert sorted(download_runs) == [8] * 125
    assert sum(encode_runs) == 1000 and max(encode_runs) == 256 and len(encode_runs) == 4
