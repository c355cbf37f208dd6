"""The functional API: one call explains a batch, outside of any training loop."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_xai.explainers import Explanation, create_explainer


def explain(
    model: nn.Module, images: Tensor, method: str = "gradtoken", targets: Any = None, **options: Any
) -> Explanation:
    """Explain ``model``'s output logits for ``images`` ``(B, C, H, W)`` with ``method``.

    Args:
        model: a timm ViT, or any module (a LightningModule) containing one.
        images: input batch in the model's input space (normalised as for training).
        method: registry name: ``"gradtoken"``, ``"c2f"``, ``"gae"``, ``"rollout"``, ``"raw_attention"``,
            ``"vitcx"`` (see :func:`lightning_xai.available_methods`).
        targets: ``None`` (predicted class), an int, ``(B,)`` or ``(B, K)`` class indices.
        **options: the method's options, plus ``vit`` (where the ViT is), ``output_transform``, ``forward`` and
            ``task`` (``"auto"``: one logit is binary, else multiclass; pass ``"multilabel"`` for sigmoid heads).

    Returns:
        an :class:`~lightning_xai.Explanation`; ``maps`` is ``(B, K, H, W)`` in ``[0, 1]``.

    Example:
        >>> import timm, torch, lightning_xai
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
        >>> result = lightning_xai.explain(vit, torch.randn(2, 3, 32, 32), method="gradtoken")
        >>> tuple(result.maps.shape)
        (2, 1, 32, 32)
    """
    return create_explainer(method, model, **options)(images, targets)
