"""The corrupted-shards report on fabricated records: every kind of verdict, exact totals, usage text, storage."""

from __future__ import annotations

import io
import os

import numpy as np
import polars as pl
import pytest
from PIL import Image
from polars.testing import assert_frame_equal

from laion_vq.report.shards import (
    CHECKS_SCHEMA,
    CODES_SCHEMA_REPORT,
    IMAGES_SCHEMA,
    METADATA_SCHEMA,
    build_report,
    code_usage_plot_png,
    corrupted_table,
    read_report,
    summary_markdown,
    write_report,
)
from laion_vq.report.usage import PREFIX, pack_code_usage, unpack_code_usage

META, TARS, CODES = "raw_metadata_shards_valid", "image_tars_complete", "code_parquets_contract"
N_EMBED = 16
NOW = 2000.0


def _check(shard, check, passed=True, severity="ERROR", reason=None, detail=None, at=NOW) -> dict:
    return dict(shard=shard, check=check, passed=passed, severity=severity, reason=reason, detail=detail, checked_at=at)


def _usage(shard: int) -> np.ndarray:
    usage = np.zeros(N_EMBED, np.int64)
    usage[shard : shard + 3] = [10 * (shard + 1), 5, 1]
    return usage


def _inputs() -> dict:
    """Ten shards, one of each kind (see the comments); the expected numbers in the tests follow from these."""
    ok = [_check(s, c) for s in ("00000", "00004", "00007") for c in (META, TARS, CODES)]
    checks = ok + [
        _check("00000", TARS, passed=False, reason="image hash mismatch", at=1000.0),  # older evaluation, superseded
        # 00001: corrupted by the tar check, as in the previous report → keeps its since
        _check("00001", TARS, passed=False, reason="image hash mismatch", detail="first bad key 000010003 | x"),
        # 00002: newly corrupted by two ERROR checks (earliest at 1900), plus a warning; the reason shown is
        # the first failing ERROR check's by name (in an order the verdict must not depend on)
        _check("00002", TARS, passed=False, severity="WARN", reason="low success rate", detail="70%"),
        _check("00002", META, passed=False, reason="missing rows", detail="99 of 100 rows", at=1900.0),
        _check("00002", CODES, passed=False, reason="code out of range", detail="codes span [0, 9000]"),
        # 00003: a warning only
        _check("00003", TARS, passed=False, severity="warn", reason="low success rate", detail="20%"),
        # 00005: excluded and failing
        _check("00005", TARS, passed=False, reason="tar truncated", detail="truncated at 000050007"),
        # 00006: corrupted by another check than in the previous report → new since
        _check("00006", CODES, passed=False, reason="code out of range", detail="codes span [0, 9001]"),
        _check("00006", TARS),
    ]
    metadata = [
        dict(shard=s, rows=100, materialized_at=900.0)
        for s in ("00000", "00001", "00002", "00003", "00005", "00006", "00007", "00009")
    ]
    images = [
        dict(shard=s, rows=100, successes=n, tar_bytes=n * 1000, materialized_at=950.0)
        for s, n in {"00000": 90, "00001": 80, "00002": 70, "00003": 20, "00005": 50, "00006": 60, "00007": 95}.items()
    ]
    codes = [
        dict(
            shard=s,
            encoded=n,
            undecodable=u,
            distinct_codes=3,
            code_usage=pack_code_usage(_usage(int(s))),
            checkpoint_sha256="abc",
            materialized_at=990.0,
        )
        for s, n, u in (("00000", 88, 2), ("00001", 80, 0), ("00002", 70, 0), ("00007", 95, 0))
    ]
    codes.append(
        dict(
            shard="00003",
            encoded=20,
            undecodable=0,
            distinct_codes=1,
            code_usage=pack_code_usage(np.ones(8, np.int64)),  # wrong n_embed: counted, not fatal
            checkpoint_sha256="abc",
            materialized_at=990.0,
        )
    )
    previous = pl.DataFrame(
        {
            "shard": ["00001", "00005", "00006", "00007"],
            "corrupted_by": [TARS, TARS, TARS, TARS],
            "corrupted_since": [500.0, 400.0, 600.0, 700.0],
        }
    )
    return dict(
        checks=pl.DataFrame(checks, schema=CHECKS_SCHEMA),
        metadata=pl.DataFrame(metadata, schema=METADATA_SCHEMA),
        images=pl.DataFrame(images, schema=IMAGES_SCHEMA),
        codes=pl.DataFrame(codes, schema=CODES_SCHEMA_REPORT),
        exclusions={"00004": "duplicate of 00000", "00005": "tar truncated at the source", "00008": "never made"},
        previous=previous,
        num_shards=10,
        n_embed=N_EMBED,
    )


def _rows(report) -> dict[str, dict]:
    return {row["shard"]: row for row in report.table.iter_rows(named=True)}


