"""Each code row carries the sha256 of the JPEG bytes it was encoded from (`image_sha256`): equal to what the
download recorded (`jpg_sha256`) and to the tar's bytes, so a re-run that changed a code can be told from a
re-run whose image changed. A real loopback download, the tiny real-architecture encoder."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pyarrow.parquet as pq

from laion_vq.download import DownloadOptions
from laion_vq.shards.storage import StorageLayout, publish_bytes
from laion_vq.stages import download_image_shard, encode_code_shard
from laion_vq.testing.synthetic_metadata import laion_table

from .conftest import TINY_MODEL, _jpeg


def _tar_members(path: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]


def _rows(path: str) -> dict[str, dict]:
    return {row["key"]: row for row in pq.read_table(path).to_pylist()}


def test_codes_carry_the_hash_of_their_image_bytes(tmp_path, image_server, tiny_encoder) -> None:
    layout = StorageLayout(str(tmp_path))
    buf = io.BytesIO()
    pq.write_table(laion_table([image_server.url(p) for p in image_server.photo_paths()[:3]]), buf)
    publish_bytes(buf.getvalue(), layout.metadata_shard(0))
    assert download_image_shard(layout, 0, 10, DownloadOptions(timeout=5, thread_count=2)).successes == 3
    config, model = tiny_encoder

    def encode() -> dict[str, dict]:
        return _rows(
            encode_code_shard(
                layout, 0, model_name=TINY_MODEL, grid=32, n_embed=config.n_embed, batch_size=2,
                encode=lambda b, _keys: model.encode_uint8(b, batch_size=2),
            ).path
        )  # fmt: skip

    first = encode()
    status = {row["key"]: row for row in pq.read_table(layout.image_status(0)).to_pylist()}
    members = _tar_members(layout.image_tar(0))
    jpegs = {m.name.removesuffix(".jpg"): data for m, data in members if m.name.endswith(".jpg")}
    assert sorted(first) == sorted(jpegs) and len(first) == 3
    for key, row in first.items():
        assert row["image_sha256"] == status[key]["jpg_sha256"] == hashlib.sha256(jpegs[key]).hexdigest()

    # swap one image in the tar for another JPEG, as a re-download (or a tampered tar) would
    swapped = sorted(first)[1]
    with tarfile.open(layout.image_tar(0), "w") as tar:
        for info, data in members:
            if info.name == f"{swapped}.jpg":
                data = _jpeg(99)
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    second = encode()

    changed_codes = {k for k in first if first[k]["code"] != second[k]["code"]}
    changed_images = {k for k in first if first[k]["image_sha256"] != second[k]["image_sha256"]}
    assert changed_codes == changed_images == {swapped}
    assert second[swapped]["image_sha256"] == hashlib.sha256(_jpeg(99)).hexdigest() != status[swapped]["jpg_sha256"]
    # everything else is identical, row for row
    assert all(first[k] == second[k] for k in first if k != swapped)
