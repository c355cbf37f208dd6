"""From one run of the probes to what the loggers get: :class:`RecordBuilder` turns an
:class:`~lightning_xai.callbacks.runner.Outcome` into the event's :class:`~lightning_xai.callbacks.sinks.Record`,
with the numbers of :class:`~lightning_xai.callbacks.evolution.EvolutionTracker` and the pictures of
:class:`~lightning_xai.callbacks.presentation.Board`."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from typing import Any

from torch import Tensor

from lightning_xai.callbacks import keys
from lightning_xai.callbacks.evolution import EvolutionTracker
from lightning_xai.callbacks.presentation import PICTURE_KINDS, Board
from lightning_xai.callbacks.runner import Outcome, ProbeRunner
from lightning_xai.callbacks.shortcut import ShortcutWatch
from lightning_xai.callbacks.sinks import Record
from lightning_xai.shortcut import ShortcutEvent


class RecordBuilder:
    """Fills each event's :class:`Record`, and holds what a run's records build on (each method's previous maps,
    shortcut alarm and timeline history) for checkpoints.

    Args:
        tracker: each method's evolution scalars.
        board: the pictures and the timeline history.
        shortcut: each method's shortcut check and alarm (``None``: off).
        deletion_insertion: also compute each method's deletion and insertion AUC (about ``2 * 51`` forwards
            per probe and method).
        stop_on_shortcut: the caller stops training when a shortcut alarm fires (its note says so).
    """

    def __init__(self, tracker: EvolutionTracker, board: Board, shortcut: ShortcutWatch | None = None, *,
                 deletion_insertion: bool = False, stop_on_shortcut: bool = False) -> None:
        self.tracker, self.board, self.shortcut = tracker, board, shortcut
        self.deletion_insertion, self.stop_on_shortcut = deletion_insertion, stop_on_shortcut

    def fill(self, record: Record, outcome: Outcome, runner: ProbeRunner, probe_tiles: bool = False,
             pictures: Collection[str] = PICTURE_KINDS) -> list[ShortcutEvent]:
        """Put the event's scalars (``xai/...``: the probes', then each method's evolution, shortcut and
        faithfulness numbers), pictures (the ``pictures`` kinds, those the sinks read), shortcut region pictures
        and alarm notes, and explanations into ``record``; with ``probe_tiles``, the probe images too (the first
        event of a run).

        Returns:
            the shortcut alarms that fired at this event (each method's fires once per run).
        """
        record.scalars = runner.probe_scalars(outcome)
        fired = []
        if self.shortcut is not None:
            self.shortcut.start_event()
            probabilities = runner.probabilities(outcome)  # the probes' own, once for every method's check
        for name, result in outcome.results.items():
            scalars = self.tracker.update(name, record.epoch, record.step, result.maps, runner.probes.probe.masks)
            if self.deletion_insertion:
                scalars.update(runner.faithfulness(outcome, name))
            if self.shortcut is not None:
                donors = self._reference_donors(runner, name)
                scalars.update(self.shortcut.update(name, record.epoch, outcome.images, result.maps, result.targets,
                                                    runner.predict, donors, probabilities))
                images, alerts = self.shortcut.outputs(
                    name, record.label, outcome.images, cmap=self.board.cmap, mean=self.board.mean,
                    std=self.board.std, class_name=self.board.class_name, stopping=self.stop_on_shortcut)
                record.images.update(images)
                record.alerts.extend(alerts)
                if alerts:
                    fired.append(self.shortcut.alarms[name])
            record.scalars.update({keys.scalar_key(key, name): value for key, value in scalars.items()})
        record.explanations = outcome.results
        labels = runner.label_indices(outcome)
        predictions = outcome.logits.argmax(-1) if labels is not None else None
        pictures = self.board.draw(outcome.images, record.label, outcome.targets, outcome.probs, outcome.results,
                                   labels=labels, predictions=predictions, kinds=pictures)
        record.grids, record.timelines, record.rows = pictures.grids, pictures.timelines, pictures.rows
        record.probe_overlays, record.probe_timelines = pictures.probe_overlays, pictures.probe_timelines
        if probe_tiles:
            record.probe_tiles = self.board.probe_tiles(outcome.images)
        return fired

    def _reference_donors(self, runner: ProbeRunner, name: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """The shortcut alarm's references explained by ``name`` (see :meth:`ProbeRunner.explain_references`), or
        ``None``; a failure there is warned about and leaves the carrier check to the probes, never loses the
        event. The method's warnings on them are those it gave on the probes, which the run already reported."""
        if self.shortcut is None or self.shortcut.references is None:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return runner.explain_references(name)
        except Exception as err:  # noqa: BLE001 - the probes' record must still go out
            warnings.warn(f"lightning-xai: explaining the shortcut alarm's references with {name!r} failed "
                          f"({type(err).__name__}: {err}); this event's carrier check used the probes only",
                          RuntimeWarning, stacklevel=2)
            return None

    def reset(self) -> None:
        """A new run: forget every method's history."""
        self.tracker.reset()
        self.board.reset()
        if self.shortcut is not None:
            self.shortcut.reset()

    def state_dict(self) -> dict[str, Any]:
        state = {"tracker": self.tracker.state_dict(), "board": self.board.state_dict()}
        if self.shortcut is not None:
            state["shortcut_alarms"] = self.shortcut.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], methods: Sequence[str]) -> None:
        """Restore the history of ``methods`` (those of another run's state are dropped)."""
        self.tracker.load_state_dict(state.get("tracker", {}), methods=methods)
        self.board.load_state_dict(state.get("board", {}), methods=list(methods))
        if self.shortcut is not None:
            self.shortcut.load_state_dict(state.get("shortcut_alarms", {}), methods=methods)
