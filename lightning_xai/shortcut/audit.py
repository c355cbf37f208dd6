"""The shortcut check outside training: audit a finished model (or a checkpoint's) on a batch of images."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.explainers import Explanation, create_explainer
from lightning_xai.explainers.base import explanation_mode
from lightning_xai.handle import ModelHandle
from lightning_xai.shortcut.agreement import ShortcutScore, shortcut_score
from lightning_xai.shortcut.alarm import DEFAULT_THRESHOLD, carriers_needed
from lightning_xai.shortcut.transplant import DEFAULT_CHUNK, DEFAULT_REGION, TransplantResult, transplant_check
from lightning_xai.validation import to_logits


@dataclass
class ShortcutCheck:
    """The result of :func:`check_shortcut`.

    Attributes:
        transplant: the transplant check (:class:`~lightning_xai.shortcut.transplant.TransplantResult`): its
            ``rate``, ``probe_rates`` ``(B,)``, ``regions`` ``(B, H, W)`` and ``flips()``.
        agreement: the auxiliary agreement statistic (:class:`~lightning_xai.shortcut.agreement.ShortcutScore`).
        explanation: the maps the regions were taken from (``None`` when ``maps`` were given).
        threshold: the alarm level compared with.
    """

    transplant: TransplantResult
    agreement: ShortcutScore
    explanation: Explanation | None
    threshold: float

    @property
    def rate(self) -> float:
        """Share of the transplants whose prediction became the donor's class."""
        return self.transplant.rate

    @property
    def probe_rates(self) -> Tensor:
        return self.transplant.probe_rates

    @property
    def regions(self) -> Tensor:
        return self.transplant.regions

    @property
    def flipped_pairs(self) -> list[tuple[int, int, int, int]]:
        """``(donor i, recipient j, prediction before, prediction after)``, strongest first."""
        return self.transplant.flips()

    @property
    def carriers(self) -> list[int] | None:
        """The stamped carriers (probes whose region is a stamp of their class among the references and carries
        it into at least a third of their transplants); ``None`` when no ``references`` were given."""
        return self.transplant.carrier_probes()

    @property
    def suspicious(self) -> bool:
        """What one explained epoch of the callback's alarm asks: with ``references``, enough images are stamped
        carriers (:func:`~lightning_xai.shortcut.alarm.carriers_needed`: one per 16 images, rounded up); without,
        the rate is at or above the threshold."""
        carriers = self.carriers
        if carriers is not None:
            return len(carriers) >= carriers_needed(len(self.transplant.classes))
        return not math.isnan(self.rate) and self.rate >= self.threshold


