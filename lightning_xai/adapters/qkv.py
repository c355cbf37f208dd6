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

import torch
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


#: Hugging Face attention classes whose forward is ``q_proj/k_proj/v_proj``, the configured attention
#: function (eager or SDPA, ``scaling = head_dim ** -0.5``), then ``o_proj``; BEiT's adds a relative position
#: bias inside its forward, which these recordings do not see, so it keeps the recorded-attention path.
HF_QKV_CLASSES = ("ViTAttention", "DeiTAttention", "Dinov2Attention", "Dinov2WithRegistersAttention")


def _heads_first(heads: int):
    """``(B, T, H * d) -> (B, H, T, d)``, detached: a forward hook's output into a record list."""
    return lambda out: out.detach().unflatten(-1, (heads, out.shape[-1] // heads)).transpose(1, 2)


def attach_hf_attention(attn: nn.Module, record: QKVRecord, stack: contextlib.ExitStack) -> bool:
    """Record ``q, k, v, o`` of a Hugging Face ViT/DeiT/DINOv2 attention (transformers 5 layout) under the
    model's configured attention implementation; ``False`` for other classes and layouts (BEiT, transformers 4's
    ``attention.attention.query``)."""
    if type(attn).__name__ not in HF_QKV_CLASSES or not all(
        hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "num_attention_heads")
    ):
        return False
    split = _heads_first(attn.num_attention_heads)
    record.scale.append(float(attn.scaling))

    def check_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None:
            raise TypeError(f"{type(attn).__name__} was called with an attention mask: lightning-xai explains "
                            "unmasked self-attention only")

    hooks = [
        attn.register_forward_pre_hook(check_mask, with_kwargs=True),
        attn.q_proj.register_forward_hook(lambda _m, _a, out: record.q.append(split(out))),
        attn.k_proj.register_forward_hook(lambda _m, _a, out: record.k.append(split(out))),
        attn.v_proj.register_forward_hook(lambda _m, _a, out: record.v.append(split(out))),
        attn.o_proj.register_forward_pre_hook(lambda _m, args: record.o.append(args[0])),
    ]
    for hook in hooks:
        stack.callback(hook.remove)
    return True


def fused_mha_forward(mha: nn.MultiheadAttention, record: QKVRecord):
    """A ``forward`` for torchvision's ``nn.MultiheadAttention`` (self-attention, ``batch_first``, one
    ``in_proj_weight``) that computes what ``F.multi_head_attention_forward`` computes with
    ``need_weights=False``: the in-projection, ``F.scaled_dot_product_attention`` (the fused kernel), the
    out-projection; and appends ``q, k, v`` (detached) and the attention output ``o`` ``(B, T, D)`` to
    ``record``. Returns ``(output (B, T, D), None)``: probabilities are never formed."""
    heads = mha.num_heads
    split = _heads_first(heads)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key is not query or value is not query or key_padding_mask is not None or attn_mask is not None:
            raise TypeError("lightning-xai explains unmasked self-attention (query is key is value); this "
                            "nn.MultiheadAttention was called otherwise")
        q, k, v = torch.nn.functional.linear(query, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        record.q.append(split(q))
        record.k.append(split(k))
        record.v.append(split(v))
        per_head = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]  # (B, H, T, d) in the graph
        mixed = torch.nn.functional.scaled_dot_product_attention(
            *per_head, dropout_p=mha.dropout if mha.training else 0.0)
        out = mixed.transpose(1, 2).flatten(-2)  # (B, T, D)
        record.o.append(out)
        return mha.out_proj(out), None

    return forward
