"""The latent store: images encoded once (Zarr or Parquet, local or s3://), read back exactly, resumable and
incremental encoding, identity guards, and the LatentDataset the LDM trainer reads."""

import hashlib
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ldm_core import storage
from ldm_core.data import ImageShardDataset, IngestConfig, ingest, write_shapes_source
from ldm_core.data.latent_dataset import LatentDataset
from ldm_core.data.latent_store import backends, schema
from ldm_core.data.latent_store import writer as store_writer
from ldm_core.data.latent_store.encoding import encode_dataset
from ldm_core.data.latent_store.reader import LatentStore
from ldm_core.data.latent_store.schema import LatentStoreConfig, LatentStoreMismatchError
from ldm_core.data.synthetic import png_bytes
from ldm_core.models.autoencoder import AutoencoderKL, autoencoder_preset, scale_latents, unscale_latents
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.trainers.data_order import BatchStream, DataPosition, EpochBatchSampler

N_IMAGES, ROWS_PER_SHARD = 40, 10
SCALE, SHIFT = 0.7, 0.1


@pytest.fixture(scope="module")
def text():
    return TextEncoder(TextEncoderConfig(max_length=8))


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    # a non-trivial scale and shift, so that applying them (once) is visible
    return AutoencoderKL(autoencoder_preset("tiny", scaling_factor=SCALE, shift_factor=SHIFT)).eval()


def _make_dataset(root: str, n: int = N_IMAGES) -> str:
    write_shapes_source(os.path.join(root, "src"), n, seed=0)
    url = os.path.join(root, "ds")
    ingest(IngestConfig(source=os.path.join(root, "src"), rows_per_shard=ROWS_PER_SHARD, val_fraction=0.25), url)
    return url


@pytest.fixture(scope="module")
def dataset_url(tmp_path_factory):
    return _make_dataset(str(tmp_path_factory.mktemp("latents")))


def _cfg(**kw) -> LatentStoreConfig:
    return LatentStoreConfig(resolution=32, batch_size=8, **kw)


@pytest.fixture(scope="module")
def fp32_store(dataset_url, vae, text, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("fp32") / "store")
    encode_dataset(dataset_url, url, vae, text, _cfg(dtype="fp32"), vae_identity="models:/ldm-vae/1")
    return url


def _all(store: LatentStore, fields=schema.TENSOR_FIELDS):
    """Every row of a store: ids and tensors concatenated in store order."""
    ids, tensors = [], {f: [] for f in fields}
    for k in range(len(store.shards)):
        ids += [r["id"] for r in store.read_rows(k)]
        for f, t in store.read_shard(k, fields).items():
            tensors[f].append(t)
    return ids, {f: torch.cat(v) for f, v in tensors.items()}


