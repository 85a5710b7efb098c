"""Download throughput through Celery workers: 1 vs 2 (vs more) `download` workers on this machine.

Real services throughout: a fresh PostgreSQL database, `dagster-webserver` on the production instance
(`deploy/dagster.yaml`, with Dagster's default run coordinator so every launched run starts at once), the
Celery code location (`deploy/celery/workspace.yaml`), RabbitMQ on 127.0.0.1:5672, and `dagster-celery`
workers started as an operator starts them (one step at a time each). For each worker count, `--shards`
`download_shards` runs (one shard of `--samples` loopback photos each) are launched together; their
steps queue on the `download` queue and the workers drain it. Throughput = images downloaded / (last
`image_tars` STEP_SUCCESS − first `image_tars` STEP_START), from the run's event log; the per-shard rate is
each step's own images/s. A warm-up round (1 worker, 1 shard) goes first, uncounted.

On a machine with C cores the ceiling is about min(workers, C) shards at once (a shard's resize loop is
one thread, README "Sizing a download machine"); here the image server, PostgreSQL, RabbitMQ and the
run processes share the same cores.

    .venv/bin/python benchmarks/bench_celery_workers.py                  # 1 vs 2 workers, 6 shards × 200
    .venv/bin/python benchmarks/bench_celery_workers.py --latency 0.2        # latency-bound, like the web
    .venv/bin/python benchmarks/bench_celery_workers.py --workers 1,2,4 --shards 8 --samples 400
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = {"PYTHONWARNINGS": "ignore", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


def measure(services, instance, first_shard: int, shards: int, timeout: float = 900) -> dict[str, float]:
    """Launch `shards` download runs together; the window and images of their image_tars steps."""
    import dagster as dg

    run_ids = [
        services.launch_run("download_shards", {"dagster/partition": f"{first_shard + i:05d}"}) for i in range(shards)
    ]
    for run_id in run_ids:
        status = services.wait_for_run(run_id, timeout=timeout)
        if status != "SUCCESS":
            raise RuntimeError(f"run {run_id} ended {status}:\n{services.log('webserver')[-3000:]}")
    starts, ends, images, rates, workers = [], [], 0, [], set()
    for run_id in run_ids:
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is None or event.step_key != "image_tars":
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                starts.append(entry.timestamp)
            elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                ends.append(entry.timestamp)
            elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                metadata = event.event_specific_data.materialization.metadata
                images += int(metadata["successes"].value)
                rates.append(float(metadata["images_per_second"].value))
            elif event.event_type == dg.DagsterEventType.ENGINE_EVENT:
                worker = (event.engine_event_data.metadata or {}).get("Celery worker")
                if worker is not None:
                    workers.add(worker.value.split("@")[0])
    window = max(ends) - min(starts)
    return {
        "window_s": window,
        "images": images,
        "images_per_s": images / window,
        "per_shard_images_per_s": sum(rates) / len(rates),
        "workers_used": len(workers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2", help="download worker counts to compare, in order")
    parser.add_argument("--shards", type=int, default=6, help="download runs (one shard each) per worker count")
    parser.add_argument("--samples", type=int, default=200, help="images per shard")
    parser.add_argument("--threads", type=int, default=16, help="LAION_VQ_DOWNLOAD_THREADS")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds the server waits before each image (0: loopback speed, CPU-bound shards; "
        "0.2 with 16 threads: ≤ 80 images/s a shard, latency-bound like the web)",
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]

    from laion_vq.testing import dagster_services as services_module
    from laion_vq.testing.celery_workers import (
        BROKER,
        delete_queues,
        rabbitmq_reachable,
        start_worker,
        wait_for_workers,
    )
    from laion_vq.testing.image_server import ImageServer
    from laion_vq.testing.synthetic_metadata import write_parts

    if unreachable := rabbitmq_reachable():
        raise SystemExit(unreachable)
    print(
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; {args.shards} shards × "
        f"{args.samples} loopback photos per worker count, {args.threads} threads per shard, "
        f"{args.latency} s server latency"
    )
    prefix = f"lvqbench{uuid.uuid4().hex[:6]}."
    total_shards = 1 + args.shards * len(counts)
    services_module.WORKSPACE = REPO / "deploy" / "celery" / "workspace.yaml"
    with tempfile.TemporaryDirectory() as tmp, ImageServer(slow_delay_s=args.latency) as server:
        photos = server.photo_paths()
        if args.latency:  # /slow/<name>: the photo after `latency` seconds
            photos = [p.replace("/img/", "/slow/") for p in photos]
        urls = [[server.url(photos[(s + i) % len(photos)]) for i in range(args.samples)] for s in range(total_shards)]
        write_parts(f"{tmp}/meta", urls, row_group_size=max(2, args.samples // 4))
        env = {
            **QUIET,
            "LAION_VQ_STORAGE": f"{tmp}/data",
            "LAION_VQ_METADATA": f"{tmp}/meta",
            "LAION_VQ_NUM_SHARDS": str(total_shards),
            "LAION_VQ_SAMPLES_PER_SHARD": str(args.samples),
            "LAION_VQ_DOWNLOAD_THREADS": str(args.threads),
            "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS": "127.0.0.1/32",
            "LAION_VQ_CELERY_BROKER": BROKER,
            "LAION_VQ_CELERY_QUEUE_PREFIX": prefix,
        }
        overrides = {"run_coordinator": {"module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator"}}
        home = Path(tmp) / "home"
        workers = []
        try:
            with (
                services_module.postgres_database("laion_vq_bench") as pg_url,
                services_module.dagster_services(home, pg_url, env=env, overrides=overrides, daemon=False) as services,
                services.instance() as instance,
            ):
                instance.event_log_storage.set_concurrency_slots("download", 64)
                worker_env = {**env, "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": pg_url}
                next_shard, results = 0, list[tuple[int, dict[str, float]]]()
                for label, count, shards in [("warm-up", 1, 1)] + [(f"{c} worker(s)", c, args.shards) for c in counts]:
                    workers = [
                        start_worker(
                            f"bench{len(results)}w{i}", [prefix + "download"], worker_env, Path(tmp) / "workers"
                        )
                        for i in range(count)
                    ]
                    wait_for_workers(workers)
                    started = time.perf_counter()
                    row = measure(services, instance, next_shard, shards)
                    next_shard += shards
                    for worker in workers:
                        worker.stop()
                    workers = []
                    print(
                        f"  {label:12s} {row['images']:5d} images in {row['window_s']:6.1f} s: "
                        f"{row['images_per_s']:6.1f} images/s (per shard {row['per_shard_images_per_s']:5.1f}; "
                        f"{row['workers_used']} worker(s) used; wall {time.perf_counter() - started:.0f} s; "
                        f"load average {os.getloadavg()[0]:.1f})"
                    )
                    if label != "warm-up":
                        results.append((count, row))
                base = results[0][1]["images_per_s"]
                for count, row in results:
                    print(
                        f"{count} download worker(s): {row['images_per_s']:.1f} images/s, "
                        f"{row['images_per_s'] / base:.2f}× {results[0][0]} worker(s)"
                    )
        finally:
            for worker in workers:
                worker.stop()
            delete_queues([prefix + "download", prefix + "gpu"])


if __name__ == "__main__":
    main()
