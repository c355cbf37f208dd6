"""Small tensor operations shared by the attention-based explainers."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_xai.adapters import Geometry


def rownorm_with_identity(attn: Tensor) -> Tensor:
    """``rownorm(mean_h A + I)``: ``(B, H, T, T) -> (B, T, T)``, rows summing to 1."""
    mixed = attn.mean(1) + torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    return mixed / mixed.sum(-1, keepdim=True)


def rollout_product(attn: list[Tensor], start: int = 0) -> Tensor:
    """``R = Â^L ... Â^{start+1}`` with ``Â^l = rownorm(mean_h A^l + I)``: list of ``(B, H, T, T)`` -> ``(B, T, T)``."""
    result = None
    for layer in attn[start:]:
        step = rownorm_with_identity(layer)
        result = step if result is None else step @ result
    if result is None:
        raise ValueError(f"start layer {start} leaves no block to roll out ({len(attn)} blocks)")
    return result


def query_row(matrix: Tensor, geom: Geometry) -> Tensor:
    """Relevance of each patch for the pooled output, read off a token-by-token matrix.

    ``(..., T, T) -> (..., h, w)``: the class token's row ``matrix[..., 0, P:]`` when the model has a class
    token; for an average-pooled model (no class token) the output is the mean of the patch tokens, so the
    mean of the patch rows ``matrix[..., P:, P:].mean(-2)``.
    """
    prefix = geom.num_prefix
    if geom.has_class_token:
        row = matrix[..., 0, prefix:]
    else:
        row = matrix[..., prefix:, prefix:].mean(-2)
    return row.unflatten(-1, geom.grid)
