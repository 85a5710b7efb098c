"""A real multi-worker run on this machine: steps executed by several `dagster-celery` worker processes on
the machine's RabbitMQ (127.0.0.1:5672), with the production instance on PostgreSQL, a real daemon and
webserver, and the Celery code location (`deploy/celery/workspace.yaml`).

Workers are started as an operator starts them (`dagster-celery worker start -y deploy/celery/celery.yaml
-q <prefix>download`), two on the `download` queue and one on the `gpu` queue; the queue names carry a
prefix unique to this test, deleted at the end.

1. A UI backfill of three assets over four shards (one download run per shard, one encoder run): every
   partition is materialized exactly once, the download steps ran on both download workers, the encoder
   step on the GPU worker only.
2. A worker killed (SIGKILL, the whole worker) while it downloads a shard from a slow server: nothing of
   the shard is on storage, its step is back in the queue, the run waits; a restarted worker redoes the
   step and the shard is published once.

Nothing is timed here; `benchmarks/bench_celery_workers.py` measures 1 vs 2 download workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid

import dagster as dg
import pyarrow.parquet as pq
import pytest

from laion_vq.shards.storage import StorageLayout, exists
from laion_vq.testing.dagster_services import REPO
from laion_vq.testing.demo_inputs import shard_urls
from laion_vq.testing.synthetic_metadata import write_parts

from .conftest import TINY_MODEL

BACKFILL_SHARDS = 4
KILL_SHARD = 4
SAMPLES = 6
KEYS = [f"{i:05d}" for i in range(BACKFILL_SHARDS)]
ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]
WORKSPACE = REPO / "deploy" / "celery" / "workspace.yaml"


@pytest.fixture()
def rabbitmq():
    pytest.importorskip("dagster_celery")
    from laion_vq.testing.celery_workers import BROKER, delete_queues, rabbitmq_reachable

    unreachable = rabbitmq_reachable()
    if unreachable:
        pytest.skip(unreachable)
    prefix = f"lvq{uuid.uuid4().hex[:8]}."
    try:
        yield BROKER, prefix
    finally:
        delete_queues([f"{prefix}download", f"{prefix}gpu"], BROKER)


def _celery_steps(instance, run_id: str) -> list[tuple[str, str]]:
    """(step keys, worker) of each "Executing steps … in celery worker" event of the run."""
    out = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        metadata = entry.dagster_event.engine_event_data.metadata or {}
        if "Celery worker" in metadata:
            out.append((metadata["step_keys"].value, metadata["Celery worker"].value))
    return out


def _materializations(instance, asset: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in instance.fetch_materializations(dg.AssetKey(asset), limit=1000).records:
        key = record.asset_materialization.partition
        counts[key] = counts.get(key, 0) + 1
    return counts


def _ready_steps(broker: str, queue: str) -> list[str]:
    """The step keys of the messages waiting in `queue`, read without acknowledging them: closing the
    channel puts them back."""
    from kombu import Connection

    steps = []
    with Connection(broker, connect_timeout=5) as connection:
        channel = connection.channel()
        while (message := channel.basic_get(queue, no_ack=False)) is not None:
            _args, kwargs, _embed = json.loads(message.body)
            steps += kwargs["execute_step_args_packed"]["step_keys_to_execute"]
        channel.close()
    return steps


def _wait(condition, what: str, timeout: float, workers=(), services=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    logs = "\n".join(f"--- {w.name}\n{w.log_tail(2000)}" for w in workers)
    daemon = services.log("daemon")[-3000:] if services else ""
    raise AssertionError(f"{what}: not after {timeout:.0f} s\n{logs}\n--- daemon\n{daemon}")


def test_backfill_on_celery_workers_and_a_killed_worker(
    tmp_path, monkeypatch, image_server, tiny_checkpoint, pg_url, rabbitmq
):
    from laion_vq.testing import dagster_services as services_module
    from laion_vq.testing.celery_workers import start_worker, wait_for_workers

    broker, prefix = rabbitmq
    urls = shard_urls(image_server, BACKFILL_SHARDS, SAMPLES - 1)
    urls = [[*shard, image_server.url(f"/slow/{i}.jpg")] for i, shard in enumerate(urls)]  # each ≥ 3 s
    urls.append([image_server.url(f"/slow/k{i}.jpg") for i in range(SAMPLES)])  # the shard a worker dies on
    write_parts(str(tmp_path / "meta"), urls, row_group_size=3)
    storage = tmp_path / "data"
    home = tmp_path / "dagster_home"
    env = {
        "LAION_VQ_NUM_SHARDS": str(BACKFILL_SHARDS + 1),
        "LAION_VQ_SAMPLES_PER_SHARD": str(SAMPLES),
        "LAION_VQ_STORAGE": str(storage),
        "LAION_VQ_METADATA": str(tmp_path / "meta"),
        "LAION_VQ_MODEL": TINY_MODEL,
        "LAION_VQ_CHECKPOINT": tiny_checkpoint,
        "LAION_VQ_DEVICE": "cpu",
        "LAION_VQ_ENCODE_BATCH_SIZE": "4",
        "LAION_VQ_DOWNLOAD_THREADS": "2",  # the slow shard: 6 images × 3 s / 2 threads ≈ 9 s
        "LAION_VQ_DOWNLOAD_TIMEOUT": "15",
        "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS": f"{image_server.host}/32",
        "LAION_VQ_DOWNLOAD_SHARDS_PER_RUN": "1",
        "LAION_VQ_ENCODE_SHARDS_PER_RUN": str(BACKFILL_SHARDS),
        "LAION_VQ_PREVIEW_SAMPLES": "0",
        "LAION_VQ_CELERY_BROKER": broker,
        "LAION_VQ_CELERY_QUEUE_PREFIX": prefix,
    }
    worker_env = {**env, "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": pg_url}
    monkeypatch.setattr(services_module, "WORKSPACE", WORKSPACE)  # the Celery code location
    layout = StorageLayout(str(storage))
    workers, groups = {}, []
    try:
        with services_module.dagster_services(home, pg_url, env=env, daemon=False) as services:
            groups.append(services.processes["webserver"].pid)
            for name, queue in (("dl1", "download"), ("dl2", "download"), ("gpu1", "gpu")):
                # node names unique to this test too: a worker answers pings and takes control messages by name
                workers[name] = start_worker(prefix + name, [prefix + queue], worker_env, tmp_path / "workers")
            wait_for_workers(list(workers.values()), broker)
            with services.instance() as instance:
                instance.event_log_storage.set_concurrency_slots("download", 4)
                instance.event_log_storage.set_concurrency_slots("gpu", 1)
                backfill_id = services.launch_backfill(ASSETS, KEYS)
                with services_module.dagster_services(home, pg_url, env=env, webserver=False) as daemon:
                    groups.append(daemon.processes["daemon"].pid)
                    services.processes.update(daemon.processes)  # wait_* watch the daemon too
                    status = services.wait_for_backfill(backfill_id, timeout=480)
                    assert status == "COMPLETED_SUCCESS", services.backfill(backfill_id)

                    # 1. every partition once; downloads spread over both download workers, the encoder on the GPU one
                    runs = instance.get_run_records(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
                    steps = [step for r in runs for step in _celery_steps(instance, r.dagster_run.run_id)]
                    for asset in ASSETS:
                        assert _materializations(instance, asset) == dict.fromkeys(KEYS, 1), asset
                    by_step: dict[str, set[str]] = {}
                    for keys, worker in steps:
                        by_step.setdefault(keys, set()).add(worker.split("@")[0].removeprefix(prefix))
                    assert by_step["image_tars"] == {"dl1", "dl2"}, steps
                    assert by_step["code_parquets"] == {"gpu1"}, steps
                    assert sum(keys == "image_tars" for keys, _ in steps) == BACKFILL_SHARDS, steps

                    # 2. kill the only download worker mid-shard
                    workers["dl2"].stop()
                    run_id = services.launch_run("download_shards", {"dagster/partition": f"{KILL_SHARD:05d}"})
                    _wait(
                        lambda: any(
                            f"downloading shard {KILL_SHARD:05d}" in (e.user_message or "")
                            for e in instance.all_logs(run_id)
                        ),
                        "dl1 starts downloading the slow shard",
                        180,
                        workers.values(),
                        services,
                    )
                    workers["dl1"].kill()
                    # nothing of the shard was published, the step is back in the queue, the run waits for it
                    assert not exists(layout.image_tar(KILL_SHARD)) and not exists(layout.image_status(KILL_SHARD))
                    queued = lambda: _ready_steps(broker, prefix + "download")  # noqa: E731
                    _wait(lambda: "image_tars" in queued(), "the killed step back in its queue", 60)
                    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
                    assert not exists(layout.image_tar(KILL_SHARD))

                    # a worker restarted (another machine, or the same one back) redoes the step
                    workers["dl3"] = start_worker(
                        prefix + "dl3", [prefix + "download"], worker_env, tmp_path / "workers"
                    )
                    assert services.wait_for_run(run_id, timeout=240) == "SUCCESS"
                    attempts = [
                        w.split("@")[0].removeprefix(prefix)
                        for keys, w in _celery_steps(instance, run_id)
                        if keys == "image_tars"
                    ]
                    assert attempts == ["dl1", "dl3"], attempts
                    assert _materializations(instance, "image_tars")[f"{KILL_SHARD:05d}"] == 1
                    status = pq.read_table(layout.image_status(KILL_SHARD)).column("status").to_pylist()
                    assert status == ["success"] * SAMPLES
    finally:
        for worker in workers.values():
            worker.stop(grace=20)
        # a run still waiting for a step when the test fails, and the code server that started it, outlive
        # the daemon's SIGTERM (dagster-celery waits for revoked steps): end the groups the services led
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def test_celery_code_location_routes_steps_by_pool(monkeypatch):
    """Every job and asset run of the Celery code location uses the pool-routed executor: the encoder's
    step goes to the `gpu` queue, every other step to `download`; executor and workers share settings."""
    pytest.importorskip("dagster_celery")
    import yaml
    from dagster._core.execution.api import create_execution_plan

    from laion_vq.deploy.distributed.definitions import defs
    from laion_vq.deploy.distributed.executor import CELERY_SETTINGS, step_queue
    from laion_vq.testing.celery_workers import BROKER, CELERY_YAML

    monkeypatch.setenv("LAION_VQ_CELERY_BROKER", BROKER)  # resolved when a plan is built, never contacted
    repository = defs.get_repository_def()
    jobs = [job for job in repository.get_all_jobs() if job.name != "apply_removals"]  # an op job, in process
    assert {job.executor_def.name for job in jobs} == {"celery_pool"}, [(j.name, j.executor_def.name) for j in jobs]
    # a schedule's run is of the location's job of that name (the schedule's own target names no executor)
    assert {repository.get_job(s.job_name).executor_def.name for s in repository.schedule_defs} == {"celery_pool"}
    assert repository.get_job("apply_removals").executor_def.name == "in_process"  # pinned in laion_vq.defs.removals
    plan = create_execution_plan(repository.get_implicit_global_asset_job_def())
    queues = {step.key: step_queue(step, "p.") for step in plan.steps}
    assert queues["code_parquets"] == "p.gpu"
    assert queues["image_tars"] == queues["raw_metadata_shards"] == "p.download"
    assert queues == {step.key: f"p.{step.pool or 'download'}" for step in plan.steps}
    worker_settings = yaml.safe_load(CELERY_YAML.read_text())["execution"]["config"]["config_source"]
    assert worker_settings == CELERY_SETTINGS
