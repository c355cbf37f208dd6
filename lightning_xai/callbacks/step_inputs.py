"""A cheap check for preprocessing inside the user's ``validation_step`` (``x = (x - mean) / std`` before
``self(x)``), which the callbacks cannot see and so do not apply to the probes.

At the first validation batch of a run, :class:`StepInputCheck` records what the ViT receives while
``validation_step`` runs, then gives the same batch's first image (as the callbacks read it) to the callbacks'
own forward and records what the ViT receives then. The two differ only when something between the batch and
the forward changes the images, i.e. the step itself: then it says so, naming ``batch_transform``. Anything
``forward`` does to its input (a channel adapter, a resize) happens on both paths and is not reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.callbacks.rng import preserved_rng
from lightning_xai.handle import ModelHandle

#: relative difference (to the largest magnitude) above which the two inputs are different images; far above
#: the rounding of half precision (about 0.4 %), far below what a normalisation changes (tens of percent)
TOLERANCE = 0.02


def first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """The first tensor a module was called with (positional first, then keyword: ``pixel_values=``)."""
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)


class InputRecorder:
    """Records the input of ``module``'s next call (one call only), then removes its hook; always removed by
    :meth:`remove` (also when the call never comes)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self._hook = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensor = first_tensor(args, kwargs)
        self.value = None if tensor is None else tensor.detach().clone()
        self.remove()

    def remove(self) -> None:
        self._hook.remove()


def differ(step_input: Tensor, own_input: Tensor) -> bool:
    """Whether the ViT's input in the step ``(B, ...)`` (its first row) and in the callbacks' forward ``(1, ...)``
    are different images (shapes, or values beyond :data:`TOLERANCE`)."""
    a, b = step_input[:1].float(), own_input.float().to(step_input.device)
    if a.shape != b.shape:
        return True
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    return float((a - b).abs().max()) > TOLERANCE * max(scale, 1e-6)


class StepInputCheck:
    """Once per run: do the ViT's inputs in ``validation_step`` match the callbacks' forward on the same batch?"""

    def __init__(self) -> None:
        self.done = False
        self._recorder: InputRecorder | None = None

    def reset(self) -> None:
        self.done = False
        self.stop()

    def start(self, handle: ModelHandle) -> None:
        """Before the first validation batch's step: record what the ViT receives in it. Not for a compiled model:
        a hook added for one step would make torch.compile re-trace the user's graph (twice: with the hook and
        without), which costs far more than the check is worth."""
        if handle.compiled:
            self.done = True
        elif not self.done and self._recorder is None:
            self._recorder = InputRecorder(handle.vit)

    def stop(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def finish(self, handle: ModelHandle, batch: Any, read: Callable[[Any], tuple]) -> str | None:
        """After that step: the callbacks' forward on the batch's first image (``read(batch)[0]``); returns the
        warning to give, or ``None``. Never raises (a batch it cannot read is not checked)."""
        recorder, self.done = self._recorder, True
        self.stop()
        if recorder is None or recorder.value is None:
            return None
        try:
            images = read(batch)[0]
            own = InputRecorder(handle.vit)
            try:
                with preserved_rng(), torch.no_grad():
                    handle.output(handle.prepare(images[:1]))
            finally:
                own.remove()
        except Exception:  # noqa: BLE001 - a check that cannot run says nothing
            return None
        if own.value is None or not differ(recorder.value, own.value):
            return None
        return ("lightning-xai: the ViT receives other inputs in validation_step than the callback's forward gives it "
                "for the same batch: your validation_step (or training_step) changes the images before calling the "
                "model (e.g. normalises them), and the callback cannot see that, so its maps and probabilities are of "
                "inputs the model never sees. Move that preprocessing into forward or on_after_batch_transfer, or "
                "pass batch_transform=lambda batch: (preprocessed images, labels, masks or None).")
