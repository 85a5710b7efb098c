"""Quantizer heads that turn pre-quantization features into integer codes.

Only the parts needed for *encoding* are kept; parameter names match taming's ``GumbelQuantize``
(``proj``, ``embed``) and ``VectorQuantizer2`` (``embedding``) so checkpoint keys load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GumbelQuantizeHead", "VectorQuantizeHead"]


class GumbelQuantizeHead(nn.Module):
    """Head of taming's Gumbel VQGAN: a 1x1 conv to ``n_embed`` logits per position.

    taming's ``GumbelQuantize.forward`` samples a code with Gumbel noise even in eval mode; for a
    reproducible dataset we take the mode of that distribution, ``argmax(logits)``, instead.
    ``embed`` is unused for encoding but kept so the checkpoint's ``quantize.embed.weight`` has a home.
    """

    def __init__(self, num_hiddens: int, embed_dim: int, n_embed: int) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.embedding_dim = embed_dim
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised code log-probabilities, shape (N, n_embed, H, W)."""
        return self.proj(z)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Most likely code per position, int64 (N, H, W); ties resolve like ``torch.argmax``."""
        return self.proj(z).argmax(dim=1)


class VectorQuantizeHead(nn.Module):
    """Nearest-codebook-entry lookup of taming's ``VectorQuantizer2`` (no remap, no losses).

    The squared distance is evaluated with exactly taming's expression
    ``|z|^2 + |e|^2 - 2 z.e`` (same einsum, same summation order), so that near-ties resolve to the
    same code as the reference; ``|z|^2`` does not change the argmin mathematically but does change
    the rounding.
    """

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.n_e = n_embed
        self.e_dim = embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # Same init as taming (only matters for randomly initialised demo/test weights).
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared distances, shape (N*H*W, n_embed), rows in (n, h, w) order."""
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flattened = z.view(-1, self.e_dim)
        weight = self.embedding.weight
        return (
            torch.sum(z_flattened**2, dim=1, keepdim=True)
            + torch.sum(weight**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_flattened, weight.t())
        )

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code per position, int64 (N, H, W); ties go to the lowest index."""
        n, _, h, w = z.shape
        return torch.argmin(self.distances(z), dim=1).view(n, h, w)
