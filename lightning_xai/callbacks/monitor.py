"""``ExplanationMonitor``: explain a fixed probe batch at every validation and log the maps to every logger.

It is glue that reads in one direction: the probes (:mod:`.probes`) go through the model and the explainers
(:mod:`.runner`), the results become numbers (:mod:`.evolution`) and pictures (:mod:`.presentation`), and one
:class:`Record` per event goes to every sink (:mod:`.sinks`), under the names of :mod:`.keys`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_xai.adapters import OutputTransform, ViTLocator
from lightning_xai.callbacks import checks, keys, model_checks
from lightning_xai.callbacks.evolution import EvolutionTracker
from lightning_xai.callbacks.notices import Notices
from lightning_xai.callbacks.presentation import Board
from lightning_xai.callbacks.probes import BatchTransform, Probe, check_targets, draw_probe, from_tensors, preserved_rng
from lightning_xai.callbacks.runner import Outcome, ProbeRunner
from lightning_xai.callbacks.schedule import Schedule
from lightning_xai.callbacks.shortcut import DEFAULT_PATIENCE, DEFAULT_THRESHOLD
from lightning_xai.callbacks.sinks import Record, Sink, sinks_for, write_all
from lightning_xai.explainers import Explanation
from lightning_xai.explainers.registry import resolve_methods
from lightning_xai.handle import ForwardFn


class ExplanationMonitor(Callback):
    """Explain a fixed probe batch with GradToken, C2F-Explainer or any registered method while training,
    and log overlays, a per-method timeline and evolution scalars to every logger of the ``Trainer``.

    Everything is logged at the step Lightning logs its own metrics at (:func:`.keys.logging_step`), so maps and
    ``val_loss`` share one axis. Only rank 0 explains and logs; explaining never changes training, and a failure
    becomes a warning. Arguments: see the README's "Callback options".

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_xai.callbacks import ExplanationMonitor
        >>> monitor = ExplanationMonitor(methods=["gradtoken", "c2f"], num_probes=8)
        >>> trainer = pl.Trainer(max_epochs=5, callbacks=[monitor])  # then trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        methods: str | Sequence[str] | Mapping[str, Mapping[str, Any]] = ("gradtoken", "c2f"),
        *,
        probe_images: torch.Tensor | None = None,
        probe_labels: torch.Tensor | None = None,
        probe_masks: torch.Tensor | None = None,
        num_probes: int = 8,
        probe_split: str = "val",
        seed: int = 0,
        targets: str | int | Sequence[int] = "pred",
        top_k: int = 2,
        stage: str = "validation",
        every_n_epochs: int = 1,
        every_n_validations: int = 1,
        explain_at_fit_start: bool = False,
        similarity: str = "pearson",
        deletion_insertion: bool = False,
        save_raw: bool = False,
        on_error: str = "warn",
        timeline_columns: int = 12,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        cmap: str = "jet",
        alpha: float = 0.5,
        class_names: Sequence[str] | None = None,
        vit: ViTLocator = None,
        output_transform: OutputTransform = None,
        forward: ForwardFn = None,
        batch_transform: BatchTransform = None,
        shortcut_alarm: bool = True,
        shortcut_threshold: float = DEFAULT_THRESHOLD,
        shortcut_patience: int = DEFAULT_PATIENCE,
        stop_on_shortcut: bool = False,
    ) -> None:
        super().__init__()
        self.methods = resolve_methods(methods)
        checks.check_arguments(
            stage=stage, probe_split=probe_split, similarity=similarity, on_error=on_error, num_probes=num_probes,
            every_n_epochs=every_n_epochs, every_n_validations=every_n_validations, top_k=top_k, seed=seed,
            timeline_columns=timeline_columns, cmap=cmap, alpha=alpha, mean=mean, std=std, class_names=class_names,
            output_transform=output_transform, forward=forward, batch_transform=batch_transform,
            shortcut_alarm=shortcut_alarm, stop_on_shortcut=stop_on_shortcut,
        )
        self.targets = check_targets(targets)
        if self.targets == "label" and probe_images is not None and probe_labels is None:
            raise ValueError("targets='label' needs probe_labels when probe_images are given")
        self.user_probe = None if probe_images is None else from_tensors(probe_images, probe_labels, probe_masks)
        self.num_probes, self.probe_split, self.seed, self.top_k = num_probes, probe_split, seed, top_k
        self.stage, self.explain_at_fit_start = stage, explain_at_fit_start
        self.schedule = Schedule(every_n_epochs, every_n_validations)
        self.deletion_insertion, self.save_raw, self.on_error = deletion_insertion, save_raw, on_error
        self.vit, self.output_transform, self.forward = vit, output_transform, forward
        self.batch_transform = batch_transform
        self.board = Board(cmap=cmap, alpha=alpha, mean=mean, std=std, class_names=class_names,
                           timeline_columns=timeline_columns)
        self.shortcut_alarm, self.stop_on_shortcut = shortcut_alarm, stop_on_shortcut
        self.tracker = EvolutionTracker(  # validates threshold (0 < t < 1) and patience (int >= 1)
            similarity, (shortcut_threshold, shortcut_patience) if shortcut_alarm else None)
        self.probe: Probe | None = self.user_probe
        self.runner: ProbeRunner | None = None
        """The model side (the module, its ViT, the explainers), built when the run starts."""
        self.last_scalars: dict[str, float] = {}  # the latest event's scalars, {"xai/<method>/<name>": value}
        self.last_results: dict[str, Explanation] = {}  # the latest event's explanations, by method
        self._sinks: list[Sink] = []
        self._trainer: pl.Trainer | None = None
        self._probes_logged = False
        self._notices = Notices()

    @property
    def explained(self) -> list[tuple[int, int]]:
        """``(epoch, step)`` of every explanation event of the current run (resumed runs included)."""
        return self.schedule.explained

    def timeline(self, method: str):
        """The current timeline of ``method``: uint8 ``(H, W, 3)``, rows = probes, columns = explanation events."""
        return self.board.timeline(method)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stage=self.stage, methods=tuple(self.methods))

    # -- set-up: every misconfiguration raises here or in _prepare, before the first epoch --------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer is not self._trainer:  # a new run (a second fit with this instance): start afresh
            self._trainer, self.probe, self._probes_logged = trainer, self.user_probe, False
            for part in (self.schedule, self.tracker, self.board):
                part.reset()
            self._notices.start(trainer)
        self.runner = None
        model_checks.check_not_sharded(trainer)
        if stage == "fit" and self.stage == "validation":
            model_checks.check_validation_runs(trainer, pl_module)
        if trainer.is_global_zero:
            self._sinks = sinks_for(trainer, trainer.loggers, self.save_raw)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.runner is None and self.stage == "validation":  # trainer.validate(): no on_fit_start
            self._prepare(trainer, pl_module)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the probes, then find the ViT (the module is built by now), build the explainers, check."""
        if self.probe is None:
            self.probe = draw_probe(trainer, self.probe_split, self.num_probes, self.seed, self.batch_transform)
        self.runner = ProbeRunner(pl_module, self.methods, self.probe, targets=self.targets, top_k=self.top_k,
                                  vit=self.vit, output_transform=self.output_transform, forward=self.forward)

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        parts = {"schedule": self.schedule, "tracker": self.tracker, "board": self.board}
        return {"probe": None if self.probe is None else self.probe.state_dict(), "targets": self.targets,
                "stage": self.stage, "methods": list(self.methods), **{k: v.state_dict() for k, v in parts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe") is not None:
            self.probe = Probe.from_state_dict(state_dict["probe"])
        self.schedule.load_state_dict(state_dict.get("schedule", {}))
        self.tracker.load_state_dict(state_dict.get("tracker", {}), methods=self.methods)
        self.board.load_state_dict(state_dict.get("board", {}), methods=list(self.methods))
        self._probes_logged = bool(self.explained)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Resuming with other ``methods`` (another state key): take the probes, and the history of the methods
        still explained, from the checkpoint's one monitor state of the same stage."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # load_state_dict gets it
        same = [s for s in states.values() if isinstance(s, dict) and s.get("stage") == self.stage and "probe" in s]
        if len(same) == 1:
            self.load_state_dict(copy.deepcopy(same[0]))

    # -- hooks ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.explain_at_fit_start and keys.logging_step(trainer) == 0 and not self.explained:
            self._explain(trainer, pl_module, 0, within_epoch=True, scheduled=False)
            self._flush()  # no metrics of Lightning's follow at step 0 for sure

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()  # after Lightning logged the previous epoch's metrics (stage="train")

    on_train_end = on_validation_end = on_train_epoch_start  # after Lightning logged this validation's metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = keys.logging_step(trainer, train_epoch_end=True)
        if self.stage == "train" and self.schedule.due(trainer, step, validation=False):
            self._explain(trainer, pl_module, step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = keys.logging_step(trainer)
        if self.stage == "validation" and not trainer.sanity_checking and self.schedule.due(trainer, step, True):
            self._explain(trainer, pl_module, step, self.schedule.within_epochs(trainer))

    # -- one explanation event --------------------------------------------------------------------------------
    def _explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, within_epoch: bool = False,
                 scheduled: bool = True) -> None:
        self.schedule.add(trainer, step, scheduled)
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        record = Record(epoch, step, *self.schedule.names(epoch, step, within_epoch, baseline=not scheduled))
        try:  # an explanation failure must never lose the training run
            with preserved_rng():
                outcome = self._run(record)
        except Exception as err:  # noqa: BLE001
            return self._fail(err, "the model's forward on the probes", record)
        try:
            with preserved_rng():
                self._fill(record, outcome)
        except Exception as err:  # noqa: BLE001
            return self._fail(err, "computing the event's scalars and pictures", record)
        write_all(self._sinks, record, lambda sink, err: self._fail(err, f"logging to {type(sink).__name__}", record))
        self._probes_logged = True

    def _flush(self) -> None:
        write_all(self._sinks, None, lambda sink, err: self._notices.warn(
            f"lightning-xai: flushing {type(sink).__name__} failed: {err}", RuntimeWarning))

    def _fail(self, err: Exception, what: str, record: Record) -> None:
        if self.on_error == "raise":
            raise err
        self._notices.warn(f"lightning-xai: {what} failed at epoch {record.epoch} (step {record.step}): "
                           f"{type(err).__name__}: {err}. Training continues (set on_error='raise' to stop).",
                           RuntimeWarning)

    def _shortcut(self, method: str, record: Record) -> None:
        """The shortcut alarm's picture and, when it fires, a warning, a note and (``stop_on_shortcut``) the stop."""
        images, alerts = self.tracker.shortcut_outputs(method, record.label, self.board.cmap, self.stop_on_shortcut)
        record.images.update(images)
        record.alerts.extend(alerts)
        if alerts:  # the tracker fires each method's alarm once per run
            self._notices.warn(f"lightning-xai: {self.tracker.alarms[method].message()}", RuntimeWarning)
            self._trainer.should_stop = self._trainer.should_stop or self.stop_on_shortcut

    def _run(self, record: Record) -> Outcome:
        """The probes through the model and the explainers."""
        return self.runner.run(lambda name, err: self._fail(err, f"explaining with {name!r}", record),
                               lambda name, caught: self._notices.method_warning(name, caught, *record.event))

    def _fill(self, record: Record, outcome: Outcome) -> None:
        """The event's numbers (probes, evolution, faithfulness) and pictures, into ``record``."""
        record.scalars = self.runner.probe_scalars(outcome)
        for name, result in outcome.results.items():
            scalars = self.tracker.update(name, record.epoch, record.step, result.maps, self.probe.masks,
                                          classes=result.targets)
            self._shortcut(name, record)
            if self.deletion_insertion:
                scalars.update(self.runner.faithfulness(outcome, name))
            record.scalars.update({keys.scalar_key(key, name): value for key, value in scalars.items()})
        record.explanations = outcome.results
        pictures = self.board.draw(outcome.images, record.label, outcome.targets, outcome.probs, outcome.results)
        record.grids, record.timelines, record.rows = pictures.grids, pictures.timelines, pictures.rows
        record.probe_timelines = pictures.probe_timelines
        if not self._probes_logged:
            record.probe_tiles = self.board.probe_tiles(outcome.images)
        self.last_scalars, self.last_results = dict(record.scalars), outcome.results
