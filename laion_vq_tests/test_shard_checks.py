"""Corrupted shards, seen per partition. Twelve shards go through the real pipeline (loopback downloads,
the tiny f8 encoder, a real instance — SQLite and PostgreSQL); then each defect is fabricated on storage on
its own shard and the audit job runs as the nightly schedule runs it. Each defect is caught by the right
check, on the right partition, with the right reason and first bad key, and nothing else is flagged; the
instance's per-partition state (what the check's Partitions page shows) and Dagster's rolled-up state say
the same; the report lists exactly those shards; the excluded shard is skipped with its record; the dataset
card leaves the corrupted shards out; the encoder refuses a shard whose tar check failed."""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionResolvedStatus
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from laion_vq.defs.assets import code_parquets, corrupted_shards_report, image_tars, raw_metadata_shards
from laion_vq.defs.check_state import CODES_CHECK, IMAGES_CHECK, METADATA_CHECK, SHARD_CHECK_KEYS, latest_results
from laion_vq.defs.checks import SHARD_CHECKS
from laion_vq.defs.jobs import check_job
from laion_vq.defs.partitions import shard_partitions
from laion_vq.defs.resources import DownloaderResource, LaionMetadataResource, StorageResource, VQGANEncoderResource
from laion_vq.download.img2dataset_shard import expected_key
from laion_vq.shards.exclusions import write_exclusions
from laion_vq.shards.storage import StorageLayout
from laion_vq.testing.dagster_services import postgres_database
from laion_vq.testing.synthetic_metadata import write_parts

from .conftest import TINY_MODEL

SAMPLES = 8
SHARDS = 12
INTACT, ZERO_SUCCESS, EXCLUDED = "00000", "00010", "00011"


def _urls(server) -> list[str]:  # ImageServer
    """Shard by shard: 8 photos each, except shard 10 whose 8 URLs are all 404 (a 0 % download)."""
    photos = server.photo_paths()
    urls = []
    for shard in range(SHARDS):
        for i in range(SAMPLES):
            path = f"/missing/{shard}-{i}.jpg" if shard == int(ZERO_SUCCESS) else photos[(shard + i) % len(photos)]
            urls.append(server.url(path))
    return urls


def _defs(tmp_path: Path, image_server, checkpoint: str) -> dg.Definitions:
    write_parts(str(tmp_path / "meta"), [_urls(image_server)], row_group_size=16)
    return dg.Definitions(
        assets=[raw_metadata_shards, image_tars, code_parquets, corrupted_shards_report],
        asset_checks=SHARD_CHECKS,
        jobs=[
            dg.define_asset_job("pipe", selection=[raw_metadata_shards, image_tars, code_parquets]),
            check_job,
            dg.define_asset_job("report", selection=[corrupted_shards_report]),
        ],
        resources={
            "storage": StorageResource(root=str(tmp_path / "data")),
            "metadata": LaionMetadataResource(source=str(tmp_path / "meta"), samples_per_shard=SAMPLES),
            "downloader": DownloaderResource(thread_count=8, timeout=5),
            "encoder": VQGANEncoderResource(model=TINY_MODEL, checkpoint=checkpoint, device="cpu", batch_size=8),
        },
        executor=dg.in_process_executor,
    )


def _rewrite_codes(layout: StorageLayout, shard: int, change) -> None:  # table → table
    """Apply `change` to a code parquet, keeping its key-value metadata (provenance)."""
    path = layout.code_shard(TINY_MODEL, shard)
    table = pq.read_table(path)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path)


def _set_codes(table: pa.Table, row: int, blob: bytes) -> pa.Table:
    codes = table.column("code").to_pylist()
    codes[row] = blob
    return table.set_column(table.column_names.index("code"), "code", pa.array(codes, pa.binary()))


