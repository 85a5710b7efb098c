"""code_parquets: each image tar encoded by the VQGAN, in the VQGAN-LAION-100M parquet format.

Runs in the `gpu` pool with a backfill policy of its own, so a backfill never puts the encoder inside a
download run: the GPU step is always the root step of its runs and one model load serves many shards. In a
backfill the run records each shard as soon as it is published and, fed (`laion_vq.defs.feeding`), goes on
with the backfill's other shards as their tars land, so one model load serves the whole download phase.
"""

import time
from collections.abc import Iterator

import dagster as dg
import numpy as np

from laion_vq import settings
from laion_vq.defs import metadata_keys as keys
from laion_vq.defs.assets._runs import throttled
from laion_vq.defs.assets.images import image_tars
from laion_vq.defs.check_state import CODES_CHECK, REMOVED_CODES_CHECK
from laion_vq.defs.encoding import record_code_shards, refuse_failed_tars
from laion_vq.defs.partitions import shard_partitions
from laion_vq.defs.resources import StorageResource, VQGANEncoderResource
from laion_vq.encode.engine import ModelEngine
from laion_vq.report.previews import code_usage_png, png_markdown, samples_vs_reconstructions_png
from laion_vq.shards.exclusions import read_exclusions
from laion_vq.stages import CodeRun, CodeShardResult, code_spec

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
        keys.ROW_COUNT: result.encoded,
        keys.STATUS_ROWS: result.status_rows,
        keys.DOWNLOADED: result.downloaded,
        keys.ENCODED: result.encoded,
        keys.UNDECODABLE: sum(result.undecodable.values()),
        "undecodable_by_reason": dg.MetadataValue.json(result.undecodable),
        "undecodable_keys": dg.MetadataValue.json(result.undecodable_keys[:50]),
        "bytes": result.bytes,
        "seconds": round(result.seconds, 2),
        "encode_seconds": round(result.encode_seconds, 2),
        "images_per_second": round(result.images_per_second, 2),
        keys.DISTINCT_CODES: result.distinct_codes,
    }
    if result.code_usage is not None and result.code_usage.sum():
        top = np.argsort(result.code_usage)[::-1][:10]
        meta["top_codes"] = dg.MetadataValue.json({str(int(c)): int(result.code_usage[c]) for c in top})
        meta["code_usage"] = dg.MetadataValue.md(png_markdown(code_usage_png(result.code_usage), "code usage"))
    return meta


def _preview(context: dg.AssetExecutionContext, encoder: VQGANEncoderResource, result: CodeShardResult) -> dict:
    """Samples beside their reconstructions (decoded from the stored codes), on the first and the last shard
    of a run: the last is the asset's latest materialization, the page users land on."""
    if result.sample_images is None or result.sample_codes is None:
        return {}
    try:
        recon = encoder.load_decoder().decode_codes(result.sample_codes)
    except Exception as err:  # previews must never fail an encode
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
        keys.CHECKPOINT_SHA256: provenance["checkpoint_sha256"],
        "dtype": encoder.dtype,
        "encode_mode": encoder.mode,
        "index_rule": provenance["index_rule"],
        "random_weights": provenance["random_weights"],
        "image_size": provenance["image_size"],
        "grid": encoder.vqgan_config().code_grid(encoder.image_size),
        **({"model_yaml_sha256": provenance["model_yaml_sha256"]} if "model_yaml_sha256" in provenance else {}),
    }
    if provenance["random_weights"]:
        # short lines: the metadata table cuts a long cell at its edge
        meta["warning"] = dg.MetadataValue.md(
            "**RANDOM WEIGHTS**: codes and reconstructions are noise.\n\n"
            "This checkpoint was made by `save_random_checkpoint` (tests, the demo).\n\n"
            "Set `LAION_VQ_CHECKPOINT` to a trained taming-transformers checkpoint."
        )
    return meta


def _loaded_engine(context: dg.AssetExecutionContext, encoder: VQGANEncoderResource) -> ModelEngine:
    """The encoder loaded in its mode, after the settings that need no model are checked (`sample` on a VQ model
    fails here, before loading anything); the log says what was loaded and warns of random weights."""
    index_rule = encoder.checked_index_rule()
    encoder.checked_mode()
    started = time.perf_counter()
    engine = encoder.engine(log=context.log.info)
    context.log.info(
        f"loaded {encoder.vqgan_config().name} ({encoder.model}) from {encoder.checkpoint} on "
        f"{encoder.resolved_device()} in {time.perf_counter() - started:.1f}s: mode {engine.mode}, batch "
        f"{engine.batch_size}, index rule {index_rule}; encoding {len(context.partition_keys)} shard(s)"
    )
    if encoder.random_weights():
        context.log.warning(f"{encoder.checkpoint} has RANDOM weights: its codes are noise (fine for tests/demo)")
    return engine


