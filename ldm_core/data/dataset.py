"""A map-style torch Dataset over the canonical image shards (what the autoencoder trainer and the latent-store
builder read).

Only the small columns (caption, size, attributes, …) are loaded up front. Image bytes are fetched one shard at a
time, when an index in that shard is first asked for, and kept (all shards by default, or the most recently used
``max_cached_shards``); they are decoded on every access unless ``cache_decoded=True``, which keeps the model-ready
tensors (fine for the tiny embedded datasets, not for real ones).

Bit rot is refused (`ldm_core.data.integrity`): opening checks each shard's size against the manifest, and the
first time a shard's images are fetched in a process the whole file is read and its sha256 checked (the image
column is most of a shard, so this costs one hash, not another read).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm_core import storage
from ldm_core.data import canonical
from ldm_core.data.images import decode_rgb
from ldm_core.data.integrity import CorruptShardError

log = logging.getLogger(__name__)


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is ``resolution`` (bicubic, antialiased), then crop the centre square."""
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]: the convention of every LDM autoencoder."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(a / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (3, H, W)


class ImageShardDataset(Dataset):
    """The rows of one split of a canonical dataset, as model-ready image tensors.

    ``split``: ``"train"``, ``"validation"`` or ``None`` for every row. ``dataset[i]`` is a float tensor
    (3, resolution, resolution) in [-1, 1]; ``rows(indices)`` gives the non-image columns (caption, attributes…).
    """

    def __init__(
        self,
        url: str,
        split: str | None = "train",
        resolution: int = 32,
        storage_options: dict[str, Any] | None = None,
        *,
        cache_decoded: bool = False,
        max_cached_shards: int | None = None,
    ) -> None:
        if split is not None and split not in canonical.SPLITS:
            raise ValueError(f"split must be one of {canonical.SPLITS} or None, got {split!r}")
        manifest = canonical.read_manifest(url, storage_options)
        if manifest is None:
            raise FileNotFoundError(f"no {canonical.MANIFEST_NAME} under {url}: ingest a source there first")
        self.url = url
        self.split = split
        self.resolution = resolution
        self.storage_options = storage_options
        self.cache_decoded = cache_decoded
        self.max_cached_shards = max_cached_shards
        self.attribute_names: list[str] = list(manifest.attribute_columns)
        self._shards: list[str] = manifest.shard_names()
        self._infos: list[canonical.ShardInfo] = list(manifest.shards)
        self._verified: set[int] = set()  # shards whose sha256 this process has checked
        self.unchecked_shards = sum(info.sha256 is None for info in self._infos)
        """Shards whose manifest entry records no sha256: read without a check."""
        if self.unchecked_shards:
            log.warning(
                "%d of %d shards of %s have no recorded sha256 (written before it was recorded): they are "
                "read unchecked",
                self.unchecked_shards,
                len(self._infos),
                storage.redact_url(url),
            )
        # per selected row: (shard number, row within the shard) and its small columns
        self._where: list[tuple[int, int]] = []
        self._meta: list[dict[str, Any]] = []
        for k, name in enumerate(self._shards):
            _check_size(url, self._infos[k], storage_options)
            try:
                present = canonical.shard_columns(url, name, storage_options)
                columns = [c for c in present if c != "image"]
                table = canonical.read_shard(url, name, columns=columns, storage_options=storage_options)
            except Exception as e:
                # a shard that does not parse: bit rot when its sha256 says so (then named as such), else as it is
                if self._infos[k].sha256 is not None:
                    canonical.read_shard(url, name, columns=[], storage_options=storage_options, verify=self._infos[k])
                raise e
            for j, row in enumerate(table.to_pylist()):
                if split is None or row["split"] == split:
                    for a in self.attribute_names:
                        row.setdefault(a, None)  # a shard without this attribute's column
                    self._where.append((k, j))
                    self._meta.append(row)
        self._images: OrderedDict[int, pa.BinaryArray] = OrderedDict()
        self._decoded: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._where)

    @property
    def captions(self) -> list[str]:
        return [m["caption"] for m in self._meta]

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The non-image columns of these rows (id, caption, width, height, sha256, source, split, attributes)."""
        return [dict(self._meta[self._check(i)]) for i in indices]

    def _check(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} rows")
        return i % n

    def _shard_images(self, k: int) -> pa.BinaryArray:
        if k in self._images:
            self._images.move_to_end(k)
            return self._images[k]
        info = None if k in self._verified else self._infos[k]
        table = canonical.read_shard(
            self.url, self._shards[k], columns=["image"], storage_options=self.storage_options, verify=info
        )
        self._verified.add(k)
        images = table.column("image").combine_chunks()
        self._images[k] = images
        if self.max_cached_shards is not None:
            while len(self._images) > self.max_cached_shards:
                self._images.popitem(last=False)
        return images

    def image_bytes(self, i: int) -> bytes:
        """The stored bytes of row ``i`` (the original file or a PNG)."""
        k, j = self._where[self._check(i)]
        return self._shard_images(k)[j].as_py()

    def pil_image(self, i: int) -> Image.Image:
        """Row ``i`` as stored: RGB, its own size, not resized."""
        return decode_rgb(self.image_bytes(i))

    def __getitem__(self, i: int) -> torch.Tensor:
        i = self._check(int(i))
        if i in self._decoded:
            return self._decoded[i]
        x = image_to_tensor(resize_center_crop(self.pil_image(i), self.resolution))  # (3, R, R)
        if self.cache_decoded:
            self._decoded[i] = x
        return x

    def get_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Images of these rows stacked: (B, 3, resolution, resolution)."""
        if len(indices) == 0:
            return torch.empty(0, 3, self.resolution, self.resolution)
        return torch.stack([self[int(i)] for i in indices])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers fetch their own shards: do not ship cached bytes to each of them
        state = self.__dict__.copy()
        state["_images"] = OrderedDict()
        state["_decoded"] = {} if not self.cache_decoded else dict(self._decoded)
        return state


def _check_size(url: str, info: canonical.ShardInfo, storage_options: dict[str, Any] | None) -> None:
    """A truncated or replaced shard is refused at open already (one stat, no read)."""
    shard_url = storage.join(url, info.name)
    fs, path = storage.get_fs(shard_url, storage_options)
    with storage.naming_errors(shard_url, "checking the shard"):
        size = int(fs.size(path))
    if info.sha256 is not None and size != info.bytes:  # (no sha256 recorded: the size goes unchecked too)
        raise CorruptShardError(
            "dataset",
            info.name,
            shard_url,
            f"{size} bytes, {info.bytes} recorded",
            "ingest the source again into a new dataset URL",
        )
