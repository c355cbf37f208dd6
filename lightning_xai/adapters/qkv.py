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
        bias: what the block adds to ``q k^T * scale`` before the softmax (BEiT's relative position bias),
            detached, ``(1 or B, H, T, T)``, or ``None``; one entry per recorded block and forward.
    """

    blocks: list[int]
    q: list[Tensor] = field(default_factory=list)
    k: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    o: list[Tensor] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    bias: list[Tensor | None] = field(default_factory=list)

    def logit_bias(self, index: int) -> Tensor | None:
        """The additive bias of recorded block ``index``, or ``None`` (a family that records no bias)."""
        return self.bias[index] if self.bias else None

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
    fused kernel; undo steps go on ``stack``. Returns ``False`` (and registers nothing) for any other class
    (BEiT's and EVA's have their own recorders below)."""
    from timm.layers import Attention

    if type(attn) is not Attention:
        return False
    heads, head_dim = attn.num_heads, attn.head_dim
    if attn.fused_attn and abs(attn.scale - head_dim**-0.5) > 1e-12 * head_dim**-0.5:
        return False  # the fused kernel uses 1/sqrt(d), the written-out one attn.scale: the model disagrees
    record.scale.append(float(attn.scale))
    # without q/k normalisation (nn.Identity returns its input) q and k are read from the projection's output as
    # v is: one hook instead of three per block
    unnormed = type(attn.q_norm) is nn.Identity and type(attn.k_norm) is nn.Identity
    wanted = (0, 1, 2) if unnormed else (2,)

    def projections(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        qkv = out.detach().unflatten(-1, (3, heads, head_dim))  # (B, T, 3, H, d)
        for which in wanted:
            (record.q, record.k, record.v)[which].append(qkv[:, :, which].transpose(1, 2))

    hooks = [
        attn.register_forward_pre_hook(_refuse_masks(type(attn).__name__), with_kwargs=True),
        attn.qkv.register_forward_hook(projections),
        attn.norm.register_forward_pre_hook(lambda _m, args: record.o.append(args[0])),  # before scale_norm
    ]
    if not unnormed:
        hooks += [
            attn.q_norm.register_forward_hook(lambda _m, _a, out: record.q.append(out.detach())),
            attn.k_norm.register_forward_hook(lambda _m, _a, out: record.k.append(out.detach())),
        ]
    for hook in hooks:
        stack.callback(hook.remove)
    return True


def _timm_qkv_from_input(attn: nn.Module, x: Tensor, heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` ``(B, H, T, d)`` of timm BEiT's or EVA's attention for its input ``x`` ``(B, T, D)``, computed as
    their forwards compute them (one ``qkv`` projection with optional q/v biases, or EVA's separate ones)."""
    if getattr(attn, "qkv", None) is None:  # EVA with q_proj, k_proj, v_proj
        return tuple(
            proj(x).unflatten(-1, (heads, head_dim)).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if attn.qkv_bias_separate:
            qkv = attn.qkv(x) + qkv_bias
        else:
            qkv = torch.nn.functional.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
    return tuple(qkv.unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4))


def attach_timm_eva_attention(attn: nn.Module, record: QKVRecord, stack: contextlib.ExitStack) -> bool:
    """Record ``q, k, v, o`` of timm EVA's ``EvaAttention`` while it runs its fused kernel: ``q, k, v`` are
    recomputed from the block's input outside the graph as its forward computes them, through its q/k
    normalisation and the rotary embedding it is called with (timm's own ``apply_rot_embed_cat`` on the patch
    tokens); ``o`` is the input of its output normalisation. ``False`` for other classes."""
    from timm.layers import apply_rot_embed_cat
    from timm.models.eva import EvaAttention

    needed = ("qkv", "q_bias", "q_norm", "k_norm", "norm", "num_heads", "head_dim", "scale", "num_prefix_tokens")
    if type(attn) is not EvaAttention or not all(hasattr(attn, name) for name in needed):
        return False
    heads, head_dim = attn.num_heads, attn.head_dim
    if attn.fused_attn and abs(attn.scale - head_dim**-0.5) > 1e-12 * head_dim**-0.5:
        return False
    record.scale.append(float(attn.scale))
    refuse_masks = _refuse_masks(type(attn).__name__)

    def inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        refuse_masks(module, args, kwargs)
        rope = args[1] if len(args) > 1 else kwargs.get("rope")
        with torch.no_grad():
            q, k, v = _timm_qkv_from_input(attn, args[0].detach(), heads, head_dim)
            q, k = attn.q_norm(q), attn.k_norm(k)
            if rope is not None:
                npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
                q, k = (
                    torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2).type_as(v)
                    for t in (q, k)
                )
        record.q.append(q)
        record.k.append(k)
        record.v.append(v)

    hooks = [
        attn.register_forward_pre_hook(inputs, with_kwargs=True),
        attn.norm.register_forward_pre_hook(lambda _m, args: record.o.append(args[0])),  # before scale_norm
    ]
    for hook in hooks:
        stack.callback(hook.remove)
    return True


def attach_timm_beit_attention(attn: nn.Module, record: QKVRecord, stack: contextlib.ExitStack) -> bool:
    """Record ``q, k, v, o`` and the relative position bias of timm BEiT's ``Attention`` while it runs its fused
    kernel. Its queries, keys and values come from an ``F.linear`` inside its forward, not from a module, so
    they are recomputed from the block's input, outside the graph, exactly as its forward computes them (the
    same ``F.linear`` on the same tensors); the bias is its own ``_get_rel_pos_bias()`` plus the model's shared
    bias, if any. ``False`` for other classes or a timm whose BEiT attention lacks these parts."""
    from timm.models.beit import Attention as BeitAttention

    needed = ("qkv", "q_bias", "proj", "num_heads", "scale", "qkv_bias_separate", "relative_position_bias_table",
              "_get_rel_pos_bias")
    if type(attn) is not BeitAttention or not all(hasattr(attn, name) for name in needed):
        return False
    heads = attn.num_heads
    head_dim = attn.qkv.out_features // (3 * heads)
    if attn.fused_attn and abs(attn.scale - head_dim**-0.5) > 1e-12 * head_dim**-0.5:
        return False
    record.scale.append(float(attn.scale))

    def inputs(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        shared = args[1] if len(args) > 1 else kwargs.get("shared_rel_pos_bias")
        with torch.no_grad():
            q, k, v = _timm_qkv_from_input(attn, args[0].detach(), heads, head_dim)
            bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
            if shared is not None:
                bias = shared.detach() if bias is None else bias + shared.detach()
        record.q.append(q)
        record.k.append(k)
        record.v.append(v)
        record.bias.append(None if bias is None else bias.reshape(-1, *bias.shape[-3:]))  # (1 or B, H, T, T)

    hooks = [
        attn.register_forward_pre_hook(inputs, with_kwargs=True),
        attn.proj.register_forward_pre_hook(lambda _m, args: record.o.append(args[0])),
    ]
    for hook in hooks:
        stack.callback(hook.remove)
    return True


#: Hugging Face attention classes whose forward is ``q_proj/k_proj/v_proj``, the configured attention
#: function (eager or SDPA, ``scaling = head_dim ** -0.5``, an additive ``attention_mask``), then ``o_proj``
HF_QKV_CLASSES = ("ViTAttention", "DeiTAttention", "Dinov2Attention", "Dinov2WithRegistersAttention", "BeitAttention")
#: of those, the classes whose blocks pass their relative position bias as the additive ``attention_mask``
HF_BIAS_CLASSES = ("BeitAttention",)


def _heads_first(heads: int):
    """``(B, T, H * d) -> (B, H, T, d)``, detached: a forward hook's output into a record list."""
    return lambda out: out.detach().unflatten(-1, (heads, out.shape[-1] // heads)).transpose(1, 2)


def attach_hf_attention(attn: nn.Module, record: QKVRecord, stack: contextlib.ExitStack) -> bool:
    """Record ``q, k, v, o`` of a Hugging Face ViT/DeiT/DINOv2 attention (transformers 5 layout) under the
    model's configured attention implementation, and BEiT's relative position bias (the additive attention mask
    its blocks pass); ``False`` for other classes and layouts (transformers 4's ``attention.attention.query``)."""
    if type(attn).__name__ not in HF_QKV_CLASSES or not all(
        hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "num_attention_heads")
    ):
        return False
    split = _heads_first(attn.num_attention_heads)
    record.scale.append(float(attn.scaling))

    takes_bias = type(attn).__name__ in HF_BIAS_CLASSES

    def check_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None and not (takes_bias and mask.is_floating_point()):
            raise TypeError(f"{type(attn).__name__} was called with an attention mask: lightning-xai explains "
                            "unmasked self-attention only")
        if takes_bias:
            record.bias.append(None if mask is None else mask.detach().reshape(-1, *mask.shape[-3:]))

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