def test_verdicts_per_shard():
    report = build_report(**_inputs())
    rows = _rows(report)
    assert list(rows) == [f"{i:05d}" for i in range(10)]
    verdict = {s: (r["corrupted"], r["warned"], r["excluded"], r["corrupted_by"]) for s, r in rows.items()}
    assert verdict == {
        "00000": (False, False, False, None),  # its older failure was superseded
        "00001": (True, False, False, TARS),
        "00002": (True, False, False, f"{CODES},{META}"),
        "00003": (False, True, False, None),
        "00004": (False, False, True, None),
        "00005": (False, False, True, TARS),  # excluded wins: listed with its failure, never counted corrupted
        "00006": (True, False, False, CODES),
        "00007": (False, False, False, None),  # healed
        "00008": (False, False, True, None),
        "00009": (False, False, False, None),
    }
    since = {s: r["corrupted_since"] for s, r in rows.items() if r["corrupted_since"] is not None}
    assert since == {"00001": 500.0, "00002": 1900.0, "00005": 400.0, "00006": NOW}
    assert rows["00002"]["reason"] == "code out of range" and rows["00002"]["detail"] == "codes span [0, 9000]"
    assert rows["00003"]["reason"] == "low success rate"
    assert rows["00005"]["excluded_reason"] == "tar truncated at the source"
    assert rows["00005"][f"{TARS}__passed"] is False and rows["00005"][f"{TARS}__reason"] == "tar truncated"
    assert rows["00002"][f"{TARS}__severity"] == "WARN" and rows["00002"][f"{META}__checked_at"] == 1900.0
    assert rows["00000"]["success_rate"] == 0.9 and rows["00009"]["success_rate"] is None
    assert rows["00000"]["tar_bytes"] == 90_000 and rows["00000"]["undecodable"] == 2
    assert corrupted_table(report).get_column("shard").to_list() == [
        "00001", "00002", "00003", "00004", "00005", "00006", "00008",
    ]  # fmt: skip


def test_columns_in_documented_order():
    columns = build_report(**_inputs()).table.columns
    per_check = [
        f"{c}__{f}" for c in (CODES, TARS, META) for f in ("passed", "severity", "reason", "detail", "checked_at")
    ]
    assert columns == [
        "shard", "excluded", "excluded_reason", "metadata_rows", "image_rows", "successes", "success_rate",
        "tar_bytes", "removed", "filtered", "encoded", "undecodable", "distinct_codes", "checkpoint_sha256",
        *per_check,
        "corrupted", "warned", "corrupted_by", "reason", "detail", "corrupted_since",
    ]  # fmt: skip


def test_summary_numbers():
    report = build_report(**_inputs())
    assert report.summary == {
        "num_shards": 10,
        "shards_with_metadata": 8,
        "shards_downloaded": 7,
        "shards_encoded": 5,
        "images_attempted": 700,
        "images_downloaded": 465,
        "overall_success_rate": 465 / 700,
        "codes": 353,
        "images_removed": 0,
        "shards_with_removals": 0,
        "corrupted_shards": 3,
        "warned_shards": 1,
        "excluded_shards": 3,
        "corrupted_by_check": {CODES: 2, TARS: 1, META: 1},
        "corrupted_by_reason": {"code out of range": 2, "image hash mismatch": 1, "missing rows": 1},
        "warned_by_reason": {"low success rate": 1},
        "codebook_used": 8,  # codes 0..4 (shards 0-2) and 7..9 (shard 7)
        "n_embed": N_EMBED,
        "usage_unreadable_shards": 1,
    }
    expected = _usage(0) + _usage(1) + _usage(2) + _usage(7)
    assert report.code_usage.dtype == np.int64 and report.code_usage.tolist() == expected.tolist()


def test_corrupted_since_carries_through_written_reports(tmp_path):
    url = str(tmp_path / "reports" / "corrupted_shards.parquet")
    first = dict(_inputs(), previous=None)
    write_report(build_report(**first).table, url)
    later = _inputs()
    later["checks"] = later["checks"].with_columns(checked_at=pl.col("checked_at") + 5000)
    later["previous"] = read_report(url)
    since = {r["shard"]: r["corrupted_since"] for r in build_report(**later).table.iter_rows(named=True)}
    assert since["00001"] == NOW and since["00002"] == 1900.0 and since["00006"] == NOW  # kept from the first
    later["checks"] = later["checks"].filter(~((pl.col("shard") == "00002") & (pl.col("check") == META)))
    since = {r["shard"]: r["corrupted_since"] for r in build_report(**later).table.iter_rows(named=True)}
    assert since["00002"] == NOW + 5000  # now corrupted by other checks: a new since


def test_empty_inputs_give_an_empty_report():
    report = build_report(
        checks=None,
        metadata=pl.DataFrame([], schema=METADATA_SCHEMA),
        images=None,
        codes=None,
        exclusions={},
        num_shards=10000,
        n_embed=8192,
    )
    assert report.table.height == 0 and "corrupted_since" in report.table.columns
    assert report.summary["corrupted_shards"] == 0 and report.summary["overall_success_rate"] == 0.0
    assert report.code_usage.shape == (8192,) and not report.code_usage.any()
    assert summary_markdown(report).startswith("- **0 corrupted** of 10000 shards")


