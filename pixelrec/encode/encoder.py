"""The image encoder: an open_clip vision tower that can be cut at any transformer block.

`build_encoder(EncoderConfig)` creates an open_clip model, keeps only its vision tower (`.visual`)
and wraps it in `ImageEncoder`, which adds what the two-stage system needs on top of open_clip:

- two poolings: ``model`` (open_clip's own pooled output: ln_post, token/avg/attentional pool and
  proj, dim = embed_dim) and ``mean`` (mean over all tokens of the last block's output, without
  ln_post or proj, dim = width: how PixelRec's ViT PixelNet pools);
- two preprocessing presets: ``default`` (the model's own open_clip eval transform) and
  ``pixelrec`` (the reference code: squash to image_size x image_size, no crop, mean = std = 0.5);
- a split at block K (ViT towers here; CLIP ResNet, Swin and ConvNeXt towers through `families.py`,
  whose `StageTop` plays TopBlocks' part): ``tokens_at_split(x, K)`` are the activations entering the last
  K blocks and ``forward_from_split(tokens, K)`` finishes the forward pass, so
  ``forward_from_split(tokens_at_split(x, K), K)`` is ``forward(x)``. `TopBlocks` is that last part
  as a standalone module (the `partial` item tower trains it on cached tokens), built without the
  lower blocks; it and the encoder both give the last block's output as ``last_hidden``.
- per-layer taps (`encode --hidden`): ``forward_hidden(x, taps, kind)`` gives, from one forward
  pass, the pooled output, the split tokens and each tapped layer's state (a ViT's class token
  after block t, with ``cls+mean`` also the mean of its patch tokens; other families: each stage's
  output averaged over positions), which the `side` item tower reads.

Random initialisation ('none') is seeded, so one config always gives the same weights. Weights come
from a local checkpoint file (full open_clip CLIP, an `ImageEncoder`, a bare vision tower state
dict, or for timm towers a state dict in timm's own layout) or an open_clip pretrained tag (needs the network; never used by tests).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import _build_vision_tower, resize_pos_embed
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import VisionTransformer
from open_clip.utils import to_2tuple
from PIL import Image
from torch.utils.checkpoint import checkpoint

from ..errors import PixelrecError
from ..runtime import log
from .checkpoint_check import check_openai_activation, read_checkpoint
from .families import (SPLIT_FAMILIES, TowerSplit, check_split_range, describe_state_mismatch, describe_tower,
                       family_of, from_timm_layout)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

TINY_MODEL = "pixelrec-tiny-vit"
# pixelrec's own tiny configs (model_configs/): test and demo models, random by design (no warning)
TEST_MODELS = frozenset(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))
POOLINGS = ("model", "mean")
# What `encode --hidden` stores per tap: the class token's state, or that and the mean of the patch tokens
HIDDEN_KINDS = ("cls", "cls+mean")
PRESETS = ("default", "pixelrec")
PIXELREC_MEAN_STD = (0.5, 0.5, 0.5)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")
# Bounds of --image-size. A ViT needs at least one patch; other towers (ModifiedResNet, timm
# convnets) downsample by 32. Above 1024 px a ViT's attention memory grows out of reach (no open_clip
# model is trained that large), so bigger sizes are refused instead of exhausting memory.
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024


@dataclass
class EncoderConfig:
    """Which image encoder to build and how it reads images and pools."""

    model: str = "ViT-B-32"  # an open_clip model name (open_clip.list_models()) or pixelrec-tiny-vit
    pretrained: str = "none"  # none (seeded random init) | open_clip tag | local checkpoint path
    pooling: str = "model"  # model: open_clip pooled output (dim embed_dim) | mean: mean of last hidden tokens (dim width)
    preset: str = "default"  # default: the model's open_clip eval transform | pixelrec: squash, mean = std = 0.5
    image_size: Optional[int] = None  # override the model's input size (patch size or 32 .. MAX_IMAGE_SIZE)
    seed: int = 0  # random-init seed (pretrained='none')


def pool_and_project(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ViT head on the last block's output: [B, T, W] -> [B, E].

    Runs VisionTransformer's own `_pool` code on any module carrying its head attributes (the tower
    itself or a `PoolHead`), so a split tower computes exactly what the whole tower computes.
    """
    pooled, _ = VisionTransformer._pool(head, x)
    if head.proj is not None:
        pooled = pooled @ head.proj
    return pooled


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Residual attention blocks, batch first: [B, T, W] -> [B, T, W]."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def parse_taps(spec: str, available: list[int], flag: str, where: str) -> list[int]:
    """`all` | `even` | a comma-separated list (e.g. 0,6,12) -> sorted tap numbers among `available`.

    `even`: the even taps, and the last one (IISAN's 0, 2, .., 12 for a 12-block ViT). A tap outside
    `available` is refused in one line ending with `where` (what holds which taps).
    """
    text = str(spec).strip()
    if text == "all":
        return list(available)
    if text == "even":
        return sorted({t for t in available if t % 2 == 0} | {available[-1]})
    try:
        taps = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise PixelrecError(f"{flag} {spec}: expected all, even or tap numbers separated by commas, "
                            f"e.g. 0,6,12") from None
    outside = [t for t in taps if t not in available]
    if outside:
        raise PixelrecError(f"{flag} {spec}: tap {outside[0]} is not available; {where}")
    return taps