def _fabricate_defects(layout: StorageLayout) -> dict[tuple[str, str], tuple[str, str | None]]:
    """Damage shards 1–9 on storage, one defect each; → {(check, shard): (reason, first bad key or None)}."""
    expected: dict[tuple[str, str], tuple[str, str | None]] = {}
    # 1: the tar truncated to half its size
    tar = Path(layout.image_tar(1))
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])  # off a 512-byte boundary: mid-member
    expected[(IMAGES_CHECK.name, "00001")] = ("tar unreadable", None)
    # 2: one byte flipped inside a stored JPEG (the tar itself stays well-formed)
    with tarfile.open(layout.image_tar(2)) as t:
        member = next(m for m in t if m.name.endswith(".jpg"))
    data = bytearray(Path(layout.image_tar(2)).read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    Path(layout.image_tar(2)).write_bytes(bytes(data))
    expected[(IMAGES_CHECK.name, "00002")] = ("image hash mismatch", member.name[:-4])
    # 3: the status parquet says one of the tar's images failed
    status = pq.read_table(layout.image_status(3))
    statuses = status.column("status").to_pylist()
    flipped = statuses.index("success")
    statuses[flipped] = "failed_to_download"
    pq.write_table(status.set_column(status.column_names.index("status"), "status", pa.array(statuses)),
                   layout.image_status(3))  # fmt: skip
    flipped_key = status.column("key")[flipped].as_py()
    expected[(IMAGES_CHECK.name, "00003")] = ("status disagrees with tar", flipped_key)
    # … and the codes, made from that tar, no longer reconcile with the status: either file may be the wrong
    # one, so the code check says so too (same shard, its own reason)
    expected[(CODES_CHECK.name, "00003")] = ("extra keys", flipped_key)
    # 4: a 2046-byte code (one int16 short)
    keys4 = pq.read_table(layout.code_shard(TINY_MODEL, 4)).column("key").to_pylist()
    _rewrite_codes(layout, 4, lambda t: _set_codes(t, 2, t.column("code")[2].as_py()[:2046]))
    expected[(CODES_CHECK.name, "00004")] = ("wrong code size", keys4[2])
    # 5: a code outside [0, 8192)
    keys5 = pq.read_table(layout.code_shard(TINY_MODEL, 5)).column("key").to_pylist()

    def out_of_range(t: pa.Table) -> pa.Table:
        grid = np.frombuffer(t.column("code")[3].as_py(), np.int16).copy()
        grid[17] = 8192 + 5
        return _set_codes(t, 3, grid.tobytes())

    _rewrite_codes(layout, 5, out_of_range)
    expected[(CODES_CHECK.name, "00005")] = ("code out of range", keys5[3])
    # 6: a duplicated key (a row written twice)
    keys6 = pq.read_table(layout.code_shard(TINY_MODEL, 6)).column("key").to_pylist()
    _rewrite_codes(layout, 6, lambda t: pa.concat_tables([t.slice(0, 2), t.slice(1)]))
    expected[(CODES_CHECK.name, "00006")] = ("duplicate keys", keys6[1])
    # 7: a missing key (a downloaded image with no code row)
    keys7 = pq.read_table(layout.code_shard(TINY_MODEL, 7)).column("key").to_pylist()
    _rewrite_codes(layout, 7, lambda t: pa.concat_tables([t.slice(0, 4), t.slice(5)]))
    expected[(CODES_CHECK.name, "00007")] = ("missing keys", keys7[4])
    # 8: wrong dtype: codes stored as an int16 list column instead of raw bytes

    def as_lists(t: pa.Table) -> pa.Table:
        lists = [np.frombuffer(b, np.int16).tolist() for b in t.column("code").to_pylist()]
        return t.set_column(t.column_names.index("code"), "code", pa.array(lists, pa.list_(pa.int16())))

    _rewrite_codes(layout, 8, as_lists)
    expected[(CODES_CHECK.name, "00008")] = ("wrong code dtype", None)
    # 9: a metadata shard with a null URL
    meta = pq.read_table(layout.metadata_shard(9))
    urls = meta.column("URL").to_pylist()
    urls[6] = None
    pq.write_table(meta.set_column(meta.column_names.index("URL"), "URL", pa.array(urls, pa.string())),
                   layout.metadata_shard(9))  # fmt: skip
    expected[(METADATA_CHECK.name, "00009")] = ("null url", expected_key(9, 6, SAMPLES))  # img2dataset's key
    return expected


@contextlib.contextmanager
def _instance(kind: str, home: Path) -> Iterator[dg.DagsterInstance]:
    """A real instance: SQLite in a temp DAGSTER_HOME, or a fresh database on the machine's PostgreSQL."""
    home.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            yield instance
        return
    with postgres_database("laion_vq_checks") as url:
        yaml_text = f"storage:\n  postgres:\n    postgres_url: {url}\ntelemetry:\n  enabled: false\n"
        (home / "dagster.yaml").write_text(yaml_text)
        # entered, as Dagster's own tools do: definitions resolved inside read this instance's state storage
        # (not one an earlier test left behind in Dagster's context variable)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def audited(request, tmp_path_factory, image_server, tiny_checkpoint):
    """The pipeline over 12 shards (shard 11 excluded), the defects fabricated, the audit job run. Shared by
    the tests below, in file order (the last one re-encodes a shard)."""
    tmp_path = tmp_path_factory.mktemp(f"checks-{request.param}")
    with _instance(request.param, tmp_path / "dagster_home") as instance:
        yield from _audited(instance, tmp_path, image_server, tiny_checkpoint)


def _audited(instance: dg.DagsterInstance, tmp_path: Path, image_server, tiny_checkpoint: str):
    defs = _defs(tmp_path, image_server, tiny_checkpoint)
    layout = StorageLayout(str(tmp_path / "data"))
    write_exclusions(layout, {EXCLUDED: "fabricated: the source part is known bad"})
    run = defs.resolve_job_def("pipe").execute_in_process(
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: "00000", ASSET_PARTITION_RANGE_END_TAG: f"{SHARDS - 1:05d}"},
    )
    assert run.success
    expected = _fabricate_defects(layout)
    audit = defs.resolve_job_def(check_job.name).execute_in_process(instance=instance, raise_on_error=False)
    yield defs, instance, layout, expected, audit


