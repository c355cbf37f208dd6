"""Find the Vision Transformer inside a module, read its token geometry and readout, capture its internals.

One interface (:class:`~lightning_xai.adapters.base.Family`) over a small registry of model families:

- ``timm``: ``VisionTransformer`` and relatives (DeiT, BEiT, EVA, registers, dynamic size);
- ``torchvision``: ``VisionTransformer`` (``vit_b_16`` and friends);
- ``transformers`` (optional extra ``lightning-xai[hf]``): ViT, DeiT, DINOv2, BEiT.

Explainers ask, for one explanation pass, for the tensors they need (see :func:`capture`):

- ``tokens[l]``: the residual stream entering block ``l``, ``(B, T, D)``;
- ``norm1[l]``: block ``l``'s pre-attention normalisation output, ``(B, T, D)``;
- ``attn[l]``: block ``l``'s attention probabilities after softmax and before dropout, ``(B, H, T, T)``.

All three stay in the autograd graph, so ``torch.autograd.grad`` of a logit with respect to them works.
Models the methods cannot explain (CaiT, XCiT, Swin, PiT, LeViT, MViT) are recognised and rejected with a
message naming the family. ``torch.compile``d modules are explained through their original module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from lightning_xai.adapters.base import (
    CAPTURABLE,
    READOUT_GROUPS,
    Capture,
    Family,
    Geometry,
    OutputTransform,
    Readout,
    UnsupportedFamily,
    ViTLocator,
    first_tensor,
)
from lightning_xai.adapters.timm import TimmFamily
from lightning_xai.adapters.torchvision import TorchvisionFamily
from lightning_xai.adapters.transformers import TransformersFamily
from lightning_xai.adapters.unsupported import UNSUPPORTED

__all__ = [
    "CAPTURABLE",
    "READOUT_GROUPS",
    "Capture",
    "Family",
    "Geometry",
    "OutputTransform",
    "Readout",
    "UnsupportedFamily",
    "ViTLocator",
    "capture",
    "depth",
    "families",
    "family_of",
    "find_vit",
    "geometry",
    "in_channels",
    "observe_input",
    "observed_geometry",
    "readout",
    "register_family",
    "unwrap_compiled",
    "without_checkpointing",
]

_FAMILIES: list[Family] = [TimmFamily(), TorchvisionFamily(), TransformersFamily()]


def register_family(family: Family) -> Family:
    """Add a model family; it is tried before the built-in ones."""
    if not isinstance(family, Family) or not family.name:
        raise TypeError("register_family needs a Family instance with a name")
    _FAMILIES.insert(0, family)
    return family


def families() -> list[str]:
    """Names of the supported families, in the order they are tried."""
    return [f.name for f in _FAMILIES]


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The original module of a ``torch.compile``d one (``OptimizedModule._orig_mod``), else ``module``."""
    while isinstance(getattr(module, "_orig_mod", None), nn.Module) and type(module).__name__ == "OptimizedModule":
        module = module._orig_mod
    return module


def _unsupported(module: nn.Module) -> UnsupportedFamily | None:
    return next((f for f in UNSUPPORTED if f.matches(module)), None)


def family_of(module: nn.Module) -> Family:
    """The family of the ViT ``module``.

    Raises:
        TypeError: ``module`` is of an unsupported family (the message names it) or of none.
    """
    module = unwrap_compiled(module)
    rejected = _unsupported(module)
    if rejected is not None:
        raise rejected.error(module)
    for family in _FAMILIES:
        if family.matches(module):
            return family
    raise TypeError(f"{_describe(module)} is not a supported Vision Transformer ({_SUPPORTED})")


_SUPPORTED = (
    "supported: timm VisionTransformer-style models, torchvision VisionTransformer, Hugging Face ViT/DeiT/DINOv2/"
    "BEiT"
)


def _describe(module: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for m in module.modules()})
    shown = ", ".join(kinds[:12]) + (", ..." if len(kinds) > 12 else "")
    return f"{type(module).__name__} (contains: {shown})"


