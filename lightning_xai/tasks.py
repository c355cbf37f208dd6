"""What a classifier's output logits mean: the task (multi-class, binary with one logit, multi-label), the class
scores the explainers differentiate, and the probabilities shown and scored.

- ``"multiclass"``: logits ``(B, C)``, one class per image; scores are the logits, probabilities their softmax.
- ``"binary"``: one logit ``z`` ``(B, 1)`` (``Linear(D, 1)`` trained with BCE); scores ``(B, 2) = [-z, z]``:
  class 1 is the positive logit, class 0 its negation; probabilities ``sigmoid(score)``, i.e.
  ``1 - sigmoid(z)`` and ``sigmoid(z)``.
- ``"multilabel"``: logits ``(B, C)``, independent sigmoid per class; scores are the logits, probabilities their
  sigmoid.
- ``"auto"``: guessed only where unambiguous: one logit means binary; multi-hot labels with two or more positives
  in a row mean multilabel (the callbacks, which see the probe labels); anything else multiclass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

TASKS = ("auto", "multiclass", "binary", "multilabel")
SIGMOID_TASKS = ("binary", "multilabel")


def check_task(task: Any) -> str:
    """``task`` if it is one of :data:`TASKS`; raises ``ValueError`` naming them otherwise."""
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def is_multi_hot(labels: Tensor | None, num_classes: int) -> bool:
    """Whether probe ``labels`` are multi-hot ``(P, num_classes)`` 0/1 rows with two or more positives in some row
    (the one unambiguous sign of a multi-label task)."""
    if labels is None or labels.dim() != 2 or labels.shape[1] != num_classes or num_classes < 2:
        return False
    binary = bool(((labels == 0) | (labels == 1)).all())
    return binary and bool((labels.sum(-1) >= 2).any())


def resolve_task(task: str, num_logits: int, labels: Tensor | None = None) -> str:
    """The task for a model with ``num_logits`` outputs: ``task`` itself unless ``"auto"``, which is binary for one
    logit, multilabel for multi-hot ``labels`` (see :func:`is_multi_hot`), multiclass otherwise.

    Raises:
        ValueError: the task does not fit the number of logits (one logit but ``"multiclass"``/``"multilabel"``,
            or several with ``"binary"``); the message names the fix.
    """
    check_task(task)
    if task == "auto":
        if num_logits == 1:
            return "binary"
        return "multilabel" if is_multi_hot(labels, num_logits) else "multiclass"
    check_logits(task, num_logits)
    return task


def check_logits(task: str, num_logits: int) -> None:
    """Raise ``ValueError`` when ``num_logits`` cannot be the output of a ``task`` head."""
    if num_logits == 1 and task in ("multiclass", "multilabel"):
        raise ValueError(
            f"the model outputs one logit, which a {task} task cannot explain (a softmax over one class is 1.0 "
            "everywhere): a one-logit head trained with BCE is binary, pass task='binary' (or leave task='auto')"
        )
    if num_logits != 1 and task == "binary":
        raise ValueError(
            f"task='binary' means one logit (Linear(D, 1) with BCE), but the model outputs {num_logits}: pass "
            "task='multiclass' for a softmax head (two logits included) or task='multilabel' for sigmoid outputs"
        )


def scores(logits: Tensor, task: str) -> Tensor:
    """Class scores ``(B, num_classes)`` from raw logits ``(B, L)`` of a resolved ``task`` (not ``"auto"``, see
    :func:`resolve_task`): binary ``[-z, z]`` ``(B, 2)``, otherwise the logits themselves."""
    check_logits(task, logits.shape[-1])
    return torch.cat([-logits, logits], dim=-1) if task == "binary" else logits


def probabilities(scores: Tensor, task: str) -> Tensor:
    """Probabilities ``(B, num_classes)`` of class ``scores`` of a resolved ``task``: softmax for multiclass,
    sigmoid of each score for binary and multilabel (binary: ``1 - sigmoid(z)`` and ``sigmoid(z)``)."""
    return scores.sigmoid() if task in SIGMOID_TASKS else scores.softmax(-1)


def log_probabilities(scores: Tensor, task: str) -> Tensor:
    """``log`` of :func:`probabilities`, computed stably (``log_softmax`` or ``logsigmoid``)."""
    return F.logsigmoid(scores) if task in SIGMOID_TASKS else scores.log_softmax(-1)
