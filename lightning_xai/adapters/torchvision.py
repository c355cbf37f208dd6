"""torchvision's ``VisionTransformer`` (``vit_b_16`` and friends).

Blocks are ``encoder.layers`` (``EncoderBlock``: ``ln_1``, ``self_attention``, ``ln_2``, ``mlp``); the head reads
the class token. ``EncoderBlock`` calls its ``nn.MultiheadAttention`` with ``need_weights=False``, and even with
``need_weights=True, average_attn_weights=False`` the weights it returns are a view taken *after* the attention
output was computed from them, so gradients of a logit never reach them. During a capture the module's
``forward`` is therefore replaced, on that instance only, by the same self-attention written out
(``softmax(q k^T / sqrt(d)) v``, then ``out_proj``) that records the probabilities it multiplies the values
with; the instance attribute is deleted again on exit (also on errors), so training runs torchvision's own
``forward``. Configurations other than torchvision's (separate q/k/v weights, ``bias_k``, masks) are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.adapters.base import Family, Geometry, Readout, check_divisible, pair
from lightning_xai.adapters.qkv import QKVRecord, fused_mha_forward


def _recording_forward(mha: nn.MultiheadAttention, sink: list[Tensor]):
    """A ``forward`` for ``mha`` (self-attention, ``batch_first``) that appends the probabilities ``(B, H, T, T)``
    it uses to ``sink`` and returns ``(output (B, T, D), probabilities or None)``."""
    heads = mha.num_heads

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key is not query or value is not query or key_padding_mask is not None or attn_mask is not None:
            raise TypeError(
                "lightning-xai reads torchvision ViT attention from unmasked self-attention (query is key is value); "
                "this nn.MultiheadAttention was called otherwise"
            )
        batch, tokens, width = query.shape
        qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)  # (B, T, 3D)
        q, k, v = qkv.unflatten(-1, (3, heads, width // heads)).permute(2, 0, 3, 1, 4)  # each (B, H, T, d)
        probs = ((q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)).softmax(-1)
        sink.append(probs)
        mixed = F.dropout(probs, p=mha.dropout, training=mha.training) @ v  # (B, H, T, d)
        out = mha.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, width))
        weights = (probs.mean(1) if average_attn_weights else probs) if need_weights else None
        return out, weights

    return forward


def _check_mha(mha: nn.MultiheadAttention) -> None:
    if not (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn):
        raise TypeError(
            "this torchvision VisionTransformer's nn.MultiheadAttention is not configured as torchvision builds it "
            "(batch_first, one in_proj_weight, no bias_k/add_zero_attn): lightning-xai cannot read its attention"
        )


class TorchvisionFamily(Family):
    name = "torchvision VisionTransformer"

    def matches(self, module: nn.Module) -> bool:
        encoder = getattr(module, "encoder", None)
        layers = getattr(encoder, "layers", None)
        return (
            isinstance(getattr(module, "conv_proj", None), nn.Conv2d)
            and hasattr(module, "class_token")
            and hasattr(encoder, "pos_embedding")
            and isinstance(layers, nn.Sequential)
            and len(layers) > 0
            and all(isinstance(getattr(b, "self_attention", None), nn.MultiheadAttention) for b in layers)
        )

    def blocks(self, vit: nn.Module) -> Sequence[nn.Module]:
        return vit.encoder.layers

    def in_channels(self, vit: nn.Module) -> int | None:
        return vit.conv_proj.in_channels

    def readout(self, vit: nn.Module) -> Readout:
        return Readout(("class",), "class token (heads read x[:, 0])")

    def geometry(self, vit: nn.Module, image_size: tuple[int, int]) -> Geometry:
        patch = pair(vit.patch_size)
        height, width = int(image_size[0]), int(image_size[1])
        expected = pair(vit.image_size)
        if (height, width) != expected:
            raise ValueError(
                f"images are {height}x{width} but the torchvision VisionTransformer was built for "
                f"{expected[0]}x{expected[1]} (its position embedding has a fixed size): resize the images."
            )
        grid = check_divisible((height, width), patch)
        return Geometry(1, True, grid, (height, width), patch, self.readout(vit), self.name)

    def norm1(self, block: nn.Module) -> nn.Module:
        return block.ln_1

    def attach_attention(self, block: nn.Module, sink: list[Tensor], stack: contextlib.ExitStack) -> None:
        mha = block.self_attention
        _check_mha(mha)
        if "forward" in vars(mha):
            raise TypeError(f"{type(block).__name__}.self_attention already has a patched forward; cannot capture")
        mha.forward = _recording_forward(mha, sink)
        stack.callback(delattr, mha, "forward")

    def attach_qkv(self, vit: nn.Module, block: nn.Module, record: QKVRecord, stack: contextlib.ExitStack) -> bool:
        """Every torchvision block records ``q, k, v, o``: its ``forward`` is replaced on that instance by
        :func:`~lightning_xai.adapters.qkv.fused_mha_forward` (the same computation, fused kernel included) and
        restored on exit."""
        mha = block.self_attention
        _check_mha(mha)
        if "forward" in vars(mha):
            raise TypeError(f"{type(block).__name__}.self_attention already has a patched forward; cannot capture")
        record.scale.append((mha.embed_dim // mha.num_heads) ** -0.5)
        mha.forward = fused_mha_forward(mha, record)
        stack.callback(delattr, mha, "forward")
        return True