def _search(module: nn.Module) -> nn.Module:
    """The first supported ViT in ``module`` (itself first, then submodules in registration order)."""
    rejected: tuple[nn.Module, UnsupportedFamily] | None = None
    for sub in module.modules():
        if type(sub).__name__ == "OptimizedModule":
            continue  # its _orig_mod comes next
        family = _unsupported(sub)
        if family is not None:
            rejected = rejected or (sub, family)
            continue
        if any(f.matches(sub) for f in _FAMILIES):
            if rejected is not None and _contains(rejected[0], sub):
                continue  # a ViT-looking part of an unsupported model
            return sub
    if rejected is not None:
        raise rejected[1].error(rejected[0])
    raise TypeError(
        f"no supported Vision Transformer found in {_describe(module)} ({_SUPPORTED}). If your ViT is there but "
        "nested where the search does not look, point at it with vit='attribute.path' or "
        "vit=lambda module: module.backbone."
    )


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def find_vit(module: nn.Module, vit: ViTLocator = None) -> nn.Module:
    """Return the Vision Transformer inside ``module`` (unwrapped from ``torch.compile`` if it was compiled).

    Args:
        module: any ``nn.Module``: a ViT of a supported family, a LightningModule holding one, a wrapper.
        vit: override: the ViT module itself, an attribute path inside ``module`` (``"model.backbone"``),
            or a callable ``module -> vit``. ``None`` searches ``module`` (itself first, then its submodules
            in registration order) for the first supported ViT.

    Raises:
        TypeError: nothing supported was found (the message names what was found and how to point the
            library at the right submodule), or the model is of an unsupported family (the message names it
            and says what to do).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module to explain, got {type(module).__name__}")
    module = unwrap_compiled(module)
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
        return _search(module)
    else:
        raise TypeError(f"vit must be a module, an attribute path, a callable or None, got {type(vit).__name__}")
    if not isinstance(found, nn.Module):
        raise TypeError(f"vit={vit!r} selected a {type(found).__name__}, not an nn.Module")
    found = unwrap_compiled(found)
    rejected = _unsupported(found)
    if rejected is not None:
        raise rejected.error(found)
    if not any(f.matches(found) for f in _FAMILIES):
        raise TypeError(
            f"the module selected by vit={vit!r} is {_describe(found)}, not a supported Vision Transformer "
            f"({_SUPPORTED})."
        )
    return found


def depth(vit: nn.Module) -> int:
    """Number of transformer blocks ``L``."""
    return len(family_of(vit).blocks(vit))


def in_channels(vit: nn.Module) -> int | None:
    """Number of input channels the ViT's patch embedding takes, or ``None`` when it cannot be read."""
    return family_of(vit).in_channels(unwrap_compiled(vit))


def readout(vit: nn.Module) -> Readout:
    """Which tokens the ViT's head reads (METHODS.md, "The readout rows")."""
    return family_of(vit).readout(unwrap_compiled(vit))


def geometry(vit: nn.Module, image_size: tuple[int, int]) -> Geometry:
    """Grid geometry and readout of ``vit`` for inputs of ``image_size = (H, W)``, read from the model.

    Raises:
        ValueError: the size does not fit the model (not divisible by the patch size, or differs from the
            training size of a model built for one size only).
    """
    return family_of(vit).geometry(unwrap_compiled(vit), image_size)


@contextlib.contextmanager
def capture(
    vit: nn.Module, what: Sequence[str] = CAPTURABLE, blocks: Sequence[int] | None = None
) -> Iterator[Capture]:
    """Record ``what`` for the given ``blocks`` (default all) during the forwards run inside the context.

    Whatever the family needs to materialise attention probabilities (timm: ``fused_attn`` off;
    torchvision: ``need_weights=True``; Hugging Face: eager attention) holds only inside the context and is
    undone on exit, also when an exception is raised; all hooks are removed. Each forward appends to the
    lists, so callers run one forward per context (or call ``Capture.clear`` between forwards). The forward
    must run the original (not ``torch.compile``d) module for the hooks to fire.
    """
    unknown = set(what) - set(CAPTURABLE)
    if unknown:
        raise ValueError(f"cannot capture {sorted(unknown)}; choose from {CAPTURABLE}")
    vit = unwrap_compiled(vit)
    family = family_of(vit)
    count = len(family.blocks(vit))
    indices = list(range(count)) if blocks is None else sorted({b % count for b in blocks})
    record = Capture(blocks=indices)
    with contextlib.ExitStack() as stack:
        family.attach(vit, record, what, stack)
        yield record


