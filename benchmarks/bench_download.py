"""Download stage: our guarded `download_shard` vs plain img2dataset on the same URLs, in the same run.

A loopback HTTP server (in a child process, so its CPU and GIL stay out of the measurement, as a real
web server would) serves ~20 distinct realistic images: scikit-image photos resized to web sizes
(800–2000 px longest side, a few hundred KB), ~75% JPEG of varying quality, 15% PNG, 10% WebP, some
grayscale; every URL is distinct (`/img/<i>.<ext>`). Alternating the order each round, it times:

- ours:  `laion_vq.download.download_shard` (address guard, byte cap, deadline, header checks, output
  verification and annotation: everything a shard costs us);
- plain: img2dataset's own Resizer / Downloader / WebDatasetSampleWriter with the same options and a plain
  number timeout, driven through `Downloader.download_shard` as our module does, with img2dataset's
  ORIGINAL module-level `download_image`. Our guards replace `img2dataset.downloader.download_image` at
  first use, so the pristine function is captured below BEFORE `laion_vq.download` is imported and
  swapped in (then restored) around each plain run: the reference does not depend on how the guard
  dispatches. If no guard is installed, both paths fetch alike.

Shards run in threads of this process (CPU = getrusage(RUSAGE_SELF)); img2dataset's Resizer points fds
1/2 at /dev/null around each resize, which concurrent shards can leave behind, so they are restored.

The ratio ours/plain of images/s and of CPU s/image is the guards' cost; the target is within 5%.

    python benchmarks/bench_download.py                               # 400 images, 32 threads, 3 rounds
    python benchmarks/bench_download.py --latency-ms 50 --threads 64  # emulate a 50 ms network
    python benchmarks/bench_download.py --shards-in-parallel 4        # 4 concurrent shards per variant
"""

from __future__ import annotations

import os

# Before any laion_vq import: the address guard must let the loopback benchmark server through.
os.environ["LAION_VQ_DOWNLOAD_ALLOW_NETWORKS"] = "127.0.0.0/8"
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations: stay offline
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection

import img2dataset.downloader as i2d_downloader
import numpy as np
import pyarrow as pa
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter
from PIL import Image

#: img2dataset's fetch functions as shipped, captured before laion_vq can replace them.
PRISTINE = {name: getattr(i2d_downloader, name) for name in ("download_image", "download_image_with_retry")}

from laion_vq.download import DownloadOptions, download_shard  # noqa: E402
from laion_vq.shards.schema import CAPTION_COLUMN, EXTRA_COLUMNS, LAION_SCHEMA, URL_COLUMN  # noqa: E402

#: (skimage.data name, longest side px, format, quality, grayscale): 15 JPEG, 3 PNG, 2 WebP.
# fmt: off
IMAGE_SPECS: list[tuple[str, int, str, int, bool]] = [
    ("astronaut", 1200, "jpg", 85, False), ("chelsea", 1600, "jpg", 90, False), ("coffee", 1800, "jpg", 80, False),
    ("rocket", 1400, "jpg", 75, False), ("hubble_deep_field", 2000, "jpg", 92, False),
    ("retina", 1400, "jpg", 85, False), ("immunohistochemistry", 1024, "jpg", 95, False),
    ("cat", 1280, "jpg", 70, False), ("coffee", 960, "jpg", 60, False), ("hubble_deep_field", 1200, "jpg", 85, False),
    ("camera", 1000, "jpg", 85, True), ("moon", 900, "jpg", 80, True), ("gravel", 1024, "jpg", 85, True),
    ("brick", 800, "jpg", 90, True), ("astronaut", 1600, "jpg", 88, True),
    ("colorwheel", 800, "png", 0, False), ("logo", 1000, "png", 0, False), ("chelsea", 900, "png", 0, True),
    ("chelsea", 1200, "webp", 80, False), ("rocket", 1000, "webp", 75, False),
]
# fmt: on
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
TIMEOUT_S = 10


def encode_images() -> list[tuple[str, bytes, int, int]]:
    """(ext, bytes, width, height) per spec. Upscaled photos get mild grain so they compress like photos."""
    import skimage.data

    rng = np.random.default_rng(0)
    out = []
    for name, side, fmt, quality, gray in IMAGE_SPECS:
        img = Image.fromarray(getattr(skimage.data, name)())
        scale = side / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        if gray:
            img = img.convert("L")
        if fmt != "png" and img.mode in ("RGB", "L"):
            arr = np.asarray(img).astype(np.float32)
            img = Image.fromarray(np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format=PIL_FORMATS[fmt], **({"quality": quality} if quality else {}))
        out.append((fmt, buf.getvalue(), img.width, img.height))
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # img2dataset opens thread_count × shards connections at once

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hanging up are not the benchmark's business."""