def _tree_digest(path: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------------------------
# Contents
# --------------------------------------------------------------------------------------------------------------


def test_store_equals_fresh_encodes(dataset_url, fp32_store, vae, text):
    images = ImageShardDataset(dataset_url, split=None, resolution=32)
    by_id = {r["id"]: i for i, r in enumerate(images.rows(range(len(images))))}
    store = LatentStore(fp32_store)
    ids, got = _all(store)
    assert sorted(ids) == sorted(by_id) and len(ids) == N_IMAGES
    order = [by_id[i] for i in ids]
    # fresh encodes in the encoder's batches (8 rows of one shard, in store order): batching changes BLAS blocking
    mean, logvar, emb, mask, pooled = [], [], [], [], []
    for k, shard in enumerate(store.shards):
        first = int(store.offsets[k])
        for s in range(first, first + shard.rows, 8):
            rows = order[s : min(s + 8, first + shard.rows)]
            with torch.inference_mode():
                post = vae.encode(images.get_batch(rows))  # (b, 3, 32, 32) -> (b, 4, 8, 8)
                e = text.encode([r["caption"] for r in images.rows(rows)])
            mean.append(post.mean), logvar.append(post.logvar), emb.append(e.embeddings), mask.append(e.mask)
            pooled.append(e.pooled)
    assert got["latents"].dtype == torch.float32 and got["latents"].shape == (N_IMAGES, 4, 8, 8)
    assert (got["latents"] - torch.cat(mean)).abs().max() <= 1e-6
    assert (got["logvar"] - torch.cat(logvar)).abs().max() <= 1e-6
    assert (got["context"] - torch.cat(emb)).abs().max() <= 1e-6
    assert torch.equal(got["context_mask"], torch.cat(mask))
    assert (got["pooled"] - torch.cat(pooled)).abs().max() <= 1e-6 and got["pooled"].shape == (
        N_IMAGES,
        text.pooled_dim,
    )
    meta = store.metadata
    assert meta.vae_identity == "models:/ldm-vae/1" and meta.text_encoder_identity == text.identity
    assert (meta.scaling_factor, meta.shift_factor) == (SCALE, SHIFT)
    assert meta.latent_shape == [4, 8, 8] and meta.context_shape == [8, text.dim]
    assert meta.rows == N_IMAGES == sum(s.rows for s in meta.shards) and len(meta.shards) == N_IMAGES // ROWS_PER_SHARD
    ctx, mask, pooled = store.uncond()
    empty = text.empty()
    assert torch.equal(ctx, empty.embeddings) and torch.equal(mask, empty.mask) and ctx.shape == (1, 8, text.dim)
    assert (
        torch.equal(pooled, empty.pooled)
        and pooled.shape == (1, text.pooled_dim)
        and meta.pooled_dim == text.pooled_dim
    )


def test_rows_are_grouped_by_split_and_datasets_select_them(dataset_url, fp32_store):
    images = ImageShardDataset(dataset_url, split=None, resolution=32)
    split_of = {r["id"]: r["split"] for r in images.rows(range(len(images)))}
    store = LatentStore(fp32_store)
    for k, shard in enumerate(store.shards):
        splits = [r["split"] for r in store.read_rows(k)]
        assert splits == ["train"] * shard.train_rows + ["validation"] * shard.validation_rows
    train = LatentDataset(fp32_store, "train")
    val = LatentDataset(fp32_store, "validation")
    both = LatentDataset(fp32_store, None)
    assert 0 < len(val) < len(train) and len(train) + len(val) == len(both) == N_IMAGES
    assert {r["id"] for r in train.rows(range(len(train)))} == {i for i, s in split_of.items() if s == "train"}
    assert {r["id"] for r in val.rows(range(len(val)))} == {i for i, s in split_of.items() if s == "validation"}


def test_zarr_and_parquet_return_identical_tensors(dataset_url, fp32_store, vae, text, tmp_path):
    dtype = "bf16"  # the one without a NumPy type (stored as raw bits); fp16 goes through the same code
    stores = {}
    for backend in ("zarr", "parquet"):
        url = str(tmp_path / backend)
        encode_dataset(
            dataset_url, url, vae, text, _cfg(backend=backend, dtype=dtype), vae_identity="models:/ldm-vae/1"
        )
        stores[backend] = LatentStore(url)
    (zid, z), (pid, p) = _all(stores["zarr"]), _all(stores["parquet"])
    assert zid == pid
    for f in schema.TENSOR_FIELDS:
        assert z[f].dtype == p[f].dtype and torch.equal(z[f], p[f]), f
    assert z["latents"].dtype == backends.TORCH_DTYPE[dtype]
    # the reduced-precision store holds exactly the fp32 values rounded to its dtype
    _, ref = _all(LatentStore(fp32_store))
    for f in ("latents", "logvar", "context"):
        assert torch.equal(z[f], ref[f].to(backends.TORCH_DTYPE[dtype])), f
    rows = [stores[b].read_rows(k) for b in stores for k in range(len(stores[b].shards))]
    assert rows[: len(rows) // 2] == rows[len(rows) // 2 :]
    batch = {b: LatentDataset(stores[b].url, None).get_batch([3, 17, 0, 39]) for b in stores}
    for f in batch["zarr"]:
        assert torch.equal(batch["zarr"][f], batch["parquet"][f])


def test_dataset_applies_the_scale_once(fp32_store):
    store = LatentStore(fp32_store)
    _, raw = _all(store)
    data = LatentDataset(fp32_store, None)
    batch = data.get_batch(range(len(data)))
    assert batch["latents"].dtype == torch.float32 and batch["context"].dtype == torch.float32
    assert batch["context_mask"].dtype == torch.bool
    assert torch.equal(batch["latents"], (raw["latents"] - SHIFT) * SCALE)
    assert torch.allclose(batch["latents"].std(), SCALE * raw["latents"].std(), rtol=1e-5)
    assert torch.allclose(unscale_latents(batch["latents"], SCALE, SHIFT), raw["latents"], atol=1e-6)
    assert torch.equal(scale_latents(raw["latents"], SCALE, SHIFT), batch["latents"])
    # one row through __getitem__ collates to the same batch
    item = data[5]
    assert torch.equal(item["latents"], batch["latents"][5]) and torch.equal(item["context"], batch["context"][5])


def test_streaming_cache_modes_agree_with_resident(fp32_store):
    idx = torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(0))[:16].tolist()
    ref = LatentDataset(fp32_store, None).get_batch(idx)
    assert LatentDataset(fp32_store, None).resident
    row_bytes = LatentDataset(fp32_store, None).row_bytes
    variants = [
        LatentDataset(fp32_store, None, max_cache_bytes=row_bytes * ROWS_PER_SHARD, prefetch=2),  # LRU of 1 shard
        LatentDataset(fp32_store, None, cache=False, prefetch=0),
        LatentDataset(fp32_store, None, prefetch=0),
    ]
    assert not variants[0].resident and variants[0].max_cached_shards == 1
    for data in variants:
        for _ in range(2):  # cold, then warm
            got = data.get_batch(idx)
            for f in ref:
                assert torch.equal(got[f], ref[f]), f
        data.close()
    assert len(variants[0]._lru) <= 1


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("split", ["train", "validation"])  # train: parts starting at row 0; validation: inside
@pytest.mark.parametrize("resident", [True, False])
def test_loader_threads_call_no_torch_op_that_computes(fp32_store, split, resident):
    """A loading thread that runs a torch copy gets an OpenMP team of its own, and libgomp then throttles its
    spin-wait for the whole process: the training step ran ~2x slower at 2 threads while such threads lived (see
    LatentDataset._load). Loading moves memory with NumPy; torch only makes views of it."""
    data = LatentDataset(fp32_store, split, prefetch=0, cache=resident)
    ref = data.get_batch(list(range(len(data))))  # loads every part (and allocates the resident tensors)
    assert data.resident == resident and all(0 < n < ROWS_PER_SHARD for _, _, n in data._parts)
    for p in range(len(data._parts)):
        with _AtenOps() as mode:
            data._load(p)
        assert set(mode.ops) <= {"view", "slice", "alias", "detach", "lift_fresh"}, mode.ops
    assert all(torch.equal(data.get_batch(list(range(len(data))))[f], ref[f]) for f in ref)  # reloaded the same
    data.close()


def test_numpy_view_shares_bf16_memory_bit_for_bit():
    t = torch.randn(5, 3).to(torch.bfloat16)
    copy = torch.from_numpy(backends.numpy_view(t)[1:4].copy()).view(torch.bfloat16)
    assert torch.equal(copy.view(torch.int16), t[1:4].view(torch.int16))
    backends.numpy_view(t)[0] = backends.numpy_view(copy)[0]
    assert torch.equal(t[0], copy[0])


def test_posterior_sampling_is_deterministic_and_distributed_as_stored(fp32_store):
    store = LatentStore(fp32_store)
    _, raw = _all(store)
    a = LatentDataset(fp32_store, None, sample_posterior=True, seed=3)
    b = LatentDataset(fp32_store, None, sample_posterior=True, seed=3)
    full = a.get_batch(range(N_IMAGES))
    # same seed -> same draws, whatever the batch composition
    assert torch.equal(b.get_batch([7, 2])["latents"], full["latents"][[7, 2]])
    eps = (unscale_latents(full["latents"], SCALE, SHIFT) - raw["latents"]) / torch.exp(0.5 * raw["logvar"])
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1.0) < 0.05
    a.set_epoch(1)
    assert not torch.equal(a.get_batch([7])["latents"], full["latents"][[7]])


