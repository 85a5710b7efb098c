"""Fault injectors and the invariants checked after them, for `benchmarks/bench_faults.py` and the fault tests.

Every injector touches only what its caller started: processes it holds a `Popen` of (killed by pid or by
their own process group, never by name), a tmpfs it mounted itself, a PostgreSQL cluster it made
(`laion_vq.testing.pg_cluster`), a storage proxy it runs (`laion_vq.testing.storage_faults`).

After the faults, `account_rows`, `leftover_files`, `materializations_per_partition` and `held_slots` say what
a user would check: every metadata row is a code row or a recorded failure exactly once, nothing partial
or temporary is left on storage, no shard was materialized twice, no pool slot is still held.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.schema import REMOVED_STATUS
from laion_vq.shards.storage import TMP_MARKER, StorageLayout, exists, filesystem, read_bytes


def kill(process: subprocess.Popen, group: bool) -> None:
    """SIGKILL `process`, or its whole process group (a service manager stopping a unit, a container or a
    machine going away); waits for it so it is not left a zombie."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(process.pid, signal.SIGKILL)  # also when the leader is gone and members remain
        else:
            process.kill()
    process.wait(30)


def stop_gracefully(process: subprocess.Popen, grace: float = 20) -> None:
    """What a deploy does to a unit: SIGTERM to its process group, SIGKILL after `grace` (systemd's default
    `KillMode=control-group`, Kubernetes' termination grace period)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        kill(process, group=True)


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A real filesystem of `size_bytes` mounted at `path` (root only: `mount -t tmpfs`), so a write past
    it fails with a real ENOSPC; unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


class DiskFiller:
    """Fills the filesystem holding `folder` with one file until writes fail (ENOSPC), and frees it again."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".fault-filler"

    def fill(self, leave_bytes: int = 0) -> int:
        """Write until the disk is full (or only `leave_bytes` free); returns the bytes written."""
        written = 0
        block = b"\0" * (1 << 20)
        with open(self.path, "ab") as f:
            while True:
                free = os.statvfs(self.path.parent).f_bavail * os.statvfs(self.path.parent).f_frsize
                chunk = block if free - leave_bytes >= len(block) else block[: max(0, free - leave_bytes)]
                if not chunk:
                    break
                try:
                    f.write(chunk)
                    f.flush()
                except OSError:
                    break
                written += len(chunk)
        return written

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# what must hold afterwards


@dataclass
class ShardAccount:
    """One shard's rows: metadata, their download statuses, their codes."""

    key: str
    metadata_rows: int
    status_rows: int
    duplicate_keys: int
    code_rows: int
    failures: int  # rows recorded as not downloaded (any status but success/removed)
    removed: int
    undecodable: int

    @property
    def lost(self) -> int:
        """Metadata rows that are neither a code row nor a recorded failure, removal or undecodable image."""
        return self.metadata_rows - self.code_rows - self.failures - self.removed - self.undecodable


def _table(url: str):
    return pq.read_table(io.BytesIO(read_bytes(url))) if exists(url) else None


def account_rows(layout: StorageLayout, model: str, keys: list[str], undecodable: dict[str, int]) -> list[ShardAccount]:
    """Each shard's rows from the files themselves (`undecodable`: the encoder's per-shard count, from the
    shard's code materialization: rows downloaded whose image no decoder could read, recorded there)."""
    accounts = []
    for key in keys:
        shard = parse_shard_key(key)
        metadata, status, codes = (
            _table(layout.metadata_shard(shard)),
            _table(layout.image_status(shard)),
            _table(layout.code_shard(model, shard)),
        )
        statuses = status.column("status").to_pylist() if status is not None else []
        status_keys = status.column("key").to_pylist() if status is not None else []
        counts = Counter(statuses)
        accounts.append(
            ShardAccount(
                key=key,
                metadata_rows=metadata.num_rows if metadata is not None else 0,
                status_rows=len(statuses),
                duplicate_keys=len(status_keys) - len(set(status_keys)),
                code_rows=codes.num_rows if codes is not None else 0,
                failures=len(statuses) - counts["success"] - counts[REMOVED_STATUS],
                removed=counts[REMOVED_STATUS],
                undecodable=undecodable.get(key, 0),
            )
        )
    return accounts


def leftover_files(root: str) -> list[str]:
    """Temporary or partial files under the storage root: our publish's temp names, img2dataset's
    `_tmp` folders and `.tmp`/`.partial` files."""
    fs, path = filesystem(root)
    found = []
    for name in fs.find(path, withdirs=True):
        base = name.rsplit("/", 1)[-1]
        if TMP_MARKER in base or base.endswith((".tmp", ".partial")) or base.startswith("_tmp") or base == "_tmp":
            found.append(name)
    return found


def materializations_per_partition(instance, asset: str, exclude_jobs: tuple[str, ...] = ()) -> Counter:
    """Materializations of each partition of `asset`, leaving out those by `exclude_jobs` (the removal job
    rewrites shards on purpose)."""
    import dagster as dg

    records = instance.fetch_materializations(dg.AssetKey(asset), limit=10_000).records
    jobs: dict[str, str] = {}
    counts: Counter = Counter()
    for record in records:
        if record.run_id not in jobs:
            run = instance.get_run_by_id(record.run_id)
            jobs[record.run_id] = run.job_name if run else ""
        if jobs[record.run_id] not in exclude_jobs:
            counts[record.partition_key] += 1
    return counts


def held_slots(instance) -> list[str]:
    """`pool/run` of every pool slot still claimed."""
    storage = instance.event_log_storage
    return [
        f"{pool}/{slot.run_id}"
        for pool in storage.get_concurrency_keys()
        for slot in storage.get_concurrency_info(pool).claimed_slots
    ]


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    """Poll `check` until it returns something truthy; a TimeoutError names `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not after {timeout:.0f} s")
