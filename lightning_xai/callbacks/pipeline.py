"""One explanation event on rank 0, in one direction: the probes through the model and the explainers
(:class:`~lightning_xai.callbacks.runner.ProbeRunner`), their numbers and pictures into a
:class:`~lightning_xai.callbacks.sinks.Record` (:class:`~lightning_xai.callbacks.record_builder.RecordBuilder`),
the record to every sink. Whatever fails on the way goes to the run's
:class:`~lightning_xai.callbacks.notices.Notices` (a warning, or raised with ``on_error="raise"``)."""

from __future__ import annotations

import functools

from lightning_xai.callbacks.notices import Notices
from lightning_xai.callbacks.record_builder import RecordBuilder
from lightning_xai.callbacks.rng import preserved_rng
from lightning_xai.callbacks.runner import ProbeRunner
from lightning_xai.callbacks.sinks import Record, Sink, write_all
from lightning_xai.shortcut import ShortcutEvent


class EventPipeline:
    """Explains, builds and writes each event's :class:`Record`; an explanation failure never reaches training.

    Args:
        records: builds the records (and holds the run's history).
        notices: the run's warnings and its failure policy.

    Attributes:
        sinks: where records go (set for each run, rank 0 only).
        probes_logged: the probe images went out with an earlier record of this run (they go once).
    """

    def __init__(self, records: RecordBuilder, notices: Notices) -> None:
        self.records, self.notices = records, notices
        self.sinks: list[Sink] = []
        self.probes_logged = False

    def run(self, record: Record, runner: ProbeRunner) -> list[ShortcutEvent] | None:
        """Fill ``record`` with ``runner``'s explanations of the probes and write it to every sink.

        Returns:
            the shortcut alarms that fired (each is also warned about here), or ``None`` when the forward or
            building the record failed (nothing was written; a failing sink does not count).
        """
        fail = functools.partial(self.notices.failure, event=record.event)
        warned = functools.partial(self.notices.method_warning, epoch=record.epoch, step=record.step)
        what = "the model's forward on the probes"
        try:
            with preserved_rng():
                outcome = runner.run(lambda name, err: fail(err, f"explaining with {name!r}"), warned)
                what = "computing the event's scalars and pictures"
                pictures = frozenset().union(*(sink.pictures for sink in self.sinks))  # only what is written
                alarms = self.records.fill(record, outcome, runner, probe_tiles=not self.probes_logged,
                                           pictures=pictures)
        except Exception as err:  # noqa: BLE001 - an explanation failure must never lose the training run
            fail(err, what)
            return None
        for alarm in alarms:
            self.notices.warn(f"lightning-xai: {alarm.message()}", RuntimeWarning)
        write_all(self.sinks, record, lambda sink, err: fail(err, f"logging to {type(sink).__name__}"))
        self.probes_logged = True
        return alarms

    def flush(self) -> None:
        """Hand what the sinks hold to their loggers (after Lightning logged its own metrics of the step)."""
        write_all(self.sinks, None, lambda sink, err: self.notices.warn(
            f"lightning-xai: flushing {type(sink).__name__} failed: {err}", RuntimeWarning))
