"""torchvision's ``VisionTransformer`` (``vit_b_16`` and friends).

Blocks are ``encoder.layers`` (``EncoderBlock``: ``ln_1``, ``self_attention``, ``ln_2``, ``mlp``); the head reads
the class token. ``EncoderBlock`` calls its ``nn.MultiheadAttention`` with ``need_weights=False``; during a
capture a forward pre-hook on that module asks for ``need_weights=True, average_attn_weights=False`` (per-head
probabilities, the same tensor the attention output is computed from, so gradients reach it) and a forward
hook records them. Both hooks are removed on exit, so training calls stay as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_xai.adapters.base import Family, Geometry, Readout, check_divisible, pair


def _ask_for_weights(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


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
        pre = mha.register_forward_pre_hook(_ask_for_weights, with_kwargs=True)
        stack.callback(pre.remove)
        post = mha.register_forward_hook(lambda _m, _a, out: sink.append(out[1]))
        stack.callback(post.remove)
