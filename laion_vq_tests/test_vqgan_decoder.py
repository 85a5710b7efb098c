"""The VQGAN decoder: bit-exact parity with taming-transformers' own modules (fp32, CPU), loading, round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from laion_vq.vqgan import (
    MODELS,
    CheckpointError,
    VQGANConfig,
    VQGANDecoder,
    VQGANEncoder,
    get_model_config,
    load_decoder,
    load_encoder,
    load_state_dict,
    save_random_checkpoint,
)
from laion_vq.vqgan.reference import sample_photos

from .conftest import TINY_VQ

TINY = get_model_config("vqgan_gumbel_f8_tiny")


class TamingDecoderReference(nn.Module):
    """taming's ``Decoder`` + ``post_quant_conv`` + quantizer, built as ``VQModel``/``GumbelVQ`` build them."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder
        from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2

        self.config = config
        self.decoder = Decoder(
            ch=config.ch,
            out_ch=3,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            attn_resolutions=config.attn_resolutions,
            in_channels=3,
            resolution=256,
            z_channels=config.z_channels,
            double_z=False,
            dropout=0.0,
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantize: nn.Module
        if config.quantizer == "gumbel":
            self.quantize = GumbelQuantize(config.z_channels, config.embed_dim, n_embed=config.n_embed)
        else:
            self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25, sane_index_shape=True)

    @property
    def codebook(self) -> nn.Embedding:
        return self.quantize.embed if self.config.quantizer == "gumbel" else self.quantize.embedding

    def codebook_entry(self, codes: torch.Tensor) -> torch.Tensor:
        """taming's own code -> vector API (what its sampling scripts feed ``VQModel.decode``)."""
        n, h, w = codes.shape
        return self.quantize.get_codebook_entry(codes.flatten(), (n, h, w, self.config.embed_dim))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """taming's ``VQModel.decode``."""
        return self.decoder(self.post_quant_conv(quant))


def _seeded_reference(config: VQGANConfig, seed: int) -> TamingDecoderReference:
    torch.manual_seed(seed)
    ref = TamingDecoderReference(config).eval()
    with torch.no_grad():  # a codebook spread like real code vectors (taming's VQ init is ~0)
        ref.codebook.weight.copy_(torch.randn(config.n_embed, config.embed_dim))
    return ref


