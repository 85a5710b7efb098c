"""`make demo` as a new user's first look: its work goes through the code location and the daemon, so
the pages the UI opens first show it — the pipeline job's runs, a backfill, the audits — with a code
location origin on every run. The demo's own code path with the tiny model (the real f8 is `make demo`)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

from laion_vq import demo

from .conftest import TINY_MODEL


@pytest.mark.timeout(600)
def test_the_demo_runs_through_the_code_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("LAION_VQ_")]:
        monkeypatch.delenv(name)  # the demo sets its own, as on a fresh machine
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "unused"))  # the demo points it at its own folder
    assert demo.main(["--workdir", str(tmp_path), "--model", TINY_MODEL, "--samples-per-shard", "6"]) == 0

    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    try:
        runs = instance.get_runs()
        assert all(run.remote_job_origin is not None for run in runs)  # launched through the code location
        jobs = {"laion_vq_pipeline", "audit_shards", "corrupted_shards_report_job", "__ASSET_JOB"}
        assert {run.job_name for run in runs} >= jobs
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        (backfill,) = instance.get_backfills()
        assert backfill.status.value.startswith("COMPLETED")
        done = instance.get_materialized_partitions(dg.AssetKey("code_parquets"))
        assert done == {"00000", "00001"}
        # the report ran over the audited shards and wrote the dataset card of both shards
        card = (tmp_path / "data" / "codes" / TINY_MODEL / "README.md").read_text()
        assert "00000.parquet" in card and "00001.parquet" in card and "RANDOM" in card.upper()
    finally:
        instance.dispose()
