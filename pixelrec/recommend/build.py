"""Build the Recommender a FitConfig describes, and its optimiser (parameter groups)."""

from __future__ import annotations

import torch
from torch import nn

from ..data.sequences import SequenceData
from .config import FitConfig
from .image_towers import build_image_tower
from .model import Recommender
from .sequence import build_sequence_encoder
from .towers import IdTower, ItemTower


def build_tower(cfg: FitConfig, data: SequenceData) -> ItemTower:
    kind = cfg.items.kind
    if kind == "id":
        return IdTower(data.num_items, cfg.model.dim)
    return build_image_tower(cfg, data)


def build_recommender(cfg: FitConfig, data: SequenceData) -> Recommender:
    counts = torch.from_numpy(data.train_counts.astype("float64"))
    popularity = counts / counts.sum().clamp(min=1)
    return Recommender(
        tower=build_tower(cfg, data),
        encoder=build_sequence_encoder(cfg.model),
        max_len=cfg.model.max_len,
        loss=cfg.loss,
        popularity=popularity,
    )


def build_optimizer(model: Recommender, cfg: FitConfig) -> torch.optim.Optimizer:
    """AdamW with separate groups: image-encoder blocks (encoder lr / wd) and everything else.

    Biases, LayerNorm weights, embeddings and position biases of the recommender get no weight decay.
    """
    t = cfg.train
    encoder_params = {id(p) for p in _encoder_parameters(model)}
    groups: dict[str, list[nn.Parameter]] = {"encoder": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in encoder_params:
            groups["encoder"].append(p)
        elif p.ndim < 2 or "embedding" in name or name.endswith(("pos.weight", "rel_bias")):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    param_groups = [
        {"params": groups["decay"], "lr": t.lr, "weight_decay": t.weight_decay, "name": "decay"},
        {"params": groups["no_decay"], "lr": t.lr, "weight_decay": 0.0, "name": "no_decay"},
        {"params": groups["encoder"], "lr": t.encoder_lr, "weight_decay": t.encoder_weight_decay, "name": "encoder"},
    ]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=t.lr)


def _encoder_parameters(model: Recommender) -> list[nn.Parameter]:
    """Parameters of pretrained image-encoder blocks inside the item tower (none for id)."""
    get = getattr(model.tower, "encoder_parameters", None)
    return list(get()) if get else []
