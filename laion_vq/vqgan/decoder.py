"""The decoder half of a taming-transformers VQGAN: integer code grids in, RGB images out.

Used to *look at* codes (reconstruction previews), not on the encoding path. Attribute names mirror
``taming.modules.diffusionmodules.model.Decoder`` and ``taming.models.vqgan.VQModel`` exactly
(``quantize.embed`` / ``quantize.embedding``, ``post_quant_conv``, ``decoder.conv_in``,
``decoder.mid.*``, ``decoder.up[i].block[j]``, ``decoder.up[i].attn[j]``,
``decoder.up[i].upsample.conv``, ``decoder.norm_out``, ``decoder.conv_out``) so a released
checkpoint's keys load unchanged, and the arithmetic follows taming's order so fp32 results on CPU
are bit-identical to the reference.
"""

from __future__ import annotations

import contextlib
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .modules import AttnBlock, AttnImpl, Normalize, ResnetBlock, _Level, _Mid, nonlinearity, set_attn_impl
from .registry import VQGANConfig, get_model_config

__all__ = ["Decoder", "GumbelCodebook", "Upsample", "VQCodebook", "VQGANDecoder"]


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed (by default) by a 3x3 conv, as in taming."""

    def __init__(self, in_channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Decoder(nn.Module):
    """taming's ``Decoder`` (``give_pre_end=False``, no timestep embedding): z -> image in ~[-1, 1].

    ``up`` is indexed by resolution level like taming's (``up[0]`` is the full-resolution level,
    built last and prepended), so ``decoder.up.{i}.*`` keys match a released checkpoint.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        attn_impl: AttnImpl = "auto",
    ) -> None:
        super().__init__()
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout, attn_impl)

        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                # Attention placement is fixed by the *configured* resolution, as in taming.
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, attn_impl=attn_impl))
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            levels.insert(0, level)  # taming's `self.up.insert(0, up)`: up[i] is level i
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def set_attn_impl(self, attn_impl: AttnImpl) -> None:
        """Switch the attention kernel of every AttnBlock (see :class:`~laion_vq.vqgan.modules.AttnBlock`)."""
        set_attn_impl(self, attn_impl)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_1(h)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h)
        for i_level in reversed(range(self.num_resolutions)):
            level = cast(_Level, self.up[i_level])  # self.up holds only _Level containers
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        h = self.norm_out(h)
        h = nonlinearity(h)
        return self.conv_out(h)


class GumbelCodebook(nn.Module):
    """The codebook of taming's ``GumbelQuantize`` (its ``embed``), without the ``proj`` logits head."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.embed = nn.Embedding(n_embed, embed_dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.embed.weight

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes (N, h, w) -> contiguous (NCHW) code vectors (N, embed_dim, h, w).

        The values equal taming's ``GumbelQuantize.get_codebook_entry`` (a one-hot einsum). The memory
        layout matters too: the decoder's convolutions keep their input's layout, and channels-last
        (what a bare ``embed(codes).permute(0, 3, 1, 2)`` is) rounds differently (~1e-5) *and* makes
        results depend on the batch size on CPU. So the layout is always NCHW, like
        ``VectorQuantizer2.get_codebook_entry`` and like taming's einsum for one f8 image (the einsum
        itself returns channels-last for larger f8 batches and for the tiny config).
        """
        return self.embed(codes).permute(0, 3, 1, 2).contiguous()


class VQCodebook(nn.Module):
    """The codebook of taming's ``VectorQuantizer2`` (its ``embedding``), without remapping."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # Same init as taming (only matters for randomly initialised demo/test weights).
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes (N, h, w) -> contiguous code vectors (N, embed_dim, h, w).

        Exactly taming's ``VectorQuantizer2.get_codebook_entry`` (``embedding -> permute -> contiguous``),
        layout included (see :meth:`GumbelCodebook.lookup` for why the layout matters).
        """
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


