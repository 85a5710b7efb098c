"""Operating the instance: a run worker killed mid-download must not keep its `download` pool slot.

- With the daemon (production instance on PostgreSQL, real `dagster-daemon` and `dagster-webserver`): the
  run is failed with the signal that killed it, run monitoring frees its slot, run retries re-run only the
  unfinished step, and the retry gets the slot and completes.
- Without it (`dagster asset materialize` in a shell, embedded SQLite instance): the slot stays claimed and
  a re-run of the shard waits for it, until the one-line recovery `python -m laion_vq.deploy.recover_dead_runs`
  fails the dead run and frees the slot; the waiting re-run then completes.

The downloads are kept busy by `/drip.jpg` URLs (one byte a second, a 600 s deadline) until the worker is
killed; the server dripping them is then stopped, so the runs after the kill finish in seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from laion_vq.testing.hostile_server import HostileServer
from laion_vq.testing.synthetic_metadata import write_parts

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARD = "00000"
SAMPLES = 4
WAIT_S = 180  # generous: a 2-core machine starting daemons, code servers and run workers


def wait_for(
    what: str,
    check: Callable[[], object],
    timeout: float = WAIT_S,
    interval: float = 0.5,
    diagnose: Callable[[], str] = lambda: "",
) -> object:
    """Poll `check` until it returns something truthy; fail naming `what` (and the diagnosis) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")
        time.sleep(interval)


@pytest.fixture()
def shard_env(tmp_path):
    """One shard of two real photos and two dripping URLs; yields (env for the runs, the drip server)."""
    with HostileServer() as photos, HostileServer(drip_interval_s=1.0) as dripper:
        urls = [
            photos.url("/img/photo.jpg"),
            photos.url("/img/gray.jpg"),
            dripper.url("/drip.jpg"),
            dripper.url("/drip.jpg"),
        ]
        write_parts(str(tmp_path / "meta"), [urls])
        env = {
            "LAION_VQ_STORAGE": str(tmp_path / "data"),
            "LAION_VQ_METADATA": str(tmp_path / "meta"),
            "LAION_VQ_SAMPLES_PER_SHARD": str(SAMPLES),
            "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS": "127.0.0.1/32",
            "LAION_VQ_DOWNLOAD_THREADS": "4",
            "LAION_VQ_DOWNLOAD_DEADLINE": "600",  # a dripping image holds the step until the kill
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "PYTHONWARNINGS": "ignore",
        }
        yield env, dripper


def _claims(instance, run_id: str) -> list[str]:
    return [
        s.step_key
        for s in instance.event_log_storage.get_concurrency_info("download").claimed_slots
        if s.run_id == run_id
    ]


def _engine_messages(instance, run_id: str) -> list[str]:
    from dagster._core.events import DagsterEventType

    return [
        r.dagster_event.message or ""
        for r in instance.all_logs(run_id)
        if r.dagster_event
        and r.dagster_event.event_type in (DagsterEventType.ENGINE_EVENT, DagsterEventType.PIPELINE_FAILURE)
    ]


# ---------------------------------------------------------------------------------------------------------
# with the daemon: PostgreSQL, the production instance, a run launched as the UI launches it


