"""The overlapped pipeline over several real shards (tars + status parquets, as img2dataset leaves them).

Every row is accounted for: a truncated tar, a corrupt JPEG and an out-of-memory error in the middle of a
shard each end with every other image encoded and the bad one counted with its reason; shards come back in
order, each as its result or its own error; the stages really overlap; stopping early leaves no thread behind.
No GPU here: the device decode is torchvision's CPU decoder standing in for nvJPEG, and the CUDA OOM is
injected (`test_encode_engine.InjectedOOM`).
"""

from __future__ import annotations

import os
import tarfile
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_vq.encode.decode import ImageDecoder, decode_rgb, torchvision_decode
from laion_vq.encode.engine import CallableEngine, ModelEngine
from laion_vq.encode.pipeline import EncodePipeline
from laion_vq.encode.shard import TRUNCATED_TAR, CodeShardResult, CodeSpec
from laion_vq.shards.storage import StorageLayout
from laion_vq.shards.tar_reader import CorruptShardError
from laion_vq.vqgan.reference import sample_photos

from .conftest import TINY_MODEL, _write_shard
from .test_encode_engine import InjectedOOM


def _photo_jpegs(shard: int, n: int) -> dict[str, bytes]:
    import io

    from PIL import Image

    photos = sample_photos(n + shard)[shard:]
    out = {}
    for i, photo in enumerate(photos):
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="JPEG", quality=95)
        out[f"{shard:05d}{i:04d}"] = buf.getvalue()
    return out


def _codes_of(result: CodeShardResult) -> dict[str, np.ndarray]:
    table = pq.read_table(result.path)
    return {
        k: np.frombuffer(c, np.int16).reshape(32, 32)
        for k, c in zip(table.column("key").to_pylist(), table.column("code").to_pylist(), strict=True)
    }


