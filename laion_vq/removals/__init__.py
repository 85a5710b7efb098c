"""Removal lists applied to every shard already made (takedowns, Re-LAION-5B's CSAM removals): no Dagster here.

`lists.py` reads the lists under `removals/`, `plan.py` finds the shards holding listed items from the status
parquets alone, `apply.py` rewrites one shard's files atomically and records the removal in a ledger,
`items.py` says which list removed each removed key of a shard, and why.
"""

from laion_vq.removals.apply import ShardRemoval, apply_plan, apply_shard
from laion_vq.removals.items import RemovedKey, removed_keys
from laion_vq.removals.lists import (
    BrokenList,
    RemovalItem,
    RemovalList,
    RemovalListError,
    parse_removal_list,
    read_ledger,
    read_lists_skipping_broken,
    read_removal_lists,
)
from laion_vq.removals.plan import Match, RemovalPlan, plan_removals

__all__ = [
    "BrokenList",
    "Match",
    "RemovalItem",
    "RemovalList",
    "RemovalListError",
    "RemovalPlan",
    "RemovedKey",
    "ShardRemoval",
    "apply_plan",
    "apply_shard",
    "parse_removal_list",
    "plan_removals",
    "read_ledger",
    "read_lists_skipping_broken",
    "read_removal_lists",
    "removed_keys",
]
