"""Building blocks shared by the item and user towers.

Seeded initialisation (no global RNG), RMSNorm, SwiGLU, rotary position embedding and a
pre-norm transformer block built on :func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_HAS_RMS_NORM = hasattr(F, "rms_norm")

__all__ = [
    "MLP",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "check_positive_int",
    "reset_parameters",
]


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive int, else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")
    return value


def reset_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Initialise every parameter of ``module`` from ``generator`` (never the global RNG).

    Rules, applied to submodules in registration order (so the same seed gives the same
    numbers): ``Linear`` weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and zero bias (torch's
    default range); ``Embedding``/``EmbeddingBag`` N(0, 1/dim) with the padding row zeroed;
    ``GRU`` weights U(-1/sqrt(hidden), 1/sqrt(hidden)); :class:`RMSNorm` gains 1. Parameters
    owned directly by a module (tokens, tables) are left to that module's own init.
    """
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                bound = 1.0 / math.sqrt(sub.in_features)
                sub.weight.uniform_(-bound, bound, generator=generator)
                if sub.bias is not None:
                    sub.bias.zero_()
            elif isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
                sub.weight.normal_(0.0, sub.embedding_dim**-0.5, generator=generator)
                if sub.padding_idx is not None:
                    sub.weight[sub.padding_idx].zero_()
            elif isinstance(sub, nn.GRU):
                bound = 1.0 / math.sqrt(sub.hidden_size)
                for p in sub.parameters(recurse=False):
                    p.uniform_(-bound, bound, generator=generator)
            elif isinstance(sub, RMSNorm):
                sub.weight.fill_(1.0)


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x^2) + eps) * g`` over the last axis."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape ``(..., dim)``."""
        if _HAS_RMS_NORM:  # fused kernel (torch >= 2.4)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MLP(nn.Sequential):
    """``Linear -> GELU`` for each hidden width, then a final ``Linear`` to ``out_dim``."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            width = h
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)


class SwiGLU(nn.Module):
    """Gated feed-forward ``W2 (silu(W1 x) * W3 x)`` (Shazeer 2020).

    W1 and W3 stay separate matmuls: a fused ``W13`` split by ``chunk`` gives strided halves
    on which CPU ``silu`` runs several times slower than on contiguous ones.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to ``x`` of shape ``(..., dim)``."""
        gate = F.silu(self.w1(x))  # (..., h)
        return self.dropout(self.w2(gate.mul_(self.w3(x))))  # (..., d)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), "rotate half" layout.

    Channel pair ``(i, i + hd/2)`` of a head vector at position ``p`` is rotated by the
    angle ``p * base^(-2i/hd)``. Because rotations compose, ``<R_m q, R_n k>`` depends on
    ``m - n`` only: attention scores see relative positions.
    """

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dimension, got head_dim={head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq  # (P, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (P, hd)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` by the angles of integer ``positions``.

        Args:
            x: ``(..., S, hd)``, or ``(B, nh, S, hd)`` when positions are per row.
            positions: int64 ``(S,)`` shared by all rows, or ``(B, S)`` per row.
        """
        cos, sin = self.cos[positions], self.sin[positions]  # (S, hd) or (B, S, hd)
        if positions.ndim == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, hd): broadcast heads
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)  # rotate half: (x1, x2) -> (-x2, x1)
        return x * cos + rotated * sin


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h + Attn(RMSNorm(h))`` then ``h + SwiGLU(RMSNorm(h))``."""

    def __init__(self, dim: int, n_heads: int, ffn_hidden: int, dropout: float) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout_p = dropout
        self.attn_norm = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)
        self.ffn_norm = RMSNorm(dim)
        self.ffn = SwiGLU(dim, ffn_hidden, dropout)

    def forward(
        self,
        h: torch.Tensor,
        allowed: torch.Tensor,
        rotary: RotaryEmbedding | None,
        positions: torch.Tensor,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the block.

        Args:
            h: ``(B, S, d)`` hidden states.
            allowed: bool ``(B, 1, S, S)``; ``allowed[b, 0, i, j]`` lets query i see key j.
                Every row must allow at least one key (the diagonal), else SDPA gives NaN.
            rotary: rotary embedding applied to queries and keys, or None.
            positions: int64 ``(S,)`` position ids for the rotary angles.
            query_index: int64 ``(B,)``: compute the output of this one position per row
                only (keys and values still come from every position). A last block needs
                nothing more when the user is pooled from one token; it saves most of the
                block's work.

        Returns:
            ``(B, S, d)``, or ``(B, 1, d)`` with ``query_index``.
        """
        b, s, d = h.shape
        hd = d // self.n_heads
        x = self.attn_norm(h)  # (B, S, d)
        if query_index is None:
            qkv = self.qkv(x).view(b, s, 3, self.n_heads, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, S, hd) each
            q_pos = positions
        else:
            rows = torch.arange(b, device=h.device)
            h = h[rows, query_index].unsqueeze(1)  # (B, 1, d): residual stream of the query
            w_q, w_kv = self.qkv.weight.split([d, 2 * d])
            q = F.linear(x[rows, query_index], w_q).view(b, 1, self.n_heads, hd).transpose(1, 2)
            kv = F.linear(x, w_kv).view(b, s, 2, self.n_heads, hd)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, S, hd) each
            allowed = allowed[rows, :, query_index].unsqueeze(2)  # (B, 1, 1, S)
            q_pos = positions[query_index].unsqueeze(1)  # (B, 1)
        if rotary is not None:
            q, k = rotary(q, q_pos), rotary(k, positions)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout_p if self.training else 0.0
        )  # (B, nh, S_q, hd)
        h = h + self.resid_dropout(self.out(a.transpose(1, 2).reshape(b, -1, d)))
        return h + self.ffn(self.ffn_norm(h))
