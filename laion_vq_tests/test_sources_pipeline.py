"""Every source preset through the whole chain (metadata → download → encode) on a small fabricated part in
the preset's published layout: every column kept with its type, a filter that leaves `filtered` rows, and
DataComp's hash verified against the bytes served (loopback image server, the tiny f8 model)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_vq.audit import audit_code_shard, audit_image_shard
from laion_vq.download import DownloadOptions
from laion_vq.download.img2dataset_shard import expected_key, stored_column_name
from laion_vq.encode.shard import CodesVersionError
from laion_vq.shards.codes import read_codes_provenance
from laion_vq.shards.metadata import LaionMetadata
from laion_vq.shards.schema import CODES_SCHEMA
from laion_vq.shards.sources import PRESETS, preset
from laion_vq.shards.storage import StorageLayout
from laion_vq.stages import download_image_shard, encode_code_shard
from laion_vq.stages.metadata import write_metadata_shard
from laion_vq.testing.source_parts import write_source_part

from .conftest import TINY_MODEL

SAMPLES = 8
OPTIONS = DownloadOptions(thread_count=4, timeout=2, deadline=5)
SUFFIX = {"parquet": "parquet", "tsv": "tsv", "tsv.gz": "tsv.gz", "csv": "csv", "csv.gz": "csv.gz", "jsonl": "jsonl"}


def _key(row: int) -> str:
    return expected_key(0, row, SAMPLES)


def _urls(server, n_photos: int = 3) -> list[str]:
    photos = server.photo_paths()[:n_photos]
    return [server.url(p) for p in photos] + [server.url("/missing/0.jpg")]


def _run(tmp_path: Path, fmt, server, tiny_encoder, *, row_filter=None, hashes=None):
    part = tmp_path / "source" / f"part-00000.{SUFFIX[fmt.input_format]}"
    part.parent.mkdir(parents=True, exist_ok=True)
    if fmt.hash_column and hashes is None:  # the served photos' own hashes: every download verifies
        photos = server.photos()
        hashes = [hashlib.sha256(photos[p].data).hexdigest() for p in server.photo_paths()[:3]] + ["0" * 64]
    written = write_source_part(fmt, _urls(server), str(part), hashes=hashes)
    layout = StorageLayout(str(tmp_path / "store"))
    meta = LaionMetadata(str(part.parent), SAMPLES, fmt, layout.metadata_index_dir())
    write_metadata_shard(meta, layout, 0, row_filter)
    before = len(server.hits)
    images = download_image_shard(layout, 0, SAMPLES, OPTIONS)
    hits = server.hits[before:]
    config, model = tiny_encoder
    codes = encode_code_shard(
        layout,
        0,
        model_name=TINY_MODEL,
        encode=lambda b, _keys: model.encode_uint8(b, batch_size=4),
        grid=32,
        n_embed=config.n_embed,
        batch_size=4,
    )
    return written, layout, images, codes, hits


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_column_of_each_preset_is_kept_end_to_end(tmp_path, name, image_server, tiny_encoder):
    fmt = preset(name)
    written, layout, images, codes, _ = _run(tmp_path, fmt, image_server, tiny_encoder)
    metadata = pq.read_table(layout.metadata_shard(0))
    source_columns = [c for c in written.column_names if c not in (fmt.url_column, fmt.caption_column)]
    # the metadata shard: every column, its type, its values
    for column in written.column_names:
        assert metadata.schema.field(column).type == written.schema.field(column).type, column
        assert metadata.column(column).to_pylist() == written.column(column).to_pylist(), column
    status = pq.read_table(layout.image_status(0))
    code_table = pq.read_table(codes.path)
    assert (images.rows, images.successes) == (4, 3)
    assert codes.encoded == 3
    by_key = {row["key"]: row for row in status.to_pylist()}
    for column in source_columns:
        kept = stored_column_name(column)
        assert status.schema.field(kept).type == written.schema.field(column).type, column
        assert [by_key[_key(i)][kept] for i in range(4)] == written.column(column).to_pylist(), column
        assert code_table.schema.field(kept).type == written.schema.field(column).type, column
    assert code_table.column("url").to_pylist() == written.column(fmt.url_column).to_pylist()[:3]
    assert code_table.column("caption").to_pylist() == written.column(fmt.caption_column).to_pylist()[:3]
    code = np.frombuffer(code_table.column("code")[0].as_py(), np.int16).reshape(32, 32)
    assert code.min() >= 0 and code.max() < tiny_encoder[0].n_embed
    if name == "laion400m":
        # the seed's layout, exactly, with the part's extra columns after LAION's
        seed = pa.schema([f for f in code_table.schema.remove_metadata() if f.name in CODES_SCHEMA.names])
        assert seed == CODES_SCHEMA
    assert audit_image_shard(layout, "00000").passed
    assert audit_code_shard(layout, TINY_MODEL, "00000", 32, tiny_encoder[0].n_embed).passed


def test_filter_rows_are_never_requested_and_recorded(tmp_path, image_server, tiny_encoder):
    fmt = preset("laion5b")
    assert "punsafe" in fmt.column_names
    predicate = "punsafe < 0.5"
    # the fabricated part's punsafe values decide which rows pass: read them back to know
    written, layout, images, codes, hits = _run(tmp_path, fmt, image_server, tiny_encoder, row_filter=predicate)
    rejected = [i for i, p in enumerate(written.column("punsafe").to_pylist()) if p is None or not p < 0.5]
    assert rejected, "the fabricated part must hold rows the filter rejects"
    status = {row["key"]: row for row in pq.read_table(layout.image_status(0)).to_pylist()}
    for i in rejected:
        row = status[_key(i)]
        assert (row["status"], row["failure_reason"]) == ("filtered", predicate)
        assert urlsplit(written.column(fmt.url_column)[i].as_py()).path not in hits
    assert images.filtered == len(rejected)
    assert images.rows == images.successes + images.failed_to_download + images.failed_to_resize + images.filtered
    stats = json.loads(Path(layout.image_stats(0)).read_text())
    assert stats["filtered"] == len(rejected) and stats["count"] == 4
    assert audit_image_shard(layout, "00000").passed


def test_datacomp_hash_mismatch_fails_the_image(tmp_path, image_server, tiny_encoder):
    fmt = preset("datacomp")
    assert fmt.hash_column == "sha256"
    photos = image_server.photos()
    served = [hashlib.sha256(photos[p].data).hexdigest() for p in image_server.photo_paths()[:3]]
    hashes = [served[0], "0" * 64, served[2], None]  # row 1's image "changed on the web" since the dataset
    written, layout, images, codes, _ = _run(tmp_path, fmt, image_server, tiny_encoder, hashes=hashes)
    status = {row["key"]: row for row in pq.read_table(layout.image_status(0)).to_pylist()}
    assert status[_key(1)]["status"] == "failed_to_download"
    assert status[_key(1)]["failure_reason"] == "hash mismatch"
    assert status[_key(0)]["status"] == status[_key(2)]["status"] == "success"
    assert status[_key(0)]["sha256"] == served[0]  # img2dataset's hash of the bytes downloaded
    assert status[_key(1)]["source_sha256"] == "0" * 64  # the source's own column, kept
    assert images.failures_by_reason.get("hash mismatch") == 1
    assert codes.encoded == 2


def test_text_source_shard_reads_its_rows_only(tmp_path):
    """A TSV of 3 shards (cc12m: no header) is indexed once; shard 2 reads only its rows."""
    fmt = preset("cc12m")
    part = tmp_path / "cc12m.tsv"
    written = write_source_part(fmt, [f"http://example.com/{i}.jpg" for i in range(2 * SAMPLES + 3)], str(part))
    layout = StorageLayout(str(tmp_path / "store"))
    meta = LaionMetadata(str(part), SAMPLES, fmt, layout.metadata_index_dir())
    assert meta.num_shards == 3
    shard2 = meta.read_shard(2)
    assert shard2.to_pylist() == written.slice(2 * SAMPLES).to_pylist()
    indexes = list(Path(layout.metadata_index_dir()).iterdir())
    assert len(indexes) == 1
    # a second reader uses the stored index: it reads shard 2 even when the rest of the file is garbled
    # (same size, same mtime: the index cannot tell, and must not need to read those bytes)
    data, stat = part.read_bytes(), part.stat()
    start = data.index(b"http://example.com/16.jpg")
    part.write_bytes(b"\xff" * start + data[start:])
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = LaionMetadata(str(part), SAMPLES, fmt, layout.metadata_index_dir())
    assert again.read_shard(2).to_pylist() == shard2.to_pylist()


def test_a_changed_filter_is_another_version_of_the_codes(tmp_path, image_server, tiny_encoder):
    """Codes made under one filter are not overwritten by a run under another: the filter is part of the version
    (recorded from each shard's metadata record), as a changed checkpoint is."""
    fmt = preset("laion5b")
    _, layout, _, codes, _ = _run(tmp_path, fmt, image_server, tiny_encoder, row_filter="extra_int <> 1")
    assert read_codes_provenance(codes.path)["filter"] == "extra_int <> 1"
    meta = LaionMetadata(str(tmp_path / "source"), SAMPLES, fmt, layout.metadata_index_dir())
    write_metadata_shard(meta, layout, 0, "extra_int <> 2")
    download_image_shard(layout, 0, SAMPLES, OPTIONS)
    config, model = tiny_encoder
    with pytest.raises(CodesVersionError, match="filter"):
        encode_code_shard(
            layout,
            0,
            model_name=TINY_MODEL,
            encode=lambda b, _keys: model.encode_uint8(b, batch_size=4),
            grid=32,
            n_embed=config.n_embed,
            batch_size=4,
        )
