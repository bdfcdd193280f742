"""The latent store: every image of a canonical dataset encoded ONCE by the frozen autoencoder, with its caption's
text embeddings, so that diffusion training reads small tensors instead of decoding images every step.

Layout under the store URL (a local path or ``s3://bucket/prefix``)::

    latent_store.json                     the truth: identities, shapes, dtype, and the shards that are complete
    uncond.safetensors                    the empty prompt's embedding (1, L, D), mask (1, L) and pooled vector
                                          (1, D_pool), fp32: the null caption of classifier-free guidance
    shards/shard-00000-1f2e3d4c.zarr/     one Zarr group per dataset shard (backend "zarr"), or
    shards/shard-00000-1f2e3d4c.parquet   one Parquet file per dataset shard (backend "parquet")

One dataset shard becomes one store shard, named after it plus a random token. A shard is written completely
first and recorded in ``latent_store.json`` (written atomically) only afterwards; a shard a killed run left
behind is never named there, so readers ignore it and the next run deletes it and encodes the dataset shard
again. Recorded shards are immutable. This makes `encode_dataset` resumable (completed shards are skipped) and
incremental (a dataset that grew gets only its new shards encoded).

Inside a shard the rows are grouped by split, train rows first: a split is a contiguous row range of every shard,
so a reader builds its index from the metadata alone. Per row: ``latents`` (the posterior mean, or one posterior
sample, unscaled, (C, h, w)), ``logvar`` (moments only), ``context`` (L, D), ``context_mask`` (L,), ``pooled``
(D_pool,: the text encoder's pooled caption vector, `TextEncoder.pooling`), and ``id``, ``caption``, ``split`` and
the dataset's attribute columns. Tensors are stored in the configured dtype (bf16 as its raw 16-bit pattern, since
neither NumPy, Zarr nor Parquet has a bf16 type).

``latent_store.json`` names its format (``ldm-latent-store/2``: every shard has the pooled field and its files'
sha256s). A store of another format is refused on open, with one line saying to delete it and encode the dataset
again: a store is a cache of its dataset, rebuilt by `encode_dataset`.

The latent scale is NOT applied in the store: the store holds the autoencoder's own latents plus the scale and
shift it was trained with, and readers apply them through `scale_latents`, the one function that maps
autoencoder latents into diffusion space.

One writer at a time per store (no cross-process locking); any number of readers.

    schema.py    file names, `LatentStoreConfig`, the metadata (`LatentStoreMetadata`), results, the null caption
    backends.py  the Zarr and Parquet shard formats and the storage dtypes
    writer.py    `LatentStoreWriter`: atomic shards, then the metadata
    reader.py    `LatentStore`: metadata, shards by split, rows
    encoding.py  `encode_dataset`: a canonical dataset through the frozen autoencoder and the text encoder
"""

from ldm_core.data.latent_store.backends import ShardColumns
from ldm_core.data.latent_store.encoding import encode_dataset
from ldm_core.data.latent_store.reader import LatentStore
from ldm_core.data.latent_store.schema import (
    EncodeProgress,
    EncodeResult,
    LatentStoreConfig,
    LatentStoreFormatError,
    LatentStoreMetadata,
    LatentStoreMismatchError,
    StoreShard,
    read_metadata,
)
from ldm_core.data.latent_store.writer import LatentStoreWriter

__all__ = [
    "EncodeProgress",
    "EncodeResult",
    "LatentStore",
    "LatentStoreConfig",
    "LatentStoreFormatError",
    "LatentStoreMetadata",
    "LatentStoreMismatchError",
    "LatentStoreWriter",
    "ShardColumns",
    "StoreShard",
    "encode_dataset",
    "read_metadata",
]
