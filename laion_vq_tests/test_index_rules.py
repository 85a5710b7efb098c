"""Index rules: `argmax` stays taming's argmax; `sample` draws from softmax(logits) with noise that depends
only on the sample key (not batch size, order, shard grouping), and is refused on a nearest-neighbour head."""

from __future__ import annotations

import math
from dataclasses import replace

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from laion_vq.defs.resources import VQGANEncoderResource
from laion_vq.shards.codes import read_codes_provenance
from laion_vq.shards.storage import StorageLayout
from laion_vq.stages import encode_code_shard
from laion_vq.vqgan import GumbelQuantizeHead, VQGANEncoder, get_model_config, preprocess
from laion_vq.vqgan.sampling import gumbel_noise, key_seed, key_seeds, splitmix64, uniform_bits

from .conftest import TINY_MODEL, TINY_VQ, _jpeg, _write_shard

#: The tiny f8 architecture with 64 codes at 64 px (8×8 codes): keeps these tests fast on a shared CPU.
SMALL_GUMBEL = replace(get_model_config(TINY_MODEL), name="tiny_gumbel64_test", n_embed=64, resolution=64)
SIZE = SMALL_GUMBEL.resolution
KEYS = [f"00007{i:04d}" for i in range(8)]


@pytest.fixture(scope="module")
def small_model() -> VQGANEncoder:
    torch.manual_seed(0)
    return VQGANEncoder(SMALL_GUMBEL).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (len(KEYS), SIZE, SIZE, 3), dtype=np.uint8)


def _sample(model: VQGANEncoder, images: np.ndarray, keys: list[str], batch_size: int = 8) -> np.ndarray:
    return model.encode_uint8(images, batch_size=batch_size, index_rule="sample", keys=keys)


def test_noise_is_splitmix64_of_the_key_seed() -> None:
    assert splitmix64(0, 1) == [0xE220A8397B1DCDAF]  # SplitMix64's published first output from seed 0
    for seed in (0, 1, -1, key_seed("000000000"), key_seed("123456789")):
        got = [bits & (2**64 - 1) for bits in uniform_bits(seed, 64).tolist()]
        assert got == splitmix64(seed, 64)
    u = ((splitmix64(5, 3)[2] >> 12) + 0.5) / 2**52
    assert gumbel_noise(5, (3,))[2].item() == -math.log(-math.log(u))
    assert key_seed("000000000") != key_seed("000000001")


def test_full_size_noise_is_standard_gumbel() -> None:
    """One f8 image's noise (8192 × 32 × 32 values): Gumbel(0, 1) moments, the same on every call."""
    noise = gumbel_noise(key_seed("000000000"), (8192, 32, 32))
    assert noise.dtype == torch.float64 and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 0.5772157) < 0.002  # Euler–Mascheroni
    assert abs(noise.std().item() - math.pi / math.sqrt(6)) < 0.002
    assert torch.equal(noise[:2], gumbel_noise(key_seed("000000000"), (2, 32, 32)))  # a prefix of the same stream


def test_sample_depends_only_on_the_key(small_model: VQGANEncoder, images: np.ndarray) -> None:
    reference = _sample(small_model, images, KEYS)
    for batch_size in (1, 3):
        np.testing.assert_array_equal(_sample(small_model, images, KEYS, batch_size), reference)
    np.testing.assert_array_equal(_sample(small_model, images[::-1], KEYS[::-1], 3)[::-1], reference)
    perm = np.random.default_rng(1).permutation(len(KEYS))
    shuffled = _sample(small_model, images[perm], [KEYS[i] for i in perm], 3)
    np.testing.assert_array_equal(shuffled[np.argsort(perm)], reference)
    # shard grouping: the same keys encoded in other company (two groups, one with strangers)
    strangers = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    first = _sample(small_model, np.concatenate([strangers, images[:5]]), ["000090000", "000090001", *KEYS[:5]], 4)
    second = _sample(small_model, images[5:], KEYS[5:], 2)
    np.testing.assert_array_equal(np.concatenate([first[2:], second]), reference)


def test_sample_differs_by_key_and_from_argmax(small_model: VQGANEncoder, images: np.ndarray) -> None:
    same_image = np.repeat(images[:1], 3, axis=0)
    draws = _sample(small_model, same_image, ["000070000", "000070001", "000070002"])
    assert (draws[0] != draws[1]).mean() > 0.2 and (draws[1] != draws[2]).mean() > 0.2
    argmax = small_model.encode_uint8(same_image[:1])
    assert (draws[0] != argmax[0]).mean() > 0.2
    np.testing.assert_array_equal(small_model.encode_uint8(same_image[:1], index_rule="argmax"), argmax)