class PoolHead(nn.Module):
    """The pooling/projection head of an open_clip VisionTransformer, detached from its blocks."""

    _global_pool = VisionTransformer._global_pool  # used by VisionTransformer._pool

    def __init__(self, visual: VisionTransformer):
        super().__init__()
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.attn_pool = visual.attn_pool
        self.attn_pool_contrastive = getattr(visual, "attn_pool_contrastive", None)
        self.attn_pool_type = getattr(visual, "attn_pool_type", "")
        self.pool_type = visual.pool_type
        self.final_ln_after_pool = visual.final_ln_after_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_and_project(self, x)  # [B, T, W] -> [B, E]


class TopBlocks(nn.Module):
    """The last K transformer blocks of a ViT tower plus its pooling: cached tokens -> item embedding.

    `forward(tokens)` equals `ImageEncoder.forward_from_split(tokens, K)` for the encoder it came from.
    """

    def __init__(self, blocks: nn.ModuleList, head: Optional[PoolHead], pooling: str, config_json: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise PixelrecError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.blocks = blocks
        self.head = head  # None for 'mean' pooling, which has no weights
        self.pooling = pooling
        self.k = len(blocks)
        self.config_json = config_json
        self.grad_checkpointing = False

    @classmethod
    def from_config(cls, config_json: str, k: int, pooling: str) -> "TopBlocks":
        """Freshly initialised top K blocks (+ head) of the ViT described by an open_clip model config."""
        cfg = json.loads(config_json)
        vision_cfg = dict(cfg["vision_cfg"])
        if vision_cfg.get("timm_model_name") or not isinstance(vision_cfg.get("layers", 12), int):
            raise PixelrecError("top blocks need a ViT tower; this model config describes another tower")
        layers = int(vision_cfg.get("layers", 12))
        if not 1 <= k <= layers:
            raise PixelrecError(f"split block {k}: expected 1..{layers} for a ViT with {layers} blocks")
        vision_cfg["layers"] = k  # build only the blocks we keep; the stem is tiny and dropped below
        with torch.random.fork_rng(devices=[]):
            visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))
        head = PoolHead(visual) if pooling == "model" else None
        return cls(visual.transformer.resblocks, head, pooling, config_json)

    @classmethod
    def from_state(cls, config_json: str, k: int, pooling: str, state: dict[str, torch.Tensor]) -> "TopBlocks":
        """Rebuild a TopBlocks from its model config and exact weights (e.g. those stored in a cache)."""
        top = cls.from_config(config_json, k, pooling)
        try:
            top.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise PixelrecError(f"top-block weights do not fit the model config: {str(exc).splitlines()[0]}") from None
        return top

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def last_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final block output before ln_post: [B, T, W] -> [B, T, W] (for token-wise heads)."""
        return run_blocks(self.blocks, tokens, self.grad_checkpointing)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.last_hidden(tokens)  # [B, T, W]
        if self.head is None:
            return x.mean(dim=1)  # [B, W]
        return self.head(x)  # [B, E]


class PixelLoader:
    """item id -> preprocessed pixels [3, H, W] from an image store; picklable for DataLoader workers.

    Encoding and end-to-end training both load through it, so they see identical pixels. JPEG
    decoding is reduced (PIL draft) to no less than the encoder's input size on both sides.
    Raises the store's ImageLoadError for an image that cannot be loaded.
    """

    def __init__(self, store: Any, preprocess: Callable[[Image.Image], torch.Tensor], max_side: int):
        self.store = store
        self.preprocess = preprocess
        self.max_side = max_side

    def __call__(self, item_id: str) -> torch.Tensor:
        return self.preprocess(self.store.load(item_id, max_side=self.max_side))


class ImageEncoder(nn.Module):
    """An open_clip vision tower with a chosen pooling and preprocessing; ViT towers can be split.

    CLIP ResNet, Swin and ConvNeXt towers split through `self.split` (`families.TowerSplit`; their
    token shape depends on K: `token_shape(k)`). Other towers (e.g. other timm models) support the
    plain forward with 'model' pooling only; for them `num_blocks` and `num_tokens` are 0 and
    `supports_split` is False.
    """

    def __init__(
        self,
        visual: nn.Module,
        config: EncoderConfig,
        model_config: dict,
        preprocess_cfg: dict,
    ):
        super().__init__()
        self.visual = visual
        self.config = config
        self.pooling = config.pooling
        self.model_config_json = json.dumps(model_config, sort_keys=True)
        self.preprocess_cfg = preprocess_cfg
        self.preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)  # PIL -> [3, H, W]
        self.image_size = int(to_2tuple(preprocess_cfg["size"])[0])
        self.family = family_of(visual)
        # ResNet / Swin / ConvNeXt towers: the split logic of `families.py`; None for ViTs (below) and others
        self.split = TowerSplit(visual, self.pooling) if self.family not in (None, "vit") else None
        self.supports_split = self.family is not None
        self._frozen_below: list[nn.Module] = []  # kept in eval mode while training (see train())
        self.grad_checkpointing = False
        if self.split is not None:
            self.split.probe(self.image_size)
            self.num_blocks = self.split.num_blocks
            self.num_tokens = 0  # depends on the split: token_shape(k)
        elif self.supports_split:
            if not visual.transformer.batch_first:
                raise PixelrecError(f"{config.model}: sequence-first transformers are not supported")
            self.width = int(visual.transformer.width)
            self.num_blocks = len(visual.transformer.resblocks)
            self.num_tokens = int(visual.grid_size[0] * visual.grid_size[1] + 1)  # patches + class token
        else:
            if self.pooling != "model":
                raise PixelrecError(
                    f"--pooling {self.pooling} needs {SPLIT_FAMILIES}; {config.model} is {describe_tower(visual)}"
                )
            self.num_blocks = 0
            self.num_tokens = 0
        was_training = visual.training
        with torch.no_grad():
            visual.eval()  # batch norm towers cannot run a batch of one in training mode
            probe = self.forward(torch.zeros(1, 3, self.image_size, self.image_size))
            visual.train(was_training)
        self.dim = int(probe.shape[-1])
        if self.split is not None:
            self.width = self.split.hidden_width()  # channels of the last block's output
        elif not self.supports_split:
            self.width = self.dim

    # ---- helpers ---------------------------------------------------------------------------------

    def _blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def _require_vit(self, what: str) -> None:
        """Raise PixelrecError unless this tower can be split (a ViT, CLIP ResNet, Swin or ConvNeXt)."""
        if not self.supports_split:
            raise PixelrecError(f"{what} needs {SPLIT_FAMILIES}; {self.config.model} is {describe_tower(self.visual)}")

    def check_split(self, k: int) -> None:
        """Raise PixelrecError unless this tower can be split before its last k blocks."""
        self._require_vit("--split-block")
        if self.split is not None:
            check_split_range(self.split, k, "--split-block", self.config.model)
        elif not 1 <= k <= self.num_blocks:
            raise PixelrecError(
                f"--split-block {k}: expected 1..{self.num_blocks} for {self.config.model} ({self.num_blocks} blocks)"
            )

    def token_shape(self, k: int) -> tuple[int, int]:
        """(T, W) of the tokens entering the last k blocks (what a cache's `tokens` hold per item)."""
        self.check_split(k)
        if self.split is not None:
            return self.split.token_shape(k)
        return self.num_tokens, self.width

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Last block output [B, T, W] -> pooled [B, E]."""
        if self.pooling == "mean":
            return x.mean(dim=1)  # all tokens incl. class token, no ln_post, no proj
        return pool_and_project(self.visual, x)

    def _head_modules(self) -> list[nn.Module | nn.Parameter]:
        v = self.visual
        parts = [v.ln_post, v.proj, v.attn_pool, getattr(v, "attn_pool_contrastive", None)]
        return [p for p in parts if p is not None]

    def pixel_loader(self, store: Any) -> "PixelLoader":
        """item id -> preprocessed pixels [3, H, W] from an image store, as this encoder expects them."""
        return PixelLoader(store, self.preprocess, self.image_size)

    def weights_sha256(self) -> str:
        """Fingerprint of the tower's weights (names, shapes, dtypes and values)."""
        digest = hashlib.sha256()
        for key, value in sorted(self.visual.state_dict().items()):
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ---- forward passes --------------------------------------------------------------------------

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> pooled [B, E]."""
        if self.split is not None:
            return self.split.forward(pixels, self.grad_checkpointing)
        if not self.supports_split:
            return self.visual(pixels)
        return self._pool(self.last_hidden(pixels))

    def last_hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        """Final block output before ln_post: [B, 3, H, W] -> [B, T, W]."""
        self._require_vit("the last hidden state")
        if self.split is not None:
            return self.split.last_hidden(pixels, self.grad_checkpointing)
        x = self.visual._embeds(pixels)  # [B, T, W]
        return run_blocks(self._blocks(), x, self.grad_checkpointing)

    def tokens_at_split(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        """Activations entering the last k blocks: [B, 3, H, W] -> [B, T, W]."""
        self.check_split(k)
        if self.split is not None:
            return self.split.tokens_at_split(pixels, k, self.grad_checkpointing)
        x = self.visual._embeds(pixels)  # [B, T, W]
        return run_blocks(self._blocks()[: self.num_blocks - k], x, self.grad_checkpointing)

    def forward_from_split(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Finish the forward pass from the tokens entering the last k blocks: [B, T, W] -> pooled [B, E]."""
        self.check_split(k)
        if self.split is not None:
            return self.split.forward_from_split(tokens, k, self.grad_checkpointing)
        x = run_blocks(self._blocks()[self.num_blocks - k :], tokens, self.grad_checkpointing)
        return self._pool(x)

    def forward_split(self, pixels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass giving both the pooled output [B, E] and the tokens entering the last k blocks [B, T, W]."""
        tokens = self.tokens_at_split(pixels, k)
        return self.forward_from_split(tokens, k), tokens

    # ---- per-layer states (encode --hidden) -------------------------------------------------------

    def tap_range(self) -> list[int]:
        """Every tap number: for a ViT the residual stream before the first block (0) and after each
        block t (1..blocks); for ResNet / Swin / ConvNeXt the stem's output (0) and each stage's (1..stages)."""
        self._require_vit("--hidden")
        return list(range((len(self.split.stage_ends()) if self.split is not None else self.num_blocks) + 1))

    def describe_taps(self) -> str:
        """'ViT-B-32 has taps 0..12 (tap t: the state after block t; 0: before the first block)'."""
        last = self.tap_range()[-1]
        what = "after block t; 0: before the first block" if self.split is None else \
            "stage t's output pooled over positions; 0: the stem's"
        return f"{self.config.model} has taps 0..{last} (tap t: {what})"

    def parse_taps(self, spec: str) -> list[int]:
        """`--taps all|even|LIST` -> tap numbers of this tower (PixelrecError for one it does not have)."""
        return parse_taps(spec, self.tap_range(), "--taps", self.describe_taps())

    def tap_widths(self, taps: list[int], kind: str) -> list[int]:
        """Width of each tap's stored state (ViT: W, or 2W with cls+mean; others: the stage's channels)."""
        self.check_hidden(kind)
        if self.split is not None:
            widths = self.split.tap_widths()
            return [widths[t] for t in taps]
        return [self.width * (2 if kind == "cls+mean" else 1)] * len(taps)

    def check_hidden(self, kind: str) -> None:
        if kind not in HIDDEN_KINDS:
            raise PixelrecError(f"--hidden {kind}: expected one of {', '.join(HIDDEN_KINDS)}")
        self._require_vit("--hidden")
        if kind == "cls+mean" and self.split is not None:
            raise PixelrecError(f"--hidden cls+mean reads a class token, which {self.config.model} (a "
                                f"{self.split.family} tower) has not; its --hidden cls taps are already each stage's "
                                f"output pooled over positions")

    def forward_hidden(self, pixels: torch.Tensor, taps: list[int], kind: str, k: Optional[int] = None
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """One forward pass -> (pooled [B, E], the tokens entering the last k blocks or None, the taps'
        states [B, len(taps), max width], narrower taps zero-padded on the right).

        ViT: tap t's class-token state (with cls+mean also the mean of its patch tokens, concatenated);
        the pooled output and tokens are those of `forward` and `tokens_at_split`.
        """
        self.check_hidden(kind)
        if self.split is not None:
            pooled, tokens, states = self.split.forward_taps(pixels, taps, k)
        else:
            pooled, tokens, states = self._vit_taps(pixels, taps, kind, k)
        width = max(state.shape[-1] for state in states)
        padded = [F.pad(state, (0, width - state.shape[-1])) for state in states]
        return pooled, tokens, torch.stack(padded, dim=1)

    def _vit_taps(self, pixels: torch.Tensor, taps: list[int], kind: str, k: Optional[int]
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[torch.Tensor]]:
        def state(x: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, W] or [B, 2W]
            return x[:, 0] if kind == "cls" else torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=-1)

        x = self.visual._embeds(pixels)  # [B, T, W]
        states = {0: state(x)} if 0 in taps else {}
        tokens = None
        for i, block in enumerate(self._blocks()):
            if k and i == self.num_blocks - k:
                tokens = x
            x = block(x)
            if i + 1 in taps:
                states[i + 1] = state(x)
        return self._pool(x), tokens, [states[t] for t in taps]

    # ---- training support ------------------------------------------------------------------------

    def top_blocks(self, k: int) -> nn.Module:
        """A standalone copy (exact weights, all trainable) of the last k blocks and the pooling head:
        a `TopBlocks` for a ViT, a `families.StageTop` for the other families."""
        self.check_split(k)
        if self.split is not None:
            top = copy.deepcopy(self.split.top(k, self.model_config_json))
            return top.requires_grad_(True).train(self.training)
        blocks = copy.deepcopy(self._blocks()[self.num_blocks - k :])
        head = copy.deepcopy(PoolHead(self.visual)) if self.pooling == "model" else None
        top = TopBlocks(blocks, head, self.pooling, self.model_config_json)
        return top.requires_grad_(True).train(self.training)

    def set_trainable_blocks(self, k: Optional[int], tune_head: bool = True) -> None:
        """Freeze everything but the top k blocks and the pooling head; k = None or -1: all trainable.

        With 'mean' pooling the head (ln_post, proj) is unused and stays frozen, so no parameter is
        trainable without receiving a gradient. `tune_head=False` keeps the head frozen whatever the
        pooling (the PixelRec code freezes CLIP ResNets' attnpool while tuning their last stages).
        """
        all_trainable = k is None or k < 0
        self.visual.requires_grad_(all_trainable)
        if self.split is not None:
            self._set_trainable_split(None if all_trainable else k, tune_head)
            return
        if not all_trainable:
            self._require_vit(f"--tune-blocks {k}")
            if k > self.num_blocks:
                raise PixelrecError(f"--tune-blocks {k}: {self.config.model} has only {self.num_blocks} blocks")
            for block in self._blocks()[self.num_blocks - k :]:
                block.requires_grad_(True)
        if self.supports_split:
            head_trainable = self.pooling == "model" and tune_head
            for part in self._head_modules():
                part.requires_grad_(head_trainable)

    def _set_trainable_split(self, k: Optional[int], tune_head: bool = True) -> None:
        """ResNet / Swin / ConvNeXt: the top k blocks and the head parts the pooling uses are trainable
        (the head parts only with tune_head); what lies below the cut stays in eval mode while training
        (BatchNorm keeps its running statistics)."""
        split = self.split
        if k is not None:
            if k > split.num_blocks:
                raise PixelrecError(f"--tune-blocks {k}: {self.config.model} has only {split.num_blocks} blocks "
                                    f"({split.describe_range()})")
            for unit in split.units[split.cut(k):]:
                unit.requires_grad_(True)
            self._frozen_below = split.frozen_modules(k)
        else:
            self._frozen_below = []
        for part in split.tail_modules():
            part.requires_grad_(tune_head)
        for part in split.unused_head_modules():
            part.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if mode:
            for module in getattr(self, "_frozen_below", ()):
                module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        if not self.supports_split and hasattr(self.visual, "set_grad_checkpointing"):
            self.visual.set_grad_checkpointing(enable)


# ---- construction ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's root-logger warnings ("Model initialized randomly", ...)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def is_random_init(pretrained: str | None) -> bool:
    """Whether `--pretrained` leaves the encoder on its seeded random initialisation."""
    return str(pretrained or "none") in ("", "none")


def random_init_warning(model: str, pretrained: str | None) -> str | None:
    """The one warning line for a real encoder on random weights; None with pretrained weights or for
    pixelrec's tiny test configs (TEST_MODELS), which are random by design."""
    if not is_random_init(pretrained) or model in TEST_MODELS:
        return None
    return (f"warning: {model} with --pretrained none runs on random weights (a random-init encoder): "
            f"its image embeddings carry no pretrained knowledge; give --pretrained /path/to/checkpoint")


def _unknown_model(name: str) -> PixelrecError:
    names = open_clip.list_models()
    close = difflib.get_close_matches(name, names, n=3)
    examples = close or ["ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50"]
    return PixelrecError(
        f"unknown model {name!r}; valid names include {', '.join(examples)} and the tiny test model "
        f"{TINY_MODEL} ({len(names)} in all, see open_clip.list_models())"
    )


def _resolve_pretrained(model: str, pretrained: str) -> tuple[Optional[str], Optional[Path]]:
    """-> (open_clip tag, local checkpoint path); both None for random init."""
    if pretrained in ("", "none", None):
        return None, None
    if os.path.isfile(pretrained):
        return None, Path(pretrained)
    if open_clip.get_pretrained_cfg(model, pretrained):
        return pretrained, None
    if os.sep in pretrained or "/" in pretrained or Path(pretrained).suffix in CHECKPOINT_SUFFIXES:
        raise PixelrecError(f"--pretrained {pretrained}: checkpoint file not found")
    tags = open_clip.list_pretrained_tags_by_model(model)
    known = (
        f"tags for {model}: {', '.join(tags[:6])}{', ...' if len(tags) > 6 else ''}"
        if tags
        else f"open_clip has no pretrained tags for {model}"
    )
    raise PixelrecError(f"--pretrained {pretrained}: not a checkpoint file nor an open_clip tag ({known})")


def _load_local_checkpoint(clip: nn.Module, path: Path, model: str) -> None:
    """Load a local checkpoint into clip.visual: a full CLIP or ImageEncoder state dict ('visual.*' keys)
    or a bare vision tower state dict (for timm towers also in timm's own layout, mapped onto open_clip's
    with a log line). Position embeddings are resized to the model's grid."""
    state, openai = read_checkpoint(path)  # also OpenAI's TorchScript archives
    check_openai_activation(path, openai, clip.visual, model)  # OpenAI weights need QuickGELU blocks
    state, note = from_timm_layout(state, clip.visual, str(path))  # e.g. timm's Swin-B weights
    if note:
        log(note)
    if not any(key.startswith("visual.") for key in state):
        state = {f"visual.{key}": value for key, value in state.items()}
    resize_pos_embed(state, clip)
    visual_state = {key[len("visual.") :]: value for key, value in state.items() if key.startswith("visual.")}
    problem = describe_state_mismatch(clip.visual.state_dict(), visual_state, model)  # e.g. a missing block, a width
    if problem:
        raise PixelrecError(f"{path} does not fit {model}: {problem}")
    try:
        incompatible = clip.visual.load_state_dict(visual_state, strict=False)
    except RuntimeError as exc:
        raise PixelrecError(f"{path} does not fit {model}: {str(exc).splitlines()[-1].strip()}") from None
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise PixelrecError(
            f"{path} does not fit {model}: missing {incompatible.missing_keys[:3]}, "
            f"unexpected {incompatible.unexpected_keys[:3]}"
        )


def _preprocess_cfg(visual: nn.Module, cfg: EncoderConfig) -> dict:
    if cfg.preset == "default":
        out = dict(visual.preprocess_cfg)
    else:  # pixelrec reference: transforms.Resize((S, S)) (bilinear), ToTensor, Normalize(0.5, 0.5)
        size = to_2tuple(visual.preprocess_cfg["size"])
        out = asdict(
            PreprocessCfg(
                size=size,
                mean=PIXELREC_MEAN_STD,
                std=PIXELREC_MEAN_STD,
                interpolation="bilinear",
                resize_mode="squash",
            )
        )
    out["size"] = list(to_2tuple(out["size"]))
    out["mean"], out["std"] = list(out["mean"]), list(out["std"])
    return out


def _check_image_size(size: int, model: str, vision_cfg: dict) -> None:
    """Refuse an --image-size the tower cannot run (below one patch) or that would exhaust memory."""
    patch = None if vision_cfg.get("timm_model_name") else vision_cfg.get("patch_size")
    if patch:
        minimum, why = int(patch), f"the patch size of {model}"
    else:
        minimum, why = MIN_IMAGE_SIZE, f"{model} downsamples by a factor of 32"
    if size < minimum:
        raise PixelrecError(f"--image-size {size}: expected at least {minimum} pixels ({why})")
    if size > MAX_IMAGE_SIZE:
        raise PixelrecError(f"--image-size {size}: expected at most {MAX_IMAGE_SIZE} pixels "
                            f"(the largest input pixelrec accepts; larger ones exhaust memory)")


def build_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu") -> ImageEncoder:
    """Create the encoder described by `cfg` (eval mode) on `device`. Never downloads unless
    `cfg.pretrained` is an open_clip tag."""
    if cfg.pooling not in POOLINGS:
        raise PixelrecError(f"--pooling {cfg.pooling}: expected one of {', '.join(POOLINGS)}")
    if cfg.preset not in PRESETS:
        raise PixelrecError(f"--preset {cfg.preset}: expected one of {', '.join(PRESETS)}")
    model_config = open_clip.get_model_config(cfg.model) if cfg.model in open_clip.list_models() else None
    if model_config is None:
        raise _unknown_model(cfg.model)
    if cfg.image_size is not None:
        _check_image_size(cfg.image_size, cfg.model, model_config["vision_cfg"])
        model_config["vision_cfg"]["image_size"] = cfg.image_size
    tag, path = _resolve_pretrained(cfg.model, cfg.pretrained)

    with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            clip = open_clip.create_model(
                cfg.model,
                pretrained=tag,
                force_image_size=cfg.image_size,
                pretrained_text=False,
                device="cpu",
            )
        except RuntimeError as exc:
            if tag is None:
                raise
            raise PixelrecError(
                f"cannot load pretrained {cfg.model}/{tag}: {exc}; download it elsewhere and pass the file path"
            ) from None
    if path is not None:
        _load_local_checkpoint(clip, path, cfg.model)
    visual = clip.visual
    del clip  # the text tower is never used
    encoder = ImageEncoder(visual, cfg, model_config, _preprocess_cfg(visual, cfg))
    return encoder.to(device).eval()
