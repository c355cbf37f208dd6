"""The probe set: a fixed batch of images explained every epoch, chosen once and kept for the whole run."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


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
        labels: ``(P,)`` or ``(P, K)`` int64 class labels, or ``None``.
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


def from_tensors(images: Any, labels: Any = None, masks: Any = None) -> Probe:
    """A probe from user tensors, with clear errors for shapes that do not fit together."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"probe_images must be a float tensor of shape (P, C, H, W), got {shape}")
    count, _, height, width = images.shape
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if labels.dim() not in (1, 2) or labels.shape[0] != count:
            raise ValueError(f"probe_labels must have shape (P,) or (P, K) with P = {count}, got {tuple(labels.shape)}")
    if masks is not None:
        masks = torch.as_tensor(masks).bool()
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.dim() not in (3, 4) or masks.shape[0] != count or tuple(masks.shape[-2:]) != (height, width):
            raise ValueError(
                f"probe_masks must have shape (P, H, W) or (P, K, H, W) matching the images {tuple(images.shape)}, "
                f"got {tuple(masks.shape)}"
            )
    return Probe(images.detach().cpu().clone(), labels, masks)


def _loader_dataset(loader: Any) -> Dataset | None:
    if isinstance(loader, DataLoader):
        return loader.dataset
    if isinstance(loader, list | tuple) and loader and isinstance(loader[0], DataLoader):
        return loader[0].dataset
    return None


def find_dataset(trainer: pl.Trainer, source: str) -> Dataset | None:
    """The dataset behind the trainer's ``source`` (``"val"`` or ``"train"``) dataloader, without iterating it.

    Looks at dataloaders the trainer has already loaded, then at the datamodule's and the LightningModule's
    ``*_dataloader()`` methods (building a DataLoader object draws no random numbers and starts no worker).
    """
    loaded = trainer.val_dataloaders if source == "val" else trainer.train_dataloader
    dataset = _loader_dataset(loaded)
    if dataset is not None:
        return dataset
    for owner in (trainer.datamodule, trainer.lightning_module):
        method = getattr(owner, f"{source}_dataloader", None)
        if method is None:
            continue
        try:
            with preserved_rng():
                dataset = _loader_dataset(method())
        except Exception:  # noqa: BLE001 - a loader that cannot be built yet is "not found"
            dataset = None
        if dataset is not None:
            return dataset
    return None


def _as_label(value: Any) -> Tensor:
    return torch.as_tensor(value).long()


def from_dataset(dataset: Dataset, num_probes: int, seed: int) -> Probe:
    """Draw ``num_probes`` samples once with a private generator seeded by ``seed``.

    Samples may be ``image``, ``(image, label)``, ``(image, label, mask)`` or dicts with those keys.
    """
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            "the probe dataset has no len() (an IterableDataset?): pass probe_images=... explicitly"
        ) from None
    if size == 0:
        raise ValueError("the dataset to draw probes from is empty")
    count = min(num_probes, size)
    indices = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].sort().values.tolist()
    images, labels, masks = [], [], []
    with preserved_rng():  # a random transform in __getitem__ must not advance the user's RNG
        for index in indices:
            sample = dataset[index]
            if isinstance(sample, dict):
                sample = (sample.get("image"), sample.get("label"), sample.get("mask"))
            elif isinstance(sample, Tensor):
                sample = (sample,)
            images.append(torch.as_tensor(sample[0]))
            labels.append(_as_label(sample[1]) if len(sample) > 1 and sample[1] is not None else None)
            masks.append(torch.as_tensor(sample[2]) if len(sample) > 2 and sample[2] is not None else None)
    probe = from_tensors(
        torch.stack(images).float(),
        torch.stack(labels) if all(label is not None for label in labels) else None,
        torch.stack(masks) if all(mask is not None for mask in masks) else None,
    )
    probe.indices = indices
    return probe
