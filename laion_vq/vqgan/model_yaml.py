"""Model configs from a taming-transformers / latent-diffusion ``model.yaml``, and which config a run uses.

A released VQGAN comes as a checkpoint plus the YAML that built it: taming's ``configs/model.yaml``
(``taming.models.vqgan.VQModel`` or ``GumbelVQ``), latent-diffusion's
``models/first_stage_models/<name>/config.yaml`` (``ldm.models.autoencoder.VQModel``), dalle-mini's
``config.yaml`` beside ``model.ckpt``. All share one layout::

    model:
      target: taming.models.vqgan.VQModel
      params:
        embed_dim: 256
        n_embed: 16384
        ddconfig: {double_z: false, z_channels: 256, resolution: 256, in_channels: 3, out_ch: 3,
                   ch: 128, ch_mult: [1, 1, 2, 2, 4], num_res_blocks: 2, attn_resolutions: [16], dropout: 0.0}

:func:`config_from_yaml` turns such a file into a :class:`~laion_vq.vqgan.registry.VQGANConfig`
(only ``yaml.safe_load``: no tags, nothing imported), refusing what this encoder cannot reproduce
exactly (a KL autoencoder, ``double_z``, linear attention, a code ``remap`` table, ...).
:func:`resolve_model_config` decides between a registry name, an explicit YAML and a YAML lying next
to the checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal

from .registry import MODELS, VQGANConfig

__all__ = [
    "AUTO_MODEL",
    "ModelConfigError",
    "architecture_differences",
    "checkpoint_yaml",
    "config_from_yaml",
    "resolve_model_config",
]

# ``model`` values meaning "whatever the YAML next to the checkpoint says".
AUTO_MODEL = "auto"
_YAML_SUFFIXES = (".yaml", ".yml")

# target -> quantizer. ldm's VQModelInterface is VQModel with encode() stopping before the quantizer
# (used as LatentDiffusion's first stage); both build taming's VectorQuantizer2 (ldm imports it).
_VQ_TARGETS: dict[str, Literal["gumbel", "vq"]] = {
    "taming.models.vqgan.VQModel": "vq",
    "taming.models.vqgan.GumbelVQ": "gumbel",
    "ldm.models.autoencoder.VQModel": "vq",
    "ldm.models.autoencoder.VQModelInterface": "vq",
    "taming.models.vqgan.VQNoDiscModel": "vq",  # VQModel without the discriminator: same encoder and quantizer
}
# Known targets that are not (exactly) a VQGAN this encoder reproduces, and why.
_REFUSED_TARGETS = {
    "ldm.models.autoencoder.AutoencoderKL": "a KL autoencoder: continuous latents, no codebook",
    "taming.models.vqgan.EMAVQ": "EMA codebook (EMAVectorQuantizer, other parameter names and distance expression)",
    "taming.models.vqgan.VQSegmentationModel": "a segmentation-map autoencoder, not an RGB image model",
}
# Architecture fields: everything but the name and the description.
_ARCH_FIELDS = tuple(f.name for f in fields(VQGANConfig) if f.name not in ("name", "description"))
# Names a taming/ldm/dalle-mini YAML usually has, which say nothing about the model.
_GENERIC_STEMS = {"model", "config", "last", "configs", "checkpoints", "ckpts", ""}
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class ModelConfigError(ValueError):
    """A model name or model YAML that cannot be used (unknown, unreadable, unsupported, or conflicting)."""


def _is_yaml_ref(value: str) -> bool:
    return value.lower().endswith(_YAML_SUFFIXES)


def _read_text(url: str) -> str:
    from laion_vq.shards.storage import read_bytes

    try:
        return read_bytes(url).decode("utf-8")
    except FileNotFoundError:
        raise ModelConfigError(f"model YAML not found: {url}") from None
    except UnicodeDecodeError as e:
        raise ModelConfigError(f"{url}: not a UTF-8 text file ({e})") from None


def _name_from_path(path: str) -> str:
    """``.../vq-f8/config.yaml`` -> ``vq-f8``; ``.../vqgan_gumbel_f8/configs/model.yaml`` -> ``vqgan_gumbel_f8``;
    ``vqgan_imagenet_f16_16384.yaml`` -> itself without the suffix. Safe as a folder name."""
    parts = [p for p in re.split(r"[/\\]", path.split("://", 1)[-1]) if p]
    stem = os.path.splitext(parts[-1])[0] if parts else ""
    stem = stem.removesuffix("-project")
    candidates = [stem, *reversed(parts[:-1])]
    for c in candidates:
        if c.lower() not in _GENERIC_STEMS and c not in (".", ".."):
            return _NAME_CHARS.sub("_", c).strip("._") or "model_yaml"
    return "model_yaml"


def _get(mapping: Mapping[str, Any], key: str, where: str, source: str) -> Any:
    if key not in mapping:
        raise ModelConfigError(f"{source}: missing {where}{key}")
    return mapping[key]


def _int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(f"{source}: {key} must be an integer, got {value!r}")
    return value


def _ints(value: Any, key: str, source: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise ModelConfigError(f"{source}: {key} must be a list of integers, got {value!r}")
    return tuple(_int(v, f"{key}[{i}]", source) for i, v in enumerate(value))


def _model_node(doc: Any, source: str) -> tuple[str, Mapping[str, Any]]:
    """(target, params) of the VQ model the document describes, descending into ``first_stage_config``."""
    if not isinstance(doc, Mapping):
        raise ModelConfigError(f"{source}: not a model config (a YAML mapping with 'model: target/params')")
    node = doc.get("model", doc)
    path = "model." if "model" in doc else ""
    for _ in range(2):  # the VQ model itself, or a model that embeds one as its first stage
        if not isinstance(node, Mapping) or "target" not in node:
            raise ModelConfigError(f"{source}: missing {path}target (expected a taming/ldm VQ model config)")
        target = node["target"]
        params = node.get("params")
        if not isinstance(target, str):
            raise ModelConfigError(f"{source}: {path}target must be a string, got {target!r}")
        if not isinstance(params, Mapping):
            raise ModelConfigError(f"{source}: missing {path}params for target {target}")
        if target in _VQ_TARGETS or target in _REFUSED_TARGETS or "first_stage_config" not in params:
            return target, params
        # ldm LatentDiffusion / taming Net2NetTransformer: the VQ model is its first stage
        node, path = params["first_stage_config"], f"{path}params.first_stage_config."
    raise ModelConfigError(f"{source}: nested first_stage_config too deep")


def _parse(doc: Any, source: str, name: str) -> VQGANConfig:
    target, params = _model_node(doc, source)
    if target in _REFUSED_TARGETS:
        raise ModelConfigError(f"{source}: target {target} is not supported: {_REFUSED_TARGETS[target]}")
    if target not in _VQ_TARGETS:
        raise ModelConfigError(f"{source}: unknown target {target!r}; supported: {', '.join(sorted(_VQ_TARGETS))}")
    quantizer = _VQ_TARGETS[target]
    if params.get("remap") is not None:
        raise ModelConfigError(
            f"{source}: quantizer remap {params['remap']!r} is not supported (it renumbers the codes)"
        )
    dd = _get(params, "ddconfig", "params.", source)
    if not isinstance(dd, Mapping):
        raise ModelConfigError(f"{source}: params.ddconfig must be a mapping, got {dd!r}")
    # taming's and ldm's Encoder default double_z to True: a missing key means 2*z_channels outputs.
    if dd.get("double_z", True) is not False:
        raise ModelConfigError(
            f"{source}: ddconfig.double_z must be false for a VQ model (got {dd.get('double_z', 'missing = true')!r}; "
            "double_z is the KL autoencoder's mean+variance output)"
        )
    if dd.get("use_linear_attn", False) or dd.get("attn_type", "vanilla") != "vanilla":
        raise ModelConfigError(
            f"{source}: only vanilla attention is supported (attn_type {dd.get('attn_type')!r}, "
            f"use_linear_attn {dd.get('use_linear_attn')!r})"
        )
    for key, default in (("resamp_with_conv", True), ("give_pre_end", False), ("tanh_out", False)):
        if dd.get(key, default) != default:
            raise ModelConfigError(f"{source}: ddconfig.{key} must be {default} (got {dd[key]!r})")

    def get(key: str) -> Any:
        return _get(dd, key, "params.ddconfig.", source)

    in_channels = _int(get("in_channels"), "ddconfig.in_channels", source)
    out_ch = _int(dd.get("out_ch", in_channels), "ddconfig.out_ch", source)
    if out_ch != in_channels:
        raise ModelConfigError(f"{source}: ddconfig.out_ch ({out_ch}) must equal in_channels ({in_channels})")
    try:
        return VQGANConfig(
            name=name,
            ch=_int(get("ch"), "ddconfig.ch", source),
            ch_mult=_ints(get("ch_mult"), "ddconfig.ch_mult", source),
            num_res_blocks=_int(get("num_res_blocks"), "ddconfig.num_res_blocks", source),
            attn_resolutions=_ints(get("attn_resolutions"), "ddconfig.attn_resolutions", source),
            z_channels=_int(get("z_channels"), "ddconfig.z_channels", source),
            embed_dim=_int(_get(params, "embed_dim", "params.", source), "embed_dim", source),
            n_embed=_int(_get(params, "n_embed", "params.", source), "n_embed", source),
            quantizer=quantizer,
            resolution=_int(get("resolution"), "ddconfig.resolution", source),
            in_channels=in_channels,
            description=f"from {source} ({target})",
        )
    except ModelConfigError:
        raise
    except ValueError as e:
        raise ModelConfigError(f"{source}: {e}") from None


def config_from_yaml(path_or_text: str | bytes | os.PathLike[str], *, name: str | None = None) -> VQGANConfig:
    """The :class:`VQGANConfig` a taming/ldm ``model.yaml``/``config.yaml`` describes.

    ``path_or_text`` is a local path or fsspec URL ending in ``.yaml``/``.yml``, an ``os.PathLike``, or
    the YAML text itself (anything containing a newline). The config is named ``name``, else after the
    file (``vq-f8/config.yaml`` -> ``vq-f8``; ``vqgan_gumbel_f8/configs/model.yaml`` -> ``vqgan_gumbel_f8``),
    else ``model_yaml``. Accepted targets: ``taming.models.vqgan.VQModel``/``GumbelVQ``,
    ``ldm.models.autoencoder.VQModel``/``VQModelInterface``, and models with one of these as their
    ``params.first_stage_config`` (ldm ``LatentDiffusion``, taming ``Net2NetTransformer``). Anything else,
    a missing key, or a setting the encoder does not reproduce raises :class:`ModelConfigError`.
    """
    import yaml

    if isinstance(path_or_text, bytes):
        text, source, default_name = path_or_text.decode("utf-8"), "model YAML text", "model_yaml"
    elif isinstance(path_or_text, str) and "\n" in path_or_text:
        text, source, default_name = path_or_text, "model YAML text", "model_yaml"
    else:
        source = os.fspath(path_or_text)
        text, default_name = _read_text(source), _name_from_path(source)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ModelConfigError(f"{source}: not valid YAML ({e})") from None
    return _parse(doc, source, name or default_name)


def architecture_differences(a: VQGANConfig, b: VQGANConfig) -> list[str]:
    """``field: a vs b`` for every architecture field (all but name and description) that differs."""
    return [f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in _ARCH_FIELDS if getattr(a, f) != getattr(b, f)]


def _candidates(checkpoint: str) -> list[str]:
    base, sep, filename = checkpoint.rstrip("/").rpartition("/")
    folder = base if sep else "."
    stem = os.path.splitext(filename)[0]
    out = [f"{folder}/{stem}{s}" for s in _YAML_SUFFIXES] + [f"{folder}/model.yaml", f"{folder}/config.yaml"]
    parent, psep, last = folder.rpartition("/")
    if psep and last in ("checkpoints", "ckpts"):  # taming's released layout: ckpts/last.ckpt + configs/model.yaml
        out.append(f"{parent}/configs/model.yaml")
    return list(dict.fromkeys(out))


def checkpoint_yaml(checkpoint: str) -> str | None:
    """The model YAML that goes with ``checkpoint`` (local path or fsspec URL), or ``None``.

    Looked for, first found wins: ``<stem>.yaml``/``<stem>.yml`` beside it (``vqgan_imagenet_f16_16384.ckpt``
    + ``vqgan_imagenet_f16_16384.yaml``), ``model.yaml`` and ``config.yaml`` in its folder (ldm's
    ``vq-f8/model.ckpt`` + ``config.yaml``, dalle-mini's ``model.ckpt`` + ``config.yaml``), and for a
    checkpoint in ``checkpoints/`` or ``ckpts/``, the sibling ``configs/model.yaml`` (taming's releases).
    """
    from laion_vq.shards.storage import exists

    for candidate in _candidates(os.fspath(checkpoint)):
        try:
            if exists(candidate):
                return candidate
        except (OSError, ValueError):
            continue
    return None


def resolve_model_config(model: str | None, checkpoint: str | None) -> VQGANConfig:
    """The config to build the encoder/decoder with, from the ``model`` setting and the checkpoint.

    ``model`` is a registry name (:data:`~laion_vq.vqgan.registry.MODELS`), a path/URL of a model YAML
    (``.yaml``/``.yml``), or ``"auto"``/empty/``None`` for "the YAML next to the checkpoint"
    (:func:`checkpoint_yaml`). A registry name or explicit YAML is used as given, but when a YAML also
    sits next to the checkpoint it must describe the same architecture; otherwise
    :class:`ModelConfigError` names both and what differs (the checkpoint would not load, or would
    mean something else). ``auto`` without such a YAML is an error too.
    """
    requested = (model or "").strip()
    explicit: VQGANConfig | None = None
    if requested in MODELS:
        explicit, what = MODELS[requested], f"registry model {requested!r}"
    elif _is_yaml_ref(requested):
        explicit, what = config_from_yaml(requested), f"model YAML {requested}"
    elif requested not in ("", AUTO_MODEL):
        raise ModelConfigError(
            f"unknown VQGAN model {requested!r}: give a registry name ({', '.join(sorted(MODELS))}), "
            f"a model YAML path ending in .yaml/.yml, or {AUTO_MODEL!r} to use the YAML next to the checkpoint"
        )
    beside = checkpoint_yaml(checkpoint) if checkpoint else None
    if explicit is None:
        if beside is None:
            looked = ", ".join(_candidates(checkpoint)) if checkpoint else "no checkpoint configured"
            raise ModelConfigError(
                f"model {requested or AUTO_MODEL!r} means 'the model YAML next to the checkpoint', but there is "
                f"none (looked for: {looked}); name a registry model ({', '.join(sorted(MODELS))}) or a YAML"
            )
        return config_from_yaml(beside)
    if beside is not None:
        found = config_from_yaml(beside)
        diff = architecture_differences(explicit, found)
        if diff:
            raise ModelConfigError(
                f"{what} and {beside} (next to checkpoint {checkpoint}) describe different models: "
                + "; ".join(diff)
                + f". Fix the model setting (e.g. {AUTO_MODEL!r} to use {beside}) or remove the stale YAML."
            )
    return explicit
