"""Fail the runs whose worker process died, and give their pool slots back: the one-line recovery where no
daemon watches the runs.

    python -m laion_vq.deploy.recover_dead_runs            # DAGSTER_HOME as for `dagster asset materialize`
    python -m laion_vq.deploy.recover_dead_runs --dry-run  # only say what it would do
    python -m laion_vq.deploy.recover_dead_runs --run-id ID [--run-id ID …]

A run executed in a shell (`dagster asset materialize`, `dagster job execute`, the demo) runs its steps in
that shell's process. Killed there (SIGKILL, the OOM killer, a closed terminal) it stays STARTED forever
and its steps keep their `download`/`gpu` pool slots, so the next run of the shard waits for a slot that
nobody will free. Where `dagster-daemon` runs, the code server that started a run worker fails the run
when the worker dies and run monitoring frees the slots (`deploy/README.md`); in a shell nothing does.

This command finds the STARTING/STARTED/CANCELING runs whose worker processes (the pids Dagster itself
records in the run's "Executing steps in process (pid: N)" / "Started process for run (pid: N)" events)
no longer exist on this machine — a pid reused by a younger process counts as gone —, marks each one
FAILURE with a message saying what happened, and frees its pool slots and queued slot claims. It also
frees slots still held by runs that already finished (a run failed by a code server where no run
monitoring frees them). Runs whose worker is alive, or that recorded no pid, are left alone.

Which runs it may judge: runs that no run launcher started (shell runs), and on the embedded SQLite
instance — one machine by construction — launched runs too. On a shared (PostgreSQL) instance launched
runs may live on other machines and are run monitoring's; name one with `--run-id` to fail it anyway.
Run it on the machine that ran the shell command: a pid is only meaningful there.

Where the daemon runs, nobody types this: the `dead_run_watch` sensor (`laion_vq/defs/dead_runs.py`) calls
`find_dead_runs` from the daemon's code server — the process that started the default
run launcher's workers, so their pids are this machine's — and `recover` on the runs found dead twice in a
row; run retries then start them again.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import dagster as dg

from laion_vq.dagster_internals import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    FINISHED_STATUSES,
    GRPC_INFO_TAG,
    PARTITION_NAME_TAG,
    JobFailureData,
    RunFailureReason,
    SqliteRunStorage,
)

COMMAND = "python -m laion_vq.deploy.recover_dead_runs"
#: Run states in which a run worker should be alive.
WORKER_STATUSES = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
#: A live process that started this long after Dagster recorded the pid is another process (pid reused).
PID_REUSE_SLACK_S = 2.0


@dataclass
class Recovered:
    run_id: str
    job_name: str
    partitions: str
    pids: list[int]
    slots: list[str] = field(default_factory=list)  # "pool/step" freed (or to free, in a dry run)
    marked_failed: bool = False
    skipped: str = ""  # why a run named with --run-id was left alone


def _process_start_time(pid: int) -> float | None:
    """When `pid` started (epoch seconds), from /proc; None where /proc is unavailable (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime 22
    if fields[0] == "Z":  # a zombie: dead, only not reaped yet
        return float("inf")
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int, seen_at: float) -> bool:
    """Whether the process Dagster recorded as `pid` at `seen_at` (epoch seconds) still runs here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = _process_start_time(pid)
    return started is None or started <= seen_at + PID_REUSE_SLACK_S


def worker_pids(instance: dg.DagsterInstance, run_id: str) -> dict[int, float]:
    """pid → when Dagster recorded it, from the run's engine events (run worker, in-process executor,
    multiprocess step workers)."""
    pids: dict[int, float] = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = record.dagster_event.event_specific_data if record.dagster_event else None
        value = getattr(data, "metadata", {}).get("pid")
        text = getattr(value, "value", value)
        if isinstance(text, str) and text.isdigit():
            pids.setdefault(int(text), record.timestamp)
    return pids


def _partitions(tags: dict[str, str]) -> str:
    if PARTITION_NAME_TAG in tags:
        return tags[PARTITION_NAME_TAG]
    start, end = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if start and end:
        return start if start == end else f"{start}…{end}"
    return "-"


def held_slots(instance: dg.DagsterInstance) -> dict[str, list[str]]:
    """run id → "pool/step" of every slot it holds or is queued for."""
    storage = instance.event_log_storage
    held: dict[str, list[str]] = {}
    if not storage.supports_global_concurrency_limits:
        return held
    for key in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(key)
        for slot in info.claimed_slots:
            held.setdefault(slot.run_id, []).append(f"{key}/{slot.step_key}")
        for step in info.pending_steps:
            if step.assigned_timestamp is None:  # assigned pending steps are the claimed slots above
                held.setdefault(step.run_id, []).append(f"{key}/{step.step_key} (queued)")
    for run_id in storage.get_concurrency_run_ids():
        held.setdefault(run_id, [])
    return held


def _message(item: Recovered, by: str) -> str:
    pids = ", ".join(str(p) for p in item.pids) or "unknown"
    slots = ", ".join(item.slots) or "none"
    if by == COMMAND:
        whom = f"nothing was watching this run. Marked failed by `{COMMAND}`"
        then = f"Partitions {item.partitions} are not done: materialize them again."
    else:
        whom = f"it never reported its end. Marked failed by {by}"
        then = (
            f"Partitions {item.partitions} are not done: run retries start the run again (what it recorded "
            "stays recorded)."
        )
    return (
        f"Run worker gone: process {pids} on {socket.gethostname()} no longer exists (it was killed — SIGKILL, "
        f"the OOM killer, a closed shell, a restarted daemon or service — or its machine went away) and {whom}, "
        f"which freed its pool slots ({slots}). {then}"
    )


def find_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Runs the default run launcher started whose every recorded worker pid is gone; only reads. Call it
    where that launcher starts workers (the daemon's code server, see the module): their pids are this
    machine's. Shell runs are judged only on a one-machine (SQLite) instance: elsewhere they may run on
    another machine, and are `recover`'s, on that machine."""
    single_machine = isinstance(instance.run_storage, SqliteRunStorage)
    dead = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=WORKER_STATUSES)):
        run = record.dagster_run
        if GRPC_INFO_TAG not in run.tags and not single_machine:
            continue
        pids = worker_pids(instance, run.run_id)
        if pids and not any(process_alive(pid, seen) for pid, seen in pids.items()):
            dead.append(run.run_id)
    return dead


