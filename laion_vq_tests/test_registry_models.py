"""Every registry model's ``exact`` codes equal the taming reference (fp32, CPU); model YAMLs; fp32 heads.

latent-diffusion (``ldm``) is not installable here (it is not on PyPI and needs pytorch-lightning), so its
VQ models are checked against taming's modules, which is what they are:

* ``ldm.models.autoencoder.VQModel`` imports its quantizer from taming
  (``from taming.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer``) and builds it as
  ``VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=...)``; ``encode`` is
  ``encoder -> quant_conv -> quantize``, as in taming's ``VQModel``. ``legacy`` only changes the loss and
  ``sane_index_shape`` the indices' shape; ``remap`` is refused (YAML and checkpoint loading).
* ``ldm.modules.diffusionmodules.model.Encoder`` is taming's ``Encoder`` (same modules, names, pad
  ``(0, 1, 0, 1)``, ``x * sigmoid(x)``, GroupNorm(32, eps=1e-6), ``bmm -> * c**-0.5 -> softmax -> bmm``
  attention) plus an ``attn_type`` switch whose default, ``"vanilla"``, is taming's ``AttnBlock``; the
  released vq-f8 / vq-f8-n256 / vq-f16 configs do not set it (a YAML that does is refused).
* dalle-mini's ``vqgan_f16_16384`` was fine-tuned with taming-transformers (``taming.models.vqgan.VQModel``).

So parity with ``TamingReference`` is parity with ldm's and dalle-mini's own code. Weights are seeded random
(no network here), copied state dict for state dict; VQ codebooks are spread like the features (taming's
init, ``U(-1/n, 1/n)``, would give every position the same code) so that near-ties are plentiful.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from laion_vq.vqgan import (
    AUTO_MODEL,
    MODELS,
    GumbelQuantizeHead,
    ModelConfigError,
    VectorQuantizeHead,
    VQGANConfig,
    VQGANEncoder,
    architecture_differences,
    checkpoint_yaml,
    config_from_yaml,
    load_decoder,
    load_encoder,
    preprocess,
    resolve_model_config,
    save_random_checkpoint,
)
from laion_vq.vqgan.reference import TamingReference, sample_photos

from .conftest import TINY_VQ

# ldm's released first-stage configs (CompVis/latent-diffusion models/first_stage_models/<name>/config.yaml;
# the same files are in CompVis/stable-diffusion), model part, as released.
LDM_VQ_F8_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.VQModel
  params:
    embed_dim: 4
    n_embed: 16384
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 4
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult:
      - 1
      - 2
      - 2
      - 4
      num_res_blocks: 2
      attn_resolutions:
      - 32
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_num_layers: 2
        disc_start: 1
        disc_weight: 0.6
        codebook_weight: 1.0
"""
LDM_VQ_F8_N256_YAML = LDM_VQ_F8_YAML.replace("n_embed: 16384", "n_embed: 256")
LDM_VQ_F16_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.VQModel
  params:
    embed_dim: 8
    n_embed: 16384
    ddconfig:
      double_z: false
      z_channels: 8
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [16]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
"""
# dalle-mini's config.yaml beside model.ckpt (huggingface.co/boris/vqgan_f16_16384), model part.
DALLEMINI_YAML = """\
model:
  base_learning_rate: 4.5e-6
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 16384
    ddconfig:
      double_z: False
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [16]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
"""
# taming's vqgan_gumbel_f8 configs/model.yaml, model part.
TAMING_GUMBEL_F8_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.GumbelVQ
  params:
    kl_weight: 1.0e-08
    embed_dim: 256
    n_embed: 8192
    monitor: val/rec_loss
    temperature_scheduler_config:
      target: taming.lr_scheduler.LambdaWarmUpCosineScheduler
      params:
        warm_up_steps: 0
        max_decay_steps: 1000001
        lr_start: 0.9
        lr_max: 0.9
        lr_min: 1.0e-06
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [32]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.DummyLoss
"""
# ldm's kl-f8 first stage (models/first_stage_models/kl-f8/config.yaml), model part: no codebook.
LDM_KL_F8_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.AutoencoderKL
  params:
    monitor: val/rec_loss
    embed_dim: 4
    lossconfig:
      target: ldm.modules.losses.LPIPSWithDiscriminator
    ddconfig:
      double_z: true
      z_channels: 4
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 2, 4, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
"""


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return sample_photos(2)


def _spread_codebook(ref: TamingReference, h: torch.Tensor, seed: int) -> None:
    """Codebook entries drawn per channel like the features (mean, std), so codes are diverse."""
    g = torch.Generator().manual_seed(seed)
    c = ref.config
    mean, std = h.mean(dim=(0, 2, 3)), h.std(dim=(0, 2, 3))
    with torch.no_grad():
        ref.quantize.embedding.weight.copy_(torch.randn(c.n_embed, c.embed_dim, generator=g) * std + mean)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_codes_equal_taming_reference(name: str, photos: np.ndarray) -> None:
    """One real photo for the released sizes (~1 s per forward on 2 cores, ours and taming's), both for tiny."""
    config = MODELS[name]
    seed = sum(map(ord, name))
    images = photos if config.ch < 128 else photos[seed % 2 : seed % 2 + 1]
    torch.manual_seed(seed)
    ref = TamingReference(config).eval()
    x = preprocess(torch.from_numpy(images))
    with torch.inference_mode():
        h_ref = ref.encode_to_prequant(x)
    if config.quantizer == "vq":
        _spread_codebook(ref, h_ref, seed=len(name))
    with torch.inference_mode():
        ref_codes = (
            ref.quantize.proj(h_ref).argmax(dim=1) if config.quantizer == "gumbel" else ref.quantize(h_ref)[2][2]
        )
    ours = VQGANEncoder(config).eval()
    ours.load_state_dict(ref.state_dict())
    with torch.inference_mode():
        h_ours = ours.encode_to_prequant(x)
        codes = ours.quantize.indices(h_ours)
    grid = config.code_grid(256)
    assert torch.equal(h_ours, h_ref)
    assert ref_codes.shape == codes.shape == (len(images), grid, grid)
    assert torch.equal(codes, ref_codes)
    assert ref_codes.unique().numel() > min(50, config.n_embed // 8)  # diverse, so equality means something
    if name == "vqgan_gumbel_f8_tiny":  # the public uint8 path too (cheap here)
        np.testing.assert_array_equal(ours.encode_uint8(images), ref_codes.numpy().astype(np.int16))


def test_ldm_and_dallemini_entries_are_the_released_configs() -> None:
    f8, n256, f16, dm = (MODELS[n] for n in ("ldm_vq_f8", "ldm_vq_f8_n256", "ldm_vq_f16", "dallemini_vqgan_f16_16384"))
    assert (f8.z_channels, f8.embed_dim, f8.n_embed, f8.ch_mult, f8.attn_resolutions) == (
        4,
        4,
        16384,
        (1, 2, 2, 4),
        (32,),
    )
    assert (n256.n_embed, n256.code_grid(256), f8.code_grid(256)) == (256, 32, 32)
    assert (f16.z_channels, f16.embed_dim, f16.n_embed, f16.code_grid(256)) == (8, 8, 16384, 16)
    assert architecture_differences(dm, MODELS["vqgan_imagenet_f16_16384"]) == []
    assert all(c.quantizer == "vq" for c in (f8, n256, f16, dm))


# --- model.yaml ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "text", "registry_name"),
    [
        ("vq-f8", LDM_VQ_F8_YAML, "ldm_vq_f8"),
        ("vq-f8-n256", LDM_VQ_F8_N256_YAML, "ldm_vq_f8_n256"),
        ("vq-f16", LDM_VQ_F16_YAML, "ldm_vq_f16"),
        ("vqgan_f16_16384", DALLEMINI_YAML, "dallemini_vqgan_f16_16384"),
        ("vqgan_gumbel_f8", TAMING_GUMBEL_F8_YAML, "vqgan_gumbel_f8"),
    ],
)
def test_released_yaml_round_trips_to_registry(tmp_path: Path, folder: str, text: str, registry_name: str) -> None:
    path = tmp_path / folder / "config.yaml"
    path.parent.mkdir()
    path.write_text(text)
    config = config_from_yaml(str(path))
    assert config.name == folder
    assert architecture_differences(config, MODELS[registry_name]) == []
    assert config_from_yaml(path) == config  # os.PathLike
    assert architecture_differences(config_from_yaml(text), MODELS[registry_name]) == []  # the text itself


def test_yaml_names_follow_the_released_layouts(tmp_path: Path) -> None:
    (tmp_path / "vqgan_gumbel_f8" / "configs").mkdir(parents=True)
    taming = tmp_path / "vqgan_gumbel_f8" / "configs" / "model.yaml"
    taming.write_text(TAMING_GUMBEL_F8_YAML)
    assert config_from_yaml(str(taming)).name == "vqgan_gumbel_f8"
    named = tmp_path / "my model.yaml"
    named.write_text(LDM_VQ_F16_YAML)
    assert config_from_yaml(str(named)).name == "my_model"
    assert config_from_yaml(str(named), name="vq16").name == "vq16"
    assert config_from_yaml(LDM_VQ_F16_YAML).name == "model_yaml"


def test_latent_diffusion_config_gives_its_first_stage() -> None:
    """An ldm LatentDiffusion config (e.g. cin-ldm-vq-f8.yaml) names its VQ model in ``first_stage_config``."""
    import yaml

    vq = yaml.safe_load(LDM_VQ_F8_YAML)["model"]["params"]
    first_stage = {"target": "ldm.models.autoencoder.VQModelInterface", "params": vq}
    doc = {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {"image_size": 32, "first_stage_config": first_stage},
        }
    }
    config = config_from_yaml(yaml.safe_dump(doc))
    assert architecture_differences(config, MODELS["ldm_vq_f8"]) == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (LDM_KL_F8_YAML, "AutoencoderKL is not supported: a KL autoencoder"),
        (LDM_VQ_F8_YAML.replace("double_z: false", "double_z: true"), "double_z must be false"),
        (LDM_VQ_F8_YAML.replace("      double_z: false\n", ""), "double_z must be false"),
        (LDM_VQ_F8_YAML.replace("    n_embed: 16384\n", ""), "missing params.n_embed"),
        (LDM_VQ_F8_YAML.replace("      ch: 128\n", ""), "missing params.ddconfig.ch$"),
        (LDM_VQ_F8_YAML.replace("ldm.models.autoencoder.VQModel", "mymodels.VQ"), "unknown target 'mymodels.VQ'"),
        (LDM_VQ_F8_YAML.replace("    embed_dim: 4\n", "    embed_dim: 4\n    remap: used.npy\n"), "remap"),
        (LDM_VQ_F8_YAML.replace("      dropout: 0.0\n", "      dropout: 0.0\n      attn_type: linear\n"), "vanilla"),
        (LDM_VQ_F8_YAML.replace("n_embed: 16384", "n_embed: 65536"), "int16"),
        (LDM_VQ_F8_YAML.replace("z_channels: 4", "z_channels: four"), "z_channels must be an integer"),
        ("model:\n  target: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
        ("just: a mapping\n", "missing target"),
    ],
)
def test_unsupported_or_broken_yaml_is_a_clear_error(text: str, match: str) -> None:
    with pytest.raises(ModelConfigError, match=match):
        config_from_yaml(text)


