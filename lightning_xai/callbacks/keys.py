"""Every name the callbacks log under, and the step they log at, built in one place.

Images and scalars share one root, ``xai/``: ``xai/<method>/overlay``, ``xai/<method>/timeline`` (in TensorBoard
``xai/<method>/overlay/<i>`` and ``xai/<method>/timeline/<i>``, one per probe), ``xai/<method>/<scalar>``,
``xai/<scalar>`` for numbers about the probes themselves, ``xai/probes/<i>`` for the probe images (logged once)
and ``xai/table`` (W&B). They are logged at :func:`logging_step`, the step Lightning logs its own metrics at, so
``val_loss`` and ``xai/gradtoken/entropy`` share one x axis.

A monitor with ``name=...`` (two monitors in one run) logs under ``xai/<name>/...`` instead (:func:`named`), and
its files go under ``xai/<name>/``.
"""

from __future__ import annotations

import lightning.pytorch as pl

ROOT = "xai"
PROBES = f"{ROOT}/probes"
TABLE = f"{ROOT}/table"


def named(key: str, name: str | None) -> str:
    """``key`` (``xai/...``) as the monitor called ``name`` logs it: ``xai/<name>/...``; unchanged for ``None``."""
    if name is None or not key.startswith(f"{ROOT}/"):
        return key
    return f"{ROOT}/{name}/{key[len(ROOT) + 1:]}"


def validate_label(count: int) -> str:
    """Caption of the ``count``-th ``trainer.validate()`` event of a run: ``"validate 2"`` (it names no epoch: a
    validation after ``fit`` comes after the last epoch, and a fresh model's has none)."""
    return f"validate {count}"


def validate_stem(count: int) -> str:
    """File stem of the ``count``-th ``trainer.validate()`` event: ``validate_0002``."""
    return f"validate_{count:04d}"


def image_key(method: str, kind: str) -> str:
    """``xai/<method>/<kind>``, ``kind`` being ``"overlay"`` or ``"timeline"``."""
    return f"{ROOT}/{method}/{kind}"


def scalar_key(name: str, method: str | None = None) -> str:
    """``xai/<method>/<name>`` for a method's number, ``xai/<name>`` for one about the probes."""
    return f"{ROOT}/{name}" if method is None else f"{ROOT}/{method}/{name}"


def probe_overlay_key(method: str, index: int) -> str:
    """``xai/<method>/overlay/<index>``: one probe's overlays (TensorBoard logs one per probe)."""
    return f"{ROOT}/{method}/overlay/{index}"


def probe_timeline_key(method: str, index: int) -> str:
    """``xai/<method>/timeline/<index>``: one probe's timeline (TensorBoard logs one per probe)."""
    return f"{ROOT}/{method}/timeline/{index}"


def probe_key(index: int) -> str:
    """``xai/probes/<index>``: one probe image."""
    return f"{PROBES}/{index}"


def logging_step(trainer: pl.Trainer, train_epoch_end: bool = False) -> int:
    """The step Lightning logs its own metrics at, now: the count of batches that stepped the optimizer (what its
    ``LearningRateMonitor`` uses; ``trainer.global_step`` for one optimizer, before the step's increment).

    During validation inside ``fit`` it is one less than ``trainer.global_step``: Lightning logs ``val_loss`` there
    before counting the batch that triggered the validation. At ``on_train_epoch_end`` (``train_epoch_end=True``)
    it is the step of the epoch's last batch, where Lightning logs the ``*_epoch`` training metrics. 0 before
    training starts and in ``trainer.validate()`` of a fresh model.
    """
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))
    return max(0, step - 1) if train_epoch_end else step


def event_label(epoch: int, step: int, with_step: bool, baseline: bool = False) -> str:
    """How an explanation event is named in captions and timeline columns: ``"ep 3"``, or ``"ep 3 · step 120"``
    when validation runs within epochs; the fit-start baseline is ``"start"`` (before any training step)."""
    if baseline:
        return "start"
    return f"ep {epoch} · step {step}" if with_step else f"ep {epoch}"


def file_stem(epoch: int, step: int, with_step: bool, baseline: bool = False) -> str:
    """File name (without suffix) of an event's PNG or raw-map file: ``epoch_0003``, ``epoch_0003_step_000120``,
    or ``start`` for the fit-start baseline."""
    if baseline:
        return "start"
    return f"epoch_{epoch:04d}_step_{step:06d}" if with_step else f"epoch_{epoch:04d}"
