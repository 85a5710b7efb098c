"""Jobs: the runs operators launch (downloads, encodings, the whole chain for a shard, audits).

No job names an executor: the code location chooses one for all of them (`laion_vq.definitions.build_definitions`),
so the Celery location runs the same jobs on its workers."""

import dagster as dg

from laion_vq.defs.assets import code_parquets, corrupted_shards_report, image_tars, raw_metadata_shards
from laion_vq.defs.assets.codes import GPU_TAGS
from laion_vq.defs.checks import audit_every_shard

#: Download runs: metadata slice + img2dataset per shard.
download_job = dg.define_asset_job(
    "download_shards",
    selection=[raw_metadata_shards, image_tars],
    description="Slice LAION metadata and download the shard's images with img2dataset.",
)

#: Encoder runs carry the GPU run tags so a run launcher (k8s, ECS) can place the whole run on a GPU host.
encode_job = dg.define_asset_job(
    "encode_shards",
    selection=dg.AssetSelection.assets(code_parquets),
    tags={k: v for k, v in GPU_TAGS.items()},
    description="Encode downloaded shards with the VQGAN (GPU pool).",
)

#: The whole chain for a shard, e.g. `dagster job launch`/materialize from a shell or the demo.
pipeline_job = dg.define_asset_job(
    "laion_vq_pipeline",
    selection=[raw_metadata_shards, image_tars, code_parquets],
    description="Metadata → image tar → VQGAN codes for the selected shard(s).",
)


#: The per-shard audits over every shard materialized or on storage; on demand or from a schedule. Each
#: shard's result lands on its own partition of each check. A job of one op, not of the checks themselves:
#: the code checks are the encoder's own (its step evaluates them on each shard it records), and executing
#: them would wait for the `gpu` pool slot a fed encoder run holds for hours.
@dg.job(
    name="audit_shards",
    description="Audit every metadata shard, image tar and code parquet; one result per shard and check.",
)
def check_job() -> None:
    audit_every_shard()


#: The corrupted-shards report and the dataset card, from the instance's per-shard state.
report_job = dg.define_asset_job(
    "corrupted_shards_report_job",
    selection=[corrupted_shards_report],
    description="Summarise every shard's checks and counts; regenerate the dataset card.",
)
