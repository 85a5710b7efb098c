"""code_parquets: each image tar encoded by the VQGAN, in the VQGAN-LAION-100M parquet format.

Runs in the `gpu` pool with a backfill policy of its own, so a backfill never puts the encoder inside a
download run: the GPU step is always the root step of its runs and one model load serves many shards. In a
backfill the run records each shard as soon as it is published and, fed (`laion_vq.defs.feeding`), goes on
with the backfill's other shards as their tars land, so one model load serves the whole download phase.
"""

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import dagster as dg
import numpy as np

from laion_vq import settings
from laion_vq.defs.assets._runs import for_each_shard, throttled
from laion_vq.defs.assets.images import image_tars
from laion_vq.defs.check_state import CODES_CHECK, IMAGES_CHECK, failed_with_error, latest_results
from laion_vq.defs.feeding import BackfillFeed, backfill_of
from laion_vq.defs.partitions import shard_partitions
from laion_vq.defs.resources import StorageResource, VQGANEncoderResource
from laion_vq.encode.pipeline import EncodePipeline
from laion_vq.report.previews import code_usage_png, png_markdown, samples_vs_reconstructions_png
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
    # a backfill's run records its shards itself, as they are published (no output to yield)
    output_required=False,
    dagster_type=dg.Nothing,  # the parquets are the data: no IO manager stores the output
    # acted on by the `shard_automation` sensor; waits until the shard's blocking tar check passed
    automation_condition=dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed(),
    group_name="laion",
    # seen on the asset graph's node and the asset's page: this step wants a GPU machine (GPU_TAGS on its runs)
    kinds={"pytorch", "parquet", "gpu"},
    tags={"laion_vq/accelerator": "gpu"},
    description=__doc__,
)
def code_parquets(
    context: dg.AssetExecutionContext, storage: StorageResource, encoder: VQGANEncoderResource
) -> Iterator[dg.Output]:
    layout = storage.existing_layout()
    config = encoder.vqgan_config()
    index_rule = encoder.checked_index_rule()  # `sample` on a VQ model fails here, before loading anything
    encoder.checked_mode()
    started = time.perf_counter()
    engine = encoder.engine(log=context.log.info)
    context.log.info(
        f"loaded {config.name} ({encoder.model}) from {encoder.checkpoint} on {encoder.resolved_device()} in "
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
        grid=config.code_grid(encoder.image_size),
        n_embed=config.n_embed,
        image_size=encoder.image_size,
        codes_name=encoder.codes_folder,
        provenance=provenance,
        replace_other_versions=encoder.replace_codes,
    )
    provenance_meta = made_by(encoder, provenance)
    with encoder.image_decoder() as decoder:
        pipeline = EncodePipeline(layout, spec, engine, decoder, progress=throttled(context.log.info))

        def metadata(result: CodeShardResult) -> dict:
            # the run's pipeline so far: throughput, how long the encoder waited for input, OOM retries
            run = {
                f"run_{k}": dg.MetadataValue.json(v) if isinstance(v, dict) else v
                for k, v in pipeline.stats.as_metadata().items()
            }
            return {**_metadata(result), **provenance_meta, **run, **_preview(context, encoder, result)}

        backfill_id = backfill_of(context)
        try:
            if backfill_id is None:
                _encode_and_record_at_end(context, pipeline, metadata, encoder, failed_tars, excluded)
                yield dg.Output(None)
            else:
                _encode_and_record_each(context, pipeline, metadata, encoder, failed_tars, excluded, backfill_id, spec)
        finally:
            run_stats = pipeline.stats.as_metadata()
            context.log.info(f"pipeline: {run_stats}")
    context.log.info(
        f"encoded {pipeline.stats.images} images in {time.perf_counter() - started:.1f}s "
        f"({run_stats['images_per_second']} images/s end to end, encoder idle {run_stats['encoder_idle_share']:.0%}, "
        f"{run_stats['waiting_for_shards_seconds']}s waiting for tars to land)"
    )


def _refused_tar(key: str, failed_tars: dict[str, str]) -> CorruptShardError:
    """The error a shard whose tar check failed is reported with, in either recording mode."""
    return CorruptShardError(
        f"{IMAGES_CHECK.name} failed on this shard ({failed_tars[key]}): fix or re-download its tar, "
        "then re-run the check"
    )


def _encode_and_record_at_end(
    context: dg.AssetExecutionContext,
    pipeline: EncodePipeline,
    metadata,  # noqa: ANN001 - result → metadata dict
    encoder: VQGANEncoderResource,
    failed_tars: dict[str, str],
    excluded: dict[str, str],
) -> None:
    """A run's own shards, recorded when the step ends (Dagster materializes the run's partitions from its
    output): runs outside backfills, where a step downstream in the run may wait for this one."""
    keys = list(context.partition_keys)
    to_encode = [parse_shard_key(k) for k in keys if k not in excluded and k not in failed_tars]
    keep = {shard: encoder.preview_samples for shard in {to_encode[0], to_encode[-1]}} if to_encode else {}
    outcomes = pipeline.run(to_encode, keep)

    def work(shard: int) -> CodeShardResult:
        key = f"{shard:05d}"
        if key in failed_tars:
            raise _refused_tar(key, failed_tars)
        try:
            done, outcome = next(outcomes)  # the pipeline yields the shards of `to_encode`, in this order
        except StopIteration:
            raise RuntimeError("the encode pipeline stopped before this shard (see the first failure)") from None
        assert done == shard, f"pipeline yielded shard {done} for {shard}"
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    try:
        for_each_shard(context, work, metadata, excluded)
    finally:
        outcomes.close()


