"""The operator's story through Dagster: shard 00000 holds good images and codes; it is re-materialized
while the image server is down. The download step fails naming the cause, the stored tar and codes stay
as they were, no new materialization is recorded; forcing it through the resource setting publishes."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from laion_vq.defs.assets import code_parquets, image_tars, raw_metadata_shards
from laion_vq.defs.resources import DownloaderResource, LaionMetadataResource, StorageResource, VQGANEncoderResource
from laion_vq.shards.storage import StorageLayout
from laion_vq.testing.image_server import ImageServer
from laion_vq.testing.synthetic_metadata import write_parts

from .conftest import TINY_MODEL

SAMPLES = 10


def _defs(tmp_path: Path, checkpoint: str, replace_worse: bool) -> dg.Definitions:
    return dg.Definitions(
        assets=[raw_metadata_shards, image_tars, code_parquets],
        resources={
            "storage": StorageResource(root=str(tmp_path / "data")),
            "metadata": LaionMetadataResource(source=str(tmp_path / "meta"), samples_per_shard=SAMPLES),
            "downloader": DownloaderResource(thread_count=8, timeout=2, replace_worse=replace_worse),
            "encoder": VQGANEncoderResource(model=TINY_MODEL, checkpoint=checkpoint, device="cpu", batch_size=4),
        },
        jobs=[dg.define_asset_job("pipe", selection=[raw_metadata_shards, image_tars, code_parquets])],
        executor=dg.in_process_executor,
    )


def _image_materializations(instance: dg.DagsterInstance) -> list[dict]:
    records = instance.fetch_materializations(dg.AssetKey("image_tars"), limit=10).records
    return [{k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records]


def test_re_materializing_with_the_server_down_keeps_the_good_shard(tmp_path: Path, tiny_checkpoint: str) -> None:
    server = ImageServer().start()
    photos = ImageServer.photo_paths()[:7]
    write_parts(str(tmp_path / "meta"), [[server.url(p) for p in photos] + [server.url("/missing/1.jpg")] * 3])
    layout = StorageLayout(str(tmp_path / "data"))
    with dg.instance_for_test() as instance:
        job = _defs(tmp_path, tiny_checkpoint, replace_worse=False).resolve_job_def("pipe")
        assert job.execute_in_process(instance=instance, partition_key="00000").success
        first = _image_materializations(instance)
        assert len(first) == 1 and first[0]["successes"] == 7
        assert first[0]["failures_by_reason"] == {"404": 3}
        assert first[0]["failure_examples"] == {"404": [server.url("/missing/1.jpg")] * 3}
        stored = {p: Path(p).read_bytes() for p in (layout.image_tar(0), layout.code_shard(TINY_MODEL, 0))}

        server.stop()
        result = job.execute_in_process(instance=instance, partition_key="00000", raise_on_error=False)
        assert not result.success
        failure = " ".join(
            e.step_failure_data.error.to_string() for e in result.all_events if e.event_type_value == "STEP_FAILURE"
        )
        assert "WorseDownloadError" in failure and "got 0/10 images" in failure and "connection refused" in failure
        assert {p: Path(p).read_bytes() for p in stored} == stored  # tar and codes byte for byte
        assert len(_image_materializations(instance)) == 1  # nothing new recorded for the shard

        forced = _defs(tmp_path, tiny_checkpoint, replace_worse=True).resolve_job_def("pipe")
        assert forced.execute_in_process(instance=instance, partition_key="00000").success
        latest = _image_materializations(instance)[0]
        assert latest["successes"] == 0 and latest["replaced_success_rate"] == 0.7
        assert latest["failures_by_reason"] == {"connection refused": 10}
