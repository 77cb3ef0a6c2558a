"""Sequence encoders (the user tower): item vectors of a history -> a state per position.

Every model takes left-padded input: x [B, L, d] item vectors and mask [B, L] (True = real item), so
the last position always holds the most recent item and `states[:, -1]` is the user vector (a model
whose class sets `reads_items`, SR-GNN, also gets the item indices [B, L] as a third argument). Models
with the ``causal`` objective (models/registry.py) make the state at position t depend only on items
at positions <= t, which lets one forward pass train every next-item prediction of a window at once;
``prefix`` models are trained on the last position of every prefix. Padding never changes a real
position's state.

The models live in `recommend.models` (one module each, declared in models/registry.py); this module
builds them and keeps the names other modules import.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

from torch import nn

from .config import DEFAULT_LAYERS, SequenceConfig
from .models.gru4rec import GRU4Rec
from .models.layers import POST_LN_EPS, Block, CausalSelfAttention, init_weights
from .models.registry import SHARED_DEFAULTS, model_spec
from .models.sasrec import SASRec

__all__ = ["Block", "CausalSelfAttention", "DEFAULT_LAYERS", "GRU4Rec", "POST_LN_EPS", "SASRec", "SequenceConfig",
           "build_sequence_encoder", "init_weights"]


def build_sequence_encoder(cfg: SequenceConfig, num_users: int = 0) -> nn.Module:
    """The nn.Module of `cfg.model` (its ModelSpec's factory), with the model's default layers and dropout
    rates where none are given;
    a model with a vector per training user (`ModelSpec.per_user`) is built with `num_users` of them."""
    spec = model_spec(cfg.model)
    if cfg.layers is None and "layers" in spec.reads:
        cfg = replace(cfg, layers=spec.defaults["model.layers"])
    for name in ("dropout", "attn_dropout"):  # shared settings some models default differently
        if getattr(cfg, name) is None:
            cfg = replace(cfg, **{name: spec.defaults.get(f"model.{name}", SHARED_DEFAULTS[f"model.{name}"])})
    module, _, name = spec.factory.partition(":")
    cls = getattr(importlib.import_module(f"{__package__}.models.{module}"), name)
    return cls(cfg, num_users) if spec.per_user else cls(cfg)
