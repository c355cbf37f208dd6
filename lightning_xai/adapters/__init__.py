"""Find the Vision Transformer inside a module, read its token geometry, and capture its internals.

The adapter is the only place that knows how a timm ``VisionTransformer`` is laid out. Explainers ask it
for the grid geometry and, for the duration of one explanation pass, for the tensors they need:

- ``tokens[l]``: the residual stream entering block ``l``, ``(B, T, D)``;
- ``norm1[l]``: block ``l``'s ``norm1`` output, ``(B, T, D)``;
- ``attn[l]``: block ``l``'s attention probabilities after softmax and before dropout, ``(B, H, T, T)``.

All three stay in the autograd graph, so ``torch.autograd.grad`` of a logit with respect to them works.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

ViTLocator = Callable[[nn.Module], nn.Module] | str | nn.Module | None
OutputTransform = Callable[[Any], Tensor] | None


def _is_vit(module: nn.Module) -> bool:
    """True for a timm-style ViT: patch embedding, a ``blocks`` sequence of attention blocks, prefix tokens."""
    blocks = getattr(module, "blocks", None)
    return (
        hasattr(module, "patch_embed")
        and hasattr(module, "num_prefix_tokens")
        and isinstance(blocks, nn.Sequential | nn.ModuleList)
        and len(blocks) > 0
        and all(hasattr(b, "attn") and hasattr(b, "norm1") for b in blocks)
    )


def _describe(module: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for m in module.modules()})
    shown = ", ".join(kinds[:12]) + (", ..." if len(kinds) > 12 else "")
    return f"{type(module).__name__} (contains: {shown})"


def find_vit(module: nn.Module, vit: ViTLocator = None) -> nn.Module:
    """Return the timm-style Vision Transformer inside ``module``.

    Args:
        module: any ``nn.Module``: a timm ViT, a LightningModule holding one, a wrapper.
        vit: override: the ViT module itself, an attribute path inside ``module`` (``"model.backbone"``),
            or a callable ``module -> vit``. ``None`` searches ``module`` (itself first, then its submodules
            in registration order) for the first ViT.

    Raises:
        TypeError: nothing supported was found; the message names what was found and how to point the
            library at the right submodule.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module to explain, got {type(module).__name__}")
    if isinstance(vit, str):
        try:
            found = operator.attrgetter(vit)(module)
        except AttributeError as err:
            raise TypeError(
                f"vit={vit!r}: {type(module).__name__} has no attribute path {vit!r} ({err}). "
                "Pass the dotted attribute path of the ViT inside your module, e.g. vit='model'."
            ) from None
    elif callable(vit) and not isinstance(vit, nn.Module):
        found = vit(module)
    elif isinstance(vit, nn.Module):
        found = vit
    elif vit is None:
        found = next((m for m in module.modules() if _is_vit(m)), None)
        if found is None:
            raise TypeError(
                f"no supported Vision Transformer found in {_describe(module)}. lightning-xai explains timm "
                "VisionTransformer-style models (patch_embed, blocks with .attn and .norm1, "
                "num_prefix_tokens). If your ViT is there under another structure, point at it with "
                "vit='attribute.path' or vit=lambda module: module.backbone."
            )
    else:
        raise TypeError(f"vit must be a module, an attribute path, a callable or None, got {type(vit).__name__}")
    if not _is_vit(found):
        raise TypeError(
            f"the module selected by vit={vit!r} is {_describe(found)}, not a supported Vision Transformer "
            "(needs patch_embed, blocks with .attn and .norm1, and num_prefix_tokens)."
        )
    return found


@dataclass(frozen=True)
class Geometry:
    """Token layout of one input size.

    Attributes:
        num_prefix: ``P``, class/distillation/register tokens before the patches.
        has_class_token: whether token 0 is a class token.
        grid: ``(h, w)`` patch grid, ``N = h * w``.
        image_size: ``(H, W)`` input size in pixels.
        patch_size: ``(ph, pw)``.
    """

    num_prefix: int
    has_class_token: bool
    grid: tuple[int, int]
    image_size: tuple[int, int]
    patch_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def in_channels(vit: nn.Module) -> int | None:
    """Number of input channels the ViT's patch embedding takes, or ``None`` when it cannot be read."""
    proj = getattr(vit.patch_embed, "proj", None)
    return getattr(proj, "in_channels", None)


