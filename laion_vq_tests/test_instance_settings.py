"""One configuration per instance: `$DAGSTER_HOME/laion_vq.env` is what every process loading the code location
reads (the environment wins); partitions stop at the metadata; settings that point at nothing fail once,
clearly, before anything is recorded about any shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from laion_vq import settings
from laion_vq.defs.assets import corrupted_shards_report, raw_metadata_shards
from laion_vq.defs.checks import SHARD_CHECKS, tagged_shards
from laion_vq.defs.jobs import check_job
from laion_vq.defs.resources import LaionMetadataResource, StorageResource, VQGANEncoderResource
from laion_vq.testing.synthetic_metadata import write_parts

from .conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, dagster as dg, os
from laion_vq.definitions import defs
keys = defs.resolve_asset_graph().get(dg.AssetKey("code_parquets")).partitions_def.get_partition_keys()
bp = defs.resolve_assets_def("code_parquets").backfill_policy.max_partitions_per_run
print("PROBE" + json.dumps({"n": len(keys), "bp": bp, "storage": os.environ.get("LAION_VQ_STORAGE")}))
"""


def _probe(home: Path, **env: str) -> subprocess.CompletedProcess:
    """Import the code location in a fresh interpreter with DAGSTER_HOME=home and only `env`'s settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LAION_VQ_")}
    clean.update(env, DAGSTER_HOME=str(home))
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=clean, capture_output=True, text=True)


def _loaded(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("PROBE", 1)[1])


def test_the_instance_file_is_read_and_the_environment_wins(tmp_path):
    path = settings.write_instance_settings(
        str(tmp_path),
        {"LAION_VQ_NUM_SHARDS": "12", "LAION_VQ_ENCODE_SHARDS_PER_RUN": "7", "LAION_VQ_STORAGE": "/srv/a b"},
    )
    assert path == str(tmp_path / "laion_vq.env")
    assert _loaded(_probe(tmp_path)) == {"n": 12, "bp": 7, "storage": "/srv/a b"}
    assert _loaded(_probe(tmp_path, LAION_VQ_ENCODE_SHARDS_PER_RUN="5"))["bp"] == 5


def test_a_variable_that_is_no_setting_names_the_file_and_line(tmp_path):
    (tmp_path / "laion_vq.env").write_text("# mine\nLAION_VQ_STORAGE=/srv\nLAION_VQ_STORGE=/typo\n")
    result = _probe(tmp_path)
    assert result.returncode != 0
    assert f"{tmp_path / 'laion_vq.env'}:3: LAION_VQ_STORGE is not a laion_vq setting" in result.stderr


def test_partitions_stop_at_the_metadata_shards(tmp_path):
    write_parts(str(tmp_path / "meta"), [[f"http://127.0.0.1/{i}.jpg" for i in range(5)]])  # 3 shards of 2
    info = _loaded(_probe(tmp_path, LAION_VQ_METADATA=str(tmp_path / "meta"), LAION_VQ_SAMPLES_PER_SHARD="2"))
    assert info["n"] == 3
    # fewer asked for than the metadata has: the setting wins; missing metadata: the setting too
    meta = {"LAION_VQ_METADATA": str(tmp_path / "meta"), "LAION_VQ_SAMPLES_PER_SHARD": "2"}
    assert _loaded(_probe(tmp_path, **meta, LAION_VQ_NUM_SHARDS="2"))["n"] == 2
    assert _loaded(_probe(tmp_path, LAION_VQ_METADATA=str(tmp_path / "none"), LAION_VQ_NUM_SHARDS="7"))["n"] == 7


def _defs(storage: Path, metadata: Path) -> dg.Definitions:
    return dg.Definitions(
        assets=[raw_metadata_shards, corrupted_shards_report],
        asset_checks=SHARD_CHECKS,
        jobs=[check_job],
        resources={
            "storage": StorageResource(root=str(storage)),
            "metadata": LaionMetadataResource(source=str(metadata), samples_per_shard=4),
            "encoder": VQGANEncoderResource(model=TINY_MODEL, checkpoint=None),
        },
        executor=dg.in_process_executor,
    )


def _recorded(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """What the run recorded about shards: check evaluations and materializations."""
    kinds = {"ASSET_CHECK_EVALUATION", "ASSET_MATERIALIZATION"}
    return [
        r.dagster_event.event_type_value for r in instance.all_logs(run_id) if r.dagster_event
        if r.dagster_event.event_type_value in kinds
    ]  # fmt: skip


def _failure(result: dg.ExecuteInProcessResult) -> str:
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][:1]
    return str(failure.step_failure_data.user_failure_data.description)


def test_an_audit_of_a_storage_root_that_is_not_there_fails_once_and_marks_no_shard(tmp_path):
    write_parts(str(tmp_path / "meta"), [[f"http://127.0.0.1/{i}.jpg" for i in range(8)]])
    defs = _defs(tmp_path / "nowhere", tmp_path / "meta")
    with dg.instance_for_test() as instance:
        # shards the instance knows as materialized: an audit of an empty folder used to fail each of them
        for key in ("00000", "00001"):
            instance.report_runless_asset_event(dg.AssetMaterialization("image_tars", partition=key))
        result = defs.resolve_job_def(check_job.name).execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        assert f"storage root '{tmp_path / 'nowhere'}' does not exist: LAION_VQ_STORAGE" in _failure(result)
        assert _recorded(instance, result.run_id) == []


def test_a_metadata_source_that_is_not_there_fails_once_before_any_shard(tmp_path):
    (tmp_path / "data").mkdir()
    defs = _defs(tmp_path / "data", tmp_path / "no-meta")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [raw_metadata_shards], partition_key="00001", instance=instance, resources=defs.resources,
            raise_on_error=False,
        )  # fmt: skip
        assert not result.success
        message = _failure(result)
        assert "does not exist: LAION_VQ_METADATA" in message and "shard" not in message.split(":")[0]
        assert _recorded(instance, result.run_id) == []


def test_the_audit_tag_scopes_a_launchpad_run_to_some_shards():
    assert tagged_shards({}) is None
    assert tagged_shards({"laion_vq/shards": "00007, 00001,00007"}) == ["00001", "00007"]
    with pytest.raises(dg.Failure, match="99999 is not a shard partition"):
        tagged_shards({"laion_vq/shards": "00001,99999"})
