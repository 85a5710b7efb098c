"""The code location as users load it: 10,000 shard partitions, run granularity, pools, GPU tags, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import TINY_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAION_ENV = [k for k in os.environ if k.startswith("LAION_VQ_")]

PROBE = """
import json, dagster as dg
from laion_vq.definitions import defs
g = defs.resolve_asset_graph()
out = {}
for name in ["raw_metadata_shards", "image_tars", "code_parquets"]:
    a = defs.resolve_assets_def(name)
    node = g.get(dg.AssetKey(name))
    keys = node.partitions_def.get_partition_keys()
    bp = a.backfill_policy
    out[name] = {"n": len(keys), "first": keys[0], "last": keys[-1], "pool": a.op.pool,
                 "bp": [bp.policy_type.value, bp.max_partitions_per_run], "tags": dict(a.op.tags)}
out["jobs"] = {j: dict(defs.resolve_job_def(j).tags) for j in ["encode_shards", "download_shards"]}
sched = defs.resolve_schedule_def("nightly_shard_audit")
out["schedule"] = [sched.cron_schedule, sched.job_name, sched.default_status.value]
print("PROBE" + json.dumps(out))
"""


def _probe(env_overrides: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAION_ENV}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("PROBE", 1)[1])


def test_defaults_give_10000_shard_partitions_and_separate_run_granularity():
    info = _probe({})
    for name in ["raw_metadata_shards", "image_tars", "code_parquets"]:
        assert (info[name]["n"], info[name]["first"], info[name]["last"]) == (10_000, "00000", "09999")
    # metadata + download share a policy (one run per batch of shards); the encoder has its own,
    # so a backfill never puts the GPU step inside a download run
    assert info["raw_metadata_shards"]["bp"] == info["image_tars"]["bp"] == ["MULTI_RUN", 8]
    assert info["code_parquets"]["bp"] == ["MULTI_RUN", 256]
    assert info["image_tars"]["pool"] == "download" and info["code_parquets"]["pool"] == "gpu"
    # a download run's first step is in the pool too, so the queue holds download runs back when it is full
    assert info["raw_metadata_shards"]["pool"] == "download"
    k8s = json.loads(info["code_parquets"]["tags"]["dagster-k8s/config"])
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    ecs = json.loads(info["code_parquets"]["tags"]["ecs/container_overrides"])
    assert ecs["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert info["jobs"]["encode_shards"]["laion_vq/accelerator"] == "gpu"
    assert "laion_vq/accelerator" not in info["jobs"]["download_shards"]
    assert info["schedule"] == ["0 4 * * *", "audit_shards", "STOPPED"]


def test_settings_come_from_the_environment():
    info = _probe({"LAION_VQ_NUM_SHARDS": "12", "LAION_VQ_ENCODE_SHARDS_PER_RUN": "7"})
    assert info["code_parquets"]["n"] == 12 and info["code_parquets"]["last"] == "00011"
    assert info["code_parquets"]["bp"] == ["MULTI_RUN", 7]


def _import_definitions_fails_with(setting: str, value: str) -> str:
    """Import the code location with one LAION_VQ_ setting set; it must fail: its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in LAION_ENV}
    env[setting] = value
    out = subprocess.run(
        [sys.executable, "-c", "import laion_vq.definitions"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    return out.stderr


def test_bad_integer_setting_names_the_variable():
    assert "LAION_VQ_NUM_SHARDS must be an integer" in _import_definitions_fails_with("LAION_VQ_NUM_SHARDS", "lots")


def test_a_retired_setting_is_an_error_naming_its_replacement():
    stderr = _import_definitions_fails_with("LAION_VQ_ENCODE_DTYPE", "bf16")
    assert "LAION_VQ_ENCODE_DTYPE was replaced by LAION_VQ_ENCODE_MODE" in stderr


CLIS = {
    "dagster": ["dagster", "asset", "materialize", "-m", "laion_vq.definitions", "--select", "*"],
    "dg": ["dg", "launch", "--assets", "*"],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cli", sorted(CLIS))
def test_cli_materializes_all_three_assets_for_a_shard(tmp_path, image_server, tiny_checkpoint, cli):
    """From a shell, as the README says: `dagster asset materialize -m laion_vq.definitions --select '*'
    --partition 00000`, and the `dg` project's `dg launch --assets '*' --partition 00000`."""
    from laion_vq.testing.demo_inputs import shard_urls
    from laion_vq.testing.synthetic_metadata import write_parts

    write_parts(str(tmp_path / "meta"), shard_urls(image_server, 1, 6))
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAION_ENV}
    env.update(
        {
            "DAGSTER_HOME": str(home),
            "LAION_VQ_STORAGE": str(tmp_path / "data"),
            "LAION_VQ_METADATA": str(tmp_path / "meta"),
            "LAION_VQ_SAMPLES_PER_SHARD": "6",
            "LAION_VQ_NUM_SHARDS": "3",
            "LAION_VQ_MODEL": TINY_MODEL,
            "LAION_VQ_CHECKPOINT": tiny_checkpoint,
            "LAION_VQ_DEVICE": "cpu",
        }
    )
    cmd = [os.path.join(os.path.dirname(sys.executable), CLIS[cli][0]), *CLIS[cli][1:], "--partition", "00000"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    codes = tmp_path / "data" / "codes" / TINY_MODEL / "00000.parquet"
    assert codes.exists()
    assert (tmp_path / "data" / "images" / "00000.tar").exists()
    assert (tmp_path / "data" / "metadata" / "00000.parquet").exists()
