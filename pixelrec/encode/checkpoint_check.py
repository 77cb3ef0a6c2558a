"""Reading a local encoder checkpoint, and refusing OpenAI CLIP weights for a GELU tower.

OpenAI's CLIP ViTs (and the PixelRec reference, which loads OpenAI's ViT-B/32) use QuickGELU,
x * sigmoid(1.702 x), in their transformer blocks. open_clip names those models `*-quickgelu`;
plain `ViT-B-32` builds nn.GELU blocks. Both have the same parameter names, so OpenAI weights load
into a GELU tower without a complaint, and every block then computes another function (frozen
blocks cannot learn it back). `read_checkpoint` recognises OpenAI's layout and refuses it for a
tower with GELU blocks, naming the QuickGELU model to use instead. It refuses rather than switching
the activation silently: the model name is what caches and runs record, so it has to be the one
that describes the weights.

OpenAI's layout is recognised by what only OpenAI's files hold:
- a TorchScript archive (OpenAI distributes its CLIP checkpoints as JIT archives; open_clip never
  writes one), or
- a state dict with the scalar entries `input_resolution`, `context_length` and `vocab_size` that
  OpenAI's JIT models carry (e.g. `torch.save(torch.jit.load("ViT-B-32.pt").state_dict())`).
A state dict re-saved without those entries cannot be told from GELU-trained weights by its keys;
give the `-quickgelu` model for it yourself (`--preset pixelrec` does).

Nothing in a checkpoint runs: torch files are read with weights_only=True (tensors and plain data
only), safetensors hold only tensors, and a TorchScript archive is never handed to torch.jit.load
(which would run the archive's TorchScript, e.g. its `__setstate__` methods): its data.pkl is read
with an unpickler that only rebuilds tensors from the archive's storages, maps every module class
(`__torch__.*`) to a plain record of its attributes, and refuses any other global.
"""

from __future__ import annotations

import collections
import io
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import load_file as safetensors_load_file
from torch import nn

from ..errors import PixelrecError
from ..runtime import load_tensors

OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")  # scalars in OpenAI's JIT state dicts
_STATE_DICT_FIX = "save its state dict alone (torch.save(model.state_dict(), PATH)) and pass that"


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip written by torch.jit.save (it holds a `constants.pkl` or `code/` entry)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, is_openai_layout) of a checkpoint file: a TorchScript archive or anything
    open_clip's loader reads (torch.save state dicts, safetensors); OpenAI's scalar entries removed."""
    path = Path(path)
    if is_torchscript_archive(path):
        state: Any = torchscript_tensors(path)
        openai = True
    elif path.suffix == ".safetensors":
        try:
            state = safetensors_load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types on a bad file
            raise PixelrecError(f"{path}: cannot read checkpoint: {' '.join(str(exc).split())[:200]}") from None
        openai = any(k in state for k in OPENAI_ONLY_KEYS)
    else:
        state = load_tensors(path, "cpu", what="checkpoint", fix=_STATE_DICT_FIX)  # never unpickles code
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # as open_clip's loader reads
            state = state["state_dict"]
        openai = isinstance(state, dict) and any(k in state for k in OPENAI_ONLY_KEYS)
    if not isinstance(state, dict):
        raise PixelrecError(f"{path}: not a state dict checkpoint (a dict of tensors)")
    state = {k: v for k, v in state.items() if k not in OPENAI_ONLY_KEYS}
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise PixelrecError(f"{path}: not a state dict checkpoint (a dict of tensors)")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, openai


class _ScriptRecord:
    """A TorchScript module or object, as data: its attributes (set by pickle's BUILD), no methods."""


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl without running anything: tensors are rebuilt from the
    archive's storages, `__torch__.*` classes become _ScriptRecord, every other global is refused."""

    _HELPERS = {("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set}

    def __init__(self, archive: zipfile.ZipFile, prefix: str, raw: bytes):
        super().__init__(io.BytesIO(raw))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptRecord,), {})
        if (module, name) in self._HELPERS:
            return self._HELPERS[(module, name)]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch.jit._pickle" and (name == "restore_type_tag" or name.startswith("build_")):
            return _first_as_is  # typed-container tags and lists: the value itself
        if module == "torch" and name.endswith("Storage") and isinstance(getattr(torch, name, None), type):
            with warnings.catch_warnings():  # TypedStorage's deprecation notice
                warnings.simplefilter("ignore")
                return _StorageKind(getattr(torch, name).dtype)
        raise pickle.UnpicklingError(f"it references {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageKind)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:60]}")
        kind, key = pid[1], str(pid[2])
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
        return self.storages[key]


@dataclass(frozen=True)
class _StorageKind:
    dtype: torch.dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("a tensor without a storage")
    return storage.as_strided(tuple(size), tuple(stride), int(offset)).clone()


def _first_as_is(value: Any, *_: Any) -> Any:
    return value


def torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive's modules by dotted name (its parameters and buffers, the
    names its state_dict() has), read without torch.jit.load: nothing in the archive runs."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise pickle.UnpicklingError("no data.pkl at the archive's top level")
            prefix = pickles[0].split("/")[0]
            order = f"{prefix}/byteorder"
            if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
                raise pickle.UnpicklingError("big-endian tensors")
            root = _ArchiveUnpickler(archive, prefix, archive.read(pickles[0])).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, TypeError, RuntimeError, EOFError,
            AttributeError, IndexError) as exc:
        raise PixelrecError(f"{path}: cannot read this TorchScript archive ({' '.join(str(exc).split())[:160]}); "
                            f"pixelrec reads only its tensors and never runs its code") from None
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", state, set())
    return state


def _collect(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if not isinstance(obj, _ScriptRecord) or id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptRecord):
            _collect(value, f"{prefix}{name}.", out, seen)


def activation_of(visual: nn.Module) -> str | None:
    """'quickgelu' or 'gelu' for a tower whose blocks use that activation, None for one with neither
    (ModifiedResNet towers use ReLU: QuickGELU changes only their text tower)."""
    if any(isinstance(m, QuickGELU) for m in visual.modules()):
        return "quickgelu"
    if any(isinstance(m, nn.GELU) for m in visual.modules()):
        return "gelu"
    return None


def quickgelu_name(model: str) -> str | None:
    """open_clip's QuickGELU twin of `model` (ViT-B-32 -> ViT-B-32-quickgelu), if it has one."""
    name = f"{model}-quickgelu"
    return name if name in open_clip.list_models() else None


def check_openai_activation(path: str | Path, openai: bool, visual: nn.Module, model: str) -> None:
    """Refuse OpenAI CLIP weights (QuickGELU blocks) for a tower built with GELU blocks."""
    if not openai or activation_of(visual) != "gelu":
        return
    twin = quickgelu_name(model)
    fix = f"use --encoder {twin}" if twin else "use a model config with \"quick_gelu\": true"
    raise PixelrecError(
        f"{path} holds OpenAI CLIP weights, whose blocks use QuickGELU, but --encoder {model} builds GELU blocks "
        f"(another function); {fix}"
    )
