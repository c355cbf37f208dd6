"""The callback's side of the shortcut check: at each explanation event, run the transplant check of
:mod:`lightning_xai.shortcut` on the probes with the runner's forward, keep each method's alarm (and its state for
checkpoints), and say what the loggers get. The analysis itself lives in :mod:`lightning_xai.shortcut`, whose
names are re-exported here for imports written before it moved."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_xai.callbacks import keys
from lightning_xai.shortcut import *  # noqa: F403 - the analysis's names, importable from here as before
from lightning_xai.shortcut import (
    DEFAULT_PATIENCE,
    DEFAULT_PATIENCE_WITH_REFERENCES,
    DEFAULT_REGION,
    DEFAULT_THRESHOLD,
    ShortcutAlarm,
    ShortcutEvent,
    ShortcutScore,
    TransplantResult,
    carriers_needed,
    shortcut_score,
    transplant_check,
)
from lightning_xai.shortcut import __all__ as _analysis
from lightning_xai.shortcut.carriers import probabilities_of
from lightning_xai.shortcut.pictures import carrier_picture, evidence_picture, region_picture

__all__ = [*_analysis, "MIN_PAIRS", "ShortcutWatch", "pool_coverage_warning", "probe_coverage_warning"]

#: Fewest pairs of probes of different classes the alarm's rate is measured on (8 probes over 4 classes give 48;
#: see the README's "Shortcut alarm" for what was measured).
MIN_PAIRS = 24


def probe_coverage_warning(labels: Tensor | None) -> str | None:
    """What is wrong with the probes for the shortcut alarm without references, or ``None``: ``labels`` ``(P,)`` class
    indices of the probes (other label layouts and ``None`` are not judged). The rate is a share of the pairs ``(i, j)``
    of probes of different classes; with fewer than :data:`MIN_PAIRS` of them one pair moves it by more than 4 %
    and the alarm is a coin toss (or, with one class only, never fires)."""
    if labels is None or labels.dim() != 1 or labels.dtype.is_floating_point:
        return None
    counts = torch.unique(labels, return_counts=True)[1]
    pairs = int(len(labels) ** 2 - (counts**2).sum())
    if pairs >= MIN_PAIRS:
        return None
    return (f"the {len(labels)} probes cover {len(counts)} class(es) (counts {counts.tolist()}), which gives "
            f"{pairs} pairs of probes of different classes; the shortcut alarm's rate needs at least {MIN_PAIRS} "
            f"(e.g. 8 probes over 3 classes or more): raise num_probes, pass probe_images covering more classes, or "
            f"pass shortcut_alarm=False")


def pool_coverage_warning(labels: Tensor) -> str | None:
    """What is wrong with the shortcut check's labelled pool (the probes and the references, ``labels`` ``(R,)``),
    or ``None``. With references the alarm's evidence is the stamped carriers, pasted into pool images of other
    classes, so the probes' own class coverage does not matter; the pool needs two classes or more."""
    classes = torch.unique(labels)
    if len(classes) >= 2:
        return None
    return (f"the probes and the shortcut references ({len(labels)} labelled images) are all of class "
            f"{classes.tolist()}: the shortcut alarm pastes regions into images of other classes and has none; raise "
            f"shortcut_references, pass shortcut_references=(images, labels) covering more classes, or pass "
            f"shortcut_alarm=False")


