"""`fit --preset pixelrec` checks its image inputs: the reference's function needs a matching cache.

The preset reproduces the PixelRec code's PixelNet, whose item vector is computed from covers
squashed to 224x224 with mean = std = 0.5, through OpenAI's ViT-B/32 (QuickGELU blocks), on the
last hidden state of all tokens. `partial` and `frozen` read that function's activations from a
cache, so a cache encoded with other settings would silently train another model. This module
refuses such a cache, naming every setting that differs and the `encode` command that makes a
matching one, and warns (one line) when the weights are random.

What is checked, per tower:
- preprocessing (the cache's `preset`) pixelrec, pooling mean, QuickGELU blocks for a ViT tower,
  float32 values (fp32 end to end), fp32 arithmetic where the cache records it: frozen and partial;
- the split block: partial only, where it must equal the blocks the run tunes (`--tune-blocks`,
  2 in the preset); a frozen tower reads only the pooled embeddings, which the split does not change.
"""

from __future__ import annotations

import json
from typing import Any

from ..encode.cache import read_cache_attrs
from ..errors import PixelrecError
from ..runtime import log
from .config import FitConfig

RANDOM_WEIGHTS_WARNING = ("warning: --preset pixelrec with random encoder weights (--pretrained none): "
                          "not the paper's model (give OpenAI's ViT-B-32.pt)")


def check_preset_inputs(cfg: FitConfig) -> None:
    """Refuse (PixelrecError) a cache that does not hold the preset's function; warn on random weights."""
    if cfg.preset != "pixelrec":
        return
    items = cfg.items
    kind = items.image_branch if items.kind == "hybrid" else items.kind
    if kind == "e2e":
        if items.pretrained in ("", "none"):
            log(RANDOM_WEIGHTS_WARNING)
        return
    if kind not in ("frozen", "partial") or not items.cache:
        return
    attrs = read_cache_attrs(items.cache)
    differ = preset_cache_differences(attrs, kind, items.tune_blocks, items.head)
    if differ:
        raise PixelrecError(
            f"--preset pixelrec needs a cache encoded with the reference's settings; {items.cache} has "
            f"{'; '.join(differ)}; make one with: {encode_command(attrs, items.tune_blocks)}")
    if str(attrs.get("pretrained", "none")) in ("", "none"):
        log(RANDOM_WEIGHTS_WARNING)


def preset_cache_differences(attrs: dict[str, Any], kind: str, tune_blocks: int,
                             head: str = "token_relu_mean") -> list[str]:
    """'what the cache has (the preset wants ...)' for every preset setting the cache's attributes miss.

    Mean pooling is the reference ViT's (`--head token_relu_mean`); a run given another head (the
    reference's CLIP ResNets pool with their attnpool) is not held to it."""
    out = []
    split = int(attrs.get("split_block", 0) or 0)
    want_split = tune_blocks if tune_blocks > 0 else None
    checks = [
        ("preprocessing", attrs.get("preset"), "pixelrec"),
        ("stored values", attrs.get("embedding_dtype"), "float32"),
    ]
    if head == "token_relu_mean":
        checks.insert(1, ("pooling", attrs.get("pooling"), "mean"))
    if "precision" in attrs:  # caches written before --precision do not record it
        checks.append(("precision", attrs.get("precision"), "fp32"))
    activation = _vit_activation(attrs.get("model_config"))
    if activation is not None:
        checks.append(("ViT blocks", activation, "QuickGELU"))
    if kind == "partial" and want_split is not None:
        checks.append(("split block", split, want_split))
    for name, have, want in checks:
        if str(have) != str(want):
            out.append(f"{name} {have} (the preset wants {want})")
    return out


def _vit_activation(config_json: Any) -> str | None:
    """'QuickGELU' or 'GELU' for a ViT model config (open_clip JSON), None for other towers."""
    try:
        cfg = json.loads(str(config_json))
    except (TypeError, ValueError):
        return None
    vision = cfg.get("vision_cfg", {}) if isinstance(cfg, dict) else {}
    if vision.get("timm_model_name") or not isinstance(vision.get("layers", 12), int):
        return None  # ModifiedResNet (ReLU) or timm towers: QuickGELU does not apply
    return "QuickGELU" if cfg.get("quick_gelu") else "GELU"


def encode_command(attrs: dict[str, Any], tune_blocks: int) -> str:
    """The `pixelrec encode` command that makes a cache the preset accepts, from this cache's encoder."""
    model = str(attrs.get("model", "ViT-B-32"))
    if _vit_activation(attrs.get("model_config")) == "GELU" and not model.endswith("-quickgelu"):
        model += "-quickgelu"
    pretrained = str(attrs.get("pretrained", "none"))
    split = f" --split-block {tune_blocks}" if tune_blocks > 0 and tune_blocks != 2 else ""
    return (f"pixelrec encode --preset pixelrec --images COVERS --out CACHE.h5 --encoder {model} "
            f"--pretrained {pretrained if pretrained not in ('', 'none') else 'ViT-B-32.pt'}{split}")
