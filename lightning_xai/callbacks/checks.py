"""Checks the callbacks run at construction and before the first epoch, so that a misconfiguration fails early
with a message naming the cause and the fix, never in the middle of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_xai.adapters import geometry
from lightning_xai.callbacks.evolution import SIMILARITIES
from lightning_xai.handle import ModelHandle
from lightning_xai.validation import check_images

STAGES = ("validation", "train")
ON_ERROR = ("warn", "raise")


def check_arguments(
    *, stage: Any, similarity: Any, on_error: Any, every_n_epochs: Any, every_n_validations: Any,
    timeline_columns: Any, cmap: Any, alpha: Any, mean: Any, std: Any, class_names: Any, output_transform: Any,
    forward: Any, shortcut_alarm: Any, stop_on_shortcut: Any,
) -> None:
    """Check :class:`~lightning_xai.callbacks.ExplanationMonitor`'s arguments (all but ``methods`` and the probe
    options, which have their own parsers: :func:`~lightning_xai.explainers.registry.resolve_methods` and
    :class:`~lightning_xai.callbacks.probes.ProbeSet`); raise ``ValueError``/``TypeError`` naming the argument."""
    check_choice("stage", stage, STAGES)
    check_choice("similarity", similarity, SIMILARITIES)
    check_choice("on_error", on_error, ON_ERROR)
    for name, value in (("every_n_epochs", every_n_epochs), ("every_n_validations", every_n_validations),
                        ("timeline_columns", timeline_columns)):
        check_count(name, value)
    check_look(cmap, alpha, mean, std, class_names)
    check_callable("output_transform", output_transform, "output -> logits")
    check_callable("forward", forward, "(module, images) -> output")
    if not isinstance(shortcut_alarm, bool) or not isinstance(stop_on_shortcut, bool):
        raise ValueError(f"shortcut_alarm and stop_on_shortcut must be True or False, got {shortcut_alarm!r} and "
                         f"{stop_on_shortcut!r}")
    if stop_on_shortcut and not shortcut_alarm:
        raise ValueError("stop_on_shortcut=True needs shortcut_alarm=True (the alarm is what stops training)")


def check_shortcut_targets(shortcut_alarm: bool, targets: str | int | list[int]) -> None:
    """Warn when the shortcut alarm is on but can never fire: its check pastes each probe's region into the probes
    explained for other classes, and fixed ``targets`` explain every probe for the same first class."""
    if shortcut_alarm and not isinstance(targets, str):
        rank_zero_warn(
            f"targets={targets!r} explains every probe for the same class, so the shortcut alarm (which pastes each "
            "probe's region into the probes explained for other classes) can never fire: use targets='pred' or "
            "'label' for it, or pass shortcut_alarm=False", category=UserWarning)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_look(cmap: Any, alpha: Any, mean: Any, std: Any, class_names: Any) -> None:
    """The rendering options: a matplotlib colour map name, ``0 <= alpha <= 1``, ``mean``/``std`` given together
    as sequences of numbers of one length, ``class_names`` a sequence of strings."""
    if not isinstance(cmap, str) or cmap not in matplotlib.colormaps:
        raise ValueError(f"cmap must be a matplotlib colour map name such as 'jet' or 'viridis', got {cmap!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: pass both (your input normalisation) or neither (min-max)")
    for name, value in (("mean", mean), ("std", std)):
        if value is not None and (
            isinstance(value, str)
            or not isinstance(value, Sequence)
            or len(value) not in (1, 3)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(f"{name} must be 1 or 3 numbers (one per channel), got {value!r}")
    if class_names is not None and (
        isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names)
    ):
        raise ValueError(f"class_names must be a sequence of strings, got {class_names!r}")


def check_callable(name: str, value: Any, signature: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable {signature}, got {type(value).__name__}")


def check_probe_images(handle: ModelHandle, images: Tensor) -> None:
    """The probe images ``(P, C, H, W)`` fit the ViT: float, its channel count, finite, a size it accepts."""
    check_images(images, handle.vit)
    geometry(handle.vit, tuple(images.shape[-2:]))