def test_the_training_stream_draws_a_fresh_posterior_sample_every_epoch_and_the_mean_without(fp32_store):
    store = LatentStore(fp32_store)
    _, raw = _all(store)
    whole = EpochBatchSampler(N_IMAGES, N_IMAGES, seed=0, shuffle=False)  # one batch per epoch, rows in order

    def stream(start: DataPosition | None = None, **kw) -> BatchStream:
        return BatchStream(LatentDataset(fp32_store, None, **kw), whole, start or DataPosition())

    sampled = stream(sample_posterior=True, seed=3)
    epochs = [sampled.next()["latents"] for _ in range(2)]
    for z in epochs:  # each epoch's draw is N(mean, exp(logvar)) around the stored moments
        eps = (unscale_latents(z, SCALE, SHIFT) - raw["latents"]) / torch.exp(0.5 * raw["logvar"])
        assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1.0) < 0.05
    assert not torch.equal(epochs[0], epochs[1]), "every epoch must draw anew, as SD-1 does"
    resumed = stream(DataPosition(1, 0), sample_posterior=True, seed=3).next()["latents"]
    assert torch.equal(resumed, epochs[1]), "a run resumed in epoch 1 must draw what the uninterrupted run drew"

    means = stream()  # the default: the posterior mean, every epoch, as before the option existed
    for _ in range(2):
        assert torch.equal(means.next()["latents"], scale_latents(raw["latents"], SCALE, SHIFT))


