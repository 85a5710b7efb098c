"""Say why a step waits: while a run's step is queued for a pool slot (`download`, `gpu`), name the runs
holding the slots, whether their worker process is alive, and the command that frees a dead one's slot.

Dagster itself logs only `Step blocked by limit for pool download` at DEBUG and waits, forever when the
holder is a shell run that was killed (nothing frees its slot where no daemon watches). The watch runs in a
thread for the run's lifetime (started by the pooled steps' resources, `downloader` and `encoder`); it first looks
after `FIRST_LOOK_S` and then every `INTERVAL_S`, and logs a warning when what it sees changes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import dagster as dg

from laion_vq.deploy.recover_dead_runs import COMMAND, process_alive, worker_pids

FIRST_LOOK_S = 10.0
INTERVAL_S = 20.0


def holder_description(instance: dg.DagsterInstance, run_id: str) -> tuple[str, bool | None]:
    """'run R (job, partition P, STARTED) …' and whether its worker is alive here (None: no pid recorded)."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return f"run {run_id} (no longer in this instance)", False
    partition = run.tags.get("dagster/partition") or run.tags.get("dagster/asset_partition_range_start") or "-"
    pids = worker_pids(instance, run_id)
    if not pids:
        alive: bool | None = None
        state = "no worker process recorded"
    else:
        alive = any(process_alive(pid, seen) for pid, seen in pids.items())
        shown = ", ".join(str(p) for p in sorted(pids))
        state = f"worker process {shown} {'alive' if alive else 'GONE'} on this machine"
    return f"run {run_id} ({run.job_name}, partition {partition}, {run.status.value}; {state})", alive


def blocked_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """One message per pool in which a step of `run_id` waits for a slot that other runs hold."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    messages = []
    for pool in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(pool)
        waiting = sorted(s.step_key for s in info.pending_steps if s.run_id == run_id and s.assigned_timestamp is None)
        holders = sorted({slot.run_id for slot in info.claimed_slots if slot.run_id != run_id})
        if not waiting or not holders:
            continue
        described = [holder_description(instance, holder) for holder in holders]
        lines = [
            f"step {', '.join(waiting)} waits for a `{pool}` pool slot ({len(info.claimed_slots)} of "
            f"{info.slot_count} taken), held by:"
        ]
        lines += [f"  - {text}" for text, _ in described]
        if any(alive is False for _, alive in described):
            home = os.environ.get("DAGSTER_HOME", "")
            lines.append(
                f"A holder's process is gone, so its slot is never freed: `{COMMAND}` (DAGSTER_HOME={home}) fails "
                "that run and frees its slots; this step then starts."
            )
        else:
            lines.append(
                f"This step starts when a holder finishes; `dagster instance concurrency set {pool} N` allows N at "
                f"once. If a holder is stuck, `{COMMAND} --run-id RUN_ID` fails it and frees its slots."
            )
        messages.append("\n".join(lines))
    return messages


class PoolWatch:
    """The watching thread of one run; `stop()` ends it (at the latest after one look)."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str, warn: Callable[[str], None]) -> None:
        self.instance, self.run_id, self.warn = instance, run_id, warn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"pool-watch-{run_id[:8]}", daemon=True)

    def start(self) -> PoolWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        said: list[str] = []
        wait = FIRST_LOOK_S
        while not self._stop.wait(wait):
            wait = INTERVAL_S
            try:
                messages = blocked_messages(self.instance, self.run_id)
            except Exception:  # a diagnostic must never disturb the run it watches
                continue
            if messages and messages != said:
                for message in messages:
                    self.warn(message)
            said = messages
