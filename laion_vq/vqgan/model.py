"""The encoder half of a taming-transformers VQGAN: images in, integer code grids out."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .modules import AttnImpl, Encoder
from .quantizers import GumbelQuantizeHead, VectorQuantizeHead
from .registry import VQGANConfig, get_model_config
from .sampling import check_index_rule, key_seeds

__all__ = ["VQGANEncoder", "preprocess"]


def preprocess(images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], exactly ``x / 127.5 - 1`` as in taming."""
    if images_uint8_nhwc.dtype != torch.uint8 or images_uint8_nhwc.ndim != 4:
        raise ValueError(
            f"expected a uint8 tensor of shape (N, H, W, 3), got {images_uint8_nhwc.dtype} "
            f"{tuple(images_uint8_nhwc.shape)}"
        )
    x = images_uint8_nhwc.permute(0, 3, 1, 2).to(torch.float32)
    return x / 127.5 - 1


def _as_tensor(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Zero-copy where possible; copies negative-stride views and read-only buffers torch cannot wrap."""
    if isinstance(batch, torch.Tensor):
        return batch
    if not batch.flags.writeable or any(s < 0 for s in batch.strides):
        batch = np.array(batch, copy=True)
    return torch.from_numpy(batch)


class VQGANEncoder(nn.Module):
    """``encoder -> quant_conv -> quantize`` of a VQGAN, returning code indices.

    Submodule names are taming's, so ``state_dict()`` keys are a subset of a released ``.ckpt``'s
    ``state_dict`` (``encoder.*``, ``quant_conv.*``, ``quantize.*``).
    """

    def __init__(self, config: VQGANConfig | str, attn_impl: AttnImpl = "auto") -> None:
        super().__init__()
        if isinstance(config, str):
            config = get_model_config(config)
        self.config = config
        self.encoder = Encoder(
            ch=config.ch,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            attn_resolutions=config.attn_resolutions,
            in_channels=config.in_channels,
            resolution=config.resolution,
            z_channels=config.z_channels,
            attn_impl=attn_impl,
        )
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize: GumbelQuantizeHead | VectorQuantizeHead
        if config.quantizer == "gumbel":
            # As taming's GumbelVQ: GumbelQuantize(z_channels, embed_dim, n_embed).
            self.quantize = GumbelQuantizeHead(config.z_channels, config.embed_dim, config.n_embed)
        else:
            self.quantize = VectorQuantizeHead(config.n_embed, config.embed_dim)

    @property
    def code_grid(self) -> int:
        """Side of the code grid for the configured input resolution."""
        return self.config.code_grid(self.config.resolution)

    def set_attn_impl(self, attn_impl: AttnImpl) -> None:
        """Choose the attention kernel; see :class:`~laion_vq.vqgan.modules.AttnBlock`."""
        self.encoder.set_attn_impl(attn_impl)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous features fed to the quantizer, (N, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def forward(self, x: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Float images in [-1, 1], (N, 3, H, W) -> int64 codes (N, H/f, W/f).

        Without ``seeds`` the index rule is ``argmax``; with one int64 seed per image (from its key,
        :func:`~laion_vq.vqgan.sampling.key_seeds`) it is ``sample`` (Gumbel heads only).
        The quantizer always runs outside autocast in the parameters' dtype: an argmax/argmin over
        thousands of half-precision scores would turn many near-ties into exact ties, while the head
        costs ~1% of the encoder's FLOPs.
        """
        if seeds is not None:
            check_index_rule("sample", self.config.quantizer, self.config.name)
        z = self.encode_to_prequant(x)
        head_dtype = self.quant_conv.weight.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.to(head_dtype)
            if seeds is None:
                return self.quantize.indices(z)
            assert isinstance(self.quantize, GumbelQuantizeHead)
            return self.quantize.sample(z, seeds)

    def _check_images(self, images: np.ndarray | torch.Tensor) -> None:
        """uint8 NHWC RGB, square, a side that is a multiple of the factor (the training resolution or any other:
        the encoder is convolutional; 512 px with f16 gives 32x32 codes)."""
        f = self.config.downsample_factor
        expected = f"uint8 array of shape (N, S, S, 3) (RGB, NHWC), S a multiple of {f}"
        if isinstance(images, np.ndarray):
            dtype_ok = images.dtype == np.uint8
        elif isinstance(images, torch.Tensor):
            dtype_ok = images.dtype == torch.uint8
        else:
            raise TypeError(f"expected a numpy array or torch tensor ({expected}), got {type(images).__name__}")
        if not dtype_ok:
            raise ValueError(f"expected {expected}, got dtype {images.dtype}")
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[3] != self.config.in_channels:
            raise ValueError(f"expected {expected}, got shape {shape}")
        if shape[1] != shape[2] or shape[1] % f or shape[1] == 0:
            raise ValueError(
                f"expected {expected}, got {shape[1]}x{shape[2]} images; model {self.config.name!r} (f{f}) takes "
                f"square images whose side is a multiple of {f}"
            )

    @torch.inference_mode()
    def encode_uint8(
        self,
        images: np.ndarray | torch.Tensor,
        batch_size: int = 32,
        dtype: torch.dtype | None = None,
        *,
        index_rule: str = "argmax",
        keys: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Encode uint8 RGB images (N, S, S, 3) to int16 codes (N, g, g) on the model's device.

        ``index_rule`` is ``argmax`` or ``sample`` (:mod:`laion_vq.vqgan.sampling`); ``sample`` needs the
        images' ``keys``, which alone seed their draws (batching, order and device do not).

        Batches travel to the device as uint8 (4x less transfer than float) and are normalised there;
        codes stay on the device until the end, so on CUDA the host never waits inside the loop.
        ``dtype`` (e.g. ``torch.bfloat16``) enables autocast for the encoder; by default the model runs
        in its own precision (fp32), which on CPU reproduces taming bit-for-bit. On GPUs fp32 results
        can differ from CPU on near-ties (TF32 convolutions, SDPA attention, other kernels).
        """
        self._check_images(images)
        check_index_rule(index_rule, self.config.quantizer, self.config.name)
        seeds = None
        if index_rule == "sample":
            if keys is None or len(keys) != images.shape[0]:
                got = "no keys" if keys is None else f"{len(keys)} keys"
                raise ValueError(f"index rule 'sample' needs one key per image: {images.shape[0]} images, {got}")
            seeds = key_seeds(keys)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.config.n_embed > np.iinfo(np.int16).max + 1:
            raise ValueError(f"n_embed={self.config.n_embed} codes do not fit int16")
        param = next(self.parameters())
        device = param.device
        n = images.shape[0]
        grid = self.config.code_grid(images.shape[1])
        if n == 0:
            return np.empty((0, grid, grid), dtype=np.int16)
        chunks: list[torch.Tensor] = []
        use_cuda = device.type == "cuda"
        use_autocast = dtype is not None and dtype != param.dtype
        for start in range(0, n, batch_size):
            batch = _as_tensor(images[start : start + batch_size])
            if use_cuda:
                if batch.device.type == "cpu":
                    # pinned host memory lets the copy overlap with the previous batch's compute
                    batch = batch.contiguous().pin_memory()
                batch = batch.to(device, non_blocking=True)
            else:
                batch = batch.to(device)
            x = preprocess(batch).to(param.dtype)
            ctx = torch.autocast(device_type=device.type, dtype=dtype) if use_autocast else contextlib.nullcontext()
            with ctx:
                codes = self(x, None if seeds is None else seeds[start : start + batch_size])
            chunks.append(codes.to(torch.int16))
        return torch.cat(chunks).cpu().numpy()
