"""The model side of the callbacks: the user's module, the ViT in it and the explainers, all run through one
:class:`~lightning_xai.handle.ModelHandle`, on the probe set."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.adapters import OutputTransform, ViTLocator, find_vit
from lightning_xai.callbacks import checks, keys, model_checks
from lightning_xai.callbacks.evolution import faithfulness_scalars
from lightning_xai.callbacks.probes import ProbeSet, class_indices
from lightning_xai.callbacks.rng import preserved_rng
from lightning_xai.explainers import Explainer, Explanation, create_explainer
from lightning_xai.explainers.base import explanation_mode
from lightning_xai.handle import ForwardFn, ModelHandle


@dataclass
class Outcome:
    """One run of the probes through the model and the explainers.

    Attributes:
        images: ``(P, C, H, W)`` the probes as the model took them (its device and dtype).
        logits: ``(P, num_classes)`` float32.
        targets: ``(P, K)`` the classes explained; ``probs``: ``(P, K)`` their softmax probabilities.
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
    the probes fit the ViT and the forward; which ViT the forward runs when there are several (an EMA copy);
    that the ``targets`` are classes the model has; that the ViT runs with gradients where methods need them.

    Args:
        module: the LightningModule (never its DDP wrapper).
        methods: ``{registry name: options}`` (from :func:`~lightning_xai.explainers.registry.resolve_methods`).
        probes: the probe set, drawn, and which of their classes to explain.
        vit, output_transform, forward: as for :class:`~lightning_xai.handle.ModelHandle`.
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
    ) -> None:
        if probes.probe is None:
            raise ValueError("the probes are not drawn yet: call probes.draw(trainer) first")
        self.module, self.probes, images = module, probes, probes.probe.images
        candidates = {"": find_vit(module, vit)} if vit is not None else model_checks.candidate_vits(module)
        if not candidates:
            find_vit(module)  # raises the error that says how to point at the ViT
        handle = ModelHandle(module, vit=next(iter(candidates.values())), output_transform=output_transform,
                             forward=forward)
        if any(p.is_meta for p in handle.vit.parameters()):
            raise ValueError("the ViT's parameters are on the meta device (never materialised): load or initialise "
                             "its weights (e.g. in configure_model) before fit")
        checks.check_probe_images(handle, images)
        one = handle.prepare(images[:1])
        try:
            with preserved_rng(), explanation_mode(module), torch.no_grad():
                handle.output(one)
        except Exception as err:
            raise model_checks.describe_forward_error(err, module, forward) from err
        if len(candidates) > 1:
            vit = model_checks.choose_vit(module, candidates,
                                          lambda: self._logits(handle, one.clone().requires_grad_()))
            handle = ModelHandle(module, vit=vit, output_transform=output_transform, forward=forward)
        self.handle = handle
        with preserved_rng(), explanation_mode(module):
            logits = handle.predict(images[:1])
        probes.select(logits.expand(len(images), -1))  # raises for classes the model does not have
        self.explainers: dict[str, Explainer] = {
            name: create_explainer(name, module, vit=handle.vit, output_transform=output_transform, forward=forward,
                                   **options)
            for name, options in methods.items()
        }
        model_checks.check_gradients(module, handle.vit, self.explainers, one, lambda x: self._logits(handle, x))

    @staticmethod
    def _logits(handle: ModelHandle, images: Tensor) -> Tensor:
        """Logits through the original (not ``torch.compile``d) modules, so that hooks on the ViT fire."""
        with handle.uncompiled():
            return handle.logits(images)

    def run(self, on_failure: Callable[[str, Exception], None],
            on_warning: Callable[[str, warnings.WarningMessage], bool] = lambda name, caught: False) -> Outcome:
        """One forward of the probes, then every explainer; a failing method is reported to ``on_failure(name,
        error)`` and left out; each warning a method issues goes to ``on_warning(name, caught)``, and is
        re-issued unless that returns ``True``. Raises when the forward itself fails."""
        images = self.handle.prepare(self.probes.probe.images)
        with explanation_mode(self.module), torch.no_grad():
            logits = self.handle.logits(images)
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the model's outputs on the probes are NaN or infinite (weights diverged?): "
                                     "no maps logged for this event")
        targets = self.probes.select(logits)
        outcome = Outcome(images, logits, targets, logits.softmax(-1).gather(1, targets))
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

    def predict(self, images: Tensor) -> Tensor:
        """The model's logits ``(N, num_classes)`` for ``images`` ``(N, C, H, W)`` (on the model's device and dtype,
        as the probes of :meth:`run`), through the forward the explanations use, without gradients, in eval mode:
        what the shortcut check runs its transplanted images through."""
        with explanation_mode(self.module), torch.no_grad():
            return self.handle.logits(images)

    def probe_scalars(self, outcome: Outcome) -> dict[str, float]:
        """``xai/target_probability`` and, with one label per probe, ``xai/probe_accuracy``."""
        out = {keys.scalar_key("target_probability"): float(outcome.probs.mean())}
        if self.probes.probe.labels is not None:
            labels = class_indices(self.probes.probe.labels, outcome.logits.shape[-1])
            if labels.dim() == 1:
                accuracy = (outcome.logits.argmax(-1).cpu() == labels).float().mean()
                out[keys.scalar_key("probe_accuracy")] = float(accuracy)
        return out

    def faithfulness(self, outcome: Outcome, method: str) -> dict[str, float]:
        """Deletion and insertion AUC of ``method``'s maps (about ``2 * 51`` forwards per probe)."""
        with explanation_mode(self.module):
            return faithfulness_scalars(self.handle.logits, outcome.images, outcome.results[method].maps,
                                        outcome.targets)
