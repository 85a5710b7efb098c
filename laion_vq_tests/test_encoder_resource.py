"""The encoder resource: architecture from a registry name or a model.yaml beside the checkpoint, mode and
decode settings refused clearly, the engine built once per process and its GPU memory given back."""

from __future__ import annotations

import hashlib
import shutil

import dagster as dg
import pytest

from laion_vq.defs.resources import VQGANEncoderResource
from laion_vq.encode.decode import ImageDecoder
from laion_vq.vqgan import get_model_config

from .conftest import TINY_MODEL

TINY_YAML = """
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.GumbelVQ
  params:
    kl_weight: 1.0e-08
    embed_dim: 32
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 32
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 1, 2, 2]
      num_res_blocks: 1
      attn_resolutions: [32]
      dropout: 0.0
"""


@pytest.fixture()
def yaml_checkpoint(tmp_path, tiny_checkpoint) -> str:
    folder = tmp_path / "my-gumbel-f8"
    folder.mkdir()
    shutil.copy(tiny_checkpoint, folder / "last.ckpt")
    (folder / "model.yaml").write_text(TINY_YAML)
    return str(folder / "last.ckpt")


def test_auto_reads_the_model_yaml_beside_the_checkpoint(yaml_checkpoint):
    resource = VQGANEncoderResource(model="auto", checkpoint=yaml_checkpoint, device="cpu", batch_size=2)
    config = resource.vqgan_config()
    tiny = get_model_config(TINY_MODEL)
    assert (config.ch, config.ch_mult, config.z_channels, config.n_embed) == (32, (1, 1, 2, 2), 32, 8192)
    assert config.quantizer == tiny.quantizer == "gumbel"
    assert resource.codes_folder == config.name == "my-gumbel-f8"
    engine = resource.engine()
    assert engine is resource.engine() and engine.batch_size == 2 and engine.mode == "exact"
    provenance = resource.provenance()
    assert provenance["encode_mode"] == "exact" and resource.dtype == "fp32"
    # provenance names what `auto` resolved to, and the YAML it read (by content: a changed YAML shows)
    assert (provenance["model"], provenance["model_setting"]) == ("my-gumbel-f8", "auto")
    yaml_path = yaml_checkpoint.replace("last.ckpt", "model.yaml")
    assert provenance["model_yaml"] == yaml_path
    assert provenance["model_yaml_sha256"] == hashlib.sha256(TINY_YAML.encode()).hexdigest()
    resource.teardown_after_execution(None)  # type: ignore[arg-type]
    assert resource._engine is None and resource._loaded is None  # the next run loads afresh


def test_a_registry_name_that_disagrees_with_the_yaml_is_refused(yaml_checkpoint):
    resource = VQGANEncoderResource(model="vqgan_gumbel_f8", checkpoint=yaml_checkpoint)
    with pytest.raises(dg.Failure, match="LAION_VQ_MODEL"):
        resource.vqgan_config()


def test_mode_and_decode_settings_are_checked(tiny_checkpoint):
    with pytest.raises(dg.Failure, match="LAION_VQ_ENCODE_MODE"):
        VQGANEncoderResource(model=TINY_MODEL, checkpoint=tiny_checkpoint, mode="turbo").provenance()
    with pytest.raises(dg.Failure, match="LAION_VQ_DECODE_DEVICE"):
        VQGANEncoderResource(model=TINY_MODEL, decode_device="gpu").image_decoder()
    fast = VQGANEncoderResource(model=TINY_MODEL, checkpoint=tiny_checkpoint, mode="fast")
    assert fast.dtype == "bf16" and fast.provenance()["encode_mode"] == "fast"
    with VQGANEncoderResource(model=TINY_MODEL, device="cpu", decode_workers=1).image_decoder() as decoder:
        assert isinstance(decoder, ImageDecoder) and decoder.device.type == "cpu" and decoder.cpu_workers == 1
