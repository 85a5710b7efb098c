"""Removal lists on real shard files: tars written with tarfile around real JPEGs, status parquets, stats
jsons and two code versions; parse the lists, plan from the status parquets, apply, re-apply, crash."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_vq.audit.codes import audit_code_shard
from laion_vq.audit.images import audit_image_shard
from laion_vq.removals import (
    RemovalListError,
    apply_plan,
    parse_removal_list,
    plan_removals,
    read_ledger,
    read_removal_lists,
    removed_keys,
)
from laion_vq.removals import apply as apply_module
from laion_vq.removals import lists as lists_module
from laion_vq.report.usage import unpack_code_usage
from laion_vq.shards.codes import build_codes_table, write_codes_parquet
from laion_vq.shards.storage import StorageLayout, publish_bytes, read_bytes

SHARDS = 8
ROWS = 6
GRID = 4
N_EMBED = 16
MODELS = ("tiny_a", "tiny_b")
NOW = dt.datetime(2024, 9, 2, 12, 0, tzinfo=dt.UTC)
SHA_X = hashlib.sha256(b"never downloaded").hexdigest()


def _url(shard: int, i: int) -> str:
    if shard == 2 and i in (1, 4):  # a subdomain and the domain itself, one failed download
        return f"https://{'cdn.' if i == 1 else ''}Blocked.example/p/{i}.jpg"
    if shard == 5 and i == 0:  # ends with the blocked domain's text but is another host
        return "https://notblocked.example/x.jpg"
    return f"https://img{shard}.example.org/{i}.jpg"


def _jpeg(shard: int, i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (shard * 30 % 256, i * 40 % 256, 99)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def make_shard(layout: StorageLayout, shard: int) -> None:
    """One shard's four files (rows 3 failed, the others in the tar; shard 6's row 5 undecodable)."""
    rows = []
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w") as tar:
        for i in range(ROWS):
            key = f"{shard:05d}{i:04d}"
            ok = i != 3 and not (shard == 2 and i == 4)
            image = _jpeg(shard, i) if ok else None
            rows.append(
                {
                    "SAMPLE_ID": shard * 1000 + i,
                    "caption": f"caption {shard} {i}",
                    "url": _url(shard, i),
                    "key": key,
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else f"HTTP Error 404 for {_url(shard, i)}",
                    "exif": "{}" if ok else None,
                    "sha256": hashlib.sha256(b"original" + key.encode()).hexdigest() if ok else None,
                    "failure_reason": None if ok else "404",
                    "jpg_sha256": hashlib.sha256(image).hexdigest() if ok else None,
                }
            )
            if ok:
                for ext, data in (("jpg", image), ("txt", rows[-1]["caption"].encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    publish_bytes(tar_buffer.getvalue(), layout.image_tar(shard))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    publish_bytes(buffer.getvalue(), layout.image_status(shard))
    failed = [r for r in rows if r["status"] != "success"]
    stats = {
        "count": ROWS,
        "successes": ROWS - len(failed),
        "failed_to_download": len(failed),
        "failed_to_resize": 0,
        "duration": 1.5,
        "status_dict": {"success": ROWS - len(failed), **{r["error_message"]: 1 for r in failed}},
        "laion_vq": {
            "failures_by_reason": {"404": len(failed)},
            "failure_examples": {"404": [r["url"] for r in failed]},
        },
    }
    publish_bytes(json.dumps(stats, indent=2).encode(), layout.image_stats(shard))
    undecodable = [f"{shard:05d}0005"] if shard == 6 else []
    encoded = [r for r in rows if r["status"] == "success" and r["key"] not in undecodable]
    keys = [r["key"] for r in encoded]
    meta = {r["key"]: r for r in encoded}
    for version, model in enumerate(MODELS):
        codes = np.random.default_rng(shard * 10 + version).integers(0, N_EMBED, (len(keys), GRID, GRID), np.int16)
        hashes = [r["jpg_sha256"] for r in encoded] if version == 0 else None  # tiny_b: the older layout
        usage = np.bincount(codes.ravel().astype(np.int64), minlength=N_EMBED)
        file_meta = {"model": model, "grid": GRID, "n_embed": N_EMBED, "shard": f"{shard:05d}"}
        file_meta.update(undecodable={"broken": len(undecodable)}, undecodable_keys=undecodable)
        if version == 0:
            from laion_vq.report.usage import pack_code_usage

            file_meta["code_usage"] = pack_code_usage(usage)
        write_codes_parquet(build_codes_table(keys, codes, meta, hashes), layout.code_shard(model, shard), file_meta)


CSV_LIST = """url,domain,sample_id,key,image_sha256,reason,date
https://img1.example.org/2.jpg,,,,,takedown 17: photographer,2024-09-01
,blocked.example,,,,domain owner request,2024-09-01
# operators may comment
,,,00006{k0},,takedown 18,2024-09-02
https://nowhere.example/none.jpg,,,,,takedown 19,2024-09-02
"""


def write_lists(layout: StorageLayout) -> None:
    publish_bytes(CSV_LIST.replace("{k0}", "0000").encode(), f"{layout.root}/removals/takedowns.csv")
    shard6_jpg = hashlib.sha256(_jpeg(6, 1)).hexdigest()
    shard6_original = hashlib.sha256(b"original000060002").hexdigest()
    table = pa.table(
        {
            "image_sha256": [shard6_jpg.upper(), shard6_original, None, SHA_X],
            "sample_id": [None, None, 6004, None],
            "reason": ["hash list A", "hash list A", "hash list A", "hash list A"],
            "date": [dt.date(2024, 8, 30)] * 4,
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    publish_bytes(buffer.getvalue(), f"{layout.root}/removals/hashes.parquet")


@pytest.fixture()
def layout(tmp_path) -> StorageLayout:
    layout = StorageLayout(str(tmp_path / "data"))
    for shard in range(SHARDS):
        make_shard(layout, shard)
    write_lists(layout)
    return layout


def snapshot(layout: StorageLayout, shard: int) -> dict[str, tuple[bytes, int]]:
    paths = [layout.image_tar(shard), layout.image_status(shard), layout.image_stats(shard)]
    paths += [layout.code_shard(m, shard) for m in MODELS]
    return {p: (read_bytes(p), os.stat(p).st_mtime_ns) for p in paths}


def kept_bytes(data: bytes, gone: set[str]) -> bytes:
    """The tar's bytes with `gone`'s members (header to padded data end) cut out, the rest as it was."""
    out, position = [], 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if member.name.split(".")[0] in gone:
                out.append(data[position : member.offset])
                position = member.offset_data + -(-member.size // 512) * 512
    return b"".join([*out, data[position:]])


def tar_members(url: str) -> dict[str, bytes]:
    with tarfile.open(url) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


# --- parsing ---------------------------------------------------------------------------------------------


def test_lists_parse_every_identifier_kind(layout):
    lists = {lst.name: lst for lst in read_removal_lists(layout)}
    assert sorted(lists) == ["hashes.parquet", "takedowns.csv"]
    csv_list = lists["takedowns.csv"]
    assert csv_list.count == 4
    assert [(i.kind, i.line) for i in csv_list.items] == [("url", 2), ("domain", 3), ("key", 5), ("url", 6)]
    assert csv_list.sha256 == hashlib.sha256(read_bytes(f"{layout.root}/removals/takedowns.csv")).hexdigest()
    parquet_list = lists["hashes.parquet"]
    assert [i.kind for i in parquet_list.items] == ["image_sha256", "image_sha256", "sample_id", "image_sha256"]
    assert parquet_list.items[0].value == hashlib.sha256(_jpeg(6, 1)).hexdigest()  # lowercased
    assert parquet_list.items[2].value == "6004" and parquet_list.items[2].date == dt.date(2024, 8, 30)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (",,,,,no id,2024-01-01", "no identifier"),
        ("https://a.example/x.jpg,a.example,,,,two,2024-01-01", "2 identifiers (url, domain)"),
        (",,,,abc123,bad hash,2024-01-01", "not 64 hex characters"),
        (",,12,,,bad date,2024-13-01", "is not a date"),
        (",,12,,,bad date,01/02/2024", "is not a date"),
        (",,12.5,,,bad id,2024-01-01", "sample_id '12.5'"),
        (",,-3,,,bad id,2024-01-01", "sample_id '-3'"),
        (",,,0001,,short key,2024-01-01", "key '0001'"),
        (",https://x.example,,,,scheme,2024-01-01", "not a host name"),
        (",,7,,,,2024-01-01", "reason is empty"),
    ],
)
def test_malformed_csv_line_names_file_and_line(row, message):
    text = "url,domain,sample_id,key,image_sha256,reason,date\n,,1,,,fine,2024-01-01\n\n" + row + "\n"
    with pytest.raises(RemovalListError, match="removals/bad.csv: line 4") as err:
        parse_removal_list(text.encode(), "bad.csv", source="removals/bad.csv")
    assert message in str(err.value)


def test_malformed_parquet_row_and_columns():
    def parquet(table: pa.Table) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return buffer.getvalue()

    bad = pa.table({"sample_id": [1, None], "key": [None, None], "reason": ["r", "r"], "date": ["2024-01-01"] * 2})
    with pytest.raises(RemovalListError, match=r"l.parquet: row 2: no identifier"):
        parse_removal_list(parquet(bad), "l.parquet")
    typo = pa.table({"sha256": ["a" * 64], "reason": ["r"], "date": ["2024-01-01"]})
    with pytest.raises(RemovalListError, match=r"unknown column\(s\) \['sha256'\]"):
        parse_removal_list(parquet(typo), "l.parquet")
    with pytest.raises(RemovalListError, match=r"t.csv: line 3: url 'https://a.example/x' is already listed at 2"):
        parse_removal_list(
            b"url,reason,date\nhttps://a.example/x,r,2024-01-01\nhttps://a.example/x,r,2024-01-02\n", "t.csv"
        )
    with pytest.raises(RemovalListError, match=r"t.csv: line 1 \(header\): missing column\(s\) \['date'\]"):
        parse_removal_list(b"url,reason\nhttps://a.example/x,r\n", "t.csv")


def test_a_bad_list_contributes_nothing_and_the_others_apply_fully(layout):
    good = plan_removals(layout)
    publish_bytes(
        b"key,reason,date\n000010001,fine,2024-01-01\n000010002,bad,yesterday\n", f"{layout.root}/removals/z.csv"
    )
    plan = plan_removals(layout)
    # z.csv's valid first row is not planned either: no shard is judged against half a list
    assert plan.shards == good.shards and [lst.name for lst in plan.lists] == [lst.name for lst in good.lists]
    assert [b.name for b in plan.broken] == ["z.csv"] and "z.csv: line 3" in plan.broken[0].error
    assert "date 'yesterday'" in plan.broken[0].error
    with pytest.raises(RemovalListError, match="z.csv: line 3"):  # the download's reader still refuses to act
        read_removal_lists(layout)


# --- planning --------------------------------------------------------------------------------------------


def test_plan_finds_three_of_eight_shards(layout):
    plan = plan_removals(layout)
    by_shard = {shard: sorted({(m.key, m.item.kind) for m in ms}) for shard, ms in plan.shards.items()}
    assert by_shard == {
        "00001": [("000010002", "url")],
        "00002": [("000020001", "domain"), ("000020004", "domain")],
        "00006": [
            ("000060000", "key"),
            ("000060001", "image_sha256"),
            ("000060002", "image_sha256"),
            ("000060004", "sample_id"),
        ],
    }
    assert sorted(i.value for i in plan.unmatched) == [SHA_X, "https://nowhere.example/none.jpg"]
    assert plan.already_removed == ()
    assert plan.keys == 7


def test_plan_reads_older_status_parquets(layout):
    """A status parquet from before `jpg_sha256` was added, with an int32 SAMPLE_ID, is scanned all the same."""
    old = pq.read_table(layout.image_status(7)).drop_columns(["jpg_sha256"])
    old = old.set_column(0, "SAMPLE_ID", old.column("SAMPLE_ID").cast(pa.int32()))
    buffer = io.BytesIO()
    pq.write_table(old, buffer)
    publish_bytes(buffer.getvalue(), layout.image_status(7))
    publish_bytes(b"sample_id,reason,date\n7001,older shard,2024-09-01\n", f"{layout.root}/removals/older.csv")
    plan = plan_removals(layout)
    assert [m.key for m in plan.shards["00007"]] == ["000070001"]
    assert sorted(plan.shards) == ["00001", "00002", "00006", "00007"]


# --- applying --------------------------------------------------------------------------------------------


def test_apply_removes_everywhere_and_leaves_the_rest(layout):
    before = {shard: snapshot(layout, shard) for shard in range(SHARDS)}
    old_members = {shard: tar_members(layout.image_tar(shard)) for shard in (1, 2, 6)}
    plan = plan_removals(layout)
    results = apply_plan(layout, plan, now=NOW)
    assert [r.shard for r in results] == ["00001", "00002", "00006"]
    removed = {"00001": {"000010002"}, "00002": {"000020001", "000020004"}}
    removed["00006"] = {"000060000", "000060001", "000060002", "000060004"}
    for shard in range(SHARDS):
        key = f"{shard:05d}"
        if key not in removed:
            assert snapshot(layout, shard) == before[shard], f"shard {key} was touched"
            continue
        gone = removed[key]
        members = tar_members(layout.image_tar(shard))
        assert read_bytes(layout.image_tar(shard)) == kept_bytes(before[shard][layout.image_tar(shard)][0], gone)
        assert {name: data for name, data in old_members[shard].items() if name.split(".")[0] not in gone} == members
        old_status = pq.read_table(io.BytesIO(before[shard][layout.image_status(shard)][0])).to_pylist()
        for row, old_row in zip(pq.read_table(layout.image_status(shard)).to_pylist(), old_status, strict=True):
            if row["key"] in gone:
                assert row["status"] == "removed" and row["failure_reason"]
                assert row["url"] is not None and row["caption"] is None and row["error_message"] is None
                assert (row["SAMPLE_ID"], row["sha256"]) == (old_row["SAMPLE_ID"], old_row["sha256"])
            else:
                assert row == old_row
        stats = json.loads(read_bytes(layout.image_stats(shard)))
        assert stats["removed"] == len(gone)
        assert (
            stats["count"]
            == stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"] + stats["removed"]
        )
        for model in MODELS:
            url = layout.code_shard(model, shard)
            old = pq.read_table(io.BytesIO(before[shard][url][0]))
            new = pq.read_table(url)
            assert not gone & set(new.column("key").to_pylist())
            kept = old.filter(pa.array([k not in gone for k in old.column("key").to_pylist()]))
            assert new.column("code").to_pylist() == kept.column("code").to_pylist()
            assert new.schema.metadata == {**old.schema.metadata, **new.schema.metadata}
            meta = json.loads(new.schema.metadata[b"laion_vq"])
            if "code_usage" in meta:
                codes = np.frombuffer(b"".join(new.column("code").to_pylist()), "<i2")
                assert (unpack_code_usage(meta["code_usage"], N_EMBED) == np.bincount(codes, minlength=N_EMBED)).all()
            assert audit_code_shard(layout, model, key, GRID, N_EMBED).errors == []
        assert audit_image_shard(layout, key).errors == []
    assert json.loads(read_bytes(layout.image_stats(2)))["laion_vq"]["failure_examples"] == {
        "404": ["https://img2.example.org/3.jpg"]
    }
    assert json.loads(read_bytes(layout.image_stats(2)))["failed_to_download"] == 1

    ledger = read_ledger(layout)
    assert ledger.height == 7
    assert set(ledger.columns) == set(lists_module.LEDGER_SCHEMA)
    row = ledger.filter(ledger["key"] == "000060001").to_dicts()[0]
    assert row["list_name"] == "hashes.parquet" and row["reason"] == "hash list A" and row["applied_at"] == NOW
    assert row["files_changed"] == [
        "codes/tiny_a/00006.parquet",
        "codes/tiny_b/00006.parquet",
        "images/00006.tar",
        "images/00006_stats.json",
        "images/00006.parquet",
    ]
    assert "caption" not in " ".join(ledger.columns)

    # re-applying: nothing to do, nothing touched, the listed items reported as already removed
    after = {shard: snapshot(layout, shard) for shard in range(SHARDS)}
    again = plan_removals(layout)
    assert again.shards == {}
    assert len(again.already_removed) == 6 and len(again.unmatched) == 2
    assert apply_plan(layout, again) == []
    assert {shard: snapshot(layout, shard) for shard in range(SHARDS)} == after
    assert read_ledger(layout).height == 7


def test_removed_keys_name_their_list_and_reason(layout):
    lists = read_removal_lists(layout)
    # shard 1's listed row withheld at download: in no ledger, its list is found by matching the row (by url)
    status = pq.read_table(io.BytesIO(read_bytes(layout.image_status(1))))
    withheld = apply_module.removed_status(status, {"000010002": "takedown 17: photographer"})
    buffer = io.BytesIO()
    pq.write_table(withheld, buffer)
    publish_bytes(buffer.getvalue(), layout.image_status(1))
    apply_plan(layout, plan_removals(layout, lists), NOW)
    assert [(r.key, r.list_name, r.reason) for r in removed_keys(layout, "00001", lists)] == [
        ("000010002", "takedowns.csv", "takedown 17: photographer")
    ]
    assert [(r.key, r.list_name, r.reason) for r in removed_keys(layout, "00006", lists)] == [
        ("000060000", "takedowns.csv", "takedown 18"),
        ("000060001", "hashes.parquet", "hash list A"),
        ("000060002", "hashes.parquet", "hash list A"),
        ("000060004", "hashes.parquet", "hash list A"),
    ]
    assert removed_keys(layout, "00000", lists) == []
    # a list deleted since: the reason stays, no list is named
    assert [r.list_name for r in removed_keys(layout, "00001", [])] == [None]


@pytest.mark.parametrize(
    "crash_at", ["images/00006.tar", "images/00006_stats.json", "removals/applied.parquet", "images/00006.parquet"]
)
def test_crash_between_files_converges(layout, tmp_path, monkeypatch, crash_at):
    reference = StorageLayout(str(tmp_path / "reference"))
    for shard in range(SHARDS):
        make_shard(reference, shard)
    write_lists(reference)
    apply_plan(reference, plan_removals(reference), now=NOW)

    def crashing(publish):
        def publish_or_crash(source, dest):
            if dest.endswith(crash_at):
                raise OSError(f"killed before {crash_at}")
            return publish(source, dest)

        return publish_or_crash

    monkeypatch.setattr(apply_module, "publish_bytes", crashing(apply_module.publish_bytes))
    monkeypatch.setattr(apply_module, "publish_file", crashing(apply_module.publish_file))
    monkeypatch.setattr(lists_module, "publish_bytes", crashing(lists_module.publish_bytes))  # the ledger
    plan = plan_removals(layout)
    with pytest.raises(OSError, match="killed"):
        apply_plan(layout, plan, now=NOW)
    monkeypatch.undo()
    apply_plan(layout, plan_removals(layout), now=NOW)
    for shard in range(SHARDS):
        ours, theirs = snapshot(layout, shard), snapshot(reference, shard)
        for (path, (data, _)), (_, (expected, _)) in zip(sorted(ours.items()), sorted(theirs.items()), strict=True):
            assert data == expected, f"{path} differs from an uninterrupted run"
    assert (
        read_ledger(layout)
        .drop("files_changed")
        .sort("key")
        .equals(read_ledger(reference).drop("files_changed").sort("key"))
    )
    assert plan_removals(layout).shards == {}


KILL_BEFORE = """
import os, signal, sys
from laion_vq.removals import apply as apply_module, plan_removals, apply_plan
from laion_vq.shards.storage import StorageLayout
root, target = sys.argv[1], sys.argv[2]
publish = apply_module.publish_bytes