def test_missing_yaml_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="not found"):
        config_from_yaml(str(tmp_path / "nope.yaml"))


# --- resolve_model_config -----------------------------------------------------------------------------------


def _beside(ckpt: Path, text: str, yaml_name: str = "config.yaml") -> str:
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    (ckpt.parent / yaml_name).write_text(text)
    return str(ckpt)


def test_resolve_registry_names_and_explicit_yaml(tmp_path: Path) -> None:
    assert resolve_model_config("ldm_vq_f16", None) is MODELS["ldm_vq_f16"]
    assert resolve_model_config("ldm_vq_f16", str(tmp_path / "alone" / "model.ckpt")) is MODELS["ldm_vq_f16"]
    yaml_path = tmp_path / "cfg" / "vq-f16.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(LDM_VQ_F16_YAML)
    config = resolve_model_config(str(yaml_path), None)
    assert config.name == "vq-f16" and architecture_differences(config, MODELS["ldm_vq_f16"]) == []
    with pytest.raises(ModelConfigError, match="unknown VQGAN model 'vq_f32'.*ldm_vq_f8"):
        resolve_model_config("vq_f32", None)


def test_resolve_auto_uses_the_yaml_next_to_the_checkpoint(tmp_path: Path) -> None:
    ckpt = _beside(tmp_path / "vq-f8" / "model.ckpt", LDM_VQ_F8_YAML)
    for model in (AUTO_MODEL, "", None):
        config = resolve_model_config(model, ckpt)
        assert config.name == "vq-f8" and architecture_differences(config, MODELS["ldm_vq_f8"]) == []
    # taming's released layout: <run>/ckpts/last.ckpt with <run>/configs/model.yaml
    run = tmp_path / "vqgan_gumbel_f8"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "model.yaml").write_text(TAMING_GUMBEL_F8_YAML)
    taming_ckpt = str(run / "ckpts" / "last.ckpt")
    assert checkpoint_yaml(taming_ckpt) == f"{run}/configs/model.yaml"
    assert resolve_model_config(AUTO_MODEL, taming_ckpt).name == "vqgan_gumbel_f8"
    # <stem>.yaml beside <stem>.ckpt wins over a generic config.yaml
    _beside(tmp_path / "vq-f8" / "vq16.ckpt", LDM_VQ_F16_YAML, "vq16.yaml")
    assert resolve_model_config(AUTO_MODEL, str(tmp_path / "vq-f8" / "vq16.ckpt")).embed_dim == 8
    with pytest.raises(ModelConfigError, match="no checkpoint configured"):
        resolve_model_config(AUTO_MODEL, None)
    with pytest.raises(ModelConfigError, match="none .looked for: .*alone/model.yaml"):
        resolve_model_config(AUTO_MODEL, str(tmp_path / "alone" / "model.ckpt"))


