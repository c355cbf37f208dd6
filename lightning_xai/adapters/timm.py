"""timm ViTs: ``VisionTransformer`` and its relatives with the same layout (DeiT, BEiT, EVA, relpos ViTs).

Recognised by structure: ``patch_embed``, a ``blocks`` sequence of blocks with ``.attn`` and ``.norm1``,
``num_prefix_tokens``. Attention probabilities are read at the input of ``attn.attn_drop`` (after softmax,
before dropout); timm's fused attention never materialises them, so ``fused_attn`` is switched off on the
recorded blocks during a capture and restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_xai.adapters.base import Family, Geometry, Readout, check_divisible, pair
from lightning_xai.adapters.qkv import (
    QKVRecord,
    attach_timm_attention,
    attach_timm_beit_attention,
    attach_timm_eva_attention,
)


class TimmFamily(Family):
    name = "timm VisionTransformer"

    def matches(self, module: nn.Module) -> bool:
        blocks = getattr(module, "blocks", None)
        return (
            hasattr(module, "patch_embed")
            and hasattr(module, "num_prefix_tokens")
            and isinstance(blocks, nn.Sequential | nn.ModuleList)
            and len(blocks) > 0
            and all(hasattr(b, "attn") and hasattr(b, "norm1") for b in blocks)
        )

    def blocks(self, vit: nn.Module) -> Sequence[nn.Module]:
        return vit.blocks

    def in_channels(self, vit: nn.Module) -> int | None:
        backbone = getattr(vit.patch_embed, "backbone", None)  # a hybrid: the stem takes the image
        first = vit.patch_embed if backbone is None else backbone
        conv = next((m for m in first.modules() if isinstance(m, nn.Conv2d)), None)
        return getattr(conv, "in_channels", None)

    def readout(self, vit: nn.Module) -> Readout:
        if getattr(vit, "head_dist", None) is not None:  # VisionTransformerDistilled: (head(x0) + head_dist(x1)) / 2
            return Readout(("class", "distillation"), "class and distillation tokens, heads averaged")
        if getattr(vit, "attn_pool", None) is not None:
            return Readout((), "attention pooling, global_pool='map'")
        pool = getattr(vit, "global_pool", "token")
        if pool == "token":
            return Readout(("class",), "global_pool='token'")
        if pool == "avg":
            if getattr(vit, "pool_include_prefix", False):
                return Readout(("tokens",), "global_pool='avg' over all tokens (pool_include_prefix=True)")
            return Readout(("patches",), "global_pool='avg'")
        return Readout((), f"global_pool={pool!r}")

    def geometry(self, vit: nn.Module, image_size: tuple[int, int]) -> Geometry:
        pe = vit.patch_embed
        patch = pair(getattr(pe, "patch_size", 16))
        height, width = int(image_size[0]), int(image_size[1])
        dynamic = bool(getattr(vit, "dynamic_img_size", False) or getattr(pe, "dynamic_img_size", False))
        pad = bool(getattr(pe, "dynamic_img_pad", False))
        if not dynamic:
            expected = getattr(pe, "img_size", None)
            strict = getattr(pe, "strict_img_size", True)
            if expected is not None and strict and tuple(expected) != (height, width):
                raise ValueError(
                    f"images are {height}x{width} but the ViT was built for {expected[0]}x{expected[1]}: resize "
                    "the images, or create the model with timm.create_model(..., dynamic_img_size=True)."
                )
        if pad:
            grid = (-(-height // patch[0]), -(-width // patch[1]))
        else:
            grid = check_divisible((height, width), patch)
        has_cls = getattr(vit, "cls_token", None) is not None
        return Geometry(int(vit.num_prefix_tokens), has_cls, grid, (height, width), patch, self.readout(vit), self.name)

    def norm1(self, block: nn.Module) -> nn.Module:
        return block.norm1

    def attach_attention(self, block: nn.Module, sink: list[Tensor], stack: contextlib.ExitStack) -> None:
        attn = block.attn
        if not hasattr(attn, "attn_drop"):
            raise TypeError(
                f"{type(block).__name__}.attn is {type(attn).__name__}, which has no attn_drop: lightning-xai "
                "reads attention probabilities at timm Attention's attn_drop (input of the dropout after softmax)."
            )
        if hasattr(attn, "fused_attn"):
            fused = attn.fused_attn
            attn.fused_attn = False
            stack.callback(setattr, attn, "fused_attn", fused)
        handle = attn.attn_drop.register_forward_pre_hook(lambda _m, args: sink.append(args[0]))
        stack.callback(handle.remove)

    def attach_qkv(self, vit: nn.Module, block: nn.Module, record: QKVRecord, stack: contextlib.ExitStack) -> bool:
        """timm's own ``Attention`` (ViT, DeiT, registers, any pooling), BEiT's (with its relative position bias)
        and EVA's (with its rotary embedding) record ``q, k, v, o`` under their fused kernels. Kept on the
        recorded-attention path: other attention classes (whatever they add inside their forward is unknown
        here), and models with gradient checkpointing on (the recomputed forward would record a second time)."""
        if getattr(vit, "grad_checkpointing", False):
            return False
        recorders = (attach_timm_attention, attach_timm_beit_attention, attach_timm_eva_attention)
        return any(attach(block.attn, record, stack) for attach in recorders)
