"""The HDF5 embedding cache: what `encode` writes and `fit` / `index` read.

Layout of a complete cache file:

    item_ids          [N]          utf-8 strings, the encoded items in catalogue (sorted id) order
    embeddings        [N, E]       float16 (default) or float32, row i belongs to item_ids[i]
    tokens            [N, T, W]    optional, same dtype: activations entering the last `split_block`
                                   blocks (ViT: T tokens incl. the class token, width W; ResNet, Swin,
                                   ConvNeXt: the feature map's H x W positions, W channels last)
    hidden            [N, taps, W] optional, same dtype: per-layer states of the same forward pass
                                   (`encode --hidden cls|cls+mean --taps ...`): a ViT's class token
                                   after each tapped block (cls+mean: and the mean of its patch tokens,
                                   concatenated); other towers: each tapped stage's output averaged over
                                   positions, zero-padded to the widest tap (`hidden_widths`)
    failed_item_ids   [F]          utf-8 strings: items whose image could not be encoded ...
    failed_reasons    [F]          ... and why ("missing", "zero-byte file", "corrupt ...")
    blocks            [B]          one record per committed block (batch), in order (BLOCK_DTYPE):
                                   end_position (catalogue position after it), rows, failed and crc32,
                                   the checksum of the block's item ids, embeddings, tokens, hidden,
                                   failed ids and reasons (see `block_checksum`); absent in format 1
    top_blocks/       group        with tokens: float32 weights of the last K blocks and the pooling
                                   head, one dataset per state_dict key; attrs model_config, k, pooling
                                   (+ family, grid, windows for non-ViT towers: `families.StageTop`)
    attrs             model, pretrained, image_size, dim, normalized, created, pixelrec_version,
                      pooling, preset, model_config (json), preprocess (json), embedding_dtype,
                      split_block (0 = no tokens), hidden ("" = no states), hidden_taps,
                      hidden_widths, hidden_tap_range, weights_sha256, items_sha256, n_catalogue,
                      positions_done, n_rows, n_failed, n_blocks, checksum ("crc32"),
                      format_version, complete

Writing (`CacheWriter`) goes to `<out>.partial`, opened without HDF5's chunk cache so every dataset
write reaches the file at once and a failure (disk full, read-only, I/O error) is raised where it
happens, as a one-line PixelrecError. Each batch is one block: its rows, its failures and its block
record are written, then `positions_done` / `n_rows` / `n_failed` / `n_blocks` commit it, then the
file is flushed, so a killed process loses at most the block in flight. `resume()` re-verifies
every committed block against its checksum and drops anything after the last good one (copying
the good blocks into a fresh file when a failed write left HDF5 unable to cut the file back).
`finish()` flushes and fsyncs the file, re-reads and verifies every block (a write that failed
silently is never published), then sets `complete`, fsyncs again and renames the file onto `<out>`;
`open_cache` refuses anything without `complete`, or whose counts or last block do not add up.
`verify_cache` checks every block of a file on demand.

Caches of format 1 (written before block checksums) still open: only their counts are checked.

Reading (`EmbeddingCache`) reads rows on demand (arbitrary, unsorted, repeated row arrays) unless
`in_memory=True`; a large cache is never loaded whole unless asked. Token rows, the `partial`
tower's hot path, are read through a memory map of the file at each chunk's byte offset (one copy
per distinct row, no HDF5 selection; `_MappedRows`), other datasets by chunks.

The code lives in four modules, re-exported here: `cache_format` (constants, recorded settings,
block checksums and checks, write errors), `cache_writer` (`CacheWriter`), `cache_reader`
(`EmbeddingCache`, `open_cache`) and `cache_verify` (`verify_cache`).
"""

from .cache_format import (BLOCK_DTYPE, CHECKSUM, FORMAT_VERSION, IDENTITY_ATTRS, PARTIAL_SUFFIX, SETTING_ATTRS,
                           _ABANDONED, HeldByFailedWriter, UnusablePartial, block_checksum, partial_path,
                           read_cache_attrs, settings_mismatch)
from .cache_reader import EmbeddingCache, _MappedRows, _gather, cache_identity, open_cache
from .cache_verify import CacheVerification, verify_cache
from .cache_writer import CacheWriter

__all__ = [
    "BLOCK_DTYPE", "CHECKSUM", "FORMAT_VERSION", "IDENTITY_ATTRS", "PARTIAL_SUFFIX", "SETTING_ATTRS",
    "CacheVerification", "CacheWriter", "EmbeddingCache", "HeldByFailedWriter", "UnusablePartial",
    "block_checksum", "cache_identity", "open_cache", "partial_path", "read_cache_attrs", "settings_mismatch",
    "verify_cache",
    "_ABANDONED", "_MappedRows", "_gather",  # internals the tests reach through this module
]