def test_sample_content_is_reproducible(dataset_url, fp32_store, vae, text, tmp_path):
    urls = [str(tmp_path / f"s{i}") for i in range(2)]
    for u in urls:
        encode_dataset(
            dataset_url,
            u,
            vae,
            text,
            _cfg(dtype="fp32", content="sample", seed=5),
            vae_identity="v",
            split="validation",
        )
    (i0, s0), (i1, s1) = (_all(LatentStore(u), schema.TRAINING_FIELDS) for u in urls)
    assert i0 == i1 and torch.equal(s0["latents"], s1["latents"])
    assert LatentStore(urls[0]).metadata.split == "validation"
    ref_ids, ref = _all(LatentStore(fp32_store))
    at = [ref_ids.index(i) for i in i0]
    eps = (s0["latents"] - ref["latents"][at]) / torch.exp(0.5 * ref["logvar"][at])  # N(0, 1) if drawn right
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1.0) < 0.1
    with pytest.raises(ValueError, match="moments"):
        LatentDataset(urls[0], sample_posterior=True)


# --------------------------------------------------------------------------------------------------------------
# Resume, increments, guards
# --------------------------------------------------------------------------------------------------------------


class _Crash(RuntimeError):
    pass


def test_resume_after_a_crash_between_shards_and_inside_one(dataset_url, fp32_store, vae, text, tmp_path, monkeypatch):
    url = str(tmp_path / "store")
    cfg = _cfg(dtype="fp32")

    def crash_after_two(p: schema.EncodeProgress):
        if p.shards_done == 2:
            raise _Crash

    with pytest.raises(_Crash):
        encode_dataset(dataset_url, url, vae, text, cfg, vae_identity="models:/ldm-vae/1", progress=crash_after_two)
    assert len(LatentStore(url).shards) == 2

    # second crash: the third shard's arrays are written, but the run dies before recording it
    def die_before_recording(writer):
        raise _Crash

    monkeypatch.setattr(store_writer.LatentStoreWriter, "_commit", die_before_recording)
    with pytest.raises(_Crash):
        encode_dataset(dataset_url, url, vae, text, cfg, vae_identity="models:/ldm-vae/1")
    monkeypatch.undo()
    on_disk = storage.list_dir(os.path.join(url, "shards"))
    recorded = {s.name for s in LatentStore(url).shards}
    assert len(on_disk) == 3 and len(recorded) == 2, "a partial shard is left behind, not recorded"

    result = encode_dataset(dataset_url, url, vae, text, cfg, vae_identity="models:/ldm-vae/1")
    assert result.skipped_shards == 2 and result.shards_new == 2 and result.rows_total == N_IMAGES
    assert result.rows_new == N_IMAGES - 2 * ROWS_PER_SHARD
    assert sorted(storage.list_dir(os.path.join(url, "shards"))) == sorted(s.name for s in LatentStore(url).shards)
    (ids, got), (ref_ids, ref) = _all(LatentStore(url)), _all(LatentStore(fp32_store))
    assert len(set(ids)) == len(ids) == N_IMAGES and ids == ref_ids
    for f in schema.TENSOR_FIELDS:
        assert torch.equal(got[f], ref[f])
    again = encode_dataset(dataset_url, url, vae, text, cfg, vae_identity="models:/ldm-vae/1")
    assert again.rows_new == 0 and again.shards_new == 0 and again.rows_total == N_IMAGES