def test_daemon_fails_killed_run_frees_its_slot_and_retries_it(tmp_path, shard_env):
    from dagster._core.storage.dagster_run import DagsterRunStatus

    from laion_vq.deploy.recover_dead_runs import worker_pids
    from laion_vq.testing.dagster_services import PRODUCTION_YAML, dagster_services, postgres_database

    env, dripper = shard_env
    production = yaml.safe_load(PRODUCTION_YAML.read_text())
    # the production settings, polled every second instead of every 30 s (run_retries: as shipped)
    monitoring = {**production["run_monitoring"], "poll_interval_seconds": 1, "free_slots_after_run_end_seconds": 1}
    with (
        postgres_database() as pg_url,
        dagster_services(tmp_path / "home", pg_url, env=env, overrides={"run_monitoring": monitoring}) as services,
        services.instance() as instance,
    ):

        def diagnose() -> str:
            return f"daemon log:\n{services.log('daemon')[-4000:]}"

        instance.event_log_storage.set_concurrency_slots("download", 1)
        run_id = services.launch_run("download_shards", {"dagster/partition": SHARD})

        # queued → launched by the daemon → downloading, holding the one `download` slot
        wait_for(
            "the download step to hold the slot and fetch the dripping URLs",
            lambda: _claims(instance, run_id) == ["image_tars"] and dripper.hits,
            diagnose=diagnose,
        )
        assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED
        pids = worker_pids(instance, run_id)
        assert len(pids) == 1, pids  # "Started process for run (pid: N)", the same pid executes the steps
        (pid,) = pids
        os.kill(pid, signal.SIGKILL)
        dripper.stop()  # the retry's drips now fail at once (connection refused)

        # the code server that started the worker fails the run, naming the signal
        wait_for(
            "the killed run to be marked FAILURE",
            lambda: instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE,
            diagnose=diagnose,
        )
        messages = _engine_messages(instance, run_id)
        assert any("was terminated by signal 9 (SIGKILL)" in m for m in messages), messages
        # run monitoring gives its slot back
        wait_for(
            "run monitoring to free the dead run's download slot",
            lambda: not _claims(instance, run_id),
            diagnose=diagnose,
        )

        # run retries: a new run of only the unfinished step, which gets the slot and completes
        retry_id = wait_for(
            "the automatic retry",
            lambda: instance.get_run_by_id(run_id).tags.get("dagster/auto_retry_run_id"),
            diagnose=diagnose,
        )
        wait_for("the retry to finish", lambda: instance.get_run_by_id(retry_id).is_finished, diagnose=diagnose)
        retry = instance.get_run_by_id(retry_id)
        assert retry.status == DagsterRunStatus.SUCCESS, _engine_messages(instance, retry_id)
        assert retry.tags["dagster/parent_run_id"] == run_id and retry.tags["dagster/retry_number"] == "1"
        assert "image_tars" in retry.step_keys_to_execute
        assert "raw_metadata_shards" not in retry.step_keys_to_execute  # done before the kill: not redone
        assert instance.event_log_storage.get_concurrency_info("download").claimed_slots == []
        assert (tmp_path / "data" / "images" / f"{SHARD}.tar").exists()


# ---------------------------------------------------------------------------------------------------------
# without a daemon: `dagster asset materialize` in a shell, the embedded SQLite instance


def _cli(env: dict[str, str], *args: str, timeout: float = WAIT_S) -> str:
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result.stdout


