"""The three partitioned assets (raw_metadata_shards → image_tars → code_parquets) and the report over them."""

from laion_vq.defs.assets.codes import code_parquets
from laion_vq.defs.assets.images import image_tars
from laion_vq.defs.assets.metadata import raw_metadata_shards
from laion_vq.defs.assets.report import corrupted_shards_report

__all__ = ["code_parquets", "corrupted_shards_report", "image_tars", "raw_metadata_shards"]
