"""Shared fixtures: a loopback image server, a small random-weight checkpoint (real format) and a Dagster
instance on the real PostgreSQL."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_vq.shards.storage import StorageLayout

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# The loopback image server is the tests' web; downloads reach no loopback address unless allowed.
# Tests of the address guard pass their own `allow_networks`.
os.environ.setdefault("LAION_VQ_DOWNLOAD_ALLOW_NETWORKS", "127.0.0.1/32")
# A suite started as a background job (`make test &`, nohup, some CI runners) inherits SIGINT ignored. Dagster maps
# SIGTERM to SIGINT's handler when it executes a plan in process (dagster._utils.interrupts), so SIGTERM became
# ignored too, every later child inherited that, and Dagster's own compute-log `tail` then ignored the
# SIGTERM that ends it (test_deploy_ecs hung 30 s, then failed). Give the suite Python's usual SIGINT handler.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TINY_MODEL = "vqgan_gumbel_f8_tiny"


def _tiny_vq():
    """The tiny f8 test config with a nearest-codebook (VectorQuantizer2) head instead of Gumbel."""
    from dataclasses import replace

    from laion_vq.vqgan import get_model_config

    return replace(get_model_config(TINY_MODEL), name="tiny_vq_test", n_embed=512, quantizer="vq")


TINY_VQ = _tiny_vq()


@pytest.fixture(autouse=True)
def _no_leaked_defs_state_storage(monkeypatch):
    """Dagster keeps the current instance's defs-state storage in a context variable, and a resource context
    built without an instance (schedule and sensor contexts with resources, Dagster's own resource
    initialisation) enters an ephemeral instance it never exits: the variable then points at an instance that
    the garbage collector may take at any moment, even in the middle of a test, and the next Definitions
    resolved fail ("undefined DagsterInstance weakref"; seen once in CI, between two `materialize` calls).
    Each test starts without one, and a storage whose instance is gone reads as none (Dagster's own reading
    when no instance is current)."""
    from dagster._core.storage.defs_state.base import DefsStateStorage, _current_storage

    _current_storage.set(None)

    def live_storage() -> DefsStateStorage | None:
        storage = _current_storage.get()
        ref = getattr(storage, "_instance_weakref", None)
        return None if storage is None or (ref is not None and ref() is None) else storage

    monkeypatch.setattr(DefsStateStorage, "get", classmethod(lambda cls: live_storage()))
    yield


@pytest.fixture()
def s3():
    """A bucket `s3://laion` on moto's S3 server (`laion_vq.testing.aws`), reached as s3fs reaches AWS."""
    pytest.importorskip("moto.server")
    import boto3
    import fsspec

    from laion_vq.testing.aws import moto_aws

    with moto_aws():
        fsspec.filesystem("s3").clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket="laion")
        yield "s3://laion"
        fsspec.filesystem("s3").clear_instance_cache()


@pytest.fixture(scope="session")
def image_server():
    from laion_vq.testing.image_server import ImageServer

    with ImageServer(slow_delay_s=3.0) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The tiny f8 test config with seeded random weights, saved as a Lightning checkpoint."""
    from laion_vq.vqgan import get_model_config, save_random_checkpoint

    path = str(tmp_path_factory.mktemp("ckpt") / f"{TINY_MODEL}-random.ckpt")
    return save_random_checkpoint(get_model_config(TINY_MODEL), path, seed=0)


def backfill_runs(instance, backfill_id: str) -> list:
    """The backfill's runs (`dg.RunRecord`s), oldest first."""
    import dagster as dg

    from laion_vq.dagster_internals import BACKFILL_ID_TAG

    return list(instance.get_run_records(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}), ascending=True))


def is_encoder_run(record) -> bool:
    """A run of `code_parquets` alone: an encoder run of a backfill (a `dg.RunRecord`)."""
    import dagster as dg

    return set(record.dagster_run.asset_selection or []) == {dg.AssetKey("code_parquets")}


