"""Splitting the image towers that are not ViTs: CLIP ResNets and open_clip's timm Swin / ConvNeXt towers.

`encode --split-block K`, the `partial` item tower and `e2e --tune-blocks K` cut a tower before its
last K **blocks**, for every family (the ViT split itself lives in `encoder.py`):

| family | tower | a block is | stem (always frozen) | head ('model' pooling / 'mean' pooling) |
|---|---|---|---|---|
| `resnet` | open_clip `ModifiedResNet` (CLIP RN50, RN50x4, ...) | a Bottleneck of layer1..layer4 | the 3-conv stem | attnpool / mean over positions of layer4's output |
| `swin` | open_clip `TimmModel` over a timm `SwinTransformer` | a Swin transformer block | patch embedding | final norm, average pool, proj / the same without proj |
| `convnext` | open_clip `TimmModel` over a timm `ConvNeXt` | a ConvNeXt block | the patchify stem | norm_pre, timm's pool + norm, proj / the same without proj |

Stage boundaries are block counts: K = the blocks of the last stages (RN50: layer4 = 3, layer3 +
layer4 = 9; Swin-B: the last two stages = 18 + 2 = 20). A stage's downsampling layer (timm's
patch merging / strided conv at the start of a stage) stays below the cut when the cut falls at
that stage's start, so the cached activations are those entering the stage's first block (what the
reference PixelRec code tunes for Swin); it belongs to the top part otherwise. A ResNet stage
downsamples inside its first Bottleneck, which is a block like the others.

Activations are cached as tokens [T, C]: the feature map entering the cut, positions flattened
row-major (T = H x W), channels last, whatever the tower's own layout (NCHW for ResNet and ConvNeXt,
NHWC for Swin). `StageTop` is the part above the cut as a standalone module, rebuilt from the
open_clip model config, the grid (H, W) and the exact weights a cache stores; for Swin it also
checks that the rebuilt blocks use the stored window and shift sizes.

With BatchNorm (ResNet) the encoder's frozen part stays in eval mode while training (running
statistics, as when the cache was written), so `partial` and `e2e` see the same frozen function.

`describe_state_mismatch` names how a checkpoint's architecture differs from a model's (a missing or
extra block, another width), for any family. `from_timm_layout` reads a Swin / ConvNeXt state dict
saved in timm's own layout into open_clip's timm tower (and refuses Hugging Face transformers ones).

Two tiny timm models, `pixelrec_tiny_swin` and `pixelrec_tiny_convnext`, are registered with timm
for the test configs `pixelrec-tiny-swin` and `pixelrec-tiny-convnext`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, Sequence

import open_clip
import timm
import torch
import torch.nn as nn
from open_clip.model import _build_vision_tower
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from ..errors import PixelrecError

FAMILY_LABELS = {
    "vit": "ViT",
    "resnet": "CLIP ResNet (ModifiedResNet)",
    "swin": "Swin (timm)",
    "convnext": "ConvNeXt (timm)",
}
SPLIT_FAMILIES = "a ViT, CLIP ResNet, Swin or ConvNeXt tower"


# ---- tiny timm towers for tests ------------------------------------------------------------------


def pixelrec_tiny_swin(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A 4-stage Swin with depths 1, 2, 2, 1 (shifted windows in stage 2), width 16, for 64 px inputs."""
    args = dict(img_size=64, embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **{**args, **kwargs})


