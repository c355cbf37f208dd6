"""Recording each block's queries, keys, values and attention output while the model runs its own (fused)
attention kernel, for the fused path of the attention methods (METHODS.md, "The fused path").

With ``o_h = A_h V_h`` the attention output of head ``h`` (before the output projection),
``A_h = softmax(q_h k_h^T * scale)`` and ``dy/dA_h = (dy/do_h) V_h^T``: the rows of ``A`` and of ``dy/dA`` that
a method needs can be recomputed afterwards from ``q, k, v`` and the gradient at ``o``, so the forward never
has to materialise a ``T x T`` matrix. A family records them through :meth:`Family.attach_qkv
<lightning_xai.adapters.base.Family.attach_qkv>`; this module holds the record and the per-family recorders.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class QKVRecord:
    """What one forward recorded per block (one entry per recorded block, in block order).

    Attributes:
        blocks: indices of the recorded blocks.
        q: queries after any q normalisation, detached, ``(B, H, T, d)``.
        k: keys after any k normalisation, detached, ``(B, H, T, d)``.
        v: values, detached, ``(B, H, T, d)``.
        o: the attention outputs ``A V`` with the heads concatenated, ``(B, T, H * d)``, in the autograd graph
            (the tensor gradients are taken with respect to).
        scale: the factor the model multiplies ``q k^T`` with, per block.
    """

    blocks: list[int]
    q: list[Tensor] = field(default_factory=list)
    k: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    o: list[Tensor] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)

    def heads(self, index: int) -> int:
        """Number of heads ``H`` of recorded block ``index``."""
        return self.q[index].shape[1]

    def split_heads(self, index: int, tensor: Tensor) -> Tensor:
        """``(..., T, H * d) -> (..., H, T, d)`` for block ``index`` (a gradient at ``o``)."""
        heads = self.heads(index)
        split = tensor.unflatten(-1, (heads, tensor.shape[-1] // heads))  # (..., T, H, d)
        return split.transpose(-3, -2)


def _refuse_masks(name: str):
    def check(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal", False):
            raise TypeError(
                f"{name} was called with an attention mask or is_causal: lightning-xai explains unmasked "
                "self-attention only"
            )

    return check


def attach_timm_attention(attn: nn.Module, record: QKVRecord, stack: contextlib.ExitStack) -> bool:
    """Record ``q, k, v, o`` of a timm ``Attention`` (``timm.layers.Attention``, the ViT's own) while it runs its
    fused kernel; undo steps go on ``stack``. Returns ``False`` (and registers nothing) for any other class:
    BEiT's attention adds a relative position bias and EVA's a rotary embedding inside its forward, which these
    recordings do not see, so those keep the recorded-attention path."""
    from timm.layers import Attention

    if type(attn) is not Attention:
        return False
    heads, head_dim = attn.num_heads, attn.head_dim
    if attn.fused_attn and abs(attn.scale - head_dim**-0.5) > 1e-12 * head_dim**-0.5:
        return False  # the fused kernel uses 1/sqrt(d), the written-out one attn.scale: the model disagrees
    record.scale.append(float(attn.scale))

    def values(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        record.v.append(out.detach().unflatten(-1, (3, heads, head_dim))[:, :, 2].transpose(1, 2))

    hooks = [
        attn.register_forward_pre_hook(_refuse_masks(type(attn).__name__), with_kwargs=True),
        attn.qkv.register_forward_hook(values),
        attn.q_norm.register_forward_hook(lambda _m, _a, out: record.q.append(out.detach())),
        attn.k_norm.register_forward_hook(lambda _m, _a, out: record.k.append(out.detach())),
        attn.norm.register_forward_pre_hook(lambda _m, args: record.o.append(args[0])),  # before scale_norm
    ]
    for hook in hooks:
        stack.callback(hook.remove)
    return True