def tiny_backfill_env(
    tmp_path, image_server, checkpoint: str, shards: int, samples: int, **overrides: str
) -> dict[str, str]:
    """Metadata for `shards` shards of `samples` photos (the last one answered after the server's slow delay, so
    downloads land one by one) and the settings that run them through the real daemon: the tiny model on the CPU,
    one shard per download run, fast feeding. `overrides` replace any of them."""
    from laion_vq.testing.synthetic_metadata import write_parts

    photos = image_server.photo_paths()
    urls = [
        [image_server.url(photos[(s + i) % len(photos)]) for i in range(samples - 1)]
        + [image_server.url("/slow/x.jpg")]
        for s in range(shards)
    ]
    write_parts(str(tmp_path / "meta"), urls, row_group_size=samples)
    return {
        "LAION_VQ_NUM_SHARDS": str(shards),
        "LAION_VQ_SAMPLES_PER_SHARD": str(samples),
        "LAION_VQ_STORAGE": str(tmp_path / "data"),
        "LAION_VQ_METADATA": str(tmp_path / "meta"),
        "LAION_VQ_MODEL": TINY_MODEL,
        "LAION_VQ_CHECKPOINT": checkpoint,
        "LAION_VQ_DEVICE": "cpu",
        "LAION_VQ_ENCODE_BATCH_SIZE": "4",
        "LAION_VQ_PREVIEW_SAMPLES": "0",
        "LAION_VQ_DOWNLOAD_THREADS": "4",
        "LAION_VQ_DOWNLOAD_TIMEOUT": "10",
        "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS": f"{image_server.host}/32",
        "LAION_VQ_DOWNLOAD_SHARDS_PER_RUN": "1",  # tars land one by one
        "LAION_VQ_ENCODE_FEED_POLL_SECONDS": "1",
        "LAION_VQ_ENCODE_FEED_IDLE_SECONDS": "120",
        **overrides,
    }


@pytest.fixture()
def pg_url(request):
    """A fresh database on the machine's real PostgreSQL (dropped afterwards); its URL."""
    psycopg2 = pytest.importorskip("psycopg2")
    from laion_vq.testing.dagster_services import PG, postgres_database

    try:
        psycopg2.connect(**PG, dbname="test", connect_timeout=5).close()
    except psycopg2.OperationalError as err:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is required for this test: {err}")
    with postgres_database(f"laion_vq_{request.module.__name__.rsplit('.', 1)[-1].removeprefix('test_')}") as url:
        yield url


@pytest.fixture()
def postgres_instance(tmp_path, pg_url):
    """A Dagster instance on the machine's real PostgreSQL, in a fresh database dropped afterwards."""
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: {pg_url}\ntelemetry:\n  enabled: false\n"
    )
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        yield instance
    finally:
        instance.dispose()


