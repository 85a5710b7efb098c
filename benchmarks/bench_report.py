"""The corrupted-shards report and dataset card at full size: 10,000 shards.

Fabricates one record set like the Dagster asset will read (3 checks per shard, metadata, images and codes
materializations with realistic packed code usage: 10,000 images × 1,024 codes per shard from a Zipf-ish
distribution over 8,192 codes; ~0.1% corrupted, some warned, a few excluded), then times in the same run:

- ours: frames from the records, `build_report` (and its usage summing alone), `write_report`,
  `read_report`, `included_code_files` + `dataset_card`;
- reference: the same aggregation (join by shard, verdicts, totals, usage sum) with plain Python dicts.

Prints seconds, records/s, the ratio reference/ours and the packed-usage size of one shard.

    python benchmarks/bench_report.py --shards 10000
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
import time
import zlib
from collections import Counter

import numpy as np
import polars as pl

from laion_vq.report.card import dataset_card, included_code_files
from laion_vq.report.shards import (
    CHECKS_SCHEMA,
    CODES_SCHEMA_REPORT,
    IMAGES_SCHEMA,
    METADATA_SCHEMA,
    build_report,
    sum_code_usage,
    write_report,
)
from laion_vq.report.usage import PREFIX, pack_code_usage, unpack_code_usage
from laion_vq.shards.schema import CODES_SCHEMA

CHECKS = ("raw_metadata_shards_valid", "image_tars_complete", "code_parquets_contract")
N_EMBED, CODES_PER_IMAGE, IMAGES_PER_SHARD = 8192, 1024, 10_000


def zipf_probabilities(rng: np.random.Generator, exponent: float = 1.1) -> np.ndarray:
    """A codebook used like a trained VQGAN's: a few codes very often, a long tail rarely, in no index order."""
    weights = 1.0 / np.arange(1, N_EMBED + 1) ** exponent
    return rng.permutation(weights / weights.sum())