def test_missing_input_column_is_named():
    with pytest.raises(ValueError, match=r"images frame lacks column\(s\) \['tar_bytes'\]"):
        build_report(
            checks=None,
            metadata=None,
            images=pl.DataFrame({"shard": ["00000"], "rows": [1], "successes": [1], "materialized_at": [1.0]}),
            codes=None,
            exclusions={},
            num_shards=1,
            n_embed=16,
        )


def test_write_read_round_trip_is_atomic(tmp_path):
    report = build_report(**_inputs())
    url = str(tmp_path / "reports" / "corrupted_shards.parquet")
    assert read_report(url) is None
    assert write_report(report.table, url) > 0
    write_report(report.table, url)  # replacing leaves one file too
    assert os.listdir(tmp_path / "reports") == ["corrupted_shards.parquet"]
    assert_frame_equal(read_report(url), report.table)


def test_summary_markdown():
    report = build_report(**_inputs())
    text = summary_markdown(report)
    assert text.startswith("- **3 corrupted** of 10 shards\n- 1 warned, 3 excluded\n- 465 of 700 images")
    assert f"| 00001 | {TARS} | image hash mismatch | 1970-01-01T00:08:20Z |" in text
    assert "- `00001`: first bad key 000010003 \\| x" in text  # the long detail in a list, where it wraps
    assert f"- `00005`: tar truncated at the source (failing: {TARS})" in text and "- `00008`: never made\n" in text
    assert "**Warned shards** (quality, not corruption: encoded like the rest)\n\n- `00003`: 20%\n" in text
    assert "… and 2 more" in summary_markdown(report, limit=1)


def test_code_usage_plot_is_a_png():
    usage = np.bincount(np.random.default_rng(0).zipf(1.3, 100_000) % 8192, minlength=8192)
    image = Image.open(io.BytesIO(code_usage_plot_png(usage)))
    assert image.format == "PNG" and image.size == (512, 128)


def test_usage_round_trip():
    rng = np.random.default_rng(1)
    counts = rng.multinomial(10_000_000, rng.dirichlet(np.ones(8192)))
    text = pack_code_usage(counts)
    assert text.startswith(PREFIX) and text.isascii()
    back = unpack_code_usage(text, 8192)
    assert back.dtype == np.int64 and np.array_equal(back, counts)
    assert np.array_equal(unpack_code_usage(pack_code_usage(np.array([0, 2**32 - 1])), 2), [0, 2**32 - 1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("u32z2:AAAA", "must start with 'u32z1:'"),
        ("eJzz", "must start with"),
        (PREFIX + "not base64!", "not valid base64 zlib"),
        (PREFIX + "AAAA", "not valid base64 zlib"),
        (pack_code_usage(np.ones(8, np.int64)), r"holds 8 counts \(32 bytes\), expected n_embed=16"),
    ],
)
def test_unpack_refuses_bad_text(text, message):
    with pytest.raises(ValueError, match=message):
        unpack_code_usage(text, 16)


@pytest.mark.parametrize(
    "counts", [np.array([1, -1]), np.array([2**32]), np.array([1.5]), np.zeros((2, 2), np.int64), np.array([], int)]
)
def test_pack_refuses_what_uint32_cannot_hold(counts):
    with pytest.raises(ValueError, match="code usage"):
        pack_code_usage(counts)


def test_code_usage_comes_from_the_footers_and_each_footer_is_read_once(tmp_path):
    """The histograms live in the code parquets' footers (not in the UI's metadata); the report's cache means
    a later report reads only the footers of shards encoded since."""
    import pyarrow as pa

    from laion_vq.report.usage import cached_code_usage
    from laion_vq.shards.codes import write_codes_parquet

    files = {}
    for shard in range(3):
        path = str(tmp_path / f"{shard:05d}.parquet")
        meta = {"model": "m"} if shard == 2 else {"model": "m", "code_usage": pack_code_usage(_usage(shard))}
        write_codes_parquet(pa.table({"key": [f"{shard:05d}0000"]}), path, meta)  # shard 2: an older file
        files[f"{shard:05d}"] = (path, 100.0 + shard)
    cache = str(tmp_path / "reports" / "code_usage_m.parquet")

    texts, read = cached_code_usage(cache, files)
    assert read == 3 and texts["00002"] is None
    assert [unpack_code_usage(texts[k], N_EMBED).tolist() for k in ("00000", "00001")] == [
        _usage(0).tolist(),
        _usage(1).tolist(),
    ]
    assert cached_code_usage(cache, files) == (texts, 0)  # nothing new: no footer read
    # shard 1 re-encoded (new materialization, new footer): only its footer is read again
    write_codes_parquet(pa.table({"key": ["000010000"]}), files["00001"][0], {"code_usage": pack_code_usage(_usage(5))})
    files["00001"] = (files["00001"][0], 200.0)
    texts, read = cached_code_usage(cache, files)
    assert read == 1 and unpack_code_usage(texts["00001"], N_EMBED).tolist() == _usage(5).tolist()
