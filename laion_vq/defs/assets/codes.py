"""code_parquets: each image tar encoded by the VQGAN, in the VQGAN-LAION-100M parquet format.

Runs in the `gpu` pool with a backfill policy of its own, so a backfill never puts the encoder inside a
download run: the GPU step is always the root step of its runs and one model load serves many shards.
"""

import time

import dagster as dg
import numpy as np

from laion_vq import settings
from laion_vq.defs.assets._runs import for_each_shard, throttled
from laion_vq.defs.assets.images import image_tars
from laion_vq.defs.partitions import shard_partitions
from laion_vq.defs.resources import StorageResource, VQGANEncoderResource
from laion_vq.previews import code_usage_png, png_markdown, samples_vs_reconstructions_png
from laion_vq.stages import CodeShardResult, encode_code_shard

ENCODE_BACKFILL_POLICY = dg.BackfillPolicy.multi_run(settings.ENCODE_SHARDS_PER_RUN.get_int())

#: Tags that let a launcher or step executor put the encoder on a GPU machine: Kubernetes GPU limits
#: (dagster-k8s), ECS GPU resourceRequirements (dagster-aws), and a plain tag for anything else.
GPU_TAGS = {
    "laion_vq/accelerator": "gpu",
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    },
    "ecs/container_overrides": {"resourceRequirements": [{"type": "GPU", "value": "1"}]},
}


def _metadata(result: CodeShardResult) -> dict:
    meta: dict = {
        "path": dg.MetadataValue.path(result.path),
        "dagster/row_count": result.encoded,
        "status_rows": result.status_rows,
        "downloaded": result.downloaded,
        "encoded": result.encoded,
        "undecodable": sum(result.undecodable.values()),
        "undecodable_by_reason": dg.MetadataValue.json(result.undecodable),
        "undecodable_keys": dg.MetadataValue.json(result.undecodable_keys[:50]),
        "bytes": result.bytes,
        "seconds": round(result.seconds, 2),
        "encode_seconds": round(result.encode_seconds, 2),
        "images_per_second": round(result.images_per_second, 2),
        "distinct_codes": result.distinct_codes,
    }
    if result.code_usage is not None and result.code_usage.sum():
        top = np.argsort(result.code_usage)[::-1][:10]
        meta["top_codes"] = dg.MetadataValue.json({int(c): int(result.code_usage[c]) for c in top})
        meta["code_usage"] = dg.MetadataValue.md(png_markdown(code_usage_png(result.code_usage), "code usage"))
    return meta


def _preview(context: dg.AssetExecutionContext, encoder: VQGANEncoderResource, result: CodeShardResult) -> dict:
    """Samples beside their reconstructions (decoded from the stored codes), for the first shard of a run:
    a few images per run are enough to spot a wrong checkpoint, and keep the event log small."""
    if result.sample_images is None or result.sample_codes is None:
        return {}
    try:
        recon = encoder.load_decoder().decode_codes(result.sample_codes)
    except Exception as err:  # noqa: BLE001 - previews must never fail an encode
        context.log.warning(f"no reconstructions in the preview: {type(err).__name__}: {err}")
        return {}
    png = samples_vs_reconstructions_png(result.sample_images, recon)
    return {"samples_vs_reconstructions": dg.MetadataValue.md(png_markdown(png, "originals (top), reconstructions"))}


@dg.asset(
    partitions_def=shard_partitions,
    deps=[image_tars],
    backfill_policy=ENCODE_BACKFILL_POLICY,
    pool="gpu",
    op_tags=GPU_TAGS,
    automation_condition=dg.AutomationCondition.eager(),  # acted on by the `shard_automation` sensor
    group_name="laion",
    kinds={"pytorch", "parquet"},
    description=__doc__,
)
def code_parquets(
    context: dg.AssetExecutionContext, storage: StorageResource, encoder: VQGANEncoderResource
) -> None:
    layout = storage.layout
    config = encoder.vqgan_config()
    grid = config.code_grid(settings.IMAGE_SIZE)
    started = time.perf_counter()
    model = encoder.load()
    dtype = encoder.torch_dtype()
    context.log.info(
        f"loaded {encoder.model} from {encoder.checkpoint} on {encoder.resolved_device()} "
        f"in {time.perf_counter() - started:.1f}s; encoding {len(context.partition_keys)} shard(s)"
    )
    provenance = {
        "checkpoint": encoder.checkpoint,
        "checkpoint_sha256": encoder.checkpoint_sha256(),
        "index_rule": "argmax",
        "dtype": encoder.dtype,
    }

    def encode(batch: np.ndarray) -> np.ndarray:
        return model.encode_uint8(batch, batch_size=encoder.batch_size, dtype=dtype)

    previewed: list[int] = []

    def work(shard: int) -> CodeShardResult:
        keep = encoder.preview_samples if not previewed else 0
        result = encode_code_shard(
            layout,
            shard,
            model_name=encoder.model,
            codes_name=encoder.codes_folder,
            replace_other_versions=encoder.replace_codes,
            encode=encode,
            grid=grid,
            n_embed=config.n_embed,
            image_size=settings.IMAGE_SIZE,
            batch_size=encoder.batch_size,
            provenance=provenance,
            progress=throttled(context.log.info),
            keep_samples=keep,
        )
        if keep and result.sample_images is not None:
            previewed.append(shard)
        return result

    made_by = {  # on every partition's page: which checkpoint, model, precision and index rule made it
        "model": encoder.model,
        "checkpoint": dg.MetadataValue.path(encoder.checkpoint or ""),
        "checkpoint_sha256": provenance["checkpoint_sha256"],
        "dtype": encoder.dtype,
        "index_rule": provenance["index_rule"],
    }

    def metadata(result: CodeShardResult) -> dict:
        meta = {**_metadata(result), **made_by}
        if previewed and previewed[0] == result.shard_id:
            meta.update(_preview(context, encoder, result))
        return meta

    results = for_each_shard(context, work, metadata)
    encoded = sum(r.encoded for r in results)
    context.log.info(f"encoded {encoded} images in {time.perf_counter() - started:.1f}s")
