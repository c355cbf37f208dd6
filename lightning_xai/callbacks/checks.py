"""Checks the callbacks run at construction and before the first epoch, so that a misconfiguration fails early
with a message naming the cause and the fix, never in the middle of a run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_xai.callbacks.evolution import SIMILARITIES
from lightning_xai.callbacks.rng import preserved_rng
from lightning_xai.explainers.base import explanation_mode
from lightning_xai.handle import ModelHandle
from lightning_xai.tasks import check_task
from lightning_xai.validation import check_images

STAGES = ("validation", "train")
ON_ERROR = ("warn", "raise")


def check_arguments(
    *, stage: Any, similarity: Any, on_error: Any, every_n_epochs: Any, every_n_validations: Any,
    timeline_columns: Any, cmap: Any, alpha: Any, class_names: Any, output_transform: Any,
    forward: Any, flags: dict[str, Any], task: Any, name: Any,
) -> None:
    """Check :class:`~lightning_xai.callbacks.ExplanationMonitor`'s arguments (all but ``methods``, ``mean``/``std``
    (:func:`normalisation`) and the probe options, which have their own parsers:
    :func:`~lightning_xai.explainers.registry.resolve_methods` and :class:`~lightning_xai.callbacks.probes.ProbeSet`);
    ``flags``: the on/off options by name. Raise ``ValueError``/``TypeError`` naming the argument."""
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r} ({type(value).__name__})")
    check_task(task)
    if name is not None and (not isinstance(name, str) or not name or not all(
            c.isalnum() or c in "-_." for c in name)):
        raise ValueError(f"name must be None or a non-empty string of letters, digits, '-', '_' or '.' (it "
                         f"becomes part of the logged tags and file names), got {name!r}")
    check_choice("stage", stage, STAGES)
    check_choice("similarity", similarity, SIMILARITIES)
    check_choice("on_error", on_error, ON_ERROR)
    for name, value in (("every_n_epochs", every_n_epochs), ("every_n_validations", every_n_validations),
                        ("timeline_columns", timeline_columns)):
        check_count(name, value)
    check_look(cmap, alpha, class_names)
    check_callable("output_transform", output_transform, "output -> logits")
    check_callable("forward", forward, "(module, images) -> output")
    if flags.get("stop_on_shortcut") and not flags.get("shortcut_alarm"):
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


def normalisation(mean: Any, std: Any) -> tuple[list[float] | None, list[float] | None]:
    """``mean``/``std`` (the input normalisation, to show the probes in true colour) as lists of 1 or 3 floats:
    given together, as sequences, tensors or numpy arrays of numbers; every ``std`` > 0.

    Raises:
        ValueError: naming the argument and what it accepts.
    """
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: pass both (your input normalisation) or neither (min-max)")
    out = []
    for name, value in (("mean", mean), ("std", std)):
        if isinstance(value, Tensor | np.ndarray):
            value = value.tolist() if value.ndim else [value.item()]
        if value is not None and (
            isinstance(value, str)
            or not isinstance(value, Sequence)
            or len(value) not in (1, 3)
            or not all(isinstance(v, int | float | np.number) and not isinstance(v, bool | np.bool_) for v in value)
        ):
            raise ValueError(f"{name} must be 1 or 3 numbers (one per channel), got {value!r}")
        out.append(None if value is None else [float(v) for v in value])
    if std is not None and not all(math.isfinite(v) and v > 0 for v in out[1]):
        raise ValueError(f"std must be positive numbers (the input normalisation divides by it), got {out[1]}")
    return out[0], out[1]


def check_look(cmap: Any, alpha: Any, class_names: Any) -> None:
    """The rendering options: a matplotlib colour map name, ``0 <= alpha <= 1``, ``class_names`` a sequence of
    strings."""
    if not isinstance(cmap, str) or cmap not in matplotlib.colormaps:
        raise ValueError(f"cmap must be a matplotlib colour map name such as 'jet' or 'viridis', got {cmap!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if class_names is not None and (
        isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names)
    ):
        raise ValueError(f"class_names must be a sequence of strings, got {class_names!r}")


def check_callable(name: str, value: Any, signature: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable {signature}, got {type(value).__name__}")


def check_probe_images(handle: ModelHandle, images: Tensor) -> None:
    """The probe images ``(P, C, H, W)`` fit the model: float, finite, taken by its forward, and the ViT's token
    grid (read from what the ViT receives in one forward) can be placed on them."""
    check_images(images)
    with preserved_rng(), explanation_mode(handle.model):
        handle.geometry(handle.prepare(images[:1]))


def check_monitor_names(monitor: Any, monitors: Sequence[Any]) -> None:
    """Refuse two monitors of one Trainer that would write the same tags and files: the same ``name`` (``None``
    included) means the same ``xai/...`` tags (``xai/probes/<i>``, ``xai/target_probability``, the methods' tags)
    at the same steps, each overwriting the other's pictures."""
    same = [m for m in monitors if m is not monitor and m.name == monitor.name]
    if same:
        raise ValueError(
            f"{len(same) + 1} explanation monitors in this Trainer have name={monitor.name!r}, so they would write "
            f"the same tags (xai/probes, xai/target_probability, xai/<method>/...) and files and overwrite each other: "
            "give each its own name=..., e.g. name='train' and name='val' (tags become xai/<name>/...)"
        )


def class_names_for(given: Sequence[str] | None, num_classes: int, found: list[str] | None) -> list[str] | None:
    """The names shown for ``num_classes`` classes: the user's ``class_names`` (which must have that length),
    else the model's own (Hugging Face ``config.id2label``, ``found``), else ``None`` (indices).

    Raises:
        ValueError: ``class_names`` of another length than the model's number of classes.
    """
    if given is None:
        return found if found is not None and len(found) == num_classes else None
    if len(given) != num_classes:
        binary = " (a one-logit binary head has 2: negative, then positive)" if num_classes == 2 else ""
        raise ValueError(f"class_names has {len(given)} names but the model has {num_classes} classes{binary}: "
                         f"pass one name per class, in class index order")
    return list(given)
