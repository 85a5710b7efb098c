"""Model configurations: the one place that says which VQGAN encoders exist.

The released taming-transformers checkpoints (and the latent-diffusion VQ first stages and dalle-mini's
fine-tune, which are built from the same modules) are described here by the same hyper-parameters
as their ``ddconfig`` YAML, so that :class:`~laion_vq.vqgan.model.VQGANEncoder` builds modules
whose state-dict keys and shapes match the released ``.ckpt`` files without any renaming. Any other
taming/ldm VQ model can be described by its own ``model.yaml`` (:mod:`laion_vq.vqgan.model_yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DEFAULT_MODEL", "MODELS", "VQGANConfig", "get_model_config"]

# GroupNorm in taming always uses 32 groups, so every normalised channel count (ch * ch_mult[i]) must be a
# multiple of 32. z_channels/embed_dim are never normalised (conv_out, quant_conv, post_quant_conv and the
# decoder's conv_in are plain convs), so ldm's 4- and 8-channel latents are fine.
_NUM_GROUPS = 32
# Codes are stored as int16 in the parquet outputs.
_MAX_CODES_INT16 = 32768


@dataclass(frozen=True)
class VQGANConfig:
    """Hyper-parameters of a VQGAN encoder (the ``ddconfig`` + quantizer part of a taming config)."""

    name: str
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_channels: int
    embed_dim: int
    n_embed: int
    quantizer: Literal["gumbel", "vq"]
    resolution: int = 256
    in_channels: int = 3
    description: str = ""

    def __post_init__(self) -> None:
        # Fail at definition time rather than deep inside GroupNorm or at int16 conversion.
        if self.quantizer not in ("gumbel", "vq"):
            raise ValueError(f"{self.name}: quantizer must be 'gumbel' or 'vq', got {self.quantizer!r}")
        if not self.ch_mult:
            raise ValueError(f"{self.name}: ch_mult must not be empty")
        for c in (self.ch * m for m in self.ch_mult):
            if c % _NUM_GROUPS:
                raise ValueError(f"{self.name}: channel count {c} is not a multiple of {_NUM_GROUPS}")
        if min(self.z_channels, self.embed_dim, self.num_res_blocks, self.resolution) <= 0:
            raise ValueError(f"{self.name}: z_channels, embed_dim, num_res_blocks, resolution must be > 0")
        if not 0 < self.n_embed <= _MAX_CODES_INT16:
            raise ValueError(f"{self.name}: n_embed must be in [1, {_MAX_CODES_INT16}] so codes fit int16")
        if self.quantizer == "gumbel" and self.z_channels != self.embed_dim:
            # taming's GumbelVQ builds GumbelQuantize(z_channels, ...) but feeds it quant_conv's
            # embed_dim-channel output, so the released models only work when the two are equal.
            raise ValueError(f"{self.name}: gumbel quantizer requires z_channels == embed_dim")

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction of the encoder: one stride-2 Downsample between consecutive levels."""
        return 2 ** (len(self.ch_mult) - 1)

    def code_grid(self, image_size: int) -> int:
        """Side length of the code grid for a square ``image_size`` input (a multiple of the factor: the encoder
        would otherwise crop the last row and column of cells away)."""
        if image_size < 1 or image_size % self.downsample_factor:
            raise ValueError(
                f"{self.name}: image size {image_size} is not a positive multiple of its factor "
                f"f{self.downsample_factor} (LAION_VQ_IMAGE_SIZE)"
            )
        return image_size // self.downsample_factor


DEFAULT_MODEL = "vqgan_gumbel_f8"

