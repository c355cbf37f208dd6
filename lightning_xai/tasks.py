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


def _zero_one_rows(labels: Tensor | None, num_classes: int) -> Tensor | None:
    """The positives per row ``(P,)`` of ``labels`` that are ``(P, num_classes)`` 0/1 rows, else ``None``."""
    if labels is None or labels.dim() != 2 or labels.shape[1] != num_classes or num_classes < 2:
        return None
    return labels.sum(-1) if bool(((labels == 0) | (labels == 1)).all()) else None


def resolve_task(task: str, num_logits: int, labels: Tensor | None = None) -> str:
    """The task for a model with ``num_logits`` outputs: ``task`` itself unless ``"auto"``, which is binary for one
    logit, multilabel for multi-hot ``labels`` ``(P, num_logits)`` 0/1 with two or more positives in some row (the one
    unambiguous sign), multiclass otherwise.

    Raises:
        ValueError: ``"auto"`` with ``(P, num_logits)`` 0/1 labels that have empty rows and no row with two
            positives (multi-hot or one-hot cannot be told): the message asks for ``task=``.
        ValueError: the task does not fit the number of logits (one logit but ``"multiclass"``/``"multilabel"``,
            or several with ``"binary"``); the message names the fix.
    """
    check_task(task)
    if task == "auto":
        if num_logits == 1:
            return "binary"
        counts = _zero_one_rows(labels, num_logits)
        if counts is not None and bool((counts >= 2).any()):
            return "multilabel"
        if counts is not None and bool((counts == 0).any()):
            raise ValueError(
                f"the probe labels are 0/1 rows of {num_logits} classes, some without any positive and none with two: "
                "multi-hot (multi-label) or one-hot (multi-class) cannot be told from them: pass "
                "task='multilabel' or task='multiclass'"
            )
        return "multiclass"
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
