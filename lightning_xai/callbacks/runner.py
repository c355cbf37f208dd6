"""The model side of the callbacks: the user's module, the ViT in it and the explainers, all run through one
:class:`~lightning_xai.handle.ModelHandle`, on the probe set."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai import tasks
from lightning_xai.adapters import OutputTransform, ViTLocator, find_vit
from lightning_xai.callbacks import checks, keys, model_checks
from lightning_xai.callbacks.evolution import faithfulness_scalars
from lightning_xai.callbacks.probes import ProbeSet, class_indices
from lightning_xai.callbacks.rng import preserved_rng
from lightning_xai.explainers import Explainer, Explanation, create_explainer
from lightning_xai.explainers.base import explanation_mode
from lightning_xai.handle import ForwardFn, ModelHandle, forward_error


@dataclass
class Outcome:
    """One run of the probes through the model and the explainers.

    Attributes:
        images: ``(P, C, H, W)`` the probes as the model took them (its device and dtype).
        logits: ``(P, num_classes)`` float32 class scores (``[-z, z]`` for a one-logit binary head).
        targets: ``(P, K)`` the classes explained; ``probs``: ``(P, K)`` their probabilities (softmax, or sigmoid
            for binary and multi-label tasks).
        results: each method's explanation (methods that failed are missing).
    """

    images: Tensor
    logits: Tensor
    targets: Tensor
    probs: Tensor
    results: dict[str, Explanation] = field(default_factory=dict)


class ProbeRunner:
    """Runs the probe set through a module and the explainers of ``methods``.

    Built once the module is complete (after ``configure_model``). Checks on the way, with one-image forwards:
    the probes fit the forward (the module's own error, with a hint, when it rejects them) and the ViT's token
    grid can be placed on them; which ViT the forward runs when there are several (an EMA copy), or that the
    one named by ``vit=`` is run and feeds the logits;
    that the ``targets`` are classes the model has; that the ViT runs with gradients where methods need them.

    Args:
        module: the LightningModule (never its DDP wrapper).
        methods: ``{registry name: options}`` (from :func:`~lightning_xai.explainers.registry.resolve_methods`).
        probes: the probe set, drawn, and which of their classes to explain.
        vit, output_transform, forward: as for :class:`~lightning_xai.handle.ModelHandle`.
        task: what the logits mean (:mod:`lightning_xai.tasks`); ``"auto"`` is resolved here from the number of
            logits and the probe labels (:func:`~lightning_xai.tasks.resolve_task`), see :attr:`task`.
    """

    def __init__(
        self,
        module: nn.Module,
        methods: Mapping[str, Mapping[str, Any]],
        probes: ProbeSet,
        *,
        vit: ViTLocator = None,
        output_transform: OutputTransform = None,
        forward: ForwardFn = None,
        task: str = "auto",
    ) -> None:
        if probes.probe is None:
            raise ValueError("the probes are not drawn yet: call probes.draw(trainer) first")
        self.module, self.probes, images = module, probes, probes.probe.images
        candidates = {"": find_vit(module, vit)} if vit is not None else model_checks.candidate_vits(module)
        if not candidates:
            find_vit(module)  # raises the error that says how to point at the ViT
        handle = ModelHandle(module, vit=next(iter(candidates.values())), output_transform=output_transform,
                             forward=forward, task=task)  # refuses a ViT on the meta device
        checks.check_images(images)
        one = handle.prepare(images[:1])
        try:
            with preserved_rng(), explanation_mode(module), torch.no_grad():
                handle.output(one)
        except Exception as err:
            raise forward_error(err, module, forward, handle.vit, tuple(images.shape), "probe images") from err
        if vit is not None:
            model_checks.check_named_vit(module, vit, handle.vit,
                                         lambda: self._logits(handle, one.clone().requires_grad_()))
        elif len(candidates) > 1:
            vit = model_checks.choose_vit(module, candidates,
                                          lambda: self._logits(handle, one.clone().requires_grad_()))
            handle = ModelHandle(module, vit=vit, output_transform=output_transform, forward=forward, task=task)
        checks.check_probe_images(handle, images)
        self.handle = handle
        with preserved_rng(), explanation_mode(module):
            logits = handle.predict(images[:1])  # resolves task="auto" from the number of logits
        if task == "auto":  # the handle saw the logits; the probe labels may tell multi-label apart
            handle.task = tasks.resolve_task(task, 1 if handle.task == "binary" else logits.shape[-1],
                                             probes.probe.labels)
        self.task: str = handle.task
        self.num_classes: int = logits.shape[-1]
        """The number of classes (2 for a one-logit binary head)."""
        """The task explained: ``"multiclass"``, ``"binary"`` or ``"multilabel"``."""
        probes.select(logits.expand(len(images), -1), self.task)  # raises for classes the model does not have
        self.explainers: dict[str, Explainer] = {
            name: create_explainer(name, module, vit=handle.vit, output_transform=output_transform, forward=forward,
                                   task=self.task, **options)
            for name, options in methods.items()
        }
        model_checks.check_gradients(module, handle.vit, self.explainers, one, lambda x: self._logits(handle, x))

    @staticmethod
    def _logits(handle: ModelHandle, images: Tensor) -> Tensor:
        """Logits through the original (not ``torch.compile``d) modules, so that hooks on the ViT fire."""
        with handle.explaining():
            return handle.logits(images)

    def run(self, on_failure: Callable[[str, Exception], None],
            on_warning: Callable[[str, warnings.WarningMessage], bool] = lambda name, caught: False,
            share: Tensor | None = None) -> Outcome:
        """One forward of the probes, then every explainer; a failing method is reported to ``on_failure(name,
        error)`` and left out; each warning a method issues goes to ``on_warning(name, caught)``, and is
        re-issued unless that returns ``True``. Raises when the forward itself fails.

        ``share``: explain only these probe indices ``(S,)`` (this rank's share, see :mod:`.ranks`); the outcome's
        images, logits, targets and probabilities are still those of every probe, its results those of the share.
        """
        images = self.handle.prepare(self.probes.probe.images)
        with explanation_mode(self.module), torch.no_grad():
            logits = self.handle.logits(images)
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the model's outputs on the probes are NaN or infinite (weights diverged?): "
                                     "no maps logged for this event")
        targets = self.probes.select(logits, self.task)
        outcome = Outcome(images, logits, targets, self.handle.probabilities(logits).gather(1, targets))
        if share is not None:
            images, targets = images[share.to(images.device)], targets[share.to(targets.device)]
        for name, explainer in self.explainers.items():
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = explainer(images, targets)
                for message in caught:
                    if not on_warning(name, message):
                        warnings.warn_explicit(message.message, message.category, message.filename, message.lineno)
                if not bool(torch.isfinite(result.raw).all()):
                    raise FloatingPointError("its maps are NaN or infinite: not logged")
                outcome.results[name] = result
            except Exception as err:  # noqa: BLE001 - one failing method must not stop the others
                on_failure(name, err)
        return outcome

    def explain_references(self, name: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """The shortcut alarm's labelled references explained by method ``name`` for their predicted class, as more
        donors for the stamped-carrier check: ``(images (R, C, H, W), maps (R, 1, H, W), classes (R, 1))``, the
        images as the model takes them; ``None`` when there are no references or the method is not
        :attr:`~lightning_xai.explainers.Explainer.single_pass` (a masked-forward method would cost several times
        the probes' explanation per reference). The caller asks only when the references make a labelled pool
        (:meth:`~lightning_xai.callbacks.probes.ProbeSet.reference_pool`). Raises what the explainer raises."""
        explainer = self.explainers.get(name)
        if explainer is None or not explainer.single_pass or self.probes.references is None:
            return None
        images = self.handle.prepare(self.probes.references.images)
        result = explainer(images)  # for the predicted class
        return images, result.maps, result.targets

    def label_indices(self, outcome: Outcome) -> Tensor | None:
        """The probes' labels as class indices ``(P,)`` (a binary head's ``(P, 1)`` BCE targets included), or
        ``None`` when they have none, or several each (multi-label)."""
        labels = self.probes.probe.labels
        if labels is None or self.task == "multilabel":
            return None
        labels = class_indices(labels, outcome.logits.shape[-1])
        if self.task == "binary" and labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]  # BCE targets (P, 1)
        return labels if labels.dim() == 1 else None

    def predict(self, images: Tensor) -> Tensor:
        """The model's log-probabilities ``(N, num_classes)`` for ``images`` ``(N, C, H, W)`` (on the model's device
        and dtype, as the probes of :meth:`run`), through the forward the explanations use, without gradients, in
        eval mode: what the shortcut check runs its transplanted images through. Their softmax is the task's
        probabilities (for a one-logit binary head ``[1 - p, p]``; a softmax of its scores ``[-z, z]`` would be
        ``sigmoid(2z)``)."""
        with explanation_mode(self.module), torch.no_grad():
            return self.handle.log_probabilities(self.handle.logits(images))

    def probabilities(self, outcome: Outcome) -> Tensor:
        """The probes' probabilities ``(P, num_classes)``, float32 on the CPU, from the outcome's logits: what
        :func:`~lightning_xai.shortcut.carriers.probabilities_of` gives for :meth:`predict` on the probes (the same
        forward on the same batch), without running it again."""
        return self.handle.log_probabilities(outcome.logits).float().softmax(-1).cpu()

    def probe_scalars(self, outcome: Outcome) -> dict[str, float]:
        """``xai/target_probability`` (the mean probability of the explained classes) and, with labels:
        ``xai/probe_accuracy`` (multiclass: argmax = label; binary: ``z > 0`` = label, the argmax of the scores
        ``[-z, z]``) or, multi-label with multi-hot labels ``(P, C)``, ``xai/probe_exact_match`` (every label of a
        probe right: sigmoid >= 0.5 iff positive) and ``xai/probe_label_accuracy`` (the share of right
        (probe, class) decisions)."""
        out = {keys.scalar_key("target_probability"): float(outcome.probs.mean())}
        labels, scores = self.probes.probe.labels, outcome.logits.cpu()
        if labels is not None and self.task == "multilabel" and tuple(labels.shape) == scores.shape:
            right = (scores >= 0) == (labels > 0.5)
            out[keys.scalar_key("probe_exact_match")] = float(right.all(-1).float().mean())
            out[keys.scalar_key("probe_label_accuracy")] = float(right.float().mean())
        indices = self.label_indices(outcome)
        if indices is not None:
            out[keys.scalar_key("probe_accuracy")] = float((scores.argmax(-1) == indices).float().mean())
        return out

    def faithfulness(self, outcome: Outcome, method: str) -> dict[str, float]:
        """Deletion and insertion AUC of ``method``'s maps (about ``2 * 51`` forwards per probe)."""
        with explanation_mode(self.module):
            return faithfulness_scalars(self.handle.logits, outcome.images, outcome.results[method].maps,
                                        outcome.targets, self.handle.probabilities)