def test_sampled_codes_follow_softmax() -> None:
    """10,000 keys at one position: the codes' frequencies match softmax(logits) (chi-square, fixed keys)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    k = len(logits)
    head = GumbelQuantizeHead(num_hiddens=k, embed_dim=4, n_embed=k)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(k).view(k, k, 1, 1))
        head.proj.bias.zero_()
    n = 10_000
    z = logits.view(1, k, 1, 1).expand(n, k, 1, 1)
    with torch.inference_mode():
        codes = head.sample(z, key_seeds([f"{i:09d}" for i in range(n)]))
    counts = np.bincount(codes.flatten().numpy(), minlength=k)
    expected = torch.softmax(logits.double(), 0).numpy() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, (chi2, counts, expected)  # 7 degrees of freedom, p = 0.001
    assert 0.5 * np.abs(counts / n - expected / n).sum() < 0.015  # total variation
    with torch.inference_mode():
        assert torch.equal(head.sample(z[:100], key_seeds([f"{i:09d}" for i in range(100)])), codes[:100])


def test_argmax_is_the_logits_argmax(small_model: VQGANEncoder, images: np.ndarray) -> None:
    """`argmax` stays what the taming parity tests check (test_vqgan_parity.py): argmax of proj(z)."""
    x = preprocess(torch.from_numpy(images[:2]))
    with torch.inference_mode():
        expected = small_model.quantize.proj(small_model.encode_to_prequant(x)).argmax(dim=1)
    np.testing.assert_array_equal(small_model.encode_uint8(images[:2]), expected.numpy().astype(np.int16))


def test_sample_is_refused_on_a_vq_head_and_needs_keys(small_model: VQGANEncoder, images: np.ndarray) -> None:
    vq = VQGANEncoder(TINY_VQ).eval()
    image = np.zeros((1, TINY_VQ.resolution, TINY_VQ.resolution, 3), np.uint8)
    with pytest.raises(ValueError, match="model 'tiny_vq_test' has a nearest-neighbour"):
        vq.encode_uint8(image, index_rule="sample", keys=KEYS[:1])
    with pytest.raises(ValueError, match="nearest-neighbour"):
        vq(preprocess(torch.from_numpy(image)), seeds=key_seeds(KEYS[:1]))
    with pytest.raises(ValueError, match="needs one key per image: 2 images, no keys"):
        small_model.encode_uint8(images[:2], index_rule="sample")
    with pytest.raises(ValueError, match="unknown index rule 'mode'"):
        small_model.encode_uint8(images[:1], index_rule="mode")
    resource = VQGANEncoderResource(model="vqgan_imagenet_f16_1024", index_rule="sample")
    with pytest.raises(dg.Failure, match="LAION_VQ_INDEX_RULE: .*'vqgan_imagenet_f16_1024' has a nearest-neighbour"):
        resource.checked_index_rule()


def test_sample_through_the_stage_records_the_rule(tmp_path, tiny_encoder, tiny_checkpoint) -> None:
    """The real tiny encoder (8192 codes) through encode_code_shard: same codes at batch sizes 1 and 2, and the
    resource's provenance (the parquet's `laion_vq` metadata) names the rule."""
    config, model = tiny_encoder
    provenance = VQGANEncoderResource(model=TINY_MODEL, checkpoint=tiny_checkpoint, index_rule="sample").provenance()
    assert provenance["index_rule"] == "sample"
    layout = StorageLayout(str(tmp_path))
    _write_shard(layout, 6, {f"00006{i:04d}": _jpeg(i) for i in range(2)}, failed=[])

    def run(batch_size: int, name: str) -> str:
        return encode_code_shard(
            layout, 6, model_name=TINY_MODEL, codes_name=name, grid=32, n_embed=config.n_embed,
            encode=lambda b, keys: model.encode_uint8(b, batch_size=batch_size, index_rule="sample", keys=keys),
            batch_size=batch_size, provenance=provenance,
        ).path  # fmt: skip

    one, two = run(1, "a"), run(2, "b")
    assert pq.read_table(one).column("code").to_pylist() == pq.read_table(two).column("code").to_pylist()
    assert read_codes_provenance(one)["index_rule"] == "sample"
