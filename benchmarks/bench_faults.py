"""The faults a days-long backfill meets, injected into a real one: what is survived, how fast, what is lost.

One whole-graph backfill (`raw_metadata_shards` → `image_tars` → `code_parquets`) of `--partitions` shards,
launched through the UI's own mutation on the production instance (`deploy/dagster.yaml`): a throwaway
PostgreSQL cluster of its own (`laion_vq.testing.pg_cluster`, never the machine's server), `dagster-webserver`
and `dagster-daemon` as a service manager runs them (each its own process group; the daemon's code server and
the run workers of the default run launcher are in the daemon's group), the loopback image server, the tiny
f8 model on the CPU, the storage root and `$DAGSTER_HOME` each on a small tmpfs of their own (a real ENOSPC).

A Jepsen-style schedule injects one fault at each milestone (share of tars landed), each at a moment with
work in flight (a download run STARTED; the fed encoder run STARTED once it exists):

1. `postgres`: the instance's PostgreSQL crashed (`pg_ctl stop -m immediate`), down 10 s, started again;
2. `daemon`: the daemon process alone SIGKILLed, started again 5 s later;
3. `webserver`: SIGKILLed with its group while the UI launches the backfill (before the schedule), and
   again mid-backfill, started again each time;
4. `machine`: every process of the deployment SIGKILLed at once (webserver, daemon, code servers, run
   workers) and PostgreSQL crashed, then all started again with the README's commands;
5. `storage-full`: the storage root's filesystem filled to the last byte for 20 s, then freed;
6. `home-full`: `$DAGSTER_HOME`'s filesystem filled for 20 s, then freed;
7. `stalled-host`: the metadata of two shards (two download runs past this milestone) points every URL at a host that
   drips one byte per half second: the shards must still end, their rows recorded as failures;
8. `removal`: a removal list lands under `removals/` naming an URL of an encoded shard and one of a shard
   not downloaded yet;
9. `deploy`: a new version of the code location (the workspace's module changed) deployed as a service
   manager deploys: SIGTERM to the daemon's and webserver's groups (SIGKILL after 20 s), started again.

With `--storage s3` the storage root is an S3 bucket on moto's server behind the fault-injecting proxy
(`laion_vq.testing.storage_faults`), and `s3` replaces `storage-full` in the schedule: for `--s3-fault-s`
seconds a quarter of all requests get 503 SlowDown, a tenth 500 InternalError, one in twenty a reset connection,
and two reads stall past the read timeout.

After the schedule: the backfill must end COMPLETED_SUCCESS; where a fault stopped it (a full disk fails the
shards it could not write, naming the path), the runner runs the one command the failure names
(`python -m laion_vq.deploy.retry_backfill`) and waits for that backfill. Then it checks what a user would:
every metadata row is a code row or a recorded failure exactly once, no temporary or partial file is left,
every shard's checks pass and are current, no shard materialized twice outside the removal job, no pool slot
held, no listed URL left in a code parquet. Prints one table row per fault. Root only (tmpfs mounts).

    .venv/bin/python benchmarks/bench_faults.py --partitions 120
    .venv/bin/python benchmarks/bench_faults.py --partitions 120 --storage s3
    .venv/bin/python benchmarks/bench_faults.py --partitions 24 --faults postgres,daemon   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from laion_vq.defs.check_state import IMAGES_CHECK, SHARD_CHECK_KEYS, latest_results  # noqa: E402
from laion_vq.deploy.retry_backfill import resume  # noqa: E402
from laion_vq.shards.storage import StorageLayout, filesystem, publish_bytes  # noqa: E402
from laion_vq.testing.aws import moto_aws  # noqa: E402
from laion_vq.testing.dagster_services import dagster_services  # noqa: E402
from laion_vq.testing.faults import (  # noqa: E402
    DiskFiller,
    account_rows,
    held_slots,
    kill,
    leftover_files,
    materializations_per_partition,
    stop_gracefully,
    tmpfs,
    wait_for,
)
from laion_vq.testing.hostile_server import HostileServer  # noqa: E402
from laion_vq.testing.image_server import ImageServer  # noqa: E402
from laion_vq.testing.pg_cluster import pg_cluster  # noqa: E402
from laion_vq.testing.storage_faults import StorageFaultProxy  # noqa: E402
from laion_vq.testing.synthetic_metadata import write_parts  # noqa: E402
from laion_vq.vqgan import get_model_config, save_random_checkpoint  # noqa: E402

ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]
TARS, CODES = dg.AssetKey("image_tars"), dg.AssetKey("code_parquets")
MODEL = "vqgan_gumbel_f8_tiny"
S3_BUCKET = "laion-faults"
SCHEDULE = {  # fault → share of tars landed when it is injected
    "postgres": 0.10,
    "daemon": 0.18,
    "webserver": 0.26,
    "machine": 0.34,
    "storage-full": 0.42,
    "s3": 0.42,  # --storage s3 only
    "home-full": 0.50,
    "removal": 0.58,
    "stalled-host": 0.66,
    "deploy": 0.74,
}
LOCATION = """# the code location as deployed: `laion_vq.definitions`, version {version}
from laion_vq.definitions import defs

