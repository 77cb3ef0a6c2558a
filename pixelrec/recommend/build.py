"""Build the Recommender a FitConfig describes, and its optimiser (parameter groups)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.sequences import SequenceData
from ..errors import PixelrecError
from .batches import window_bounds
from .config import MIN_NEGATIVES, FitConfig
from .models.registry import model_spec
from .image_towers import build_image_tower
from .losses import SoftmaxPlan, device_kind, plan_softmax, sequence_macs
from .model import Recommender
from .sequence import build_sequence_encoder
from .towers import IdTower, ItemTower


def build_tower(cfg: FitConfig, data: SequenceData) -> ItemTower:
    kind = cfg.items.kind
    if cfg.model.model == "vbpr":  # its own tower: id factors + a linear projection of the cached embedding
        from .models.vbpr import build_vbpr_tower

        return build_vbpr_tower(cfg, data)
    if kind == "id":
        return IdTower(data.num_items, cfg.model.dim)
    return build_image_tower(cfg, data)


def build_recommender(cfg: FitConfig, data: SequenceData, device: object = "cpu") -> Recommender:
    """The model `cfg` describes; resolves `cfg.loss` (full or sampled softmax, the negatives) first,
    for training on `device` (the cost rule's constants depend on it). `model.softmax_choice` holds
    what config.json records about the choice (`softmax_choice`; None for bpr)."""
    counts = torch.from_numpy(data.train_counts.astype("float64"))
    popularity = counts / counts.sum().clamp(min=1)
    tower = build_tower(cfg, data)
    asked = (cfg.loss.softmax, cfg.loss.negatives)
    plan = resolve_softmax(cfg, data, tower, device)
    encoder = build_sequence_encoder(cfg.model, data.num_users)
    if cfg.model.model == "acf":  # every item's cached tokens (its component-level attention)
        from .models.acf import attach_acf_tokens

        attach_acf_tokens(encoder, cfg, data)
    model = Recommender(
        tower=tower,
        encoder=encoder,
        max_len=cfg.model.max_len,
        loss=cfg.loss,
        popularity=popularity,
    )
    model.softmax_choice = softmax_choice(cfg, plan, tower, *asked)
    return model


def resolve_softmax(cfg: FitConfig, data: SequenceData, tower: ItemTower, device: object = "cpu"
                    ) -> SoftmaxPlan | None:
    """Settle `cfg.loss.softmax` to full or sampled and, for sampled, `cfg.loss.negatives` to the count
    used, so that config.json records what trained. Returns the cost rule's plan (None for bpr).

    --softmax auto (the default) follows `plan_softmax`: sampled only where the modelled step is at
    least 3x cheaper with 4,096 or more negatives, at most a quarter of the catalogue; else full.
    Towers that are not cheap (image blocks run per item) always sample; --negatives N means sampled
    with N; --softmax full|sampled is kept as given.
    """
    loss = cfg.loss
    if loss.loss != "softmax":
        return None
    if loss.softmax == "full" and not tower.cheap:
        raise PixelrecError(f"--softmax full needs every item's vector at every step, which --items "
                            f"{cfg.items.kind} cannot afford (it runs image blocks per item); use --softmax "
                            f"sampled or auto")
    plan = softmax_plan(cfg, data, tower, device)
    if loss.softmax == "auto":
        loss.softmax = "full" if plan.full and tower.cheap and not loss.negatives else "sampled"
    if loss.softmax == "sampled" and not loss.negatives:
        loss.negatives = plan.negatives if tower.cheap and not plan.full else min(MIN_NEGATIVES, plan_items(cfg, data))
    return plan


def softmax_choice(cfg: FitConfig, plan: SoftmaxPlan | None, tower: ItemTower, asked_softmax: str,
                   asked_negatives: int) -> dict | None:
    """config.json's "softmax" object: the rule's modelled costs and choice (`SoftmaxPlan.record`), what
    trained, and what decided it (the rule, an option, or a tower that runs image blocks per item)."""
    if plan is None:
        return None
    if asked_negatives:
        decided = f"--negatives {asked_negatives}"
    elif asked_softmax != "auto":
        decided = f"--softmax {asked_softmax}"
    elif not tower.cheap:
        decided = f"--items {cfg.items.kind} (image blocks per item: always sampled)"
    else:
        decided = "auto"
    return {**plan.record(), "softmax": cfg.loss.softmax, "negatives": cfg.loss.negatives, "decided_by": decided}


def softmax_plan(cfg: FitConfig, data: SequenceData, tower: ItemTower, device: object = "cpu") -> SoftmaxPlan:
    """The cost rule's plan for this configuration and data on `device` (see `losses.plan_softmax`)."""
    m = cfg.model
    batch = cfg.train.batch_size
    other = sequence_macs(m, batch * m.max_len)
    item = 3.0 * _dense_weights(tower)
    positions = batch * mean_trained_per_window(cfg, data)
    return plan_softmax(plan_items(cfg, data), positions, m.dim, other, item, cfg.loss.full_softmax_max_share,
                        batch_items=expected_distinct(data.train_counts[1:], positions), device=device_kind(device))


def expected_distinct(counts: np.ndarray, draws: float) -> float:
    """Expected distinct items among `draws` targets drawn in proportion to `counts` (a step's targets)."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float((-np.expm1(draws * np.log1p(-np.minimum(p, 1 - 1e-12)))).sum())


def plan_items(cfg: FitConfig, data: SequenceData) -> int:
    """Candidates of the full softmax: items with training interactions (every item with --negatives-from all)."""
    if getattr(cfg.loss, "negatives_from", "train") == "all":
        return int(data.num_items)
    return int((data.train_counts[1:] > 0).sum())


def mean_trained_per_window(cfg: FitConfig, data: SequenceData) -> float:
    """Trained positions per training window (so per step: batch size x this), from the train lengths."""
    lengths, users = np.unique(np.maximum(data.lengths - 2, 0), return_counts=True)
    keep_single = getattr(cfg.loss, "mean_over", "positions") == "sequences"
    windows = trained = 0
    for length, count in zip(lengths.tolist(), users.tolist()):
        bounds = window_bounds(length, cfg.model.max_len, cfg.train.windows or "sliding",
                               cfg.train.stride or cfg.model.max_len, keep_single)
        windows += count * len(bounds)
        trained += count * sum(_targets_of_window(cfg, k) for _, _, k in bounds)
    return trained / max(windows, 1)


def _targets_of_window(cfg: FitConfig, trained: int) -> float:
    """Trained positions of a window training `trained` next-item targets; under the cloze objective
    (BERT4Rec) the expected hidden slots of its trained + 1 items (`batches.cloze_masks`), under the
    context one (FM / DSSM --context window) all of them."""
    spec = model_spec(cfg.model.model)
    if trained and "context" in spec.reads and cfg.model.context == "window":
        return trained + 1
    if trained == 0 or spec.objective != "cloze":
        return trained
    m = cfg.model
    return m.mask_last + (1 - m.mask_last) * max(1.0, m.mask_ratio * (trained + 1))


def _dense_weights(tower: ItemTower) -> int:
    """Multiply-adds of the tower's forward per item, roughly: its dense weights (matrices other than
    per-item tables), 0 for an embedding lookup."""
    per_item_rows = {tower.num_items + 1, tower.num_items}
    return sum(p.numel() for p in tower.parameters() if p.ndim == 2 and p.shape[0] not in per_item_rows)


def build_optimizer(model: Recommender, cfg: FitConfig) -> torch.optim.Optimizer:
    """AdamW with separate parameter groups (`cfg.train.decay_groups`):

    - ``standard``: image-encoder blocks (encoder lr / wd) and everything else, where biases,
      LayerNorm weights, embeddings and position biases of the recommender get no weight decay;
    - ``pixelrec`` (the PixelRec code's optimizer: parameters named `visual_encoder`, its ViT blocks
      and its `rec_fc` head, at the modal lr / wd, every other parameter at the recommender's lr / wd):
      the whole image tower (trainable encoder blocks and the head or adapter that maps them to d)
      at the encoder lr / wd, and every other parameter at lr / weight decay, LayerNorms, biases,
      position and id embeddings included.
    """
    t = cfg.train
    if t.decay_groups == "pixelrec":
        image = {id(p) for p in _image_tower_parameters(model)}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        param_groups = [
            {"params": [p for _, p in named if id(p) not in image], "lr": t.lr, "weight_decay": t.weight_decay,
             "name": "recommender"},
            {"params": [p for _, p in named if id(p) in image], "lr": t.encoder_lr,
             "weight_decay": t.encoder_weight_decay, "name": "image_tower"},
        ]
        return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=t.lr)
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


def _image_tower_parameters(model: Recommender) -> list[nn.Parameter]:
    """The image part of the item tower: all of an image tower (blocks, head, adapter), the image
    branch of a hybrid tower, nothing for an id tower."""
    tower = model.tower
    if isinstance(tower, IdTower):
        return []
    image = getattr(tower, "image", None)  # HybridTower: its id embeddings, gate and maps stay with the recommender
    return list((image if isinstance(image, nn.Module) else tower).parameters())


def _encoder_parameters(model: Recommender) -> list[nn.Parameter]:
    """Parameters of pretrained image-encoder blocks inside the item tower (none for id)."""
    get = getattr(model.tower, "encoder_parameters", None)
    return list(get()) if get else []
