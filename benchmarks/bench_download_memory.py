"""Download stage memory: peak RSS of one HOSTILE shard vs one CLEAN shard of real images, in the same run.

Why: img2dataset keeps up to 2 × threads bodies in flight and reads each whole; a shard of 50 MB bodies
(with or without Content-Length), PNG bombs and broken images could hold gigabytes. Our guards cap each
body (`max_bytes`), the bodies a shard holds at once (`buffer_bytes`, plus one `max_bytes` overdraft) and
refuse bomb-sized images from their header, so a hostile shard's peak should stay within
buffer_bytes + max_bytes + one decode of a clean one. This measures that it does.

Each case downloads ONE shard in a fresh spawned child (so its `ru_maxrss` is its own); the child imports
everything first, reports its RSS then (the baseline), downloads, and reports `ru_maxrss`. The parent
imports only the stdlib and the loopback `HostileServer` runs in a process of its own, so neither adds to
a child's peak (Linux carries the RSS high-water mark of the forking process across exec).

- HOSTILE: rows in rotation: 50 MB bodies with and without Content-Length, 30000×30000 PNG bombs,
  truncated-then-zeros JPEGs, HTML served as JPEG, drips (ended by the deadline), 404s, resets, and 20%
  real images; every URL is unique (`n=<i>`).
- CLEAN: as many rows, all real images (`/img/large.jpg`, `/img/photo.png`, …).

    python benchmarks/bench_download_memory.py                    # 400 rows, 64 threads, default budgets
    python benchmarks/bench_download_memory.py --buffer-mb 64     # a small body budget: watch it bite
    python benchmarks/bench_download_memory.py --max-bytes 5000000 --threads 128
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

MB = 1_000_000  # decimal, as DownloadOptions states its byte limits
HOSTILE = [
    "/big.jpg?length=1&mb=50", "/big.jpg?length=0&mb=50", "/bomb.png", "/truncated-zeros.jpg", "/html.jpg",
    "/drip.jpg", "/status/404", "/reset.jpg", "/img/large.jpg", "/img/large.jpg",
]  # fmt: skip
CLEAN = ["/img/large.jpg", "/img/photo.png", "/img/photo.jpg", "/img/progressive.jpg", "/img/photo.webp"]


def _serve(conn: Connection, drip_interval_s: float) -> None:
    """Server process: start the HostileServer, report its base URL, serve until told to stop."""
    from laion_vq.testing.hostile_server import HostileServer

    with HostileServer("127.0.0.1", drip_interval_s=drip_interval_s, stall_s=5) as server:
        conn.send(server.base_url)
        conn.recv()


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024 / MB


def _child(conn: Connection, urls: list[str], options_kw: dict[str, Any]) -> None:
    """One shard in this fresh process: imports first, then baseline RSS, download, peak RSS."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import img2dataset.downloader  # torch, cv2 etc.: imports belong to the baseline
    import img2dataset.resizer
    import img2dataset.writer  # noqa: F401
    import pyarrow as pa

    from laion_vq.download import DownloadOptions, download_shard
    from laion_vq.shards.schema import LAION_SCHEMA

    n = len(urls)
    columns = [list(range(n)), urls, [f"row {i}" for i in range(n)], [0] * n, [0] * n, ["?"] * n, ["UNLIKELY"] * n]
    table = pa.Table.from_arrays([pa.array(c) for c in [*columns, [0.3] * n]], schema=LAION_SCHEMA)
    options = DownloadOptions(**options_kw)
    sps = 10 ** len(str(n - 1)) if n > 1 else 1
    baseline = _rss_mb()
    with tempfile.TemporaryDirectory(prefix="bench_download_memory_") as out:
        t0 = time.perf_counter()
        result = download_shard(table, 0, out, samples_per_shard=sps, options=options)
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # KiB on Linux
    limits = (options.buffer_bytes, options.max_bytes, options.max_image_area)
    conn.send((baseline, peak, wall, result.successes, dict(result.failures_by_reason), limits))


Report = tuple[float, float, float, int, dict[str, int], tuple[int, int, float]]