def test_each_defect_is_caught_by_its_check_on_its_shard(audited) -> None:
    defs, instance, layout, expected, audit = audited
    evaluations = {(e.check_name, e.partition): e for e in audit.get_asset_check_evaluations()}
    # every shard but the excluded one, under each check; one result each, none unpartitioned
    shards = [f"{i:05d}" for i in range(SHARDS) if f"{i:05d}" != EXCLUDED]
    assert set(evaluations) == {(key.name, shard) for key in SHARD_CHECK_KEYS for shard in shards}
    errors = {k: e for k, e in evaluations.items() if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR}
    assert set(errors) == set(expected)  # each defect on its own shard, nothing else flagged
    for key, (reason, first_key) in expected.items():
        evaluation = errors[key]
        assert evaluation.metadata["reason"].value == reason, (key, evaluation.description)
        if first_key is not None:
            assert f"first {first_key}" in evaluation.description, (key, evaluation.description)
        what_to_do = evaluation.metadata["what_to_do"].value  # actions the UI allows, for this shard
        assert f"*Materialize*, partition `{key[1]}`" in what_to_do, what_to_do
        assert f"`laion_vq/shards` = `{key[1]}`" in what_to_do, what_to_do
    # the 0 % shard: a quality WARN on its tar, not corruption
    warned = {k for k, e in evaluations.items() if not e.passed and e.severity == dg.AssetCheckSeverity.WARN}
    assert warned == {(IMAGES_CHECK.name, ZERO_SUCCESS)}
    assert evaluations[(IMAGES_CHECK.name, ZERO_SUCCESS)].metadata["reason"].value == "low success rate"

    # read back from the instance: per partition (the check's Partitions page) …
    for key in SHARD_CHECK_KEYS:
        state = {r.shard: r for r in latest_results(instance, key)}
        assert set(state) == set(shards)
        assert all(r.current for r in state.values())  # each result targets the shard's latest materialization
        failed = {s for s, r in state.items() if not r.passed}
        assert failed == {s for (c, s) in [*expected, (IMAGES_CHECK.name, ZERO_SUCCESS)] if c == key.name}
        for shard in failed:
            assert state[shard].reason and state[shard].detail
    # … and Dagster's own rolled-up state: failed, because some shards failed
    rolled = instance.event_log_storage.get_asset_check_state([(k, shard_partitions) for k in SHARD_CHECK_KEYS])
    for key in SHARD_CHECK_KEYS:
        failed = rolled[key].subsets[AssetCheckExecutionResolvedStatus.FAILED].subset_value.get_partition_keys()
        assert set(failed) == {s for (c, s) in [*expected, (IMAGES_CHECK.name, ZERO_SUCCESS)] if c == key.name}