@contextlib.contextmanager
def observe_input(vit: nn.Module) -> Iterator[dict[str, tuple[int, ...]]]:
    """Record what ``vit`` receives during the forwards run inside the context (hooks removed on exit).

    Yields a dict that the first forward fills: ``"input"``, the shape of the ViT's input (its first tensor
    argument, e.g. ``(B, C', H', W')``: the image after whatever the user's module did to it before the ViT), and
    ``"tokens"``, the shape ``(B, T, D)`` of the token sequence entering its first block.
    """
    vit = unwrap_compiled(vit)
    seen: dict[str, tuple[int, ...]] = {}

    def record(key: str) -> object:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            tensor = first_tensor(args, kwargs)
            if isinstance(tensor, Tensor):
                seen.setdefault(key, tuple(tensor.shape))
        return hook

    handles = [vit.register_forward_pre_hook(record("input"), with_kwargs=True),
               family_of(vit).blocks(vit)[0].register_forward_pre_hook(record("tokens"), with_kwargs=True)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def observed_geometry(
    vit: nn.Module, vit_input_size: tuple[int, int], num_tokens: int, image_size: tuple[int, int]
) -> Geometry:
    """The token geometry of ``vit`` as one forward showed it, mapped onto the user's images.

    Args:
        vit_input_size: ``(H', W')`` of what the ViT received (the user's module may resize, or a hybrid's stem
            may sit inside the ViT).
        num_tokens: ``T``, the tokens entering the first block; the patch grid is ``N = T - P`` tokens laid out
            like the ViT's input (a conv stem keeps the spatial layout), which covers hybrids whose stem
            downsamples before the patch projection.
        image_size: ``(H, W)`` of the images given to the user's module: maps are upsampled to it.

    Raises:
        ValueError: the ViT's input size does not fit it, or no ``h x w`` grid with the input's aspect ratio
            has ``N`` patches.
    """
    geom = geometry(vit, vit_input_size)
    patches = num_tokens - geom.num_prefix
    if patches != geom.num_patches:
        grid = _grid_for(patches, vit_input_size)
        if grid is None:
            raise ValueError(
                f"the {geom.family} ({type(vit).__name__}) receives {vit_input_size[0]}x{vit_input_size[1]} inputs "
                f"and makes {patches} patch tokens, which form no grid of that aspect ratio: lightning-xai cannot "
                "place its patches on the image"
            )
        geom = dataclasses.replace(geom, grid=grid)
    height, width = int(image_size[0]), int(image_size[1])
    pixels = (-(-height // geom.grid[0]), -(-width // geom.grid[1]))
    return dataclasses.replace(geom, image_size=(height, width), patch_size=pixels)


def _grid_for(patches: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(h, w)`` with ``h * w = patches`` whose aspect ratio is closest to ``size``'s (within 25 %)."""
    if patches < 1:
        return None
    aspect = size[0] / size[1]
    best = min(((h, patches // h) for h in range(1, patches + 1) if patches % h == 0),
               key=lambda hw: abs(math.log(hw[0] / hw[1] / aspect)))
    return best if abs(math.log(best[0] / best[1] / aspect)) < math.log(1.25) else None


_CHECKPOINTING_FLAGS = ("grad_checkpointing", "gradient_checkpointing")


def _checkpointing_flags(vit: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, name)`` of every submodule of ``vit`` whose flag ``name`` (timm's or Hugging Face's gradient
    checkpointing) ``is True``, as ``getattr(module, name, None) is True`` says, but without the
    ``AttributeError`` that ``nn.Module.__getattr__`` raises for each missing flag (slow, and asked of every
    submodule at every explanation): for a class that neither defines a flag nor overrides ``__getattr__``, an
    instance's flag is in its ``__dict__`` or is no ``True`` (``nn.Module.__getattr__`` finds only parameters,
    buffers and submodules)."""
    plain: dict[type, bool] = {}  # per class, within this walk
    flags = []
    for module in unwrap_compiled(vit).modules():
        cls = type(module)
        if cls not in plain:
            defined = any(hasattr(cls, name) for name in _CHECKPOINTING_FLAGS)
            plain[cls] = cls.__getattr__ is nn.Module.__getattr__ and not defined
        own = vars(module)
        for name in _CHECKPOINTING_FLAGS:
            if (own.get(name) if plain[cls] else getattr(module, name, None)) is True:
                flags.append((module, name))
    return flags


@contextlib.contextmanager
def without_checkpointing(vit: nn.Module) -> Iterator[None]:
    """Gradient checkpointing off in ``vit`` inside the context (timm ``grad_checkpointing``, Hugging Face
    ``gradient_checkpointing`` flags on any submodule), restored on exit.

    Explanations differentiate with respect to attention captured in the forward; checkpointing recomputes the
    forward during backward, where the capture's switches (timm's fused attention off) and hooks no longer hold
    (torch's ``CheckpointError``), or detaches the captured tensors altogether (reentrant checkpointing).
    The explanation pass is a forward and a backward of a few images, so the memory checkpointing saves is small.
    """
    flags = _checkpointing_flags(vit)
    try:
        for module, name in flags:
            setattr(module, name, False)
        yield
    finally:
        for module, name in flags:
            setattr(module, name, True)