def geometry(vit: nn.Module, image_size: tuple[int, int]) -> Geometry:
    """Grid geometry of ``vit`` for inputs of ``image_size = (H, W)``, read from the model (never assumed).

    Raises:
        ValueError: the size does not fit the model (not divisible by the patch size, or differs from the
            training size of a model built without ``dynamic_img_size=True``).
    """
    pe = vit.patch_embed
    patch = _pair(getattr(pe, "patch_size", 16))
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
    if not pad and (height % patch[0] or width % patch[1]):
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {patch[0]}x{patch[1]}: resize or "
            "crop the images to a multiple of the patch size."
        )
    grid = (-(-height // patch[0]), -(-width // patch[1]))
    has_cls = getattr(vit, "cls_token", None) is not None
    return Geometry(int(vit.num_prefix_tokens), has_cls, grid, (height, width), patch)


@dataclass
class Capture:
    """Tensors recorded during one forward pass, one list entry per recorded block (in block order).

    Attributes:
        blocks: indices of the recorded blocks.
        tokens: residual stream entering each block, ``(B, T, D)``.
        norm1: each block's ``norm1`` output, ``(B, T, D)``.
        attn: each block's attention probabilities before dropout, ``(B, H, T, T)``.
    """

    blocks: list[int]
    tokens: list[Tensor] = field(default_factory=list)
    norm1: list[Tensor] = field(default_factory=list)
    attn: list[Tensor] = field(default_factory=list)

    def clear(self) -> None:
        self.tokens.clear()
        self.norm1.clear()
        self.attn.clear()


CAPTURABLE = ("tokens", "norm1", "attn")


def _attention_module(block: nn.Module) -> nn.Module:
    attn = block.attn
    if not hasattr(attn, "attn_drop"):
        raise TypeError(
            f"{type(block).__name__}.attn is {type(attn).__name__}, which has no attn_drop: lightning-xai "
            "reads attention probabilities at timm Attention's attn_drop (input of the dropout after softmax)."
        )
    return attn


@contextlib.contextmanager
def capture(
    vit: nn.Module, what: Sequence[str] = CAPTURABLE, blocks: Sequence[int] | None = None
) -> Iterator[Capture]:
    """Record ``what`` for the given ``blocks`` (default all) during the forwards run inside the context.

    timm's fused attention never materialises probabilities, so ``fused_attn`` is switched off on every
    recorded block's attention for the duration of the context and restored afterwards, also when an
    exception is raised. All hooks are removed on exit. Each forward appends to the lists, so callers run
    one forward per context (or call ``Capture.clear`` between forwards).
    """
    unknown = set(what) - set(CAPTURABLE)
    if unknown:
        raise ValueError(f"cannot capture {sorted(unknown)}; choose from {CAPTURABLE}")
    depth = len(vit.blocks)
    indices = list(range(depth)) if blocks is None else sorted({b % depth for b in blocks})
    record = Capture(blocks=indices)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    fused_before: list[tuple[nn.Module, bool]] = []
    try:
        for index in indices:
            block = vit.blocks[index]
            if "tokens" in what:
                handles.append(block.register_forward_pre_hook(lambda _m, args: record.tokens.append(args[0])))
            if "norm1" in what:
                handles.append(block.norm1.register_forward_hook(lambda _m, _a, out: record.norm1.append(out)))
            if "attn" in what:
                attn = _attention_module(block)
                if hasattr(attn, "fused_attn"):
                    fused_before.append((attn, attn.fused_attn))
                    attn.fused_attn = False
                handles.append(
                    attn.attn_drop.register_forward_pre_hook(lambda _m, args: record.attn.append(args[0]))
                )
        yield record
    finally:
        for handle in handles:
            handle.remove()
        for attn, fused in fused_before:
            attn.fused_attn = fused
