"""Summary numbers of a method's probe maps at each explanation event: how they change, how concentrated, how well
placed; and :class:`EvolutionTracker`, which keeps the previous event's maps between events (and in checkpoints)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_xai.metrics import class_discrimination, deletion_insertion, localization

SIMILARITIES = ("pearson", "cosine")


def map_similarity(current: Tensor, previous: Tensor, kind: str = "pearson") -> Tensor:
    """Similarity of each map with the previous epoch's: ``(P, K, H, W)`` twice -> ``(P, K)``.

    ``"pearson"``: correlation of the pixel values (1 = same pattern); ``"cosine"``: cosine of the maps.
    A constant map has correlation 0 with anything.
    """
    a, b = current.flatten(2).double(), previous.flatten(2).double()
    if kind == "pearson":
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    denominator = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return ((a * b).sum(-1) / denominator).float()


def concentration_entropy(maps: Tensor) -> Tensor:
    """Normalised entropy of each map seen as a distribution over pixels: ``(P, K, H, W) -> (P, K)``.

    1 = spread evenly over the image, 0 = all mass on one pixel. An all-zero map counts as uniform.
    """
    flat = maps.flatten(2).double().clamp_min(0)
    total = flat.sum(-1, keepdim=True)
    p = torch.where(total > 0, flat / total.clamp_min(1e-300), torch.full_like(flat, 1.0 / flat.shape[-1]))
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return (entropy / math.log(flat.shape[-1])).float()


def evolution_scalars(
    maps: Tensor, previous: Tensor | None, masks: Tensor | None, similarity: str = "pearson"
) -> dict[str, float]:
    """Mean summary numbers of one method at one epoch.

    Args:
        maps: ``(P, K, H, W)`` normalised maps of the probes.
        previous: the previous explained epoch's maps, same shape, or ``None``.
        masks: ground-truth masks ``(P, H, W)`` (one object) or ``(P, K, H, W)`` (object of target ``k``),
            or ``None``.

    Returns:
        ``similarity_prev`` (when ``previous`` is given), ``entropy``, and with masks ``iou`` and
        ``energy_pointing_game``; with two-object masks and two targets per probe, ``class_discrimination``.
    """
    out: dict[str, float] = {"entropy": float(concentration_entropy(maps).mean())}
    if previous is not None and previous.shape == maps.shape:
        out["similarity_prev"] = float(map_similarity(maps, previous, similarity).mean())
    if masks is not None:
        target_masks = masks.unsqueeze(1).expand_as(maps) if masks.dim() == 3 else masks
        if target_masks.shape == maps.shape:
            scores = localization(maps, target_masks.to(maps.device))
            out["iou"] = float(scores["iou"].mean())
            out["energy_pointing_game"] = float(scores["energy_pointing_game"].mean())
            if maps.shape[1] == 2 and masks.dim() == 4:
                out["class_discrimination"] = float(class_discrimination(maps, target_masks.to(maps.device)).mean())
    return out


def faithfulness_scalars(
    model_fn: Any, images: Tensor, maps: Tensor, targets: Tensor, probabilities: Any = None
) -> dict[str, float]:
    """Mean deletion and insertion AUC of the first target's maps ``(P, K, H, W)`` for ``images`` ``(P, C, H, W)``;
    ``model_fn(images) -> logits``, ``probabilities(logits)`` (default softmax). Costs about ``2 * 51`` forwards
    per probe."""
    curves = deletion_insertion(model_fn, images, maps[:, 0].to(images), targets[:, 0],
                                probabilities=probabilities)
    return {name: float(curves[name].mean()) for name in ("deletion_auc", "insertion_auc")}


class EvolutionTracker:
    """Per-method evolution scalars across explanation events.

    Holds each method's maps from its previous event so that ``similarity_prev`` compares consecutive events;
    :meth:`state_dict` carries them into checkpoints, so a resumed run goes on comparing with the last event
    before the interruption. (The shortcut check has its own state: :class:`~.shortcut.ShortcutWatch`.)

    Args:
        similarity: ``"pearson"`` or ``"cosine"`` (see :func:`map_similarity`).
    """

    def __init__(self, similarity: str = "pearson") -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.similarity = similarity
        self._previous: dict[str, Tensor] = {}
        self._events: dict[str, tuple[int, int]] = {}

    def update(self, method: str, epoch: int, step: int, maps: Tensor, masks: Tensor | None = None
               ) -> dict[str, float]:
        """Scalars of ``method``'s maps ``(P, K, H, W)`` at the event ``(epoch, step)``; ``masks`` as in
        :func:`evolution_scalars`. Returns ``{name: value}`` (``similarity_prev`` from the second event on)."""
        maps = maps.detach().float().cpu()
        out = evolution_scalars(maps, self._previous.get(method), masks, self.similarity)
        self._previous[method] = maps
        self._events[method] = (int(epoch), int(step))
        return out

    def previous(self, method: str) -> Tensor | None:
        """The maps ``(P, K, H, W)`` of ``method``'s latest event, or ``None``."""
        return self._previous.get(method)

    def reset(self) -> None:
        """Forget every method's previous maps (a new run starts)."""
        self._previous.clear()
        self._events.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"previous": dict(self._previous), "events": dict(self._events)}

    def load_state_dict(self, state: dict[str, Any], methods: Iterable[str] | None = None) -> None:
        """Restore ``state``; with ``methods``, only the entries of those methods (others are dropped)."""
        keep = None if methods is None else set(methods)
        self._previous = {m: t for m, t in state.get("previous", {}).items() if keep is None or m in keep}
        self._events = {m: tuple(e) for m, e in state.get("events", {}).items() if keep is None or m in keep}