def _float_to_uint8_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) floats in ~[-1, 1] -> uint8 (N, H, W, 3), ``round((clamp(x, -1, 1) + 1) * 127.5)``."""
    x = (x.float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1)


class VQGANDecoder(nn.Module):
    """``codebook lookup -> post_quant_conv -> decoder`` of a VQGAN: codes back to images.

    Submodule names are taming's, so ``state_dict()`` keys are a subset of a released ``.ckpt``'s
    ``state_dict`` (``quantize.embed.weight`` or ``quantize.embedding.weight``,
    ``post_quant_conv.*``, ``decoder.*``). Load one with :func:`~laion_vq.vqgan.checkpoint.load_decoder`.
    """

    def __init__(self, config: VQGANConfig | str, attn_impl: AttnImpl = "auto") -> None:
        super().__init__()
        if isinstance(config, str):
            config = get_model_config(config)
        self.config = config
        self.quantize: GumbelCodebook | VQCodebook
        if config.quantizer == "gumbel":
            self.quantize = GumbelCodebook(config.n_embed, config.embed_dim)
        else:
            self.quantize = VQCodebook(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(
            ch=config.ch,
            out_ch=config.in_channels,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            attn_resolutions=config.attn_resolutions,
            resolution=config.resolution,
            z_channels=config.z_channels,
            attn_impl=attn_impl,
        )

    def set_attn_impl(self, attn_impl: AttnImpl) -> None:
        """Choose the attention kernel; see :class:`~laion_vq.vqgan.modules.AttnBlock`."""
        self.decoder.set_attn_impl(attn_impl)

    def decode_quant(self, quant: torch.Tensor) -> torch.Tensor:
        """Code vectors (N, embed_dim, h, w) -> float images (N, 3, h*f, w*f), as taming's ``VQModel.decode``."""
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (N, h, w) -> float images (N, 3, h*f, w*f), unclamped (roughly [-1, 1])."""
        return self.decode_quant(self.quantize.lookup(codes.long()))

    def _check_codes(self, codes: np.ndarray | torch.Tensor) -> None:
        expected = "integer array of codes, shape (N, h, w)"
        if isinstance(codes, np.ndarray):
            if not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"expected an {expected}, got dtype {codes.dtype}")
        elif isinstance(codes, torch.Tensor):
            if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
                raise ValueError(f"expected an {expected}, got dtype {codes.dtype}")
        else:
            raise TypeError(f"expected a numpy array or torch tensor ({expected}), got {type(codes).__name__}")
        if codes.ndim != 3 or min(codes.shape[1:]) < 1:
            raise ValueError(f"expected an {expected}, got shape {tuple(codes.shape)}")
        if codes.shape[0] == 0:
            return
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.config.n_embed:
            raise ValueError(
                f"codes must be in [0, {self.config.n_embed}) for model {self.config.name!r}, got range [{lo}, {hi}]"
            )

    @torch.inference_mode()
    def decode_codes(
        self,
        codes: np.ndarray | torch.Tensor,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
    ) -> np.ndarray:
        """Decode integer codes (N, g, g) to uint8 RGB images (N, g*f, g*f, 3) on the model's device.

        Pixels are ``round((clamp(x, -1, 1) + 1) * 127.5)`` of the decoder output ``x``, computed on the
        device so only uint8 travels back. ``dtype`` (e.g. ``torch.bfloat16``) enables autocast; by
        default the model runs in its own precision (fp32), which on CPU reproduces taming bit-for-bit.
        """
        self._check_codes(codes)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        param = next(self.parameters())
        device = param.device
        n, h, w = (int(s) for s in codes.shape)
        f = self.config.downsample_factor
        if n == 0:
            return np.empty((0, h * f, w * f, self.config.in_channels), dtype=np.uint8)
        use_autocast = dtype is not None and dtype != param.dtype
        chunks: list[torch.Tensor] = []
        for start in range(0, n, batch_size):
            batch = codes[start : start + batch_size]
            if isinstance(batch, np.ndarray):
                batch = torch.from_numpy(np.array(batch, dtype=np.int64))  # a copy: works for read-only views
            batch = batch.to(device=device, dtype=torch.int64)
            ctx = torch.autocast(device_type=device.type, dtype=dtype) if use_autocast else contextlib.nullcontext()
            with ctx:
                x = self(batch)
            chunks.append(_float_to_uint8_nhwc(x))
        return torch.cat(chunks).cpu().numpy()
