"""512-px images through the ImageNet f16 VQGAN: 32×32 codes, bit-equal to taming's (fp32, CPU); 256 px: 16×16.

Real photos (scikit-image's ``chelsea``, 451×300, upscaled, and ``coffee``, 600×400, downscaled; both padded
white by ``border``) go through the resizer the download stage builds (img2dataset's Resizer behind our
checks, `DownloadOptions(image_size=...)`), are decoded as the encoder stage decodes them (`ImageDecoder`) and
encoded with our `VQGANEncoder`, loaded from a Lightning checkpoint whose seeded random weights are also in
taming's own modules (`TamingReference`). As in the other parity tests, fp32 on CPU must be bit-exact:
features and codes are compared with ``torch.equal``.

The model keeps the released config (``resolution`` 256, as in the checkpoint's YAML) at every input size:
``resolution`` fixes where taming's Encoder puts its attention blocks (``curr_res in attn_resolutions``), not
the input size, so a 512-px input runs the released modules on a larger grid, in taming as in ours.

Cost on 2 idle CPU cores: ~16-18 s per model for the two 512-px images (ours and taming's: ~34 s), ~8.5 s for
the 256-px pair, ~50 s for the file. The codebook is spread like the 256-px features (taming's init would give
every position the same code), so the 512-px codes are checked with a codebook they did not shape.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from laion_vq.download import DownloadOptions, expected_key, img2dataset_shard
from laion_vq.encode.decode import DecodedBatch, ImageDecoder
from laion_vq.encode.engine import ModelEngine
from laion_vq.shards.codes import build_codes_table, check_codes_table, decode_codes, write_codes_parquet
from laion_vq.vqgan import CheckpointError, VQGANEncoder, get_model_config, load_encoder, preprocess
from laion_vq.vqgan.reference import TamingReference

MODEL = "vqgan_imagenet_f16_16384"
PHOTOS = ("chelsea", "coffee")
SHARD = 7
SEED = 16384


def _download_resized(tmp: Path, image_size: int) -> list[tuple[str, bytes]]:
    """(key, stored JPEG) per photo, resized by the resizer `download_shard` builds for these options."""
    import skimage.data

    options = DownloadOptions(image_size=image_size)
    assert (options.resize_mode, options.encode_format, options.encode_quality) == ("border", "jpg", 95)
    img2dataset_shard._check_border_padding_is_white()  # what download_shard checks before a border resize
    downloader = img2dataset_shard._build_downloader(
        str(tmp), ["url", "caption"], 10_000, 5, options, img2dataset_shard._WriterState({})
    )
    items = []
    for i, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()
        body = io.BytesIO()
        Image.fromarray(photo).save(body, format="PNG")  # the "downloaded" original, lossless
        stored, width, height, original_width, original_height, err = downloader.resizer(io.BytesIO(body.getvalue()))
        assert err is None, (name, err)
        assert (width, height) == (image_size, image_size)
        assert (original_height, original_width) == photo.shape[:2]
        items.append((expected_key(SHARD, i, 10_000), stored))
    return items


def _decode(items: list[tuple[str, bytes]], image_size: int) -> DecodedBatch:
    with ImageDecoder(image_size, cpu_workers=1) as decoder:
        batch = decoder.decode(items)
    assert batch.failed == [] and batch.keys == [k for k, _ in items]
    assert tuple(batch.images.shape) == (len(items), image_size, image_size, 3)
    pixels = batch.images.numpy()
    # non-square photos: white border bands (chelsea and coffee are both wider than tall: top and bottom rows)
    assert pixels[:, :4].min() >= 240 and pixels[:, -4:].min() >= 240
    assert pixels[:, image_size // 2].std() > 10  # and a photo in between
    return batch


@dataclass
class F16:
    ref: TamingReference
    checkpoint: str
    batches: dict[int, DecodedBatch]
    ref_codes_256: torch.Tensor


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> F16:
    """Seeded random f16_16384 weights in taming's modules (codebook spread like the 256-px features), saved
    as a Lightning checkpoint, and the two photos downloaded and decoded at 256 and 512 px."""
    tmp = tmp_path_factory.mktemp("image_size")
    batches = {size: _decode(_download_resized(tmp, size), size) for size in (256, 512)}
    config = get_model_config(MODEL)
    torch.manual_seed(SEED)
    ref = TamingReference(config).eval()
    with torch.inference_mode():
        h = ref.encode_to_prequant(preprocess(batches[256].images))
    g = torch.Generator().manual_seed(SEED)
    mean, std = h.mean(dim=(0, 2, 3)), h.std(dim=(0, 2, 3))
    with torch.no_grad():
        ref.quantize.embedding.weight.copy_(torch.randn(config.n_embed, config.embed_dim, generator=g) * std + mean)
    with torch.inference_mode():
        _, _, (_, _, ref_codes_256) = ref.quantize(h)
    checkpoint = tmp / "vqgan_imagenet_f16_16384-random.ckpt"
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["loss.logvar"] = torch.zeros(())  # a released checkpoint's extra keys, which loading ignores
    torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.0.8", "state_dict": state}, checkpoint)
    return F16(ref, str(checkpoint), batches, ref_codes_256)


def test_512px_f16_codes_are_32x32_and_equal_taming(f16: F16, tmp_path: Path) -> None:
    config = get_model_config(MODEL)
    assert config.downsample_factor == 16 and config.code_grid(512) == 32 and config.n_embed == 16384
    batch = f16.batches[512]
    x = preprocess(batch.images)
    with torch.inference_mode():
        h_ref = f16.ref.encode_to_prequant(x)
        _, _, (_, _, ref_codes) = f16.ref.quantize(h_ref)

    ours = load_encoder(config, f16.checkpoint)
    seen: list[torch.Tensor] = []
    hook = ours.quant_conv.register_forward_hook(lambda _m, _i, out: seen.append(out))
    engine = ModelEngine(ours, mode="exact", batch_size=2, image_size=512)  # what the encoder stage runs
    assert (engine.grid, engine.image_size) == (32, 512)
    codes = torch.from_numpy(engine.encode(batch.images))
    hook.remove()
    assert torch.equal(seen[0], h_ref)
    assert ref_codes.shape == codes.shape == (2, 32, 32)
    assert torch.equal(codes.long(), ref_codes)
    assert ref_codes.unique().numel() > 50  # diverse, so equality means something
    # `resolution` is the architecture's, not the input's: a 512 config is another model (no attention at f16)
    with pytest.raises(CheckpointError, match="unexpected keys: encoder.down.4.attn"):
        load_encoder(replace(config, resolution=512), f16.checkpoint)

    # the code parquet contract at grid 32
    codes_np = codes.numpy()
    meta = {key: {"caption": f"photo {key}", "url": f"http://127.0.0.1/{key}.jpg"} for key in batch.keys}
    table = build_codes_table(batch.keys, codes_np, meta, batch.sha256)
    report = check_codes_table(table, SHARD, grid=32, n_embed=config.n_embed)
    assert report.ok, report.problems
    assert report.rows == 2 and 0 <= report.code_min <= report.code_max < 16384
    assert not check_codes_table(table, SHARD, grid=16, n_embed=config.n_embed).ok  # 2048 bytes is not 16×16
    path = tmp_path / "00007.parquet"
    write_codes_parquet(table, str(path), {"model": MODEL, "grid": 32})
    read = pq.read_table(path)
    for i, row in enumerate(read.to_pylist()):
        assert len(row["code"]) == 32 * 32 * 2
        np.testing.assert_array_equal(np.frombuffer(row["code"], np.int16).reshape(32, 32), codes_np[i])
        assert row["key"] == batch.keys[i] and row["image_sha256"] == batch.sha256[i]
    np.testing.assert_array_equal(decode_codes(read, 32), ref_codes.numpy())


def test_256px_same_f16_model_gives_16x16_codes(f16: F16) -> None:
    """The same weights on the same photos at 256 px, through the encoder stage's exact engine."""
    config = get_model_config(MODEL)
    assert config.code_grid(256) == 16
    ours = load_encoder(config, f16.checkpoint)
    engine = ModelEngine(ours, mode="exact", batch_size=2)
    assert (engine.grid, engine.image_size) == (16, 256)
    codes = engine.encode(f16.batches[256].images)
    assert codes.dtype == np.int16 and codes.shape == (2, 16, 16)
    np.testing.assert_array_equal(codes, f16.ref_codes_256.numpy())
    assert np.unique(codes).size > 50
    table = build_codes_table(f16.batches[256].keys, codes, {}, f16.batches[256].sha256)
    assert check_codes_table(table, SHARD, grid=16, n_embed=config.n_embed).ok
    assert isinstance(ours, VQGANEncoder) and ours.code_grid == 16