DEPLOYED_VERSION = "{version}"
"""


@dataclass
class Outcome:
    fault: str
    when: str = ""
    healed: str = "yes"  # or the command a human ran
    recover_s: float | None = None
    notes: list[str] = field(default_factory=list)


class Harness:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args, self.root = args, root
        self.keys = [f"{i:05d}" for i in range(args.partitions)]
        self.outcomes: list[Outcome] = []
        self.backfills: list[str] = []

    # -- progress -----------------------------------------------------------------------------------------------

    def tars(self, instance) -> int:
        return len(instance.get_materialized_partitions(TARS))

    def codes(self, instance) -> int:
        return len(instance.get_materialized_partitions(CODES))

    def running(self, instance, encoder: bool) -> list[dg.DagsterRun]:
        runs = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        return [r for r in runs if (set(r.asset_selection or []) == {CODES}) == encoder]

    def in_flight(self, instance) -> bool:
        """A download run and the fed encoder run are both working."""
        return bool(self.running(instance, encoder=False)) and bool(self.running(instance, encoder=True))

    def progressed_after(self, instance, since: float) -> bool:
        """A tar or a code shard materialized after `since` (epoch seconds)."""
        for key in (TARS, CODES):
            records = instance.fetch_materializations(key, limit=1, ascending=False).records
            if records and records[0].timestamp > since:
                return True
        return False

    def when(self, instance) -> str:
        runs = len(self.running(instance, False)), len(self.running(instance, True))
        return (
            f"{self.tars(instance)}/{len(self.keys)} tars, {self.codes(instance)} codes; "
            f"{runs[0]} download + {runs[1]} encoder run(s) working"
        )

    # -- the schedule -------------------------------------------------------------------------------------------

    def run(self) -> int:
        args, root = self.args, self.root
        with (
            tmpfs(root / "storage", args.storage_mb << 20) as storage,
            tmpfs(root / "home", args.home_mb << 20) as home,
            pg_cluster("dagster") as cluster,
            ImageServer(slow_delay_s=args.slow_s) as images,
            HostileServer(drip_interval_s=0.5, stall_s=600) as hostile,
            contextlib.ExitStack() as stack,
        ):
            self.cluster, self.storage, self.home = cluster, storage, home
            env = self.prepare(images, hostile)
            if args.storage == "s3":  # moto behind the fault proxy; this process reads moto directly
                logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
                aws = stack.enter_context(moto_aws())
                self.proxy = stack.enter_context(StorageFaultProxy(aws["AWS_ENDPOINT_URL"], stall_s=40))
                import boto3  # type: ignore[import-untyped]

                boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"]).create_bucket(Bucket=S3_BUCKET)
                self.layout = StorageLayout(f"s3://{S3_BUCKET}/data")
                env.update(aws, AWS_ENDPOINT_URL=self.proxy.url, LAION_VQ_STORAGE=self.layout.root)
            with dagster_services(home, cluster.url, env=env, workspace=home / "workspace.yaml") as services:
                self.services = services
                with services.instance() as instance:
                    instance.event_log_storage.set_concurrency_slots("download", args.download_slots)
                    instance.event_log_storage.set_concurrency_slots("gpu", 1)
                    self.launch_while_webserver_dies(instance)
                    for fault, share in SCHEDULE.items():
                        if fault in self.selected:
                            self.inject(instance, fault, share)
                    self.finish(instance)
                    return self.verify(instance)

    def prepare(self, images: ImageServer, hostile: HostileServer) -> dict[str, str]:
        args, root = self.args, self.root
        photos = images.photo_paths()
        # two download runs past the milestone: not downloaded yet when the fault is "injected" (its run starts)
        first = min(int(args.partitions * SCHEDULE["stalled-host"]) + 2 * args.shards_per_run, args.partitions - 3)
        stalled = (first, first + 1)
        self.stalled = {f"{s:05d}" for s in stalled} if "stalled-host" in self.selected else set()
        urls = []
        for s in range(args.partitions):
            if f"{s:05d}" in self.stalled:
                urls.append([hostile.url(f"/drip.jpg?s={s}&i={i}") for i in range(args.samples)])
            else:
                shard = [images.url(f"{photos[(s + i) % len(photos)]}?s={s}&i={i}") for i in range(args.samples - 1)]
                urls.append([*shard, images.url(f"/slow/{s}.jpg")])  # paces the downloads
        self.urls = urls
        write_parts(str(root / "meta"), urls, row_group_size=args.samples)
        checkpoint = save_random_checkpoint(get_model_config(MODEL), str(root / "tiny.ckpt"), seed=0)
        self.write_location("v1")
        (self.home / "workspace.yaml").write_text(
            f"load_from:\n  - python_file:\n      relative_path: {self.home / 'location.py'}\n"
            f"      location_name: laion_vq\n      working_directory: {REPO}\n"
        )
        self.layout = StorageLayout(str(self.storage / "data"))
        self.scratch = self.storage / "scratch"
        self.scratch.mkdir()
        return {
            "LAION_VQ_NUM_SHARDS": str(args.partitions),
            "LAION_VQ_SAMPLES_PER_SHARD": str(args.samples),
            "LAION_VQ_STORAGE": self.layout.root,
            "LAION_VQ_METADATA": str(root / "meta"),
            "LAION_VQ_MODEL": MODEL,
            "LAION_VQ_CHECKPOINT": checkpoint,
            "LAION_VQ_DEVICE": "cpu",
            "LAION_VQ_ENCODE_BATCH_SIZE": "8",
            "LAION_VQ_PREVIEW_SAMPLES": "0",
            "LAION_VQ_DOWNLOAD_THREADS": "8",
            "LAION_VQ_DOWNLOAD_TIMEOUT": "5",
            "LAION_VQ_DOWNLOAD_DEADLINE": "10",
            "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS": f"{images.host}/32",
            "LAION_VQ_DOWNLOAD_SHARDS_PER_RUN": str(args.shards_per_run),
            "LAION_VQ_ENCODE_FEED_POLL_SECONDS": "2",
            "TMPDIR": str(self.scratch),  # the download scratch on the same (fillable) disk
        }

    def write_location(self, version: str) -> None:
        (self.home / "location.py").write_text(LOCATION.format(version=version))

    @property
    def selected(self) -> set[str]:
        if self.args.faults != "all":
            return set(self.args.faults.split(","))
        local_only, s3_only = {"storage-full"}, {"s3"}
        return set(SCHEDULE) - (local_only if self.args.storage == "s3" else s3_only)

    def launch_while_webserver_dies(self, instance) -> None:
        """The UI's launch mutation in flight when the webserver is SIGKILLed; the user clicks again only if
        no backfill was made."""
        services = self.services
        outcome = Outcome("webserver (launching)")
        result: list[object] = []

        def launch() -> None:
            try:
                result.append(services.launch_backfill(ASSETS, self.keys))
            except Exception as err:  # the UI shows the error
                result.append(err)

        thread = threading.Thread(target=launch)
        start = time.time()
        if "webserver" in self.selected:
            thread.start()
            time.sleep(self.args.launch_kill_after)
            kill(services.processes["webserver"], group=True)
            thread.join(60)
            services.start_process("webserver")
            made = instance.get_backfills()
            outcome.when = f"{self.args.launch_kill_after:.2f} s into the launch mutation"
            if made:
                outcome.notes.append(f"the backfill was made before the kill ({len(made)} backfill)")
                self.backfills.append(made[0].backfill_id)
            else:
                outcome.healed = "click Launch again (the UI showed the error)"
                outcome.notes.append(f"no backfill was made: {result[0] if result else 'no answer'}")
                self.backfills.append(services.launch_backfill(ASSETS, self.keys))
            outcome.recover_s = time.time() - start
            self.outcomes.append(outcome)
        else:
            self.backfills.append(services.launch_backfill(ASSETS, self.keys))
        assert len(instance.get_backfills()) == 1, "a second backfill was made"

    def inject(self, instance, fault: str, share: float) -> None:
        target = max(1, int(share * len(self.keys)))
        try:
            wait_for(
                f"{target} tars with work in flight before `{fault}`",
                lambda: self.tars(instance) >= target and self.in_flight(instance),
                timeout=self.args.wait_s,
            )
        except TimeoutError as err:
            self.outcomes.append(Outcome(fault, when=f"not injected: {err}", healed="-"))
            return
        outcome = Outcome(fault, when=self.when(instance))
        print(f"[{time.strftime('%H:%M:%S')}] {fault}: {outcome.when}", flush=True)
        started = time.time()
        lifted = getattr(self, "fault_" + fault.replace("-", "_"))(instance, outcome)
        try:
            wait_for(f"progress after `{fault}`", lambda: self.progressed_after(instance, lifted), self.args.wait_s, 2)
            outcome.recover_s = time.time() - started
        except TimeoutError:
            outcome.healed = "no progress"
        self.outcomes.append(outcome)
        print(f"    progress again after {outcome.recover_s} s; {'; '.join(outcome.notes)}", flush=True)

    # -- the faults (each returns when the fault was lifted, epoch seconds) -------------------------------------

    def fault_postgres(self, instance, outcome: Outcome) -> float:
        self.cluster.stop("immediate")
        time.sleep(10)
        self.cluster.start()
        return time.time()

    def fault_daemon(self, instance, outcome: Outcome) -> float:
        kill(self.services.processes["daemon"], group=False)
        time.sleep(5)
        self.services.start_process("daemon")
        return time.time()

    def fault_webserver(self, instance, outcome: Outcome) -> float:
        kill(self.services.processes["webserver"], group=True)
        time.sleep(5)
        self.services.start_process("webserver")
        return time.time()

    def _dead_runs_failed(self, instance, before: list[dg.DagsterRun], outcome: Outcome) -> None:
        start = time.time()
        ids = [r.run_id for r in before]
        if not ids:
            return
        wait_for(
            "the runs whose workers died to be failed",
            lambda: all((r := instance.get_run_by_id(i)) and r.is_finished for i in ids),
            timeout=self.args.wait_s,
            every=2,
        )
        statuses = [instance.get_run_by_id(i).status.value for i in ids]
        took = time.time() - start
        outcome.notes.append(f"{len(ids)} run(s) whose workers died ended {statuses} {took:.0f} s after the restart")

    def fault_machine(self, instance, outcome: Outcome) -> float:
        working = self.running(instance, False) + self.running(instance, True)
        for process in self.services.started:  # every group, older ones' survivors included
            kill(process, group=True)
        self.cluster.stop("immediate")
        time.sleep(5)
        self.cluster.start()
        for name in ("daemon", "webserver"):  # README: `dagster-daemon run`, `dagster-webserver`
            self.services.start_process(name)
        lifted = time.time()
        self._dead_runs_failed(instance, working, outcome)
        return lifted

    def _fill(self, folder: Path, outcome: Outcome, hold_s: float = 20) -> float:
        filler = DiskFiller(folder)
        written = filler.fill()
        outcome.notes.append(f"filled {written >> 20} MB")
        time.sleep(hold_s)
        filler.release()
        return time.time()

    def fault_storage_full(self, instance, outcome: Outcome) -> float:
        return self._fill(self.storage, outcome)

    def fault_home_full(self, instance, outcome: Outcome) -> float:
        return self._fill(self.home, outcome)

    def fault_removal(self, instance, outcome: Outcome) -> float:
        encoded = sorted(instance.get_materialized_partitions(CODES))[0]
        pending = self.keys[-1]
        self.listed = [self.urls[int(encoded)][0], self.urls[int(pending)][0]]
        rows = "".join(f"{url},,,,,fault test takedown,2026-12-07\n" for url in self.listed)
        header = "url,domain,sample_id,key,image_sha256,reason,date\n"
        publish_bytes((header + rows).encode(), f"{self.layout.root}/removals/takedown.csv")  # whole, or not at all
        outcome.notes.append(f"listed a URL of encoded shard {encoded} and of pending shard {pending}")
        return time.time()

    def fault_s3(self, instance, outcome: Outcome) -> float:
        """Object storage misbehaving for `--s3-fault-s` seconds: SlowDown, 500s, resets on any request, a few
        reads stalled past the read timeout; then healthy again."""
        proxy = self.proxy
        proxy.reset_counts()
        proxy.inject("stall", on="read", times=2)
        proxy.inject("slow_down", on="any", probability=0.25, seed=1)
        proxy.inject("internal_error", on="any", probability=0.1, seed=2)
        proxy.inject("reset", on="any", probability=0.05, seed=3)
        time.sleep(self.args.s3_fault_s)
        proxy.clear()
        faults = {kind: proxy.injected_count(kind) for kind in ("slow_down", "internal_error", "reset", "stall")}
        outcome.notes.append(
            f"{sum(faults.values())} faults injected in {self.args.s3_fault_s:.0f} s ({faults}) among "
            f"{sum(proxy.forwarded.values())} requests forwarded"
        )
        return time.time()

    def fault_stalled_host(self, instance, outcome: Outcome) -> float:
        """Lifted when the stalled shards' tars land: the time to recover is how long the drip held them."""
        wait_for(
            "the stalled shards' tars",
            lambda: self.stalled <= set(instance.get_materialized_partitions(TARS)),
            self.args.wait_s,
            2,
        )
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=TARS, asset_partitions=sorted(self.stalled)), limit=10
        ).records
        run = instance.get_run_record_by_id(records[0].run_id)
        took = (run.end_time or time.time()) - (run.start_time or time.time()) if run else 0.0
        outcome.notes.append(
            f"shards {sorted(self.stalled)}: every URL drips one byte per 0.5 s; their download run took {took:.0f} s, "
            "each image cut at LAION_VQ_DOWNLOAD_DEADLINE (10 s here) and recorded as a failure"
        )
        return time.time()

    def fault_deploy(self, instance, outcome: Outcome) -> float:
        working = self.running(instance, False) + self.running(instance, True)
        self.write_location("v2")
        for name in ("webserver", "daemon"):
            stop_gracefully(self.services.processes[name])
        for name in ("daemon", "webserver"):
            self.services.start_process(name)
        lifted = time.time()
        self._dead_runs_failed(instance, working, outcome)
        return lifted

    # -- the end ------------------------------------------------------------------------------------------------

    def finish(self, instance) -> None:
        services = self.services
        status = services.wait_for_backfill(self.backfills[-1], timeout=self.args.wait_s * 6)
        print(f"[{time.strftime('%H:%M:%S')}] backfill {self.backfills[-1]}: {status}", flush=True)
        while status != "COMPLETED_SUCCESS" and len(self.backfills) < 3:
            # the one command a stopped backfill's failure names: retry the failed partitions, audit the unchecked
            new, audit_run, shards = resume(instance, self.backfills[-1], services.url)
            self.backfills.append(new)
            self.human = f"`python -m laion_vq.deploy.retry_backfill {self.backfills[-2][:8]}…`"
            status = services.wait_for_backfill(new, timeout=self.args.wait_s * 3)
            print(f"[{time.strftime('%H:%M:%S')}] retry backfill {new}: {status}", flush=True)
            if audit_run:
                audited = services.wait_for_run(audit_run, timeout=self.args.wait_s)
                print(f"[{time.strftime('%H:%M:%S')}] audit of {len(shards)} unchecked shard(s): {audited}", flush=True)
        self.final_status = status
        # a backfill completes when its partitions are materialized; duplicates still queued then run or are
        # cancelled, and re-check what they planned: the end state is after them
        unfinished = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
        wait_for(
            "the runs left after the backfill",
            lambda: not instance.get_runs(dg.RunsFilter(statuses=unfinished)),
            self.args.wait_s,
            2,
        )
        # let the removal sensor (every 60 s) apply the list if it has not yet
        if "removal" in self.selected:
            wait_for("the removal job", lambda: self.removal_applied(instance), self.args.wait_s, 5)

    def removal_applied(self, instance) -> bool:
        runs = instance.get_runs(dg.RunsFilter(job_name="apply_removals"))
        return bool(runs) and all(r.is_finished for r in runs) and not self.listed_left()

    def listed_left(self) -> list[str]:
        import pyarrow.parquet as pq

        left = []
        fs, folder = filesystem(self.layout.codes_dir(MODEL))
        for path in fs.glob(f"{folder}/*.parquet"):
            with fs.open(path, "rb") as f:
                urls = set(pq.read_table(f, columns=["url"]).column("url").to_pylist())
            left += [u for u in self.listed if u in urls]
        return left

    def verify(self, instance) -> int:
        undecodable = {}
        for record in instance.fetch_materializations(CODES, limit=10_000).records:
            value = record.asset_materialization.metadata.get("undecodable")
            undecodable[record.partition_key] = int(value.value) if value is not None else 0
        accounts = account_rows(self.layout, MODEL, self.keys, undecodable)
        lost = sum(a.lost for a in accounts)
        duplicated_keys = sum(a.duplicate_keys for a in accounts)
        broken = leftover_files(self.layout.root)
        dupes = {
            asset: {
                k: n for k, n in materializations_per_partition(instance, asset, ("apply_removals",)).items() if n > 1
            }
            for asset in ("image_tars", "code_parquets")
        }
        failing = {}
        for check in SHARD_CHECK_KEYS:
            results = latest_results(instance, check, self.keys)
            # a stalled host's shards warn (a low success rate: reported, not corruption), as they should
            expected = self.stalled if check == IMAGES_CHECK else set()
            bad = [
                r.shard
                for r in results
                if not (r.passed and r.current) and not (r.shard in expected and r.severity == "WARN")
            ]
            missing = set(self.keys) - {r.shard for r in results}
            if bad or missing:
                failing[check.to_user_string()] = (bad[:5], sorted(missing)[:5])
        for asset, counts in dupes.items():  # who materialized a shard twice
            for shard in list(counts)[:3]:
                records = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[shard]), limit=5
                ).records
                runs = [(r.run_id[:8], instance.get_run_by_id(r.run_id).job_name) for r in records]
                print(f"  {asset} {shard} materialized twice, by {runs}")
        for name, (failed_shards, unchecked) in failing.items():  # where a shard's check went
            for shard in (unchecked or failed_shards)[:2]:
                records = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey(name.split(":")[0]), asset_partitions=[shard]), limit=5
                ).records
                runs = [(r.run_id[:8], instance.get_run_by_id(r.run_id).status.value) for r in records]
                print(f"  {name} {shard}: materialized by {runs}")
            if self.args.verbose and records:
                for entry in instance.all_logs(records[0].run_id):
                    text = entry.message or (entry.dagster_event.message if entry.dagster_event else "") or ""
                    kind = entry.dagster_event.event_type_value if entry.dagster_event else "log"
                    print(f"    {time.strftime('%H:%M:%S', time.localtime(entry.timestamp))} {kind} {text[:200]}")
        # what ended runs FAILURE, and whether run retries took them (a dead worker: yes; a full disk: no, by design)
        failed_runs = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        retried = {r.parent_run_id for r in instance.get_runs() if r.parent_run_id}
        reasons: Counter = Counter()
        for run in failed_runs:
            reason = run.tags.get("dagster/failure_reason", "?")
            reasons[f"{reason}, {'retried' if run.run_id in retried else 'not retried'}"] += 1
        print(f"runs ended FAILURE: {len(failed_runs)} ({dict(reasons)})")
        slots = held_slots(instance)
        rows = sum(a.metadata_rows for a in accounts)
        print()
        print(
            f"backfill(s) {', '.join(b[:8] for b in self.backfills)}: {self.final_status}; {rows} metadata rows = "
            f"{sum(a.code_rows for a in accounts)} codes + {sum(a.failures for a in accounts)} recorded failures + "
            f"{sum(a.removed for a in accounts)} removed + {sum(a.undecodable for a in accounts)} undecodable; "
            f"lost {lost}"
        )
        print(
            f"temporary/partial files left: {broken[:5] or 0}; duplicate status keys {duplicated_keys}; "
            f"partitions materialized twice (not by removals): {dupes}; checks not passing: {failing or 'none'}; "
            f"slots held: {slots or 0}"
        )
        if "removal" in self.selected:
            print(f"listed URLs still in code parquets: {self.listed_left() or 'none'}")
        human = getattr(self, "human", None)
        print()
        print(
            "| fault | injected when | recovered without a human | time to recover | rows lost | broken files | "
            "duplicate materializations | slots leaked |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for o in self.outcomes:
            healed = o.healed
            if human and o.fault in ("storage-full", "home-full") and healed == "yes":
                healed = f"yes, or {human} where its shards failed"
            seconds = f"{o.recover_s:.0f} s" if o.recover_s is not None else "-"
            print(
                f"| {o.fault} | {o.when} | {healed} | {seconds} | {lost} | {len(broken)} | "
                f"{sum(len(d) for d in dupes.values())} | {len(slots)} |"
            )
        for o in self.outcomes:
            if o.notes:
                print(f"- {o.fault}: {'; '.join(o.notes)}")
        ok = (
            self.final_status == "COMPLETED_SUCCESS"
            and lost == 0
            and not broken
            and not slots
            and not failing
            and not any(dupes.values())
            and duplicated_keys == 0
        )
        print("\nALL HELD" if ok else "\nSOMETHING BROKE (see above)")
        return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=120)
    parser.add_argument("--samples", type=int, default=4, help="images per shard")
    parser.add_argument("--shards-per-run", type=int, default=4, help="shards per download run")
    parser.add_argument("--download-slots", type=int, default=2)
    parser.add_argument("--slow-s", type=float, default=3.0, help="one image per shard answers this late")
    parser.add_argument("--storage", choices=["local", "s3"], default="local", help="s3: moto behind the fault proxy")
    parser.add_argument("--s3-fault-s", type=float, default=30, help="how long object storage misbehaves")
    parser.add_argument("--faults", default="all", help=f"comma list of {', '.join(SCHEDULE)}, or all")
    parser.add_argument("--storage-mb", type=int, default=256)
    parser.add_argument("--home-mb", type=int, default=128)
    parser.add_argument("--launch-kill-after", type=float, default=0.05)
    parser.add_argument("--wait-s", type=float, default=600)
    parser.add_argument("--verbose", action="store_true", help="print the log of a run whose shard failed a check")
    args = parser.parse_args()

    # stopped by `kill`/`timeout` (SIGTERM), unwind like Ctrl-C: every server, process, mount and cluster the
    # runner started is stopped by its context manager
    def stop(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM (from `timeout`) must not cut the unwinding
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="laion_vq_faults_") as root:
        return Harness(args, Path(root)).run()


if __name__ == "__main__":
    sys.exit(main())