def test_resolve_checks_a_registry_name_against_the_yaml_beside_the_checkpoint(tmp_path: Path) -> None:
    ckpt = _beside(tmp_path / "vq-f8" / "model.ckpt", LDM_VQ_F8_YAML)
    assert resolve_model_config("ldm_vq_f8", ckpt) is MODELS["ldm_vq_f8"]
    with pytest.raises(
        ModelConfigError,
        match=r"registry model 'vqgan_gumbel_f8' and .*vq-f8/config.yaml \(next to checkpoint .*\) describe "
        r"different models: ch_mult: \(1, 1, 2, 4\) vs \(1, 2, 2, 4\); z_channels: 256 vs 4",
    ):
        resolve_model_config("vqgan_gumbel_f8", ckpt)
    # the same architecture with other weights is not a conflict: dalle-mini's fine-tune of ImageNet f16
    dm = _beside(tmp_path / "dallemini" / "model.ckpt", DALLEMINI_YAML)
    assert resolve_model_config("vqgan_imagenet_f16_16384", dm) is MODELS["vqgan_imagenet_f16_16384"]
    # an explicit YAML is checked the same way
    other = tmp_path / "other.yaml"
    other.write_text(LDM_VQ_F16_YAML)
    with pytest.raises(ModelConfigError, match="different models"):
        resolve_model_config(str(other), ckpt)


