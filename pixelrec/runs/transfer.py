"""`fit --init-from RUN_DIR`: start a run on a new dataset from a trained run (the paper's transfer).

The sequence encoder and the image tower (adapter, tuned top blocks or encoder, head) carry over;
an ID table cannot (its rows are another catalogue's items), so id embeddings are re-initialised
and the log says so. The new catalogue's item vectors come from its own covers.
"""

from __future__ import annotations

from ..errors import PixelrecError
from ..runtime import log
from ..recommend.config import FitConfig
from ..recommend.model import Recommender
from ..recommend.models.registry import model_spec
from .rundir import RunDir, run_cache_identity, strip_prefix

# Settings of the sequence encoder that must match for its weights to load.
ENCODER_KEYS = ("model", "dim", "layers", "heads", "inner_mult", "max_len", "gru_hidden", "positions", "dilations",
                "interests", "dssm_mlp")


def init_from_run(model: Recommender, cfg: FitConfig) -> dict[str, int]:
    """Load `cfg.init_from`'s sequence encoder and image tower into `model` (built from `cfg`)."""
    run_dir = cfg.init_from
    if model_spec(cfg.model.model).per_user:
        raise PixelrecError(f"--init-from carries a sequence encoder to new data, but --model {cfg.model.model} "
                            f"learns a vector per training user, which the new data's users do not have; drop "
                            f"--init-from")
    src = RunDir(run_dir)
    meta = src.read_config()
    src_cfg = src.fit_config(meta)
    src_cache, new_cache = meta.get("cache"), run_cache_identity(cfg)
    if src_cache and new_cache:
        differ = [k for k in src_cache if k != "dim" and src_cache[k] != new_cache.get(k)]
        if differ:
            k = differ[0]
            raise PixelrecError(f"--init-from {run_dir}: its tower was trained on a cache with {k} {src_cache[k]!r}, "
                                f"but {cfg.items.cache} has {k} {new_cache.get(k)!r}; encode the new covers with "
                                f"the same encoder settings")
    keys = [k for k in ENCODER_KEYS if k != "positions" or cfg.model.model == "sasrec"]  # GRU4Rec has none
    diffs = [f"{k}: {getattr(src_cfg.model, k)} vs {getattr(cfg.model, k)}" for k in keys
             if getattr(src_cfg.model, k) != getattr(cfg.model, k)]
    if diffs:
        raise PixelrecError(f"--init-from {run_dir}: the sequence model differs ({'; '.join(diffs)})")
    published = src.published()
    state = src.load_checkpoint(published.checkpoint, "cpu", published.checkpoint_sha256)["model"]

    encoder_state = strip_prefix(state, "encoder.")
    model.encoder.load_state_dict(encoder_state)

    tower_state = strip_prefix(state, "tower.")
    id_keys = [k for k in tower_state if _is_id_table(k)]
    for k in id_keys:
        del tower_state[k]
    own = {k: v for k, v in model.tower.state_dict().items() if not _is_id_table(k)}
    if tower_state and set(tower_state) != set(own):
        only_src, only_new = sorted(set(tower_state) - set(own)), sorted(set(own) - set(tower_state))
        raise PixelrecError(f"--init-from {run_dir}: the item towers differ ({src_cfg.items.kind} "
                            f"{'has ' + only_src[0] if only_src else 'lacks ' + only_new[0]} that this run's "
                            f"{cfg.items.kind} tower {'lacks' if only_src else 'has'}); use the same --items kind, "
                            f"head and split block")
    shared = {k: v for k, v in tower_state.items() if k in own}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in shared.items() if v.shape != own[k].shape]
    if wrong:
        raise PixelrecError(f"--init-from {run_dir}: the image tower does not fit (e.g. {wrong[0]}); "
                            f"use the same encoder, cache settings and --dim as the source run")
    model.tower.load_state_dict(shared, strict=False)
    log(f"initialised from {run_dir}: sequence encoder ({len(encoder_state)} tensors) and item tower "
        f"({len(shared)} tensors)" + ("; id embeddings re-initialised: an ID table cannot transfer to a new catalogue"
                                       if id_keys or src_cfg.items.kind == "id" else ""))
    return {"encoder_tensors": len(encoder_state), "tower_tensors": len(shared), "id_tables_skipped": len(id_keys)}


def _is_id_table(key: str) -> bool:
    return key == "embedding.weight" or key.startswith("ids.")
