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
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict as _open_clip_load_state_dict
from open_clip.transformer import QuickGELU
from torch import nn

from ..errors import PixelrecError

OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")  # scalars in OpenAI's JIT state dicts


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
    try:
        if is_torchscript_archive(path):
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice: OpenAI's files are TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                state: Any = torch.jit.load(str(path), map_location="cpu").state_dict()
            openai = True
        else:
            state = _open_clip_load_state_dict(str(path))
            openai = isinstance(state, dict) and any(k in state for k in OPENAI_ONLY_KEYS)
    except Exception as exc:  # torch.load / torch.jit.load / safetensors raise many types on a bad file
        raise PixelrecError(f"{path}: cannot read checkpoint: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(state, dict) or not state:
        raise PixelrecError(f"{path}: not a state dict checkpoint")
    state = {k: v for k, v in state.items() if k not in OPENAI_ONLY_KEYS}
    return dict(state), openai


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
    fix = f"use --model {twin}" if twin else "use a model config with \"quick_gelu\": true"
    raise PixelrecError(
        f"{path} holds OpenAI CLIP weights, whose blocks use QuickGELU, but --model {model} builds GELU blocks "
        f"(another function); {fix}"
    )
