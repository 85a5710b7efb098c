"""Helpers shared by the assets: run granularity and per-shard failure handling."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import dagster as dg

from laion_vq.shards.numbering import parse_shard_key

T = TypeVar("T")


def for_each_shard(
    context: dg.AssetExecutionContext,
    work: Callable[[int], T],
    metadata: Callable[[T], dict],
) -> list[T]:
    """Run `work` for every partition of this run, recording each shard's metadata on its own partition.

    One bad shard does not stop the others; at the end the step fails and names every failed shard
    with its error, so a backfill shows exactly which shards to look at.
    """
    keys = list(context.partition_keys)
    results: list[T] = []
    failures: dict[str, str] = {}
    for index, key in enumerate(keys, start=1):
        try:
            result = work(parse_shard_key(key))
        except Exception as err:  # noqa: BLE001 - reported below, per shard, never swallowed
            context.log.error(f"shard {key} failed: {type(err).__name__}: {err}")
            failures[key] = f"{type(err).__name__}: {err}"
            continue
        results.append(result)
        context.add_asset_metadata(metadata(result), partition_key=key)
        context.log.info(f"shard {key} done ({index}/{len(keys)})")
    if failures:
        raise dg.Failure(
            description=f"{len(failures)} of {len(keys)} shard(s) failed: "
            + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5]),
            metadata={"failed_shards": dg.MetadataValue.json(failures)},
        )
    return results


def throttled(log: Callable[[str], None], every_seconds: float = 30.0) -> Callable[[str], None]:
    """A progress logger that writes at most once per `every_seconds` (long shards, few events)."""
    last = [0.0]

    def emit(message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= every_seconds:
            last[0] = now
            log(message)

    return emit
