"""Reading one shard of a LAION-like TSV part: img2dataset's reader vs our stored byte-offset index.

Generates (once, cached under --workdir) a TSV shaped like LAION-400M's metadata (SAMPLE_ID, URL, TEXT, HEIGHT,
WIDTH, LICENSE, NSFW, similarity; captions of realistic, long-tailed length, about 1% with a literal `"`), then
measures, each in a fresh subprocess so its peak RSS is its own:

- img2dataset: `img2dataset.reader.Reader` cutting the part (it reads the whole file, writes every shard's feather)
  until shard N's feather exists, then reading it;
- ours, first read: `load_or_build_index` (one streaming scan, index stored) then `read_text_rows(N)`;
- ours, every later read: `load_or_build_index` (stored index reused) then `read_text_rows(N)`.

Prints seconds and peak RSS (MB; also above the child's resident memory after its imports) of each, and the ratios
img2dataset/ours.

    python benchmarks/bench_metadata_text.py --size-gb 1.0
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SAMPLES_PER_SHARD = 10_000
COLUMNS = ["SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"]
WORDS = (
    "the a of and in with for on photo image vintage red blue black white wooden table chair dress women men "
    "kids shoes leather bag gold silver ring necklace wall art poster print canvas abstract landscape mountain "
    "sea beach sunset house garden kitchen modern design logo vector illustration icon set cartoon cute cat dog "
    "puppy flowers rose wedding cake birthday party christmas tree gift card fashion style summer winter sale new "
    "2019 hd 4k free stock high quality background pattern texture seamless floral geometric"
)


def generate(path: str, size_bytes: int, seed: int = 0) -> int:
    """Write a LAION-like TSV of about `size_bytes`; returns its row count."""
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS.split())
    licences = np.array(["?", "?", "?", "by-nc-sa", "by"])
    nsfw = np.array(["UNLIKELY"] * 8 + ["UNSURE", "NSFW"])
    rows, written, batch = 0, 0, 50_000
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(COLUMNS) + "\n")
        while written < size_bytes:
            # captions: log-normal lengths (median ~45 chars, long tail), cut from a stream of random words
            lengths = np.clip(rng.lognormal(np.log(45), 0.7, batch), 3, 1000).astype(np.int64)
            stream = " ".join(vocab[rng.integers(0, len(vocab), int(lengths.sum()) // 4 + batch)])
            ends = np.cumsum(lengths)
            quoted = rng.random(batch) < 0.01
            hosts = rng.integers(0, 1 << 40, batch)
            heights, widths = rng.integers(64, 4000, batch), rng.integers(64, 4000, batch)
            sims, lic, tags = rng.random(batch) * 0.2 + 0.28, rng.integers(0, 5, batch), rng.integers(0, 10, batch)
            lines = []
            for i in range(batch):
                caption = stream[ends[i] - lengths[i] : ends[i]].strip() or "image"
                if quoted[i]:
                    caption = f'{caption} 12" vinyl'
                lines.append(
                    f"{rows + i}\thttps://cdn{hosts[i] % 97}.example.com/images/{hosts[i]:x}/{rows + i}-"
                    f"{caption[:24].replace(' ', '-')}.jpg\t{caption}\t{heights[i]}\t{widths[i]}\t{licences[lic[i]]}\t"
                    f"{nsfw[tags[i]]}\t{sims[i]:.6f}\n"
                )
            text = "".join(lines)
            f.write(text)
            written += len(text.encode())
            rows += batch
    return rows


def prepare(workdir: str, size_gb: float, input_format: str) -> tuple[str, int]:
    """The cached part for this size and format, generated on first use; (path, rows)."""
    os.makedirs(workdir, exist_ok=True)
    stem = os.path.join(workdir, f"laion-{size_gb:g}GB")
    meta_path = stem + ".json"
    tsv = stem + ".tsv"
    if not os.path.exists(meta_path):
        print(f"generating {tsv} (~{size_gb:g} GB, once)…", flush=True)
        # in a child: the parent stays small, since on Linux a child's ru_maxrss starts from its parent's peak
        cmd = [sys.executable, os.path.abspath(__file__), "--generate", tsv + ".tmp", "--size-gb", str(size_gb)]
        rows = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
        os.replace(tsv + ".tmp", tsv)
        with open(meta_path, "w") as f:
            json.dump({"rows": rows}, f)
    with open(meta_path) as f:
        rows = json.load(f)["rows"]
    if input_format == "tsv.gz" and not os.path.exists(tsv + ".gz"):
        print(f"compressing {tsv}.gz (once)…", flush=True)
        with open(tsv, "rb") as src, gzip.open(tsv + ".gz.tmp", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        os.replace(tsv + ".gz.tmp", tsv + ".gz")
    return (tsv + ".gz" if input_format == "tsv.gz" else tsv), rows


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    """Resident memory now (Linux /proc/self/status): the child's baseline after its imports."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def child(mode: str, path: str, input_format: str, shard: int, workdir: str) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if mode == "img2dataset":
        import pyarrow.feather as feather
        from img2dataset.reader import Reader
    else:
        from laion_vq.shards.text_index import load_or_build_index, read_text_rows
    baseline = rss_mb()
    index_dir = os.path.join(workdir, "text_index")
    start = time.perf_counter()
    if mode == "img2dataset":
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            reader = Reader(
                url_list=path,
                input_format=input_format,
                url_col="URL",
                caption_col="TEXT",
                verify_hash_col=None,
                verify_hash_type=None,
                save_additional_columns=["SAMPLE_ID", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"],
                number_sample_per_shard=SAMPLES_PER_SHARD,
                done_shards=set(),
                tmp_path=tmp,
            )
            table = next(feather.read_table(p) for shard_id, p in reader if shard_id == shard)
            urls = table.column("url")
    else:
        if mode == "ours-build":
            shutil.rmtree(index_dir, ignore_errors=True)
        index = load_or_build_index(path, input_format, SAMPLES_PER_SHARD, index_dir)
        table = read_text_rows(index, shard)
        urls = table.column("URL")
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mb": peak_mb(),
                "baseline_mb": baseline,
                "rows": table.num_rows,
                "first_url": urls[0].as_py(),
                "last_url": urls[-1].as_py(),
            }
        )
    )