class ShortcutWatch:
    """Each method's shortcut check and alarm across explanation events.

    Args:
        threshold: alarm level of the transplant rate, in ``[0, 1]``, the alarm's rule without :attr:`references`
            (``0``: fires at the first event whose rate is defined; for trying the wiring); with references an
            event counts when a probe is a stamped carrier.
        patience: consecutive explained events at or above it before the alarm fires; ``None``:
            :data:`DEFAULT_PATIENCE_WITH_REFERENCES` when the check has labelled :attr:`references`, else
            :data:`DEFAULT_PATIENCE`.
        fraction: each probe's region, as a fraction of the pixels.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, patience: int | None = None,
                 fraction: float = DEFAULT_REGION) -> None:
        ShortcutAlarm("check", threshold, DEFAULT_PATIENCE if patience is None else patience)  # validates now
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"the shortcut region fraction must be in (0, 1), got {fraction}")
        self.threshold, self.fraction = float(threshold), float(fraction)
        self.chosen_patience = None if patience is None else int(patience)
        self.references: tuple[Tensor, Tensor] | None = None
        """Labelled reference images ``((R, C, H, W), (R,))`` in the model's input space, or ``None``: with them an
        event counts toward the alarm only when a probe is a stamped carrier (``docs/methods.md``)."""
        self._alarms: dict[str, ShortcutAlarm] = {}
        self.checks: dict[str, TransplantResult] = {}
        """The latest event's transplant check per method."""
        self._pool_probabilities: Tensor | None = None  # this event's, shared by its methods (start_event)
        self._event_methods: set[str] = set()
        self.donors: dict[str, Tensor | None] = {}
        """The latest event's extra donors per method (the references it explained), ``(E, C, H, W)`` or ``None``."""
        self.agreements: dict[str, ShortcutScore] = {}
        """The latest event's agreement statistic per method."""
        self.alarms: dict[str, ShortcutEvent] = {}
        """The alarms that fired at the latest event, per method (each method fires once per run)."""

    @property
    def patience(self) -> int:
        """The patience in use: the chosen one, or the default for whether there are references."""
        if self.chosen_patience is not None:
            return self.chosen_patience
        return DEFAULT_PATIENCE if self.references is None else DEFAULT_PATIENCE_WITH_REFERENCES

    def start_event(self) -> None:
        """A new explanation event: the model changed, so the references' predictions are computed again (once,
        for every method of the event). :meth:`update` also starts one when a method comes a second time."""
        self._pool_probabilities, self._event_methods = None, set()

    def update(self, method: str, epoch: int, images: Tensor, maps: Tensor, classes: Tensor,
               predict: Callable[[Tensor], Tensor], donors: tuple[Tensor, Tensor, Tensor] | None = None,
               probabilities: Tensor | None = None) -> dict[str, float]:
        """Check ``method``'s maps ``(P, K, H, W)`` of the probes ``images`` ``(P, C, H, W)`` explained for
        ``classes`` ``(P, K)``, with ``predict`` (the runner's forward, see
        :data:`~lightning_xai.shortcut.transplant.PredictFn`); ``donors``: the references explained by the method
        too, ``(images (E, C, H, W), maps (E, 1, H, W), classes (E, 1))``, more donors for the stamped-carrier check
        (with :attr:`references` only; see :meth:`~lightning_xai.callbacks.runner.ProbeRunner.explain_references`);
        ``probabilities``: the model's probabilities of the probes ``(P, num_classes)`` when already known (see
        :meth:`~lightning_xai.callbacks.runner.ProbeRunner.probabilities`), which spares the check a forward.
        Returns ``shortcut_rate`` and ``shortcut_agreement`` (when defined: the probes were explained for two
        classes or more) and ``shortcut_threshold`` (always, so that loggers draw it as a line beside the rate)."""
        if method in self._event_methods:  # a method comes once per event: this is the next one
            self.start_event()
        self._event_methods.add(method)
        if self.references is not None and self._pool_probabilities is None:  # once per event, for every method
            self._pool_probabilities = probabilities_of(predict, self.references[0].to(images))
        transplant = transplant_check(predict, images, maps, classes, self.fraction, references=self.references,
                                      extra_donors=donors if self.references is not None else None,
                                      pool_probabilities=self._pool_probabilities, probabilities=probabilities)
        self.donors[method] = None if donors is None or self.references is None else donors[0]
        agreement = shortcut_score(maps.detach().float().cpu(), classes.detach().cpu())
        self.checks[method], self.agreements[method] = transplant, agreement
        out = {"shortcut_threshold": self.threshold}
        if not math.isnan(transplant.rate):
            out["shortcut_rate"] = transplant.rate
        if not math.isnan(agreement.score):
            out["shortcut_agreement"] = agreement.score
        alarm = self._alarms.setdefault(method, ShortcutAlarm(method, self.threshold, self.patience))
        self.alarms.pop(method, None)
        donor_count = len(images) + (0 if self.donors[method] is None else len(self.donors[method]))
        event = alarm.update(epoch, transplant.rate, transplant.probes_above(self.threshold),
                             transplant.carrier_probes(), transplant.extra_carriers(), carriers_needed(donor_count))
        if event is not None:
            self.alarms[method] = event
        return out

    def outputs(self, method: str, label: str, images: Tensor, *, cmap: str = "jet", mean: Any = None,
                std: Any = None, class_name: Callable[[int], str] | None = None, stopping: bool = False
                ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
        """What the loggers get from ``method``'s latest check: ``{key: uint8 (H, W, 3)}`` pictures (the region,
        captioned; the evidence when a pair flipped) and, when the alarm fired, a markdown note ``[(key, text)]``
        (``label`` names the event; ``stopping``: the caller ends training)."""
        transplant, agreement = self.checks.get(method), self.agreements.get(method)
        if transplant is None or agreement is None:
            return {}, []
        region_key = keys.image_key(method, "shortcut_region")
        evidence_key = keys.image_key(method, "shortcut_evidence")
        pictures = {region_key: region_picture(agreement, cmap, rate=transplant.rate)}
        evidence = self._carrier_evidence(method, images, mean, std, class_name)
        if evidence is None:
            evidence = evidence_picture(images, transplant, mean=mean, std=std, class_names=class_name)
        if evidence is not None:
            pictures[evidence_key] = evidence
        event = self.alarms.get(method)
        if event is None:
            return pictures, []
        stop = " Training was stopped (stop_on_shortcut=True)." if stopping else ""
        note = (f"**Shortcut alarm** ({label}): {event.message()}{stop} See `{evidence_key}` for the strongest pair "
                f"and `{keys.scalar_key('shortcut_rate', method)}` for the rate.")
        return pictures, [(keys.scalar_key("shortcut_alarm", method), note)]

    def _carrier_evidence(self, method: str, images: Tensor, mean: Any, std: Any,
                          class_name: Callable[[int], str] | None) -> np.ndarray | None:
        """The stamped carriers' strongest pair of ``method``'s latest check (probes ``images`` ``(P, C, H, W)``, then
        its extra donors; the pool is the probes, then the references), or ``None`` without one."""
        transplant = self.checks[method]
        if transplant.carrier is None or self.references is None or not bool(transplant.carrier.carriers.any()):
            return None
        count, extra, pool = len(images), self.donors.get(method), self.references[0]
        probes = images.detach().cpu()
        donors = probes if extra is None else torch.cat([probes, extra.detach().cpu().to(probes.dtype)])
        leading = count if len(pool) >= count and torch.equal(pool[:count], probes.to(pool.dtype)) \
            else 0  # the pool is the probes, then the references (or the user's references alone)

        def donor_name(index: int) -> int | str:
            return index if index < count else f"reference {index - count}"

        def pool_name(index: int) -> int | str:
            return index if index < leading else f"reference {index - leading}"

        pair = self.carrier_pair(method, count, leading)
        return carrier_picture(donors, pool, transplant.carrier, donor_name, pool_name, pair,
                               mean=mean, std=std, class_names=class_name)

    def carrier_pair(self, method: str, probes: int, leading: int) -> tuple[int, int, int, int] | None:
        """The stamped carriers' pair that ``method``'s evidence picture shows, ``(donor, pool index, before,
        after)``: the strongest among those the user knows best, into a probe first, then from a probe (the probes
        are logged; ``probes``: how many donors are probes, ``leading``: how many pool images are), or ``None``."""
        carrier = self.checks[method].carrier
        flips = [] if carrier is None else carrier.flips(carrier.carriers)  # strongest first
        return min(flips, key=lambda f: (f[1] >= leading, f[0] >= probes)) if flips else None  # min is stable

    def reset(self) -> None:
        """A new run: forget every method's alarm and latest check."""
        self.start_event()
        self._alarms.clear()
        self.checks.clear()
        self.donors.clear()
        self.agreements.clear()
        self.alarms.clear()

    def state_dict(self) -> dict[str, Any]:
        return {m: alarm.state_dict() for m, alarm in self._alarms.items()}

    def load_state_dict(self, state: dict[str, Any], methods: Iterable[str] | None = None) -> None:
        """Restore the alarms of ``state`` (of ``methods`` only, when given)."""
        keep = None if methods is None else set(methods)
        self._alarms = {}
        for method, alarm_state in state.items():
            if keep is None or method in keep:
                patience = alarm_state.get("patience", self.patience) if self.chosen_patience is None \
                    else self.chosen_patience  # the run's own (references are drawn after a resume loads this)
                self._alarms[method] = ShortcutAlarm(method, self.threshold, patience)
                self._alarms[method].load_state_dict(alarm_state)
