"""Bit-exact parity of our VQGAN encoder with taming-transformers' own modules (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from laion_vq.vqgan import (
    MODELS,
    VectorQuantizeHead,
    VQGANConfig,
    VQGANEncoder,
    get_model_config,
    load_encoder,
    preprocess,
)
from laion_vq.vqgan.reference import TamingReference, sample_photos

from .conftest import TINY_VQ


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return sample_photos(4)


def _seeded_reference(config: VQGANConfig, seed: int) -> TamingReference:
    torch.manual_seed(seed)
    return TamingReference(config).eval()


def _save_lightning_ckpt(reference: TamingReference, path: Path) -> Path:
    """The reference's weights under a released checkpoint's keys, in Lightning's layout."""
    state = dict(reference.state_dict())
    c = reference.config
    state["post_quant_conv.weight"] = torch.randn(c.z_channels, c.embed_dim, 1, 1)
    state["post_quant_conv.bias"] = torch.randn(c.z_channels)
    state["decoder.conv_in.weight"] = torch.randn(c.ch * c.ch_mult[-1], c.z_channels, 3, 3)
    state["loss.logvar"] = torch.zeros(())
    torch.save(
        {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.0.8", "state_dict": state, "callbacks": {}},
        path,
    )
    return path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_keys_and_shapes_match_taming(name: str) -> None:
    config = get_model_config(name)
    with torch.device("meta"):
        ours = VQGANEncoder(config).state_dict()
        ref = TamingReference(config).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_tiny_gumbel_codes_and_features_equal_taming(tmp_path: Path, photos: np.ndarray) -> None:
    config = get_model_config("vqgan_gumbel_f8_tiny")
    ref = _seeded_reference(config, seed=1)
    ours = load_encoder(config, str(_save_lightning_ckpt(ref, tmp_path / "tiny.ckpt")))
    x = preprocess(torch.from_numpy(photos))
    with torch.inference_mode():
        ref_codes = torch.argmax(ref.quantize.proj(ref.quant_conv(ref.encoder(x))), dim=1)
        ours_codes = ours(x)
        assert torch.equal(ours.encode_to_prequant(x), ref.encode_to_prequant(x))
    assert ours_codes.dtype == torch.int64
    assert ours_codes.shape == (4, 32, 32)
    assert torch.equal(ours_codes, ref_codes)
    assert ref_codes.unique().numel() > 50  # random weights still give diverse codes, so this means something
    np.testing.assert_array_equal(ours.encode_uint8(photos, batch_size=4), ref_codes.numpy().astype(np.int16))


def test_full_gumbel_f8_on_real_photos_equals_taming(tmp_path: Path, photos: np.ndarray) -> None:
    """The released f8 architecture (~178 GFLOP/image), two real photos, through a .ckpt file."""
    config = get_model_config("vqgan_gumbel_f8")
    ref = _seeded_reference(config, seed=2)
    ours = load_encoder(config, str(_save_lightning_ckpt(ref, tmp_path / "f8.ckpt")))
    x = preprocess(torch.from_numpy(photos[:2]))
    with torch.inference_mode():
        ref_h = ref.quant_conv(ref.encoder(x))
        ref_codes = torch.argmax(ref.quantize.proj(ref_h), dim=1)
        ours_h = ours.encode_to_prequant(x)
        ours_codes = ours.quantize.indices(ours_h)
    assert torch.equal(ours_h, ref_h)
    assert ours_codes.shape == (2, 32, 32)
    assert torch.equal(ours_codes, ref_codes)


def test_tiny_vq_codes_equal_vectorquantizer2(tmp_path: Path, photos: np.ndarray) -> None:
    ref = _seeded_reference(TINY_VQ, seed=3)
    x = preprocess(torch.from_numpy(photos))
    with torch.no_grad():
        # A codebook spread like the features (taming's init is ~0 and would make every code the same).
        h = ref.encode_to_prequant(x)
        ref.quantize.embedding.weight.copy_(torch.randn(TINY_VQ.n_embed, TINY_VQ.embed_dim) * h.std())
        _, _, (_, _, ref_codes) = ref.quantize(h)
    ours = load_encoder(TINY_VQ, str(_save_lightning_ckpt(ref, tmp_path / "vq.ckpt")))
    with torch.inference_mode():
        ours_codes = ours(x)
    assert ref_codes.shape == ours_codes.shape == (4, 32, 32)
    assert torch.equal(ours_codes, ref_codes)
    assert ref_codes.unique().numel() > 50


def test_vq_ties_resolve_like_argmin() -> None:
    """Duplicate codebook rows give exact distance ties; both must pick the lowest index."""
    torch.manual_seed(0)
    ours = VectorQuantizeHead(n_embed=8, embed_dim=32)
    with torch.no_grad():
        ours.embedding.weight.copy_(torch.randn(4, 32).repeat(2, 1))
    z = torch.randn(2, 32, 3, 3)
    codes = ours.indices(z)
    assert int(codes.max()) < 4
    assert torch.equal(codes.flatten(), torch.argmin(ours.distances(z), dim=1))


def test_sdpa_attention_is_close_to_reference(photos: np.ndarray) -> None:
    """The opt-in SDPA kernel differs only at rounding level from taming's bmm formulation."""
    config = get_model_config("vqgan_gumbel_f8_tiny")
    torch.manual_seed(4)
    exact = VQGANEncoder(config, attn_impl="math").eval()
    fast = VQGANEncoder(config, attn_impl="sdpa").eval()
    fast.load_state_dict(exact.state_dict())
    x = preprocess(torch.from_numpy(photos[:2]))
    with torch.inference_mode():
        h_exact, h_fast = exact.encode_to_prequant(x), fast.encode_to_prequant(x)
        agree = (exact.quantize.indices(h_exact) == fast.quantize.indices(h_fast)).float().mean().item()
    torch.testing.assert_close(h_fast, h_exact, rtol=1e-4, atol=1e-4)
    assert agree > 0.99
