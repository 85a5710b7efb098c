"""Reading a torch checkpoint without importing or running anything it names.

Released VQGAN checkpoints are PyTorch-Lightning ``.ckpt`` files: a ``torch.save``'d dict whose
``state_dict`` holds the weights, next to training state that pickles *references* to classes of
``pytorch_lightning`` (e.g. the ``ModelCheckpoint`` class used as a key of ``callbacks``) and
sometimes ``omegaconf`` objects in ``hyper_parameters``. Neither library is installed here, and a
plain ``pickle`` load would import -- and could execute -- whatever the file names.

:func:`load_weights_only` therefore uses ``torch.load(weights_only=True)`` and maps every global that
torch does not allow by default to an inert placeholder class (:class:`ForeignObject`):

Supported
    * class or function references anywhere in the file (dict keys, values, hyper-parameters);
    * objects of foreign classes rebuilt through ``REDUCE``/``NEWOBJ``/``BUILD`` (e.g. omegaconf
      containers, argparse namespaces, objects whose ``__reduce__`` names an arbitrary function):
      they become :class:`ForeignObject` instances that merely *record* their arguments/state;
      the named function or class is never imported, let alone called;
    * zip-format files (torch >= 1.6, what every released VQGAN uses) and legacy-format files.

Not supported (clear :class:`CheckpointError`)
    * globals from modules that torch refuses even when allowlisted (``os``, ``sys``, ``posix``,
      ``nt``) -- a weights file has no business naming them;
    * foreign *dict/list subclasses* filled by ``SETITEMS``/``APPENDS`` (torch only lets exact
      ``dict``/``list`` receive items) -- a checkpoint whose ``state_dict`` sits next to one cannot
      be read through the weights-only unpickler;
    * pickle protocols above 2 (``torch.save`` always writes protocol 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pickle import UnpicklingError
from typing import Any

import torch

__all__ = ["CheckpointError", "ForeignObject", "load_weights_only"]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_MAX_LEGACY_RETRIES = 256


class CheckpointError(ValueError):
    """The file is missing, not a torch checkpoint, unsafe to read, or does not fit the model."""


class ForeignObject:
    """Inert stand-in for a class/function a checkpoint names but we refuse to import.

    A subclass is made per qualified name (``foreign_name``). Calling the class, ``NEWOBJ`` and
    ``BUILD`` only store their inputs in ``args``/``state``; nothing else ever runs. Subclasses are
    hashable, so they work as the ``callbacks`` dict keys Lightning writes.
    """

    foreign_name = "?"
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<ForeignObject {self.foreign_name}>"


def _placeholder(qualified_name: str) -> type[ForeignObject]:
    return type(
        f"ForeignObject[{qualified_name}]",
        (ForeignObject,),
        {"foreign_name": qualified_name, "__module__": __name__},
    )


def _unsafe_globals_zip(path: str) -> list[str]:
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def _weights_only_load(path: str, names: list[str]) -> Any:
    """``torch.load(weights_only=True)`` with ``names`` mapped to fresh placeholders.

    ``safe_globals`` edits a process-wide allowlist for the duration of the load; a concurrent load
    in another thread may therefore also see these placeholders, which is harmless because they are
    inert. ``weights_only=True`` passed explicitly is not overridable by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
    """
    mapping: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [(_placeholder(n), n) for n in names]
    with torch.serialization.safe_globals(mapping):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_weights_only(path: str) -> Any:
    """The object ``torch.save`` wrote to the local file ``path``, every foreign global an inert placeholder."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZIP_MAGIC):
        try:
            names = _unsafe_globals_zip(path)
        except (ValueError, RuntimeError, UnpicklingError, KeyError, EOFError) as e:
            raise CheckpointError(f"{path}: zip file is not a torch.save checkpoint ({e})") from e
        return _weights_only_load(path, sorted(names))
    if not head.startswith(_PICKLE_PROTO):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (unrecognised header {head!r})")
    # Legacy (pre-zip) format: torch has no static scanner for it, so discover foreign globals one
    # at a time from the weights-only unpickler's refusal message. Nothing is executed meanwhile.
    names = []
    for _ in range(_MAX_LEGACY_RETRIES):
        try:
            return _weights_only_load(path, names)
        except UnpicklingError as e:
            match = _UNSUPPORTED_GLOBAL.search(str(e))
            if match is None:
                raise
            name = match.group(1)
            if "." not in name:  # torch strips the "builtins." prefix in its message
                name = f"builtins.{name}"
            if name in names:
                raise
            names.append(name)
    raise CheckpointError(f"{path}: more than {_MAX_LEGACY_RETRIES} foreign globals")
