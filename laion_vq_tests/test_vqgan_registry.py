"""The model registry: released configs, the tiny test config, and config validation."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import pytest

from laion_vq.vqgan import DEFAULT_MODEL, MODELS, VQGANConfig, get_model_config


def test_known_models() -> None:
    assert DEFAULT_MODEL == "vqgan_gumbel_f8"
    assert set(MODELS) == {
        "vqgan_gumbel_f8",
        "vqgan_gumbel_f8_tiny",
        "vqgan_imagenet_f16_1024",
        "vqgan_imagenet_f16_16384",
        "ldm_vq_f8",
        "ldm_vq_f8_n256",
        "ldm_vq_f16",
        "dallemini_vqgan_f16_16384",
    }
    f8 = get_model_config("vqgan_gumbel_f8")
    assert (f8.ch, f8.ch_mult, f8.num_res_blocks, f8.attn_resolutions) == (128, (1, 1, 2, 4), 2, (32,))
    assert (f8.z_channels, f8.embed_dim, f8.n_embed, f8.quantizer) == (256, 256, 8192, "gumbel")
    assert f8.downsample_factor == 8 and f8.code_grid(256) == 32
    f16 = get_model_config("vqgan_imagenet_f16_16384")
    assert f16.downsample_factor == 16 and f16.code_grid(256) == 16 and f16.n_embed == 16384
    assert get_model_config("vqgan_imagenet_f16_1024").n_embed == 1024


def test_tiny_keeps_f8_layout_and_says_it_is_not_released() -> None:
    tiny = get_model_config("vqgan_gumbel_f8_tiny")
    assert tiny.code_grid(256) == 32 and tiny.n_embed == 8192 and tiny.quantizer == "gumbel"
    assert "not a released model" in tiny.description


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="vqgan_gumbel_f8_tiny"):
        get_model_config("vqgan_f32")


def test_config_is_frozen_and_validated() -> None:
    f8 = get_model_config("vqgan_gumbel_f8")
    with pytest.raises(FrozenInstanceError):
        f8.ch = 64  # type: ignore[misc]
    with pytest.raises(ValueError, match="multiple of 32"):
        replace(f8, ch=48)
    with pytest.raises(ValueError, match="int16"):
        replace(f8, n_embed=65536)
    with pytest.raises(ValueError, match="z_channels == embed_dim"):
        replace(f8, embed_dim=128)
    with pytest.raises(ValueError, match="quantizer"):
        VQGANConfig("x", 128, (1,), 1, (), 256, 256, 16, "kmeans")  # type: ignore[arg-type]
