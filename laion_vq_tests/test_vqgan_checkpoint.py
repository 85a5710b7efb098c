"""Checkpoint loading: Lightning layout, strict shape checks, and no code execution from pickles."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from laion_vq.vqgan import (
    CheckpointError,
    ForeignObject,
    VQGANEncoder,
    get_model_config,
    load_encoder,
    load_state_dict,
    save_random_checkpoint,
)
from laion_vq.vqgan.checkpoint import RANDOM_WEIGHTS_NOTE

TINY = get_model_config("vqgan_gumbel_f8_tiny")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_random_checkpoint(TINY, str(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"), seed=7)


@contextmanager
def _fake_modules(members: dict[str, dict[str, object]]) -> Iterator[None]:
    """Register throw-away modules (and their parent packages) in sys.modules, only while saving."""
    names = set()
    for module in members:
        parts = module.split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    assert not names & set(sys.modules), "fake module names must not shadow real ones"
    for name in sorted(names):
        sys.modules[name] = types.ModuleType(name)
    try:
        for module, attrs in members.items():
            for attr, obj in attrs.items():
                obj.__module__ = module
                obj.__qualname__ = attr
                setattr(sys.modules[module], attr, obj)
        yield
    finally:
        for name in names:
            del sys.modules[name]


def test_random_checkpoint_has_real_layout_and_note(tiny_ckpt: str) -> None:
    raw = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    assert raw["laion_vq_note"] == RANDOM_WEIGHTS_NOTE
    assert raw["pytorch-lightning_version"] == "1.0.8"
    assert {"epoch", "global_step", "callbacks", "state_dict"} <= set(raw)
    keys = set(raw["state_dict"])
    assert {"post_quant_conv.weight", "loss.logvar", "loss.discriminator.main.0.weight"} <= keys
    assert any(k.startswith("decoder.") for k in keys)
    assert not [p for p in os.listdir(os.path.dirname(tiny_ckpt)) if p.startswith(".tmp-")]


def test_random_checkpoint_loads_and_ignores_decoder_and_loss(tiny_ckpt: str) -> None:
    model = load_encoder(TINY, tiny_ckpt)
    assert not model.training
    state = load_state_dict(tiny_ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # seeded: the same seed gives the same weights as a freshly seeded model
    torch.manual_seed(7)
    fresh = VQGANEncoder(TINY)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_save_is_deterministic_per_seed(tmp_path: Path, tiny_ckpt: str) -> None:
    again = load_state_dict(save_random_checkpoint(TINY, str(tmp_path / "a.ckpt"), seed=7))
    other = load_state_dict(save_random_checkpoint(TINY, str(tmp_path / "b.ckpt"), seed=8))
    first = load_state_dict(tiny_ckpt)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["encoder.conv_in.weight"], other["encoder.conv_in.weight"])


def test_bare_state_dict_loads(tmp_path: Path, tiny_ckpt: str) -> None:
    bare = {k: v for k, v in load_state_dict(tiny_ckpt).items() if not k.startswith("loss.")}
    torch.save(bare, tmp_path / "bare.pt")
    model = load_encoder(TINY, str(tmp_path / "bare.pt"))
    assert torch.equal(model.quantize.proj.weight, bare["quantize.proj.weight"])


def test_missing_key_is_named(tmp_path: Path, tiny_ckpt: str) -> None:
    state = load_state_dict(tiny_ckpt)
    del state["encoder.mid.attn_1.q.weight"]
    torch.save({"state_dict": state}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"1 missing keys: encoder\.mid\.attn_1\.q\.weight"):
        load_encoder(TINY, str(tmp_path / "missing.ckpt"))


def test_tiny_checkpoint_as_full_model_fails_clearly(tiny_ckpt: str) -> None:
    with pytest.raises(CheckpointError, match=r"does not fit model 'vqgan_gumbel_f8'.*shape mismatches"):
        load_encoder(get_model_config("vqgan_gumbel_f8"), tiny_ckpt)


def test_f16_checkpoint_as_f8_fails_clearly(tmp_path: Path) -> None:
    path = save_random_checkpoint(get_model_config("vqgan_imagenet_f16_1024"), str(tmp_path / "f16.ckpt"))
    with pytest.raises(CheckpointError) as info:
        load_encoder(get_model_config("vqgan_gumbel_f8"), path)
    msg = str(info.value)
    assert "checkpoint looks like f16, vq quantizer with 1024 codes" in msg
    assert "model is f8, gumbel quantizer with 8192 codes" in msg
    assert "missing keys" in msg
    assert "shape mismatches" in msg and "more)" in msg
    assert "41 unexpected keys" in msg


def test_unexpected_quantizer_key_is_rejected(tmp_path: Path, tiny_ckpt: str) -> None:
    """A remap table would silently change what the codes mean, so it must not be ignored."""
    state = load_state_dict(tiny_ckpt)
    state["quantize.used"] = torch.arange(10)
    torch.save({"state_dict": state}, tmp_path / "remap.ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: quantize\.used"):
        load_encoder(TINY, str(tmp_path / "remap.ckpt"))


def test_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_state_dict(str(junk))
    pickle_like = tmp_path / "pickle_like.ckpt"
    pickle_like.write_bytes(b"\x80\x02" + np.random.default_rng(1).bytes(512))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state_dict(str(pickle_like))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict(str(tmp_path / "nope.ckpt"))


def test_no_state_dict_and_no_tensors(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "global_step": 5}, tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_state_dict(str(tmp_path / "empty.ckpt"))


def test_fsspec_url(tiny_ckpt: str) -> None:
    fs = fsspec.filesystem("memory")
    with open(tiny_ckpt, "rb") as f:
        fs.pipe("/laion_vq_test/tiny.ckpt", f.read())
    try:
        model = load_encoder(TINY, "memory://laion_vq_test/tiny.ckpt")
        assert torch.equal(model.encoder.conv_in.weight, load_state_dict(tiny_ckpt)["encoder.conv_in.weight"])
        save_random_checkpoint(TINY, "memory://laion_vq_test/saved.ckpt", seed=7)
        assert load_state_dict("memory://laion_vq_test/saved.ckpt").keys() == load_state_dict(tiny_ckpt).keys()
        with pytest.raises(FileNotFoundError):
            load_state_dict("memory://laion_vq_test/absent.ckpt")
    finally:
        fs.rm("/laion_vq_test", recursive=True)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_foreign_globals_load_without_running_code(tmp_path: Path, tiny_ckpt: str, zip_format: bool) -> None:
    """A Lightning-like checkpoint naming classes/functions of modules that are not installed.

    (a) ``callbacks`` keyed by ``pytorch_lightning...ModelCheckpoint`` (a class object),
    (b) an object whose ``__reduce__`` would call a function that creates a marker file,
    (c) an omegaconf-like object in ``hyper_parameters`` (NEWOBJ + BUILD).
    Loading must return the tensors and never run (b).
    """
    marker = tmp_path / "side_effect_ran"

    class ModelCheckpoint:  # stands in for pytorch_lightning's class
        pass

    def make_marker(path: str) -> str:
        Path(path).write_text("side effect")
        return path

    class DictConfig:  # stands in for omegaconf's class
        def __init__(self) -> None:
            self._content = {"n_embed": 8192, "cb": ModelCheckpoint}

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (make_marker, (str(marker),))

    state = load_state_dict(tiny_ckpt)
    path = tmp_path / "foreign.ckpt"
    with _fake_modules(
        {
            "pytorch_lightning.callbacks.model_checkpoint": {"ModelCheckpoint": ModelCheckpoint},
            "laion_vq_fake_payload": {"make_marker": make_marker},
            "omegaconf.dictconfig": {"DictConfig": DictConfig},
        }
    ):
        ckpt = {
            "epoch": 1,
            "global_step": 2,
            "pytorch-lightning_version": "1.0.8",
            "state_dict": state,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
            "hyper_parameters": DictConfig(),
            "payload": Payload(),
            "optimizer_states": [],
            "lr_schedulers": [],
        }
        torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    assert "pytorch_lightning" not in sys.modules and "laion_vq_fake_payload" not in sys.modules
    assert not marker.exists()

    if zip_format:  # torch itself refuses the file with weights_only=True...
        with pytest.raises(Exception, match="pytorch_lightning"):
            torch.load(path, weights_only=True)

    PLACED = {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "laion_vq_fake_payload.make_marker",
        "omegaconf.dictconfig.DictConfig",
    }
    loaded = load_state_dict(str(path))  # ...and we read it, without executing anything
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not marker.exists()
    assert "pytorch_lightning" not in sys.modules
    # placeholders were only allowlisted for the duration of the load
    assert not [g for g in torch.serialization.get_safe_globals() if isinstance(g, tuple) and g[1] in PLACED]
    load_encoder(TINY, str(path))


def test_placeholders_only_record() -> None:
    from laion_vq.vqgan.safe_pickle import _placeholder

    cls = _placeholder("some.module.func")
    obj = cls(1, "two")
    obj.__setstate__({"k": 3})
    assert isinstance(obj, ForeignObject)
    assert (obj.args, obj.state) == ((1, "two"), {"k": 3})
    assert "some.module.func" in repr(obj)
    assert not callable(obj)


def test_blocked_module_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "os_system_ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="blocked"):
        load_state_dict(str(tmp_path / "evil.ckpt"))
    assert not marker.exists()