def test_incremental_encoding_touches_only_new_shards(vae, text, tmp_path):
    ds = _make_dataset(str(tmp_path), n=20)
    url = str(tmp_path / "store")
    first = encode_dataset(ds, url, vae, text, _cfg(backend="parquet"), vae_identity="v")
    assert first.rows_new == 20 and first.shards_new == 2
    before = _tree_digest(url + "/shards")
    write_shapes_source(str(tmp_path / "src"), 35, seed=0)  # the same 20 images and 15 new ones
    grown = ingest(IngestConfig(source=str(tmp_path / "src"), rows_per_shard=ROWS_PER_SHARD, val_fraction=0.25), ds)
    assert grown.rows_new == 15
    second = encode_dataset(ds, url, vae, text, _cfg(backend="parquet"), vae_identity="v")
    assert second.rows_new == 15 and second.shards_new == len(grown.new_shards) == 2 and second.skipped_shards == 2
    assert second.new_shards == grown.new_shards and second.rows_total == 35
    after = _tree_digest(url + "/shards")
    assert {k: after[k] for k in before} == before, "old shards must stay byte for byte"
    ids = [r["id"] for r in LatentDataset(url, None).rows(range(35))]
    assert len(set(ids)) == 35


def test_another_vae_or_text_encoder_is_refused(dataset_url, fp32_store, vae, text):
    meta_before = storage.read_bytes(schema.metadata_url(fp32_store))
    with pytest.raises(LatentStoreMismatchError, match=r"models:/ldm-vae/1.*models:/ldm-vae/2.*never be mixed"):
        encode_dataset(dataset_url, fp32_store, vae, text, _cfg(dtype="fp32"), vae_identity="models:/ldm-vae/2")

    class OtherEncoder:  # the same model under another identity (as another checkpoint would report)
        def __getattr__(self, name):
            return getattr(text, name)

        identity = "clip-vit-l-14|L=8|fp32|0123456789ab"

    with pytest.raises(LatentStoreMismatchError, match="text embeddings"):
        encode_dataset(
            dataset_url, fp32_store, vae, OtherEncoder(), _cfg(dtype="fp32"), vae_identity="models:/ldm-vae/1"
        )
    with pytest.raises(LatentStoreMismatchError, match="dtype"):
        encode_dataset(dataset_url, fp32_store, vae, text, _cfg(dtype="fp16"), vae_identity="models:/ldm-vae/1")
    assert storage.read_bytes(schema.metadata_url(fp32_store)) == meta_before
    with pytest.raises(ValueError, match="divisible"):
        encode_dataset(
            dataset_url, fp32_store + "-x", vae, text, _cfg().model_copy(update={"resolution": 30}), vae_identity="v"
        )


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_captions_and_attributes_survive(vae, text, tmp_path, backend):
    src = tmp_path / "src"
    captions = ["ein größeres Quadrat – ✓", "赤い四角", "a plain caption", 'émoji 🙂 and "quotes"']
    # "context" is also a tensor field of the store: the attribute comes back as "attr_context"
    attrs = [
        {"color": "rot", "count": 3, "score": 0.5, "ok": True, "context": "draußen"},
        {"color": "赤", "count": 1, "score": -1.25, "ok": False, "context": "室内"},
        {"color": "blue", "count": 7, "score": 2.0, "ok": True, "context": "studio"},
        {"color": "ñ", "count": 0, "score": 0.0, "ok": False, "context": ""},
    ]
    from ldm_core.data.synthetic import ShapeSpec, render_shape

    lines = []
    for i, (cap, a) in enumerate(zip(captions, attrs)):
        img = render_shape(ShapeSpec("circle", "red", "large", "center", background=230 + 2 * i), 32)
        storage.write_bytes_atomic(str(src / f"{i}.png"), png_bytes(img))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": cap, **a}, ensure_ascii=False))
    storage.write_text_atomic(str(src / "metadata.jsonl"), "\n".join(lines) + "\n")
    ds = str(tmp_path / "ds")
    ingest(IngestConfig(source=str(src), val_fraction=0.0), ds)
    url = str(tmp_path / "store")
    encode_dataset(ds, url, vae, text, _cfg(backend=backend), vae_identity="v")
    rows = LatentDataset(url, "train").rows(range(4))
    want = {c: {("attr_" + k if k == "context" else k): v for k, v in a.items()} for c, a in zip(captions, attrs)}
    assert sorted(r["caption"] for r in rows) == sorted(captions)
    for r in rows:
        assert {k: r[k] for k in want[r["caption"]]} == want[r["caption"]]
        assert r["split"] == "train" and len(r["id"]) == 16
    # the text embedding of each row is that of its own caption
    data = LatentDataset(url, "train")
    ctx = data.get_batch(range(4))["context"]
    ref = text.encode([r["caption"] for r in rows]).embeddings
    assert (ctx - ref).abs().max() < 1e-2  # fp16 storage


