"""Run workers that die with nobody left to report it, and fed runs older than run monitoring allows: the
platform heals both by itself (`laion_vq.defs.dead_runs`, `laion_vq.defs.feeding`).

- The `dead_run_watch` sensor, evaluated as the daemon evaluates it, on the production instance
  (`deploy/dagster.yaml`, real PostgreSQL): a launched run whose recorded worker pid is gone is failed at the
  second look (never at the first: a run that just ended is not mistaken for dead), with Dagster's
  unexpected-termination reason, and its `gpu` slot is freed; a live worker's run and a shell run (which may
  run on another machine of a shared instance) are left alone.
- The daemon killed with its whole process group mid-backfill (as a service manager restarting its unit does;
  the run workers of the default run launcher are in that group): the encoder run dies STARTED, holding the
  only `gpu` slot. The daemon is started again and nobody types anything: the dead run is failed, retried,
  and the backfill completes, one code materialization per shard.
- A fed encoder run under a shortened maximum runtime hands over to a fresh run before run monitoring would
  fail it: no run fails, every shard is encoded once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import dagster as dg
import yaml
from dagster._core.events import EngineEventData
from dagster._core.storage.tags import GRPC_INFO_TAG, RUN_FAILURE_REASON_TAG

from laion_vq.defs.check_state import CODES_CHECK, REMOVED_CODES_CHECK, latest_results
from laion_vq.defs.dead_runs import dead_run_watch
from laion_vq.deploy.recover_dead_runs import process_alive, worker_pids
from laion_vq.testing.dagster_services import BACKFILL_DONE, PRODUCTION_YAML, dagster_services, write_instance_yaml

from .conftest import backfill_runs, is_encoder_run, tiny_backfill_env

ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]
CODES = dg.AssetKey("code_parquets")


def _started_run(instance: dg.DagsterInstance, pid: int, launched: bool) -> str:
    """A STARTED run whose worker Dagster recorded as `pid`, holding a `gpu` slot, as the code server leaves it."""
    run = instance.create_run_for_job(
        dg.GraphDefinition(name="encode", node_defs=[]).to_job(),
        tags={GRPC_INFO_TAG: '{"host": "localhost"}'} if launched else {},
    )
    for event in (dg.DagsterEventType.RUN_STARTING, dg.DagsterEventType.RUN_START):
        instance.report_dagster_event(
            dg.DagsterEvent(event_type_value=event.value, job_name=run.job_name), run_id=run.run_id
        )
    instance.report_engine_event(
        f"Started process for run (pid: {pid}).",
        run,
        EngineEventData(metadata={"pid": dg.MetadataValue.text(str(pid))}),
    )
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 1)
    storage.claim_concurrency_slot("gpu", run.run_id, "code_parquets")
    return run.run_id


def _held(instance: dg.DagsterInstance) -> set[str]:
    return {slot.run_id for slot in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots}


def test_dead_run_watch_fails_a_dead_launched_run_at_the_second_look_and_frees_its_slot(tmp_path, pg_url):
    home = tmp_path / "home"
    write_instance_yaml(home, base=PRODUCTION_YAML)
    os.environ["DAGSTER_PG_URL"] = pg_url
    try:
        instance = dg.DagsterInstance.from_config(str(home))
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        try:
            time.sleep(0.05)
            dead_run = _started_run(instance, gone.pid, launched=True)
            live_run = _started_run(instance, alive.pid, launched=True)
            shell_run = _started_run(instance, gone.pid, launched=False)  # maybe another machine's: not judged
            assert not process_alive(gone.pid, time.time())

            first = dead_run_watch(dg.build_sensor_context(instance=instance, cursor=None))
            assert "1 run(s) without a live worker" in (first.skip_message or ""), first
            assert instance.get_run_by_id(dead_run).status == dg.DagsterRunStatus.STARTED  # not at the first look

            second = dead_run_watch(dg.build_sensor_context(instance=instance, cursor=f'["{dead_run}"]'))
            assert f"failed 1 dead run(s): {dead_run}" in (second.skip_message or ""), second

            failed = instance.get_run_by_id(dead_run)
            assert failed.status == dg.DagsterRunStatus.FAILURE
            assert failed.tags.get(RUN_FAILURE_REASON_TAG) == "UNEXPECTED_TERMINATION"
            [message] = [
                r.dagster_event.message
                for r in instance.all_logs(dead_run, of_type=dg.DagsterEventType.RUN_FAILURE)
                if r.dagster_event
            ]
            assert f"process {gone.pid}" in message and "`dead_run_watch` sensor" in message, message
            assert "gpu/code_parquets" in message and "run retries start the run again" in message, message
            assert dead_run not in _held(instance)
            assert instance.get_run_by_id(live_run).status == dg.DagsterRunStatus.STARTED
            assert instance.get_run_by_id(shell_run).status == dg.DagsterRunStatus.STARTED
        finally:
            alive.kill()
            alive.wait()
            instance.dispose()
    finally:
        os.environ.pop("DAGSTER_PG_URL", None)


# ---------------------------------------------------------------------------------------------------------
# through the real daemon


def _summary(runs: list[dg.RunRecord]) -> str:
    return "\n".join(
        f"{r.dagster_run.run_id[:8]} {r.dagster_run.status.value} "
        f"{[k.to_user_string() for k in r.dagster_run.asset_selection or []]} "
        f"{r.dagster_run.tags.get('dagster/asset_partition_range_start')}.."
        f"{r.dagster_run.tags.get('dagster/asset_partition_range_end')} parent={r.dagster_run.parent_run_id}"
        for r in runs
    )


def _wait(what: str, check, processes: dict, log, timeout: float = 600) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for name, process in processes.items():
            assert process.poll() is None, f"{name} exited:\n{log(name)[-4000:]}"
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\ndaemon log:\n{log('daemon')[-4000:]}")


def _one_code_per_shard(instance, keys: list[str], samples: int) -> None:
    """Each shard encoded once, and both its code checks passed on that materialization: a killed run's retry,
    planned after the shards were checked and then cancelled as covered, must not leave them unchecked."""
    records = instance.fetch_materializations(CODES, limit=1000).records
    assert Counter(r.partition_key for r in records) == dict.fromkeys(keys, 1)
    assert all(r.asset_materialization.metadata["encoded"].value == samples for r in records)
    for check in (CODES_CHECK, REMOVED_CODES_CHECK):
        results = latest_results(instance, check, keys)
        assert sorted(r.shard for r in results) == keys, (check, results)
        assert all(r.passed and r.current for r in results), (check, results)


def test_daemon_killed_with_its_process_group_then_restarted_heals_the_dead_encoder_run(
    tmp_path, image_server, tiny_checkpoint, pg_url
):
    shards, samples = 6, 3
    keys = [f"{i:05d}" for i in range(shards)]
    env = tiny_backfill_env(tmp_path, image_server, tiny_checkpoint, shards, samples)
    home = tmp_path / "dagster_home"
    with dagster_services(home, pg_url, env=env, daemon=False) as services, services.instance() as instance:
        instance.event_log_storage.set_concurrency_slots("download", 1)
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        backfill_id = services.launch_backfill(ASSETS, keys)
        with dagster_services(home, pg_url, env=env, webserver=False) as daemon:

            def encoder_recorded_a_shard():
                encoders = [r for r in backfill_runs(instance, backfill_id) if is_encoder_run(r)]
                if not encoders:
                    return None
                run_id = encoders[0].dagster_run.run_id
                records = instance.fetch_materializations(CODES, limit=100).records
                return run_id if any(r.run_id == run_id for r in records) else None

            killed = _wait("an encoder run to record a shard", encoder_recorded_a_shard, daemon.processes, services.log)
            tars_when_killed = len(instance.get_materialized_partitions(dg.AssetKey("image_tars")))
            pids = worker_pids(instance, killed)
            # a service manager restarting the daemon's unit: SIGKILL to its whole process group
            os.killpg(daemon.processes["daemon"].pid, signal.SIGKILL)
            daemon.processes["daemon"].wait(30)
            killed_at = time.monotonic()
        time.sleep(2)
        assert pids and not any(process_alive(pid, seen) for pid, seen in pids.items()), "the worker survived"
        assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.STARTED  # nobody reported its death
        assert tars_when_killed < shards

        # started again, as its unit would be; nobody types a command from here on
        with dagster_services(home, pg_url, env=env, webserver=False) as daemon:
            _wait(
                "the dead encoder run to be failed",
                lambda: instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE,
                daemon.processes,
                services.log,
                timeout=300,
            )
            healed_s = time.monotonic() - killed_at
            _wait(
                "the backfill to finish",
                lambda: services.backfill(backfill_id).get("status") in BACKFILL_DONE,
                daemon.processes,
                services.log,
                timeout=900,
            )
        runs = backfill_runs(instance, backfill_id)
        summary = _summary(runs)
        assert services.backfill(backfill_id)["status"] == "COMPLETED_SUCCESS", summary
        failure = instance.get_run_by_id(killed)
        assert failure.tags.get(RUN_FAILURE_REASON_TAG) == "UNEXPECTED_TERMINATION", failure.tags
        assert any(r.dagster_run.parent_run_id == killed for r in runs), summary  # run retries took it
        assert healed_s < 300, healed_s
        _one_code_per_shard(instance, keys, samples)
        storage = instance.event_log_storage
        assert not any(storage.get_concurrency_info(p).claimed_slots for p in ("gpu", "download")), "a slot leaked"


def test_fed_run_hands_over_before_run_monitoring_would_fail_it(tmp_path, image_server, tiny_checkpoint, pg_url):
    shards, samples = 6, 3
    keys = [f"{i:05d}" for i in range(shards)]
    env = tiny_backfill_env(
        tmp_path, image_server, tiny_checkpoint, shards, samples, LAION_VQ_ENCODE_FEED_HANDOVER="0.1"
    )  # 6 s: well before the downloads (one slot, one run per shard) have all landed, on a fast machine too
    home = tmp_path / "dagster_home"
    monitoring = {
        **yaml.safe_load(PRODUCTION_YAML.read_text())["run_monitoring"],
        "poll_interval_seconds": 5,
        "max_runtime_seconds": 60,  # 12 h in production: a fed run lives as long as its backfill
    }
    with (
        dagster_services(home, pg_url, env=env, overrides={"run_monitoring": monitoring}) as services,
        services.instance() as instance,
    ):
        instance.event_log_storage.set_concurrency_slots("download", 1)
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        backfill_id = services.launch_backfill(ASSETS, keys)
        status = services.wait_for_backfill(backfill_id, timeout=900)
        runs = backfill_runs(instance, backfill_id)
        summary = _summary(runs)
        assert status == "COMPLETED_SUCCESS", summary
        assert not [r for r in runs if r.dagster_run.status == dg.DagsterRunStatus.FAILURE], summary
        handed_over = [
            r
            for r in runs
            if is_encoder_run(r)
            and any(
                "feeding: handing over to a fresh encoder run" in (e.message or "")
                for e in instance.all_logs(r.dagster_run.run_id)
            )
        ]
        assert handed_over, summary
        first = handed_over[0]
        assert first.end_time - first.start_time < 60, summary  # ended before run monitoring's limit
        later = [r for r in runs if is_encoder_run(r) and r.start_time and r.start_time > first.end_time - 1]
        assert later, summary  # a fresh run took the shards still to come
        _one_code_per_shard(instance, keys, samples)
