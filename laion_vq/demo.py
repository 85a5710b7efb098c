"""`make demo`: the whole pipeline, offline, through Dagster, on a few small shards.

Makes what it cannot download (LAION-format metadata pointing at a loopback image server with real
photos and a few broken URLs; a VQGAN checkpoint of the real architecture with RANDOM weights), then
starts the Dagster daemon and webserver on a persistent instance (`.demo/dagster_home`, the project's
`dagster.yaml`) and materializes raw_metadata_shards → image_tars → code_parquets for those shards
through the code location — a job run and a backfill, as a user of the UI would —, runs the audits and
prints what it made. `make ui` then shows all of it. Pass --metadata/--checkpoint to run the
same code path on real LAION parts and the released weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


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
    started = time.perf_counter()

    from laion_vq.settings import ALL_SETTINGS, write_instance_settings
    from laion_vq.testing.demo_inputs import make_demo_inputs
    from laion_vq.testing.image_server import ImageServer
    from laion_vq.ui import write_demo_state

    with ImageServer() as server:
        # one shard more than the demo materializes: the first thing to try in the UI (README, after `make demo`)
        inputs = make_demo_inputs(
            workdir, server, shards=args.shards + 1, samples_per_shard=args.samples_per_shard, model=args.model
        )
        checkpoint = args.checkpoint or inputs.checkpoint
        storage = os.path.join(workdir, "data")
        os.makedirs(storage, exist_ok=True)
        # what this shell sets (e.g. LAION_VQ_ENCODE_MODE=fast) goes into the instance's file, under the demo's own
        chosen = {s.env: os.environ.pop(s.env) for s in ALL_SETTINGS if os.environ.get(s.env)}
        values = {
            **chosen,
            "LAION_VQ_STORAGE": storage,
            "LAION_VQ_METADATA": os.path.abspath(args.metadata) if args.metadata else inputs.metadata_dir,
            "LAION_VQ_SAMPLES_PER_SHARD": str(args.samples_per_shard),
            "LAION_VQ_MODEL": args.model,
            "LAION_VQ_CHECKPOINT": os.path.abspath(checkpoint),
            "LAION_VQ_DOWNLOAD_TIMEOUT": chosen.get("LAION_VQ_DOWNLOAD_TIMEOUT", "5"),
            "LAION_VQ_ENCODE_BATCH_SIZE": chosen.get("LAION_VQ_ENCODE_BATCH_SIZE", "8"),
        }
        if not args.metadata:  # the demo's URLs point at its loopback server, which downloads may not reach
            values["LAION_VQ_DOWNLOAD_ALLOW_NETWORKS"] = f"{server.host}/32"
            write_demo_state(dagster_home, server.port)
        # the instance's settings file: the services started here, `make ui`, `dg dev` and shell runs with
        # this DAGSTER_HOME all read it (the demo's own environment does not carry them)
        settings_file = write_instance_settings(dagster_home, values)
        os.environ["DAGSTER_HOME"] = dagster_home
        print(f"demo inputs: metadata {values['LAION_VQ_METADATA']}")
        print(f"             checkpoint {checkpoint}" + ("" if args.checkpoint else "  (RANDOM weights)"))
        print(f"             images from {server.base_url} (loopback; real photos + broken URLs)")
        print(f"settings:    {settings_file}")
        ok = run_pipeline(args.shards, dagster_home)
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s")
    print("open the UI:  make ui   (DAGSTER_HOME=" + dagster_home + ")")
    print(
        f"then try: Materialize shard {args.shards:05d} from the asset graph; launch `audit_shards` from the "
        "Launchpad; Materialize `corrupted_shards_report` (README: After `make demo`)"
    )
    return 0 if ok else 1


ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]
SHOWN = ("dagster/row_count", "successes", "failed_to_download", "failed_to_resize", "encoded", "undecodable",
         "images_per_second", "distinct_codes")  # fmt: skip


def run_pipeline(shards: int, dagster_home: str) -> bool:
    """Everything through the code location, as a user of the UI would, run by the daemon: the
    `laion_vq_pipeline` job for shard 00000 (the launchpad), a backfill of the other shards (the
    Materialize dialog, through the backfill daemon) and the `audit_shards` job. So the runs list, the
    job's page, the Overview timeline and the Backfills page all show the demo's work afterwards."""
    from pathlib import Path

    import dagster as dg

    from laion_vq.shards.numbering import shard_key
    from laion_vq.testing.dagster_services import EMBEDDED_YAML, dagster_services

    t0 = time.perf_counter()
    with dagster_services(Path(dagster_home), None, instance_yaml=EMBEDDED_YAML) as services:
        print(f"daemon and webserver up in {time.perf_counter() - t0:.1f}s (DAGSTER_HOME={dagster_home})")
        run_id = services.launch_run("laion_vq_pipeline", {"dagster/partition": shard_key(0)})
        print(f"launched laion_vq_pipeline for shard {shard_key(0)}: run {run_id}")
        ok = services.wait_for_run(run_id) == "SUCCESS"
        if shards > 1:
            rest = [shard_key(i) for i in range(1, shards)]
            backfill = services.launch_backfill(ASSETS, rest)
            print(f"launched backfill {backfill} of shards {rest[0]}…{rest[-1]} (3 assets)")
            ok = services.wait_for_backfill(backfill) in ("COMPLETED", "COMPLETED_SUCCESS") and ok
        audit = services.launch_run("audit_shards")
        ok = services.wait_for_run(audit) == "SUCCESS" and ok
        report = services.launch_run("corrupted_shards_report_job")
        ok = services.wait_for_run(report) == "SUCCESS" and ok
        print(f"\nruns finished in {time.perf_counter() - t0:.1f}s ({'success' if ok else 'FAILED'})")

        with services.instance() as instance:
            print(f"{'asset':<22}{'shard':<8}{'numbers'}")
            for asset in ASSETS:
                records = instance.fetch_materializations(dg.AssetKey(asset), limit=shards * 4).records
                latest = {r.asset_materialization.partition: r.asset_materialization for r in reversed(records)}
                for shard, mat in sorted(latest.items()):
                    m = {k: v.value for k, v in mat.metadata.items()}
                    numbers = ", ".join(f"{k.split('/')[-1]}={m[k]}" for k in SHOWN if k in m)
                    print(f"{asset:<22}{shard:<8}{numbers}\n{'':<30}{m.get('path') or m.get('tar')}")
            for record in instance.get_records_for_run(
                audit, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
            ).records:
                ev = record.event_log_entry.dagster_event.event_specific_data
                verdict = "PASSED" if ev.passed else f"FAILED ({ev.severity.value}): {ev.description}"
                print(f"check {ev.check_name:<28} shard {ev.partition}: {verdict}")
                ok = ok and ev.passed
            summary = instance.fetch_materializations(dg.AssetKey("corrupted_shards_report"), limit=1).records
            if summary:
                m = {k: v.value for k, v in summary[0].asset_materialization.metadata.items()}
                print(f"report: {m['corrupted_shards']} corrupted, {m['warned_shards']} warned, "
                      f"{m['excluded_shards']} excluded shard(s); {m['images_downloaded']} images, "
                      f"{m['codes']} code rows; codebook used {m['codebook_used']}\n"
                      f"dataset card: {m['dataset_card']}")  # fmt: skip
            if not ok:
                print(f"daemon log tail:\n{services.log('daemon')[-2000:]}", file=sys.stderr)
    return ok


if __name__ == "__main__":
    sys.exit(main())
