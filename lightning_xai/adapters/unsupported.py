"""Families the methods cannot explain, recognised so that the error names them and says what to do.

They are checked before the supported families: CaiT and XCiT have a timm ViT's ``patch_embed`` and
``blocks`` and would otherwise be taken for one.
"""

from __future__ import annotations

from torch import nn

from lightning_xai.adapters.base import UnsupportedFamily

_USE_INSTEAD = (
    "Explain a ViT whose every block is token-to-token self-attention and whose head reads the class token or the "
    "mean of the patch tokens: timm vit_*/deit_*/beit_*/eva02_*, torchvision vit_*, or Hugging Face ViT, DeiT, "
    "DINOv2, BEiT (see the README, 'Supported models')."
)


def _has_xca(module: nn.Module) -> bool:
    blocks = getattr(module, "blocks", None)
    return isinstance(blocks, nn.Sequential | nn.ModuleList) and any(
        type(getattr(b, "attn", None)).__name__ == "XCA" for b in blocks
    )


UNSUPPORTED: tuple[UnsupportedFamily, ...] = (
    UnsupportedFamily(
        "CaiT (class-attention)",
        ("Cait",),
        "its class token enters only in the class-attention layers (blocks_token_only), whose attention is "
        "class-to-patch rather than token-to-token, and the self-attention blocks before them have no class "
        "token, so no attention row of one T x T matrix per block is what the head reads",
        _USE_INSTEAD,
        detect=lambda m: hasattr(m, "blocks_token_only") and hasattr(m, "blocks"),
    ),
    UnsupportedFamily(
        "XCiT (cross-covariance attention)",
        ("Xcit",),
        "its attention runs between feature channels (a (D/H) x (D/H) matrix per head), not between tokens, so "
        "there is no token-to-token attention map to read",
        _USE_INSTEAD,
        detect=_has_xca,
    ),
    UnsupportedFamily(
        "hierarchical/windowed (Swin)",
        (
            "SwinTransformer", "SwinTransformerV2", "SwinTransformerV2Cr", "SwinModel", "SwinForImageClassification",
            "Swinv2Model", "Swinv2ForImageClassification",
        ),
        "it attends within local windows and merges patches between stages, so there is no single token grid "
        "with a T x T attention matrix per block",
        _USE_INSTEAD,
    ),
    UnsupportedFamily(
        "hierarchical (PiT)",
        ("PoolingVisionTransformer",),
        "it pools the token grid between stages, so blocks of different stages see different tokens",
        _USE_INSTEAD,
    ),
    UnsupportedFamily(
        "hierarchical (LeViT)",
        ("Levit", "LevitDistilled", "LevitModel", "LevitForImageClassification",
         "LevitForImageClassificationWithTeacher"),
        "it is a convolution/attention hybrid that shrinks the token grid between stages with attention "
        "subsampling, and has no class token",
        _USE_INSTEAD,
    ),
    UnsupportedFamily(
        "hierarchical (MViT)",
        ("MultiScaleVit", "MViT"),
        "it pools queries and keys inside its attention and shrinks the token grid between stages",
        _USE_INSTEAD,
    ),
)
