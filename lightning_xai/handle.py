"""How the library runs a user's model: the module, the ViT inside it, how to call it and how to read logits.

Explainers and the callbacks both go through one :class:`ModelHandle`, so a model whose forward takes a dict,
returns ``(features, logits)``, or runs in another dtype is handled the same way everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai import tasks
from lightning_xai.adapters import OutputTransform, ViTLocator, find_vit, unwrap_compiled
from lightning_xai.validation import to_logits

#: ``forward(model, images) -> output``: how to call a module whose forward does not take an image tensor,
#: e.g. ``lambda module, x: module(pixel_values=x)``.
ForwardFn = Callable[[nn.Module, Tensor], Any] | None


class ModelHandle:
    """A user's model as the library runs it.

    A ``torch.compile``d model is run through its original module (``_orig_mod``), and compiled submodules
    are swapped for their originals while :meth:`uncompiled` is active: the explainers' hooks must see every
    forward, and compiled graphs do not run module hooks registered after compilation. Training keeps the
    compiled modules.

    Args:
        model: the module whose output logits are explained (a ViT, or a LightningModule holding one).
        vit: where the ViT is inside ``model`` (see :func:`lightning_xai.adapters.find_vit`).
        output_transform: turns the forward's output into logits ``(B, num_classes)``.
        forward: ``forward(model, images) -> output``; default ``model(images)``.
        task: what the logits mean (:mod:`lightning_xai.tasks`): ``"auto"`` (one logit: binary, otherwise
            multiclass; resolved at the first forward), ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        vit: ViTLocator = None,
        output_transform: OutputTransform = None,
        forward: ForwardFn = None,
        task: str = "auto",
    ) -> None:
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be a callable (module, images) -> output, got {type(forward).__name__}")
        if output_transform is not None and not callable(output_transform):
            raise TypeError(
                f"output_transform must be a callable output -> logits, got {type(output_transform).__name__}"
            )
        self.model = unwrap_compiled(model)
        self.vit = find_vit(self.model, vit)
        self.output_transform = output_transform
        self.forward = forward
        self.task = tasks.check_task(task)

    @contextlib.contextmanager
    def uncompiled(self) -> Iterator[None]:
        """Within the context, every ``torch.compile``d submodule of the model is replaced by its original
        module; the compiled ones are put back on exit (also on errors)."""
        swapped = [
            (parent, name, child)
            for parent in self.model.modules()
            for name, child in parent.named_children()
            if type(child).__name__ == "OptimizedModule"
        ]
        try:
            for parent, name, child in swapped:
                setattr(parent, name, unwrap_compiled(child))
            yield
        finally:
            for parent, name, child in swapped:
                setattr(parent, name, child)

    @property
    def parameter(self) -> Tensor:
        """A parameter of the ViT: its device and dtype are the ones inputs are cast to."""
        return next(self.vit.parameters())

    def prepare(self, images: Tensor) -> Tensor:
        """A detached copy of ``images`` ``(B, C, H, W)`` on the ViT's device, in its dtype."""
        param = self.parameter
        return images.detach().clone().to(device=param.device, dtype=param.dtype)

    def output(self, images: Tensor) -> Any:
        """The model's raw forward output for ``images`` (already prepared)."""
        return self.model(images) if self.forward is None else self.forward(self.model, images)

    def logits(self, images: Tensor) -> Tensor:
        """The class scores ``(B, num_classes)`` in float32 of the model's output for prepared ``images``: its
        logits, or ``[-z, z]`` for a one-logit binary head (see :func:`lightning_xai.tasks.scores`)."""
        logits = to_logits(self.output(images), self.output_transform).float()
        if self.task == "auto":
            self.task = tasks.resolve_task("auto", logits.shape[-1])
        return tasks.scores(logits, self.task)

    def probabilities(self, scores: Tensor) -> Tensor:
        """Probabilities ``(B, num_classes)`` of class ``scores`` from :meth:`logits` (softmax for multiclass,
        sigmoid for binary and multilabel)."""
        return tasks.probabilities(scores, self.task)

    def log_probabilities(self, scores: Tensor) -> Tensor:
        """``log`` of :meth:`probabilities` (``log_softmax`` or ``logsigmoid``)."""
        return tasks.log_probabilities(scores, self.task)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Float32 logits ``(B, num_classes)`` without a graph; ``images`` are prepared here."""
        return self.logits(self.prepare(images))