def recover(
    instance: dg.DagsterInstance,
    run_ids: Iterable[str] = (),
    dry_run: bool = False,
    by: str = COMMAND,
) -> list[Recovered]:
    """Fail the dead runs (all judged ones, or only `run_ids`) and free their slots; returns what it did.
    `by` names who did it in the run's failure message (this command, or the sensor)."""
    storage = instance.event_log_storage
    named = list(run_ids)
    single_machine = isinstance(instance.run_storage, SqliteRunStorage)
    held = held_slots(instance)
    done: list[Recovered] = []

    if named:
        records = [r for r in (instance.get_run_record_by_id(run_id) for run_id in named) if r is not None]
        missing = set(named) - {r.dagster_run.run_id for r in records}
        if missing:
            raise SystemExit(f"no such run: {', '.join(sorted(missing))}")
    else:
        records = list(instance.get_run_records(filters=dg.RunsFilter(statuses=WORKER_STATUSES)))

    for record in records:
        run = record.dagster_run
        pids = worker_pids(instance, run.run_id)
        item = Recovered(run.run_id, run.job_name, _partitions(dict(run.tags)), sorted(pids))
        if run.is_finished:
            item.skipped = f"already {run.status.value}"
        elif any(process_alive(pid, seen) for pid, seen in pids.items()):
            item.skipped = "its worker process is alive on this machine"
        elif not named and not pids:
            continue  # no worker recorded yet (or launched elsewhere): nothing to judge
        elif not named and GRPC_INFO_TAG in run.tags and not single_machine:
            continue  # launched by a run launcher on a shared instance: run monitoring's, maybe another host
        if item.skipped:
            if named:
                done.append(item)
            continue
        item.slots = held.pop(run.run_id, [])
        if not dry_run:
            current = instance.get_run_by_id(run.run_id)  # it may have ended since it was read
            if current is None or current.is_finished:
                item.skipped = f"already {current.status.value}" if current else "deleted"
                if named:
                    done.append(item)
                continue
            failure = JobFailureData(error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION)
            instance.report_run_failed(run, _message(item, by), job_failure_data=failure)
            if storage.supports_global_concurrency_limits:
                storage.free_concurrency_slots_for_run(run.run_id)
        item.marked_failed = True
        done.append(item)

    # slots still held by runs that finished (failed by a code server with no run monitoring to free them)
    if held:
        finished = instance.get_run_records(filters=dg.RunsFilter(run_ids=list(held), statuses=FINISHED_STATUSES))
        for record in finished:
            run = record.dagster_run
            if named and run.run_id not in named:
                continue
            slots = held[run.run_id]
            if not slots:
                continue
            if not dry_run:
                storage.free_concurrency_slots_for_run(run.run_id)
            found = next((d for d in done if d.run_id == run.run_id), None)
            if found is None:
                found = Recovered(run.run_id, run.job_name, _partitions(dict(run.tags)), [])
                done.append(found)
            found.slots, found.skipped = slots, ""
    return done


def report(items: list[Recovered], dry_run: bool, echo: Callable[[str], None] = print) -> None:
    marked, freed = ("would mark", "would free") if dry_run else ("marked", "freed")
    if not items:
        echo("no dead runs and no slots held by finished runs")
    for item in items:
        head = f"run {item.run_id} ({item.job_name}, partitions {item.partitions})"
        if item.skipped and not item.slots:
            echo(f"{head}: left alone, {item.skipped}")
            continue
        what = []
        if item.marked_failed:
            pids = ", ".join(str(p) for p in item.pids) or "none recorded"
            what.append(f"worker pid {pids} gone; {marked} FAILURE")
        what.append(f"{freed} {len(item.slots)} slot(s)" + (f": {', '.join(item.slots)}" if item.slots else ""))
        echo(f"{head}: " + "; ".join(what))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Mark FAILURE the runs whose worker process is gone from this machine and free their pool "
        "slots (and slots still held by finished runs). Uses DAGSTER_HOME like the dagster CLI.",
    )
    parser.add_argument(
        "--run-id",
        action="append",
        default=[],
        help="only this run (repeatable); fails it "
        "even if a run launcher started it, unless its worker is alive on this machine",
    )
    parser.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        items = recover(instance, args.run_id, dry_run=args.dry_run)
    report(items, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
