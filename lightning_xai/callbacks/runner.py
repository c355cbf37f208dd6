"""The model side of the callbacks: the user's module, the ViT in it and the explainers, all run through one
:class:`~lightning_xai.handle.ModelHandle`, on the probe set."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.adapters import OutputTransform, ViTLocator
from lightning_xai.callbacks import checks, keys
from lightning_xai.callbacks.evolution import faithfulness_scalars
from lightning_xai.callbacks.probes import Probe, class_indices, preserved_rng, select_targets
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

    Built once the module is complete (after ``configure_model``); checks on the way, with one one-image forward,
    that the probes fit the ViT and the model and that the ``targets`` are classes the model has.

    Args:
        module: the LightningModule (never its DDP wrapper).
        methods: ``{registry name: options}`` (from :func:`~lightning_xai.explainers.registry.resolve_methods`).
        probe: the probe set.
        targets, top_k: which classes to explain (see :func:`~lightning_xai.callbacks.probes.select_targets`).
        vit, output_transform, forward: as for :class:`~lightning_xai.handle.ModelHandle`.
    """

    def __init__(
        self,
        module: nn.Module,
        methods: Mapping[str, Mapping[str, Any]],
        probe: Probe,
        *,
        targets: str | int | list[int] = "pred",
        top_k: int = 2,
        vit: ViTLocator = None,
        output_transform: OutputTransform = None,
        forward: ForwardFn = None,
    ) -> None:
        self.module, self.probe, self.targets, self.top_k = module, probe, targets, top_k
        self.handle = ModelHandle(module, vit=vit, output_transform=output_transform, forward=forward)
        self.explainers: dict[str, Explainer] = {
            name: create_explainer(name, module, vit=self.handle.vit, output_transform=output_transform,
                                   forward=forward, **options)
            for name, options in methods.items()
        }
        checks.check_probe(self.handle, probe)
        with preserved_rng(), explanation_mode(module):
            logits = self.handle.predict(probe.images[:1])
        select_targets(targets, top_k, logits.expand(len(probe.images), -1), probe.labels)  # raises if out of range

    def run(self, on_failure: Callable[[str, Exception], None]) -> Outcome:
        """One forward of the probes, then every explainer; a failing method is reported to ``on_failure(name,
        error)`` and left out. Raises when the forward itself fails."""
        images = self.handle.prepare(self.probe.images)
        with explanation_mode(self.module), torch.no_grad():
            logits = self.handle.logits(images)
        targets = select_targets(self.targets, self.top_k, logits, self.probe.labels)
        outcome = Outcome(images, logits, targets, logits.softmax(-1).gather(1, targets))
        for name, explainer in self.explainers.items():
            try:
                outcome.results[name] = explainer(images, targets)
            except Exception as err:  # noqa: BLE001 - one failing method must not stop the others
                on_failure(name, err)
        return outcome

    def probe_scalars(self, outcome: Outcome) -> dict[str, float]:
        """``xai/target_probability`` and, with one label per probe, ``xai/probe_accuracy``."""
        out = {keys.scalar_key("target_probability"): float(outcome.probs.mean())}
        if self.probe.labels is not None:
            labels = class_indices(self.probe.labels, outcome.logits.shape[-1])
            if labels.dim() == 1:
                accuracy = (outcome.logits.argmax(-1).cpu() == labels).float().mean()
                out[keys.scalar_key("probe_accuracy")] = float(accuracy)
        return out

    def faithfulness(self, outcome: Outcome, method: str) -> dict[str, float]:
        """Deletion and insertion AUC of ``method``'s maps (about ``2 * 51`` forwards per probe)."""
        with explanation_mode(self.module):
            return faithfulness_scalars(self.handle.logits, outcome.images, outcome.results[method].maps,
                                        outcome.targets)
