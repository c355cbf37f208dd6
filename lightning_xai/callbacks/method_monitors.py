"""One-method shortcuts of :class:`~lightning_xai.callbacks.ExplanationMonitor`, with the method's options as
keyword arguments."""

from __future__ import annotations

from typing import Any

from lightning_xai.callbacks.monitor import ExplanationMonitor


class GradTokenMonitor(ExplanationMonitor):
    """:class:`ExplanationMonitor` for GradToken only; GradToken's options are keyword arguments here.

    Example:
        >>> from lightning_xai.callbacks import GradTokenMonitor
        >>> monitor = GradTokenMonitor(layers="all", targets="topk", top_k=2)
    """

    def __init__(self, *, layers: Any = "all", per_layer_norm: bool = False, objective: str = "logit", **kwargs: Any):
        options = {"layers": layers, "per_layer_norm": per_layer_norm, "objective": objective}
        super().__init__(methods={"gradtoken": options}, **kwargs)


class C2FMonitor(ExplanationMonitor):
    """:class:`ExplanationMonitor` for C2F-Explainer only; C2F's options are keyword arguments here.

    Example:
        >>> from lightning_xai.callbacks import C2FMonitor
        >>> monitor = C2FMonitor(granularity="clusters", num_probes=4)
    """

    def __init__(self, *, granularity: str = "draws", batch_size: int = 64, **kwargs: Any):
        names = ("thresholds", "draws", "levels", "noise_sigma", "cluster_threshold")
        options = {"granularity": granularity, "batch_size": batch_size}
        options.update({name: kwargs.pop(name) for name in names if name in kwargs})
        super().__init__(methods={"c2f": options}, **kwargs)
