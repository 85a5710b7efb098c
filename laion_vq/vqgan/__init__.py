"""VQGAN encoder (taming-transformers compatible) that turns images into integer code grids, and its decoder.

Pure PyTorch, no Dagster: build with :class:`VQGANEncoder` or load a released checkpoint with
:func:`load_encoder`; :func:`load_decoder` gives the :class:`VQGANDecoder` that turns codes back into
images (for looking at them); model hyper-parameters live in :mod:`laion_vq.vqgan.registry`, or come from
a taming/ldm ``model.yaml`` (:func:`config_from_yaml`, :func:`resolve_model_config`).
The taming reference used by parity tests and benchmarks is in :mod:`laion_vq.vqgan.reference`
(dev dependency only, not imported here).
"""

from .checkpoint import has_random_weights, load_decoder, load_encoder, load_state_dict, save_random_checkpoint
from .decoder import Decoder, GumbelCodebook, Upsample, VQCodebook, VQGANDecoder
from .model import VQGANEncoder, preprocess
from .model_yaml import (
    AUTO_MODEL,
    ModelConfigError,
    architecture_differences,
    checkpoint_yaml,
    config_from_yaml,
    resolve_model_config,
)
from .modules import AttnBlock, Downsample, Encoder, Normalize, ResnetBlock, nonlinearity
from .quantizers import GumbelQuantizeHead, VectorQuantizeHead
from .registry import DEFAULT_MODEL, MODELS, VQGANConfig, get_model_config
from .safe_pickle import CheckpointError, ForeignObject
from .sampling import INDEX_RULES, check_index_rule, key_seed

__all__ = [
    "AUTO_MODEL",
    "DEFAULT_MODEL",
    "INDEX_RULES",
    "MODELS",
    "AttnBlock",
    "CheckpointError",
    "Decoder",
    "Downsample",
    "Encoder",
    "ForeignObject",
    "ModelConfigError",
    "has_random_weights",
    "GumbelCodebook",
    "GumbelQuantizeHead",
    "Normalize",
    "ResnetBlock",
    "Upsample",
    "VQCodebook",
    "VQGANConfig",
    "VQGANDecoder",
    "VQGANEncoder",
    "VectorQuantizeHead",
    "architecture_differences",
    "check_index_rule",
    "checkpoint_yaml",
    "config_from_yaml",
    "get_model_config",
    "key_seed",
    "load_decoder",
    "load_encoder",
    "load_state_dict",
    "nonlinearity",
    "preprocess",
    "resolve_model_config",
    "save_random_checkpoint",
]
