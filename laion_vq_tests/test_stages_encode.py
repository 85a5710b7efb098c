"""The encode stage on hand-made shards: broken JPEGs counted, tar/status mismatch refused, counts reconcile."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_vq.shards.codes import read_codes_provenance
from laion_vq.shards.storage import StorageLayout
from laion_vq.shards.tar_reader import CorruptShardError
from laion_vq.stages import encode_code_shard

from .conftest import TINY_MODEL, _jpeg, _write_shard


def _encode(layout, shard, tiny_encoder, batch_size=3):
    config, model = tiny_encoder
    return encode_code_shard(
        layout,
        shard,
        model_name=TINY_MODEL,
        encode=lambda b, _keys: model.encode_uint8(b, batch_size=batch_size),
        grid=32,
        n_embed=config.n_embed,
        batch_size=batch_size,
    )


def test_counts_reconcile_and_broken_images_are_reported(tmp_path, tiny_encoder):
    layout = StorageLayout(str(tmp_path))
    images = {f"00004{i:04d}": _jpeg(i) for i in range(7)}
    images["000040007"] = _jpeg(7)[:300]  # truncated JPEG
    images["000040008"] = b"not an image"  # garbage
    images["000040009"] = _jpeg(9, size=200)  # wrong size
    _write_shard(layout, 4, images, failed=["000040010", "000040011"])

    result = _encode(layout, 4, tiny_encoder)
    table = pq.read_table(result.path)
    assert result.status_rows == 12 and result.downloaded == 10
    assert result.encoded == table.num_rows == 7
    assert sum(result.undecodable.values()) == 3
    assert result.undecodable_keys == ["000040007", "000040008", "000040009"]
    assert any("expected 256x256" in reason for reason in result.undecodable)
    # metadata rows = successes + failures; code rows = successes - undecodable
    assert result.status_rows == result.downloaded + 2
    assert result.encoded == result.downloaded - sum(result.undecodable.values())
    assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())
    row = table.to_pylist()[0]
    assert np.frombuffer(row["code"], np.int16).reshape(32, 32).max() < 8192
    assert row["caption"] == "caption 000040000" and row["NSFW"] == "UNLIKELY"
    assert read_codes_provenance(result.path)["undecodable"] == result.undecodable


def test_codes_do_not_depend_on_batching(tmp_path, tiny_encoder):
    layout = StorageLayout(str(tmp_path))
    _write_shard(layout, 0, {f"00000{i:04d}": _jpeg(i) for i in range(5)}, failed=[])
    a = pq.read_table(_encode(layout, 0, tiny_encoder, batch_size=2).path).select(["code", "image_sha256"])
    b = pq.read_table(_encode(layout, 0, tiny_encoder, batch_size=5).path).select(["code", "image_sha256"])
    assert a.to_pylist() == b.to_pylist()


def test_tar_disagreeing_with_status_publishes_nothing(tmp_path, tiny_encoder):
    layout = StorageLayout(str(tmp_path))
    _write_shard(layout, 2, {"000020000": _jpeg(0)}, failed=[])
    # status says a second image succeeded, but the tar (e.g. from an older run) lacks it
    status = pq.read_table(layout.image_status(2))
    extra = pa.table({name: [status.column(name)[0].as_py()] for name in status.column_names})
    extra = extra.set_column(0, "key", pa.array(["000020001"]))
    pq.write_table(pa.concat_tables([status, extra]), layout.image_status(2))
    with pytest.raises(CorruptShardError, match="disagree"):
        _encode(layout, 2, tiny_encoder)
    assert not (tmp_path / "codes").exists()


def test_missing_status_parquet_is_corrupt(tmp_path, tiny_encoder):
    layout = StorageLayout(str(tmp_path))
    _write_shard(layout, 1, {"000010000": _jpeg(0)}, failed=[])
    (tmp_path / "images" / "00001.parquet").write_bytes(b"garbage")
    with pytest.raises(CorruptShardError, match="status parquet"):
        _encode(layout, 1, tiny_encoder)


def test_missing_upstream_names_the_asset_to_materialize(tmp_path, tiny_encoder):
    from laion_vq.stages import download_image_shard

    layout = StorageLayout(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="materialize image_tars"):
        _encode(layout, 3, tiny_encoder)
    with pytest.raises(FileNotFoundError, match="materialize raw_metadata_shards"):
        download_image_shard(layout, 3, samples_per_shard=10)


def test_download_logs_progress_while_img2dataset_works(tmp_path, image_server):
    """img2dataset says nothing until a shard is done; the stage reports the growing tar meanwhile."""
    import io as _io

    from laion_vq.download import DownloadOptions
    from laion_vq.shards.storage import publish_bytes
    from laion_vq.stages import download_image_shard
    from laion_vq.testing.synthetic_metadata import laion_table

    layout = StorageLayout(str(tmp_path))
    urls = [image_server.url(p) for p in image_server.photo_paths()[:4]] + [image_server.url("/slow/0.jpg")]
    buf = _io.BytesIO()
    pq.write_table(laion_table(urls), buf)
    publish_bytes(buf.getvalue(), layout.metadata_shard(0))
    messages: list[str] = []
    result = download_image_shard(
        layout, 0, 10, DownloadOptions(timeout=5, thread_count=2), progress=messages.append, progress_every=0.5
    )
    assert result.successes == 5 and result.rows == 5  # the slow image (3 s) arrives within the 5 s timeout
    assert messages and all(m.startswith("shard 00000: ") and "MB of images after" in m for m in messages)


def test_a_removal_applied_while_the_shard_encodes_is_honoured(tmp_path, tiny_encoder):
    """A removal list lands mid-backfill: `apply_removals` marks a key `removed` in the status parquet (and drops it
    from the tar) while the encoder works from the tar it already opened. The published codes leave it out."""
    layout = StorageLayout(str(tmp_path))
    images = {f"00002{i:04d}": _jpeg(i) for i in range(4)}
    _write_shard(layout, 2, images, failed=[])
    config, model = tiny_encoder
    listed = "000020001"

    def encode_while_the_removal_lands(batch, keys):
        status = pq.read_table(layout.image_status(2))
        statuses = [
            "removed" if k == listed else s
            for k, s in zip(status["key"].to_pylist(), status["status"].to_pylist(), strict=True)
        ]
        pq.write_table(status.set_column(1, "status", pa.array(statuses)), layout.image_status(2))
        return model.encode_uint8(batch, batch_size=4)

    result = encode_code_shard(
        layout,
        2,
        model_name=TINY_MODEL,
        encode=encode_while_the_removal_lands,
        grid=32,
        n_embed=config.n_embed,
        batch_size=4,
    )
    keys = pq.read_table(result.path).column("key").to_pylist()
    assert keys == sorted(set(images) - {listed}) and result.encoded == 3