def pixelrec_tiny_convnext(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A 4-stage ConvNeXt with depths 1, 1, 2, 1 and widths 8 .. 64."""
    args = dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return timm.create_model("convnext_atto", pretrained=False, **{**args, **kwargs})


for _fn in (pixelrec_tiny_swin, pixelrec_tiny_convnext):
    if _fn.__name__ not in timm.list_models(_fn.__name__):
        timm.models.register_model(_fn)


# ---- which family ----------------------------------------------------------------------------------


def family_of(visual: nn.Module) -> Optional[str]:
    """'vit' | 'resnet' | 'swin' | 'convnext' for a tower pixelrec can split, else None."""
    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, TimmModel):
        trunk = type(visual.trunk).__name__
        if trunk == "SwinTransformer":
            return "swin"
        if trunk == "ConvNeXt":
            return "convnext"
    return None


def family_of_config(model_config: dict | str) -> Optional[str]:
    """The family an open_clip model config (dict or JSON) builds, without building it."""
    cfg = json.loads(model_config) if isinstance(model_config, str) else model_config
    vision_cfg = cfg.get("vision_cfg", {})
    timm_name = str(vision_cfg.get("timm_model_name") or "")
    if timm_name:
        return "swin" if "swin" in timm_name else "convnext" if "convnext" in timm_name else None
    return "resnet" if isinstance(vision_cfg.get("layers"), (list, tuple)) else "vit"


def family_of_model(name: str) -> Optional[str]:
    """The family of an open_clip model name (None when unknown or not splittable)."""
    cfg = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    return family_of_config(cfg) if cfg else None


def describe_tower(visual: nn.Module) -> str:
    """'a ModifiedResNet', 'a TimmModel (timm VisionTransformer)': for messages."""
    name = type(visual).__name__
    if isinstance(visual, TimmModel):
        return f"a {name} (timm {type(visual.trunk).__name__})"
    return f"a {name}"


def family_label(family: Optional[str]) -> str:
    return FAMILY_LABELS.get(str(family), "non-splittable")


def build_visual(config_json: str) -> nn.Module:
    """A freshly initialised open_clip vision tower from its model config (JSON), at the config's image
    size (timm towers are resized the way open_clip's factory does). Leaves the global RNG alone."""
    cfg = json.loads(config_json)
    vision_cfg = dict(cfg["vision_cfg"])
    with torch.random.fork_rng(devices=[]):
        visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))
    if isinstance(visual, TimmModel) and vision_cfg.get("image_size"):
        size = int(vision_cfg["image_size"])
        grid = getattr(getattr(visual.trunk, "patch_embed", None), "img_size", None)
        if grid is not None and tuple(grid) != (size, size) and hasattr(visual, "set_input_size"):
            visual.set_input_size(size)
    return visual


# ---- the split ---------------------------------------------------------------------------------------


