"""The taming-transformers reference encoder and sample photos, for parity tests and benchmarks.

Needs the ``dev`` extra (``taming-transformers-rom1504``, ``einops``, ``scikit-image``); nothing in
the production path imports this module. Only ``taming.modules.diffusionmodules.model`` and
``taming.modules.vqvae.quantize`` are imported -- the rest of taming needs pytorch-lightning.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .registry import VQGANConfig

__all__ = ["PHOTO_NAMES", "TamingReference", "sample_photos"]

# Colour photos bundled with scikit-image (no download needed).
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")


class TamingReference(nn.Module):
    """taming's ``Encoder`` + ``quant_conv`` + quantizer, built as ``VQModel``/``GumbelVQ`` build them.

    State-dict keys equal those of a released checkpoint's encoder part, and therefore ours.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        from taming.modules.diffusionmodules.model import Encoder
        from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2

        self.config = config
        self.encoder = Encoder(
            ch=config.ch,
            out_ch=config.in_channels,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            attn_resolutions=config.attn_resolutions,
            in_channels=config.in_channels,
            resolution=config.resolution,
            z_channels=config.z_channels,
            double_z=False,
            dropout=0.0,
        )
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize: Any  # taming's GumbelQuantize or VectorQuantizer2 (taming has no type information)
        if config.quantizer == "gumbel":
            self.quantize = GumbelQuantize(config.z_channels, config.embed_dim, n_embed=config.n_embed)
        else:
            self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25, sane_index_shape=True)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic codes: the Gumbel logits' argmax, or VectorQuantizer2's own indices."""
        h = self.encode_to_prequant(x)
        if self.config.quantizer == "gumbel":
            return torch.argmax(self.quantize.proj(h), dim=1)
        _, _, (_, _, indices) = self.quantize(h)
        return indices


def sample_photos(n: int, size: int = 256) -> np.ndarray:
    """``n`` real photos from scikit-image, centre-cropped and resized to uint8 (n, size, size, 3)."""
    import skimage.data
    from PIL import Image

    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = getattr(skimage.data, PHOTO_NAMES[i % len(PHOTO_NAMES)])()
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = Image.fromarray(img[top : top + side, left : left + side])
        if (i // len(PHOTO_NAMES)) % 2:  # more images than photos: mirror so neighbours differ
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
    return out
