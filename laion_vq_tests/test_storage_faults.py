"""Object-store faults on the S3 path, survived: moto's S3 server behind `StorageFaultProxy`, reached by real s3fs.

Each test schedules faults (500 InternalError, 503 SlowDown, reset or closed connections, answers stalled past the
read timeout) on reads or writes, runs the platform's storage functions, and checks both that they did their job
(the object byte-identical, nothing partial) and that the proxy really injected what was scheduled. A fault that
outlasts every attempt must fail with an error naming the URL, the fault and the attempts, leaving the old object
(or none) under the final name and no temporary object.
"""

from __future__ import annotations

import io
import os
import pickle
import uuid

import pyarrow.parquet as pq
import pytest

from laion_vq.shards.object_store import StorageUnavailableError, s3_client_config, s3_storage_options
from laion_vq.shards.storage import StorageLayout, exists, publish_bytes, publish_file, read_bytes, stored_shards
from laion_vq.testing.storage_faults import StorageFaultProxy

#: a short read timeout so a stalled answer costs about a second, and few attempts so a lasting fault ends soon
READ_TIMEOUT_S = 1.0
MAX_ATTEMPTS = 3


@pytest.fixture()
def faulty_s3(s3, monkeypatch):
    """(a fresh folder in the bucket, proxy): s3fs reaches moto only through the fault proxy. moto keeps its
    objects for the whole process, so each test gets its own folder."""
    import fsspec

    with StorageFaultProxy(os.environ["AWS_ENDPOINT_URL"], stall_s=READ_TIMEOUT_S + 2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("LAION_VQ_S3_RETRY_MODE", "standard")
        monkeypatch.setenv("LAION_VQ_S3_MAX_ATTEMPTS", str(MAX_ATTEMPTS))
        monkeypatch.setenv("LAION_VQ_S3_READ_TIMEOUT", str(READ_TIMEOUT_S))
        fsspec.filesystem("s3").clear_instance_cache()
        yield f"{s3}/{uuid.uuid4().hex[:12]}", proxy
        fsspec.filesystem("s3").clear_instance_cache()


def _objects(proxy: StorageFaultProxy, prefix: str) -> list[str]:
    """The keys under `prefix` (relative to it), asked of moto directly (not through the proxy, nor s3fs's cache)."""
    import boto3

    host, port = proxy.upstream
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    listing = client.list_objects_v2(Bucket=bucket, Prefix=key)
    return sorted(item["Key"].removeprefix(key) for item in listing.get("Contents", []))


# (fault, how many requests in a row get it): each burst is shorter than MAX_ATTEMPTS, so the request survives it
BURSTS = [("internal_error", 2), ("slow_down", 2), ("reset", 2), ("close", 1), ("stall", 1)]


def test_the_one_place_configures_botocore(monkeypatch):
    monkeypatch.setenv("LAION_VQ_S3_RETRY_MODE", "adaptive")
    monkeypatch.setenv("LAION_VQ_S3_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("LAION_VQ_S3_READ_TIMEOUT", "12")
    options = s3_storage_options()["config_kwargs"]
    assert options == {
        "retries": {"mode": "adaptive", "total_max_attempts": 7},
        "connect_timeout": 5.0,
        "read_timeout": 12.0,
    }
    # unset, AWS's own variables are respected; without them, the defaults
    monkeypatch.delenv("LAION_VQ_S3_RETRY_MODE")
    monkeypatch.delenv("LAION_VQ_S3_MAX_ATTEMPTS")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert (s3_client_config().retry_mode, s3_client_config().max_attempts) == ("adaptive", 3)
    monkeypatch.delenv("AWS_RETRY_MODE")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    assert (s3_client_config().retry_mode, s3_client_config().max_attempts) == ("standard", 10)
    from laion_vq.removals.plan import storage_options

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    polars = storage_options("s3://laion/run")
    assert polars is not None and polars["max_retries"] == 9 and polars["connect_timeout"] == "5000ms"


@pytest.mark.parametrize(("fault", "times"), BURSTS)
def test_writes_survive_a_burst(faulty_s3, tmp_path, fault, times):
    root, proxy = faulty_s3
    payload = os.urandom(300_000)
    local = tmp_path / "shard.tar"
    local.write_bytes(payload)

    proxy.inject(fault, on="write", times=times)
    assert publish_file(str(local), f"{root}/images/00012.tar") == len(payload)
    assert proxy.injected_count(fault, on="write") == times
    proxy.inject(fault, on="write", times=1)
    publish_bytes(b'{"ok": 1}', f"{root}/images/00012_stats.json")
    assert proxy.injected_count(fault, on="write") == times + 1

    assert proxy.injected_count(on="read") == 0
    assert read_bytes(f"{root}/images/00012.tar") == payload
    assert read_bytes(f"{root}/images/00012_stats.json") == b'{"ok": 1}'
    assert _objects(proxy, f"{root}/images/") == ["00012.tar", "00012_stats.json"]


@pytest.mark.parametrize(("fault", "times"), BURSTS)
def test_reads_survive_a_burst(faulty_s3, fault, times):
    root, proxy = faulty_s3
    payload = os.urandom(200_000)
    publish_bytes(payload, f"{root}/codes/m/00003.parquet")
    publish_bytes(b"x", f"{root}/codes/m/00004.parquet")

    proxy.inject(fault, on="read", times=times)
    assert read_bytes(f"{root}/codes/m/00003.parquet") == payload
    proxy.inject(fault, on="read", times=1)
    assert exists(f"{root}/codes/m/00003.parquet")
    proxy.inject(fault, on="read", times=1)
    assert stored_shards(f"{root}/codes/m", ".parquet") == {"00003", "00004"}
    assert proxy.injected_count(fault, on="read") == times + 2
    assert not exists(f"{root}/codes/m/00099.parquet")
    assert proxy.injected_count(on="write") == 0


def test_multipart_upload_survives_faults_on_its_parts(faulty_s3, tmp_path):
    """A file above s3fs's part size goes up in parts (POST, PUT × n, POST): faults on the parts are retried."""
    import fsspec

    root, proxy = faulty_s3
    payload = os.urandom(11 << 20)
    local = tmp_path / "big.tar"
    local.write_bytes(payload)
    fs = fsspec.filesystem("s3", **s3_storage_options())
    fs.retries = 1
    proxy.inject("slow_down", on="write", times=1, path_contains="partNumber=2")
    proxy.inject("reset", on="write", times=1, path_contains="partNumber=1")
    proxy.inject("internal_error", on="write", times=1, path_contains="uploadId=")
    fs.put_file(str(local), f"{root.removeprefix('s3://')}/images/00001.tar", chunksize=5 << 20)
    assert proxy.injected_count() == 3 and proxy.forwarded["POST"] == 2  # create and complete
    assert read_bytes(f"{root}/images/00001.tar") == payload


@pytest.mark.parametrize(
    ("fault", "named"), [("slow_down", "SlowDown"), ("reset", "connection reset or refused (EndpointConnectionError)")]
)
def test_a_write_fault_that_outlasts_the_attempts_fails_clearly_and_leaves_the_old_object(faulty_s3, fault, named):
    root, proxy = faulty_s3
    url = f"{root}/images/00012.tar"
    publish_bytes(b"the old shard", url)

    proxy.inject(fault, on="write", times=100)
    with pytest.raises(StorageUnavailableError) as caught:
        publish_bytes(b"the new shard", url)
    err = caught.value
    assert str(err).startswith(f"{url}: {named} after {MAX_ATTEMPTS} attempts"), str(err)
    assert err.fault == named and err.attempts == MAX_ATTEMPTS
    assert isinstance(err, OSError)
    assert pickle.loads(pickle.dumps(err)).url == url
    # aiohttp itself sends a PUT again once when a reused keep-alive connection was reset: up to 2 per attempt
    assert MAX_ATTEMPTS <= proxy.injected_count(fault, on="write") <= 2 * MAX_ATTEMPTS

    proxy.clear()
    assert read_bytes(url) == b"the old shard"
    assert _objects(proxy, f"{root}/images/") == ["00012.tar"], "no temporary or partial object"


def test_a_lasting_slowdown_on_a_new_object_leaves_nothing(faulty_s3):
    root, proxy = faulty_s3
    url = f"{root}/metadata/00007.parquet"
    proxy.inject("slow_down", on="write", times=100)
    with pytest.raises(StorageUnavailableError, match=rf"^{url}: SlowDown after {MAX_ATTEMPTS} attempts"):
        publish_bytes(b"rows", url)
    proxy.clear()
    assert not exists(url)
    assert _objects(proxy, f"{root}/metadata/") == []


def test_a_read_that_stalls_past_every_attempt_fails_clearly(faulty_s3):
    root, proxy = faulty_s3
    url = f"{root}/images/00005.parquet"
    publish_bytes(b"status", url)
    proxy.inject("internal_error", on="read", times=100)  # a HEAD's error has no body: its status names it
    with pytest.raises(StorageUnavailableError, match=rf"^{url}: HTTP 500 after {MAX_ATTEMPTS} attempts"):
        exists(url)
    proxy.clear()
    proxy.inject("internal_error", on="read", times=100, path_contains="list-type=2")  # the listing's GET
    folder = f"{root}/images"
    with pytest.raises(StorageUnavailableError, match=rf"^{folder}: InternalError after {MAX_ATTEMPTS} attempts"):
        stored_shards(folder, ".parquet")
    proxy.clear()
    proxy.inject("stall", on="read", times=100)
    stalled = rf"^{url}: no answer within the read timeout \(ReadTimeoutError\) after {MAX_ATTEMPTS} attempts"
    with pytest.raises(StorageUnavailableError, match=stalled):
        read_bytes(url)
    assert proxy.injected_count("stall") == MAX_ATTEMPTS
    proxy.clear()
    assert read_bytes(url) == b"status"


def test_a_missing_object_is_still_file_not_found(faulty_s3):
    root, _ = faulty_s3
    with pytest.raises(FileNotFoundError):
        read_bytes(f"{root}/images/00404.tar")


def test_the_metadata_stage_rides_out_faults_on_s3(faulty_s3, tmp_path):
    """The real stage: slice shard 1 out of a local part and publish it to S3 through SlowDowns and resets."""
    from laion_vq.shards.metadata import LaionMetadata
    from laion_vq.stages.metadata import read_metadata_shard, write_metadata_shard
    from laion_vq.testing.synthetic_metadata import laion_table

    root, proxy = faulty_s3
    urls = [f"http://127.0.0.1/img/{i}.jpg" for i in range(12)]
    parts = tmp_path / "meta"
    parts.mkdir()
    pq.write_table(laion_table(urls), parts / "part-00000.parquet")
    layout = StorageLayout(f"{root}/run")

    proxy.inject("slow_down", on="write", times=2)
    proxy.inject("reset", on="write", times=1)
    result = write_metadata_shard(LaionMetadata(str(parts), 4), layout, 1)
    assert proxy.injected_count("slow_down", on="write") == 2 and proxy.injected_count("reset", on="write") == 1

    proxy.inject("internal_error", on="read", times=2)
    table, _ = read_metadata_shard(read_bytes(layout.metadata_shard(1)))
    assert proxy.injected_count("internal_error", on="read") == 2
    assert result.rows == table.num_rows == 4
    assert table.column("URL").to_pylist() == urls[4:8]
    assert pq.read_table(io.BytesIO(read_bytes(result.path))).equals(table)
    assert _objects(proxy, f"{root}/run/") == ["metadata/00001.parquet"]
