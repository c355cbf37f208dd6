"""The fused path of the attention methods (METHODS.md, "The fused path"): the model runs its own fused
attention kernel, each block's ``q, k, v`` and attention output ``o`` are recorded, one autograd call gives
the targets' gradients at the ``o``'s, and the rows of ``A = softmax(q k^T * scale)`` and of
``dy/dA = (dy/do) v^T`` a method needs are recomputed afterwards, outside autograd, without a ``T x T`` matrix
in the graph.

:func:`capture_qkv` is the one place where the path is chosen: it yields ``None`` when the model's family
keeps the recorded-attention path for one of the blocks (:meth:`Family.attach_qkv
<lightning_xai.adapters.base.Family.attach_qkv>` says so in that family's code).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_xai.adapters import Geometry, family_of, unwrap_compiled
from lightning_xai.adapters.qkv import QKVRecord

if TYPE_CHECKING:
    from lightning_xai.explainers.base import Explainer

#: rows of ``A`` recomputed at once are bounded so that one chunk holds about this many elements
CHUNK_ELEMENTS = 1 << 22


_recorded_only = False


@contextlib.contextmanager
def recorded_path() -> Iterator[None]:
    """Within the context every family takes the recorded-attention path (the attention probabilities recorded
    in the graph): for comparisons of the two paths in tests and benchmarks."""
    global _recorded_only
    before, _recorded_only = _recorded_only, True
    try:
        yield
    finally:
        _recorded_only = before


@contextlib.contextmanager
def capture_qkv(vit: nn.Module, blocks: Sequence[int] | None = None) -> Iterator[QKVRecord | None]:
    """Record ``q, k, v, o`` of ``blocks`` (default all) during the forward run inside the context; yields
    ``None`` (with nothing attached) when the family keeps the recorded-attention path for any of them. Hooks
    are removed on exit, also on errors."""
    vit = unwrap_compiled(vit)
    family = family_of(vit)
    all_blocks = family.blocks(vit)
    count = len(all_blocks)
    indices = list(range(count)) if blocks is None else sorted({b % count for b in blocks})
    record = QKVRecord(blocks=indices)
    with contextlib.ExitStack() as stack:
        supported = not _recorded_only and all(family.attach_qkv(vit, all_blocks[i], record, stack) for i in indices)
        if not supported:
            stack.close()
        yield record if supported else None


def uses_fused_path(vit: nn.Module) -> bool:
    """Whether the attention methods explain ``vit`` on the fused path (every block records ``q, k, v, o``)."""
    with capture_qkv(vit) as record:
        return record is not None


@dataclass
class FusedGradients:
    """A forward on the fused path and the targets' gradients at each recorded block's attention output.

    Attributes:
        record: ``q, k, v`` per block (detached, float32), ``(B, H, T, d)``.
        grads: ``dy/do`` per block, float32, ``(B, K, H, T, d)``.
        targets: ``(B, K)``.
        probs: ``(B, K)``.
    """

    record: QKVRecord
    grads: list[Tensor]
    targets: Tensor
    probs: Tensor


def _record_forward(explainer: Explainer, x: Tensor, targets: Any, record: QKVRecord) -> tuple[Tensor, Tensor, Tensor]:
    """One forward of ``x`` while ``record`` is attached: ``(logits, targets (B, K), probs (B, K))``."""
    logits, _, resolved, probs = explainer.forward_captured(x, (), targets, record.blocks)
    if len(record.q) != len(record.blocks):
        raise RuntimeError(
            f"recorded {len(record.q)} attention blocks for {len(record.blocks)} requested: the forward did not run "
            "each block's attention once (a checkpointed or compiled block?)"
        )
    for name in ("q", "k", "v"):
        setattr(record, name, [t.float() for t in getattr(record, name)])
    return logits, resolved, probs


def fused_gradients(
    explainer: Explainer, x: Tensor, targets: Any, objective: str, blocks: Sequence[int] | None = None
) -> FusedGradients | None:
    """One forward with the model's fused attention and one gradient call at the attention outputs of
    ``blocks``, or ``None`` when the family keeps the recorded-attention path."""
    with capture_qkv(explainer.vit, blocks) as record:
        if record is None:
            return None
        x = x.requires_grad_(True)
        logits, resolved, probs = _record_forward(explainer, x, targets, record)
        grads = explainer.target_gradients(logits, resolved, record.o, objective)
    record.o = []  # the graph goes with them
    heads = [record.split_heads(i, g.float()) for i, g in enumerate(grads)]
    return FusedGradients(record, heads, resolved, probs.detach())


def fused_forward(
    explainer: Explainer, x: Tensor, targets: Any, blocks: Sequence[int] | None = None
) -> tuple[QKVRecord, Tensor, Tensor] | None:
    """One forward without a graph recording ``q, k`` of ``blocks``: ``(record, targets, probs)``, or ``None``
    when the family keeps the recorded-attention path."""
    with capture_qkv(explainer.vit, blocks) as record:
        if record is None:
            return None
        with torch.no_grad():
            _, resolved, probs = _record_forward(explainer, x, targets, record)
    record.o = []
    return record, resolved, probs


def attention_rows(q: Tensor, k: Tensor, scale: float, rows: Tensor | slice, bias: Tensor | None = None) -> Tensor:
    """Rows ``rows`` of ``A = softmax((q * scale) k^T + bias)``: ``q, k`` ``(B, H, T, d)``, ``bias``
    ``(1 or B, H, T, T)`` or ``None`` -> ``(B, H, R, T)``, computed as the model's written-out attention does
    (scale the queries, multiply, add the bias, softmax)."""
    logits = (q[:, :, rows] * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()[:, :, rows]
    return logits.softmax(-1)


def attention_columns(q: Tensor, k: Tensor, scale: float, rows: Tensor | slice, bias: Tensor | None = None) -> Tensor:
    """:func:`attention_rows` transposed, ``(B, H, T, R)``: ``k (q_rows * scale)^T (+ bias_rows^T)``, softmax over
    the keys (dim -2). For a few rows this reads the recorded ``k`` as it lies, where ``q_rows k^T`` would first
    copy ``k^T``."""
    logits = k @ (q[:, :, rows] * scale).transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()[:, :, rows].transpose(-2, -1)
    return logits.softmax(-2)


def attention_matrix(record: QKVRecord, index: int) -> Tensor:
    """The whole attention matrix of recorded block ``index``, ``(B, H, T, T)``."""
    return attention_rows(record.q[index], record.k[index], record.scale[index], slice(None), record.logit_bias(index))


#: readout rows of one chunk: a slice when they are consecutive (a view, no gather), else an index tensor
RowChunk = tuple[slice | Tensor, Tensor | None]


def readout_chunks(geom: Geometry, per_row: int, device: torch.device | str) -> list[RowChunk]:
    """The readout rows in chunks of at most ``CHUNK_ELEMENTS / per_row`` rows, each with its weights ``(c,)``,
    or ``None`` where every weight is 1 (a class-token readout reads row 0 as it is)."""
    rows, weights = geom.readout_rows()
    size = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    chunks: list[RowChunk] = []
    for start in range(0, len(rows), size):
        part, part_weights = rows[start : start + size], weights[start : start + size]
        consecutive = part[-1] - part[0] == len(part) - 1  # rows are sorted and distinct
        index = slice(part[0], part[-1] + 1) if consecutive else torch.tensor(part, device=device)
        chunks.append((index, None if bool((part_weights == 1).all()) else part_weights.to(device)))
    return chunks


def readout_contribution_fused(
    q: Tensor, k: Tensor, v: Tensor, grad: Tensor, scale: float, chunks: list[RowChunk], prefix: int,
    bias: Tensor | None = None,
) -> Tensor:
    """GradToken's per-block contribution (METHODS.md) from ``q, k, v`` and the gradient at ``o``:
    ``c_i = relu( Σ_h Σ_q w_q A[h, q, P+i] · G[h, q, P+i] )`` with ``G = (dy/do) v^T``, computed as
    ``Σ_h Σ_d v[h, P+i, d] · M[h, P+i, d]``, ``M = A_rows^T (w ⊙ dy/do_rows)``, over the readout rows in
    chunks, so that no ``(B, K, H, R, T)`` tensor is formed; ``A_rows^T`` is formed as it is used
    (:func:`attention_columns`).

    Args:
        q, k, v: ``(B, H, T, d)``.
        grad: ``(B, K, H, T, d)``, the targets' gradients at the attention output.
        chunks: the readout rows and their weights (:func:`readout_chunks`).
        prefix: ``P``, the tokens before the patches.
        bias: ``(1 or B, H, T, T)`` added to the attention logits, or ``None``.

    Returns:
        ``(B, K, N)`` contributions, one per patch.
    """
    total = None
    for rows, weights in chunks:
        a = attention_columns(q, k, scale, rows, bias)[:, :, prefix:]  # (B, H, N, c)
        g = grad[:, :, :, rows]  # (B, K, H, c, d)
        if weights is not None:
            g = g * weights.to(grad)[:, None]
        part = a.unsqueeze(1) @ g  # (B, K, H, N, d)
        total = part if total is None else total + part
    return (total * v[:, None, :, prefix:]).sum((2, 4)).clamp_min(0)


def readout_contributions_fused(fused: FusedGradients, geom: Geometry) -> Iterator[Tensor]:
    """GradToken's contribution ``(B, K, N)`` of each recorded block, in block order, one at a time (see
    :func:`readout_contribution_fused`); the readout rows are chunked once for all blocks."""
    record, chunks = fused.record, {}
    for i, grad in enumerate(fused.grads):
        batch, heads, tokens, _ = record.q[i].shape
        per_row = batch * heads * tokens * grad.shape[1]
        if per_row not in chunks:
            chunks[per_row] = readout_chunks(geom, per_row, grad.device)
        yield readout_contribution_fused(record.q[i], record.k[i], record.v[i], grad, record.scale[i],
                                         chunks[per_row], geom.num_prefix, record.logit_bias(i))


def gae_step(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """GAE's per-block weighting ``mean_h relu(dy/dA ⊙ A)`` from ``q, k, v`` ``(B, H, T, d)``, the gradient
    at ``o`` ``(B, K, H, T, d)`` and the logits' bias (or ``None``): ``(B, K, T, T)``, one block's whole
    matrices at a time."""
    attn = attention_rows(q, k, scale, slice(None), bias)  # (B, H, T, T)
    weighted = grad @ v.unsqueeze(1).transpose(-2, -1)  # dy/dA (B, K, H, T, T), a fresh tensor: work in place
    return weighted.mul_(attn.unsqueeze(1)).clamp_min_(0).mean(2)
