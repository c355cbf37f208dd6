"""Small tensor operations shared by the attention-based explainers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_xai.adapters import Geometry


def rownorm_with_identity(attn: Tensor) -> Tensor:
    """``rownorm(mean_h A + I)``: ``(B, H, T, T) -> (B, T, T)``, rows summing to 1."""
    mixed = attn.mean(1) + torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    return mixed / mixed.sum(-1, keepdim=True)


def rollout_product(attn: Iterable[Tensor]) -> Tensor:
    """``R = Â^L ... Â^1`` with ``Â^l = rownorm(mean_h A^l + I)``: ``(B, H, T, T)`` per block, in block order ->
    ``(B, T, T)`` (C2F's cross-layer relation matrix; a readout row alone is :func:`rollout_readout`)."""
    result = None
    for layer in attn:
        step = rownorm_with_identity(layer)
        result = step if result is None else step @ result
    if result is None:
        raise ValueError("no block to roll out")
    return result


def readout_start(geom: Geometry, batch: tuple[int, ...], device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """The readout weights ``w`` ``(T,)`` (:meth:`Geometry.readout_weights`) expanded to ``(*batch, T)``: the row
    vector that reads a product of token-by-token matrices from the left."""
    weights = geom.readout_weights(device=device, dtype=dtype)
    return weights.expand(*batch, -1).clone()


def patch_row(row: Tensor, geom: Geometry) -> Tensor:
    """A relevance row over the tokens ``(..., T)`` -> its patch entries on the grid ``(..., h, w)``."""
    return row[..., geom.num_prefix :].unflatten(-1, geom.grid)


def rollout_readout(attn_last_first: Iterable[Tensor], geom: Geometry) -> Tensor:
    """:func:`query_row` of :func:`rollout_product`, without the product: ``w^T Â^L ... Â^s`` read from the left, one
    row vector times one ``(T, T)`` matrix per block, for the blocks' attention ``(B, H, T, T)`` given **last block
    first** -> ``(B, h, w)``. The same numbers as the product's readout rows (the same sums, grouped otherwise), at
    ``T^2`` per block where the product costs ``T^3``."""
    row = None
    for layer in attn_last_first:
        step = rownorm_with_identity(layer)  # (B, T, T)
        if row is None:
            row = readout_start(geom, step.shape[:1], step.device, step.dtype)
        row = (row.unsqueeze(-2) @ step).squeeze(-2)
    if row is None:
        raise ValueError("no block to roll out")
    return patch_row(row, geom)


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