@pytest.fixture()
def shards(tmp_path):
    """0 clean; 1 its tar cut in the middle of the 4th image; 2 one corrupt JPEG; 3 no status parquet; 4 clean."""
    layout = StorageLayout(str(tmp_path))
    images = {s: _photo_jpegs(s, 6) for s in range(5)}
    broken = bytearray(images[2]["000020003"])
    broken[len(broken) // 2 :] = b"\x00" * (len(broken) - len(broken) // 2)  # the scan's second half wiped
    images[2]["000020003"] = bytes(broken[: len(broken) // 2])  # and cut: PIL fails on it
    for shard, imgs in images.items():
        _write_shard(layout, shard, imgs, failed=[f"{shard:05d}0099"])
    tar = layout.image_tar(1)
    with tarfile.open(tar) as t:
        member = t.getmember("000010003.jpg")
    with open(tar, "rb") as f:
        data = f.read()
    with open(tar, "wb") as f:
        f.write(data[: member.offset_data + member.size // 2])  # cut inside the 4th image
    os.remove(layout.image_status(3))
    return layout, images


def _spec() -> CodeSpec:
    return CodeSpec(model_name=TINY_MODEL, grid=32, n_embed=8192, provenance={"encode_mode": "exact"})


def test_every_row_is_accounted_for_across_bad_shards_and_an_oom(shards, tiny_encoder):
    layout, images = shards
    _config, model = tiny_encoder
    engine = InjectedOOM(model, mode="exact", batch_size=4, limit=2, fail_from_call=3)
    with ImageDecoder(256) as decoder:
        pipeline = EncodePipeline(layout, _spec(), engine, decoder)
        outcomes = list(pipeline.run(range(5), {4: 2}))

    assert [shard for shard, _ in outcomes] == [0, 1, 2, 3, 4]
    results = dict(outcomes)
    assert isinstance(results[3], FileNotFoundError) and "materialize image_tars" in str(results[3])
    assert engine.stats.oom_retries == 1 and engine.batch_size == 2

    # shard 1: the three samples before the cut are encoded, the other three are counted under their reason
    truncated = results[1]
    assert truncated.encoded == 3 and truncated.undecodable == {TRUNCATED_TAR: 3}
    assert truncated.undecodable_keys == ["000010003", "000010004", "000010005"]
    assert "truncated" in (truncated.tar_error or "")
    # shard 2: the corrupt JPEG is counted, the five others encoded
    corrupt = results[2]
    assert corrupt.encoded == 5 and corrupt.undecodable_keys == ["000020003"]
    assert corrupt.tar_error is None

    # every encoded code equals the model's on the PIL decode of its JPEG, whatever batch/OOM/shard it rode in
    for shard in (0, 1, 2, 4):
        codes = _codes_of(results[shard])
        expected_keys = sorted(set(images[shard]) - set(results[shard].undecodable_keys))
        assert sorted(codes) == expected_keys
        pixels = np.stack([decode_rgb(images[shard][k], 256) for k in expected_keys])
        reference = model.encode_uint8(pixels, batch_size=8)
        np.testing.assert_array_equal(np.stack([codes[k] for k in expected_keys]), reference)
        assert results[shard].status_rows == 7 and results[shard].downloaded == 6
    assert results[4].sample_images is not None and results[4].sample_images.shape == (2, 256, 256, 3)
    assert results[0].sample_images is None
    assert pipeline.stats.images == 6 + 3 + 5 + 6 and pipeline.stats.shards == 5


def test_a_tar_that_disagrees_with_its_status_is_refused_not_published(shards, tiny_encoder):
    layout, images = shards
    _config, model = tiny_encoder
    _write_shard(layout, 0, images[0], failed=[])
    _write_shard(layout, 0, {k: v for k, v in images[0].items() if k != "000000002"}, failed=[])
    status = pq.read_table(layout.image_status(0)).to_pylist()
    assert len(status) == 5
    # put the key back into the status parquet only: a complete tar lacking a success key is corruption
    import pyarrow as pa

    status.append({**status[0], "key": "000000002"})
    pq.write_table(pa.Table.from_pylist(status), layout.image_status(0))
    with ImageDecoder(256, cpu_workers=1) as decoder:
        pipeline = EncodePipeline(layout, _spec(), ModelEngine(model, batch_size=4), decoder)
        [(_, outcome)] = pipeline.run([0])
    assert isinstance(outcome, CorruptShardError) and "disagree" in str(outcome)
    assert not os.path.exists(_spec().destination(layout, 0))


def test_batched_device_decode_path_gives_the_same_rows(shards, tiny_encoder):
    """The nvJPEG structure (batched decode, per-image fallback) with torchvision's CPU decoder standing in."""
    layout, images = shards
    _config, model = tiny_encoder
    with ImageDecoder(256, gpu_decode=torchvision_decode("cpu")) as decoder:
        pipeline = EncodePipeline(layout, _spec(), ModelEngine(model, batch_size=4), decoder)
        results = dict(pipeline.run([0, 2]))
    assert pipeline.stats.gpu_decoded == 6 + 5
    assert results[0].encoded == 6 and results[2].encoded == 5 and results[2].undecodable_keys == ["000020003"]


def test_stages_overlap_and_the_next_shard_is_read_ahead(shards):
    layout, _images = shards
    spans: dict[str, list[tuple[float, float]]] = {"encode": [], "decode": []}

    def slow_encode(batch: np.ndarray, _keys: list[str]) -> np.ndarray:
        start = time.perf_counter()
        time.sleep(0.15)
        spans["encode"].append((start, time.perf_counter()))
        return np.zeros((len(batch), 32, 32), np.int16)

    class TimedDecoder(ImageDecoder):
        def decode(self, items):
            start = time.perf_counter()
            out = super().decode(items)
            time.sleep(0.05)
            spans["decode"].append((start, time.perf_counter()))
            return out

    with TimedDecoder(256) as decoder:
        pipeline = EncodePipeline(layout, _spec(), CallableEngine(slow_encode, 2, 32), decoder)
        outcomes = list(pipeline.run([0, 4]))
    assert all(isinstance(r, CodeShardResult) for _, r in outcomes)
    overlapping = [(d, e) for d in spans["decode"] for e in spans["encode"] if d[0] < e[1] and e[0] < d[1]]
    assert len(overlapping) >= 3, spans  # decoding runs while the encoder works
    # the encoder hardly waited: 6 batches of 0.15 s, decode 0.05 s each, all hidden but the first
    assert pipeline.stats.input_wait_seconds < 0.5 * pipeline.stats.seconds


def test_stopping_early_leaves_no_thread_behind(shards, tiny_encoder):
    layout, _images = shards
    before = set(threading.enumerate())
    with ImageDecoder(256) as decoder:
        pipeline = EncodePipeline(
            layout,
            _spec(),
            CallableEngine(lambda b, _k: np.zeros((len(b), 32, 32), np.int16), 1, 32),
            decoder,
            queue_depth=1,
        )
        outcomes = pipeline.run([0, 4, 0, 4])
        first = next(outcomes)
        outcomes.close()
    assert first[0] == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(threading.enumerate()) - before:
        time.sleep(0.05)
    assert not {t for t in set(threading.enumerate()) - before if t.is_alive()}


def test_a_bug_in_a_feeding_thread_surfaces(shards):
    layout, _images = shards

    class Broken(ImageDecoder):
        def decode(self, items):
            raise ZeroDivisionError("bug in the decoder")

    with Broken(256) as decoder:
        pipeline = EncodePipeline(layout, _spec(), CallableEngine(lambda b, _k: b, 2, 32), decoder)
        with pytest.raises(ZeroDivisionError, match="bug in the decoder"):
            list(pipeline.run([0]))
