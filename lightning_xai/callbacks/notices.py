"""How the callbacks tell the user something mid-run without breaking Lightning's progress bar."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl

from lightning_xai.explainers.perturbation import WARNED_ONCE


class Notices:
    """Warnings of one run: printed through the progress bar (on a line of their own) while one is shown, as
    ordinary warnings otherwise (user filters apply either way); some are shown once per run.

    Args:
        raise_errors: :meth:`failure` re-raises instead of warning (the callbacks' ``on_error="raise"``).
    """

    def __init__(self, raise_errors: bool = False) -> None:
        self.raise_errors = raise_errors
        self.trainer: pl.Trainer | None = None
        self._shown: set[str] = set()

    def start(self, trainer: pl.Trainer) -> None:
        """A new run: forget what was shown once."""
        self.trainer, self._shown = trainer, set()

    def warn(self, message: str, category: type[Warning] = UserWarning, once_key: str | None = None) -> None:
        """Issue ``message``; with ``once_key``, only the first time that key comes up in this run."""
        if once_key is not None:
            if once_key in self._shown:
                return
            self._shown.add(once_key)
        bar = self.trainer.progress_bar_callback if self.trainer is not None else None
        with warnings.catch_warnings():
            if bar is not None and bar.is_enabled:
                warnings.showwarning = lambda msg, cat, path, line, file=None, text=None: bar.print(
                    warnings.formatwarning(msg, cat, path, line, text).rstrip("\n"))
            warnings.warn(message, category, stacklevel=3)

    def failure(self, err: Exception, what: str, event: tuple[int, int]) -> None:
        """``what`` failed at the event ``(epoch, step)``: raise ``err`` (``raise_errors``), or warn that training
        goes on without it."""
        if self.raise_errors:
            raise err
        self.warn(f"lightning-xai: {what} failed at epoch {event[0]} (step {event[1]}): {type(err).__name__}: "
                  f"{err}. Training continues (set on_error='raise' to stop).", RuntimeWarning)

    def method_warning(self, method: str, caught: warnings.WarningMessage, epoch: int, step: int) -> bool:
        """Handle a warning ``method`` issued while explaining; ``True`` if handled here. C2F's
        ``NoPositiveMaskWarning`` is shown once per run and method, naming the event and the option to change."""
        if caught.category.__name__ != "NoPositiveMaskWarning":
            return False
        text = str(caught.message).removesuffix(WARNED_ONCE)  # here it is once per run, as said below
        self.warn(f"lightning-xai: {method!r} at epoch {epoch} (step {step}): {text} To change it: "
                  f"methods={{{method!r}: {{'thresholds': ...}}}}. Shown once per run.", caught.category,
                  once_key=f"no-positive-mask/{method}")
        return True