def measure(urls: list[str], options_kw: dict[str, Any]) -> Report:
    """(baseline RSS MB, peak RSS MB, wall s, successes, failures by reason, (buffer_bytes, max_bytes,
    max_image_area)) of one shard in a new process."""
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child_conn, urls, options_kw))
    proc.start()
    try:
        if not parent_conn.poll(600):
            raise RuntimeError("shard child reported nothing within 600 s")
        report = parent_conn.recv()
    except EOFError:
        proc.join(5)
        raise RuntimeError(f"shard child died (exit code {proc.exitcode})") from None
    proc.join(30)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400, help="rows per shard (each case)")
    parser.add_argument("--threads", type=int, default=64, help="img2dataset download threads")
    parser.add_argument("--deadline", type=float, default=4.0, help="seconds per image in all")
    parser.add_argument("--max-bytes", type=int, default=None, help="largest body read (default: DownloadOptions')")
    parser.add_argument("--buffer-mb", type=float, default=None, help="body budget per shard, MB (default: ours)")
    args = parser.parse_args()
    if args.rows < 1 or args.threads < 1 or args.deadline <= 0:
        parser.error("--rows and --threads must be >= 1 and --deadline > 0")
    started = time.perf_counter()

    kw: dict[str, Any] = {"thread_count": args.threads, "timeout": 2, "deadline": args.deadline}
    kw["allow_networks"] = ("127.0.0.1/32",)
    if args.max_bytes is not None:
        kw["max_bytes"] = args.max_bytes
    if args.buffer_mb is not None:
        kw["buffer_bytes"] = int(args.buffer_mb * MB)

    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child_conn, 0.05), daemon=True)  # drips outlast the deadline
    server.start()
    try:
        if not parent_conn.poll(120):
            raise RuntimeError("HostileServer did not start within 120 s")
        base = parent_conn.recv()
        cases = {
            "hostile": [f"{base}{HOSTILE[i % len(HOSTILE)]}{'&' if '?' in HOSTILE[i % len(HOSTILE)] else '?'}n={i}"
                        for i in range(args.rows)],
            "clean": [f"{base}{CLEAN[i % len(CLEAN)]}?n={i}" for i in range(args.rows)],
        }  # fmt: skip
        results = {name: measure(urls, kw) for name, urls in cases.items()}
        parent_conn.send("stop")
    finally:
        server.join(10)
        if server.is_alive():
            server.terminate()

    buffer_bytes, max_bytes, max_area = results["hostile"][5]
    decode = max_area * 3  # one RGB frame at the area cap: img2dataset resizes one image at a time
    bound_mb, bodies_mb = (buffer_bytes + max_bytes + decode) / MB, (buffer_bytes + max_bytes) / MB
    print(f"rows={args.rows} threads={args.threads} timeout={kw['timeout']}s deadline={args.deadline:g}s "
          f"max_bytes={max_bytes / MB:.1f} MB buffer_bytes={buffer_bytes / MB:.0f} MB "
          f"cpus={os.cpu_count()}")  # fmt: skip
    print(f"theoretical bound on bodies held: buffer_bytes + max_bytes = {bodies_mb:.0f} MB; "
          f"+ one decode at max_image_area ({decode / MB:.0f} MB) = {bound_mb:.0f} MB")  # fmt: skip
    print(f"\n{'case':8s} {'rows':>5s} {'ok':>5s} {'wall s':>7s} {'base MB':>8s} {'peak MB':>8s} {'growth MB':>10s}")
    for name, (baseline, peak, wall, ok, *_) in results.items():
        print(f"{name:8s} {args.rows:5d} {ok:5d} {wall:7.1f} {baseline:8.0f} {peak:8.0f} {peak - baseline:10.0f}")
    for name, (*_, failures, _) in results.items():
        print(f"{name} failures by reason: {failures or '{}'}")
    hostile, clean = results["hostile"], results["clean"]
    growth = hostile[1] - hostile[0]
    if growth > bodies_mb + 1000:
        print(f"WARNING: hostile RSS growth {growth:.0f} MB exceeds buffer_bytes + max_bytes + 1 GB "
              f"({bodies_mb + 1000:.0f} MB): the body budget is not holding")  # fmt: skip
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")
    print(f"hostile/clean peak RSS ratio: {hostile[1] / clean[1]:.2f} (hostile peak {hostile[1]:.0f} MB, "
          f"growth {growth:.0f} MB, bound: buffer_bytes + max_bytes + decode ≈ {bound_mb:.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