def _run_units(units: Sequence[nn.Module], x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    for unit in units:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(unit, x, use_reentrant=False)
        else:
            x = unit(x)
    return x


def _to_tokens(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Feature map (NCHW or NHWC) -> tokens [B, H * W, C]."""
    if layout == "nchw":
        return x.flatten(2).transpose(1, 2).contiguous()
    return x.flatten(1, 2).contiguous()


def _from_tokens(tokens: torch.Tensor, layout: str, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens [B, H * W, C] -> the tower's feature map layout."""
    b, t, c = tokens.shape
    h, w = grid
    if t != h * w:
        raise PixelrecError(f"tokens of {t} positions do not fit the {h} x {w} grid of this split")
    if layout == "nchw":
        return tokens.transpose(1, 2).reshape(b, c, h, w)
    return tokens.reshape(b, h, w, c)


class ResNetTail(nn.Module):
    """'model' pooling of a ModifiedResNet: its attention pool (with the projection inside)."""

    def __init__(self, attnpool: nn.Module):
        super().__init__()
        self.attnpool = attnpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(x)


class MeanTail(nn.Module):
    """'mean' pooling of a ResNet: mean over the positions of layer4's output (no attnpool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class TimmTail(nn.Module):
    """The end of a timm tower in open_clip: final norm, timm's own pooling head (no classifier), and
    open_clip's projection ('model' pooling) or not ('mean' pooling: the timm pooled features)."""

    def __init__(self, norm: nn.Module, pool: nn.Module, proj: Optional[nn.Module]):
        super().__init__()
        self.norm = norm
        self.pool = pool
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.norm(x))
        return x if self.proj is None else self.proj(x)


class TowerSplit:
    """A non-ViT tower seen as stem -> units -> tail, with a cut allowed before every block unit.

    Holds references to the tower's own modules (not copies); `ImageEncoder` runs them.
    """

    def __init__(self, visual: nn.Module, pooling: str):
        family = family_of(visual)
        if family in (None, "vit"):
            raise PixelrecError(f"no stage split for {describe_tower(visual)}")
        self.family = family
        self.visual = visual
        self.pooling = pooling
        units: list[nn.Module] = []
        blocks: list[int] = []  # unit index of every block
        if family == "resnet":
            self.layout = "nchw"
            self.stem: Callable[[torch.Tensor], torch.Tensor] = visual.stem
            self.stem_modules = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3]
            self.stage_names = ["layer1", "layer2", "layer3", "layer4"]
            for name in self.stage_names:
                for block in getattr(visual, name):
                    blocks.append(len(units))
                    units.append(block)
            self.tail: nn.Module = ResNetTail(visual.attnpool) if pooling == "model" else MeanTail()
        else:
            trunk = visual.trunk
            if family == "swin":
                self.layout = "nhwc"
                self.stem = trunk.patch_embed
                stages, norm = trunk.layers, trunk.norm
            else:
                self.layout = "nchw"
                self.stem = trunk.stem
                stages, norm = trunk.stages, trunk.norm_pre
            self.stem_modules = [self.stem]
            self.stage_names = [f"stage {i + 1}" for i in range(len(stages))]
            for stage in stages:
                if not isinstance(stage.downsample, nn.Identity):
                    units.append(stage.downsample)
                for block in stage.blocks:
                    blocks.append(len(units))
                    units.append(block)
            self.tail = TimmTail(norm, trunk.head, visual.head if pooling == "model" else None)
        self.units = units
        self.block_units = blocks
        self.num_blocks = len(blocks)
        self.shapes: Optional[list[tuple[int, ...]]] = None  # feature map shape entering each unit (+ the output)

    # -- geometry --

    def stage_starts(self) -> list[int]:
        """K values at which a stage starts, from the last stage down (e.g. RN50: 3, 9, 13, 16)."""
        starts, k = [], 0
        counts = self._blocks_per_stage()
        for n in reversed(counts):
            k += n
            starts.append(k)
        return starts

    def _blocks_per_stage(self) -> list[int]:
        if self.family == "resnet":
            return [len(getattr(self.visual, name)) for name in self.stage_names]
        trunk = self.visual.trunk
        stages = trunk.layers if self.family == "swin" else trunk.stages
        return [len(stage.blocks) for stage in stages]

    def describe_range(self) -> str:
        starts = ", ".join(f"{k} ({name})" for k, name in zip(self.stage_starts(), reversed(self.stage_names)))
        return f"{self.num_blocks} blocks; the stages start at K = {starts}"

    def cut(self, k: int) -> int:
        """Index of the first unit of the top k blocks (a stage's downsampling stays below a stage-start cut)."""
        return self.block_units[self.num_blocks - k] if k > 0 else len(self.units)

    @torch.no_grad()
    def probe(self, image_size: int) -> None:
        """Record the feature-map shape entering every unit (one forward pass of one blank image)."""
        param = next(self.visual.parameters())
        was_training = self.visual.training
        self.visual.eval()
        try:
            x = self.stem(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
            shapes = [tuple(x.shape[1:])]
            for unit in self.units:
                x = unit(x)
                shapes.append(tuple(x.shape[1:]))
        finally:
            self.visual.train(was_training)
        self.shapes = shapes

    def _grid_and_width(self, shape: tuple[int, ...]) -> tuple[tuple[int, int], int]:
        if self.layout == "nchw":
            c, h, w = shape
        else:
            h, w, c = shape
        return (int(h), int(w)), int(c)

    def grid_at(self, k: int) -> tuple[int, int]:
        return self._grid_and_width(self.shapes[self.cut(k)])[0]

    def token_shape(self, k: int) -> tuple[int, int]:
        """(T, C) of the tokens entering the last k blocks."""
        (h, w), c = self._grid_and_width(self.shapes[self.cut(k)])
        return h * w, c

    def hidden_width(self) -> int:
        return self._grid_and_width(self.shapes[-1])[1]

    def stage_ends(self) -> list[int]:
        """Index of the last unit of every stage (its output is the stage's output)."""
        ends, total = [], 0
        for n in self._blocks_per_stage():
            total += n
            ends.append(self.block_units[total - 1])
        return ends

    def tap_widths(self) -> list[int]:
        """Channels of the per-layer taps (`encode --hidden`): the stem's output, then every stage's."""
        return [self._grid_and_width(self.shapes[i])[1] for i in [0] + [end + 1 for end in self.stage_ends()]]

    def pool_positions(self, x: torch.Tensor) -> torch.Tensor:
        """A feature map in the tower's layout -> its mean over positions [B, C]."""
        return x.mean(dim=(2, 3)) if self.layout == "nchw" else x.mean(dim=(1, 2))

    def forward_taps(self, pixels: torch.Tensor, taps: Sequence[int], k: Optional[int] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[torch.Tensor]]:
        """One pass: (pooled [B, E], tokens entering the last k blocks or None, the taps' outputs
        pooled over positions: [B, C_t] each, in the order of `taps`; tap 0 = the stem's output,
        tap s = stage s's)."""
        x = self.stem(pixels)
        tap_of = {end: s + 1 for s, end in enumerate(self.stage_ends())}
        states = {0: self.pool_positions(x)} if 0 in taps else {}
        tokens, cut = None, self.cut(k) if k else None
        for j, unit in enumerate(self.units):
            if j == cut:
                tokens = _to_tokens(x, self.layout)
            x = unit(x)
            if tap_of.get(j) in taps:
                states[tap_of[j]] = self.pool_positions(x)
        return self.tail(x), tokens, [states[t] for t in taps]

    # -- forward --

    def lower(self, pixels: torch.Tensor, k: int, grad_checkpointing: bool = False) -> torch.Tensor:
        """Stem and the units below the cut: pixels -> feature map entering the last k blocks."""
        return _run_units(self.units[: self.cut(k)], self.stem(pixels), grad_checkpointing)

    def tokens_at_split(self, pixels: torch.Tensor, k: int, grad_checkpointing: bool = False) -> torch.Tensor:
        return _to_tokens(self.lower(pixels, k, grad_checkpointing), self.layout)

    def features(self, pixels: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
        """The last block's output in the tower's layout."""
        return _run_units(self.units, self.stem(pixels), grad_checkpointing)

    def forward(self, pixels: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
        return self.tail(self.features(pixels, grad_checkpointing))

    def last_hidden(self, pixels: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
        """The last block's output as tokens [B, T, C] (for token-wise heads)."""
        return _to_tokens(self.features(pixels, grad_checkpointing), self.layout)

    def forward_from_split(self, tokens: torch.Tensor, k: int, grad_checkpointing: bool = False) -> torch.Tensor:
        x = _from_tokens(tokens, self.layout, self.grid_at(k))
        return self.tail(_run_units(self.units[self.cut(k):], x, grad_checkpointing))

    # -- training --

    def tail_modules(self) -> list[nn.Module]:
        """Head modules the chosen pooling uses (trainable with the top blocks)."""
        return [m for m in self.tail.children()]

    def unused_head_modules(self) -> list[nn.Module]:
        """Head modules the chosen pooling skips (kept frozen: they would get no gradient)."""
        if self.family == "resnet":
            return [] if self.pooling == "model" else [self.visual.attnpool]
        return [] if self.pooling == "model" else [self.visual.head]

    def frozen_modules(self, k: int) -> list[nn.Module]:
        """What lies below the cut of the last k blocks."""
        return list(self.stem_modules) + list(self.units[: self.cut(k)])

    def top(self, k: int, config_json: str) -> "StageTop":
        """The part above the cut (these very modules; copy it to detach it from the tower)."""
        return StageTop(self.family, self.units[self.cut(k):], self.layout, self.grid_at(k),
                        self.tail if self.tail_modules() else None, self.pooling, config_json, k)


def _windows(units: Sequence[nn.Module]) -> list[list[int]]:
    """Window and shift sizes of Swin blocks ([wh, ww, sh, sw] each); empty for other units."""
    out = []
    for unit in units:
        if hasattr(unit, "window_size") and hasattr(unit, "shift_size"):
            out.append([int(v) for v in (*_pair(unit.window_size), *_pair(unit.shift_size))])
    return out


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class StageTop(nn.Module):
    """The last K blocks of a ResNet / Swin / ConvNeXt tower plus its head: cached tokens -> item embedding.

    `forward(tokens)` equals `ImageEncoder.forward_from_split(tokens, K)` for the encoder it came from;
    `last_hidden(tokens)` is the last block's output as tokens [B, T, C].
    """

    def __init__(self, family: str, units: Sequence[nn.Module], layout: str, grid: tuple[int, int],
                 tail: Optional[nn.Module], pooling: str, config_json: str, k: int):
        super().__init__()
        self.family = family
        self.units = nn.ModuleList(units)
        self.layout = layout
        self.grid = (int(grid[0]), int(grid[1]))
        self.tail = tail  # None: ResNet mean pooling, which has no weights
        self.pooling = pooling
        self.k = int(k)
        self.config_json = config_json
        self.grad_checkpointing = False

    @property
    def extra_attrs(self) -> dict[str, Any]:
        """What a cache stores beside the weights to rebuild this module (attributes of `top_blocks/`)."""
        return dict(family=self.family, grid=list(self.grid), windows=json.dumps(_windows(self.units)))

    @classmethod
    def from_config(cls, config_json: str, k: int, pooling: str, family: Optional[str] = None) -> "StageTop":
        """Freshly initialised top k blocks (+ head) of the tower an open_clip model config describes."""
        visual = build_visual(config_json)
        found = family_of(visual)
        if family is not None and found != family:
            raise PixelrecError(f"the stored top blocks are of a {family_label(family)} tower, but the model config "
                                f"builds {describe_tower(visual)} ({family_label(found)})")
        if found in (None, "vit"):
            raise PixelrecError(f"no stage split for {describe_tower(visual)}")
        split = TowerSplit(visual, pooling)
        check_split_range(split, k, "split block", "this tower")
        size = int(json.loads(config_json)["vision_cfg"].get("image_size") or 224)
        split.probe(size)
        return split.top(k, config_json)

    @classmethod
    def from_state(cls, config_json: str, k: int, pooling: str, state: dict[str, torch.Tensor],
                   attrs: Optional[dict[str, Any]] = None) -> "StageTop":
        """Rebuild from the model config and exact weights (and the grid / windows a cache stored)."""
        attrs = attrs or {}
        top = cls.from_config(config_json, k, pooling, family=attrs.get("family"))
        if "grid" in attrs and tuple(int(v) for v in attrs["grid"]) != top.grid:
            raise PixelrecError(f"the stored top blocks start on a {tuple(attrs['grid'])} grid, the model config "
                                f"gives {top.grid}")
        if "windows" in attrs and json.loads(attrs["windows"]) != _windows(top.units):
            raise PixelrecError(f"the stored Swin window / shift sizes {attrs['windows']} differ from those the "
                                f"model config builds ({json.dumps(_windows(top.units))})")
        problem = describe_state_mismatch(top.state_dict(), state)
        if problem:
            raise PixelrecError(f"top-block weights do not fit the model config: {problem}")
        top.load_state_dict(state, strict=True)
        return top

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _features(self, tokens: torch.Tensor) -> torch.Tensor:
        return _run_units(self.units, _from_tokens(tokens, self.layout, self.grid), self.grad_checkpointing)

    def last_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return _to_tokens(self._features(tokens), self.layout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self._features(tokens)
        if self.tail is None:
            return x.mean(dim=(2, 3))  # [B, C]
        return self.tail(x)


def check_split_range(split: TowerSplit, k: int, what: str, model: str) -> None:
    if not 1 <= k <= split.num_blocks:
        raise PixelrecError(f"{what} {k}: expected 1..{split.num_blocks} for {model} "
                            f"({family_label(split.family)}: {split.describe_range()})")


# ---- checkpoints in timm's own layout ------------------------------------------------------------------

# A timm Swin / ConvNeXt state dict, as timm saves it (keys from the trunk: `layers.0.blocks.0.attn.qkv.weight`,
# `stages.0.blocks.0.conv_dw.weight`), rather than open_clip's (`trunk.` + those, plus `head.proj.weight`).
_TIMM_TRUNK_KEY = re.compile(r"^(?:layers|stages)\.\d+\.blocks\.\d+\.")
_TIMM_CLASSIFIER = "head.fc."  # timm's classifier; open_clip's tower has none (num_classes 0)
_TIMM_OLD_BUFFERS = ("relative_position_index", "attn_mask")  # Swin buffers older timm versions saved
# Key prefixes of Hugging Face transformers vision models (SwinModel, CLIPVisionModel, ...): another layout
_HF_PREFIXES = ("embeddings.patch_embeddings.", "encoder.layers.", "swin.embeddings.", "vision_model.")


def from_timm_layout(state: dict[str, Any], visual: nn.Module, source: str) -> tuple[dict[str, Any], Optional[str]]:
    """A state dict in timm's layout for an open_clip timm tower -> open_clip's layout, and a one-line
    note saying so (None, and the state unchanged, when it is not in timm's layout).

    Every timm key goes under `trunk.`; timm's classifier (`head.fc.*`) and the Swin buffers older
    timm versions saved are dropped; open_clip's projection (`head.proj.*`, which timm weights do not
    hold) keeps the tower's own seeded initialisation ('mean' pooling does not use it). Anything left
    that does not fit is for `describe_state_mismatch` to name. A Hugging Face transformers state dict
    (e.g. `SwinModel`: separate query / key / value tensors, downsampling at a stage's end) is refused
    by name: it is not a key mapping away from timm's.
    """
    hf = sorted(k for k in state if k.startswith(_HF_PREFIXES))
    if hf:
        raise PixelrecError(
            f"{source} is a Hugging Face transformers state dict (keys like {hf[0]}), which pixelrec does not read: "
            f"give the model's weights in timm's layout (as timm saves a state dict) or open_clip's")
    if not isinstance(visual, TimmModel) or any(k.startswith(("trunk.", "visual.")) for k in state) \
            or not any(_TIMM_TRUNK_KEY.match(k) for k in state):
        return state, None
    own = visual.state_dict()
    dropped = sorted(k for k in state if k.startswith(_TIMM_CLASSIFIER)
                     or (k.endswith(_TIMM_OLD_BUFFERS) and f"trunk.{k}" not in own))
    mapped = {f"trunk.{k}": v for k, v in state.items() if k not in dropped}
    kept = sorted(k for k in own if not k.startswith("trunk.") and k not in mapped)
    mapped.update({k: own[k] for k in kept})
    classifier = [k for k in dropped if k.startswith(_TIMM_CLASSIFIER)]
    note = (f"{source}: timm's layout, read as open_clip's ({len(mapped) - len(kept)} tensors under trunk."
            + (f"; timm's classifier {_TIMM_CLASSIFIER}* dropped" if classifier else "")
            + (f"; {', '.join(kept)} (open_clip's projection, not in timm weights) keeps its seeded initialisation, "
               f"unused by --pooling mean" if kept else "") + ")")
    return mapped, note


# ---- architecture mismatch report ------------------------------------------------------------------

_BLOCK_PREFIX = re.compile(r"^(.*?(?:resblocks|layer\d|layers\.\d+\.blocks|stages\.\d+\.blocks|blocks))\.(\d+)\.")


_WIDTH_KEYS = {"vit": "class_embedding", "resnet": "conv3.weight"}  # first dimension = the tower's width
_FAMILY_KEYS = (("transformer.resblocks.", "vit"), ("attnpool.", "resnet"), ("layer1.", "resnet"),
                ("trunk.layers.", "swin"), ("trunk.stages.", "convnext"))


def _family_of_keys(keys: set[str]) -> Optional[str]:
    for prefix, family in _FAMILY_KEYS:
        if any(key.startswith(prefix) for key in keys):
            return family
    return None


def _block_counts(keys: Sequence[str]) -> dict[str, int]:
    """Block container prefix -> number of blocks, from state-dict keys."""
    counts: dict[str, int] = {}
    for key in keys:
        m = _BLOCK_PREFIX.match(key)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    return counts


def describe_state_mismatch(model_state: dict[str, Any], checkpoint_state: dict[str, Any],
                            model: str = "the model") -> Optional[str]:
    """How a checkpoint's architecture differs from a model's, in words, or None when every name and
    shape agrees: blocks missing or extra per block container, then the first shape that differs
    (e.g. a width), then other missing or unexpected entries."""
    have, want = set(checkpoint_state), set(model_state)
    theirs_family, my_family = _family_of_keys(have), _family_of_keys(want)
    if theirs_family and my_family and theirs_family != my_family:
        return f"the checkpoint holds a {family_label(theirs_family)} tower, {model} is a {family_label(my_family)}"
    problems = []
    width_key = _WIDTH_KEYS.get(my_family or "")
    if width_key in want and width_key in have:
        a, b = model_state[width_key].shape[0], checkpoint_state[width_key].shape[0]
        if a != b:
            problems.append(f"width {b} in the checkpoint, {a} in {model}")
    mine, theirs = _block_counts(sorted(want)), _block_counts(sorted(have))
    for prefix in sorted(set(mine) | set(theirs)):
        a, b = mine.get(prefix, 0), theirs.get(prefix, 0)
        if a != b:
            problems.append(f"{model} has {a} blocks in {prefix}, the checkpoint {b}")
    for key in sorted(want & have) if not problems else ():  # a width difference explains the shapes
        a, b = tuple(model_state[key].shape), tuple(checkpoint_state[key].shape)
        if a != b:
            problems.append(f"{key} is {list(b)} in the checkpoint, {list(a)} in {model} (another width or size)")
            break
    in_block = {k for k in (want ^ have) if _BLOCK_PREFIX.match(k) and _BLOCK_PREFIX.match(k).group(1) in
                {p for p in set(mine) | set(theirs) if mine.get(p, 0) != theirs.get(p, 0)}}
    missing = sorted(want - have - in_block)
    extra = sorted(have - want - in_block)
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"not in {model}: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    return "; ".join(problems) or None