def measure(mode: str, path: str, input_format: str, shard: int, workdir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--path", path, "--format", input_format]
    cmd += ["--shard", str(shard), "--workdir", workdir]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--format", choices=["tsv", "tsv.gz"], default="tsv")
    parser.add_argument("--shard", type=int, default=None, help="shard to read (default: the middle one)")
    parser.add_argument("--workdir", default="/tmp/bench_metadata_text")
    parser.add_argument("--child", choices=["img2dataset", "ours-build", "ours-read"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        print(generate(args.generate, int(args.size_gb * 1e9)))
        return
    if args.child:
        child(args.child, args.path, args.format, args.shard, args.workdir)
        return

    path, rows = prepare(args.workdir, args.size_gb, args.format)
    num_shards = -(-rows // SAMPLES_PER_SHARD)
    shard = num_shards // 2 if args.shard is None else args.shard
    results = {mode: measure(mode, path, args.format, shard, args.workdir) for mode in ("img2dataset", "ours-build")}
    results["ours-read"] = measure("ours-read", path, args.format, shard, args.workdir)
    same = {(r["rows"], r["first_url"], r["last_url"]) for r in results.values()}
    assert len(same) == 1, f"the readers disagree on shard {shard}: {same}"

    print(
        f"part: {os.path.getsize(path) / 1e6:.1f} MB {args.format}, {rows} rows, {num_shards} shards of "
        f"{SAMPLES_PER_SHARD}; shard {shard} ({results['ours-read']['rows']} rows, identical in all three)"
    )
    labels = {
        "img2dataset": "img2dataset Reader (whole file → feathers)",
        "ours-build": "ours, first read (scan + store index)",
        "ours-read": "ours, later reads (stored index)",
    }
    print(f"{'':44s} {'time (s)':>9s} {'peak MB':>9s} {'above imports MB':>17s}")
    for mode, r in results.items():
        print(f"{labels[mode]:44s} {r['seconds']:9.3f} {r['peak_mb']:9.1f} {r['peak_mb'] - r['baseline_mb']:17.1f}")
    ref = results["img2dataset"]
    for mode in ("ours-build", "ours-read"):
        r = results[mode]
        print(
            f"ratio img2dataset/{mode}: {ref['seconds'] / r['seconds']:.1f}x time, "
            f"{ref['peak_mb'] / r['peak_mb']:.1f}x peak memory "
            f"({(ref['peak_mb'] - ref['baseline_mb']) / max(r['peak_mb'] - r['baseline_mb'], 1):.1f}x above imports)"
        )


if __name__ == "__main__":
    main()