def test_resolve_reads_fsspec_urls() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/resolve-test/vq-f16/config.yaml", LDM_VQ_F16_YAML.encode())
    try:
        config = resolve_model_config(AUTO_MODEL, "memory://resolve-test/vq-f16/model.ckpt")
        assert config.name == "vq-f16" and architecture_differences(config, MODELS["ldm_vq_f16"]) == []
        assert config_from_yaml("memory://resolve-test/vq-f16/config.yaml").embed_dim == 8
    finally:
        fs.rm("/resolve-test", recursive=True)


# --- checkpoints --------------------------------------------------------------------------------------------


def test_ldm_checkpoint_with_its_config_yaml_loads(tmp_path: Path) -> None:
    """ldm's release layout (vq-f8/model.ckpt + config.yaml): the YAML picks the config, both halves load."""
    ckpt = _beside(tmp_path / "vq-f8" / "model.ckpt", LDM_VQ_F8_YAML)
    save_random_checkpoint(MODELS["ldm_vq_f8"], ckpt, seed=3)
    config = resolve_model_config(AUTO_MODEL, ckpt)
    encoder = load_encoder(config, ckpt)
    decoder = load_decoder(config, ckpt)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        expected = VQGANEncoder(MODELS["ldm_vq_f8"]).state_dict()
    got = encoder.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert torch.equal(decoder.quantize.weight, expected["quantize.embedding.weight"])
    assert decoder.post_quant_conv.weight.shape == (4, 4, 1, 1) and encoder.code_grid == 32