def _serve(conn: Connection, latency_s: float) -> None:
    """Child process: encode the images, bind 127.0.0.1, report (port, image summary), serve forever."""
    images = encode_images()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: thousands of requests."""

        def do_GET(self) -> None:
            try:
                index = int(self.path.rsplit("/", 1)[-1].split(".", 1)[0])
            except ValueError:
                self.send_error(404)
                return
            ext, data, _, _ = images[index % len(images)]
            if latency_s:
                time.sleep(latency_s)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPES[ext])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

    server = _Server(("127.0.0.1", 0), Handler)
    conn.send((server.server_address[1], [(ext, len(data), w, h) for ext, data, w, h in images]))
    server.serve_forever(poll_interval=0.2)


def build_table(base_url: str, summary: list[tuple[str, int, int, int]], shard: int, n: int) -> pa.Table:
    """N LAION rows whose URLs are distinct across shards and rounds' shards."""
    idx = [shard * n + i for i in range(n)]
    specs = [summary[i % len(summary)] for i in idx]
    urls = [f"{base_url}/img/{i}.{s[0]}" for i, s in zip(idx, specs, strict=True)]
    columns = [idx, urls, [f"benchmark image {i}" for i in idx], [s[3] for s in specs], [s[2] for s in specs]]
    columns += [["?"] * n, ["UNLIKELY"] * n, [0.3] * n]  # LICENSE, NSFW, similarity
    return pa.Table.from_arrays([pa.array(c) for c in columns], schema=LAION_SCHEMA)


@contextlib.contextmanager
def pristine_img2dataset() -> Iterator[None]:
    """img2dataset's original fetch functions for the duration; whatever was installed comes back after."""
    installed = {name: getattr(i2d_downloader, name) for name in PRISTINE}
    for name, fn in PRISTINE.items():
        setattr(i2d_downloader, name, fn)
    try:
        yield
    finally:
        for name, fn in installed.items():
            setattr(i2d_downloader, name, fn)


