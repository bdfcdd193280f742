"""Scaled dot-product attention with a precision rule: bf16 where its kernel wins, fp32 where it loses.

On CPU, torch's flash-attention kernel is slower in bf16 than in fp32 for training at narrow heads: its bf16
backward at head dim <= 32 took 1.2-5x the fp32 one (2 threads, Xeon with AMX; head dim 8/16/32: 79 vs 65 ms,
12.5 vs 5.4 ms, 4.3 vs 0.9 ms for fwd+bwd; /tmp-scale shapes of the mid UNet), while at head dim >= 40 bf16 wins
(49 vs 65 ms), and the forward alone is never slower in bf16. So under a bf16 autocast on CPU, with gradients on and
heads of at most `CPU_FP32_MAX_HEAD_DIM` channels, the attention is computed in fp32 (inputs upcast, output cast
back); everywhere else, and always on GPUs, it is the plain call. fp32 is the more accurate of the two, so the
result only moves towards the fp32 reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CPU_FP32_MAX_HEAD_DIM = 32


def use_fp32(q: Tensor) -> bool:
    """Whether `attention` computes this call in fp32 (see the module docstring)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and torch.is_grad_enabled()
        and q.shape[-1] <= CPU_FP32_MAX_HEAD_DIM
    )


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask) (q (..., N, d), k/v (..., L, d)), in the precision that is
    faster for this call; the output has q's dtype."""
    if not use_fp32(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with torch.autocast("cpu", enabled=False):  # an enclosing bf16 autocast would cast the inputs back down
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return out.to(q.dtype)
