"""Explainers for Vision Transformers, one small class per method on one base class, by registry name.

Writing a method (the extension contract)
-----------------------------------------
Subclass :class:`Explainer`, set ``name``, implement ``compute`` and decorate the class with :func:`register`::

    @register
    class LastBlockAttentionNorm(Explainer):
        name = "attn_norm"
        needs_readout = False  # True if the method reads the rows the head reads (Geometry.readout_weights)

        def compute(self, x, targets, geom):
            with torch.no_grad():
                logits, record, resolved, probs = self.forward_captured(x, ("attn",), targets, blocks=[-1])
            maps = ...  # (B, K, h, w) from record.attn[-1] (B, H, T, T)
            return RawMaps(maps, resolved, probs)

``compute(x, targets, geom)`` receives:

- ``x``: ``(B, C, H, W)``, validated, detached, on the ViT's device and in its dtype; the model is in eval
  mode, gradients are enabled (also under ``inference_mode``), compiled submodules run uncompiled and the
  ViT's gradient checkpointing is off;
- ``targets``: the user's targets as given (``None``, an int, ``(B,)`` or ``(B, K)``); turn them into
  ``(B, K)`` class indices with the logits (``forward_captured`` does);
- ``geom``: the :class:`Geometry` of this input size, read from what the ViT received in one forward (the
  module may change its input first): ``num_prefix`` (``P``), ``grid`` (``(h, w)``), ``image_size`` (``x``'s
  ``(H, W)``, onto which the grid is laid), ``patch_size`` (pixels of ``x`` per patch) and ``readout`` (which
  rows the head reads; ``readout_weights()`` gives ``w`` of shape ``(T,)``).

It records internals with :func:`capture` (``capture(vit, ("tokens", "norm1", "attn"), blocks)``, for any
supported model family, tensors in the autograd graph) or ``self.forward_captured``, and returns
:class:`RawMaps`: ``maps`` ``(B, K, h, w)`` (patch level) or ``(B, K, H, W)`` (pixel level), ``targets``
``(B, K)`` int64, ``probs`` ``(B, K)``, optional ``extras``. The base class upsamples (:func:`upsample`,
bilinear) and min-max normalises (:func:`minmax`) into an :class:`Explanation`. :func:`unregister` removes
a method again.
"""

from lightning_xai.adapters import Geometry, capture
from lightning_xai.explainers.attention import AttentionRollout, RawAttention
from lightning_xai.explainers.base import Explainer, Explanation, RawMaps, minmax, upsample
from lightning_xai.explainers.gradient import GradientRollout, GradToken
from lightning_xai.explainers.perturbation import C2FExplainer, NoPositiveMaskWarning, ViTCX
from lightning_xai.explainers.registry import (
    available_methods,
    create_explainer,
    get_explainer,
    register,
    unregister,
)

__all__ = [
    "AttentionRollout",
    "C2FExplainer",
    "Explainer",
    "Explanation",
    "Geometry",
    "GradToken",
    "GradientRollout",
    "NoPositiveMaskWarning",
    "RawAttention",
    "RawMaps",
    "ViTCX",
    "available_methods",
    "capture",
    "create_explainer",
    "get_explainer",
    "minmax",
    "register",
    "unregister",
    "upsample",
]