MODELS: dict[str, VQGANConfig] = {
    c.name: c
    for c in (
        VQGANConfig(
            name="vqgan_gumbel_f8",
            ch=128,
            ch_mult=(1, 1, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(32,),
            z_channels=256,
            embed_dim=256,
            n_embed=8192,
            quantizer="gumbel",
            description="taming-transformers Gumbel VQGAN f8, 8192 codes (OpenImages); 256px -> 32x32 codes",
        ),
        VQGANConfig(
            name="vqgan_imagenet_f16_1024",
            ch=128,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            z_channels=256,
            embed_dim=256,
            n_embed=1024,
            quantizer="vq",
            description="taming-transformers VQGAN ImageNet f16, 1024 codes; 256px -> 16x16 codes",
        ),
        VQGANConfig(
            name="vqgan_imagenet_f16_16384",
            ch=128,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            z_channels=256,
            embed_dim=256,
            n_embed=16384,
            quantizer="vq",
            description="taming-transformers VQGAN ImageNet f16, 16384 codes; 256px -> 16x16 codes",
        ),
        # The latent-diffusion VQ first stages (CompVis/latent-diffusion, models/first_stage_models/<name>/config.yaml,
        # target ldm.models.autoencoder.VQModel; checkpoints https://ommer-lab.com/files/latent-diffusion/<name>.zip,
        # whose model.ckpt sits beside that config.yaml once unzipped). Their encoder is taming's (ldm's
        # Encoder is the same code) and their quantizer *is* taming's VectorQuantizer2 (ldm imports it), so the
        # codes are the nearest codebook entry, with a small z/embed dim (4 or 8) and attention at f8's 32x32.
        VQGANConfig(
            name="ldm_vq_f8",
            # vq-f8/config.yaml: embed_dim 4, n_embed 16384, z_channels 4, ch 128, ch_mult [1,2,2,4],
            # num_res_blocks 2, attn_resolutions [32], resolution 256, double_z false.
            ch=128,
            ch_mult=(1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(32,),
            z_channels=4,
            embed_dim=4,
            n_embed=16384,
            quantizer="vq",
            description="latent-diffusion vq-f8 (OpenImages), 16384 codes of dim 4, nearest-neighbour head; "
            "256px -> 32x32 codes",
        ),
        VQGANConfig(
            name="ldm_vq_f8_n256",
            # vq-f8-n256/config.yaml: as vq-f8 but n_embed 256.
            ch=128,
            ch_mult=(1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(32,),
            z_channels=4,
            embed_dim=4,
            n_embed=256,
            quantizer="vq",
            description="latent-diffusion vq-f8-n256 (OpenImages), 256 codes of dim 4, nearest-neighbour head; "
            "256px -> 32x32 codes",
        ),
        VQGANConfig(
            name="ldm_vq_f16",
            # vq-f16/config.yaml: embed_dim 8, n_embed 16384, z_channels 8, ch 128, ch_mult [1,1,2,2,4],
            # num_res_blocks 2, attn_resolutions [16], resolution 256, double_z false.
            ch=128,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            z_channels=8,
            embed_dim=8,
            n_embed=16384,
            quantizer="vq",
            description="latent-diffusion vq-f16 (OpenImages), 16384 codes of dim 8, nearest-neighbour head; "
            "256px -> 16x16 codes",
        ),
        VQGANConfig(
            name="dallemini_vqgan_f16_16384",
            # dalle-mini's fine-tune (CC3M + YFCC100M) of vqgan_imagenet_f16_16384, done with taming-transformers:
            # the PyTorch Lightning release is huggingface.co/boris/vqgan_f16_16384 (model.ckpt + config.yaml,
            # target taming.models.vqgan.VQModel, embed_dim 256, n_embed 16384, z_channels 256, ch 128,
            # ch_mult [1,1,2,2,4], num_res_blocks 2, attn_resolutions [16]). Same architecture as
            # vqgan_imagenet_f16_16384, other weights. The Flax ports (flax-community/vqgan_f16_16384,
            # dalle-mini/vqgan_imagenet_f16_16384: flax_model.msgpack) are not Lightning checkpoints.
            ch=128,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            z_channels=256,
            embed_dim=256,
            n_embed=16384,
            quantizer="vq",
            description="dalle-mini VQGAN f16 16384 (taming ImageNet f16 fine-tuned on CC3M + YFCC100M, "
            "boris/vqgan_f16_16384); 256px -> 16x16 codes",
        ),
        VQGANConfig(
            name="vqgan_gumbel_f8_tiny",
            ch=32,
            ch_mult=(1, 1, 2, 2),
            num_res_blocks=1,
            attn_resolutions=(32,),
            z_channels=32,
            embed_dim=32,
            n_embed=8192,
            quantizer="gumbel",
            description="for tests and demos only, not a released model: same f8 layout "
            "(256px -> 32x32 codes, 8192 codes) at a fraction of the compute",
        ),
    )
}


def get_model_config(name: str) -> VQGANConfig:
    """Look up a config by name; unknown names raise ``KeyError`` listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown VQGAN model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
