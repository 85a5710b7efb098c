"""Download LAION shards with img2dataset, one shard at a time (no Dagster here).

The img2dataset internals live in `img2dataset_shard`; this package re-exports its public names.
"""

from laion_vq.download.img2dataset_shard import (
    DEFAULT_DISALLOWED_HEADER_DIRECTIVES,
    PINNED_IMG2DATASET_VERSION,
    STATUSES,
    DownloadOptions,
    ShardDownloadResult,
    check_img2dataset_version,
    download_shard,
    expected_key,
    installed_img2dataset_version,
    shard_name,
)

__all__ = [
    "DEFAULT_DISALLOWED_HEADER_DIRECTIVES",
    "PINNED_IMG2DATASET_VERSION",
    "STATUSES",
    "DownloadOptions",
    "ShardDownloadResult",
    "check_img2dataset_version",
    "download_shard",
    "expected_key",
    "installed_img2dataset_version",
    "shard_name",
]
