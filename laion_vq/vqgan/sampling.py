"""Index rules: how a Gumbel head's logits become one code per position.

- ``argmax`` (default): the mode, ``argmax(logits)``. Deterministic; on CPU fp32 bit-equal to taming.
- ``sample``: a draw from ``softmax(logits)``, the distribution taming's ``GumbelQuantize`` samples from at
  inference (``F.gumbel_softmax(..., hard=True)``; with ``hard=True`` the temperature does not change the
  argmax, so the draw is ``argmax(logits + Gumbel noise)``). Only Gumbel heads have such a distribution: a
  nearest-neighbour (VQ) head has no logits, and ``sample`` on it is refused (:func:`check_index_rule`).

The noise of ``sample`` is a pure function of the sample's *key* and of the (code, row, column) it is
added to, never of batch size, order, shard grouping, threads or device:

- each key gets a 64-bit seed, the first 8 bytes of ``sha256(SAMPLE_SALT + key)`` (:func:`key_seed`);
- the uniform for code ``c`` at ``(h, w)`` is output ``i = (c*H + h)*W + w`` of the SplitMix64 stream started
  at that seed (a counter-based generator: ``mix(seed + (i+1)*golden)``, no state carried between
  images), computed in int64 with wrapping arithmetic on the model's device — integers, so identical
  on every device; its top 52 bits give ``u = (k + 0.5) / 2**52`` in the open interval (0, 1);
- ``G = -log(-log(u))`` in float64, added to the float64 logits; the argmax over codes is the draw.
  (Devices' ``log`` may differ in the last float64 ulp: a draw could change only between two scores
  within ~1e-16 of each other. The logits themselves are bit-equal only on CPU fp32, as for ``argmax``.)

Why a counter-based hash on the model's device rather than a seeded ``torch.Generator`` per image: equally
exact, but the generator makes its noise on the CPU (8.4M values for an f8 image, copied to the GPU), which would
bound a GPU encoder at the CPU's pace. The noise costs the same whatever the model's size (elementwise passes
and two float64 logs): ``benchmarks/bench_index_rules.py`` measures it against ``argmax``.

Changing :data:`SAMPLE_SALT` or this construction is a new index rule (a new version of the dataset).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["INDEX_RULES", "SAMPLE_SALT", "check_index_rule", "gumbel_noise", "key_seed", "key_seeds", "splitmix64"]

INDEX_RULES = ("argmax", "sample")
#: Part of the ``sample`` rule's definition: the same key always draws the same codes with this salt.
SAMPLE_SALT = "laion_vq/index_rule=sample/v1:"

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 torch holds it (same bits)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def check_index_rule(rule: str, quantizer: str, model: str) -> None:
    """Raise ValueError for an unknown rule, or for ``sample`` on a head that has no distribution to sample."""
    if rule not in INDEX_RULES:
        raise ValueError(f"unknown index rule {rule!r}; known rules: {', '.join(INDEX_RULES)}")
    if rule == "sample" and quantizer != "gumbel":
        raise ValueError(
            f"index rule 'sample' needs a Gumbel quantizer, but model {model!r} has a nearest-neighbour "
            f"({quantizer}) quantizer: its codes have no distribution to sample from; use 'argmax'"
        )


def key_seed(key: str) -> int:
    """The sample's 64-bit seed (as a signed int64): first 8 bytes, little-endian, of sha256(salt + key)."""
    digest = hashlib.sha256((SAMPLE_SALT + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def key_seeds(keys: Sequence[str]) -> torch.Tensor:
    """int64 seeds, one per key, in order."""
    return torch.tensor([key_seed(k) for k in keys], dtype=torch.int64)


def splitmix64(seed: int, count: int) -> list[int]:
    """The first `count` outputs of SplitMix64 from `seed`, in plain Python (the reference the tests check)."""
    out = []
    state = seed & _MASK64
    for _ in range(count):
        state = (state + _GOLDEN) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
        out.append(z ^ (z >> 31))
    return out


_COUNTERS: dict[tuple[int, str], torch.Tensor] = {}


def _counter(numel: int, device: torch.device) -> torch.Tensor:
    """``(i+1) * golden`` for i < numel (wrapping int64), cached per size and device."""
    cache_key = (numel, str(device))
    if cache_key not in _COUNTERS:
        _COUNTERS[cache_key] = torch.arange(1, numel + 1, dtype=torch.int64, device=device).mul_(_signed(_GOLDEN))
    return _COUNTERS[cache_key]


def _shr(z: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 bits (torch shifts signed integers arithmetically)."""
    torch.bitwise_right_shift(z, bits, out=out)
    return out.bitwise_and_((1 << (64 - bits)) - 1)


def uniform_bits(seed: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """SplitMix64 outputs 0..numel-1 from `seed` as int64 bit patterns, computed on `device`."""
    device = torch.device(device)
    z = _counter(numel, device) + seed  # wraps like uint64
    tmp = torch.empty_like(z)
    for bits, mult in ((30, _MIX1), (27, _MIX2)):
        z.bitwise_xor_(_shr(z, bits, tmp)).mul_(_signed(mult))
    return z.bitwise_xor_(_shr(z, 31, tmp))


def gumbel_noise(seed: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise, float64 of `shape` (row-major counter order), from one key's seed."""
    numel = 1
    for dim in shape:
        numel *= int(dim)
    bits = uniform_bits(seed, numel, device)
    top52 = bits.bitwise_right_shift_(12).bitwise_and_((1 << 52) - 1)
    u = top52.to(torch.float64).add_(0.5).mul_(2.0**-52)  # exact: (k + 0.5) has 53 significant bits
    return u.log_().neg_().log_().neg_().view(*shape)
