"""Hugging Face ``transformers`` ViT-family models: ViT, DeiT, DINOv2 (with or without registers), BEiT.

Recognised by class name and module (``transformers.models.*``) without importing ``transformers``; it is
imported (an optional extra: ``pip install "lightning-xai[hf]"``) only once such a model is found. Blocks
are ``layers`` or ``encoder.layer``; the attention module returns ``(output, probabilities)``, and the probabilities are
materialised only by the eager implementation, so ``config._attn_implementation`` is set to ``"eager"`` for
the duration of a capture and restored afterwards (also on errors). The probabilities are the tensor the
attention output is computed from, so gradients reach them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_xai.adapters.base import Family, Geometry, Readout, check_divisible, pair
from lightning_xai.adapters.qkv import QKVRecord, attach_hf_attention

#: the oldest ``transformers`` whose ViT-family attention modules return the eager probabilities and read
#: ``config._attn_implementation`` at call time (the version this adapter is tested with is newer)
MIN_VERSION = (4, 56)
INSTALL = 'pip install "lightning-xai[hf]"'

#: class name -> readout groups; ``None`` reads the BEiT pooling setting from the config
_CLASSES: dict[str, tuple[str, ...] | None] = {
    "ViTModel": ("class",),
    "ViTForImageClassification": ("class",),
    "DeiTModel": ("class",),
    "DeiTForImageClassification": ("class",),
    "DeiTForImageClassificationWithTeacher": ("class", "distillation"),
    "Dinov2Model": ("class",),
    "Dinov2ForImageClassification": ("class", "patches"),
    "Dinov2WithRegistersModel": ("class",),
    "Dinov2WithRegistersForImageClassification": ("class", "patches"),
    "BeitModel": None,
    "BeitForImageClassification": None,
}

_POOLING = {
    ("class",): "class token",
    ("class", "distillation"): "class and distillation heads averaged",
    ("class", "patches"): "linear head on [class token, mean of patch tokens]",
    ("patches",): "mean of the patch tokens (use_mean_pooling=True)",
}


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def require_transformers() -> None:
    """Import ``transformers`` or raise ``ImportError`` with the install command."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(
            f"this is a Hugging Face transformers model, but transformers cannot be imported ({err}): install the "
            f"extra with {INSTALL}"
        ) from None
    if _version(transformers.__version__) < MIN_VERSION:
        raise ImportError(
            f"transformers {transformers.__version__} is too old to explain its ViTs (eager attention probabilities "
            f"are read at call time from {'.'.join(map(str, MIN_VERSION))} on): upgrade with {INSTALL} --upgrade"
        )


class TransformersFamily(Family):
    name = "Hugging Face transformers ViT"

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        if not cls.__module__.startswith("transformers.models.") or cls.__name__ not in _CLASSES:
            return False
        require_transformers()
        return True

    def family_name(self, vit: nn.Module) -> str:
        return f"Hugging Face {type(vit).__name__}"

    @staticmethod
    def _base(vit: nn.Module) -> nn.Module:
        return getattr(vit, "base_model", vit)

    def blocks(self, vit: nn.Module) -> Sequence[nn.Module]:
        base = self._base(vit)
        # transformers 5 keeps ViT/DeiT/BEiT blocks in base.layers, DINOv2's and 4.x's in base.encoder.layer
        for owner, name in ((base, "layers"), (getattr(base, "encoder", None), "layer"),
                            (getattr(base, "encoder", None), "layers")):
            layers = getattr(owner, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
        raise TypeError(f"cannot find the transformer blocks of {type(vit).__name__} (no layers/encoder.layer)")

    def in_channels(self, vit: nn.Module) -> int | None:
        return getattr(vit.config, "num_channels", None)

    def readout(self, vit: nn.Module) -> Readout:
        groups = _CLASSES[type(vit).__name__]
        if groups is None:
            groups = ("patches",) if getattr(vit.config, "use_mean_pooling", False) else ("class",)
        return Readout(groups, _POOLING[groups])

    def num_prefix(self, vit: nn.Module) -> int:
        embeddings = self._base(vit).embeddings
        count = 1  # every supported class has a class token
        if getattr(embeddings, "distillation_token", None) is not None:
            count += 1
        registers = getattr(embeddings, "register_tokens", None)
        if registers is not None:
            count += int(registers.shape[1])
        return count

    def geometry(self, vit: nn.Module, image_size: tuple[int, int]) -> Geometry:
        # the size is not checked against config.image_size: a forward with interpolate_pos_encoding=True
        # (DINOv2 always interpolates) takes other sizes, and the model raises its own error otherwise
        patch = pair(vit.config.patch_size)
        grid = check_divisible(image_size, patch)
        size = (int(image_size[0]), int(image_size[1]))
        return Geometry(self.num_prefix(vit), True, grid, size, patch, self.readout(vit), self.family_name(vit))

    def norm1(self, block: nn.Module) -> nn.Module:
        norm = getattr(block, "layernorm_before", None)
        return norm if norm is not None else block.norm1

    def switch(self, vit: nn.Module, stack: contextlib.ExitStack) -> None:
        configs = {
            id(m.config): m.config
            for m in vit.modules()
            if hasattr(getattr(m, "config", None), "_attn_implementation")
        }
        for config in configs.values():
            before = config._attn_implementation
            config._attn_implementation = "eager"
            stack.callback(setattr, config, "_attn_implementation", before)

    def attach_attention(self, block: nn.Module, sink: list[Tensor], stack: contextlib.ExitStack) -> None:
        def record(_module: nn.Module, _args: tuple, out: tuple) -> None:
            if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                raise RuntimeError(
                    f"{type(_module).__name__} returned no attention probabilities although eager attention was "
                    f"requested: this transformers version is not supported ({INSTALL} --upgrade)"
                )
            sink.append(out[1])

        handle = block.attention.register_forward_hook(record)
        stack.callback(handle.remove)

    def attach_qkv(self, vit: nn.Module, block: nn.Module, record: QKVRecord, stack: contextlib.ExitStack) -> bool:
        """ViT, DeiT, DINOv2 (with or without registers) and BEiT (with its relative position bias) record
        ``q, k, v, o`` under their configured attention (SDPA by default); other layouts (transformers 4) keep the
        recorded-attention path."""
        return attach_hf_attention(block.attention, record, stack)
