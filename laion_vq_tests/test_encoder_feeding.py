"""A backfill keeps one encoder fed while its downloads land one by one (`laion_vq.defs.feeding`).

The UI's backfill of the whole graph over 6 shards, on the production instance (`deploy/dagster.yaml`:
PostgreSQL, queued coordinator, pools) with a real `dagster-daemon` and `dagster-webserver`; one shard per
download run and one `download` slot, so tars land one at a time, each a few seconds after the last (every
shard has a URL the image server answers after 3 s). The tiny f8 model encodes.

What must hold:
- the first encoder run starts before the last download has finished, and the encoder is not cut into one
  run per shard: the daemon's later requests are covered by the fed run (their queued runs end successfully
  without starting, tagged with the run that encoded them, their log saying so: no run of the backfill is
  cancelled, so no partition shows a "canceled" banner for work that was done);
- the first encoder run is killed (SIGKILL) once it has recorded a shard: run retries queue it again (it
  runs, or ends without work because another encoder run of the backfill got the GPU first and encoded its
  shards), and in the end every shard has exactly one code materialization (none encoded twice, none skipped), its code
  checks passed and current, and the backfill completes successfully.

Nothing here is timed: the order of events is read back from the run records.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import dagster as dg

from laion_vq.defs.check_state import CODES_CHECK, REMOVED_CODES_CHECK, latest_results
from laion_vq.defs.feeding import ENCODED_BY_TAG
from laion_vq.testing.dagster_services import BACKFILL_DONE

from .conftest import backfill_runs, is_encoder_run, tiny_backfill_env

NUM_SHARDS = 6
SAMPLES = 3
KEYS = [f"{i:05d}" for i in range(NUM_SHARDS)]
ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]
CODES = dg.AssetKey("code_parquets")


def _wait(services, daemon, what: str, check, timeout: float = 600) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for name, process in {**services.processes, **daemon.processes}.items():
            assert process.poll() is None, f"{name} exited:\n{services.log(name)[-4000:]}"
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\ndaemon log:\n{services.log('daemon')[-4000:]}")


def test_backfill_feeds_one_encoder_while_downloads_land_and_survives_a_killed_encoder(
    tmp_path, image_server, tiny_checkpoint, pg_url
):
    from laion_vq.deploy.recover_dead_runs import worker_pids
    from laion_vq.testing.dagster_services import dagster_services

    env = tiny_backfill_env(tmp_path, image_server, tiny_checkpoint, NUM_SHARDS, SAMPLES)
    home = tmp_path / "dagster_home"
    with dagster_services(home, pg_url, env=env, daemon=False) as services, services.instance() as instance:
        instance.event_log_storage.set_concurrency_slots("download", 1)
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        backfill_id = services.launch_backfill(ASSETS, KEYS)
        with dagster_services(home, pg_url, env=env, webserver=False) as daemon:

            def first_encoder_recorded_a_shard():
                encoders = [r for r in backfill_runs(instance, backfill_id) if is_encoder_run(r)]
                if not encoders:
                    return None
                run_id = encoders[0].dagster_run.run_id
                records = instance.fetch_materializations(CODES, limit=100).records
                return run_id if any(r.run_id == run_id for r in records) else None

            killed = _wait(services, daemon, "the first encoder run to record a shard", first_encoder_recorded_a_shard)
            tars_when_killed = len(instance.get_materialized_partitions(dg.AssetKey("image_tars")))
            (pid,) = worker_pids(instance, killed)
            os.kill(pid, signal.SIGKILL)

            _wait(
                services,
                daemon,
                "the backfill to finish",
                lambda: services.backfill(backfill_id).get("status") in BACKFILL_DONE,
                timeout=900,
            )
        backfill = services.backfill(backfill_id)
        runs = backfill_runs(instance, backfill_id)
        summary = "\n".join(
            f"{r.dagster_run.run_id[:8]} {r.dagster_run.status.value} "
            f"{[k.to_user_string() for k in r.dagster_run.asset_selection or []]} "
            f"{r.dagster_run.tags.get('dagster/asset_partition_range_start')}.."
            f"{r.dagster_run.tags.get('dagster/asset_partition_range_end')} start={r.start_time} end={r.end_time}"
            for r in runs
        )
        assert backfill["status"] == "COMPLETED_SUCCESS", f"{backfill}\n{summary}"

        # the encoder started while downloads were still landing, and was killed mid-feed
        downloads = [r for r in runs if not is_encoder_run(r)]
        encoders = [r for r in runs if is_encoder_run(r)]
        assert len(downloads) == NUM_SHARDS, summary  # one per shard, as configured: no extra download runs
        first_encoder = min((r for r in encoders if r.start_time), key=lambda r: r.start_time)
        last_download_end = max(r.end_time for r in downloads)
        assert first_encoder.start_time < last_download_end, summary
        assert tars_when_killed < NUM_SHARDS, (tars_when_killed, summary)
        assert first_encoder.dagster_run.run_id == killed

        # the kill: a failed run and its retry; every other encoder run either ran or was covered by a fed run
        by_id = {r.dagster_run.run_id: r for r in runs}
        assert by_id[killed].dagster_run.status == dg.DagsterRunStatus.FAILURE, summary
        # its retry ran, or another encoder run of the backfill got the GPU first and encoded the retry's shard too
        retries = [r for r in encoders if r.dagster_run.tags.get("dagster/parent_run_id") == killed]
        assert retries, summary
        assert retries[0].dagster_run.status == dg.DagsterRunStatus.SUCCESS, summary
        started = [r for r in encoders if r.start_time]
        assert len(started) < NUM_SHARDS // 2, summary  # never one run per shard
        # no run cancelled: every encoder run but the killed one succeeded; those that never started say why
        assert not [r for r in runs if r.dagster_run.status == dg.DagsterRunStatus.CANCELED], summary
        closed = [r for r in encoders if r.start_time is None]  # the daemon's later requests, covered by a fed run
        for record in closed:
            assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS, summary
            assert record.dagster_run.tags.get(ENCODED_BY_TAG) in by_id, summary
            said = [e.message for e in instance.all_logs(record.dagster_run.run_id) if e.message]
            assert any(f"encoded by run {record.dagster_run.tags[ENCODED_BY_TAG]}" in m for m in said), said

        # exactly one code materialization per shard: none encoded twice, none skipped
        records = instance.fetch_materializations(CODES, limit=1000).records
        per_partition = Counter(r.partition_key for r in records)
        assert per_partition == dict.fromkeys(KEYS, 1), (per_partition, summary)
        encoded = {r.partition_key: r.asset_materialization.metadata["encoded"].value for r in records}
        assert all(encoded[k] == SAMPLES for k in KEYS), encoded

        # every code shard's two checks evaluated by the encoder, passed, on its one materialization
        for check in (CODES_CHECK, REMOVED_CODES_CHECK):
            results = latest_results(instance, check, KEYS)
            assert sorted(r.shard for r in results) == KEYS, (check, results)
            assert all(r.passed and r.current for r in results), (check, results)