def test_the_report_lists_exactly_the_corrupted_shards(audited) -> None:
    defs, instance, layout, expected, _ = audited
    result = defs.resolve_job_def("report").execute_in_process(instance=instance)
    materialization = result.asset_materializations_for_node("corrupted_shards_report")[0]
    meta = {k: v.value for k, v in materialization.metadata.items()}
    report = pl.read_parquet(layout.corrupted_shards_report())
    corrupted = report.filter(pl.col("corrupted"))
    assert corrupted.get_column("shard").to_list() == sorted({s for _, s in expected})
    assert report.filter(pl.col("warned")).get_column("shard").to_list() == [ZERO_SUCCESS]
    assert report.filter(pl.col("excluded")).get_column("shard").to_list() == [EXCLUDED]
    by_shard = {row["shard"]: row for row in corrupted.to_dicts()}
    for (check, shard), _ in expected.items():
        assert check in by_shard[shard]["corrupted_by"].split(",")
        assert by_shard[shard]["corrupted_since"] > 0
    assert meta["corrupted_shards"] == 9 and meta["excluded_shards"] == 1 and meta["warned_shards"] == 1
    assert meta["corrupted_by_check"] == {IMAGES_CHECK.name: 3, CODES_CHECK.name: 6, METADATA_CHECK.name: 1}
    assert meta["codebook_usage"].startswith("![codebook usage")
    assert "00004" in meta["summary"] and "wrong code size" in meta["summary"]

    # the dataset card: only intact and warned shards' files, the corrupted and excluded ones named with why
    card = Path(layout.dataset_card(TINY_MODEL)).read_text()
    header = yaml.safe_load(card.split("---")[1])
    files = header["configs"][0]["data_files"][0]["path"]
    assert files == [f"{INTACT}.parquet", f"{ZERO_SUCCESS}.parquet"]
    assert "fabricated: the source part is known bad" in card and "RANDOM" in card.upper()
    assert all(shard in card for _, shard in expected)

    # a second report keeps each shard's `corrupted_since` (still the same checks failing)
    defs.resolve_job_def("report").execute_in_process(instance=instance)
    again = pl.read_parquet(layout.corrupted_shards_report()).filter(pl.col("corrupted"))
    assert again.select("shard", "corrupted_since").equals(corrupted.select("shard", "corrupted_since"))


def test_the_excluded_shard_is_skipped_with_its_record(audited) -> None:
    _, instance, layout, _, _ = audited
    for asset in ("raw_metadata_shards", "image_tars", "code_parquets"):
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[EXCLUDED]), limit=1
        ).records[0]
        assert record.asset_materialization.metadata["excluded"].value == "fabricated: the source part is known bad"
    assert not Path(layout.metadata_shard(11)).exists() and not Path(layout.image_tar(11)).exists()


def test_the_encoder_refuses_a_shard_whose_tar_check_failed(audited) -> None:
    defs, instance, layout, _, _ = audited
    before = Path(layout.code_shard(TINY_MODEL, 1)).read_bytes()
    result = dg.materialize(
        [code_parquets], partition_key="00001", instance=instance, resources=defs.resources, raise_on_error=False
    )
    assert not result.success
    failure = " ".join(
        e.step_failure_data.error.to_string() for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    )
    assert "image_tars_complete failed on this shard (tar unreadable" in failure
    assert Path(layout.code_shard(TINY_MODEL, 1)).read_bytes() == before
    # the intact shard next to it encodes as before
    assert dg.materialize([code_parquets], partition_key=INTACT, instance=instance, resources=defs.resources).success
    assert pq.read_table(io.BytesIO(Path(layout.code_shard(TINY_MODEL, 0)).read_bytes())).num_rows == SAMPLES
