"""Removal lists at scale: planning over 10,000 status parquets × 10,000 rows with 2,500 listed items, and
rewriting one 10,000-image shard, each against a naive reference measured in the same run.

Planning's reference reads every status parquet whole with pyarrow in a Python loop and matches row by
row (urlsplit for domains), timed on a sample of files and scaled up; it must find the same keys in that
sample. The rewrite's references are re-packing the tar member by member with `tarfile` and a plain copy
of the tar (the I/O floor).

    .venv/bin/python benchmarks/bench_removals.py                     # 10,000 × 10,000 (~17 GB in a temp dir)
    .venv/bin/python benchmarks/bench_removals.py --shards 500        # smaller
    .venv/bin/python benchmarks/bench_removals.py --workdir /data/bench --keep   # reuse fabricated shards
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from PIL import Image

from laion_vq.removals import RemovalItem, apply_shard, parse_removal_list, plan_removals
from laion_vq.removals.apply import remove_tar_samples
from laion_vq.removals.plan import Match
from laion_vq.report.usage import pack_code_usage
from laion_vq.shards.codes import build_codes_table, write_codes_parquet
from laion_vq.shards.storage import StorageLayout, publish_bytes

WORDS = [
    "sunset",
    "cat",
    "vintage",
    "poster",
    "red",
    "dress",
    "mountain",
    "lake",
    "logo",
    "car",
    "wedding",
    "cake",
    "photo",
    "of",
    "a",
    "the",
    "with",
    "and",
    "blue",
    "sky",
]
FOLDERS = ["images", "uploads", "2019", "photos", "large", "thumbs", "wp-content", "media"]
TLDS = ["com", "net", "org", "co.uk", "de"]
RARE_EVERY = 2000  # every 2,000th row's host is a rare one, shared by two shards only (for domain items)


def template(rows: int) -> pl.DataFrame:
    """One shard's worth of varied rows; each shard derives its own keys, URLs and hashes from it."""
    rng = np.random.default_rng(0)
    return pl.DataFrame(
        {
            "i": np.arange(rows),
            "suffix": [f"{i:04d}" for i in range(rows)],
            "host": [
                f"{'cdn' if i % 3 else 'img'}{i % 50}.site{rng.integers(0, 20000)}.{TLDS[i % 5]}" for i in range(rows)
            ],
            "path": [
                "/".join(rng.choice(FOLDERS, 3)) + "/" + rng.bytes(int(rng.integers(6, 20))).hex() for _ in range(rows)
            ],
            "caption": [" ".join(rng.choice(WORDS, int(rng.integers(4, 14)))) for _ in range(rows)],
            "u": rng.random(rows),
            "sha": [rng.bytes(32).hex() for _ in range(rows)],
            "jpg": [rng.bytes(32).hex() for _ in range(rows)],
        }
    )


def shard_frame(tmpl: pl.DataFrame, shard: int) -> pl.DataFrame:
    """Shard `shard`'s status rows: 70 % success, 25 % failed downloads, 5 % failed resizes, sorted by key."""
    ok = pl.col("u") < 0.7
    rare = pl.col("i") % RARE_EVERY == 17
    host = pl.when(rare).then(pl.lit(f"h{shard % 5000}.rare-host.net")).otherwise(pl.col("host"))
    success = pl.when(ok).then(pl.lit("success"))
    status = success.when(pl.col("u") < 0.95).then(pl.lit("failed_to_download")).otherwise(pl.lit("failed_to_resize"))
    suffix = pl.lit(f"{shard:05x}")  # at the end: a shard prefix would let min/max statistics skip files
    return tmpl.select(
        SAMPLE_ID=(pl.col("i") + shard * tmpl.height).cast(pl.Int64),
        caption=pl.col("caption"),
        url=pl.lit("https://")
        + host
        + pl.lit("/")
        + pl.col("path")
        + pl.lit(f"/{shard:05d}_")
        + pl.col("suffix")
        + ".jpg",
        key=pl.lit(f"{shard:05d}") + pl.col("suffix"),
        status=status,
        error_message=pl.when(ok).then(None).otherwise(pl.lit("HTTP Error 404: Not Found")),
        width=pl.when(ok).then(256),
        height=pl.when(ok).then(256),
        sha256=pl.when(ok).then(pl.col("sha").str.slice(0, 59) + suffix),
        failure_reason=pl.when(ok).then(None).otherwise(pl.lit("404")),
        jpg_sha256=pl.when(ok).then(pl.col("jpg").str.slice(0, 59) + suffix),
    )


def _write_range(root: str, rows: int, shards: list[int]) -> None:
    tmpl = template(rows)
    for shard in shards:
        pq.write_table(shard_frame(tmpl, shard).to_arrow(), f"{root}/images/{shard:05d}.parquet")