# --------------------------------------------------------------------------------------------------------------
# S3 and the trainer
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_s3_round_trip(dataset_url, vae, text, s3_url, tmp_path, backend):
    cfg = _cfg(dtype="fp32", backend=backend)
    # the validation split only (a quarter of the rows): the S3 path is what is tested, not the encoder again
    result = encode_dataset(dataset_url, s3_url, vae, text, cfg, vae_identity="models:/ldm-vae/1", split="validation")
    encode_dataset(
        dataset_url, str(tmp_path / "local"), vae, text, cfg, vae_identity="models:/ldm-vae/1", split="validation"
    )
    remote, local = (
        LatentDataset(s3_url, "validation", prefetch=2),
        LatentDataset(str(tmp_path / "local"), "validation"),
    )
    assert result.rows_total == len(local) > 0 and result.bytes_new > 0
    idx = list(range(len(local)))[::-1]
    got, ref = remote.get_batch(idx), local.get_batch(idx)
    for f in ref:
        assert torch.equal(got[f], ref[f]), f
    assert remote.rows(idx) == local.rows(idx)
    assert torch.equal(remote.uncond()[0], local.uncond()[0])
    # an interrupted-run leftover on S3 is removed by the next run, which has nothing else to do
    leftover = "shard-00099-0badc0de." + ("zarr/zarr.json" if backend == "zarr" else "parquet")
    storage.write_bytes_atomic(f"{s3_url}/shards/{leftover}", b"{}")
    again = encode_dataset(dataset_url, s3_url, vae, text, cfg, vae_identity="models:/ldm-vae/1", split="validation")
    assert again.rows_new == 0
    assert not any(n.startswith("shard-00099") for n in storage.list_dir(f"{s3_url}/shards"))


