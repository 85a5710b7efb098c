"""Quantizer heads that turn pre-quantization features into integer codes.

Only the parts needed for *encoding* are kept; parameter names match taming's ``GumbelQuantize``
(``proj``, ``embed``) and ``VectorQuantizer2`` (``embedding``) so checkpoint keys load unchanged.

Both heads score codes in at least fp32, outside autocast: with weights or features in bf16/fp16
(a half-precision encoder body), an argmin/argmax over thousands of half-precision scores would
turn many near-ties into exact ties. In fp32 the arithmetic is exactly taming's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sampling import gumbel_noise

__all__ = ["GumbelQuantizeHead", "VectorQuantizeHead"]


def _score_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input already is: the precision codes are scored in (never below fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class GumbelQuantizeHead(nn.Module):
    """Head of taming's Gumbel VQGAN: a 1x1 conv to ``n_embed`` logits per position.

    taming's ``GumbelQuantize.forward`` samples a code with Gumbel noise even in eval mode. ``indices``
    takes the mode of that distribution, ``argmax(logits)`` (index rule ``argmax``); ``sample`` draws from
    it with noise seeded per sample key (index rule ``sample``, see :mod:`laion_vq.vqgan.sampling`).
    ``embed`` is unused for encoding but kept so the checkpoint's ``quantize.embed.weight`` has a home.
    """

    def __init__(self, num_hiddens: int, embed_dim: int, n_embed: int) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.embedding_dim = embed_dim
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised code log-probabilities, shape (N, n_embed, H, W), in fp32 (or fp64) whatever the
        dtype of ``z`` and of the weights; in fp32 exactly ``proj(z)``."""
        weight, bias = self.proj.weight, self.proj.bias
        dtype = _score_dtype(z, weight)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.conv2d(z.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Most likely code per position, int64 (N, H, W); ties resolve like ``torch.argmax``."""
        return self.logits(z).argmax(dim=1)

    def sample(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """One draw from softmax(logits) per position, int64 (N, H, W): ``argmax(logits + Gumbel noise)``.

        ``seeds[i]`` (int64, from :func:`~laion_vq.vqgan.sampling.key_seed`) alone decides image i's noise,
        generated per image on ``z``'s device, so a key's codes do not depend on what shares its batch.
        """
        logits = self.logits(z)
        if seeds.shape != (logits.shape[0],):
            raise ValueError(f"need one seed per image: {logits.shape[0]} images, seeds of shape {tuple(seeds.shape)}")
        out = torch.empty((logits.shape[0], *logits.shape[2:]), dtype=torch.int64, device=logits.device)
        for i, seed in enumerate(seeds.tolist()):
            noise = gumbel_noise(seed, logits.shape[1:], logits.device)
            out[i] = noise.add_(logits[i].to(torch.float64)).argmax(dim=0)
        return out


class VectorQuantizeHead(nn.Module):
    """Nearest-codebook-entry lookup of taming's ``VectorQuantizer2`` (no remap, no losses).

    The squared distance is evaluated with exactly taming's expression
    ``|z|^2 + |e|^2 - 2 z.e`` (same einsum, same summation order), so that near-ties resolve to the
    same code as the reference; ``|z|^2`` does not change the argmin mathematically but does change
    the rounding. It is always computed in fp32 (fp64 if given fp64), outside autocast: bf16/fp16
    features or codebook are upcast first.

    latent-diffusion's ``VQModel`` uses this very class (``from taming.modules.vqvae.quantize import
    VectorQuantizer2``), so the head serves its VQ models too. Its ``legacy`` flag only changes the
    training loss and ``sane_index_shape`` only the shape of the returned indices; a ``remap`` table
    (a ``quantize.used`` buffer) would renumber codes and is refused when loading a checkpoint.
    """

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.n_e = n_embed
        self.e_dim = embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # Same init as taming (only matters for randomly initialised demo/test weights).
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared distances, shape (N*H*W, n_embed), rows in (n, h, w) order, in fp32 (or fp64)."""
        weight = self.embedding.weight
        dtype = _score_dtype(z, weight)
        # .to() returns the tensor itself when the dtype already matches: the fp32 path is taming's, bit for bit.
        z, weight = z.to(dtype), weight.to(dtype)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.permute(0, 2, 3, 1).contiguous()
            z_flattened = z.view(-1, self.e_dim)
            return (
                torch.sum(z_flattened**2, dim=1, keepdim=True)
                + torch.sum(weight**2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", z_flattened, weight.t())
            )

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code per position, int64 (N, H, W); ties go to the lowest index."""
        n, _, h, w = z.shape
        return torch.argmin(self.distances(z), dim=1).view(n, h, w)
