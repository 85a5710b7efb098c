"""One static partition per shard, `00000` … `{LAION_VQ_NUM_SHARDS-1:05d}`."""

from __future__ import annotations

import dagster as dg

from laion_vq import settings
from laion_vq.shards.numbering import shard_keys

shard_partitions = dg.StaticPartitionsDefinition(shard_keys(settings.NUM_SHARDS.get_int()))
