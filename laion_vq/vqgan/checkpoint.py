"""Loading (and, for tests/demos, writing) taming-transformers VQGAN checkpoints.

The weights are read through :mod:`laion_vq.vqgan.safe_pickle` (nothing the file names is imported or run);
this module maps them onto the models: the VQ model's keys (also under ldm's ``first_stage_model.``), a strict
fit with errors that say what does not fit, and checkpoints of seeded random weights marked as such.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pickle import UnpicklingError
from typing import Any, TypeVar

import torch
from torch import nn

from .decoder import VQGANDecoder
from .model import VQGANEncoder
from .quantizers import GumbelQuantizeHead
from .registry import VQGANConfig
from .safe_pickle import CheckpointError, load_weights_only

__all__ = [
    "CheckpointError",
    "has_random_weights",
    "load_decoder",
    "load_encoder",
    "load_state_dict",
    "save_random_checkpoint",
]

ENCODER_PREFIXES = ("encoder.", "quant_conv.", "quantize.")
DECODER_PREFIXES = ("quantize.", "post_quant_conv.", "decoder.")
# The Gumbel logits head: the encoder's part of ``quantize.``, which decoding never uses.
_ENCODER_ONLY_PREFIXES = ("quantize.proj.",)
# Where a latent-diffusion ``LatentDiffusion`` (or taming ``Net2NetTransformer``) checkpoint keeps its VQ model.
FIRST_STAGE_PREFIX = "first_stage_model."
RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS — not a trained model; made by laion_vq for tests/demo"

_SHOW = 5


@contextmanager
def _local_copy(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a local filesystem path for ``path``; remote fsspec URLs are copied to a temp file."""
    path = os.fspath(path)
    if "://" not in path or path.startswith("file://"):
        local = path.removeprefix("file://")
        if not os.path.isfile(local):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        yield local
        return
    from laion_vq.shards.storage import filesystem  # every S3 client gets the platform's retries and timeouts

    fs, fs_path = filesystem(path)
    if not fs.isfile(fs_path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    fd, tmp = tempfile.mkstemp(suffix=".ckpt", prefix="laion_vq_ckpt_")
    try:
        with os.fdopen(fd, "wb") as dst, fs.open(fs_path, "rb") as src:
            shutil.copyfileobj(src, dst, length=16 << 20)
        yield tmp
    finally:
        os.unlink(tmp)


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        sd = obj["state_dict"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        what = f"dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: no 'state_dict' entry and not a dict of tensors (got {what})")
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: 'state_dict' contains no tensors")
    return tensors


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Weights of a Lightning ``.ckpt`` (its ``state_dict``) or of a bare state dict, on CPU.

    ``path`` is a local path or any fsspec URL (``s3://...``, ``memory://...``). Never imports or
    calls code named in the file; :mod:`laion_vq.vqgan.safe_pickle` says exactly what can be read.
    """
    with _local_copy(path) as local:
        try:
            obj = load_weights_only(local)
        except CheckpointError:
            raise
        except (UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{os.fspath(path)}: cannot be read as a weights-only checkpoint: {e}") from e
    return _extract_state_dict(obj, os.fspath(path))


def has_random_weights(path: str | os.PathLike[str]) -> bool:
    """True for a checkpoint written by :func:`save_random_checkpoint` (its top-level note says so): codes
    made with it are noise, and the pages that show them must say so."""
    with _local_copy(path) as local:
        obj = load_weights_only(local)
    return isinstance(obj, dict) and obj.get("laion_vq_note") == RANDOM_WEIGHTS_NOTE


def _summarise(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    """What architecture a checkpoint's keys suggest, to make mismatch errors actionable."""
    parts = []
    for prefix in ("encoder.down.", "decoder.up."):
        levels = {int(k.split(".")[2]) for k in state if k.startswith(prefix) and k.split(".")[2].isdigit()}
        if levels:
            parts.append(f"f{2 ** max(levels)}")
            break
    else:
        parts.append("no encoder.down.* or decoder.up.* keys")
    if "quantize.proj.weight" in state:
        parts.append(f"gumbel quantizer with {state['quantize.proj.weight'].shape[0]} codes")
    elif "quantize.embed.weight" in state:
        parts.append(f"gumbel quantizer with {state['quantize.embed.weight'].shape[0]} codes")
    elif "quantize.embedding.weight" in state:
        parts.append(f"vq quantizer with {state['quantize.embedding.weight'].shape[0]} codes")
    else:
        parts.append("no known quantizer keys")
    return ", ".join(parts)


def _first_stage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VQ model's own keys: ``state`` itself, or, for a checkpoint of a model built *on* a VQ model
    (ldm ``LatentDiffusion``, taming ``Net2NetTransformer``) with no top-level ``encoder.``/``decoder.``
    keys, its ``first_stage_model.*`` keys without that prefix."""
    if any(k.startswith(("encoder.", "decoder.")) for k in state):
        return state
    nested = {k[len(FIRST_STAGE_PREFIX) :]: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
    return nested or state


_M = TypeVar("_M", bound=nn.Module)


def _load_part(
    build: Callable[[VQGANConfig], _M],
    part: str,
    config: VQGANConfig,
    checkpoint_path: str | os.PathLike[str],
    device: str | torch.device,
    prefixes: tuple[str, ...],
    ignored: tuple[str, ...] = (),
) -> _M:
    """Build ``build(config)`` and fill it strictly from the checkpoint keys under ``prefixes``.

    Keys under ``prefixes`` but also under ``ignored`` are skipped. Every model key must be present
    with the right shape and no other key under ``prefixes`` may be left over; otherwise a
    :class:`CheckpointError` says what does not fit. Returns the model in eval mode on ``device``,
    with gradients off.
    """
    state = _first_stage(load_state_dict(checkpoint_path))
    relevant = {k: v for k, v in state.items() if k.startswith(prefixes) and not k.startswith(ignored)}
    # Built on the meta device: no time wasted on a random init that the strict load overwrites.
    with torch.device("meta"):
        model = build(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in relevant]
    mismatched = [
        f"{k}: checkpoint {tuple(relevant[k].shape)} vs model {shape}"
        for k, shape in expected.items()
        if k in relevant and tuple(relevant[k].shape) != shape
    ]
    unexpected = [k for k in relevant if k not in expected]
    if missing or mismatched or unexpected:
        problems = [
            f"no {prefix}* keys at all"
            for prefix in prefixes
            if any(k.startswith(prefix) for k in expected) and not any(k.startswith(prefix) for k in relevant)
        ]
        if missing:
            problems.append(f"{len(missing)} missing keys: {_summarise(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {_summarise(mismatched)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
        raise CheckpointError(
            f"checkpoint {os.fspath(checkpoint_path)} does not fit model {config.name!r} "
            f"(loading its {part}; checkpoint looks like {_describe(state)}; model is f{config.downsample_factor}, "
            f"{config.quantizer} quantizer with {config.n_embed} codes): " + "; ".join(problems)
        )
    model.to_empty(device="cpu")
    model.load_state_dict(relevant, strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()


def load_encoder(
    config: VQGANConfig,
    checkpoint_path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
) -> VQGANEncoder:
    """Build the encoder for ``config`` and fill it from a checkpoint, in eval mode on ``device``.

    Decoder, ``post_quant_conv``, loss/discriminator and EMA (ldm's ``model_ema.*``) weights are ignored;
    a checkpoint that holds the VQ model under ``first_stage_model.`` (an ldm ``LatentDiffusion`` or taming
    ``Net2NetTransformer`` checkpoint) is read from there. Every encoder key must
    be present with the right shape, and no unknown ``encoder.``/``quant_conv.``/``quantize.`` key
    may be left over (e.g. a ``quantize.used`` remap table, which would change what codes mean);
    otherwise a :class:`CheckpointError` lists what does not fit.
    """
    return _load_part(VQGANEncoder, "encoder", config, checkpoint_path, device, ENCODER_PREFIXES)


def load_decoder(
    config: VQGANConfig,
    checkpoint_path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
) -> VQGANDecoder:
    """Build the decoder for ``config`` and fill it from a checkpoint, in eval mode on ``device``.

    Reads the codebook (``quantize.embed.weight`` for Gumbel models, ``quantize.embedding.weight``
    for VQ models), ``post_quant_conv.*`` and ``decoder.*``; encoder, ``quant_conv``, the Gumbel
    logits head ``quantize.proj.*`` and loss/discriminator weights are ignored. The checks are
    :func:`load_encoder`'s: every decoder key present with the right shape, no unknown
    ``quantize.``/``post_quant_conv.``/``decoder.`` key left over (e.g. a ``quantize.used`` remap
    table), else a :class:`CheckpointError` listing what does not fit.
    """
    return _load_part(
        VQGANDecoder, "decoder", config, checkpoint_path, device, DECODER_PREFIXES, ignored=_ENCODER_ONLY_PREFIXES
    )


def _loss_keys(config: VQGANConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A few loss/discriminator tensors a real VQGAN checkpoint has, which loading must ignore."""
    shapes: dict[str, tuple[int, ...]] = {
        "loss.logvar": (),
        "loss.discriminator.main.0.weight": (64, config.in_channels, 4, 4),
        "loss.discriminator.main.0.bias": (64,),
    }
    return {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}


def save_random_checkpoint(config: VQGANConfig, path: str | os.PathLike[str], seed: int = 0) -> str:
    """Write a Lightning-format checkpoint with seeded *random* weights for ``config``; return ``path``.

    The file has the real layout (``state_dict`` with the full encoder, ``quant_conv``, quantizer,
    ``post_quant_conv`` and decoder, plus a few loss keys; ``epoch``, ``global_step``,
    ``pytorch-lightning_version``, ``callbacks``) and a top-level ``laion_vq_note`` saying the weights
    are random, so both :func:`load_encoder` and :func:`load_decoder` accept it. The encoder is
    ``torch.manual_seed(seed); VQGANEncoder(config)``, the decoder ``torch.manual_seed(seed);
    VQGANDecoder(config)`` with the encoder's codebook (one codebook, as in a trained model); the
    caller's global RNG state is left as it was. Local paths are written atomically (temp file +
    ``os.replace``); fsspec URLs are uploaded from a local temp file.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = VQGANEncoder(config)
        torch.manual_seed(seed)
        decoder = VQGANDecoder(config)
    quantize = encoder.quantize  # a GumbelQuantizeHead exactly when config.quantizer == "gumbel"
    codebook = quantize.embed if isinstance(quantize, GumbelQuantizeHead) else quantize.embedding
    with torch.no_grad():
        decoder.quantize.weight.copy_(codebook.weight)
    state_dict: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    state_dict.update({k: v.detach().clone() for k, v in decoder.state_dict().items()})
    state_dict.update(_loss_keys(config, torch.Generator().manual_seed(seed + 1)))
    ckpt = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state_dict,
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "laion_vq_note": RANDOM_WEIGHTS_NOTE,
    }
    target = os.fspath(path)
    remote = "://" in target and not target.startswith("file://")
    local_target = target.removeprefix("file://")
    directory = tempfile.gettempdir() if remote else (os.path.dirname(os.path.abspath(local_target)) or ".")
    if not remote:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".ckpt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        if remote:
            from laion_vq.shards.storage import filesystem

            fs, fs_path = filesystem(target)
            fs.put_file(tmp, fs_path)
            os.unlink(tmp)
        else:
            os.replace(tmp, local_target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