def fabricate(root: str, shards: int, rows: int) -> float:
    os.makedirs(f"{root}/images", exist_ok=True)
    if len([n for n in os.listdir(f"{root}/images") if n.endswith(".parquet")]) == shards:
        return 0.0
    started = time.perf_counter()
    workers = os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        list(
            pool.map(
                _write_range,
                [root] * workers,
                [rows] * workers,
                [list(range(w, shards, workers)) for w in range(workers)],
            )
        )
    return time.perf_counter() - started


def make_items(root: str, shards: int, rows: int, count: int) -> dict[tuple[str, str], set[str]]:
    """Write `removals/bench.csv` (2,500 items over 500 shards, ~5 % matching nothing); returns
    (kind, value) → the keys each should match, from the fabrication's own rules."""
    rng = random.Random(1)
    tmpl = template(rows)
    hit_shards = rng.sample(range(shards), min(500, shards))
    successes = np.flatnonzero(tmpl.get_column("u").to_numpy() < 0.7)
    mix = {"url": 0.48, "sample_id": 0.16, "key": 0.12, "image_sha256": 0.228}
    expected: dict[tuple[str, str], set[str]] = {}
    rare_rows = [i for i in range(rows) if i % RARE_EVERY == 17]
    for n in range(30):
        host = f"h{rng.choice(hit_shards) % 5000}.rare-host.net" if n < 25 else f"absent{n}.example"
        holders = [s for s in range(shards) if f"h{s % 5000}.rare-host.net" == host]
        expected[("domain", host)] = {f"{s:05d}{i:04d}" for s in holders for i in rare_rows}
    cache: dict[int, dict[str, list]] = {}
    while len(expected) < count:
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
        shard = rng.choice(hit_shards)
        row = int(rng.choice(successes)) if kind == "image_sha256" else rng.randrange(rows)
        if shard not in cache:
            cache[shard] = shard_frame(tmpl, shard).to_dict(as_series=False)
        frame, key = cache[shard], f"{shard:05d}{row:04d}"
        absent = rng.random() < 0.05
        if kind == "url":
            value, keys = (f"https://absent.example/{key}.jpg", set()) if absent else (frame["url"][row], {key})
        elif kind == "sample_id":
            value, keys = (str(10**12 + row), set()) if absent else (str(frame["SAMPLE_ID"][row]), {key})
        elif kind == "key":
            value, keys = (f"{shards + 1:05d}{row:04d}", set()) if absent else (key, {key})
        else:
            column = "sha256" if rng.random() < 0.5 else "jpg_sha256"
            value, keys = (f"{rng.getrandbits(256):064x}", set()) if absent else (frame[column][row], {key})
        expected[(kind, value)] = keys
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["url", "domain", "sample_id", "key", "image_sha256", "reason", "date"])
    kinds = ["url", "domain", "sample_id", "key", "image_sha256"]
    for kind, value in expected:
        writer.writerow([value if k == kind else "" for k in kinds] + ["benchmark", "2024-08-30"])
    publish_bytes(out.getvalue().encode(), f"{root}/removals/bench.csv")
    return expected


def naive_plan(files: list[str], items: dict[tuple[str, str], set[str]]) -> set[str]:
    """The reference: every status parquet read whole, every row checked in Python."""
    by_kind: dict[str, set[str]] = {}
    for kind, value in items:
        by_kind.setdefault(kind, set()).add(value)
    hits: set[str] = set()
    for path in files:
        for row in pq.read_table(path).to_pylist():
            host = (urlsplit(row["url"]).hostname or "") if row["url"] else ""
            labels = host.split(".")
            if (
                row["url"] in by_kind["url"]
                or str(row["SAMPLE_ID"]) in by_kind["sample_id"]
                or row["key"] in by_kind["key"]
                or row["sha256"] in by_kind["image_sha256"]
                or row["jpg_sha256"] in by_kind["image_sha256"]
                or any(".".join(labels[i:]) in by_kind["domain"] for i in range(len(labels)))
            ):
                hits.add(row["key"])
    return hits


