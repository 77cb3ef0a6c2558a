"""Stage one: encode cover images once into an HDF5 embedding cache, which the later stages read.

`build_encoder` wraps an open_clip vision tower (`ImageEncoder`, splittable into `TopBlocks` for
ViTs), `encode_images` runs it over a catalogue into a cache, `open_cache` reads one back and
`verify_cache` checks one completely.
"""

from .pipeline import EncodeConfig, EncodeSummary, encode_images
from .cache import CacheVerification, CacheWriter, EmbeddingCache, open_cache, partial_path, verify_cache
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
    "CacheVerification",
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
    "verify_cache",
]
