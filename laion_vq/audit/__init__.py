"""Audits of what is on storage, shard by shard: which shards are corrupted, and why.

One function per asset, each returning a `ShardVerdict` (errors = corruption, warnings = quality, each
with a stable reason and a detail naming the first bad key). No Dagster here: `laion_vq.defs.checks`
turns verdicts into per-partition asset-check evaluations.
"""

from laion_vq.audit.codes import audit_code_shard
from laion_vq.audit.images import MIN_SUCCESS_RATE, audit_image_shard, tar_problems
from laion_vq.audit.metadata import audit_metadata_shard
from laion_vq.audit.verdict import Problem, ShardVerdict, audit_each

__all__ = [
    "MIN_SUCCESS_RATE",
    "Problem",
    "ShardVerdict",
    "audit_code_shard",
    "audit_each",
    "audit_image_shard",
    "audit_metadata_shard",
    "tar_problems",
]
