"""Gradient-based explainers: gradient-weighted rollout (GAE) and GradToken."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.adapters import Geometry
from lightning_xai.explainers.base import Explainer, RawMaps
from lightning_xai.explainers.registry import register
from lightning_xai.explainers.relevance import query_row

OBJECTIVES = ("logit", "log_softmax")


def _check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return objective


@register
class GradientRollout(Explainer):
    """Gradient-weighted rollout / GAE (Chefer, Gur, Wolf, ICCV 2021), as METHODS.md defines it:
    ``R = I``; for each block ``R = R + mean_h relu(dy_c/dA ⊙ A) R``; map ``R[:, 0, P:]``.

    Args:
        objective: ``"logit"`` (default) or ``"log_softmax"``: the score whose gradient weights attention.
    """

    name = "gae"

    def __init__(self, model: nn.Module, *, objective: str = "logit", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.objective = _check_objective(objective)

    def compute(self, x: Tensor, targets: Any, geom: Geometry) -> RawMaps:
        attn, grads, resolved, probs = self.attention_gradients(x, targets, self.objective)
        batch, k = resolved.shape
        tokens = attn[0].shape[-1]
        relevance = torch.eye(tokens, device=x.device).expand(batch, k, tokens, tokens)
        for layer, grad in zip(attn, grads, strict=True):
            weighted = (grad * layer.unsqueeze(1)).clamp_min(0).mean(2)  # (B, K, T, T)
            relevance = relevance + weighted @ relevance
        return RawMaps(query_row(relevance, geom), resolved, probs)


def _layer_indices(layers: str | int | Sequence[int], depth: int) -> list[int]:
    if layers == "all":
        return list(range(depth))
    if isinstance(layers, bool):
        raise TypeError("layers must be 'all', an int (last k blocks) or a sequence of block indices")
    if isinstance(layers, int):
        if not 1 <= layers <= depth:
            raise ValueError(f"layers={layers}: the last k blocks needs 1 <= k <= {depth}")
        return list(range(depth - layers, depth))
    if isinstance(layers, Sequence) and layers and all(isinstance(i, int) for i in layers):
        if any(not -depth <= i < depth for i in layers):
            raise ValueError(f"layers={list(layers)}: block indices must be in [-{depth}, {depth - 1}]")
        return sorted({i % depth for i in layers})
    raise ValueError(f"layers must be 'all', an int (last k blocks) or a non-empty list of ints, got {layers!r}")


@register
class GradToken(Explainer):
    """GradToken (Cheng et al., Neural Networks 181, 2024), our reading in METHODS.md: the class-aware
    gradient decouples each spatial token's contribution to the class token,
    ``c^l_i = relu(sum_h A^l[h, 0, P+i] * dy_c/dA^l[h, 0, P+i])``, summed over the layer set.

    Needs a class token. Only the class-token row of each attention matrix is used: one forward and one
    backward (a batched vector-Jacobian product for several targets per image).

    Args:
        layers: ``"all"`` (default), an int ``k`` (the last ``k`` blocks), or explicit block indices.
        per_layer_norm: divide each block's contribution by its maximum before summing (default off;
            METHODS.md: off keeps each block in proportion to its first-order effect on ``y_c``).
        objective: ``"logit"`` (default) or ``"log_softmax"``.
    """

    name = "gradtoken"
    requires_class_token = True

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: str | int | Sequence[int] = "all",
        per_layer_norm: bool = False,
        objective: str = "logit",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.layers = layers
        self.block_indices = _layer_indices(layers, len(self.vit.blocks))
        self.per_layer_norm = bool(per_layer_norm)
        self.objective = _check_objective(objective)

    def compute(self, x: Tensor, targets: Any, geom: Geometry) -> RawMaps:
        attn, grads, resolved, probs = self.attention_gradients(x, targets, self.objective, self.block_indices)
        prefix = geom.num_prefix
        total = None
        for layer, grad in zip(attn, grads, strict=True):
            # class-token row only: A (B, 1, H, N) times dy/dA (B, K, H, N), heads summed, then rectified
            contribution = (layer[:, None, :, 0, prefix:] * grad[:, :, :, 0, prefix:]).sum(2).clamp_min(0)
            if self.per_layer_norm:
                contribution = contribution / contribution.amax(-1, keepdim=True).clamp_min(1e-12)
            total = contribution if total is None else total + contribution
        return RawMaps(total.unflatten(-1, geom.grid), resolved, probs)
