import pytest
import torch

from ldm_core.text_encoder import TextEncoder, TextEncoderConfig


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
        torch.testing.assert_close(together.embeddings[i][together.mask[i]], s.embeddings[0][s.mask[0]], atol=1e-5, rtol=1e-5)


def test_embeddings_carry_meaning(encoder):
    """Real pretrained weights: captions that differ only in colour are closer to each other than to an unrelated one."""
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
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from ldm_core.text_encoder import resolve_model_path

    src = resolve_model_path("all-MiniLM-L6-v2")
    BertTokenizerFast.from_pretrained(src).save_pretrained(tmp_path)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path)
    enc = TextEncoder(TextEncoderConfig(name=str(tmp_path), max_length=8))
    assert enc.dim == 32 and enc.encode(["hello"]).embeddings.shape == (1, 8, 32)


def test_clip_text_model_path(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_core.text_encoder import resolve_model_path

    # a CLIP text model with a tokenizer built offline from the MiniLM vocabulary (only the model class matters here)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=30522, max_position_embeddings=16)).save_pretrained(tmp_path)
    from transformers import BertTokenizerFast

    BertTokenizerFast.from_pretrained(resolve_model_path("all-MiniLM-L6-v2")).save_pretrained(tmp_path)
    enc = TextEncoder(TextEncoderConfig(name=str(tmp_path), max_length=8))
    assert type(enc.model).__name__ == "CLIPTextModel"
    assert enc.encode(["a photo"]).embeddings.shape == (1, 8, 32)
