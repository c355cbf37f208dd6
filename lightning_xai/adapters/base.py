"""The one interface every model family implements, and what it hands to the explainers.

A :class:`Family` knows how to recognise its models and, for one recognised ViT, its token geometry
(:class:`Geometry`), which attention rows its head reads (:class:`Readout`), its blocks, and how to record
during one forward, inside the autograd graph:

- ``tokens[l]``: the residual stream entering block ``l``, ``(B, T, D)``;
- ``norm1[l]``: block ``l``'s pre-attention normalisation output (timm ``norm1``, torchvision ``ln_1``,
  Hugging Face ``layernorm_before``/``norm1``), ``(B, T, D)``;
- ``attn[l]``: block ``l``'s attention probabilities after softmax, before dropout, ``(B, H, T, T)``.

An :class:`UnsupportedFamily` recognises a model the methods cannot explain and says why and what to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.adapters.qkv import QKVRecord

ViTLocator = Callable[[nn.Module], nn.Module] | str | nn.Module | None
OutputTransform = Callable[[Any], Tensor] | None

#: What a readout group reads: ``"class"`` row 0, ``"distillation"`` row 1, ``"patches"`` the mean of the
#: patch rows ``P..T-1``, ``"tokens"`` the mean of all rows ``0..T-1``.
READOUT_GROUPS = ("class", "distillation", "patches", "tokens")


@dataclass(frozen=True)
class Readout:
    """Which tokens the model's head reads, hence which attention rows a map is read from (METHODS.md,
    "The readout rows").

    Attributes:
        groups: the pooled features the head reads, each one of :data:`READOUT_GROUPS`; several groups are
            averaged (DeiT's distilled head averages its class and distillation heads: ``("class",
            "distillation")``). Empty when no attention row expresses the pooling.
        pooling: how the family names the pooling, for messages (``"global_pool='avg'"``).
    """

    groups: tuple[str, ...]
    pooling: str

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(READOUT_GROUPS)
        if unknown:
            raise ValueError(f"unknown readout group(s) {sorted(unknown)}; choose from {READOUT_GROUPS}")

    @property
    def expressible(self) -> bool:
        """Whether the pooling is a mean of attention rows (``False`` for attention pooling, max pooling)."""
        return bool(self.groups)


TOKEN_READOUT = Readout(("class",), "class token")


@dataclass(frozen=True)
class Geometry:
    """Token layout of one input size.

    Attributes:
        num_prefix: ``P``, class/distillation/register tokens before the patches.
        has_class_token: whether token 0 is a class token.
        grid: ``(h, w)`` patch grid, ``N = h * w``.
        image_size: ``(H, W)`` input size in pixels.
        patch_size: ``(ph, pw)``.
        readout: the rows the head reads (default: the class token's).
        family: the model family's name, for messages.
    """

    num_prefix: int
    has_class_token: bool
    grid: tuple[int, int]
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    readout: Readout = TOKEN_READOUT
    family: str = "timm VisionTransformer"

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """``T = P + N``."""
        return self.num_prefix + self.num_patches

    def readout_weights(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """``w``, ``(T,)``, summing to 1: the readout rows' weights (each group counts equally, a group's rows
        equally within it). A map read "from row 0" is ``Σ_q w_q M[q, P:]``.

        Raises:
            ValueError: the pooling cannot be expressed as attention rows.
        """
        if not self.readout.expressible:
            raise ValueError(
                f"the {self.family}'s pooling ({self.readout.pooling}) is not a mean of attention rows; "
                "methods that read attention rows cannot explain it"
            )
        weights = torch.zeros(self.num_tokens, dtype=dtype, device=device)
        share = 1.0 / len(self.readout.groups)
        for group in self.readout.groups:
            if group == "class":
                weights[0] += share
            elif group == "distillation":
                weights[1] += share
            elif group == "patches":
                weights[self.num_prefix :] += share / self.num_patches
            else:  # "tokens"
                weights += share / self.num_tokens
        return weights

    def readout_rows(self) -> tuple[list[int], Tensor]:
        """The rows with non-zero readout weight and their weights: ``(rows, weights (len(rows),))``."""
        weights = self.readout_weights()
        rows = torch.nonzero(weights).flatten().tolist()
        return rows, weights[rows]


@dataclass
class Capture:
    """Tensors recorded during one forward pass, one list entry per recorded block (in block order).

    Attributes:
        blocks: indices of the recorded blocks.
        tokens: residual stream entering each block, ``(B, T, D)``.
        norm1: each block's pre-attention normalisation output, ``(B, T, D)``.
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


def pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def check_divisible(image_size: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """The patch grid ``(h, w)`` for ``image_size``; raises ``ValueError`` when a side is not a multiple."""
    height, width = int(image_size[0]), int(image_size[1])
    if height % patch[0] or width % patch[1]:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {patch[0]}x{patch[1]}: resize or "
            "crop the images to a multiple of the patch size."
        )
    return (height // patch[0], width // patch[1])


def first_tensor(args: tuple, kwargs: dict) -> Tensor:
    """A hook's first positional argument, else ``hidden_states``/``pixel_values`` or the first keyword one."""
    if args:
        return args[0]
    for key in ("hidden_states", "pixel_values"):
        if key in kwargs:
            return kwargs[key]
    return next(iter(kwargs.values()), None)


class Family:
    """A family of ViTs (timm, torchvision, Hugging Face) behind one interface.

    Subclasses set ``name`` and implement :meth:`matches`, :meth:`blocks`, :meth:`geometry`,
    :meth:`readout`, :meth:`in_channels`, :meth:`norm1` and :meth:`attach_attention`; :meth:`switch` may turn
    a model-wide setting (eager attention) on for the duration of a capture.
    """

    name: str = ""

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a model of this family (the ViT itself, not a wrapper around one)."""
        raise NotImplementedError

    def blocks(self, vit: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, input to output."""
        raise NotImplementedError

    def geometry(self, vit: nn.Module, image_size: tuple[int, int]) -> Geometry:
        """Token layout for inputs of ``image_size``; ``ValueError`` when the size does not fit the model."""
        raise NotImplementedError

    def readout(self, vit: nn.Module) -> Readout:
        """Which tokens the head reads."""
        raise NotImplementedError

    def in_channels(self, vit: nn.Module) -> int | None:
        """Input channels of the patch embedding, ``None`` when they cannot be read."""
        return None

    def norm1(self, block: nn.Module) -> nn.Module:
        """The block's pre-attention normalisation."""
        raise NotImplementedError

    def attach_attention(self, block: nn.Module, sink: list[Tensor], stack: contextlib.ExitStack) -> None:
        """Make ``block`` append its attention probabilities ``(B, H, T, T)`` (in the graph) to ``sink`` on
        every forward; register every undo step on ``stack``."""
        raise NotImplementedError

    def switch(self, vit: nn.Module, stack: contextlib.ExitStack) -> None:
        """Model-wide settings needed while attention is captured, undone through ``stack``."""

    def attach_qkv(self, vit: nn.Module, block: nn.Module, record: QKVRecord, stack: contextlib.ExitStack) -> bool:
        """Make ``block`` (of ``vit``) append its ``q, k, v`` and attention output ``o`` to ``record`` on every
        forward while the model keeps its own (fused) attention kernel; undo steps go on ``stack``.

        Returns ``False`` when the block's attention cannot be recomputed exactly from ``q, k, v`` (a bias or
        embedding the recording does not see): the attention methods then keep the path that records the
        attention probabilities (:meth:`attach_attention`). The base class returns ``False``: a family keeps
        that path unless its code implements this method.
        """
        return False

    # -- shared --------------------------------------------------------------------------------------------
    def attach(self, vit: nn.Module, record: Capture, what: Sequence[str], stack: contextlib.ExitStack) -> None:
        """Register the hooks and switches that fill ``record`` for ``what``; undo steps go on ``stack``."""
        blocks = self.blocks(vit)
        if "attn" in what:
            self.switch(vit, stack)
        for index in record.blocks:
            block = blocks[index]
            if "tokens" in what:
                handle = block.register_forward_pre_hook(
                    lambda _m, args, kwargs: record.tokens.append(first_tensor(args, kwargs)), with_kwargs=True
                )
                stack.callback(handle.remove)
            if "norm1" in what:
                handle = self.norm1(block).register_forward_hook(lambda _m, _a, out: record.norm1.append(out))
                stack.callback(handle.remove)
            if "attn" in what:
                self.attach_attention(block, record.attn, stack)


@dataclass(frozen=True)
class UnsupportedFamily:
    """Models the methods cannot explain: recognised so the error names them and says what to do.

    Attributes:
        name: the family, as users know it (``"CaiT (class-attention)"``).
        class_names: model class names of the family (matched exactly).
        reason: why the methods cannot explain it.
        advice: what to do instead.
        detect: an extra structural test, for classes not listed.
    """

    name: str
    class_names: tuple[str, ...]
    reason: str
    advice: str
    detect: Callable[[nn.Module], bool] | None = None

    def matches(self, module: nn.Module) -> bool:
        if type(module).__name__ in self.class_names:
            return True
        return self.detect is not None and bool(self.detect(module))

    def error(self, module: nn.Module) -> TypeError:
        return TypeError(
            f"{type(module).__name__} is a model of the {self.name} family, which lightning-xai does not support: "
            f"{self.reason}. "
            f"{self.advice}"
        )
