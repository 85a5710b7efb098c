"""Shard numbering, metadata slicing, storage layout, tar reading and the code-parquet contract.

No Dagster imports here: this is the data layer the Dagster assets are thin wrappers over.
"""
