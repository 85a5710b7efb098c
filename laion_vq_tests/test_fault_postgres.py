"""PostgreSQL crashing under the production instance (`deploy/dagster.yaml`), on a throwaway cluster
(`laion_vq.testing.pg_cluster`), never the machine's shared server.

What must hold:
- after a crash (`pg_ctl stop -m immediate`: no checkpoint, recovery from the WAL on start) the same instance
  object's next reads and writes work, and what it had written before the crash is all there;
- while the server is down for a moment, an operation is not lost: dagster-postgres retries the connection
  ("Retrying failed database connection", exponential backoff, ~6 s in all) and it succeeds once the server is back;
- the real daemon and webserver running a whole-graph backfill through a 10 s outage (longer than those retries):
  the backfill still completes successfully, every shard encoded once. A run whose event writes outlast the retries
  fails and `run_retries` (deploy/dagster.yaml) runs it again; a run that had nothing to write meanwhile goes on.
  Slow for a test (~110 s): the backfill daemon iterates every 30 s, whatever the outage.
"""

from __future__ import annotations

import logging
import threading
import time

import dagster as dg

from laion_vq.testing.dagster_services import DagsterServices, write_instance_yaml
from laion_vq.testing.pg_cluster import pg_cluster


@dg.asset
def crash_probe() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"written": dg.MetadataValue.int(1)})


def _materialize(instance: dg.DagsterInstance) -> str:
    result = dg.materialize([crash_probe], instance=instance)
    assert result.success
    return result.run_id


def test_instance_survives_a_postgres_crash_and_a_short_outage(tmp_path, caplog):
    home = tmp_path / "dagster_home"
    with pg_cluster("dagster") as cluster:
        write_instance_yaml(home)  # deploy/dagster.yaml, reading DAGSTER_PG_URL
        services = DagsterServices(home=home, env={"DAGSTER_PG_URL": cluster.url}, port=0)
        with services.instance() as instance:
            assert "postgres" in type(instance.run_storage).__module__, type(instance.run_storage)
            before = _materialize(instance)
            postmaster = cluster.pid

            cluster.restart("immediate")  # a crash: backends SIGQUIT, no checkpoint
            assert cluster.pid != postmaster

            # the same instance object, no reconnect by hand: its next operations work and nothing was lost
            assert instance.get_run_by_id(before).status == dg.DagsterRunStatus.SUCCESS
            after_crash = _materialize(instance)
            records = instance.fetch_materializations(crash_probe.key, limit=10).records
            assert {r.run_id for r in records} == {before, after_crash}

            # down for a moment: the operation waits in dagster-postgres' retries and succeeds
            cluster.stop("immediate")
            restarter = threading.Timer(1.0, cluster.start)
            restarter.start()
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                started = time.monotonic()
                runs = instance.get_runs()
                waited = time.monotonic() - started
            restarter.join()
            assert {r.run_id for r in runs} == {before, after_crash}
            assert waited >= 0.5, "the server was down: the read must have waited for it"
            assert "Retrying failed database connection" in caplog.text
            during_outage = _materialize(instance)
            assert instance.get_run_by_id(during_outage).status == dg.DagsterRunStatus.SUCCESS
            assert len(instance.fetch_materializations(crash_probe.key, limit=10).records) == 3


def _status(services: DagsterServices, backfill_id: str) -> str | None:
    """The backfill's status as the UI reads it; None while the webserver answers with an error: its first query
    after the restart meets a connection the crash closed ("server closed the connection unexpectedly", HTTP 500)
    and the next one works."""
    import urllib.error

    try:
        return services.backfill(backfill_id).get("status")
    except urllib.error.HTTPError:
        return None


BACKFILL_SHARDS = 3
BACKFILL_SAMPLES = 3
ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]
OUTAGE_S = 10


def test_backfill_survives_postgres_down_for_ten_seconds(tmp_path, image_server, tiny_checkpoint):
    """The UI's whole-graph backfill (metadata → tars → codes, tiny model) on the real `dagster-daemon` and
    `dagster-webserver`, with PostgreSQL crashed (immediate stop) for OUTAGE_S seconds while a download run is in
    progress, then started again: the backfill ends COMPLETED_SUCCESS with one code materialization per shard."""
    from collections import Counter

    from dagster._core.storage.tags import BACKFILL_ID_TAG

    from laion_vq.testing.dagster_services import BACKFILL_DONE, dagster_services

    from .conftest import tiny_backfill_env

    keys = [f"{i:05d}" for i in range(BACKFILL_SHARDS)]
    env = tiny_backfill_env(
        tmp_path,
        image_server,
        tiny_checkpoint,
        BACKFILL_SHARDS,
        BACKFILL_SAMPLES,
        LAION_VQ_ENCODE_FEED_IDLE_SECONDS="60",
    )
    home = tmp_path / "dagster_home"
    with (
        pg_cluster("dagster") as cluster,
        dagster_services(home, cluster.url, env=env) as services,
        services.instance() as instance,
    ):
        backfill_id = services.launch_backfill(ASSETS, keys)

        def runs() -> list[dg.RunRecord]:
            return list(instance.get_run_records(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id})))

        deadline = time.monotonic() + 120
        while not any(r.dagster_run.status == dg.DagsterRunStatus.STARTED for r in runs()):
            assert time.monotonic() < deadline, f"no run started:\n{services.log('daemon')[-3000:]}"
            assert services.processes["daemon"].poll() is None, services.log("daemon")[-3000:]
            time.sleep(0.5)
        cluster.stop("immediate")  # mid-backfill: a download run in progress, the daemon ticking
        time.sleep(OUTAGE_S)
        cluster.start()

        deadline = time.monotonic() + 300
        while _status(services, backfill_id) not in BACKFILL_DONE:
            assert time.monotonic() < deadline, f"backfill not done:\n{services.log('daemon')[-4000:]}"
            for name, process in services.processes.items():
                assert process.poll() is None, f"{name} exited:\n{services.log(name)[-4000:]}"
            time.sleep(1)
        backfill = services.backfill(backfill_id)
        summary = "\n".join(
            f"{r.dagster_run.run_id[:8]} {r.dagster_run.status.value} "
            f"{[k.to_user_string() for k in r.dagster_run.asset_selection or []]} "
            f"{r.dagster_run.tags.get('dagster/asset_partition_range_start')} "
            f"parent={r.dagster_run.tags.get('dagster/parent_run_id', '')[:8]} {r.start_time} {r.end_time}"
            for r in runs()
        )
        assert backfill["status"] == "COMPLETED_SUCCESS", f"{backfill}\n{summary}\n{services.log('daemon')[-4000:]}"
        records = instance.fetch_materializations(dg.AssetKey("code_parquets"), limit=100).records
        assert Counter(r.partition_key for r in records) == dict.fromkeys(keys, 1), summary
        # the outage was met, not slept through: the daemon's connections failed and were retried
        assert "Retrying failed database connection" in services.log("daemon"), services.log("daemon")[-3000:]