def _plain_model(model: nn.Module, images: Tensor, output_transform: Any, forward: Any
                 ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``images`` on ``model``'s device and dtype, and its ``images -> float32 logits`` (``forward`` and
    ``output_transform`` as for :class:`~lightning_xai.handle.ModelHandle`)."""
    param = next(model.parameters(), None)
    if param is None:
        param = next(model.buffers(), images)
    prepared = images.detach().clone().to(device=param.device, dtype=param.dtype)

    def logits(batch: Tensor) -> Tensor:
        out = model(batch) if forward is None else forward(model, batch)
        return to_logits(out, output_transform).float()

    return prepared, logits


def check_shortcut(
    model: nn.Module,
    images: Tensor,
    method: str = "gradtoken",
    maps: Tensor | None = None,
    targets: Any = None,
    *,
    fraction: float = DEFAULT_REGION,
    threshold: float = DEFAULT_THRESHOLD,
    chunk: int = DEFAULT_CHUNK,
    control: bool = True,
    recurrence: bool = False,
    references: tuple[Tensor, Any] | None = None,
    **options: Any,
) -> ShortcutCheck:
    """Does ``model`` read a shortcut in ``images``? The transplant check of ``docs/methods.md`` on one batch.

    Each image's region (the top ``fraction`` of its map's pixels) is pasted into the images explained for other
    classes, at its place and (the control) at a random other place; batched forwards (without gradients, in eval
    mode, ``chunk`` images at a time) tell how often the prediction moves to the donor's class at the region's
    place but not elsewhere. Use images of several classes (at least 4 per class is what the
    alarm's figures were measured with; see the README's "Shortcut alarm").

    Args:
        model: a timm ViT, or any module (a LightningModule, a loaded checkpoint's) containing one.
        images: ``(B, C, H, W)`` in the model's input space (normalised as for training).
        method: the explainer whose maps give the regions (see :func:`lightning_xai.explain`).
        maps: ``(B, [K,] H, W)`` maps you already have (then ``method`` is not run and ``model`` may be any
            classifier); their classes are ``targets`` (default: the prediction).
        targets: ``None`` (the predicted class, the default) or ``(B,)`` class indices (e.g. the labels).
        fraction: each region's size as a fraction of the pixels.
        threshold: the rate that counts as suspicious (the alarm's default).
        chunk: transplanted images per forward.
        control: count a pair only when the region moved elsewhere does not carry the class (``False``: the raw
            rate, half the forwards).
        recurrence: also count a pair only when the donor's region recurs in another image of its class (a
            stamp; see :func:`~lightning_xai.shortcut.transplant.recurring_regions`): tells a fixed-place mark
            from objects that always sit at one place, but needs two images carrying the mark per class.
        references: ``(images (R, C, H, W), labels (R,))``: labelled images of the training data, in the same
            input space (``images`` with their labels may be among them; 24 or more). Each image's region is then
            also tested for being a stamp of its class among them, and :attr:`ShortcutCheck.carriers` lists the
            images whose region is a stamp that carries its class (the evidence that tells a spurious mark from
            objects that always sit at one place; ``docs/methods.md``, "Stamped carriers").
        **options: the method's options, plus ``vit``, ``output_transform`` and ``forward`` (as for
            :class:`~lightning_xai.handle.ModelHandle`).

    Returns:
        a :class:`ShortcutCheck` (``rate``, ``probe_rates``, ``flipped_pairs``, ``regions``, ``agreement``).

    Example:
        >>> import lightning_xai as lx
        >>> check = lx.check_shortcut(model, images)                  # doctest: +SKIP
        >>> check.rate, check.flipped_pairs[:3]                       # doctest: +SKIP
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if maps is None:
        common = {key: options[key] for key in ("vit", "output_transform", "forward", "task") if key in options}
        handle = ModelHandle(model, **common)
        if handle.task == "multilabel":
            raise ValueError("check_shortcut asks whether a region moves an image's one predicted class to another, "
                             "which a multi-label model does not have: it supports task='multiclass' and 'binary'")
        prepared = handle.prepare(images)
        if references is not None:
            references = (handle.prepare(references[0]), references[1])

        def logits(batch: Tensor) -> Tensor:  # log-probabilities: their softmax is the task's probabilities
            return handle.log_probabilities(handle.logits(batch))
    else:  # the maps are given: any classifier will do, no ViT needed
        prepared, logits = _plain_model(model, images, options.get("output_transform"), options.get("forward"))
        if references is not None:
            references = (references[0].detach().to(prepared), references[1])
    with explanation_mode(model):
        def predict(batch: Tensor) -> Tensor:
            with torch.no_grad():
                return logits(batch)

        explanation = None
        if maps is None:
            explanation = create_explainer(method, model, **options)(prepared, targets)
            maps, classes = explanation.maps, explanation.targets
        else:
            classes = predict(prepared).argmax(-1) if targets is None else torch.as_tensor(targets).long()
            if classes.dim() == 0:
                classes = classes.expand(len(images))
        transplant = transplant_check(predict, prepared, maps.to(prepared.device), classes, fraction, chunk=chunk,
                                      control=control, recurrence=recurrence, references=references)
    agreement = shortcut_score(maps.detach().float().cpu(), transplant.classes)
    return ShortcutCheck(transplant, agreement, explanation, float(threshold))
