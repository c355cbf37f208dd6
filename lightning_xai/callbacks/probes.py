"""The probe set (a fixed batch of images explained at every event, chosen once and kept for the whole run) and
which classes are explained for it: :class:`ProbeSet` validates the callback's probe options when it is built
and draws the probes once the trainer's data is there."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai.callbacks.batches import BatchTransform, draw_samples
from lightning_xai.callbacks.checks import check_callable, check_choice, check_count
from lightning_xai.validation import resolve_targets

TARGET_MODES = ("pred", "label", "topk")
SPLITS = ("val", "train")


@dataclass
class Probe:
    """The fixed probe batch.

    Attributes:
        images: ``(P, C, H, W)`` float, in the model's input space.
        labels: ``(P,)`` class indices, ``(P, K)`` class indices or ``(P, num_classes)`` one-hot or soft labels,
            or ``None`` (see :func:`class_indices`).
        masks: ``(P, H, W)`` or ``(P, K, H, W)`` bool ground-truth object masks, or ``None``.
        indices: dataset indices the probes were drawn from (``None`` for user-given tensors).
    """

    images: Tensor
    labels: Tensor | None = None
    masks: Tensor | None = None
    indices: list[int] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "labels": self.labels, "masks": self.masks, "indices": self.indices}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Probe:
        return cls(state["images"], state.get("labels"), state.get("masks"), state.get("indices"))


def from_tensors(images: Any, labels: Any = None, masks: Any = None, source: str = "probe_images") -> Probe:
    """A probe from tensors, with clear errors for types and shapes that do not fit together."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{source} must be a float tensor of shape (P, C, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"{source} must be a floating-point tensor in the model's input space, got dtype {images.dtype}: "
            "convert and normalise them as for training (e.g. images.float() / 255, then your normalisation)"
        )
    count, _, height, width = images.shape
    if count == 0:
        raise ValueError(f"{source} is empty (P = 0)")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dtype == torch.bool or labels.dim() not in (1, 2) or labels.shape[0] != count:
            raise ValueError(
                f"probe labels must be class indices (P,) or (P, K), or one-hot/soft labels (P, num_classes), "
                f"with P = {count}; got {labels.dtype} of shape {tuple(labels.shape)}"
            )
    if masks is not None:
        masks = torch.as_tensor(masks).bool()
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.dim() not in (3, 4) or masks.shape[0] != count or tuple(masks.shape[-2:]) != (height, width):
            raise ValueError(
                f"probe masks must have shape (P, H, W) or (P, K, H, W) matching the images {tuple(images.shape)}, "
                f"got {tuple(masks.shape)}"
            )
    return Probe(images.detach().cpu().clone(), None if labels is None else labels.cpu().clone(), masks)


