"""When the callbacks explain: which validations or epochs, named how, and which events a run has had."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_xai.callbacks import keys


class Schedule:
    """The explanation events of one run.

    Args:
        every_n_epochs: explain in epochs where ``(epoch + 1) % every_n_epochs == 0``.
        every_n_validations: of those, every n-th validation (with ``val_check_interval``, several an epoch).
    """

    def __init__(self, every_n_epochs: int = 1, every_n_validations: int = 1) -> None:
        self.every_n_epochs, self.every_n_validations = every_n_epochs, every_n_validations
        self.explained: list[tuple[int, int]] = []
        """``(epoch, step)`` of every explanation event of the run, the fit-start baseline included."""
        self._scheduled: list[list[int]] = []  # events explained on schedule (not the baseline), to skip repeats
        self._validations = 0
        self._validate_calls = 0  # trainer.validate() events of the run

    def reset(self) -> None:
        self.explained, self._scheduled, self._validations, self._validate_calls = [], [], 0, 0

    def due(self, trainer: pl.Trainer, step: int, validation: bool) -> bool:
        """Whether the event now (at ``step``) is explained; counts validations as they come."""
        if trainer.state.fn != "fit":  # trainer.validate(): explain whenever asked
            return True
        if validation:
            self._validations += 1
            if self._validations % self.every_n_validations:
                return False
        epoch = trainer.current_epoch
        return (epoch + 1) % self.every_n_epochs == 0 and [epoch, step] not in self._scheduled

    def add(self, trainer: pl.Trainer, step: int, scheduled: bool = True) -> None:
        """Note an explanation event of ``fit`` at ``step`` (``scheduled=False``: the fit-start baseline)."""
        if trainer.state.fn == "fit":
            self.explained.append((trainer.current_epoch, step))
            if scheduled:
                self._scheduled.append([trainer.current_epoch, step])

    @staticmethod
    def within_epochs(trainer: pl.Trainer) -> bool:
        """Validation runs on a step schedule (``val_check_interval``): events are then named by their step."""
        if trainer.state.fn != "fit":
            return False
        batch = trainer.val_check_batch
        return trainer.check_val_every_n_epoch is None or batch is None or batch < trainer.num_training_batches

    def names(self, trainer: pl.Trainer, step: int, within_epoch: bool, baseline: bool = False) -> tuple[str, str]:
        """The event's label (``"ep 3"`` / ``"ep 3 · step 120"`` / ``"start"``, or ``"validate 2"`` for the second
        ``trainer.validate()`` of the run, which claims no epoch) and file stem; counts validate calls."""
        if trainer.state.fn == "validate":
            self._validate_calls += 1
            return keys.validate_label(self._validate_calls), keys.validate_stem(self._validate_calls)
        epoch = trainer.current_epoch
        return (keys.event_label(epoch, step, within_epoch, baseline),
                keys.file_stem(epoch, step, within_epoch, baseline))

    def never_explains(self, trainer: pl.Trainer, stage: str) -> str | None:
        """Why this ``fit`` (from its current epoch to ``max_epochs``) will have no scheduled event, or ``None``:
        validation never runs in it (``check_val_every_n_epoch`` above ``max_epochs``), or never in an epoch of
        ``every_n_epochs``. ``None`` where it cannot tell (no ``max_epochs``, validation on a step schedule)."""
        last = trainer.max_epochs
        if last is None or last < 0:
            return None
        epochs = range(trainer.current_epoch + 1, last + 1)  # 1-based numbers of the epochs still to run
        every = self.every_n_epochs
        if stage == "train":
            if not any(e % every == 0 for e in epochs):
                return (f"every_n_epochs={every} but max_epochs={last}: no epoch of this fit is one to explain at; "
                        f"lower every_n_epochs or raise max_epochs")
            return None
        check = trainer.check_val_every_n_epoch
        if check is None:
            return None
        if not any(e % check == 0 for e in epochs):
            return (f"check_val_every_n_epoch={check} (Trainer) but max_epochs={last}: validation never runs in this "
                    f"fit, so stage='validation' never explains; lower check_val_every_n_epoch or use stage='train'")
        if not any(e % check == 0 and e % every == 0 for e in epochs):
            return (f"every_n_epochs={every} (monitor) never meets check_val_every_n_epoch={check} (Trainer) within "
                    f"max_epochs={last}: the monitor explains only in epochs where both divide the epoch number; "
                    f"make every_n_epochs a multiple of check_val_every_n_epoch (or 1)")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"explained": list(self.explained), "scheduled": list(self._scheduled), "validations": self._validations,
                "validate_calls": self._validate_calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.explained = [tuple(event) for event in state.get("explained", [])]
        self._scheduled = [list(event) for event in state.get("scheduled", [])]
        self._validations = int(state.get("validations", 0))
        self._validate_calls = int(state.get("validate_calls", 0))
