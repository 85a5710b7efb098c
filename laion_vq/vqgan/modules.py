"""Building blocks of the taming-transformers VQGAN encoder, encoder-only.

Attribute names mirror ``taming.modules.diffusionmodules.model`` exactly (``conv_in``,
``down[i].block[j]``, ``down[i].attn[j]``, ``down[i].downsample.conv``, ``mid.block_1``,
``mid.attn_1``, ``mid.block_2``, ``norm_out``, ``conv_out``) so released checkpoints load
unchanged. The arithmetic is written in the same order as taming so that fp32 results on CPU are
bit-identical to the reference, which is what lets us call our codes "the" VQGAN codes.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttnBlock", "AttnImpl", "Downsample", "Encoder", "Normalize", "ResnetBlock", "nonlinearity"]

AttnImpl = Literal["auto", "math", "sdpa"]


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish, written as ``x * sigmoid(x)`` (not ``F.silu``) to round exactly like taming."""
    return x * torch.sigmoid(x)


def Normalize(in_channels: int) -> nn.GroupNorm:  # taming's name, kept for recognisability
    """GroupNorm with taming's fixed 32 groups and eps=1e-6."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (right/bottom) zero padding."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        # torch convs only pad symmetrically, so padding is applied by hand in forward.
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (GroupNorm -> swish -> conv, twice), without timestep input."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            # taming's encoder never sets conv_shortcut=True, so only the 1x1 shortcut exists.
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections.

    ``attn_impl`` picks the kernel:

    * ``"math"`` -- taming's own ``bmm -> scale -> softmax -> bmm`` sequence, bit-identical to the
      reference in fp32.
    * ``"sdpa"`` -- ``F.scaled_dot_product_attention``; on GPUs it uses fused kernels that never
      materialise the ``(hw, hw)`` score matrix, but it rounds differently (scale applied before
      the matmul, different reduction order), so codes can differ from the reference on rare
      near-ties.
    * ``"auto"`` (default) -- ``"math"`` on CPU, where exact parity matters more than speed and
      SDPA brings little, and ``"sdpa"`` on any accelerator.
    """

    def __init__(self, in_channels: int, attn_impl: AttnImpl = "auto") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.attn_impl: AttnImpl = attn_impl
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def _use_sdpa(self, x: torch.Tensor) -> bool:
        if self.attn_impl == "auto":
            return x.device.type != "cpu"
        return self.attn_impl == "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q = self.q(h_)
        k = self.k(h_)
        v = self.v(h_)
        b, c, h, w = q.shape
        if self._use_sdpa(x):
            # (b, 1, hw, c): one head of width c; SDPA's default scale is c**-0.5, as in taming.
            q = q.reshape(b, 1, c, h * w).transpose(2, 3)
            k = k.reshape(b, 1, c, h * w).transpose(2, 3)
            v = v.reshape(b, 1, c, h * w).transpose(2, 3)
            out = F.scaled_dot_product_attention(q, k, v)
            h_ = out.transpose(2, 3).reshape(b, c, h, w)
        else:
            q = q.reshape(b, c, h * w).permute(0, 2, 1)  # b, hw, c
            k = k.reshape(b, c, h * w)  # b, c, hw
            w_ = torch.bmm(q, k)  # b, hw(q), hw(k)
            w_ = w_ * (int(c) ** (-0.5))
            w_ = F.softmax(w_, dim=2)
            v = v.reshape(b, c, h * w)
            w_ = w_.permute(0, 2, 1)  # b, hw(k), hw(q)
            h_ = torch.bmm(v, w_).reshape(b, c, h, w)  # b, c, hw(q)
        return x + self.proj_out(h_)


def set_attn_impl(module: nn.Module, attn_impl: AttnImpl) -> None:
    """Switch the attention kernel of every AttnBlock inside `module` (encoder or decoder)."""
    for m in module.modules():
        if isinstance(m, AttnBlock):
            m.attn_impl = attn_impl


class _Level(nn.Module):
    """One resolution level: a container so keys read ``down.{i}.block.{j}`` / ``.attn.{j}`` / ``.downsample``."""

    downsample: nn.Module  # the encoder's levels but the last
    upsample: nn.Module  # the decoder's levels but the first

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """Bottleneck container so keys read ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``."""

    def __init__(self, channels: int, dropout: float, attn_impl: AttnImpl) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout)
        self.attn_1 = AttnBlock(channels, attn_impl=attn_impl)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout)


class Encoder(nn.Module):
    """taming's ``Encoder`` with ``double_z=False`` and no timestep embedding.

    Unlike taming, ``forward`` does not keep every intermediate activation alive (taming's ``hs``
    list is only needed by the U-Net ``Model``), which lowers peak memory; the arithmetic is the same.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        in_channels: int,
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        attn_impl: AttnImpl = "auto",
    ) -> None:
        super().__init__()
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            level = _Level()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                # Attention placement is fixed by the *configured* resolution, as in taming.
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, attn_impl=attn_impl))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res = curr_res // 2
            self.down.append(level)

        self.mid = _Mid(block_in, dropout, attn_impl)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def set_attn_impl(self, attn_impl: AttnImpl) -> None:
        """Switch the attention kernel of every AttnBlock (see :class:`AttnBlock`)."""
        set_attn_impl(self, attn_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, module in enumerate(self.down):
            level = cast(_Level, module)  # self.down holds only _Level containers
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_1(h)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h)
        h = self.norm_out(h)
        h = nonlinearity(h)
        return self.conv_out(h)
