"""The pipeline with every file on S3: metadata parts, checkpoint, tars and code parquets.

S3 is moto's server on 127.0.0.1 speaking the real S3 API over HTTP; s3fs/fsspec reach it through
AWS_ENDPOINT_URL, exactly as they would reach AWS or MinIO.
"""

from __future__ import annotations

import io

import dagster as dg
import fsspec
import numpy as np
import pyarrow.parquet as pq
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from laion_vq.defs.assets import code_parquets, image_tars, raw_metadata_shards
from laion_vq.defs.check_state import CODES_CHECK
from laion_vq.defs.resources import DownloaderResource, LaionMetadataResource, StorageResource, VQGANEncoderResource
from laion_vq.shards.storage import StorageLayout, publish_file, read_bytes
from laion_vq.testing.demo_inputs import shard_urls
from laion_vq.testing.synthetic_metadata import laion_table

from .conftest import TINY_MODEL

SAMPLES = 8


def test_two_shards_end_to_end_on_s3(s3, image_server, tiny_checkpoint):
    urls = shard_urls(image_server, 2, SAMPLES)
    for i, part in enumerate(urls):
        buf = io.BytesIO()
        pq.write_table(laion_table(part, first_sample_id=i * SAMPLES), buf, row_group_size=3)
        with fsspec.open(f"{s3}/meta/part-{i:05d}.parquet", "wb") as f:
            f.write(buf.getvalue())
    publish_file(tiny_checkpoint, f"{s3}/models/tiny.ckpt")

    resources = {
        "storage": StorageResource(root=f"{s3}/run"),
        "metadata": LaionMetadataResource(source=f"{s3}/meta", samples_per_shard=SAMPLES),
        "downloader": DownloaderResource(thread_count=8, timeout=5),
        "encoder": VQGANEncoderResource(model=TINY_MODEL, checkpoint=f"{s3}/models/tiny.ckpt", device="cpu"),
    }
    job = dg.define_asset_job("pipe", selection=[raw_metadata_shards, image_tars, code_parquets])
    # the encoder's own check run alone (the op's subset without the asset): an audit of the stored parquets
    check_job = dg.define_asset_job("check", selection=dg.AssetSelection.checks(CODES_CHECK))
    defs = dg.Definitions(
        assets=[raw_metadata_shards, image_tars, code_parquets],
        jobs=[job, check_job],
        resources=resources,
        executor=dg.in_process_executor,
    )
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("pipe").execute_in_process(
            instance=instance, tags={ASSET_PARTITION_RANGE_START_TAG: "00000", ASSET_PARTITION_RANGE_END_TAG: "00001"}
        )
        assert result.success
        assert defs.resolve_job_def("check").execute_in_process(instance=instance).success

    layout = StorageLayout(f"{s3}/run")
    for shard in (0, 1):
        photos = sum("/img/" in u for u in urls[shard])
        table = pq.read_table(io.BytesIO(read_bytes(layout.code_shard(TINY_MODEL, shard))))
        assert table.num_rows == photos
        assert all(len(b) == 2048 for b in table.column("code").to_pylist())
        assert np.frombuffer(table.column("code")[0].as_py(), np.int16).reshape(32, 32).max() < 8192
        status = pq.read_table(io.BytesIO(read_bytes(layout.image_status(shard))))
        assert status.num_rows == SAMPLES
    listing = fsspec.filesystem("s3").find("laion/run")
    assert not [p for p in listing if ".tmp-" in p], "no temporary objects on S3"