def publish_or_die(data, dest):
    if dest.endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies here, as under the OOM killer or `kill -9`
    return publish(data, dest)

apply_module.publish_bytes = publish_or_die
layout = StorageLayout(root)
apply_plan(layout, plan_removals(layout))
"""


def test_sigkill_mid_application_then_a_rerun_converges(layout, tmp_path):
    """A real SIGKILL (not an exception) after the tar and the ledger, before the status parquet commits."""
    import signal
    import subprocess
    import sys

    reference = StorageLayout(str(tmp_path / "reference"))
    for shard in range(SHARDS):
        make_shard(reference, shard)
    write_lists(reference)
    apply_plan(reference, plan_removals(reference), now=NOW)

    died = subprocess.run([sys.executable, "-c", KILL_BEFORE, layout.root, "images/00006.parquet"], timeout=120)
    assert died.returncode == -signal.SIGKILL
    assert plan_removals(layout).shards  # the status did not commit: the work is still planned
    apply_plan(layout, plan_removals(layout), now=NOW)
    for shard in range(SHARDS):
        ours, theirs = snapshot(layout, shard), snapshot(reference, shard)
        for (path, (data, _)), (_, (expected, _)) in zip(sorted(ours.items()), sorted(theirs.items()), strict=True):
            assert data == expected, f"{path} differs from an uninterrupted run"
    assert plan_removals(layout).shards == {}


# --- object storage --------------------------------------------------------------------------------------


def test_plan_and_apply_on_s3(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        port = server._server.server_address[1]
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(key, value)
        fsspec.filesystem("s3").clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket="laion")
        layout = StorageLayout("s3://laion/data")
        for shard in (1, 2, 3):
            make_shard(layout, shard)
        write_lists(layout)
        plan = plan_removals(layout)
        assert sorted(plan.shards) == ["00001", "00002"]
        apply_plan(layout, plan, now=NOW)
        with tarfile.open(fileobj=io.BytesIO(read_bytes(layout.image_tar(1)))) as tar:
            assert "000010002.jpg" not in tar.getnames() and "000010001.jpg" in tar.getnames()
        assert read_ledger(layout).height == 3
        assert plan_removals(layout).shards == {}
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
        server.stop()
