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
def _no_leaked_defs_state_storage():
    """Dagster keeps the current instance's defs-state storage in a context variable. A test that builds a
    schedule context with resources can leave it pointing at an instance disposed since, and the next test
    that resolves Definitions then fails ("undefined DagsterInstance weakref"). Each test starts without."""
    from dagster._core.storage.defs_state.base import _current_storage

    _current_storage.set(None)
    yield


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


@pytest.fixture(autouse=True)
def _no_stale_defs_state_storage():
    """Dagster keeps the current instance's defs-state storage in a ContextVar that a run executed earlier in
    this process may leave pointing at a disposed instance (its context is exited elsewhere, and Dagster then
    leaves the value set); the next `Definitions` built here would fail with "Attempted to resolve undefined
    DagsterInstance weakref". Each test starts without one, as a fresh process does."""
    from dagster._core.storage.defs_state.base import _current_storage

    _current_storage.set(None)
    yield
