"""Shared fixtures: a loopback image server and a small random-weight checkpoint (real format)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# The loopback image server is the tests' web; downloads reach no loopback address unless allowed.
# Tests of the address guard pass their own `allow_networks`.
os.environ.setdefault("LAION_VQ_DOWNLOAD_ALLOW_NETWORKS", "127.0.0.1/32")

TINY_MODEL = "vqgan_gumbel_f8_tiny"


def _tiny_vq():
    """The tiny f8 test config with a nearest-codebook (VectorQuantizer2) head instead of Gumbel."""
    from dataclasses import replace

    from laion_vq.vqgan import get_model_config

    return replace(get_model_config(TINY_MODEL), name="tiny_vq_test", n_embed=512, quantizer="vq")


TINY_VQ = _tiny_vq()


@pytest.fixture(scope="session")
def image_server():
    from laion_vq.fixtures.image_server import ImageServer

    with ImageServer(slow_delay_s=3.0) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The tiny f8 test config with seeded random weights, saved as a Lightning checkpoint."""
    from laion_vq.vqgan import get_model_config, save_random_checkpoint

    path = str(tmp_path_factory.mktemp("ckpt") / f"{TINY_MODEL}-random.ckpt")
    return save_random_checkpoint(get_model_config(TINY_MODEL), path, seed=0)
