"""Stage one: encode cover images once into an HDF5 embedding cache (SPEC §1, §5).

`build_encoder` wraps an open_clip vision tower (`ImageEncoder`, splittable into `TopBlocks` for
ViTs), `encode_images` runs it over a catalogue into a cache, `open_cache` reads one back.
"""

from .pipeline import EncodeConfig, EncodeSummary, encode_images
from .cache import CacheWriter, EmbeddingCache, open_cache, partial_path
from .encoder import (
    TINY_MODEL,
    EncoderConfig,
    ImageEncoder,
    PixelLoader,
    TopBlocks,
    build_encoder,
)

__all__ = [
    "TINY_MODEL",
    "CacheWriter",
    "EmbeddingCache",
    "EncodeConfig",
    "EncodeSummary",
    "EncoderConfig",
    "ImageEncoder",
    "PixelLoader",
    "TopBlocks",
    "build_encoder",
    "encode_images",
    "open_cache",
    "partial_path",
]