class _PreviewFirst(dict):
    """Sample images kept for the preview: on the first shard this run encodes, whichever it is."""

    def __init__(self, samples: int) -> None:
        super().__init__()
        self.samples = samples

    def get(self, shard, default=0):  # noqa: ANN001, ANN201 - dict.get's signature
        samples, self.samples = self.samples, 0
        return samples


def _encode_and_record_each(
    context: dg.AssetExecutionContext,
    pipeline: EncodePipeline,
    metadata,  # noqa: ANN001 - result → metadata dict
    encoder: VQGANEncoderResource,
    failed_tars: dict[str, str],
    excluded: dict[str, str],
    backfill_id: str,
    spec: CodeSpec,
) -> None:
    """A backfill's run: each shard is recorded (materialization, then its two code checks) the moment it is
    published, so a killed run's retry skips what was done and the UI fills in shard by shard; fed, the run
    then takes the backfill's other shards as their tars land."""
    from laion_vq.defs.checks import InlineCodeChecks  # the checks module imports the assets

    feed = BackfillFeed(
        context,
        backfill_id,
        feed=settings.ENCODE_FEED.get_int() != 0,
        excluded=set(excluded),
        poll_seconds=settings.ENCODE_FEED_POLL_SECONDS.get_float(),
        idle_seconds=settings.ENCODE_FEED_IDLE_SECONDS.get_float(),
        log=context.log.info,
    )
    checks = InlineCodeChecks(context.instance, pipeline.layout, encoder.codes_folder, spec.grid, spec.n_embed)
    keys = list(context.partition_keys)
    already = [k for k in keys if feed.is_done(k)]
    if already:
        context.log.info(f"{len(already)} shard(s) already encoded in this backfill (a retried run): {already[:20]}")
        # a run killed between recording a shard and checking it: check it now
        checked = {r.shard for r in latest_results(context.instance, CODES_CHECK, already) if r.current}
        for key in [k for k in already if k not in checked]:
            for evaluation in checks.evaluations(key):
                context.log_event(evaluation)
    failures: dict[str, str] = {}
    for key in keys:
        if key in already:
            continue
        if key in excluded:
            context.log.warning(f"shard {key} skipped: on the exclusion list ({excluded[key]})")
            context.log_event(
                dg.AssetMaterialization(
                    context.asset_key, partition=key, metadata={"excluded": excluded[key], "dagster/row_count": 0}
                )
            )
        elif key in failed_tars:
            error = _refused_tar(key, failed_tars)
            failures[key] = f"{type(error).__name__}: {error}"
    own = [k for k in keys if k not in already and k not in excluded and k not in failed_tars]
    # Recording (the events, the two checks reading the parquet back, cancelling covered runs) happens on a
    # thread of its own: in this thread it would hold the next batch back from the GPU.
    recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="laion-vq-record")
    last_cancel = [time.monotonic()]
    recorded = [0]

    def record(key: str, meta: dict) -> None:
        context.log_event(dg.AssetMaterialization(context.asset_key, partition=key, metadata=meta))
        for evaluation in checks.evaluations(key):
            context.log_event(evaluation)
        recorded[0] += 1
        where = "fed" if key in feed.fed else f"{recorded[0]}/{len(own)}"
        context.log.info(f"shard {key} done ({where})")
        if time.monotonic() - last_cancel[0] >= 10.0:
            feed.cancel_covered_runs()
            last_cancel[0] = time.monotonic()

    pending: list[Future] = []
    try:
        for shard, outcome in pipeline.run(feed.shards(own), _PreviewFirst(encoder.preview_samples)):
            key = f"{shard:05d}"
            if isinstance(outcome, BaseException):
                context.log.error(f"shard {key} failed: {type(outcome).__name__}: {outcome}")
                failures[key] = f"{type(outcome).__name__}: {outcome}"
                feed.failed(key)
                continue
            pending.append(recorder.submit(record, key, metadata(outcome)))
            for future in [f for f in pending if f.done()]:
                pending.remove(future)
                future.result()  # a recording error ends the run here, not silently
    finally:
        recorder.shutdown(wait=True)
    for future in pending:
        future.result()
    feed.cancel_covered_runs()
    if feed.fed:
        context.log.info(
            f"fed {len(feed.fed)} shard(s) of backfill {backfill_id} beyond this run's own {len(own)}; "
            f"cancelled {len(feed.cancelled_runs)} queued duplicate run(s)"
        )
    if failures:
        raise dg.Failure(
            description=f"{len(failures)} shard(s) failed: "
            + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:5]),
            metadata={"failed_shards": dg.MetadataValue.json(failures)},
        )