def _jpeg(seed: int, size: int = 256) -> bytes:
    """A random-noise JPEG of the encoder's input size."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_shard(layout: StorageLayout, shard: int, images: dict[str, bytes], failed: list[str]) -> None:
    """A shard as img2dataset leaves it: tar of successes + status parquet of every row."""

    os.makedirs(layout.images_dir(), exist_ok=True)
    with tarfile.open(layout.image_tar(shard), "w") as tar:
        for key, data in sorted(images.items()):
            for ext, payload in (("jpg", data), ("txt", b"caption"), ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    keys = sorted([*images, *failed])
    status = pa.table(
        {
            "key": keys,
            "status": ["success" if k in images else "failed_to_download" for k in keys],
            "caption": [f"caption {k}" for k in keys],
            "url": [f"http://127.0.0.1/{k}.jpg" for k in keys],
            "SAMPLE_ID": list(range(len(keys))),
            "NSFW": ["UNLIKELY"] * len(keys),
        }
    )
    pq.write_table(status, layout.image_status(shard))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    from laion_vq.vqgan import get_model_config, load_encoder

    config = get_model_config(TINY_MODEL)
    model = load_encoder(config, tiny_checkpoint)
    return config, model


# ---------------------------------------------------------------------------------------------------------
# Markers (registered in pyproject.toml), applied here rather than in each test file:
#   services  the test needs a running service: PostgreSQL on 127.0.0.1:5432, RabbitMQ on 127.0.0.1:5672,
#             a Dagster webserver/daemon it starts, a headless Chromium. The marker's arguments name the
#             services the session probes for it (below); a Dagster process the test starts itself is "dagster".
#   slow      the rest of the long tests (a fresh interpreter, torch.compile, the real f8 model, whole pipelines).
# `make test-fast` runs `-m "not services and not slow"`; `make test` and `.ci/run` run everything.

# a test that uses one of these fixtures needs these services
SERVICE_FIXTURES: dict[str, tuple[str, ...]] = {
    "pg_url": ("postgresql",),  # a fresh database on the machine's PostgreSQL (conftest)
    "postgres_instance": ("postgresql",),  # a Dagster instance on it (conftest)
    "rabbitmq": ("rabbitmq",),  # test_deploy_celery: the Celery broker, and Celery workers it starts
    "ui": ("dagster",),  # test_ui_browser: `make ui` (dg dev: a webserver and a daemon)
    "chromium": ("chromium",),  # test_ui_browser: Debian's chromium, driven by Playwright
}
# tests that start services in their own body, not through a fixture (node ids, parameters left out)
SERVICE_TESTS: dict[str, tuple[str, ...]] = {
    # postgres_database() and dagster_services(): the daemon and the webserver on PostgreSQL
    "test_instance_ops.py::test_daemon_fails_killed_run_frees_its_slot_and_retries_it": ("postgresql", "dagster"),
    # laion_vq.testing.pg_cluster: a throwaway cluster the test starts and crashes itself (PostgreSQL's server
    # binaries and, as root, the `postgres` OS user; never the server on 5432); "pg_cluster" has no probe: a missing
    # binary fails the test naming the package
    "test_fault_postgres.py::test_instance_survives_a_postgres_crash_and_a_short_outage": ("pg_cluster",),  # 6
    "test_fault_postgres.py::test_backfill_survives_postgres_down_for_ten_seconds": ("pg_cluster", "dagster"),  # 110
}
# parametrized fixtures whose parameter picks a service: (fixture, parameter) -> services
SERVICE_PARAMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("audited", "postgres"): ("postgresql",),  # test_shard_checks: the audit on a PostgreSQL instance
}

# Slow without a service: ~2 s or more each in `pytest --durations=0` on a 2-core machine under load (seconds there).
# A whole module (file name) or a test (node id: without its parameters for all of them, with them for one case).
# A module-scoped fixture's cost lands on the first test that uses it: such a test is not listed for that alone.
SLOW: set[str] = {
    # a fresh interpreter: the demo, the `dg`/`dagster` CLIs, settings read at import, a SIGKILLed child
    "test_ui_browser.py",  # the demo, then `make ui` (that one is `services`) 175
    "test_definitions.py",  # 163 in all: the CLIs 61 + 43, each settings probe 4-20
    "test_instance_settings.py",  # 45 in all, a probe interpreter each
    "test_instance_ops.py::test_killed_shell_run_is_failed_and_its_slot_freed_by_the_one_line_recovery",  # 65
    "test_stage_redownload.py::test_sigkill_mid_shard_leaves_nothing_partial_and_a_rerun_completes",  # 11
    "test_removals_core.py::test_sigkill_mid_application_then_a_rerun_converges",  # 2
    "test_fault_disk_full.py::test_download_stage_on_a_full_storage_disk_then_after_space_is_freed",  # 2 (3 downloads)
    "test_removals_core.py::test_plan_and_apply_on_s3",  # a moto server 3
    "test_storage_faults.py",  # moto behind the fault proxy, botocore's backoff through each burst: 45-51 in all
    "test_jpeg_decode.py::test_process_pool_matches_threads",  # 5
    # torch.compile, and the tiny encoder over many batch sizes
    "test_encode_engine.py::test_fast_mode_compiles_once_per_machine",  # 257
    "test_encode_engine.py::test_sample_codes_depend_only_on_the_key",  # 78
    "test_encode_engine.py::test_exact_mode_equals_the_reference_path_at_any_batch_size",  # 55
    "test_encode_engine.py::test_fast_mode_without_compile_agrees_mostly_and_keeps_the_head_fp32",  # 45
    "test_encode_engine.py::test_out_of_memory_halves_the_batch_and_loses_nothing",  # 20
    "test_encode_engine.py::test_padding_keeps_the_shape_fixed",  # 16
    "test_encode_engine.py::test_fast_mode_runs_a_nearest_codebook_head",  # 21
    "test_index_rules.py::test_sample_depends_only_on_the_key",  # 8
    "test_index_rules.py::test_sample_through_the_stage_records_the_rule",  # 5
    "test_stages_encode.py::test_codes_do_not_depend_on_batching",  # 4
    # the real-size models (random weights) against the taming reference
    "test_image_size.py",  # the f16 model at 512 px 66 + 5
    "test_registry_models.py::test_exact_codes_equal_taming_reference",  # every registry model 4-11 each
    "test_registry_models.py::test_ldm_checkpoint_with_its_config_yaml_loads",  # 3
    "test_registry_models.py::test_encoder_cast_to_bf16_still_encodes",  # 4 + 4
    "test_vqgan_parity.py::test_full_gumbel_f8_on_real_photos_equals_taming",  # 22
    "test_vqgan_parity.py::test_tiny_gumbel_codes_and_features_equal_taming",  # 9
    "test_vqgan_parity.py::test_tiny_vq_codes_equal_vectorquantizer2",  # 5
    "test_vqgan_parity.py::test_sdpa_attention_is_close_to_reference",  # 4
    "test_vqgan_decoder.py::test_full_gumbel_f8_decoder_equals_taming",  # 17
    "test_vqgan_decoder.py::test_tiny_decoder_equals_taming",  # 4-7 each
    "test_vqgan_decoder.py::test_layout_matters_and_nchw_is_batch_invariant",  # 7
    "test_vqgan_decoder.py::test_round_trip_from_random_checkpoint",  # 4
    "test_vqgan_encode.py::test_strided_and_read_only_inputs",  # 5
    "test_vqgan_encode.py::test_batch_size_invariance",  # 5
    "test_vqgan_encode.py::test_matches_forward_and_accepts_tensors",  # 4
    "test_vqgan_checkpoint.py::test_f16_checkpoint_as_f8_fails_clearly",  # 4
    # whole pipelines through Dagster (download, encode, checks) on an ephemeral or SQLite instance
    "test_dagster_pipeline.py",  # 59 + 24 + 3 (its PostgreSQL test is `services`)
    "test_shard_checks.py",  # the audited pipeline over 12 shards 28 + 6 (its PostgreSQL half is `services`)
    "test_removals_dagster.py",  # 27
    "test_dagster_redownload.py",  # 18
    "test_s3_storage.py",  # 16
    "test_automation.py",  # 10 + 4
    "test_dagster_sources.py",  # 14
    "test_codes_versions.py::test_another_version_goes_side_by_side_never_over",  # 13 + 4
    "test_schedule_missing_shards.py::test_the_tick_on_an_ephemeral_instance",  # 10
    "test_encode_pipeline.py::test_every_row_is_accounted_for_across_bad_shards_and_an_oom",  # 27
    "test_encode_pipeline.py::test_batched_device_decode_path_gives_the_same_rows",  # 9
    "test_encode_pipeline.py::test_a_tar_that_disagrees_with_its_status_is_refused_not_published",  # 6
    "test_image_sha256.py",  # 4
    "test_stages_encode.py::test_download_logs_progress_while_img2dataset_works",  # 3
    # a slow server on purpose, a moto server
    "test_hostile_server.py::test_bomb_png_header_and_stream",  # 5
    "test_download_image_server.py::test_slow_path_times_out_then_serves",  # 3
    "test_text_index.py::test_part_and_index_on_s3",  # 3 + 1 + 1
    # a pipeline (img2dataset on the loopback server) per metadata preset: laion400m stays in the fast loop
    *(
        f"test_sources_pipeline.py::test_every_column_of_each_preset_is_kept_end_to_end[{preset}]"
        for preset in ("relaion5b", "laion5b", "datacomp", "coyo700m", "cc12m")
    ),  # 1.5-4.5 each
    # statistics over many samples, bf16 on CPU
    "test_index_rules.py::test_sampled_codes_follow_softmax",  # 3
    "test_index_rules.py::test_full_size_noise_is_standard_gumbel",  # 2.5
    "test_vqgan_encode.py::test_bf16_autocast_on_cpu_gives_valid_codes",  # 3
    "test_vqgan_checkpoint.py::test_save_is_deterministic_per_seed",  # 2
}


def _node(item: pytest.Item) -> str:
    """`test_x.py::test_y[param]` and its module `test_x.py`, relative to this folder."""
    return item.nodeid.rsplit("/", 1)[-1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        node = _node(item)
        name = node.split("[", 1)[0]
        needs: list[str] = []
        for fixture in getattr(item, "fixturenames", ()):
            needs += SERVICE_FIXTURES.get(fixture, ())
        needs += SERVICE_TESTS.get(name, ())
        params = getattr(getattr(item, "callspec", None), "params", {})
        for (fixture, value), services in SERVICE_PARAMS.items():
            if params.get(fixture) == value:
                needs += services
        if needs:
            item.add_marker(pytest.mark.services(*dict.fromkeys(needs)))
        elif {node, name, node.split("::", 1)[0]} & SLOW:
            item.add_marker(pytest.mark.slow)


# ---------------------------------------------------------------------------------------------------------
# A missing service is one line naming it, not a stack trace: once the tests are selected, each service they need
# is probed once (a short TCP connect, or the browser's file); the session says which are missing before the first
# test and again at the end, and each test that needs one fails at setup with that line (never a silent skip).
# LAION_VQ_TEST_PG_PORT / LAION_VQ_TEST_RABBITMQ_PORT point the probe, and only the probe, at another port, to see
# the message: `LAION_VQ_TEST_PG_PORT=1 make test`.

INSTALL = (
    "Debian/Ubuntu: `sudo apt-get install -y postgresql rabbitmq-server chromium`, then trust auth on 127.0.0.1 "
    "and a database `test` (README, Tests); or `make test-fast`, which runs no `services` test"
)
_probed: dict[str, str | None] = {}


def _tcp(what: str, port_variable: str, default_port: int, start: str) -> str | None:
    import socket

    host, port = "127.0.0.1", int(os.environ.get(port_variable) or default_port)
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as err:
        return f"{what} is not reachable on {host}:{port} ({err.strerror or type(err).__name__}); start it: {start}"


def _chromium() -> str | None:
    path = "/usr/bin/chromium"  # test_ui_browser's CHROMIUM: Debian's package, never a downloaded browser
    return None if os.path.exists(path) else f"Chromium is not installed ({path} is missing)"


PROBES = {
    "postgresql": lambda: _tcp("PostgreSQL", "LAION_VQ_TEST_PG_PORT", 5432, "`sudo service postgresql start`"),
    "rabbitmq": lambda: _tcp("RabbitMQ", "LAION_VQ_TEST_RABBITMQ_PORT", 5672, "`sudo service rabbitmq-server start`"),
    "chromium": _chromium,
}


def missing_service(service: str) -> str | None:
    """Why `service` cannot be used, or None; probed once a session ("dagster": started by the test itself)."""
    if service not in _probed:
        probe = PROBES.get(service)
        _probed[service] = probe() if probe else None
    return _probed[service]


def _missing_lines(items: list[pytest.Item]) -> list[str]:
    counts: dict[str, int] = {}
    for item in items:
        for service in {s for marker in item.iter_markers("services") for s in marker.args}:
            counts[service] = counts.get(service, 0) + 1
    return [
        f"MISSING SERVICE, {count} test(s) will fail: {why}. {INSTALL}"
        for service, count in counts.items()
        if (why := missing_service(service))
    ]


_MISSING = pytest.StashKey[list[str]]()


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    """Before the first test: one line per service that the selected tests need and that is not there."""
    config.stash[_MISSING] = _missing_lines(items)
    return config.stash[_MISSING]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The same lines at the end, where a long run's reader looks."""
    for line in config.stash.get(_MISSING, []):
        terminalreporter.write_line(line, red=True, bold=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    services = dict.fromkeys(s for marker in item.iter_markers("services") for s in marker.args)
    missing = [why for service in services if (why := missing_service(service))]
    if missing:
        pytest.fail(f"{'; '.join(missing)}. {INSTALL}", pytrace=False)
