"""Is the GPU fed during a whole-graph backfill? Today's behaviour against the fed encoder, same run, by simulation.

For each variant, on a fresh PostgreSQL database and `DAGSTER_HOME` with the production instance
(`deploy/dagster.yaml`): the real `dagster-webserver` and `dagster-daemon` serve this project's code location
with simulated costs (`benchmarks/feeding_sim/location.py`: an encoder priced like an H100 — 15 s to start,
1/3,000 s per image of a 10,000-image shard — and real loopback downloads of tiny shards padded to 100 s),
the UI's `launchPartitionBackfill` backfills the three assets over `--partitions` shards, and the run records
and materializations are read back when the backfill ends:

- `today`: encoder runs encode only the shards the daemon requested (`LAION_VQ_ENCODE_FEED=0`) and the
  instance keeps the former `dagster/backfill` ≤ 20 run limit;
- `fed`: this project's defaults (feeding on, no backfill tag limit).

Simulated durations are divided by `--scale` so the run fits; the report gives them scaled back up (real-scale
seconds) while Dagster's own costs (queue, run start, daemon ticks, PostgreSQL) are as measured, never scaled.
Reported: the delay from the first tar to the first encoder start; encoder runs started and their sizes; the
encoder's fixed costs as a share of its time; its busy share while tars are waiting; the backfill's wall time.

    .venv/bin/python benchmarks/bench_feeding.py --partitions 10000 --scale 60 --download-slots 16
    .venv/bin/python benchmarks/bench_feeding.py --partitions 200 --scale 50 --download-slots 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import BACKFILL_ID_TAG

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from laion_vq.defs.check_state import IMAGES_CHECK  # noqa: E402
from laion_vq.testing.dagster_services import BACKFILL_DONE, dagster_services, postgres_database  # noqa: E402
from laion_vq.testing.image_server import ImageServer  # noqa: E402
from laion_vq.testing.synthetic_metadata import write_parts  # noqa: E402
from laion_vq.vqgan import get_model_config, save_random_checkpoint  # noqa: E402

ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]
CODES, TARS = dg.AssetKey("code_parquets"), dg.AssetKey("image_tars")
ENGINE_START_S, SHARD_ENCODE_S, DOWNLOAD_S = 15.0, 10_000 / 3000, 100.0
WORKSPACE = REPO / "benchmarks" / "feeding_sim" / "workspace.yaml"
VARIANTS = {
    "today": ({"LAION_VQ_ENCODE_FEED": "0"}, {"tag_concurrency_limits": [{"key": "dagster/backfill", "limit": 20}]}),
    "fed": ({"LAION_VQ_ENCODE_FEED": "1"}, {}),
}


def _overrides(runs_extra: dict) -> dict:
    import yaml

    base = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    concurrency = base["concurrency"]
    concurrency["runs"] = {**concurrency["runs"], **runs_extra}
    return {"concurrency": concurrency}


def run_variant(name: str, args, server: ImageServer, checkpoint: str, workdir: Path) -> dict:
    env_extra, runs_extra = VARIANTS[name]
    keys = [f"{i:05d}" for i in range(args.partitions)]
    photos = server.photo_paths()
    meta = workdir / name / "meta"
    write_parts(str(meta), [[server.url(photos[i % len(photos)])] for i in range(args.partitions)], row_group_size=64)
    (workdir / name / "data").mkdir(parents=True)
    env = {
        "LAION_VQ_NUM_SHARDS": str(args.partitions),
        "LAION_VQ_SAMPLES_PER_SHARD": "1",
        "LAION_VQ_STORAGE": str(workdir / name / "data"),
        "LAION_VQ_METADATA": str(meta),
        "LAION_VQ_MODEL": "vqgan_gumbel_f8_tiny",
        "LAION_VQ_CHECKPOINT": checkpoint,
        "LAION_VQ_DEVICE": "cpu",
        "LAION_VQ_PREVIEW_SAMPLES": "0",
        "LAION_VQ_DOWNLOAD_THREADS": "2",
        "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS": f"{server.host}/32",
        "LAION_VQ_ENCODE_FEED_POLL_SECONDS": "1",
        "SIM_SCALE": str(args.scale),
        "MALLOC_ARENA_MAX": "2",
        **env_extra,
    }
    home = workdir / name / "home"
    with (
        postgres_database("bench_feeding") as pg_url,
        dagster_services(
            home, pg_url, env=env, overrides=_overrides(runs_extra), daemon=False, workspace=WORKSPACE
        ) as services,
        services.instance() as instance,
    ):
        instance.event_log_storage.set_concurrency_slots("download", args.download_slots)
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        created = time.time()
        backfill_id = services.launch_backfill(ASSETS, keys)
        with dagster_services(home, pg_url, env=env, webserver=False, workspace=WORKSPACE) as daemon:
            deadline = time.monotonic() + args.timeout_minutes * 60
            while services.backfill(backfill_id).get("status") not in BACKFILL_DONE:
                if time.monotonic() > deadline:
                    print(f"{name}: backfill not finished after {args.timeout_minutes} min; measuring what ran")
                    break
                for proc_name, process in daemon.processes.items():
                    if process.poll() is not None:
                        raise RuntimeError(f"{proc_name} exited:\n{services.log(proc_name)[-3000:]}")
                time.sleep(5)
        status = services.backfill(backfill_id).get("status")
        return _measure(name, instance, backfill_id, created, status, args.scale)


def _measure(name: str, instance, backfill_id: str, created: float, status: str | None, scale: float) -> dict:
    runs = list(instance.get_run_records(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}), ascending=True))
    encoders = [r for r in runs if set(r.dagster_run.asset_selection or []) == {CODES}]
    downloads = [r for r in runs if r not in encoders]

    def materializations(key: dg.AssetKey) -> list[dg.EventLogRecord]:
        out, cursor = [], None
        while True:
            page = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=5000, cursor=cursor)
            out += page.records
            if not page.has_more:
                return out
            cursor = page.cursor

    tars, codes = materializations(TARS), materializations(CODES)
    code_at = sorted(r.timestamp for r in codes)
    per_run = Counter(r.run_id for r in codes)
    started = [r for r in encoders if r.start_time]
    shard_s, engine_sim = SHARD_ENCODE_S / scale, ENGINE_START_S / scale
    # a shard is ready when its tar's blocking check passed (the encoder may not take it before)
    ready_by_key: dict[str, float] = {}
    for record in _check_history(instance, IMAGES_CHECK):
        if record.partition and record.status.value == "SUCCEEDED" and record.event is not None:
            ready_by_key[record.partition] = max(ready_by_key.get(record.partition, 0.0), record.event.timestamp)
    ready_at = sorted(ready_by_key.values())
    # fixed cost of an encoder run: its start to its first shard's encoding (queue pick-up not included:
    # run start, imports, resources, engine start); real scale = Dagster's part as measured + 15 s engine start
    fixed_sim = []
    for record in started:
        mats = [r.timestamp for r in codes if r.run_id == record.dagster_run.run_id]
        end = min(mats) - shard_s if mats else (record.end_time or time.time())
        fixed_sim.append(max(end - record.start_time, 0.0))
    dagster_fixed = [max(f - engine_sim, 0.0) for f in fixed_sim]
    fixed_real = [f + ENGINE_START_S for f in dagster_fixed]
    busy_real = len(codes) * SHARD_ENCODE_S
    # while shards are ready and not encoded, how much of the time is the encoder encoding?
    events = sorted([(t, +1) for t in ready_at] + [(t, -1) for t in code_at])
    waiting_spans, depth, since = [], 0, None
    for t, step in events:
        depth += step
        if depth > 0 and since is None:
            since = t
        elif depth <= 0 and since is not None:
            waiting_spans.append((since, t))
            since = None
    busy_spans = _merge([(t - shard_s, t) for t in code_at])
    waiting_total = sum(b - a for a, b in waiting_spans)
    overlap = sum(max(0.0, min(b, d) - max(a, c)) for a, b in waiting_spans for c, d in busy_spans)
    # real scale: the encoder's busy time scaled up; its idle time while shards wait is Dagster's and our
    # latencies (unscaled) plus the engine starts inside it (scaled up)
    idle_waiting_real = max(waiting_total - overlap, 0.0) + (ENGINE_START_S - engine_sim) * len(started)
    busy_in_waiting_real = overlap * scale
    first_ready = ready_at[0] if ready_at else None
    return {
        "variant": name,
        "status": status,
        "shards encoded": len({r.partition_key for r in codes}),
        "download runs": len(downloads),
        "encoder runs started": len(started),
        "encoder runs cancelled": sum(r.dagster_run.status == dg.DagsterRunStatus.CANCELED for r in encoders),
        "encoder run sizes (largest 12)": sorted(per_run.values(), reverse=True)[:12],
        "first ready → first encoder run start, s": round(min(r.start_time for r in started) - first_ready, 1)
        if started and first_ready
        else None,
        "… + engine start at real scale, s": round(
            min(r.start_time for r in started) - first_ready + dagster_fixed[0] + ENGINE_START_S, 1
        )
        if started and first_ready
        else None,
        "median Dagster fixed cost per encoder run, s": round(statistics.median(dagster_fixed), 1)
        if dagster_fixed
        else None,
        "fixed cost share (real scale)": round(sum(fixed_real) / (sum(fixed_real) + busy_real), 4) if codes else None,
        "busy share while shards wait (simulated)": round(overlap / waiting_total, 3) if waiting_total else None,
        "busy share while shards wait (real scale)": round(
            busy_in_waiting_real / (busy_in_waiting_real + idle_waiting_real), 3
        )
        if waiting_total
        else None,
        "downloads done at, s (simulated)": round(max(r.timestamp for r in tars) - created, 1) if tars else None,
        "wall, s (simulated)": round((code_at[-1] if code_at else time.time()) - created, 1),
        "codes after the last tar, s (simulated)": round(code_at[-1] - max(r.timestamp for r in tars), 1)
        if codes and tars
        else None,
    }


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _check_history(instance, check: dg.AssetCheckKey, page: int = 5000) -> list:
    storage, records, cursor = instance.event_log_storage, [], None
    while True:
        batch = storage.get_asset_check_execution_history(check, limit=page, cursor=cursor)
        records += batch
        if len(batch) < page:
            return records
        cursor = batch[-1].id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, default=200)
    parser.add_argument("--scale", type=float, default=50.0, help="simulated durations divided by this")
    parser.add_argument("--download-slots", type=int, default=4)
    parser.add_argument("--variants", default="today,fed")
    parser.add_argument("--timeout-minutes", type=float, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_feeding_") as tmp, ImageServer() as server:
        workdir = Path(tmp)
        checkpoint = save_random_checkpoint(
            get_model_config("vqgan_gumbel_f8_tiny"), str(workdir / "tiny-random.ckpt"), seed=0
        )
        results = [run_variant(v, args, server, checkpoint, workdir) for v in args.variants.split(",")]
    print(f"\n{args.partitions} partitions, scale 1/{args.scale:g}, {args.download_slots} download slots")
    for key in results[0]:
        print(f"{key:48s} " + " | ".join(str(r[key]) for r in results))


if __name__ == "__main__":
    main()
