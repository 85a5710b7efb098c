"""The corrupted-shards report and the dataset card: core functions (polars, numpy, PIL), no Dagster.

`usage` packs a shard's code-usage histogram into text kept in its code parquet's footer, and caches them; `shards`
joins every shard's checks, counts and exclusion into one table and a summary; `card` writes the
Hugging Face dataset card of the shards that table lets into the dataset. A thin Dagster asset calls them.
"""