def _as_background_job() -> None:
    """A shell's background job (`… &`, nohup) starts with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _materialize(env: dict[str, str], select: str, log: Path, background: bool = False) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                str(BIN / "dagster"),
                "asset",
                "materialize",
                "-m",
                "laion_vq.definitions",
                "--select",
                select,
                "--partition",
                SHARD,
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_as_background_job if background else None,
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def test_killed_shell_run_is_failed_and_its_slot_freed_by_the_one_line_recovery(tmp_path, shard_env):
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

    from laion_vq.settings import write_instance_settings

    env, dripper = shard_env
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    # the shell runs read the instance's settings file, as the UI's processes do: none is in their environment
    write_instance_settings(str(home), {k: v for k, v in env.items() if k.startswith("LAION_VQ_")})
    env = {k: v for k, v in {**os.environ, **env}.items() if not k.startswith("LAION_VQ_")}
    env["DAGSTER_HOME"] = str(home)
    dagster = str(BIN / "dagster")
    recover = [str(BIN / "python"), "-m", "laion_vq.deploy.recover_dead_runs"]

    assert "Set concurrency limit for download to 1." in _cli(
        env, dagster, "instance", "concurrency", "set", "download", "1"
    )
    _cli(
        env,
        dagster,
        "asset",
        "materialize",
        "-m",
        "laion_vq.definitions",
        "--select",
        "raw_metadata_shards",
        "--partition",
        SHARD,
    )
    assert (tmp_path / "data" / "metadata" / f"{SHARD}.parquet").exists()  # on the storage its file names
    processes: list[subprocess.Popen] = []
    instance = dg.DagsterInstance.from_config(str(home))
    try:

        def started_download() -> str | None:
            runs = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
            return next((r.run_id for r in runs if _claims(instance, r.run_id) and dripper.hits), None)

        # 0. a shell run started in the background (SIGINT ignored) stops on SIGTERM, failed, its slot freed
        background_log = tmp_path / "background.log"
        background = _materialize(env, "image_tars", background_log, background=True)
        processes.append(background)
        stopped_id = wait_for("the background run's download", started_download, diagnose=background_log.read_text)
        os.kill(background.pid, signal.SIGTERM)
        try:
            background.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a background shell run ignored SIGTERM:\n{background_log.read_text()[-3000:]}")
        assert instance.get_run_by_id(stopped_id).status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
        wait_for("its slot to be freed", lambda: not _claims(instance, stopped_id), timeout=30)

        # 1. the shell run, SIGKILLed during its download step
        first = _materialize(env, "image_tars", tmp_path / "first.log")
        processes.append(first)

        dead_id = wait_for(
            "the shell run's download step to hold the slot",
            started_download,
            diagnose=lambda: (tmp_path / "first.log").read_text()[-4000:],
        )
        os.kill(first.pid, signal.SIGKILL)  # the CLI executes the steps in its own process
        first.wait(30)
        dripper.stop()

        # 2. nothing notices: the run stays STARTED and its slot claimed; a re-run of the shard waits for it
        assert instance.get_run_by_id(dead_id).status == DagsterRunStatus.STARTED
        assert '"download": 1 / 1 slots occupied' in _cli(env, dagster, "instance", "concurrency", "get", "--all")
        second_log = tmp_path / "second.log"
        second = _materialize(env, "image_tars", second_log)
        processes.append(second)
        wait_for(
            "the re-run to wait for the download slot",
            lambda: "Step blocked by limit for pool download" in second_log.read_text(errors="replace"),
            diagnose=lambda: second_log.read_text(errors="replace")[-4000:],
        )
        assert second.poll() is None
        # within a minute it says who holds the slot, that its process is gone, and the command that frees it
        said = wait_for(
            "the re-run to say who holds its slot",
            lambda: (
                "waits for a `download` pool slot" in second_log.read_text(errors="replace")
                and second_log.read_text(errors="replace")
            ),
            timeout=60,
        )
        assert f"run {dead_id} (__ASSET_JOB, partition {SHARD}, STARTED; worker process" in said, said[-3000:]
        assert "GONE on this machine" in said and "python -m laion_vq.deploy.recover_dead_runs" in said, said[-3000:]

        # 3. the one-line recovery: the dead run is failed with its reason, its slot freed; the live re-run is
        #    left alone and now gets the slot
        out = _cli(env, *recover)
        assert (
            f"run {dead_id} (__ASSET_JOB, partitions {SHARD}): worker pid {first.pid} gone; marked FAILURE; "
            "freed 1 slot(s): download/image_tars" in out
        ), out
        assert out.count("marked FAILURE") == 1, out
        dead = instance.get_run_by_id(dead_id)
        assert dead.status == DagsterRunStatus.FAILURE
        failure = [m for m in _engine_messages(instance, dead_id) if m.startswith("Run worker gone")]
        assert failure and f"process {first.pid} on " in failure[0] and "download/image_tars" in failure[0], failure
        assert "python -m laion_vq.deploy.recover_dead_runs" in failure[0]

        assert second.wait(WAIT_S) == 0, second_log.read_text(errors="replace")[-4000:]
        assert "RUN_SUCCESS" in second_log.read_text(errors="replace")
        assert '"download": 0 / 1 slots occupied' in _cli(env, dagster, "instance", "concurrency", "get", "--all")
        assert (tmp_path / "data" / "images" / f"{SHARD}.tar").exists()
        assert "no dead runs" in _cli(env, *recover)
    finally:
        for process in processes:
            _stop(process)
        instance.dispose()


# ---------------------------------------------------------------------------------------------------------
# the recovery's judgement and the shipped settings


def test_recovery_judges_pids_by_their_start_time():
    from laion_vq.deploy.recover_dead_runs import process_alive

    assert process_alive(os.getpid(), seen_at=time.time())
    if Path("/proc/self/stat").exists():
        # the pid exists but its process started long after Dagster recorded it: a reused pid, the worker is gone
        assert not process_alive(os.getpid(), seen_at=0.0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not process_alive(dead.pid, seen_at=time.time())


@pytest.mark.parametrize("path", ["dagster.yaml", "deploy/dagster.yaml"])
def test_instances_fail_dead_runs_free_their_slots_and_retry_crashes(path):
    config = yaml.safe_load((REPO / path).read_text())
    monitoring, retries = config["run_monitoring"], config["run_retries"]
    assert monitoring["enabled"] and monitoring["free_slots_after_run_end_seconds"] > 0
    assert monitoring["max_resume_run_attempts"] == 0  # the default run launcher cannot resume runs
    assert monitoring["max_runtime_seconds"] >= 6 * 3600  # long runs are not killed
    assert retries["enabled"] and retries["max_retries"] >= 1 and retries["retry_on_asset_or_op_failure"] is False
    # the embedded instance operates like production
    other = yaml.safe_load((REPO / ("deploy/dagster.yaml" if path == "dagster.yaml" else "dagster.yaml")).read_text())
    assert other["run_monitoring"] == monitoring and other["run_retries"] == retries
