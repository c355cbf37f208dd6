"""``ExplanationMonitor``: explain a fixed probe batch at every validation and log the maps to every logger.

It is glue: Lightning's hooks decide when (:mod:`.schedule`), and at each event the pipeline (:mod:`.pipeline`)
reads in one direction: the probes (:mod:`.probes`) go through the model and the explainers (:mod:`.runner`),
the results become numbers (:mod:`.evolution`) and pictures (:mod:`.presentation`) in one :class:`Record`
(:mod:`.record_builder`), which goes to every sink (:mod:`.sinks`) under the names of :mod:`.keys`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_xai.adapters import OutputTransform, ViTLocator
from lightning_xai.callbacks import checks, keys, model_checks, ranks, sharded
from lightning_xai.callbacks.batches import BatchTransform, read_samples
from lightning_xai.callbacks.evolution import EvolutionTracker
from lightning_xai.callbacks.notices import Notices
from lightning_xai.callbacks.pipeline import EventPipeline
from lightning_xai.callbacks.presentation import Board, class_labels
from lightning_xai.callbacks.probes import Probe, ProbeSet
from lightning_xai.callbacks.record_builder import RecordBuilder
from lightning_xai.callbacks.runner import ProbeRunner
from lightning_xai.callbacks.schedule import Schedule
from lightning_xai.callbacks.shortcut import (
    DEFAULT_THRESHOLD,
    ShortcutWatch,
    pool_coverage_warning,
    probe_coverage_warning,
)
from lightning_xai.callbacks.sinks import Record, sinks_for
from lightning_xai.callbacks.step_inputs import StepInputCheck
from lightning_xai.explainers import Explanation
from lightning_xai.explainers.registry import resolve_methods
from lightning_xai.handle import ForwardFn


class ExplanationMonitor(Callback):
    """Explain a fixed probe batch with GradToken, C2F-Explainer or any registered method while training,
    and log overlays, a per-method timeline and evolution scalars to every logger of the ``Trainer``.

    Everything is logged at the step Lightning logs its own metrics at (:func:`.keys.logging_step`), so maps and
    ``val_loss`` share one axis. Every rank explains its share of the probes and rank 0 logs; explaining never
    changes training, and a failure becomes a warning. Arguments: see the README's "Callback options".

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
        task: str = "auto",
        name: str | None = None,
        vit: ViTLocator = None,
        output_transform: OutputTransform = None,
        forward: ForwardFn = None,
        batch_transform: BatchTransform = None,
        shortcut_alarm: bool = True,
        shortcut_threshold: float = DEFAULT_THRESHOLD,
        shortcut_patience: int | None = None,
        shortcut_references: int | tuple[torch.Tensor, torch.Tensor] = 24,
        stop_on_shortcut: bool = False,
    ) -> None:
        super().__init__()
        self.methods = resolve_methods(methods)
        flags = dict(explain_at_fit_start=explain_at_fit_start, deletion_insertion=deletion_insertion,
                     save_raw=save_raw, shortcut_alarm=shortcut_alarm, stop_on_shortcut=stop_on_shortcut)
        checks.check_arguments(
            stage=stage, similarity=similarity, on_error=on_error, every_n_epochs=every_n_epochs,
            every_n_validations=every_n_validations, timeline_columns=timeline_columns, cmap=cmap, alpha=alpha,
            class_names=class_names, output_transform=output_transform, forward=forward, flags=flags, task=task,
            name=name,
        )
        mean, std = checks.normalisation(mean, std)
        self.task, self.name = task, name
        self.class_names = None if class_names is None else list(class_names)
        self.probes = ProbeSet(probe_images, probe_labels, probe_masks, num_probes=num_probes, split=probe_split,
                               seed=seed, batch_transform=batch_transform, targets=targets, top_k=top_k,
                               num_references=shortcut_references if shortcut_alarm else 0)
        checks.check_shortcut_targets(shortcut_alarm, self.probes.targets)
        self.stage, self.explain_at_fit_start = stage, explain_at_fit_start
        self.schedule = Schedule(every_n_epochs, every_n_validations)
        self.save_raw = save_raw
        self.vit, self.output_transform, self.forward = vit, output_transform, forward
        self.records = RecordBuilder(
            EvolutionTracker(similarity),
            Board(cmap=cmap, alpha=alpha, mean=mean, std=std, class_names=class_names,
                  timeline_columns=timeline_columns),
            ShortcutWatch(shortcut_threshold, shortcut_patience) if shortcut_alarm else None,
            deletion_insertion=deletion_insertion, stop_on_shortcut=stop_on_shortcut)
        self.runner: ProbeRunner | None = None
        """The model side (the module, its ViT, the explainers), built when the run starts."""
        self.last_scalars: dict[str, float] = {}  # the latest event's scalars, {"xai/<method>/<name>": value}
        self.last_results: dict[str, Explanation] = {}  # the latest event's explanations, by method
        self.pipeline = EventPipeline(self.records, Notices(raise_errors=on_error == "raise"))
        self.step_inputs = StepInputCheck()
        self._trainer: pl.Trainer | None = None

    @property
    def probe(self) -> Probe | None:
        """The probes of the current run (``None`` until drawn at the start of ``fit``/``validate``)."""
        return self.probes.probe

    @property
    def explained(self) -> list[tuple[int, int]]:
        """``(epoch, step)`` of every explanation event of the current run (resumed runs included)."""
        return self.schedule.explained

    def timeline(self, method: str):
        """The current timeline of ``method``: uint8 ``(H, W, 3)``, rows = probes, columns = explanation events."""
        return self.records.board.timeline(method)

    @property
    def state_key(self) -> str:
        named = {} if self.name is None else {"name": self.name}
        return self._generate_state_key(stage=self.stage, methods=tuple(self.methods), **named)

    # -- set-up: every misconfiguration raises here or in _prepare, before the first epoch --------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer is not self._trainer:  # a new run (a second fit with this instance): start afresh
            self._trainer, self.pipeline.probes_logged = trainer, False
            for part in (self.probes, self.schedule, self.records, self.step_inputs):
                part.reset()
            self.pipeline.notices.start(trainer)
        self.runner = None
        model_checks.check_not_sharded(trainer)
        checks.check_monitor_names(self, [cb for cb in trainer.callbacks if isinstance(cb, ExplanationMonitor)])
        if stage == "fit" and self.stage == "validation":
            model_checks.check_validation_runs(trainer, pl_module)
        if trainer.is_global_zero:  # under fast_dev_run nothing is written, as Lightning's own loggers do
            self.pipeline.sinks = [] if trainer.fast_dev_run else sinks_for(trainer, trainer.loggers, self.save_raw,
                                                                            self.name)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer, pl_module)
        why = self.schedule.never_explains(trainer, self.stage)
        if why is not None:
            rank_zero_warn(f"lightning-xai: this fit will never explain: {why}.", category=UserWarning)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.runner is None and self.stage == "validation":  # trainer.validate(): no on_fit_start
            self._prepare(trainer, pl_module)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the probes, then find the ViT (the module is built by now), build the explainers, check."""
        self.probes.draw(trainer)
        with sharded.full_parameters(trainer):
            runner = ProbeRunner(pl_module, self.methods, self.probes, vit=self.vit,
                                 output_transform=self.output_transform, forward=self.forward, task=self.task)
            self.runner = ranks.shared(runner, trainer.global_rank, trainer.world_size)
        self.records.board.class_names = checks.class_names_for(self.class_names, runner.num_classes,
                                                                class_labels(pl_module, runner.handle.vit))
        if self.records.shortcut is not None and runner.task == "multilabel":
            self.records.shortcut = None
            rank_zero_warn("lightning-xai: the shortcut alarm is off for this multi-label model: it asks whether a "
                           "region moves an image's one predicted class to another, which a multi-label head does "
                           "not have. Pass shortcut_alarm=False to silence this.", category=UserWarning)
        coverage = None
        if self.records.shortcut is not None:
            pool = self.records.shortcut.references = self.probes.reference_pool()
            coverage = probe_coverage_warning(self.probes.probe.labels) if pool is None else pool_coverage_warning(
                pool[1])
        if coverage is not None:
            rank_zero_warn(f"lightning-xai: {coverage}", category=UserWarning)

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**self.probes.state_dict(), "stage": self.stage, "name": self.name, "methods": list(self.methods),
                "schedule": self.schedule.state_dict(), **self.records.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probes.load_state_dict(state_dict)
        self.schedule.load_state_dict(state_dict.get("schedule", {}))
        self.records.load_state_dict(state_dict, methods=list(self.methods))
        self.pipeline.probes_logged = bool(self.explained)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Resuming with other ``methods`` (another state key): take the probes, and the history of the methods
        still explained, from the checkpoint's one monitor state of the same stage and name."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # load_state_dict gets it
        same = [s for s in states.values()
                if isinstance(s, dict) and s.get("stage") == self.stage and s.get("name") == self.name and "probe" in s]
        if len(same) == 1:
            self.load_state_dict(copy.deepcopy(same[0]))

    # -- hooks ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.explain_at_fit_start and keys.logging_step(trainer) == 0 and not self.explained:
            self._explain(trainer, 0, within_epoch=True, scheduled=False)
            self.pipeline.flush()  # no metrics of Lightning's follow at step 0 for sure

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pipeline.flush()  # after Lightning logged the previous epoch's metrics (stage="train")

    on_train_end = on_validation_end = on_train_epoch_start  # after Lightning logged this validation's metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = keys.logging_step(trainer, train_epoch_end=True)
        if self.stage == "train" and self.schedule.due(trainer, step, validation=False):
            self._explain(trainer, step)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.is_global_zero and self.runner is not None and not self.step_inputs.done:
            self.step_inputs.start(self.runner.handle)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.is_global_zero and self.runner is not None and not self.step_inputs.done:
            reader = functools.partial(read_samples, batch_transform=self.probes.batch_transform)
            warning = self.step_inputs.finish(self.runner.handle, batch, reader)
            if warning is not None:
                self.pipeline.notices.warn(warning, once_key="step-inputs")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = keys.logging_step(trainer)
        if self.stage == "validation" and not trainer.sanity_checking and self.schedule.due(trainer, step, True):
            self._explain(trainer, step, self.schedule.within_epochs(trainer))

    # -- one explanation event --------------------------------------------------------------------------------
    def _explain(self, trainer: pl.Trainer, step: int, within_epoch: bool = False, scheduled: bool = True) -> None:
        """Every rank explains its share of the probes (:mod:`.ranks`, with the whole parameters under FSDP:
        :mod:`.sharded`) and rank 0 logs them all; with ``stop_on_shortcut``, an alarm stops every rank (a
        collective: rank 0 stopping alone would leave the others waiting in their next gradient all-reduce)."""
        self.schedule.add(trainer, step, scheduled)
        alarms = None
        with sharded.full_parameters(trainer):
            if not trainer.is_global_zero:
                ranks.take_part(self.runner)
            else:
                names = self.schedule.names(trainer, step, within_epoch, baseline=not scheduled)
                record = Record(trainer.current_epoch, step, *names)
                alarms = self.pipeline.run(record, self.runner)
                if alarms is not None:
                    self.last_scalars, self.last_results = dict(record.scalars), record.explanations
        if self.records.stop_on_shortcut:
            stop = trainer.strategy.reduce_boolean_decision(bool(alarms), all=False)
            trainer.should_stop = trainer.should_stop or stop