def test_first_stage_of_a_latent_diffusion_checkpoint_loads(tmp_path: Path) -> None:
    """A LatentDiffusion checkpoint keeps the VQ model under ``first_stage_model.``, next to the U-Net and
    EMA weights; the encoder and decoder are read from there."""
    torch.manual_seed(7)
    vq = VQGANEncoder(TINY_VQ).state_dict()
    state = {f"first_stage_model.{k}": v for k, v in vq.items()}
    state["model.diffusion_model.out.0.weight"] = torch.randn(4)
    state["model_ema.diffusion_modelout0weight"] = torch.randn(4)
    path = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    encoder = load_encoder(TINY_VQ, str(path))
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in vq.items())


# --- fp32 nearest-neighbour distances and logits ------------------------------------------------------------


def test_vq_head_scores_in_fp32_whatever_the_input_dtype() -> None:
    torch.manual_seed(11)
    head = VectorQuantizeHead(n_embed=4096, embed_dim=4)
    with torch.no_grad():
        head.embedding.weight.normal_()
    z = torch.randn(2, 4, 8, 8)
    exact = head.indices(z)
    z16 = z.to(torch.bfloat16)
    assert head.distances(z16).dtype == torch.float32
    assert torch.equal(head.indices(z16), head.indices(z16.float()))  # bf16 z: upcast, not the weights cast down
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head.distances(z).dtype == torch.float32
        assert torch.equal(head.indices(z), exact)
    half = VectorQuantizeHead(n_embed=4096, embed_dim=4).to(torch.bfloat16)
    half.load_state_dict(head.state_dict())
    fp32_of_half = VectorQuantizeHead(n_embed=4096, embed_dim=4)
    fp32_of_half.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    assert half.distances(z16).dtype == torch.float32
    assert torch.equal(half.indices(z16), fp32_of_half.indices(z16.float()))


def test_gumbel_head_scores_in_fp32_whatever_the_input_dtype() -> None:
    torch.manual_seed(12)
    head = GumbelQuantizeHead(32, 32, 512)
    z = torch.randn(2, 32, 8, 8)
    assert torch.equal(head.logits(z), head.proj(z))  # fp32: exactly the conv
    half = GumbelQuantizeHead(32, 32, 512).to(torch.bfloat16)
    half.load_state_dict(head.state_dict())
    z16 = z.to(torch.bfloat16)
    assert half.logits(z16).dtype == torch.float32
    ref = torch.nn.functional.conv2d(z16.float(), half.proj.weight.float(), half.proj.bias.float())
    assert torch.equal(half.indices(z16), ref.argmax(dim=1))
    exact = head.proj(z).argmax(dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head.logits(z).dtype == torch.float32
        assert torch.equal(head.indices(z), exact)
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    assert torch.equal(half.sample(z16, seeds), half.sample(z16.float(), seeds))


@pytest.mark.parametrize("config", [TINY_VQ, MODELS["vqgan_gumbel_f8_tiny"]], ids=lambda c: c.name)
def test_encoder_cast_to_bf16_still_encodes(config: VQGANConfig, photos: np.ndarray) -> None:
    """Weights cast to bf16 (not autocast): z arrives in bf16 and the head scores it in fp32."""
    torch.manual_seed(13)
    model = VQGANEncoder(config).eval().to(torch.bfloat16)
    codes = model.encode_uint8(photos[:1])
    assert codes.dtype == np.int16 and codes.shape == (1, 32, 32)
    assert codes.min() >= 0 and codes.max() < config.n_embed