def test_train_ldm_runs_on_a_latent_dataset(fp32_store):
    from ldm_core.models.unet import UNET_PRESETS
    from ldm_core.trainers.ldm import LDMTrainingConfig, train_ldm

    data = LatentDataset(fp32_store, "train")
    cfg = LDMTrainingConfig.model_validate(
        {
            "denoiser": UNET_PRESETS["tiny"].to_dict(),
            "diffusion": {"kind": "flow"},
            "trainer": {"steps": 2, "batch_size": 8, "lr": 1e-3, "ema_decay": None, "log_every": 1, "device": "cpu"},
        }
    )
    torch.manual_seed(0)
    from ldm_core.models.denoiser import build_denoiser

    before = [p.detach().clone() for p in build_denoiser(cfg.denoiser).parameters()]
    result = train_ldm(cfg, data, uncond=data.uncond())
    assert result.step == 2 and result.nonfinite_skipped == 0
    after = list(result.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the optimizer stepped"


# --------------------------------------------------------------------------------------------------------------
# A store of an older format
# --------------------------------------------------------------------------------------------------------------


def _as_format_1(url: str, pooled: bool) -> bytes:
    """Rewrite the store's latent_store.json as format 1 was written: without ``pooled`` vectors (``pooled_dim``
    null, no shard ``pooled`` flags, no checksums), or, ``pooled``, as its last version wrote it (flags and
    checksums). Returns the new file's bytes."""
    path = os.path.join(url, schema.METADATA_NAME)
    with open(path) as f:
        doc = json.load(f)
    doc["format"] = "ldm-latent-store/1"
    for shard in doc["shards"]:
        shard["pooled"] = pooled
        if not pooled:
            shard["checksums"] = None
    if not pooled:
        doc["pooled_dim"] = None
    data = json.dumps(doc).encode()
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest.mark.parametrize("pooled", [False, True], ids=["without-pooled", "last-format-1"])
def test_a_store_of_an_older_format_is_refused_with_one_line_saying_what_to_do(
    dataset_url, vae, text, tmp_path, pooled
):
    """Readers and writers refuse it in one line naming the store, both formats, and what to do; an encoding run
    pointed at it changes nothing there."""
    url = str(tmp_path / "old")
    cfg = _cfg(backend="parquet", dtype="fp16")
    encode_dataset(dataset_url, url, vae, text, cfg, vae_identity="models:/ldm-vae/1")
    old = _as_format_1(url, pooled)
    files = sorted(storage.list_dir(os.path.join(url, schema.SHARDS_DIR)))
    expected = (
        f"latent store at {url} is format ldm-latent-store/1; this version reads format ldm-latent-store/2: "
        "delete it and encode the dataset again (encode_dataset; in the pipeline: materialize latent_store)"
    )
    for open_it in (
        lambda: LatentStore(url),
        lambda: LatentDataset(url, "train"),
        lambda: encode_dataset(dataset_url, url, vae, text, cfg, vae_identity="models:/ldm-vae/1"),
    ):
        with pytest.raises(schema.LatentStoreFormatError) as err:
            open_it()
        assert str(err.value) == expected
    with open(os.path.join(url, schema.METADATA_NAME), "rb") as f:
        assert f.read() == old
    assert sorted(storage.list_dir(os.path.join(url, schema.SHARDS_DIR))) == files
