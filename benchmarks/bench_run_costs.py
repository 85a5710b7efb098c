"""Fixed cost of a run, and the shards per run that keep it ≤ 2 % of the run (LAION_VQ_*_SHARDS_PER_RUN).

Measured here, with real services:

1. Run start through the daemon: a fresh PostgreSQL database, `dagster-daemon` + `dagster-webserver` on
   `deploy/dagster.yaml` (queued run coordinator, default run launcher, in-process executor), `--runs`
   launches of the `download_shards` job (GraphQL `launchRun`, as the UI does) on a 2-image shard from the
   loopback ImageServer, one after another, after `--warmup` uncounted ones. From the run's event log:
   launch → RUN_STARTING (daemon dequeues, code server spawns the worker) → RUN_START (worker process,
   imports, definitions load) → first STEP_START (executor, resource init) → last STEP_SUCCESS (step
   work) → RUN_SUCCESS (end).
2. In fresh processes, the same code as a run worker: `import laion_vq.definitions`, then the step's lazy
   imports (img2dataset for a download step; torch + the VQGAN for an encoder step), and for the encoder
   `VQGANEncoderResource.load()` (the full `vqgan_gumbel_f8`, a random checkpoint in the real file format)
   and `load_decoder()` (previews of each run's first shard), on CPU; the first with the checkpoint
   dropped from the page cache, then warm.

Not measurable here (no GPU), taken as parameters and printed as assumptions: CUDA init + weights to the
GPU (`--gpu-init-s`) and `torch.compile` (`--compile-s`: 5 s with a warm inductor cache, ~60 s cold).

Cost model, per run of N shards: fixed cost F = launch→first step + end + lazy imports (+ model and
decoder load + GPU init + compile for the encoder); a shard takes T = samples_per_shard / rate. The fixed
share F / (F + N·T) ≤ s ⇔ N ≥ F·(1 − s) / (s·T) = 49·F/T at s = 2 %.

    .venv/bin/python benchmarks/bench_run_costs.py                     # 3 runs + 1 warm-up, 3 model loads
    .venv/bin/python benchmarks/bench_run_costs.py --runs 5 --encode-rate 2500 --compile-s 60
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # at run time imported where used: the probes time what importing costs
    import dagster as dg

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
QUIET = {"PYTHONWARNINGS": "ignore", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


def probe(mode: str, checkpoint: str) -> None:
    """In a fresh process: what a run worker of `mode` pays once (seconds, as JSON on stdout)."""
    t = time.perf_counter()
    import laion_vq.definitions  # noqa: F401

    out = {"definitions_s": time.perf_counter() - t}
    t = time.perf_counter()
    if mode == "download":
        from img2dataset import downloader, resizer, writer  # noqa: F401  (the download stage's lazy import)

        out["imports_s"] = time.perf_counter() - t
    else:
        import torch  # noqa: F401

        from laion_vq.defs.resources import VQGANEncoderResource

        out["imports_s"] = time.perf_counter() - t
        encoder = VQGANEncoderResource(checkpoint=checkpoint, device="cpu")
        t = time.perf_counter()
        encoder.load()
        out["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        encoder.load_decoder()
        out["decoder_s"] = time.perf_counter() - t
    print(json.dumps(out))


def run_probe(mode: str, checkpoint: str, cold: bool) -> dict[str, float]:
    if cold:  # drop the checkpoint from the page cache (no root needed for the file's own pages)
        fd = os.open(checkpoint, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    cmd = [sys.executable, __file__, "--probe", mode, "--checkpoint", checkpoint]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **QUIET}, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"probe {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 600) -> T:
    """The first truthy value `check` returns (polled every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return value


def _finished_run(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    run = instance.get_run_by_id(run_id)
    return run if run is not None and run.is_finished else None


def measure_runs(runs: int, warmup: int, show_events: bool) -> list[dict[str, float]]:
    """Launch `warmup + runs` download runs one at a time; the phases of the counted ones (seconds)."""
    from dagster._core.events import DagsterEventType as E
    from dagster._core.storage.dagster_run import DagsterRunStatus

    from laion_vq.testing.dagster_services import dagster_services, postgres_database
    from laion_vq.testing.image_server import ImageServer
    from laion_vq.testing.synthetic_metadata import write_parts

    phases, rng = [], random.Random(0)
    with tempfile.TemporaryDirectory() as tmp, ImageServer() as server:
        photos = server.photo_paths()
        write_parts(f"{tmp}/meta", [[server.url(photos[i % len(photos)]) for i in range(2 * (warmup + runs))]])
        env = {
            **QUIET,
            "LAION_VQ_STORAGE": f"{tmp}/data",
            "LAION_VQ_METADATA": f"{tmp}/meta",
            "LAION_VQ_SAMPLES_PER_SHARD": "2",
            "LAION_VQ_DOWNLOAD_THREADS": "2",
            "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS": "127.0.0.1/32",
        }
        with (
            postgres_database("laion_vq_bench") as pg_url,
            dagster_services(Path(tmp) / "home", pg_url, env=env) as services,
            services.instance() as instance,
        ):
            wait_for("the daemon's run queue", lambda: "QUEUED_RUN_COORDINATOR" in instance.get_daemon_heartbeats())
            for i in range(warmup + runs):
                # at a random phase of the coordinator's 5 s dequeue loop, as a slot freed in a backfill would be
                # (back-to-back ~5 s runs otherwise lock onto the loop and always wait ~4.5 s)
                time.sleep(rng.uniform(0, 5))
                launched_at = time.time()
                run_id = services.launch_run("download_shards", {"dagster/partition": f"{i:05d}"})
                run = wait_for("the run to finish", functools.partial(_finished_run, instance, run_id))
                if run.status != DagsterRunStatus.SUCCESS:
                    raise RuntimeError(f"run {run_id} ended {run.status}:\n{services.log('daemon')[-3000:]}")
                events = [
                    (e.timestamp, e.dagster_event.event_type) for e in instance.all_logs(run_id) if e.dagster_event
                ]
                if show_events:
                    print(f"run {i}: " + ", ".join(f"{t.value}@{ts - launched_at:.2f}" for ts, t in events))
                first: dict = {}
                for ts, kind in events:
                    first.setdefault(kind, ts)
                last_step = max(ts for ts, k in events if k == E.STEP_SUCCESS)
                p = {
                    "queue": first[E.RUN_STARTING] - launched_at,
                    "worker": first[E.RUN_START] - first[E.RUN_STARTING],
                    "to_step": first[E.STEP_START] - first[E.RUN_START],
                    "steps": last_step - first[E.STEP_START],
                    "end": first[E.RUN_SUCCESS] - last_step,
                }
                label = "warm-up" if i < warmup else "run"
                print(f"  {label} {i}: " + "  ".join(f"{k} {v:5.2f}" for k, v in p.items()))
                if i >= warmup:
                    phases.append(p)
    return phases


def needed(fixed: float, shard_s: float, share: float) -> float:
    """Smallest N with F / (F + N·T) ≤ share: N ≥ F·(1 − share) / (share·T)."""
    return fixed * (1 - share) / (share * shard_s)


def fixed_share(fixed: float, shard_s: float, n: int) -> float:
    return fixed / (fixed + n * shard_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="counted runs through the daemon")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted runs first (caches, code server)")
    parser.add_argument("--loads", type=int, default=3, help="fresh-process model loads (first: cold file cache)")
    parser.add_argument("--model", default="vqgan_gumbel_f8")
    parser.add_argument("--encode-rate", type=float, default=3000.0, help="images/s per GPU")
    parser.add_argument(
        "--download-rate-per-shard",
        type=float,
        default=80.0,
        help="images/s of one shard (16 shards ≈ 1,300 images/s on a 16-core machine)",
    )
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--compile-s", type=float, default=5.0, help="torch.compile, warm inductor cache")
    parser.add_argument("--compile-cold-s", type=float, default=60.0, help="torch.compile, cold (shown only)")
    parser.add_argument("--gpu-init-s", type=float, default=2.0, help="CUDA context + weights to the GPU")
    parser.add_argument("--max-share", type=float, default=0.02)
    parser.add_argument("--events", action="store_true", help="print each run's event log timeline")
    parser.add_argument("--probe", choices=["download", "encoder"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe, args.checkpoint)

    from laion_vq import settings

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    print("1. model load in fresh processes (the run worker's code path, CPU):")
    with tempfile.TemporaryDirectory() as tmp:
        from laion_vq.vqgan import get_model_config, save_random_checkpoint

        checkpoint = f"{tmp}/{args.model}-RANDOM-WEIGHTS-seed0.ckpt"
        save_random_checkpoint(get_model_config(args.model), checkpoint, seed=0)
        print(f"  checkpoint {os.path.getsize(checkpoint) / 1e6:.0f} MB")
        enc = [run_probe("encoder", checkpoint, cold=i == 0) for i in range(args.loads)]
    dl = [run_probe("download", "", cold=False) for _ in range(args.loads)]
    for name, rows in (("encoder", enc), ("download", dl)):
        for i, row in enumerate(rows):
            tag = "cold file cache" if name == "encoder" and i == 0 else "warm"
            print(f"  {name} {i} ({tag}): " + "  ".join(f"{k} {v:5.2f}" for k, v in row.items()))
    med = {
        name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for name, rows in (("encoder", enc), ("download", dl))
    }

    print(
        f"2. run start through the daemon on PostgreSQL: {args.warmup} warm-up + {args.runs} download_shards "
        "runs of a 2-image shard (seconds; queue: launch→RUN_STARTING, 0–5 s of it the run coordinator's dequeue "
        "interval; worker: →RUN_START; to_step: →first STEP_START; steps: →last STEP_SUCCESS; end: →RUN_SUCCESS)"
    )
    phases = measure_runs(args.runs, args.warmup, args.events)
    run = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    print("  median: " + "  ".join(f"{k} {v:5.2f}" for k, v in run.items()))
    start = run["queue"] + run["worker"] + run["to_step"] + run["end"]

    f_dl = start + med["download"]["imports_s"]
    f_enc = (
        start
        + med["encoder"]["imports_s"]
        + med["encoder"]["load_s"]
        + med["encoder"]["decoder_s"]
        + args.gpu_init_s
        + args.compile_s
    )
    t_enc, t_dl = args.samples_per_shard / args.encode_rate, args.samples_per_shard / args.download_rate_per_shard
    s = args.max_share
    print(f"3. cost model: fixed share F / (F + N·T) ≤ {s:.0%}  ⇔  N ≥ {(1 - s) / s:g}·F/T")
    print(
        f"  assumed (no GPU here): GPU init {args.gpu_init_s:g} s, torch.compile {args.compile_s:g} s (warm "
        f"inductor cache; {args.compile_cold_s:g} s cold); the encoder does not call torch.compile today"
    )
    e = med["encoder"]
    print(
        f"  run start (queue+worker+to_step+end) {start:.2f} s; lazy imports: download "
        f"{med['download']['imports_s']:.2f} s, encoder {e['imports_s']:.2f} s; model load {e['load_s']:.2f} s, "
        f"decoder {e['decoder_s']:.2f} s (medians of {args.loads}, first load cold)"
    )
    recommended: list[tuple[str, int]] = []
    for name, fixed, shard_s, setting in (
        ("encoder", f_enc, t_enc, settings.ENCODE_SHARDS_PER_RUN),
        ("download", f_dl, t_dl, settings.DOWNLOAD_SHARDS_PER_RUN),
    ):
        current = int(setting.default)
        n_min = needed(fixed, shard_s, s)
        rec = 2 ** math.ceil(math.log2(max(1.0, n_min))) if name == "encoder" else max(1, math.ceil(n_min))
        recommended.append((setting.env, rec))
        print(
            f"  {name:8s} F {fixed:6.2f} s  T {shard_s:7.2f} s/shard  N ≥ {n_min:7.1f}  recommended {rec}"
            f" ({rec * shard_s / 60:.1f} min of work a run)"
        )
        for n in sorted({current, rec}):
            print(
                f"    N = {n:4d}: fixed share {fixed_share(fixed, shard_s, n):6.2%}, ≤ {s:.0%} while F ≤ "
                f"{n * shard_s * s / (1 - s):5.1f} s{' (current default)' if n == current else ''}"
            )
        if name == "encoder":
            cold = fixed - args.compile_s + args.compile_cold_s
            print(f"    N = {rec:4d} with a cold compile ({cold:.1f} s): {fixed_share(cold, shard_s, rec):6.2%}")
    print(
        "recommended: "
        + ", ".join(f"{env}={r}" for env, r in recommended)
        + f"  (load average {os.getloadavg()[0]:.1f} at the end: other work on this machine inflates F)"
    )


if __name__ == "__main__":
    main()
