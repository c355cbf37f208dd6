"""Gradient-based explainers: gradient-weighted rollout (GAE) and GradToken.

Both run on the fused path (:mod:`lightning_xai.explainers.fused`) where the model's family records ``q, k, v``
and the attention outputs, and on the recorded-attention path otherwise; the maps are the same."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.adapters import Geometry, depth
from lightning_xai.explainers.base import Explainer, RawMaps
from lightning_xai.explainers.fused import fused_gradients, gae_step, readout_contributions_fused
from lightning_xai.explainers.registry import register
from lightning_xai.explainers.relevance import patch_row, readout_contribution, readout_start

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
    single_pass = True
    needs_readout = True

    def __init__(self, model: nn.Module, *, objective: str = "logit", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.objective = self.check_options({"objective": objective})["objective"]

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        checked = super().check_options(options)
        if "objective" in checked:
            checked["objective"] = _check_objective(checked["objective"])
        return checked

    def compute(self, x: Tensor, targets: Any, geom: Geometry) -> RawMaps:
        # R = (I + W^L) ... (I + W^1) read from the left by the readout row: r <- r + r W^l, last block first, so
        # one (T, T) matrix per block and target at a time and no (T, T) product (T^2 per block, not T^3)
        fused = fused_gradients(self, x, targets, self.objective)
        if fused is not None:  # one block's matrices at a time, recomputed from q, k, v and dy/do
            record, resolved, probs = fused.record, fused.targets, fused.probs
            steps = (
                gae_step(record.q[i], record.k[i], record.v[i], fused.grads[i], record.scale[i], record.logit_bias(i))
                for i in reversed(range(len(fused.grads)))
            )
        else:
            attn, grads, resolved, probs = self.attention_gradients(x, targets, self.objective)
            steps = ((grad * layer.unsqueeze(1)).clamp_min(0).mean(2)
                     for layer, grad in zip(reversed(attn), reversed(grads), strict=True))
        row = readout_start(geom, tuple(resolved.shape), x.device)  # (B, K, T)
        positive = torch.zeros(resolved.shape, dtype=torch.bool, device=x.device)
        for weighted in steps:  # (B, K, T, T)
            positive |= weighted.flatten(2).amax(-1) > 0
            row = row + (row.unsqueeze(-2) @ weighted).squeeze(-2)
        if not bool(positive.all()):
            warn_no_positive_relevance(int((~positive).sum()), positive.numel())
        return RawMaps(patch_row(row, geom), resolved, probs)


class NoPositiveRelevanceWarning(UserWarning):
    """GAE found no positive gradient-weighted attention for some maps, which are then constant."""


def warn_no_positive_relevance(count: int, total: int) -> None:
    warnings.warn(
        f"gae: for {count} of {total} maps the gradient-weighted attention relu(dy/dA * A) is zero in every block "
        "(no positive relevance: the target's gradients with respect to attention are zero or negative, as with a "
        "zero-initialised head or an average-pooled ViT at initialisation), so those maps are the identity's, "
        "constant, and all zero after normalisation. Explain later in training, or use gradtoken or rollout",
        NoPositiveRelevanceWarning, stacklevel=4,
    )


def _check_layers(layers: Any) -> str | int | tuple[int, ...]:
    """The form of ``layers`` without the model's depth: ``"all"``, an int ``>= 1`` or a non-empty sequence of
    ints (booleans are not ints here)."""
    if isinstance(layers, str) and layers == "all":
        return layers
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 1:
            raise ValueError(f"layers={layers}: the last k blocks needs k >= 1")
        return layers
    if (
        isinstance(layers, Sequence)
        and not isinstance(layers, str)
        and layers
        and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        return tuple(layers)
    raise ValueError(f"layers must be 'all', an int (last k blocks) or a non-empty list of ints, got {layers!r}")


def _layer_indices(layers: str | int | Sequence[int], depth: int) -> list[int]:
    layers = _check_layers(layers)
    if layers == "all":
        return list(range(depth))
    if isinstance(layers, int):
        if layers > depth:
            raise ValueError(f"layers={layers}: the last k blocks needs 1 <= k <= {depth}")
        return list(range(depth - layers, depth))
    if any(not -depth <= i < depth for i in layers):
        raise ValueError(f"layers={list(layers)}: block indices must be in [-{depth}, {depth - 1}]")
    return sorted({i % depth for i in layers})


@register
class GradToken(Explainer):
    """GradToken (Cheng et al., Neural Networks 181, 2024), our reading in METHODS.md: the class-aware
    gradient decouples each spatial token's contribution to the class token,
    ``c^l_i = relu(sum_h A^l[h, 0, P+i] * dy_c/dA^l[h, 0, P+i])``, summed over the layer set.

    Row 0 is the readout rows: on a model whose head averages the patch tokens,
    ``c^l_i = relu(sum_h mean_q A^l[h, q, P+i] * dy_c/dA^l[h, q, P+i])`` over the patch rows ``q`` (METHODS.md's
    extension). Only the readout rows of each attention matrix are used: one forward and one backward (a
    batched vector-Jacobian product for several targets per image).

    Args:
        layers: ``"all"`` (default), an int ``k`` (the last ``k`` blocks), or explicit block indices.
        per_layer_norm: divide each block's contribution by its maximum before summing (default off;
            METHODS.md: off keeps each block in proportion to its first-order effect on ``y_c``).
        objective: ``"logit"`` (default) or ``"log_softmax"``.
    """

    name = "gradtoken"
    single_pass = True
    needs_readout = True

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
        checked = self.check_options({"layers": layers, "per_layer_norm": per_layer_norm, "objective": objective})
        self.layers = layers
        self.block_indices = _layer_indices(layers, depth(self.vit))
        self.per_layer_norm = checked["per_layer_norm"]
        self.objective = checked["objective"]

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        checked = super().check_options(options)
        if "layers" in checked:
            _check_layers(checked["layers"])
        if "per_layer_norm" in checked and not isinstance(checked["per_layer_norm"], bool):
            raise ValueError(f"per_layer_norm must be True or False, got {checked['per_layer_norm']!r}")
        if "objective" in checked:
            checked["objective"] = _check_objective(checked["objective"])
        return checked

    def compute(self, x: Tensor, targets: Any, geom: Geometry) -> RawMaps:
        fused = fused_gradients(self, x, targets, self.objective, self.block_indices)
        if fused is not None:  # the readout rows recomputed from q, k, v and dy/do
            resolved, probs = fused.targets, fused.probs
            contributions = readout_contributions_fused(fused, geom)
        else:
            attn, grads, resolved, probs = self.attention_gradients(x, targets, self.objective, self.block_indices)
            # readout rows only: A (B, 1, H, R, N) times dy/dA (B, K, H, R, N), heads and rows summed, rectified
            contributions = (readout_contribution(layer, grad, geom) for layer, grad in zip(attn, grads, strict=True))
        total = None
        for contribution in contributions:  # (B, K, N)
            if self.per_layer_norm:
                contribution = contribution / contribution.amax(-1, keepdim=True).clamp_min(1e-12)
            total = contribution if total is None else total + contribution
        return RawMaps(total.unflatten(-1, geom.grid), resolved, probs)
