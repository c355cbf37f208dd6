"""The probe set (a fixed batch of images explained at every event, chosen once and kept for the whole run), how
it is read from the user's data, and which classes are explained for it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from lightning_xai.validation import resolve_targets

#: ``batch_transform(batch) -> (images, labels, masks)``: reads a batch of the user's data (as the dataloader's
#: ``collate_fn`` makes it) into ``(P, C, H, W)`` float images and optional labels and masks (``None`` if absent).
BatchTransform = Callable[[Any], tuple[Tensor, Tensor | None, Tensor | None]] | None

TARGET_MODES = ("pred", "label", "topk")
IMAGE_KEYS = ("image", "images", "pixel_values", "img", "input", "inputs", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "class", "y")
MASK_KEYS = ("mask", "masks", "segmentation", "object_mask")


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global RNG states (python ``random``, numpy, torch CPU and CUDA) on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


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


def _looks_like_masks(value: Any, images: Tensor) -> bool:
    return (
        isinstance(value, Tensor)
        and value.dim() in (3, 4)
        and value.shape[0] == images.shape[0]
        and tuple(value.shape[-2:]) == tuple(images.shape[-2:])
    )


def read_batch(batch: Any) -> tuple[Any, Any, Any]:
    """The default reader of a collated batch: ``images``, ``(images, labels[, masks][, anything])`` or a dict
    with an image key (``image``, ``pixel_values``, ...), a label key and a mask key. A third element that is not
    a mask of the images' size (a sample index, file names) is ignored.

    Raises:
        ValueError: no images can be found; the message names ``batch_transform``.
    """
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        image_key = next((k for k in IMAGE_KEYS if isinstance(batch.get(k), Tensor)), None)
        if image_key is None:
            raise ValueError(
                f"cannot find the images in samples that are dicts with keys {sorted(map(str, batch))} (looked for "
                f"{list(IMAGE_KEYS)}): pass batch_transform=lambda batch: (batch['<images>'], batch['<labels>'], None)"
            )
        images = batch[image_key]
        labels = next((batch[k] for k in LABEL_KEYS if isinstance(batch.get(k), Tensor)), None)
        masks = next((batch[k] for k in MASK_KEYS if _looks_like_masks(batch.get(k), images)), None)
        return images, labels, masks
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch and isinstance(batch[0], Tensor):
        images = batch[0]
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        masks = batch[2] if len(batch) > 2 and _looks_like_masks(batch[2], images) else None
        return images, labels, masks
    raise ValueError(
        f"cannot read images from a batch of type {type(batch).__name__}: pass "
        "batch_transform=lambda batch: (images, labels or None, masks or None)"
    )


def _first_loader(loader: Any) -> DataLoader | None:
    if isinstance(loader, DataLoader):
        return loader
    if isinstance(loader, Mapping) and loader:
        loader = list(loader.values())
    if isinstance(loader, list | tuple) and loader and isinstance(loader[0], DataLoader):
        return loader[0]
    return None


def find_loader(trainer: pl.Trainer, split: str) -> DataLoader | None:
    """The trainer's ``split`` (``"val"`` or ``"train"``) DataLoader, without iterating it.

    Looks at dataloaders the trainer has already loaded, then at the datamodule's and the LightningModule's
    ``*_dataloader()`` methods (building a DataLoader object draws no random numbers and starts no worker).
    """
    loaded = _first_loader(trainer.val_dataloaders if split == "val" else trainer.train_dataloader)
    if loaded is not None:
        return loaded
    for owner in (trainer.datamodule, trainer.lightning_module):
        method = getattr(owner, f"{split}_dataloader", None)
        if method is None:
            continue
        try:
            with preserved_rng():
                loader = _first_loader(method())
        except Exception:  # noqa: BLE001 - a loader that cannot be built yet is "not found"
            loader = None
        if loader is not None:
            return loader
    return None


def from_loader(loader: DataLoader, num_probes: int, seed: int, batch_transform: BatchTransform = None) -> Probe:
    """Draw ``num_probes`` samples of ``loader``'s dataset once, with a private generator seeded by ``seed``;
    collate them with the loader's ``collate_fn`` and read them with ``batch_transform`` (default
    :func:`read_batch`)."""
    dataset: Dataset = loader.dataset
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            "the probe dataset has no len() (an IterableDataset?): pass probe_images=... explicitly"
        ) from None
    if size == 0:
        raise ValueError("the dataset to draw probes from is empty")
    if num_probes > size:
        rank_zero_warn(f"num_probes={num_probes} but the dataset has {size} samples: explaining all {size}")
    indices = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:num_probes].sort().values.tolist()
    collate = loader.collate_fn or default_collate
    with preserved_rng():  # a random transform in __getitem__ must not advance the user's RNG
        batch = collate([dataset[i] for i in indices])
    reader = batch_transform or read_batch
    images, labels, masks = reader(batch)
    source = "batch_transform(batch)[0]" if batch_transform is not None else "the images read from the dataset"
    if isinstance(images, Tensor) and images.dim() == 4 and images.dtype == torch.uint8:
        source += " (uint8: pass batch_transform=... that converts and normalises them as for training)"
    probe = from_tensors(images, labels, masks, source=source)
    probe.indices = indices
    return probe


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


def select_targets(targets: str | int | list[int], top_k: int, logits: Tensor, labels: Tensor | None) -> Tensor:
    """The classes ``(P, K)`` explained at one event, from the probes' logits ``(P, num_classes)``.

    ``"pred"``: the predicted class; ``"topk"``: the ``top_k`` predicted classes; ``"label"``: the probe labels
    (see :func:`class_indices`); an int or a list: those classes for every probe.
    """
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
