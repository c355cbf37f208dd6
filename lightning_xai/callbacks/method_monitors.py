"""One-method shortcuts of :class:`~lightning_xai.callbacks.ExplanationMonitor`, with the method's options as
keyword arguments: every option the method's explainer takes (its :meth:`~lightning_xai.explainers.Explainer.
option_names`) reaches it; one that is also a monitor option (C2F's ``seed``) goes to both."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from lightning_xai.callbacks.monitor import ExplanationMonitor
from lightning_xai.explainers.registry import get_explainer

MONITOR_OPTIONS = frozenset(inspect.signature(ExplanationMonitor.__init__).parameters) - {"self", "methods"}


class OneMethodMonitor(ExplanationMonitor):
    """:class:`ExplanationMonitor` for the one method :attr:`method`; its options are keyword arguments here
    (the explainer's defaults apply to those not given)."""

    method: ClassVar[str] = ""

    def __init__(self, **kwargs: Any) -> None:
        names = get_explainer(self.method).option_names()
        options = {name: kwargs[name] for name in names if name in kwargs}
        monitor = {key: value for key, value in kwargs.items() if key not in options or key in MONITOR_OPTIONS}
        super().__init__(methods={self.method: options}, **monitor)


class GradTokenMonitor(OneMethodMonitor):
    """:class:`ExplanationMonitor` for GradToken only; GradToken's options are keyword arguments here.

    Example:
        >>> from lightning_xai.callbacks import GradTokenMonitor
        >>> monitor = GradTokenMonitor(layers="all", targets="topk", top_k=2)
    """

    method = "gradtoken"


class C2FMonitor(OneMethodMonitor):
    """:class:`ExplanationMonitor` for C2F-Explainer only; every C2F option (``granularity``, ``thresholds``,
    ``fusion``, ``seed`` of its noise, ...) is a keyword argument here. ``seed`` also seeds the probe draw.

    Example:
        >>> from lightning_xai.callbacks import C2FMonitor
        >>> monitor = C2FMonitor(granularity="clusters", fusion="contrast", num_probes=4)
    """

    method = "c2f"