def fabricate(shards: int, distinct_usages: int, seed: int = 0) -> tuple[dict, dict]:
    """Records as lists of dicts (what the asset collects from the event log), and facts about the usage text."""
    rng = np.random.default_rng(seed)
    probabilities = zipf_probabilities(rng)
    usages, pack_seconds = [], 0.0
    for _ in range(distinct_usages):  # packing is the encoder's per-shard cost; the report only decodes
        counts = rng.multinomial(int(IMAGES_PER_SHARD * 0.9) * CODES_PER_IMAGE, probabilities)
        started = time.perf_counter()
        usages.append(pack_code_usage(counts))
        pack_seconds += (time.perf_counter() - started) / distinct_usages
    raw = counts.astype("<u4").tobytes()
    shuffled = np.frombuffer(raw, np.uint8).reshape(-1, 4).T.tobytes()  # byte planes: a possible later format
    usage_facts = {
        "chars": len(usages[-1]),
        "raw_bytes": len(raw),
        "distinct_codes": int(np.count_nonzero(counts)),
        "pack_ms": pack_seconds * 1000,
        "shuffled_chars": len(PREFIX) + len(base64.b64encode(zlib.compress(shuffled, 9))),
    }

    now = 1.7e9
    corrupted = set(rng.choice(shards, max(1, shards // 1000), replace=False).tolist())
    warned = set(rng.choice(shards, max(1, shards // 100), replace=False).tolist()) - corrupted
    excluded = {int(s): f"excluded by ticket {i}" for i, s in enumerate(rng.choice(shards, 7, replace=False))}
    records: dict[str, list[dict]] = {"checks": [], "metadata": [], "images": [], "codes": []}
    for shard in range(shards):
        key = f"{shard:05d}"
        successes = int(rng.integers(8_500, 9_500)) if shard not in warned else int(rng.integers(500, 2_500))
        for check in CHECKS:
            failing_error = shard in corrupted and check == "image_tars_complete"
            failing_warn = shard in warned and check == "image_tars_complete"
            records["checks"].append(
                {
                    "shard": key,
                    "check": check,
                    "passed": not (failing_error or failing_warn),
                    "severity": "WARN" if failing_warn else "ERROR",
                    "reason": "image hash mismatch" if failing_error else "low success rate" if failing_warn else None,
                    "detail": f"{key}0042: sha256 differs from the download" if failing_error else None,
                    "checked_at": now + shard,
                }
            )
        records["metadata"].append({"shard": key, "rows": IMAGES_PER_SHARD, "materialized_at": now})
        records["images"].append(
            {"shard": key, "rows": IMAGES_PER_SHARD, "successes": successes, "tar_bytes": successes * 14_000,
             "materialized_at": now}
        )  # fmt: skip
        records["codes"].append(
            {"shard": key, "encoded": successes - 3, "undecodable": 3, "distinct_codes": usage_facts["distinct_codes"],
             "code_usage": usages[shard % distinct_usages], "checkpoint_sha256": "ab" * 32, "materialized_at": now}
        )  # fmt: skip
    return {**records, "exclusions": {f"{s:05d}": r for s, r in excluded.items()}}, usage_facts


def reference_report(records: dict, n_embed: int) -> dict:
    """The same aggregation with dict loops: what a first version without polars would do."""
    rows: dict[str, dict] = {}
    for kind in ("metadata", "images", "codes"):
        for record in records[kind]:
            rows.setdefault(record["shard"], {}).update({f"{kind}.{k}": v for k, v in record.items()})
    failing: dict[str, list[dict]] = {}
    for record in records["checks"]:
        row = rows.setdefault(record["shard"], {})
        for field in ("passed", "severity", "reason", "detail", "checked_at"):
            row[f"{record['check']}__{field}"] = record[field]
        if not record["passed"]:
            failing.setdefault(record["shard"], []).append(record)
    for shard in records["exclusions"]:
        rows.setdefault(shard, {})
    by_check: Counter[str] = Counter()
    corrupted = warned = 0
    for shard, row in rows.items():
        errors = sorted(r["check"] for r in failing.get(shard, []) if r["severity"] != "WARN")
        row["excluded"] = shard in records["exclusions"]
        row["corrupted"] = bool(errors) and not row["excluded"]
        row["warned"] = bool(failing.get(shard)) and not errors and not row["excluded"]
        row["corrupted_by"] = ",".join(errors) or None
        corrupted += row["corrupted"]
        warned += row["warned"]
        if row["corrupted"]:
            by_check.update(errors)
        attempted = row.get("images.rows")
        row["success_rate"] = row.get("images.successes", 0) / attempted if attempted else None
    usage = np.zeros(n_embed, np.int64)
    for record in records["codes"]:
        if record["code_usage"]:
            usage += unpack_code_usage(record["code_usage"], n_embed)
    return {
        "rows": dict(sorted(rows.items())),
        "corrupted": corrupted,
        "warned": warned,
        "by_check": dict(by_check),
        "images": sum(r["rows"] for r in records["images"]),
        "codebook_used": int(np.count_nonzero(usage)),
    }


def timed(fn, repeat: int = 1):
    """Best of `repeat` runs (the machine is shared: the minimum is the cost, the rest is noise)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--distinct-usages", type=int, default=100, help="distinct usage histograms, cycled")
    args = parser.parse_args()

    t_fab, (records, usage) = timed(lambda: fabricate(args.shards, args.distinct_usages))
    n_records = sum(len(records[k]) for k in ("checks", "metadata", "images", "codes"))
    print(f"fabricated {args.shards:,} shards, {n_records:,} records in {t_fab:.1f} s")
    print(
        f"packed code usage of one shard ({usage['distinct_codes']} of {N_EMBED} codes used, "
        f"{int(IMAGES_PER_SHARD * 0.9):,} images × {CODES_PER_IMAGE} codes): {usage['chars']:,} chars "
        f"(raw uint32 {usage['raw_bytes']:,} bytes; {usage['pack_ms']:.1f} ms to pack; byte-plane shuffle "
        f"before zlib would give ~{usage['shuffled_chars']:,} chars)"
    )

    def frames() -> dict:
        return {
            "checks": pl.DataFrame(records["checks"], schema=CHECKS_SCHEMA),
            "metadata": pl.DataFrame(records["metadata"], schema=METADATA_SCHEMA),
            "images": pl.DataFrame(records["images"], schema=IMAGES_SCHEMA),
            "codes": pl.DataFrame(records["codes"], schema=CODES_SCHEMA_REPORT),
        }

    t_frames, inputs = timed(frames)
    args_report = dict(**inputs, exclusions=records["exclusions"], num_shards=args.shards, n_embed=N_EMBED)
    build_report(**args_report)  # warm polars up; the asset's process does this once too
    t_build, report = timed(lambda: build_report(**args_report), repeat=3)
    no_usage = dict(args_report, codes=inputs["codes"].with_columns(code_usage=pl.lit(None, pl.String)))
    t_tables, _ = timed(lambda: build_report(**no_usage), repeat=3)
    t_usage, _ = timed(lambda: sum_code_usage(inputs["codes"], N_EMBED), repeat=3)
    t_ref, reference = timed(lambda: reference_report(records, N_EMBED), repeat=3)
    records_no_usage = dict(records, codes=[dict(r, code_usage=None) for r in records["codes"]])
    t_ref_tables, _ = timed(lambda: reference_report(records_no_usage, N_EMBED), repeat=3)
    assert reference["corrupted"] == report.summary["corrupted_shards"]
    assert reference["warned"] == report.summary["warned_shards"]
    assert reference["codebook_used"] == report.summary["codebook_used"]

    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "reports", "corrupted_shards.parquet")
        t_write, nbytes = timed(lambda: write_report(report.table, url))
        t_prev, _ = timed(lambda: build_report(**args_report, previous=pl.read_parquet(url)))
    listing = [f"{s:05d}.parquet" for s in range(args.shards)] + ["README.md"]
    t_card, card = timed(
        lambda: dataset_card(
            model="vqgan_gumbel_f8",
            provenance={
                "checkpoint": "last.ckpt",
                "checkpoint_sha256": "ab" * 32,
                "dtype": "fp32",
                "index_rule": "argmax",
            },  # fmt: skip
            report=report,
            included_files=included_code_files(report, listing),
            grid=32,
            n_embed=N_EMBED,
            code_columns=CODES_SCHEMA.names,
        )
    )
    s = report.summary
    print(f"report: {s['corrupted_shards']} corrupted, {s['warned_shards']} warned, {s['excluded_shards']} excluded")
    print(f"records → polars frames          {t_frames:6.3f} s")
    print(f"build_report                      {t_build:6.3f} s  ({n_records / t_build:,.0f} records/s)")
    print(f"  tables only (no usage text)     {t_tables:6.3f} s")
    print(f"  summing usage only              {t_usage:6.3f} s  ({args.shards / t_usage:,.0f} shards/s)")
    print(f"  with a previous report          {t_prev:6.3f} s")
    print(f"reference (dict loops, per-row unpack) {t_ref:6.3f} s → reference/ours {t_ref / t_build:.2f}×")
    print(f"  tables only                     {t_ref_tables:6.3f} s → {t_ref_tables / t_tables:.2f}×")
    print(f"  summing usage only              {t_ref - t_ref_tables:6.3f} s → {(t_ref - t_ref_tables) / t_usage:.2f}×")
    print(f"write_report                      {t_write:6.3f} s  ({nbytes / 1e6:.2f} MB parquet)")
    print(f"included_code_files+dataset_card  {t_card:6.3f} s  ({len(card) / 1e3:.0f} KB card)")
    total = t_frames + t_build + t_write + t_card
    print(f"total (frames, build, write, card) {total:5.3f} s for {args.shards:,} shards")


if __name__ == "__main__":
    main()