class ProbeSet:
    """The probes of a run and the classes explained for them.

    The probes are the user's tensors, or ``num_probes`` samples drawn once (seeded by ``seed``, with no effect
    on any other random stream) from the trainer's ``split`` dataloader by the first :meth:`draw`; they stay
    the same for the whole run and are saved in checkpoints (:meth:`state_dict`).

    Args:
        images, labels, masks: the user's probes (see :func:`from_tensors`), or ``images=None`` to draw them.
        num_probes, split, seed: how many samples to draw, from which dataloader (``"val"`` or ``"train"``).
        num_references: with drawn probes, also draw this many labelled samples (seeded by ``seed + 1``) as the
            shortcut check's references (:meth:`reference_pool`); ``0``: none. Checkpoints keep their dataset
            indices, not their images; a resumed run takes the same indices again. Or ``(images (R, C, H, W),
            labels (R,))``: the user's labelled references, as the model takes them (with given or drawn probes).
        batch_transform: reads a collated batch into ``(images, labels, masks)`` (default: :func:`.read_batch`).
        targets, top_k: which classes to explain (see :func:`select_targets`).

    Raises:
        ValueError/TypeError: at construction, naming the argument that is wrong.
    """

    def __init__(
        self, images: Tensor | None = None, labels: Tensor | None = None, masks: Tensor | None = None, *,
        num_probes: int = 8, split: str = "val", seed: int = 0, batch_transform: BatchTransform = None,
        targets: str | int | Sequence[int] = "pred", top_k: int = 2,
        num_references: int | tuple[Tensor, Tensor] = 0,
    ) -> None:
        check_choice("probe_split", split, SPLITS)
        self.given_references = given_references(num_references)
        if self.given_references is not None:
            num_references = 0
        check_count("shortcut_references", num_references, minimum=0)
        for name, value in (("num_probes", num_probes), ("top_k", top_k)):
            check_count(name, value)
        check_count("seed", seed, minimum=0)
        check_callable("batch_transform", batch_transform, "batch -> (images, labels, masks)")
        self.targets, self.top_k = check_targets(targets), top_k
        if self.targets == "label" and images is not None and labels is None:
            raise ValueError("targets='label' needs probe_labels when probe_images are given")
        self.given = None if images is None else from_tensors(images, labels, masks)
        self.num_probes, self.split, self.seed, self.batch_transform = num_probes, split, seed, batch_transform
        self.num_references = num_references
        self.probe: Probe | None = self.given
        """The probes of the current run (``None`` until drawn)."""
        self.references: Probe | None = self.given_references
        """Labelled samples drawn with the probes (or given) for the shortcut check (``None``: none)."""
        self._reference_indices: list[int] | None = None  # a resumed run's, to draw the same samples again

    def reset(self) -> None:
        """A new run: draw the probes again (the user's tensors stay)."""
        self.probe, self.references, self._reference_indices = self.given, self.given_references, None

    def draw(self, trainer: pl.Trainer) -> Probe:
        """The run's probes, drawn from the trainer's data the first time (see :func:`.batches.draw_samples`), and
        with them the references."""
        if self.probe is None:
            samples = draw_samples(trainer, self.split, self.num_probes, self.seed, self.batch_transform)
            self.probe = from_tensors(samples.images, samples.labels, samples.masks, source=samples.source)
            self.probe.indices = samples.indices
        # drawn probes (also restored from a checkpoint, which keeps the references' indices, not their images)
        if self.references is None and self.given is None and self.num_references > 0 \
                and self.probe.labels is not None:
            more = draw_samples(trainer, self.split, self.num_references, self.seed + 1, self.batch_transform,
                                self._reference_indices)
            self.references = from_tensors(more.images, more.labels, source=more.source)
            self.references.indices = more.indices
        return self.probe

    def reference_pool(self) -> tuple[Tensor, Tensor] | None:
        """The shortcut check's labelled references ``(images (R, C, H, W), labels (R,))``: the probes and the
        references drawn with them (or given), when both carry class-index labels ``(P,)`` of the probes' shape;
        given references alone when the probes carry none; else ``None`` (no labels, other label layouts)."""
        probe, more = self.probe, self.references
        if probe is None or more is None or not _class_indices(more.labels) \
                or more.images.shape[1:] != probe.images.shape[1:]:
            return None
        if not _class_indices(probe.labels):
            return (more.images, more.labels.long()) if more is self.given_references else None
        return torch.cat([probe.images, more.images]), torch.cat([probe.labels, more.labels]).long()

    def select(self, logits: Tensor, task: str = "multiclass") -> Tensor:
        """The classes ``(P, K)`` to explain given the probes' class scores ``(P, num_classes)`` of a ``task`` (see
        :func:`select_targets`); raises ``ValueError`` for classes the model does not have."""
        return select_targets(self.targets, self.top_k, logits, self.probe.labels, task)

    def state_dict(self) -> dict[str, Any]:
        drawn = self.references is not None and self.references is not self.given_references
        return {"probe": None if self.probe is None else self.probe.state_dict(), "targets": self.targets,
                "reference_indices": self.references.indices if drawn else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the saved probes (a resumed run explains the same images; its references, kept as indices only so
        that checkpoints stay small, are read again at those indices); the targets stay as constructed."""
        if state.get("probe") is not None:
            self.probe = Probe.from_state_dict(state["probe"])
            self.references, self._reference_indices = self.given_references, state.get("reference_indices")


def _class_indices(labels: Tensor | None) -> bool:
    """Whether ``labels`` are class indices ``(N,)`` (integers, one per image)."""
    return labels is not None and labels.dim() == 1 and not labels.is_floating_point()


def given_references(value: Any) -> Probe | None:
    """The user's ``shortcut_references=(images (R, C, H, W), labels (R,))`` as a :class:`Probe`, or ``None`` for
    a count; raises naming the option when the pair is malformed."""
    if isinstance(value, (bool, int)) or value is None:
        return None
    hint = "shortcut_references must be a count of samples to draw, or (images (R, C, H, W), labels (R,))"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{hint}, got {type(value).__name__}")
    images, labels = (torch.as_tensor(v) for v in value)
    if images.dim() != 4 or not images.is_floating_point() or len(images) == 0:
        raise ValueError(f"{hint}: the images must be a float tensor (R, C, H, W), got {tuple(images.shape)} "
                         f"{images.dtype}")
    if not _class_indices(labels) or len(labels) != len(images):
        raise ValueError(f"{hint}: the labels must be {len(images)} class indices (R,), got {tuple(labels.shape)} "
                         f"{labels.dtype}")
    return from_tensors(images, labels, source="shortcut_references")


def check_targets(targets: Any) -> str | int | list[int]:
    """Check a ``targets`` option without a model; returns it normalised (numpy scalars/arrays become ints)."""
    if isinstance(targets, np.ndarray | Tensor):
        targets = targets.tolist()
    if isinstance(targets, np.integer):
        targets = int(targets)
    if isinstance(targets, str):
        if targets not in TARGET_MODES:
            raise ValueError(f"targets must be one of {TARGET_MODES}, a class index or a list of them, got {targets!r}")
        return targets
    if isinstance(targets, int) and not isinstance(targets, bool):
        values = [targets]
    elif isinstance(targets, Sequence) and len(targets) > 0:
        values = [int(t) if isinstance(t, np.integer) else t for t in targets]
    else:
        raise ValueError(
            f"targets must be one of {TARGET_MODES}, a class index or a non-empty list of class indices, "
            f"got {targets!r}"
        )
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in values):
        raise ValueError(f"targets must be class indices (ints >= 0), got {targets!r}")
    return values[0] if isinstance(targets, int) else values


def class_indices(labels: Tensor, num_classes: int) -> Tensor:
    """Probe labels as class indices: ``(P,)`` or ``(P, K)`` ints stay; one-hot or soft labels
    ``(P, num_classes)`` (floats, or 0/1 ints summing to 1 per row) become their largest class; float class
    indices with integral values become ints.

    Raises:
        ValueError: float labels that are neither integral nor ``(P, num_classes)``.
    """
    if labels.is_floating_point():
        if labels.dim() == 2 and labels.shape[1] == num_classes:
            return labels.argmax(-1)
        if bool((labels == labels.round()).all()):
            return labels.long()
        raise ValueError(
            f"probe labels are floats {tuple(labels.shape)} that are neither class indices nor one-hot/soft "
            f"labels of shape (P, {num_classes}): pass class indices"
        )
    one_hot = labels.dim() == 2 and labels.shape[1] == num_classes and num_classes > 1 and bool(
        ((labels == 0) | (labels == 1)).all() and (labels.sum(-1) == 1).all()
    )
    return labels.argmax(-1) if one_hot else labels.long()


def positive_classes(positive: Tensor, scores: Tensor) -> Tensor:
    """Every class of a row where ``positive`` ``(P, C)`` is set, highest score first, as ``(P, K)`` indices with
    ``K`` the largest count of a row; a row with fewer repeats its first class in the remaining columns (a repeat
    of a valid class, never an invented one); a row with none gets its highest-scoring class."""
    positive = positive.to(scores.device) | (~positive.to(scores.device).any(-1, keepdim=True)
                                             & F.one_hot(scores.argmax(-1), scores.shape[-1]).bool())
    counts = positive.sum(-1, keepdim=True)
    ranked = scores.masked_fill(~positive, float("-inf")).argsort(-1, descending=True)[:, : int(counts.max())]
    columns = torch.arange(ranked.shape[1], device=ranked.device)
    return torch.where(columns < counts, ranked, ranked[:, :1])


def select_targets(targets: str | int | list[int], top_k: int, logits: Tensor, labels: Tensor | None,
                   task: str = "multiclass") -> Tensor:
    """The classes ``(P, K)`` explained at one event, from the probes' class scores ``(P, num_classes)``.

    ``"pred"``: the predicted class; ``"topk"``: the ``top_k`` predicted classes; ``"label"``: the probe labels
    (see :func:`class_indices`); an int or a list: those classes for every probe. For a ``"multilabel"`` task,
    ``"pred"`` explains every class with sigmoid >= 0.5 (at least the top one) and ``"label"`` every positive
    label of multi-hot labels ``(P, num_classes)`` (see :func:`positive_classes` for rows with fewer or none).
    """
    if task == "multilabel" and targets == "pred":
        return positive_classes(logits >= 0, logits)
    if task == "multilabel" and targets == "label" and labels is not None and tuple(labels.shape) == logits.shape:
        return positive_classes(labels > 0.5, logits)
    if targets == "pred":
        return logits.argmax(-1, keepdim=True)
    if targets == "topk":
        return logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
    if targets == "label":
        if labels is None:
            raise ValueError("targets='label' but the probe samples carry no labels: pass probe_labels=...")
        return resolve_targets(class_indices(labels, logits.shape[-1]), logits)
    if isinstance(targets, int):
        return resolve_targets(targets, logits)
    return resolve_targets(torch.tensor([list(targets)] * len(logits)), logits)
