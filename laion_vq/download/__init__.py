"""Download LAION shards with img2dataset, one shard at a time, guarded (no Dagster here).

The img2dataset internals live in `img2dataset_shard`; the guards in `guard` and `image_checks`; the
options in `options`; the shard's files in `shard_files`. This package re-exports the public names.
"""

from laion_vq.download.img2dataset_shard import (
    PINNED_IMG2DATASET_VERSION,
    ShardDownloadResult,
    check_img2dataset_version,
    download_shard,
    expected_key,
    installed_img2dataset_version,
    shard_name,
)
from laion_vq.download.options import DEFAULT_DISALLOWED_HEADER_DIRECTIVES, DownloadOptions
from laion_vq.download.shard_files import STATUSES

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
