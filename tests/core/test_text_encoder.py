import pytest
import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertTokenizerFast,
)

from ldm_core.text_encoder import TextEncoder, TextEncoderConfig, resolve_model_path
from tests.core.tiny_models import tiny_clip


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(TextEncoderConfig(max_length=16, batch_size=2))


def test_default_encoder_is_the_offline_minilm(encoder):
    out = encoder.encode(["a small red circle", "a large blue square in the top left", "x"])
    assert out.embeddings.shape == (3, 16, 384) and out.mask.shape == (3, 16)
    # [CLS] a small red circle [SEP] = 6 real tokens; the rest is padding
    assert out.mask[0].sum().item() == 6 and out.mask.dtype == torch.bool
    assert torch.isfinite(out.embeddings).all()


def test_batching_does_not_change_embeddings(encoder):
    caps = ["a red circle", "a blue square", "a green triangle"]
    together = encoder.encode(caps)
    single = [encoder.encode([c]) for c in caps]
    for i, s in enumerate(single):
        torch.testing.assert_close(
            together.embeddings[i][together.mask[i]], s.embeddings[0][s.mask[0]], atol=1e-5, rtol=1e-5
        )


def test_embeddings_carry_meaning(encoder):
    """Real pretrained weights: captions that differ only in colour are closer to each other than to an unrelated
    one."""
    e = encoder.encode(["a red circle", "a blue circle", "stock market report for tuesday"])
    pooled = torch.stack([(e.embeddings[i] * e.mask[i, :, None]).sum(0) / e.mask[i].sum() for i in range(3)])
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0) + 0.2
    assert not torch.allclose(e.embeddings[0], e.embeddings[1])


def test_empty_prompt_and_truncation(encoder):
    empty = encoder.empty()
    assert empty.mask[0].sum().item() == 2  # [CLS] [SEP]
    long = encoder.encode(["word " * 100])
    assert long.mask.all()  # truncated to max_length, all real tokens


def test_bf16_and_identity():
    enc = TextEncoder(TextEncoderConfig(max_length=8, dtype="bf16"))
    out = enc.encode(["a red circle"])
    assert out.embeddings.dtype == torch.bfloat16
    assert enc.identity.startswith("all-MiniLM-L6-v2|L=8|bf16|")


def test_any_local_transformers_path_works(tmp_path):
    """A model saved with save_pretrained (here a tiny random BERT) loads by path, like any transformers id."""
    from transformers import BertConfig, BertModel

    from ldm_core.text_encoder import resolve_model_path

    src = resolve_model_path("all-MiniLM-L6-v2")
    BertTokenizerFast.from_pretrained(src).save_pretrained(tmp_path)
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path)
    enc = TextEncoder(TextEncoderConfig(name=str(tmp_path), max_length=8))
    assert enc.dim == 32 and enc.encode(["hello"]).embeddings.shape == (1, 8, 32)


def test_clip_text_model_path(tmp_path):
    """A checkpoint of a plain CLIPTextModel (SD-1's text encoder) has no projection weights: it loads as itself,
    and its pooled vector is the unprojected EOS state (pooler_output), never a projection with random weights."""
    tiny_clip(tmp_path, with_projection=False)
    enc = TextEncoder(TextEncoderConfig(name=str(tmp_path), max_length=8))
    assert type(enc.model).__name__ == "CLIPTextModel" and enc.pooling == "clip_pooler_output"
    out = enc.encode(["a photo"])
    assert out.embeddings.shape == (1, 8, 32) and out.pooled.shape == (1, 32) and enc.pooled_dim == 32
    eos = int(out.mask[0].sum()) - 1
    torch.testing.assert_close(out.pooled[0], out.embeddings[0, eos])


# ---------------------------------------------------------------------------------------------------------------
# Pooled vectors
# ---------------------------------------------------------------------------------------------------------------


def test_minilm_pooled_vector_is_sentence_transformers_mean_pooling(encoder):
    """all-MiniLM-L6-v2's sentence-transformers Pooling module (pooling_mode_mean_tokens), computed here from the
    model's own files with transformers alone: the mean of the last hidden state over the attention mask."""
    captions = ["a small red circle", "a large blue square in the top left", ""]
    path = resolve_model_path("all-MiniLM-L6-v2")
    tok = AutoTokenizer.from_pretrained(path)(
        captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        token_embeddings = AutoModel.from_pretrained(path)(**tok).last_hidden_state  # (3, 16, 384)
    mask = tok["attention_mask"].unsqueeze(-1).expand(token_embeddings.size()).float()
    expected = torch.sum(token_embeddings * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)
    out = encoder.encode(captions)
    assert encoder.pooling == "masked_mean" and encoder.pooled_dim == 384 and out.pooled.shape == (3, 384)
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)
    # the null caption of classifier-free guidance has one: the mean of its [CLS] and [SEP] states
    empty = encoder.empty()
    assert empty.pooled.shape == (1, 384)
    torch.testing.assert_close(empty.pooled, empty.embeddings[0, :2].mean(0, keepdim=True), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(empty.pooled[0], expected[2], atol=1e-5, rtol=1e-5)


def test_clip_with_projection_pools_the_projected_eos_token(tmp_path):
    reference = tiny_clip(tmp_path, with_projection=True)
    enc = TextEncoder(TextEncoderConfig(name=str(tmp_path), max_length=8))
    assert type(enc.model).__name__ == "CLIPTextModelWithProjection" and enc.pooling == "clip_projected_eos"
    out = enc.encode(["a photo", "a photo of a cat"])
    assert out.embeddings.shape == (2, 8, 32) and out.pooled.shape == (2, 24) and enc.pooled_dim == 24
    eos = out.mask.sum(1) - 1  # (2,): [CLS] … [SEP], the [SEP] last
    with torch.no_grad():
        expected = reference.text_projection(out.embeddings[torch.arange(2), eos])  # final-layer-normed EOS, projected
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)
    assert enc.empty().pooled.shape == (1, 24)