def make_big_shard(layout: StorageLayout, rows: int) -> int:
    """Shard 0 with `rows` real 256 px q95 JPEGs (64 distinct, ~20 KB), status, stats and two code versions."""
    rng = np.random.default_rng(2)
    jpegs = []
    ramp = np.linspace(0, 255, 256, dtype=np.float32)
    for n in range(64):
        pixels = np.stack([np.add.outer(ramp * (n % 4) / 4, ramp / 2), np.add.outer(ramp / 3, ramp * (n % 3) / 3)], -1)
        pixels = np.concatenate([pixels, pixels[..., :1]], -1) + rng.normal(0, 6, (256, 256, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    frame = shard_frame(template(rows), 0).with_columns(
        status=pl.lit("success"), error_message=pl.lit(None, pl.String), failure_reason=pl.lit(None, pl.String)
    )
    keys = frame.get_column("key").to_list()
    with open(layout.image_tar(0), "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for n, key in enumerate(keys):
            for ext, data in (("jpg", jpegs[n % 64]), ("txt", b"a caption"), ("json", b'{"status": "success"}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(frame.to_arrow(), layout.image_status(0))
    stats = {"count": rows, "successes": rows, "failed_to_download": 0, "failed_to_resize": 0, "status_dict": {}}
    with open(layout.image_stats(0), "w") as f:
        json.dump(stats, f)
    meta = {r["key"]: r for r in frame.to_dicts()}
    for model in ("vqgan_gumbel_f8", "vqgan_imagenet_f16_16384"):
        codes = rng.integers(0, 8192, (rows, 32, 32), dtype=np.int16)
        table = build_codes_table(keys, codes, meta, frame.get_column("jpg_sha256").to_list())
        usage = pack_code_usage(np.bincount(codes.ravel().astype(np.int64), minlength=8192))
        file_meta: dict[str, object] = {
            "model": model,
            "grid": 32,
            "n_embed": 8192,
            "code_usage": usage,
            "undecodable_keys": [],
        }
        write_codes_parquet(table, layout.code_shard(model, 0), file_meta)
    return os.path.getsize(layout.image_tar(0))


def repack(src: str, dst: str, drop: set[str]) -> None:
    with tarfile.open(src) as tar, tarfile.open(dst, "w") as out:
        for member in tar:
            if member.name.split(".")[0] not in drop:
                out.addfile(member, tar.extractfile(member))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=2_500)
    parser.add_argument("--sample", type=int, default=100, help="status parquets the naive reference reads")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_removals_")
    root = os.path.join(workdir, "planning")
    try:
        seconds = fabricate(root, args.shards, args.rows)
        size = sum(os.path.getsize(os.path.join(root, "images", n)) for n in os.listdir(f"{root}/images"))
        print(
            f"fabricated {args.shards:,} status parquets × {args.rows:,} rows ({size / 1e9:.1f} GB) in {seconds:.0f} s"
        )
        items = make_items(root, args.shards, args.rows, args.items)
        layout = StorageLayout(root)
        for attempt in ("first", "second"):
            started = time.perf_counter()
            plan = plan_removals(layout)
            planned = time.perf_counter() - started
            print(
                f"plan ({attempt} run): {planned:.1f} s for {len(items):,} items → {plan.keys:,} keys in "
                f"{len(plan.shards)} shards, {len(plan.unmatched)} items matching nothing"
            )
        found = {m.key for ms in plan.shards.values() for m in ms}
        assert found == set().union(*items.values()), "plan disagrees with the fabricated truth"
        files = sorted(os.path.join(root, "images", n) for n in os.listdir(f"{root}/images"))
        sample = random.Random(3).sample(files, min(args.sample, len(files)))
        started = time.perf_counter()
        naive_hits = naive_plan(sample, items)
        naive = (time.perf_counter() - started) * len(files) / len(sample)
        sample_shards = {os.path.basename(p)[:5] for p in sample}
        assert naive_hits == {k for k in found if k[:5] in sample_shards}, "naive reference disagrees"
        print(
            f"naive (pyarrow read_table + Python loop): {naive:.0f} s for {len(files):,} files "
            f"(measured on {len(sample)}, scaled); polars plan is {naive / planned:.0f}× faster"
        )

        big = StorageLayout(os.path.join(workdir, "rewrite"))
        os.makedirs(f"{big.root}/images", exist_ok=True)
        tar_bytes = make_big_shard(big, args.rows)
        drop = {f"00000{i:04d}" for i in range(17, args.rows, args.rows // 10)}
        started = time.perf_counter()
        shutil.copyfile(big.image_tar(0), big.image_tar(0) + ".copy")
        copy = time.perf_counter() - started
        started = time.perf_counter()
        repack(big.image_tar(0), big.image_tar(0) + ".repacked", drop)
        repacked = time.perf_counter() - started
        item = lambda key: RemovalItem("bench.csv", 2, "key", key, "benchmark", dt.date(2024, 8, 30))  # noqa: E731
        lists = [parse_removal_list(b"key,reason,date\n", "bench.csv")]
        started = time.perf_counter()
        result = apply_shard(big, "00000", [Match("00000", k, item(k)) for k in sorted(drop)], lists)
        rewrite = time.perf_counter() - started
        others = {f"00000{i:04d}" for i in range(29, args.rows, args.rows // 10)}
        started = time.perf_counter()
        remove_tar_samples(big.image_tar(0), others)
        tar_only = time.perf_counter() - started
        print(
            f"rewrite one shard ({args.rows:,} images, tar {tar_bytes / 1e6:.0f} MB, 2 code versions, "
            f"{len(result.keys)} keys removed, {len(result.files_changed)} files published): {rewrite:.2f} s"
        )
        print(
            f"  the tar alone: ours {tar_only:.2f} s, tarfile re-pack {repacked:.2f} s "
            f"({repacked / tar_only:.1f}× ours), plain copy {copy:.2f} s"
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
