"""The three shard stages as plain functions: metadata slice → image tar → code parquet.

No Dagster here: the assets call these and turn the returned numbers into materialization
metadata, and benchmarks or scripts can call them directly. One module per stage.
"""

from laion_vq.stages.codes import (
    CodeRun,
    CodeShardResult,
    CodeSpec,
    CodesVersionError,
    code_spec,
    encode_code_shard,
    refuse_other_version,
)
from laion_vq.stages.images import (
    SCRATCH_PREFIX,
    ImageShardResult,
    WorseDownloadError,
    download_image_shard,
    refuse_worse_download,
    remove_stale_scratch,
)
from laion_vq.stages.metadata import MetadataShardResult, write_metadata_shard

__all__ = [
    "SCRATCH_PREFIX",
    "CodeRun",
    "CodeShardResult",
    "CodeSpec",
    "CodesVersionError",
    "ImageShardResult",
    "MetadataShardResult",
    "WorseDownloadError",
    "code_spec",
    "download_image_shard",
    "encode_code_shard",
    "refuse_other_version",
    "refuse_worse_download",
    "remove_stale_scratch",
    "write_metadata_shard",
]
