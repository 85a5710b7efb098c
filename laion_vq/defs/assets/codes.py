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
from laion_vq.defs.check_state import IMAGES_CHECK, failed_with_error
from laion_vq.defs.partitions import shard_partitions
from laion_vq.defs.resources import StorageResource, VQGANEncoderResource
from laion_vq.encode.pipeline import EncodePipeline
from laion_vq.previews import code_usage_png, png_markdown, samples_vs_reconstructions_png
from laion_vq.shards.exclusions import read_exclusions
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.tar_reader import CorruptShardError
from laion_vq.stages.codes import CodeShardResult, CodeSpec

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
    """Samples beside their reconstructions (decoded from the stored codes), on the first and the last shard
    of a run: the last is the asset's latest materialization, the page users land on."""
    if result.sample_images is None or result.sample_codes is None:
        return {}
    try:
        recon = encoder.load_decoder().decode_codes(result.sample_codes)
    except Exception as err:  # noqa: BLE001 - previews must never fail an encode
        context.log.warning(f"no reconstructions in the preview: {type(err).__name__}: {err}")
        return {}
    model = encoder.vqgan_config().name
    weights = ", RANDOM weights" if encoder.random_weights() else ""
    labels = ("originals", f"reconstructions ({model}{weights})")
    png = samples_vs_reconstructions_png(result.sample_images, recon, labels=labels)
    caption = f"originals (top) and reconstructions (bottom), {model}{weights}" + (
        ": noise is expected" if weights else ""
    )
    return {"samples_vs_reconstructions": dg.MetadataValue.md(png_markdown(png, caption))}


def made_by(encoder: VQGANEncoderResource, provenance: dict) -> dict:
    """On every partition's page: which checkpoint, model, precision and index rule made its codes."""
    meta = {
        "model": encoder.vqgan_config().name,
        "checkpoint": dg.MetadataValue.path(encoder.checkpoint or ""),
        "checkpoint_sha256": provenance["checkpoint_sha256"],
        "dtype": encoder.dtype,
        "encode_mode": encoder.mode,
        "index_rule": provenance["index_rule"],
        "random_weights": provenance["random_weights"],
    }
    if provenance["random_weights"]:
        # short lines: the metadata table cuts a long cell at its edge
        meta["warning"] = dg.MetadataValue.md(
            "**RANDOM WEIGHTS**: codes and reconstructions are noise.\n\n"
            "This checkpoint was made by `save_random_checkpoint` (tests, the demo).\n\n"
            "Set `LAION_VQ_CHECKPOINT` to a trained taming-transformers checkpoint."
        )
    return meta


def refuse_failed_tars(context: dg.AssetExecutionContext) -> dict[str, str]:
    """Shards of this run whose tar check's latest, current result is an ERROR: never encoded (the check
    is blocking within a run; this covers encoder runs launched on their own)."""
    failed = failed_with_error(context.instance, IMAGES_CHECK, list(context.partition_keys))
    for key, result in sorted(failed.items()):
        context.log.error(f"shard {key}: {IMAGES_CHECK.name} failed ({result.detail}); not encoding it")
    return {key: f"{result.reason}: {result.detail}" for key, result in failed.items()}


@dg.asset(
    partitions_def=shard_partitions,
    deps=[image_tars],
    backfill_policy=ENCODE_BACKFILL_POLICY,
    pool="gpu",
    op_tags=GPU_TAGS,
    # acted on by the `shard_automation` sensor; waits until the shard's blocking tar check passed
    automation_condition=dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed(),
    group_name="laion",
    # seen on the asset graph's node and the asset's page: this step wants a GPU machine (GPU_TAGS on its runs)
    kinds={"pytorch", "parquet", "gpu"},
    tags={"laion_vq/accelerator": "gpu"},
    description=__doc__,
)
def code_parquets(context: dg.AssetExecutionContext, storage: StorageResource, encoder: VQGANEncoderResource) -> None:
    layout = storage.existing_layout()
    config = encoder.vqgan_config()
    index_rule = encoder.checked_index_rule()  # `sample` on a VQ model fails here, before loading anything
    encoder.checked_mode()
    started = time.perf_counter()
    engine = encoder.engine(log=context.log.info)
    context.log.info(
        f"loaded {encoder.model} from {encoder.checkpoint} on {encoder.resolved_device()} in "
        f"{time.perf_counter() - started:.1f}s: mode {engine.mode}, batch {engine.batch_size}, index rule "
        f"{index_rule}; encoding {len(context.partition_keys)} shard(s)"
    )
    provenance = encoder.provenance()
    if provenance["random_weights"]:
        context.log.warning(f"{encoder.checkpoint} has RANDOM weights: its codes are noise (fine for tests/demo)")
    failed_tars = refuse_failed_tars(context)
    excluded = read_exclusions(layout)
    spec = CodeSpec(
        model_name=config.name,
        grid=config.code_grid(settings.IMAGE_SIZE),
        n_embed=config.n_embed,
        image_size=settings.IMAGE_SIZE,
        codes_name=encoder.codes_folder,
        provenance=provenance,
        replace_other_versions=encoder.replace_codes,
    )
    keys = list(context.partition_keys)
    to_encode = [parse_shard_key(k) for k in keys if k not in excluded and k not in failed_tars]
    keep = {shard: encoder.preview_samples for shard in {to_encode[0], to_encode[-1]}} if to_encode else {}
    with encoder.image_decoder() as decoder:
        pipeline = EncodePipeline(layout, spec, engine, decoder, progress=throttled(context.log.info))
        outcomes = pipeline.run(to_encode, keep)

        def work(shard: int) -> CodeShardResult:
            key = f"{shard:05d}"
            if key in failed_tars:
                raise CorruptShardError(
                    f"{IMAGES_CHECK.name} failed on this shard ({failed_tars[key]}): fix or re-download its tar, "
                    "then re-run the check"
                )
            try:
                done, outcome = next(outcomes)  # the pipeline yields the shards of `to_encode`, in this order
            except StopIteration:
                raise RuntimeError("the encode pipeline stopped before this shard (see the first failure)") from None
            assert done == shard, f"pipeline yielded shard {done} for {shard}"
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        provenance_meta = made_by(encoder, provenance)

        def metadata(result: CodeShardResult) -> dict:
            # the run's pipeline so far: throughput, how long the encoder waited for input, OOM retries
            run = {
                f"run_{k}": dg.MetadataValue.json(v) if isinstance(v, dict) else v
                for k, v in pipeline.stats.as_metadata().items()
            }
            return {**_metadata(result), **provenance_meta, **run, **_preview(context, encoder, result)}

        try:
            results = for_each_shard(context, work, metadata, excluded)
        finally:
            outcomes.close()
            run_stats = pipeline.stats.as_metadata()
            context.log.info(f"pipeline: {run_stats}")
    encoded = sum(r.encoded for r in results)
    context.log.info(
        f"encoded {encoded} images in {time.perf_counter() - started:.1f}s "
        f"({run_stats['images_per_second']} images/s end to end, encoder idle {run_stats['encoder_idle_share']:.0%})"
    )