def _run_metadata(run: CodeRun) -> dict:
    """The run's pipeline so far, on each shard it records: throughput, the encoder's waits, OOM retries."""
    return {
        f"run_{k}": dg.MetadataValue.json(v) if isinstance(v, dict) else v for k, v in run.stats.as_metadata().items()
    }


#: The encoder's own checks, evaluated by its step on each shard it records (the moment it is published, in a
#: backfill): a separate check step would be skipped in a run that records its shards as it goes, and could not
#: see the shards a fed run takes. Run alone (this op's subset without the asset) they audit the stored parquets,
#: as the `audit_shards` job does without the GPU pool (`checks.audit_code_checks`).
CODE_CHECK_SPECS = [
    dg.AssetCheckSpec(
        CODES_CHECK.name,
        asset=CODES_CHECK.asset_key,
        partitions_def=shard_partitions,
        description="32×32 int16 codes in [0, n_embed), unique sorted keys of the shard, the seed schema, and a "
        "code row for every downloaded image except those recorded as undecodable.",
    ),
    dg.AssetCheckSpec(
        REMOVED_CODES_CHECK.name,
        asset=REMOVED_CODES_CHECK.asset_key,
        partitions_def=shard_partitions,
        description="No item of a removal list (`removals/` under the storage root) is left in the shard: no "
        "listed or removed key has a code row.",
    ),
]


@dg.multi_asset(
    name="code_parquets",
    specs=[
        dg.AssetSpec(
            CODES_CHECK.asset_key,
            deps=[image_tars],
            # a backfill's run records its shards itself, as they are published (no output to yield)
            skippable=True,
            # acted on by the `shard_automation` sensor; waits until the shard's blocking tar check passed
            automation_condition=dg.AutomationCondition.eager()
            & dg.AutomationCondition.all_deps_blocking_checks_passed(),
            group_name="laion",
            # seen on the asset graph's node and the asset's page: this step wants a GPU machine (GPU_TAGS on runs)
            kinds={"pytorch", "parquet", "gpu"},
            tags={"laion_vq/accelerator": "gpu"},
            description=__doc__,
        )
    ],
    check_specs=CODE_CHECK_SPECS,
    can_subset=True,  # the checks alone: an audit of the stored parquets, no model loaded
    partitions_def=shard_partitions,
    backfill_policy=ENCODE_BACKFILL_POLICY,
    pool="gpu",
    op_tags=GPU_TAGS,
)
def code_parquets(
    context: dg.AssetExecutionContext, storage: StorageResource, encoder: VQGANEncoderResource
) -> Iterator[dg.Output]:
    layout = storage.existing_layout()
    checks = [spec.key for spec in CODE_CHECK_SPECS if spec.key in context.selected_asset_check_keys]
    if CODES_CHECK.asset_key not in context.selected_asset_keys:  # the checks alone
        from laion_vq.defs.checks import audit_code_checks, step_done  # the checks module imports the assets

        for evaluation in audit_code_checks(context, layout, encoder, checks):
            context.log_event(evaluation)
        for check in checks:
            yield step_done(context, check)
        return
    started = time.perf_counter()
    engine = _loaded_engine(context, encoder)
    provenance = encoder.provenance()
    spec = code_spec(
        encoder.vqgan_config(),
        encoder.image_size,
        provenance=provenance,
        codes_name=encoder.codes_folder,
        replace_other_versions=encoder.replace_codes,
    )
    failed_tars, excluded = refuse_failed_tars(context), read_exclusions(layout)
    provenance_meta = made_by(encoder, provenance)
    with encoder.image_decoder() as decoder:
        run = CodeRun(
            layout, spec, engine, decoder, preview_samples=encoder.preview_samples, progress=throttled(context.log.info)
        )

        def metadata(result: CodeShardResult) -> dict:
            return {**_metadata(result), **provenance_meta, **_run_metadata(run), **_preview(context, encoder, result)}

        try:
            yield from record_code_shards(
                context, run, metadata, excluded=excluded, failed_tars=failed_tars, checks=checks
            )
        finally:
            context.log.info(f"pipeline: {run.stats.describe()}")
    context.log.info(run.summary(time.perf_counter() - started))