def plain_shard(table: pa.Table, shard_id: int, out: str, samples_per_shard: int, o: DownloadOptions) -> int:
    """What `_build_downloader` + `Downloader.download_shard` do, with img2dataset's own pieces only."""
    os.makedirs(out, exist_ok=True)
    columns = [*EXTRA_COLUMNS, "caption", "url"]
    table = table.select([*EXTRA_COLUMNS, CAPTION_COLUMN, URL_COLUMN]).rename_columns(columns)
    feather = os.path.join(out, f"{shard_id}.feather")
    with pa.OSFile(feather, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    resizer = Resizer(
        image_size=o.image_size, resize_mode=o.resize_mode, resize_only_if_bigger=o.resize_only_if_bigger,
        upscale_interpolation=o.upscale_interpolation, downscale_interpolation=o.downscale_interpolation,
        encode_quality=o.encode_quality, encode_format=o.encode_format, skip_reencode=False,
        disable_all_reencoding=False, min_image_size=o.min_image_size, max_image_area=o.max_image_area,
        max_aspect_ratio=o.max_aspect_ratio, blurrer=None,
    )  # fmt: skip
    downloader = i2d_downloader.Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=o.thread_count,
        save_caption=True, extract_exif=o.extract_exif, output_folder=out, column_list=columns,
        timeout=TIMEOUT_S, number_sample_per_shard=samples_per_shard, oom_shard_count=5,
        compute_hash=o.compute_hash, verify_hash_type=None, encode_format=o.encode_format, retries=o.retries,
        user_agent_token=o.user_agent_token, disallowed_header_directives=list(o.disallowed_header_directives) or None,
        blurring_bbox_col=None,
    )  # fmt: skip
    downloader.download_shard((shard_id, feather))
    with open(os.path.join(out, f"{shard_id:05d}_stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    if stats["count"] != table.num_rows:
        raise RuntimeError(f"plain shard {shard_id}: stats count {stats['count']} != {table.num_rows} rows")
    if stats["successes"] != table.num_rows:
        raise RuntimeError(f"plain shard {shard_id}: {stats['successes']}/{table.num_rows} ok: {stats['status_dict']}")
    return int(stats["successes"])


def ours_shard(table: pa.Table, shard_id: int, out: str, samples_per_shard: int, o: DownloadOptions) -> int:
    result = download_shard(table, shard_id, out, samples_per_shard=samples_per_shard, options=o)
    if result.successes != table.num_rows:
        raise RuntimeError(f"ours shard {shard_id}: {result.successes}/{table.num_rows} ok: {result.status_counts}")
    return result.successes


ShardFn = Callable[[pa.Table, int, str, int, DownloadOptions], int]
CLOBBERED: list[int] = []  # times img2dataset left stdout/stderr on /dev/null


@contextlib.contextmanager
def keep_stdio() -> Iterator[None]:
    """img2dataset's SuppressStdoutStderr dup2s /dev/null over fds 1/2 and restores what it saw; two shards
    resizing at once in one process can restore /dev/null for good. Put the real ones back afterwards."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            if not os.path.sameopenfile(fd, copy):
                CLOBBERED.append(fd)
                os.dup2(copy, fd)
            os.close(copy)


def measure(fn: ShardFn, tables: list[pa.Table], sps: int, o: DownloadOptions, plain: bool) -> tuple[float, float, int]:
    """(wall s, CPU s of this process, successes) for all shards run concurrently, one thread each."""
    with tempfile.TemporaryDirectory(prefix="bench_download_") as root:
        guard = pristine_img2dataset() if plain else contextlib.nullcontext()
        with keep_stdio(), guard, ThreadPoolExecutor(len(tables)) as pool:
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            futures = [pool.submit(fn, t, k, os.path.join(root, str(k)), sps, o) for k, t in enumerate(tables)]
            successes = sum(f.result() for f in futures)
            wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), successes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="images per shard")
    parser.add_argument("--threads", type=int, default=32, help="img2dataset download threads per shard")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each times both variants")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="server delay per request")
    parser.add_argument("--shards-in-parallel", type=int, default=1, help="concurrent shards per variant")
    args = parser.parse_args()
    if args.images < 2 or args.threads < 1 or args.repeats < 1 or args.shards_in_parallel < 1:
        parser.error("--images must be >= 2 and --threads, --repeats, --shards-in-parallel >= 1")
    started = time.perf_counter()

    ctx = multiprocessing.get_context("fork")  # before any thread exists; the child never touches torch
    parent_conn, child_conn = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child_conn, args.latency_ms / 1000), daemon=True)
    server.start()
    try:
        if not parent_conn.poll(120):
            raise RuntimeError("benchmark image server did not start within 120 s")
        port, summary = parent_conn.recv()
        run(args, f"http://127.0.0.1:{port}", summary)
    finally:
        server.terminate()
        server.join(5)
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")


def run(args: argparse.Namespace, base_url: str, summary: list[tuple[str, int, int, int]]) -> None:
    n, k = args.images, args.shards_in_parallel
    sps = 10 ** math.ceil(math.log10(n))
    options = DownloadOptions(thread_count=args.threads, timeout=TIMEOUT_S)
    mix = {ext: sum(s[0] == ext for s in summary) for ext in CONTENT_TYPES}
    kb = [s[1] / 1024 for s in summary]
    print(f"images/shard={n} shards_in_parallel={k} threads={args.threads} repeats={args.repeats} "
          f"latency={args.latency_ms:g} ms samples_per_shard={sps} cpus={os.cpu_count()}")  # fmt: skip
    print(f"served: {len(summary)} distinct images {mix}, {min(kb):.0f}–{max(kb):.0f} KB "
          f"(mean {statistics.mean(kb):.0f} KB), longest side {min(max(s[2:]) for s in summary)}–"
          f"{max(max(s[2:]) for s in summary)} px")  # fmt: skip

    warm = [build_table(base_url, summary, 9000 + i, min(n, 2 * args.threads)) for i in range(2)]
    measure(ours_shard, warm[:1], 10 ** math.ceil(math.log10(warm[0].num_rows)), options, plain=False)
    measure(plain_shard, warm[1:], 10 ** math.ceil(math.log10(warm[1].num_rows)), options, plain=True)
    guarded = [name for name, fn in PRISTINE.items() if getattr(i2d_downloader, name) is not fn]
    print(f"guards installed by laion_vq: {', '.join(guarded) + ' replaced' if guarded else 'none (same fetch code)'}")

    variants: dict[str, tuple[ShardFn, bool]] = {"ours": (ours_shard, False), "plain": (plain_shard, True)}
    samples: dict[str, list[tuple[float, float, int]]] = {"ours": [], "plain": []}
    shard = 0
    for r in range(args.repeats):
        for name in ("ours", "plain") if r % 2 == 0 else ("plain", "ours"):
            tables = [build_table(base_url, summary, shard + j, n) for j in range(k)]
            shard += k  # fresh URLs every run: no variant gets another's warmed server caches
            fn, plain = variants[name]
            wall, cpu, ok = measure(fn, tables, sps, options, plain)
            samples[name].append((wall, cpu, ok))
            per_img_ms = cpu / ok * 1000
            print(f"  round {r + 1} {name:5s}: {wall:6.2f} s {ok / wall:7.1f} img/s {per_img_ms:6.2f} ms CPU/img")

    print(f"\n{'variant':8s} {'wall s':>8s} {'images/s':>9s} {'CPU s/img':>10s} {'successes':>10s}   (medians)")
    med: dict[str, tuple[float, float]] = {}
    for name, rows in samples.items():
        ips = statistics.median(ok / wall for wall, _, ok in rows)
        cpi = statistics.median(cpu / ok for _, cpu, ok in rows)
        med[name] = (ips, cpi)
        wall = statistics.median(w for w, _, _ in rows)
        print(f"{name:8s} {wall:8.2f} {ips:9.1f} {cpi:10.4f} {rows[0][2]:>6d}/{n * k}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    ratio, cpu_ratio = med["ours"][0] / med["plain"][0], med["ours"][1] / med["plain"][1]
    overhead = (1 - ratio) * 100
    if CLOBBERED:
        print(f"note: img2dataset left stdout/stderr on /dev/null {len(CLOBBERED)} times (concurrent shards; restored)")
    print(f"ours/plain images/s ratio: {ratio:.2f} (overhead {overhead:.1f}%), cpu/image ratio: {cpu_ratio:.2f}")


if __name__ == "__main__":
    main()
