"""Shard numbering: the one place that says how a shard id is spelled.

LAION-400M's image tars and the VQGAN-LAION-100M parquets are named `00000` … `09999`: the shard id
zero-padded to five digits, which is also how img2dataset names its output files.
"""

from __future__ import annotations

SHARD_DIGITS = 5
DEFAULT_SAMPLES_PER_SHARD = 10_000
DEFAULT_NUM_SHARDS = 10_000


def shard_key(shard_id: int, digits: int = SHARD_DIGITS) -> str:
    """`3` → `"00003"`; refuses ids that do not fit in `digits` digits."""
    if shard_id < 0 or shard_id >= 10**digits:
        raise ValueError(f"shard id {shard_id} does not fit in {digits} digits (0 … {10**digits - 1})")
    return f"{shard_id:0{digits}d}"


def parse_shard_key(key: str, digits: int = SHARD_DIGITS) -> int:
    """`"00003"` → `3`; anything but exactly `digits` decimal digits is a clear error."""
    if len(key) != digits or not key.isdigit():
        raise ValueError(f"shard key must be {digits} decimal digits, got {key!r}")
    return int(key)


def is_shard_key(name: str, digits: int = SHARD_DIGITS) -> bool:
    """Whether `name` spells a shard key (`00042`): file listings hold other names too."""
    return len(name) == digits and name.isdigit()


def shard_keys(num_shards: int, digits: int = SHARD_DIGITS) -> list[str]:
    """All shard keys `00000` … `{num_shards-1:05d}`, in order."""
    if num_shards < 1 or num_shards > 10**digits:
        raise ValueError(f"number of shards must be in 1 … {10**digits}, got {num_shards}")
    return [shard_key(i, digits) for i in range(num_shards)]