def _save_lightning_ckpt(ref: TamingDecoderReference, path: Path) -> str:
    """The reference's weights under a released checkpoint's keys (plus loss keys), in Lightning's layout."""
    state = dict(ref.state_dict())
    state["loss.logvar"] = torch.zeros(())
    ckpt = {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.0.8", "state_dict": state, "callbacks": {}}
    torch.save(ckpt, path)
    return str(path)


def _random_codes(config: VQGANConfig, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, config.n_embed, (n, 32, 32), generator=torch.Generator().manual_seed(seed))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """The documented pixel mapping, written independently in numpy."""
    x = x.permute(0, 2, 3, 1).numpy()
    return np.round((np.clip(x, -1, 1) + np.float32(1)) * np.float32(127.5)).astype(np.uint8)


def _reference_quant(ref: TamingDecoderReference, codes: torch.Tensor) -> torch.Tensor:
    """Code vectors as fed to taming's ``decode``: ``embed(codes).permute(0, 3, 1, 2)``, made NCHW-contiguous.

    That is exactly ``VectorQuantizer2.get_codebook_entry``; ``GumbelQuantize.get_codebook_entry`` (an
    einsum) has the same values but a layout that varies with config and batch size (see
    ``GumbelCodebook.lookup``), so the layout is fixed here.
    """
    quant = ref.codebook(codes).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(quant, ref.codebook_entry(codes))  # same values as taming's own lookup
    if ref.config.quantizer == "vq":
        assert ref.codebook_entry(codes).is_contiguous()
    return quant


def _check_parity(config: VQGANConfig, tmp_path: Path, n: int, seed: int, check_uint8: bool = True) -> None:
    ref = _seeded_reference(config, seed)
    ours = load_decoder(config, _save_lightning_ckpt(ref, tmp_path / f"{config.name}.ckpt"))
    assert not ours.training
    codes = _random_codes(config, n, seed)
    with torch.inference_mode():
        expected = ref.decode(_reference_quant(ref, codes))
        got = ours(codes)
    assert got.shape == (n, 3, 256, 256)
    assert expected.std() > 0.05  # random weights still give non-trivial images, so equality means something
    assert torch.equal(got, expected)
    if check_uint8:
        np.testing.assert_array_equal(ours.decode_codes(codes.numpy().astype(np.int16)), _to_uint8(expected))


@pytest.mark.parametrize("config", [TINY, TINY_VQ], ids=lambda c: c.name)
def test_tiny_decoder_equals_taming(config: VQGANConfig, tmp_path: Path) -> None:
    _check_parity(config, tmp_path, n=2, seed=11)


def test_full_gumbel_f8_decoder_equals_taming(tmp_path: Path) -> None:
    """The released f8 decoder architecture, one image (the float output; uint8 mapping is checked above)."""
    _check_parity(get_model_config("vqgan_gumbel_f8"), tmp_path, n=1, seed=12, check_uint8=False)


def test_layout_matters_and_nchw_is_batch_invariant() -> None:
    """Why code vectors are made NCHW: a channels-last input (a bare ``permute``) rounds slightly
    differently, and only NCHW gives the same images whatever the batch size."""
    torch.manual_seed(13)
    ours = VQGANDecoder(TINY).eval()
    codes = _random_codes(TINY, 3, 13)
    with torch.inference_mode():
        quant = ours.quantize.lookup(codes)
        assert quant.is_contiguous()
        exact = ours(codes)
        one_by_one = torch.cat([ours(codes[i : i + 1]) for i in range(3)])
        channels_last = ours.decode_quant(quant.contiguous(memory_format=torch.channels_last))
    assert torch.equal(one_by_one, exact)
    torch.testing.assert_close(channels_last, exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_keys_and_shapes_match_taming(name: str) -> None:
    config = get_model_config(name)
    with torch.device("meta"):
        ours = VQGANDecoder(config).state_dict()
        ref = TamingDecoderReference(config).state_dict()
    ref = {k: v for k, v in ref.items() if not k.startswith("quantize.proj.")}  # the encoder's part
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    assert [k for k in ours if k.startswith("decoder.")] == [k for k in ref if k.startswith("decoder.")]


def test_round_trip_from_random_checkpoint(tiny_checkpoint: str) -> None:
    encoder = load_encoder(TINY, tiny_checkpoint)
    decoder = load_decoder(TINY, tiny_checkpoint)
    photos = sample_photos(2)
    codes = encoder.encode_uint8(photos)
    images = decoder.decode_codes(codes)
    assert images.dtype == np.uint8 and images.shape == (2, 256, 256, 3)
    assert len(np.unique(images)) > 16
    np.testing.assert_array_equal(decoder.decode_codes(torch.from_numpy(codes), batch_size=1)[1:], images[1:])
    assert decoder.decode_codes(codes[:0]).shape == (0, 256, 256, 3)


def test_random_checkpoint_has_full_seeded_decoder(tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    path = save_random_checkpoint(TINY, str(tmp_path / "r.ckpt"), seed=5)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched

    state = load_state_dict(path)
    decoder = load_decoder(TINY, path)
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.manual_seed(5)
    fresh = VQGANDecoder(TINY).state_dict()
    torch.manual_seed(5)
    encoder = VQGANEncoder(TINY)
    for k, v in decoder.state_dict().items():
        expected = encoder.quantize.embed.weight if k == "quantize.embed.weight" else fresh[k]
        assert torch.equal(v, expected), k
    assert {"loss.logvar", "quant_conv.weight", "quantize.proj.weight"} <= set(state)


def test_missing_decoder_is_a_clear_error(tmp_path: Path, tiny_checkpoint: str) -> None:
    """An encoder-only export still encodes, but cannot decode."""
    state = {k: v for k, v in load_state_dict(tiny_checkpoint).items() if not k.startswith("decoder.")}
    torch.save({"state_dict": state}, tmp_path / "encoder_only.ckpt")
    path = str(tmp_path / "encoder_only.ckpt")
    load_encoder(TINY, path)
    with pytest.raises(
        CheckpointError, match=r"loading its decoder.*no decoder\.\* keys at all.*missing keys: decoder\."
    ):
        load_decoder(TINY, path)


def test_decoder_key_problems_are_named(tmp_path: Path, tiny_checkpoint: str) -> None:
    state = load_state_dict(tiny_checkpoint)
    del state["decoder.up.0.block.1.conv2.weight"]
    state["quantize.used"] = torch.arange(10)  # a remap table would change what codes mean
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as info:
        load_decoder(TINY, str(tmp_path / "bad.ckpt"))
    msg = str(info.value)
    assert "1 missing keys: decoder.up.0.block.1.conv2.weight" in msg
    assert "1 unexpected keys: quantize.used" in msg
    assert "no decoder.* keys" not in msg


def test_gumbel_checkpoint_as_vq_model_fails_clearly(tiny_checkpoint: str) -> None:
    vq_twin = VQGANConfig(**{**TINY.__dict__, "name": "tiny_as_vq", "quantizer": "vq"})
    with pytest.raises(CheckpointError) as info:
        load_decoder(vq_twin, tiny_checkpoint)
    msg = str(info.value)
    assert "checkpoint looks like f8, gumbel quantizer with 8192 codes" in msg
    assert "model is f8, vq quantizer with 8192 codes" in msg
    assert "missing keys: quantize.embedding.weight" in msg and "unexpected keys: quantize.embed.weight" in msg


def test_decode_codes_rejects_bad_codes() -> None:
    with torch.device("meta"):
        decoder = VQGANDecoder(TINY)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 8192\).*\[8192, 8192\]"):
        decoder.decode_codes(np.full((1, 32, 32), 8192, dtype=np.int16))
    with pytest.raises(ValueError, match=r"\[-1, 0\]"):
        decoder.decode_codes(-np.eye(32, dtype=np.int64)[None])
    with pytest.raises(ValueError, match="dtype float32"):
        decoder.decode_codes(np.zeros((1, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(32, 32\)"):
        decoder.decode_codes(np.zeros((32, 32), dtype=np.int64))
    with pytest.raises(TypeError, match="list"):
        decoder.decode_codes([[[0]]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        decoder.decode_codes(np.zeros((1, 32, 32), dtype=np.int64), batch_size=0)
