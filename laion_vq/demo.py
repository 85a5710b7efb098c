"""`make demo`: the whole pipeline, offline, through Dagster, on a few small shards.

Makes what it cannot download (LAION-format metadata pointing at a loopback image server with real
photos and a few broken URLs; a VQGAN checkpoint of the real architecture with RANDOM weights), then
materializes raw_metadata_shards → image_tars → code_parquets for those shards in a persistent Dagster
instance, runs the contract check and prints what it made. Pass --metadata/--checkpoint to run the
same code path on real LAION parts and the released weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The demo prints its own summary; the console shows the run's INFO lines (progress), not DEBUG events.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(os.getcwd(), ".demo"))
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=12)
    parser.add_argument("--model", default=os.environ.get("LAION_VQ_MODEL", "vqgan_gumbel_f8"))
    parser.add_argument("--metadata", help="real LAION metadata (file, folder or glob) instead of the fixture")
    parser.add_argument("--checkpoint", help="real checkpoint instead of the random-weight one")
    args = parser.parse_args(argv)

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # beta notices and the pipeline job's "varying backfill policies" note are for developers, not here
    warnings.filterwarnings("ignore", category=UserWarning, module="dagster")
    warnings.filterwarnings("ignore", message=".*backfill_policy.*")
    workdir = os.path.abspath(args.workdir)
    dagster_home = os.path.join(workdir, "dagster_home")
    os.makedirs(dagster_home, exist_ok=True)
    shutil.copy(os.path.join(HERE, "dagster.yaml"), os.path.join(dagster_home, "dagster.yaml"))
    started = time.perf_counter()

    from laion_vq.fixtures.demo_inputs import make_demo_inputs
    from laion_vq.fixtures.image_server import ImageServer

    with ImageServer() as server:
        inputs = make_demo_inputs(
            workdir, server, shards=args.shards, samples_per_shard=args.samples_per_shard, model=args.model
        )
        checkpoint = args.checkpoint or inputs.checkpoint
        os.environ.update(
            {
                "DAGSTER_HOME": dagster_home,
                "LAION_VQ_STORAGE": os.path.join(workdir, "data"),
                "LAION_VQ_METADATA": args.metadata or inputs.metadata_dir,
                "LAION_VQ_SAMPLES_PER_SHARD": str(args.samples_per_shard),
                "LAION_VQ_MODEL": args.model,
                "LAION_VQ_CHECKPOINT": checkpoint,
                "LAION_VQ_DOWNLOAD_TIMEOUT": os.environ.get("LAION_VQ_DOWNLOAD_TIMEOUT", "5"),
                "LAION_VQ_ENCODE_BATCH_SIZE": os.environ.get("LAION_VQ_ENCODE_BATCH_SIZE", "8"),
            }
        )
        if not args.metadata:  # the demo's URLs point at its loopback server, which downloads may not reach
            os.environ["LAION_VQ_DOWNLOAD_ALLOW_NETWORKS"] = f"{server.host}/32"
        print(f"demo inputs: metadata {os.environ['LAION_VQ_METADATA']}")
        print(f"             checkpoint {checkpoint}" + ("" if args.checkpoint else "  (RANDOM weights)"))
        print(f"             images from {server.base_url} (loopback; real photos + broken URLs)")
        ok = run_pipeline(args.shards)
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s")
    print("open the UI:  make ui   (DAGSTER_HOME=" + dagster_home + ")")
    return 0 if ok else 1


def run_pipeline(shards: int) -> bool:
    """Materialize the three assets for shards 0 … shards-1 as ONE run, then the contract check."""
    import dagster as dg
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from laion_vq.definitions import defs
    from laion_vq.shards.numbering import shard_key

    instance = dg.DagsterInstance.get()
    first, last = shard_key(0), shard_key(shards - 1)
    job = defs.resolve_job_def("laion_vq_pipeline")
    t0 = time.perf_counter()
    result = job.execute_in_process(
        instance=instance,
        run_config=QUIET,
        tags={ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last},
        raise_on_error=False,
    )
    print(f"\nrun {result.run_id} ({'success' if result.success else 'FAILED'}) in {time.perf_counter() - t0:.1f}s")
    print(f"{'asset':<22}{'shard':<8}{'numbers'}")
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        m = {k: v.value for k, v in mat.metadata.items()}
        keys = ("dagster/row_count", "successes", "failed_to_download", "failed_to_resize", "encoded",
                "undecodable", "images_per_second", "distinct_codes")
        numbers = ", ".join(f"{k.split('/')[-1]}={m[k]}" for k in keys if k in m)
        path = m.get("path") or m.get("tar")
        print(f"{mat.asset_key.to_user_string():<22}{mat.partition:<8}{numbers}\n{'':<30}{path}")
    if not result.success:
        for event in result.all_events:
            if event.is_failure:
                print(event.message, file=sys.stderr)
        return False

    check = defs.resolve_job_def("audit_shards").execute_in_process(
        instance=instance, run_config=QUIET, raise_on_error=False
    )
    for ev in check.get_asset_check_evaluations():
        meta = {k: v.value for k, v in ev.metadata.items()}
        print(f"check {ev.check_name}: {'PASSED' if ev.passed else 'FAILED'} "
              f"({meta.get('shards_checked')} shards, {meta.get('rows_checked')} rows, "
              f"corrupted: {meta.get('corrupted_shard_list')})")
    return check.success


if __name__ == "__main__":
    sys.exit(main())
