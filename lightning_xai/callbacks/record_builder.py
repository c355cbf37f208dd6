"""From one run of the probes to what the loggers get: :class:`RecordBuilder` turns an
:class:`~lightning_xai.callbacks.runner.Outcome` into the event's :class:`~lightning_xai.callbacks.sinks.Record`,
with the numbers of :class:`~lightning_xai.callbacks.evolution.EvolutionTracker` and the pictures of
:class:`~lightning_xai.callbacks.presentation.Board`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_xai.callbacks import keys
from lightning_xai.callbacks.evolution import EvolutionTracker
from lightning_xai.callbacks.presentation import Board
from lightning_xai.callbacks.runner import Outcome, ProbeRunner
from lightning_xai.callbacks.shortcut import ShortcutEvent
from lightning_xai.callbacks.sinks import Record


class RecordBuilder:
    """Fills each event's :class:`Record`, and holds what a run's records build on (each method's previous maps,
    shortcut alarm and timeline history) for checkpoints.

    Args:
        tracker: each method's evolution scalars and shortcut alarm.
        board: the pictures and the timeline history.
        deletion_insertion: also compute each method's deletion and insertion AUC (about ``2 * 51`` forwards
            per probe and method).
        stop_on_shortcut: the caller stops training when a shortcut alarm fires (its note says so).
    """

    def __init__(self, tracker: EvolutionTracker, board: Board, *, deletion_insertion: bool = False,
                 stop_on_shortcut: bool = False) -> None:
        self.tracker, self.board = tracker, board
        self.deletion_insertion, self.stop_on_shortcut = deletion_insertion, stop_on_shortcut

    def fill(self, record: Record, outcome: Outcome, runner: ProbeRunner, probe_tiles: bool = False
             ) -> list[ShortcutEvent]:
        """Put the event's scalars (``xai/...``: the probes', then each method's evolution, shortcut and
        faithfulness numbers), pictures, shortcut region pictures and alarm notes, and explanations into
        ``record``; with ``probe_tiles``, the probe images too (the first event of a run).

        Returns:
            the shortcut alarms that fired at this event (each method's fires once per run).
        """
        record.scalars = runner.probe_scalars(outcome)
        fired = []
        for name, result in outcome.results.items():
            scalars = self.tracker.update(name, record.epoch, record.step, result.maps, runner.probes.probe.masks,
                                          classes=result.targets)
            if self.deletion_insertion:
                scalars.update(runner.faithfulness(outcome, name))
            record.scalars.update({keys.scalar_key(key, name): value for key, value in scalars.items()})
            images, alerts = self.tracker.shortcut_outputs(name, record.label, self.board.cmap, self.stop_on_shortcut)
            record.images.update(images)
            record.alerts.extend(alerts)
            if alerts:
                fired.append(self.tracker.alarms[name])
        record.explanations = outcome.results
        labels = runner.label_indices(outcome)
        predictions = outcome.logits.argmax(-1) if labels is not None else None
        pictures = self.board.draw(outcome.images, record.label, outcome.targets, outcome.probs, outcome.results,
                                   labels=labels, predictions=predictions)
        record.grids, record.timelines, record.rows = pictures.grids, pictures.timelines, pictures.rows
        record.probe_overlays, record.probe_timelines = pictures.probe_overlays, pictures.probe_timelines
        if probe_tiles:
            record.probe_tiles = self.board.probe_tiles(outcome.images)
        return fired

    def reset(self) -> None:
        """A new run: forget every method's history."""
        self.tracker.reset()
        self.board.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "board": self.board.state_dict()}

    def load_state_dict(self, state: dict[str, Any], methods: Sequence[str]) -> None:
        """Restore the history of ``methods`` (those of another run's state are dropped)."""
        self.tracker.load_state_dict(state.get("tracker", {}), methods=methods)
        self.board.load_state_dict(state.get("board", {}), methods=list(methods))
