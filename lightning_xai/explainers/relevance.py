"""Small tensor operations shared by the attention-based explainers."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_xai.adapters import Geometry


def rownorm_with_identity(attn: Tensor) -> Tensor:
    """``rownorm(mean_h A + I)``: ``(B, H, T, T) -> (B, T, T)``, rows summing to 1."""
    mixed = attn.mean(1) + torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    return mixed / mixed.sum(-1, keepdim=True)


def rollout_product(attn: Iterable[Tensor], start: int = 0) -> Tensor:
    """``R = Â^L ... Â^{start+1}`` with ``Â^l = rownorm(mean_h A^l + I)``: ``(B, H, T, T)`` per block, in block
    order (a list, or an iterator that makes each block's matrix as the product consumes it) -> ``(B, T, T)``."""
    result = None
    for layer in itertools.islice(attn, start, None):
        step = rownorm_with_identity(layer)
        result = step if result is None else step @ result
    if result is None:
        raise ValueError(f"start layer {start} leaves no block to roll out")
    return result


def query_row(matrix: Tensor, geom: Geometry) -> Tensor:
    """Relevance of each patch for what the head reads, read off a token-by-token matrix (METHODS.md's "row 0").

    ``(..., T, T) -> (..., h, w)``: ``Σ_q w_q matrix[..., q, P:]`` over the readout rows ``q`` with weights
    ``w`` (:meth:`Geometry.readout_weights`): the class token's row for token pooling, the mean of the patch
    rows ``P..T-1`` for average pooling, rows 0 and 1 averaged for DeiT's distilled head.
    """
    rows, weights = geom.readout_rows()
    weights = weights.to(device=matrix.device, dtype=matrix.dtype)
    picked = matrix[..., rows, geom.num_prefix :]  # (..., R, N)
    row = (weights[:, None] * picked).sum(-2)
    return row.unflatten(-1, geom.grid)


def readout_contribution(attn: Tensor, grad: Tensor, geom: Geometry) -> Tensor:
    """GradToken's per-block contribution on the readout rows (METHODS.md):
    ``c_i = relu( Σ_h Σ_q w_q A[h, q, P+i] · G[h, q, P+i] )``.

    Args:
        attn: ``(B, H, T, T)`` attention probabilities.
        grad: ``(B, K, H, T, T)`` gradients of ``K`` target scores with respect to them.

    Returns:
        ``(B, K, N)`` contributions, one per patch.
    """
    rows, weights = geom.readout_rows()
    weights = weights.to(device=attn.device, dtype=attn.dtype)
    prefix = geom.num_prefix
    a = attn[:, None, :, rows, prefix:]  # (B, 1, H, R, N)
    g = grad[:, :, :, rows, prefix:]  # (B, K, H, R, N)
    return torch.einsum("bkhrn,r->bkn", a * g, weights).clamp_min(0)
