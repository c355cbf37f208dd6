"""Gradient-free baselines: raw attention of the last block, and attention rollout.

Both recompute the attention from ``q, k`` on the fused path (:mod:`lightning_xai.explainers.fused`) where the
model's family records them, and record the attention probabilities otherwise; the maps are the same."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.adapters import Geometry, depth
from lightning_xai.explainers.base import Explainer, RawMaps
from lightning_xai.explainers.fused import attention_matrix, fused_forward
from lightning_xai.explainers.registry import register
from lightning_xai.explainers.relevance import query_row, rollout_readout


@register
class RawAttention(Explainer):
    """Raw attention: ``mean_h A^L[:, h, 0, P:]``, the last block's class-token attention (METHODS.md).

    Class-agnostic by construction: every target gets the same map. Row 0 is the readout rows: the mean of
    the patch rows for a model whose head averages the patch tokens.
    """

    name = "raw_attention"
    single_pass = True
    needs_readout = True

    def compute(self, x: Tensor, targets: Any, geom: Geometry) -> RawMaps:
        fused = fused_forward(self, x, targets, blocks=[-1])
        if fused is not None:  # the last block's attention recomputed from q, k
            record, resolved, probs = fused
            attn = attention_matrix(record, 0)
        else:
            with torch.no_grad():
                _, captured, resolved, probs = self.forward_captured(x, ("attn",), targets, blocks=[-1])
            attn = captured.attn[-1].float()
        row = query_row(attn.mean(1), geom)  # (B, h, w)
        return RawMaps(row.unsqueeze(1).expand(-1, resolved.shape[1], -1, -1), resolved, probs)


@register
class AttentionRollout(Explainer):
    """Attention rollout (Abnar & Zuidema 2020): ``R = Â^L ... Â^s``, ``Â = rownorm(mean_h A + I)``,
    map ``R[:, 0, P:]`` (METHODS.md). Class-agnostic by construction.

    Args:
        start_layer: first block (0-based) included in the product; METHODS.md's "start layer 1" is 0 here.
    """

    name = "rollout"
    single_pass = True
    needs_readout = True

    def __init__(self, model: nn.Module, *, start_layer: int = 0, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.check_options({"start_layer": start_layer})
        blocks = depth(self.vit)
        if start_layer >= blocks:
            raise ValueError(f"start_layer must be in [0, {blocks - 1}], got {start_layer}")
        self.start_layer = start_layer

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        checked = super().check_options(options)
        start = checked.get("start_layer", 0)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start_layer must be an int >= 0 (0-based first block), got {start!r}")
        return checked

    def compute(self, x: Tensor, targets: Any, geom: Geometry) -> RawMaps:
        blocks = list(range(self.start_layer, depth(self.vit)))
        fused = fused_forward(self, x, targets, blocks)
        # the readout row of the product, read from the left: last block first, one (T, T) matrix at a time
        if fused is not None:  # each block's attention recomputed from q, k as the row consumes it
            record, resolved, probs = fused
            row = rollout_readout((attention_matrix(record, i) for i in reversed(range(len(record.blocks)))), geom)
        else:
            with torch.no_grad():
                _, captured, resolved, probs = self.forward_captured(x, ("attn",), targets)
            row = rollout_readout((a.float() for a in reversed(captured.attn[self.start_layer:])), geom)
        return RawMaps(row.unsqueeze(1).expand(-1, resolved.shape[1], -1, -1), resolved, probs)
